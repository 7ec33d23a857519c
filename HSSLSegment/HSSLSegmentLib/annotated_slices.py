"""Which slices of a sparse annotation were painted, named the way the engine names them.

Detection, the slice grammar and the known-voxel mask are the engine's own (``hssl.sparse``, numpy
only, imported here); this module adds what only the Slicer side knows: the orientation names of a
volume node's axes, from its IJK-to-RAS directions.

Arrays are numpy ``[k, j, i]`` (slicer.util.arrayFromVolume order, = the engine's ``[z, y, x]``).
A slice is a :class:`hssl.sparse.SliceRef` ``(axis, index)`` with ``axis`` a numpy axis; its
user-facing name is ``"<orientation>:<index>"`` where the orientation (axial / coronal / sagittal)
is the anatomical axis that dominates that voxel axis' direction, so ``axial:12`` is the 13th slice
along the voxel axis closest to head-foot, whatever the file's axis order (docs/job-protocol.md,
``slices``).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from hssl.errors import HSSLError
from hssl.sparse import SliceRef, detect_annotated_slices, known_mask, parse_slices

ORIENTATIONS = ("sagittal", "coronal", "axial")  # dominant R/L, A/P, S/I component

__all__ = ["ORIENTATIONS", "SliceRef", "axisNames", "detectAnnotatedSlices", "formatSlices", "knownMask",
           "parseSlices"]


def axisNames(ijkDirections: np.ndarray) -> tuple[str, str, str]:
    """Orientation of the slices along each numpy axis (k, j, i).

    ijkDirections: 3x3 whose columns are the i, j, k axis directions (RAS or LPS: only the
    magnitude of each component matters, so this agrees with the engine's ``Geometry.axis_names``
    for the same volume read from a file).
    """
    d = np.abs(np.asarray(ijkDirections, dtype=float)[:3, :3])
    return tuple(ORIENTATIONS[int(np.argmax(d[:, 2 - axis]))] for axis in range(3))


def detectAnnotatedSlices(labels: np.ndarray) -> list[SliceRef]:
    """Painted slices of a sparse ``[k, j, i]`` label array (the engine's rule, ``hssl.sparse``)."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        return []
    return detect_annotated_slices(labels)


def formatSlices(refs: Iterable[SliceRef], names: Sequence[str]) -> list[str]:
    return [ref.name(names) for ref in sorted(set(refs))]


def parseSlices(text: str | Iterable[str], shape: Sequence[int], names: Sequence[str]) -> list[SliceRef]:
    """Slices written as the engine reads them (``hssl.sparse.parse_slices``), several separated by
    spaces, commas or semicolons: ``"axial:12, axial:20; coronal:5,6"``, or a list of such strings.

    Raises ValueError with the engine's one-line message naming the bad part.
    """
    specs = [text] if isinstance(text, str) else list(text)
    words = [word for spec in specs for word in str(spec).split()]
    try:
        return parse_slices(words, shape, names)
    except HSSLError as err:
        raise ValueError(str(err)) from None


def knownMask(shape: Sequence[int], refs: Iterable[SliceRef]) -> np.ndarray:
    """Boolean ``[k, j, i]`` mask of the voxels lying in any of ``refs``."""
    return known_mask(shape, refs)
