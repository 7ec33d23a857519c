"""Sparse annotations: which voxels are known, and which annotated slices they come from.

The rule (3D U-Net, Cicek et al. 2016): an annotated slice is known *everywhere* - every voxel in
it without a foreground label is background - while voxels outside annotated slices are unknown
and get zero weight in the loss. They are never treated as background.

Slices are ``SliceRef(axis, index)`` with ``axis`` a numpy axis of the ``[z, y, x]`` array. The
user-facing names come from the image direction: ``axial``, ``coronal``, ``sagittal`` (whichever
LPS axis dominates the array axis), so ``axial:12`` is the 13th slice along the array axis that
points head-foot, whatever the file's axis order.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

from .errors import HSSLError

# A slice counts as a painted plane when at least this fraction of its labelled voxels have no
# labelled neighbour across the slice (both neighbours along the axis unlabelled).
PLANAR_FRACTION = 0.5


@dataclasses.dataclass(frozen=True, order=True)
class SliceRef:
    axis: int  # numpy axis of the [z, y, x] array
    index: int

    def name(self, axis_names: Sequence[str]) -> str:
        return f"{axis_names[self.axis]}:{self.index}"


def parse_slices(specs: Iterable[str], shape: Sequence[int], axis_names: Sequence[str]) -> list[SliceRef]:
    """Parse ``axial:12``, ``coronal:40,41`` or ``k:12`` (image index axes i/j/k) into SliceRefs."""
    refs = []
    for spec in specs:
        for part in str(spec).replace(" ", "").split(";"):
            if not part:
                continue
            name, _, indices = part.partition(":")
            name = name.lower()
            if name in ("i", "j", "k"):
                axis = 2 - "ijk".index(name)
            elif name in axis_names:
                axis = list(axis_names).index(name)
            else:
                raise HSSLError(f"slice '{part}': orientation '{name}' is not one of {sorted(set(axis_names))} "
                                "or i/j/k; write e.g. axial:12")
            try:
                values = [int(v) for v in indices.split(",") if v != ""]
            except ValueError:
                raise HSSLError(f"slice '{part}': indices must be integers, e.g. axial:12,20") from None
            if not values:
                raise HSSLError(f"slice '{part}' names no index: write e.g. {name}:12")
            for v in values:
                if not 0 <= v < shape[axis]:
                    raise HSSLError(f"slice '{part}': index {v} is outside 0..{shape[axis] - 1}")
                refs.append(SliceRef(axis, v))
    return sorted(set(refs))


def detect_annotated_slices(labels: np.ndarray) -> list[SliceRef]:
    """Find the painted slices of a sparse ``[z, y, x]`` label array, in any orientation(s).

    A slice along axis a is a painted plane when most of its labelled voxels are one voxel thick
    along a. Labelled voxels not explained that way (stacks of adjacent painted slices) are
    covered by the slices of the axis along which they span the fewest slices.
    """
    fg = labels > 0
    if not fg.any():
        return []
    refs: set[SliceRef] = set()
    covered = np.zeros_like(fg)
    for axis in range(3):
        before = np.zeros_like(fg)
        after = np.zeros_like(fg)
        src = [slice(None)] * 3
        dst = [slice(None)] * 3
        src[axis], dst[axis] = slice(None, -1), slice(1, None)
        before[tuple(dst)] = fg[tuple(src)]  # the neighbour at index - 1
        after[tuple(src)] = fg[tuple(dst)]  # the neighbour at index + 1
        thin = fg & ~before & ~after
        other = tuple(a for a in range(3) if a != axis)
        n_fg = fg.sum(axis=other)
        n_thin = thin.sum(axis=other)
        for index in np.nonzero((n_fg > 0) & (n_thin >= PLANAR_FRACTION * n_fg))[0]:
            refs.add(SliceRef(axis, int(index)))
            _slab(covered, axis, int(index))[...] = True
    left = fg & ~covered
    if left.any():
        coords = np.nonzero(left)
        counts = [len(np.unique(c)) for c in coords]
        axis = int(np.argmin(counts))
        refs.update(SliceRef(axis, int(i)) for i in np.unique(coords[axis]))
    return sorted(refs)


def _slab(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    sl = [slice(None)] * 3
    sl[axis] = index
    return array[tuple(sl)]


def known_mask(shape: Sequence[int], slices: Iterable[SliceRef]) -> np.ndarray:
    """Boolean ``[z, y, x]`` mask of every voxel lying in one of ``slices``."""
    mask = np.zeros(tuple(shape), dtype=bool)
    for ref in slices:
        _slab(mask, ref.axis, ref.index)[...] = True
    return mask


def whole_slices(known: np.ndarray, axis: int) -> np.ndarray:
    """Indices along ``axis`` of the slices of ``known`` that are known in every voxel: the painted
    slices of that orientation (within a region, the part of them inside it)."""
    return np.nonzero(known.all(axis=tuple(a for a in range(3) if a != axis)))[0]


def check_covered(labels: np.ndarray, known: np.ndarray, axis_names: Sequence[str]) -> None:
    outside = (labels > 0) & ~known
    if outside.any():
        z, y, x = (int(c[0]) for c in np.nonzero(outside))
        raise HSSLError(f"{int(outside.sum())} labelled voxels lie outside the given annotated slices "
                        f"(e.g. voxel z={z}, y={y}, x={x}, on {axis_names[0]}:{z}): list every painted "
                        "slice or leave --slices out to detect them")


def choose_holdout(labels: np.ndarray, slices: Sequence[SliceRef]) -> SliceRef | None:
    """With 3 or more annotated slices, a foreground-carrying slice of the orientation with most
    slices, kept out of training to estimate quality; None when there are fewer, or when every such
    slice holds the only painted voxels of some segment (holding it out would hide that segment
    from most of the training). Among the eligible slices the one nearest the middle is taken."""
    if len(slices) < 3:
        return None
    by_axis: dict[int, list[SliceRef]] = {}
    for ref in slices:
        if _slab(labels, ref.axis, ref.index).any():
            by_axis.setdefault(ref.axis, []).append(ref)
    if not by_axis:
        return None
    axis = max(by_axis, key=lambda a: len(by_axis[a]))
    candidates = sorted(by_axis[axis])
    if len(candidates) < 2:
        return None  # holding out the only foreground slice would leave nothing to learn from
    present = {ref: set(np.unique(_slab(labels, ref.axis, ref.index)).tolist()) - {0} for ref in slices}
    middle = (len(candidates) - 1) / 2
    for i in sorted(range(len(candidates)), key=lambda i: (abs(i - middle), -i)):
        ref = candidates[i]
        elsewhere = set().union(*(present[r] for r in slices if r != ref))
        if present[ref] <= elsewhere:
            return ref
    return None


@dataclasses.dataclass
class Annotation:
    """The known-voxel mask and the slices that define it (empty when given as an explicit mask)."""

    known: np.ndarray
    slices: list[SliceRef]
    source: str  # "detected", "listed", "mask" or "all"


def resolve_annotation(labels: np.ndarray, axis_names: Sequence[str], slices: Sequence[str] | None = None,
                       mask: np.ndarray | None = None, all_known: bool = False) -> Annotation:
    """Decide the known voxels: an explicit mask, every voxel, a slice list, or detected slices."""
    if mask is not None:
        known = mask.astype(bool)
        if not known.any():
            raise HSSLError("the known-voxel mask is empty: it must mark the annotated voxels (non-zero)")
        check_covered(labels, known, axis_names)
        return Annotation(known, [], "mask")
    if all_known:
        return Annotation(np.ones(labels.shape, dtype=bool), [], "all")
    if slices:
        refs = parse_slices(slices, labels.shape, axis_names)
        known = known_mask(labels.shape, refs)
        check_covered(labels, known, axis_names)
        return Annotation(known, refs, "listed")
    refs = detect_annotated_slices(labels)
    if not refs:
        raise HSSLError("the labels have no annotated voxel: paint the structure on at least one slice "
                        "(or list background-only slices with --slices)")
    return Annotation(known_mask(labels.shape, refs), refs, "detected")


ROI_MIN_MARGIN_MM = 20.0


def annotation_roi(labels: np.ndarray, known: np.ndarray, spacing_zyx: Sequence[float]) -> tuple[slice, ...] | None:
    """The region where the painted structures can plausibly be: the bounding box of the painted
    foreground grown on every side by half its extent, and by at least 20 mm (2 voxels).

    Derived from the user's annotation only. Training samples centres inside it and prediction
    is limited to it, which removes look-alike tissue far away and makes prediction fast.
    Returns ``[z, y, x]`` slices, or None when nothing is painted.
    """
    fg = (labels > 0) & known
    if not fg.any():
        return None
    roi = []
    for axis in range(3):
        hit = np.nonzero(fg.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        lo, hi = int(hit[0]), int(hit[-1]) + 1
        margin = max(int(np.ceil(0.5 * (hi - lo))), int(np.ceil(ROI_MIN_MARGIN_MM / spacing_zyx[axis])), 2)
        roi.append(slice(max(0, lo - margin), min(labels.shape[axis], hi + margin)))
    return tuple(roi)
