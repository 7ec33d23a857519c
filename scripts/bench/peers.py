"""The two tools a Slicer user already has, called as the Segment Editor effects call them.

- ``fill_between_slices``: the "Fill between slices" effect, i.e. slicer-core's
  ``vtkITKMorphologicalContourInterpolator`` with its defaults (every label, every axis, heuristic
  alignment, repeated dilations) on the merged labelmap of the painted segments.
- ``grow_from_seeds``: the "Grow from seeds" effect. Since 2023 Slicer's effect runs
  ``vtkITKGrowCut``, a wrapper of ITK's FastGrowCut, into which Slicer moved its own fast grow-cut
  code "to reduce maintenance"; slicer-core ships that earlier Slicer implementation,
  ``vtkImageGrowCutSegment``: the same method with the same inputs (intensity volume, seed
  labels, optional mask) and the same single parameter, the distance penalty ("seed locality",
  default 0). Tie-breaking details may differ between the two codes.

Both work on the region the effects use (``AbstractScriptedSegmentEditorAutoCompleteEffect``):
the bounding box of the non-empty input segments, grown on each side by ``margin_ratio`` of its
size along that axis, at least 3 voxels, clipped to the image. The effect's own ratio is 0.1 when
"Initialize" is pressed first (Grow from seeds raises it to 0.5 only for later re-initialisations,
and to 0.2 when no mask exists; under default masking the effect builds an all-zero mask, which
lets every voxel be edited: passing no mask is the same). Outside the region the result is 0, as
in Slicer, where the preview covers that region only.

Inputs are numpy ``[z, y, x]`` arrays (the engine's convention): ``sparse`` holds the painted label
values (0 = background), ``known`` is True on every voxel of the painted slices. Spacing is
``(z, y, x)`` mm; the origin plays no part. Outputs lie on the input grid with ``sparse``'s dtype,
and every known voxel keeps its painted value exactly.

slicer-core's libraries can crash the interpreter when it exits: here, after a morphological
contour interpolation, every such process ended with a segmentation fault (exit status 139) once
its work was done, unless ITK's global threader was chosen explicitly. So the first call sets
``ITK_GLOBAL_DEFAULT_THREADER=Pool`` (unless the environment already chooses one) before slicer-core
runs any filter; with it the exit is clean. Still write every output before the process ends,
and do not take a non-zero exit status of a process that ran these as proof that its results
are missing.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Sequence

import numpy as np

# Fill between slices keeps the abstract auto-complete ratio; Grow from seeds uses it on the first
# "Initialize" (see the module docstring).
EFFECT_MARGIN_RATIO = 0.1
EFFECT_MIN_MARGIN = 3  # voxels


def effect_region(labelled: np.ndarray, margin_ratio: float = EFFECT_MARGIN_RATIO,
                  min_margin: int = EFFECT_MIN_MARGIN) -> tuple[slice, slice, slice] | None:
    """The box (``[z, y, x]`` slices) an auto-complete effect computes in: the extent of the
    non-zero voxels, each side grown by ``max(min_margin, int(margin_ratio * (last - first)))``
    voxels along that axis, clipped to the array. None when nothing is labelled."""
    region = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.nonzero(labelled.any(axis=other))[0]
        if present.size == 0:
            return None
        first, last = int(present[0]), int(present[-1])
        margin = int(max(min_margin, margin_ratio * (last - first)))
        region.append(slice(max(0, first - margin), min(labelled.shape[axis], last + margin + 1)))
    return tuple(region)


def fill_between_slices(sparse: np.ndarray, known: np.ndarray, spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0),
                        margin_ratio: float = EFFECT_MARGIN_RATIO) -> np.ndarray:
    """Slicer's "Fill between slices" on painted slices: every label interpolated between the
    slices that hold it (morphological contour interpolation, label values kept).

    sparse: ``[z, y, x]`` integer labels, 0 = background; only voxels where ``known`` is True count.
    known: ``[z, y, x]`` bool, True on the painted slices. Returns ``sparse``'s shape and dtype."""
    _check(sparse, known)
    painted = np.where(known, sparse, 0)
    out = np.zeros(sparse.shape, sparse.dtype)
    region = effect_region(painted > 0, margin_ratio)
    if region is not None:
        slicer = _slicer()
        interpolator = slicer.vtkITKMorphologicalContourInterpolator()  # defaults = the effect's
        interpolator.SetInputData(_to_vtk(painted[region].astype(_label_dtype(painted)), spacing_zyx))
        interpolator.Update()
        out[region] = _from_vtk(interpolator.GetOutput(), painted[region].shape)
    out[known] = sparse[known]
    return out


