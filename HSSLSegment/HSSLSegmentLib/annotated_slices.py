"""Which slices of a sparse annotation were painted, named the way the engine names them.

Arrays are numpy ``[k, j, i]`` (slicer.util.arrayFromVolume order, = the engine's ``[z, y, x]``).
A slice is ``(axis, index)`` with ``axis`` a numpy axis; its user-facing name is
``"<orientation>:<index>"`` where the orientation (axial / coronal / sagittal) is the anatomical axis
that dominates that voxel axis' direction, so ``axial:12`` is the 13th slice along the voxel axis
closest to head-foot, whatever the file's axis order (docs/job-protocol.md, ``slices``).

The detection rule is the engine's (hssl.sparse): a slice is a painted plane when at least half of
its labelled voxels have no labelled neighbour across it; labelled voxels left unexplained (stacks
of adjacent painted slices) are covered by slices of the axis along which they span the fewest
slices. Testing/slicer checks that both implementations agree. Numpy only.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

ORIENTATIONS = ("sagittal", "coronal", "axial")  # dominant R/L, A/P, S/I component
PLANAR_FRACTION = 0.5

SliceRef = tuple[int, int]  # (numpy axis, index)
_SLICE_PATTERN = re.compile(r"([A-Za-z]+)\s*:\s*([0-9][0-9,\s]*)")


def axisNames(ijkDirections: np.ndarray) -> tuple[str, str, str]:
    """Orientation of the slices along each numpy axis (k, j, i).

    ijkDirections: 3x3 whose columns are the i, j, k axis directions (RAS or LPS: only the
    magnitude of each component matters).
    """
    d = np.abs(np.asarray(ijkDirections, dtype=float)[:3, :3])
    return tuple(ORIENTATIONS[int(np.argmax(d[:, 2 - axis]))] for axis in range(3))


def _neighbour(fg: np.ndarray, axis: int, shift: int) -> np.ndarray:
    """fg shifted by ``shift`` (+1 / -1) along ``axis``, zero-filled: out[x] = fg[x - shift]."""
    out = np.zeros_like(fg)
    n = fg.shape[axis]
    dst = [slice(None)] * 3
    src = [slice(None)] * 3
    if shift > 0:
        dst[axis], src[axis] = slice(shift, n), slice(0, n - shift)
    else:
        dst[axis], src[axis] = slice(0, n + shift), slice(-shift, n)
    out[tuple(dst)] = fg[tuple(src)]
    return out


def detectAnnotatedSlices(labels: np.ndarray) -> list[SliceRef]:
    """Painted slices of a sparse ``[k, j, i]`` label array (any non-zero value is painted)."""
    fg = np.asarray(labels) != 0
    if fg.ndim != 3 or not fg.any():
        return []
    found: set[SliceRef] = set()
    explained = np.zeros_like(fg)
    for axis in range(3):
        isolated = fg & ~_neighbour(fg, axis, 1) & ~_neighbour(fg, axis, -1)
        others = tuple(a for a in range(3) if a != axis)
        painted = fg.sum(axis=others)
        thin = isolated.sum(axis=others)
        for index in np.flatnonzero((painted > 0) & (thin >= PLANAR_FRACTION * painted)):
            found.add((axis, int(index)))
            view = [slice(None)] * 3
            view[axis] = int(index)
            explained[tuple(view)] = True
    rest = fg & ~explained
    if rest.any():
        coords = np.nonzero(rest)
        axis = int(np.argmin([np.unique(c).size for c in coords]))
        found.update((axis, int(i)) for i in np.unique(coords[axis]))
    return sorted(found)


def formatSlices(refs: Iterable[SliceRef], names: Sequence[str]) -> list[str]:
    return [f"{names[axis]}:{index}" for axis, index in sorted(set(refs))]


def parseSlices(text: str | Iterable[str], shape: Sequence[int], names: Sequence[str]) -> list[SliceRef]:
    """Parse ``"axial:12, axial:20; coronal:5,6"`` (or a list of such strings) into slices.

    Raises ValueError with a one-line message naming the bad part.
    """
    specs = [text] if isinstance(text, str) else list(text)
    refs: set[SliceRef] = set()
    for spec in specs:
        spec = str(spec)
        leftover = _SLICE_PATTERN.sub(" ", spec).replace(",", " ").replace(";", " ").strip()
        if leftover:
            raise ValueError(f"cannot read slice '{leftover.split()[0]}': write orientation:index with "
                             f"orientation one of {', '.join(sorted(set(names)))}, e.g. {names[0]}:12")
        for match in _SLICE_PATTERN.finditer(spec):
            name = match.group(1).lower()
            if name not in names:
                raise ValueError(f"slice '{match.group(0).strip()}': orientation '{name}' is not one of "
                                 f"{', '.join(sorted(set(names)))}")
            axis = list(names).index(name)
            for value in (int(v) for v in re.findall(r"\d+", match.group(2))):
                if not 0 <= value < shape[axis]:
                    raise ValueError(f"slice '{name}:{value}': index {value} is outside 0..{shape[axis] - 1}")
                refs.add((axis, value))
    return sorted(refs)


def knownMask(shape: Sequence[int], refs: Iterable[SliceRef]) -> np.ndarray:
    """Boolean ``[k, j, i]`` mask of the voxels lying in any of ``refs``."""
    mask = np.zeros(tuple(shape), dtype=bool)
    for axis, index in refs:
        view = [slice(None)] * 3
        view[axis] = index
        mask[tuple(view)] = True
    return mask