def grow_from_seeds(image: np.ndarray, sparse: np.ndarray, known: np.ndarray, spacing_zyx: Sequence[float],
                    distance_penalty: float = 0.0, margin_ratio: float = EFFECT_MARGIN_RATIO) -> np.ndarray:
    """Slicer's "Grow from seeds" with the painted labels as seeds plus, as one extra background
    segment, every unlabelled voxel of the painted slices (what a few-slice fine-tuning learns from).

    image: ``[z, y, x]`` scan in its own units (HU for CT), the effect's intensity volume.
    sparse, known: as for ``fill_between_slices``. spacing_zyx: mm, used by the distance penalty.
    distance_penalty: the effect's "Seed locality" (0 = intensity only, its default).
    Returns ``sparse``'s shape and dtype; the extra background segment comes back as 0."""
    _check(sparse, known)
    if image.shape != sparse.shape:
        raise ValueError(f"image {image.shape} and labels {sparse.shape} must have the same shape")
    painted = np.where(known, sparse, 0)
    background = int(painted.max()) + 1
    seeds = np.where(known, np.where(painted > 0, painted, background), 0)
    out = np.zeros(sparse.shape, sparse.dtype)
    region = effect_region(seeds > 0, margin_ratio)
    if region is not None and painted.any():
        slicer = _slicer()
        grow = slicer.vtkImageGrowCutSegment()
        grow.SetIntensityVolume(_to_vtk(_intensity(image[region]), spacing_zyx))
        grow.SetSeedLabelVolume(_to_vtk(seeds[region].astype(_label_dtype(seeds)), spacing_zyx))
        grow.SetDistancePenalty(float(distance_penalty))
        grow.Update()
        grown = _from_vtk(grow.GetOutput(), seeds[region].shape)
        grown[grown == background] = 0
        out[region] = grown
    out[known] = sparse[known]
    return out


def _slicer():
    """slicer-core, with ITK's threader chosen before its first filter runs (see the module docstring)."""
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_THREADER", "Pool")
    import slicer

    return slicer


def _check(sparse: np.ndarray, known: np.ndarray) -> None:
    if sparse.ndim != 3 or known.shape != sparse.shape:
        raise ValueError(f"sparse {sparse.shape} and known {known.shape} must be the same 3D [z, y, x] shape")
    if not np.issubdtype(sparse.dtype, np.integer):
        raise ValueError(f"sparse labels must be integers, got {sparse.dtype}")
    if sparse.min(initial=0) < 0:
        raise ValueError("sparse labels must be >= 0")


def _label_dtype(labels: np.ndarray) -> type:
    return np.uint8 if int(labels.max(initial=0)) < 256 else np.uint16


def _intensity(array: np.ndarray) -> np.ndarray:
    """The scan in a VTK scalar type, unchanged where the type already is one."""
    if array.dtype in (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.float32, np.float64):
        return array
    return array.astype(np.float32)


def _to_vtk(array: np.ndarray, spacing_zyx: Sequence[float]):
    """A ``[z, y, x]`` array as vtkImageData (VTK runs x fastest, as C order does); origin 0."""
    import vtk
    from vtk.util import numpy_support

    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.SetSpacing(float(spacing_zyx[2]), float(spacing_zyx[1]), float(spacing_zyx[0]))
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    return image


def _from_vtk(image, shape: tuple[int, ...]) -> np.ndarray:
    from vtk.util import numpy_support

    dims = image.GetDimensions()
    if (dims[2], dims[1], dims[0]) != tuple(shape):
        raise RuntimeError(f"the Slicer filter returned {dims} voxels for an input of {shape[::-1]}: it failed")
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape).copy()


def main(argv: list[str] | None = None) -> int:
    """Time both peers once on development cases (3 painted axial slices) and print Dice per class
    on the slices that were not painted. Usage: python scripts/bench/peers.py [CASE ...] [--slices N]"""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "HSSLSegment"))
    from bench import devset
    from hssl.demo import pick_slices
    from hssl.evaluate import dice
    from hssl.sparse import SliceRef, known_mask

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("cases", nargs="*", default=None)
    p.add_argument("--slices", type=int, default=3)
    a = p.parse_args(argv)
    for name in a.cases or [n for n in devset.case_names() if devset.available(n)]:
        case = devset.load_case(name)
        ref, axis = case.reference.array, case.axis
        slices = pick_slices(ref > 0, a.slices, axis)
        known = known_mask(ref.shape, [SliceRef(axis, s) for s in slices])
        sparse = np.where(known, ref, 0).astype(ref.dtype)
        spacing = case.volume.geometry.spacing[::-1]
        row = [f"{name:18s}"]
        for label, run in (("fill", lambda: fill_between_slices(sparse, known, spacing)),
                           ("grow", lambda: grow_from_seeds(case.volume.array, sparse, known, spacing))):
            t0 = time.perf_counter()
            pred = run()
            seconds = time.perf_counter() - t0
            scores = [dice(pred[~known] == c.value, ref[~known] == c.value) for c in case.reference.labels]
            text = " ".join("n/a" if s is None else f"{s:.3f}" for s in scores)
            row.append(f"{label} {seconds:5.1f} s Dice [{text}]")
        print("  ".join(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
