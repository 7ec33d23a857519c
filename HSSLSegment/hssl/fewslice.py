"""Few-slice cases: a scan with a dense reference, a few of its slices as the "painted" annotation,
and the score of a prediction on the slices that were not painted.

Every measurement of the engine builds its input here (``hssl demo``, ``hssl.pretrain.benchmark``,
the linear probe, ``scripts/few_slice_eval.py``, ``scripts/benchmark.py``), so they all pick the
same slices and score the same voxels:

- the slices: ``n`` slices along one array axis, spread evenly through the extent of the
  foreground (every class together; ``pick_slices``). The axis is the axial one, as a user
  paints first, unless the structure spans fewer than ``2n`` axial slices (a 3-slice tumour on
  5 mm CT would be painted whole); then it is the orientation the structure spans most slices
  in (``painting_axis``);
- the annotation: the reference's values on those slices, 0 elsewhere, and the known voxels
  exactly as ``hssl finetune --slices axial:i,j,k`` reads them (every voxel of a listed slice is
  known, background included; everything else is unknown);
- the region scored: the voxels outside the painted slices. When every slice that holds the
  structure is painted there is nothing unpainted to score and the whole volume is scored instead,
  which the case says (``whole_volume``): such a score only counts false positives elsewhere.

Arrays are numpy ``[z, y, x]``; label values are the reference's (0 = background).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from .errors import HSSLError
from .evaluate import dice, evaluate
from .io import Geometry, LabelInfo, Labels, Volume, default_label_table
from .sparse import Annotation, SliceRef, known_mask, resolve_annotation

# The pyradiomics sample scans with a lesion label (``hssl data fetch``) and what the label is.
SAMPLE_CASES = {"lung1": "lung tumour", "lung2": "lung tumour", "brain1": "brain tumour",
                "brain2": "brain tumour", "breast1": "breast lesion"}
LESION_COLOUR = (0.90, 0.35, 0.25)


def structure_slices(reference: np.ndarray, axis: int = 0) -> list[int]:
    """Indices along ``axis`` of the slices that hold any foreground (reference > 0)."""
    other = tuple(a for a in range(3) if a != axis)
    return [int(i) for i in np.nonzero(np.asarray(reference).any(axis=other))[0]]


def pick_slices(reference: np.ndarray, n: int, axis: int = 0) -> list[int]:
    """``n`` slices spread evenly through the foreground's extent along ``axis``: the slices at the
    inner quantiles ``1/(n+1) .. n/(n+1)`` of the list of slices that hold foreground (of any class).
    Sorted and distinct, so fewer than ``n`` when the structure spans few slices."""
    present = structure_slices(reference, axis)
    if not present:
        raise HSSLError("the reference label is empty")
    quantiles = [(i + 1) / (n + 1) for i in range(n)]
    return sorted({present[min(len(present) - 1, int(round(q * (len(present) - 1))))] for q in quantiles})


def painting_axis(reference: np.ndarray, n: int, axial: int) -> int:
    """The numpy axis to paint ``n`` slices along: ``axial`` unless the foreground spans fewer than
    ``2n`` slices there, else the axis along which it spans the most slices."""
    if len(structure_slices(reference, axial)) >= 2 * n:
        return axial
    spans = [len(structure_slices(reference, a)) for a in range(3)]
    return axial if spans[axial] == max(spans) else int(np.argmax(spans))


def make_sparse(reference: np.ndarray, slices: Sequence[int], axis: int = 0) -> np.ndarray:
    """The reference's values on ``slices`` (along ``axis``), 0 elsewhere; same shape and dtype."""
    sparse = np.zeros_like(reference)
    mask = known_mask(reference.shape, [SliceRef(axis, int(s)) for s in slices])
    sparse[mask] = reference[mask]
    return sparse


def array_geometry(shape_zyx: Sequence[int], spacing_zyx: Sequence[float]) -> Geometry:
    """An axis-aligned grid for a bare ``[z, y, x]`` array: origin 0, identity direction (so array
    axis 0 is axial), ``spacing_zyx`` in mm."""
    z, y, x = (int(v) for v in shape_zyx)
    return Geometry((x, y, z), tuple(float(s) for s in reversed(spacing_zyx)), (0.0, 0.0, 0.0),
                    (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


@dataclasses.dataclass
class FewSliceCase:
    """A scan, its dense reference and the painted slices made from it (see the module docstring)."""

    volume: Volume
    reference: Labels  # dense [z, y, x] label values and their table
    axis: int  # the numpy axis the painted slices are taken along
    slices: list[int]  # painted slice indices along ``axis``, sorted
    sparse: np.ndarray  # [z, y, x] reference values on the painted slices, 0 elsewhere
    annotation: Annotation  # the known voxels, as ``hssl finetune --slices`` reads them
    structure_slices: list[int]  # the slices along ``axis`` that hold foreground

    @property
    def whole_volume(self) -> bool:
        """True when every slice with foreground is painted: the whole volume is scored."""
        return set(self.structure_slices) <= set(self.slices)

    @property
    def scored_on(self) -> str:
        return "whole volume" if self.whole_volume else "unannotated slices"

    @property
    def region(self) -> np.ndarray | None:
        """Boolean ``[z, y, x]`` mask of the scored voxels; None = the whole volume."""
        return None if self.whole_volume else ~self.annotation.known

    @property
    def slice_spec(self) -> str:
        """The painted slices as ``hssl finetune --slices`` takes them, e.g. ``axial:12,20,28``."""
        return slice_spec(self.volume.geometry, self.axis, self.slices)

    @property
    def labels(self) -> Labels:
        """The sparse annotation with the reference's segment table: what fine-tuning reads."""
        return Labels(self.sparse, list(self.reference.labels))

    def between(self) -> np.ndarray:
        """Boolean ``[z, y, x]`` mask of the unpainted slices strictly between the outermost painted
        ones (where a method interpolates rather than extrapolates)."""
        index = np.arange(self.sparse.shape[self.axis]).reshape([-1 if a == self.axis else 1 for a in range(3)])
        inside = (index > min(self.slices)) & (index < max(self.slices))
        return np.broadcast_to(inside, self.sparse.shape) & ~self.annotation.known

    def unpainted_classes(self) -> list[str]:
        """Names of the reference classes that no painted slice shows (fine-tuning leaves them out)."""
        painted = set(int(v) for v in np.unique(self.sparse[self.annotation.known]))
        return [lab.name for lab in self.reference.labels if lab.value not in painted]


def slice_spec(geometry: Geometry, axis: int, slices: Sequence[int]) -> str:
    """``axial:12,20,28``: slices along numpy ``axis`` in the grammar of ``hssl finetune --slices``."""
    names = geometry.axis_names()
    # An orientation name that two array axes share would be ambiguous: use the index axis then.
    name = names[axis] if names.count(names[axis]) == 1 else "kji"[axis]
    return f"{name}:{','.join(str(int(s)) for s in slices)}"


def make_case(volume: Volume, reference: Labels | np.ndarray, slices: int | Sequence[int],
              axis: int | str = "axial") -> FewSliceCase:
    """A few-slice case of ``volume`` from its dense ``reference`` (``Labels`` or a ``[z, y, x]``
    array on the volume's grid; an array gets a default segment table).

    ``slices``: how many slices to paint (``pick_slices``; a count at least the number of slices
    that hold foreground paints all of them), or the slice indices themselves. ``axis``: an
    orientation name of the volume (``axial``, ``coronal``, ``sagittal``), a numpy axis, or
    ``auto`` (axial unless the structure is too thin there for ``slices``: ``painting_axis``)."""
    if not isinstance(reference, Labels):
        array = np.asarray(reference)
        reference = Labels(array, default_label_table([int(v) for v in np.unique(array) if v]))
    ref = reference.array
    if ref.shape != volume.array.shape:
        raise HSSLError(f"the reference has shape {ref.shape} but the image {volume.array.shape}: give the "
                        "reference on the image's grid")
    if axis == "auto":
        axial = volume.geometry.axis_names().index("axial")
        count = slices if isinstance(slices, (int, np.integer)) else len(set(slices))
        axis = painting_axis(ref, int(count), axial)
    if isinstance(axis, str):
        names = volume.geometry.axis_names()
        if axis not in names:
            raise HSSLError(f"the volume has no {axis} slices (its axes are {list(names)}): choose one of those")
        axis = names.index(axis)
    present = structure_slices(ref, axis)
    if not present:
        raise HSSLError("the reference label is empty: a few-slice case needs a structure")
    if isinstance(slices, (int, np.integer)):
        if slices < 1:
            raise HSSLError(f"cannot paint {slices} slices: give at least 1")
        chosen = present if slices >= len(present) else pick_slices(ref, int(slices), axis)
    else:
        chosen = sorted({int(s) for s in slices})
        if not chosen or not all(0 <= s < ref.shape[axis] for s in chosen):
            raise HSSLError(f"painted slices {list(slices)} must be within 0..{ref.shape[axis] - 1}")
    sparse = make_sparse(ref, chosen, axis)
    # Read back exactly as the command line reads ``--slices``: the known voxels and their slices.
    annotation = resolve_annotation(sparse, volume.geometry.axis_names(), [slice_spec(volume.geometry, axis, chosen)])
    return FewSliceCase(volume, reference, axis, chosen, sparse, annotation, present)


def load_sample(name: str) -> tuple[Volume, Labels]:
    """A pyradiomics sample scan (``hssl data fetch``) and its lesion label as one class (value 1)."""
    from . import data
    from .io import read_image, read_labels

    if name not in SAMPLE_CASES:
        raise HSSLError(f"unknown sample case '{name}': choose one of {sorted(SAMPLE_CASES)}")
    volume = read_image(data.sample_path(f"{name}_image.nrrd"))
    mask = (read_labels(data.sample_path(f"{name}_label.nrrd"), volume.geometry).array > 0).astype(np.uint8)
    return volume, Labels(mask, [LabelInfo(SAMPLE_CASES[name], 1, LESION_COLOUR)])


def sample_case(name: str, slices: int | Sequence[int], axis: int | str = "axial") -> FewSliceCase:
    """``make_case`` on a pyradiomics sample scan (``load_sample``)."""
    volume, reference = load_sample(name)
    return make_case(volume, reference, slices, axis)


def score(case: FewSliceCase, prediction: np.ndarray, hd95: bool = True) -> dict:
    """Score a ``[z, y, x]`` prediction (label values as in the reference) on ``case.region``:
    ``score_labels`` plus ``scored_on`` (``unannotated slices`` or ``whole volume``)."""
    if np.shape(prediction) != case.sparse.shape:
        raise HSSLError(f"the prediction has shape {np.shape(prediction)} but the case {case.sparse.shape}")
    return {**score_labels(prediction, case.reference, case.volume.geometry, case.region, hd95),
            "scored_on": case.scored_on}


def score_labels(prediction: np.ndarray, reference: Labels, geometry: Geometry, region: np.ndarray | None = None,
                 hd95: bool = True) -> dict:
    """Dice and HD95 of a ``[z, y, x]`` prediction against ``reference`` inside ``region`` (boolean
    ``[z, y, x]``; None = everywhere), per class of the reference's table.

    Returns ``dice`` and ``hd95_mm`` (the mean over the classes where they are defined; None when
    none is), ``classes`` (per class: name, value, dice, hd95_mm, reference and predicted voxels in
    the region) and ``dice_volume`` (the mean per-class Dice over the whole volume). Dice is None for
    a class absent from both; HD95 (mm, ``hssl.evaluate``) is None when either is empty, and is
    skipped (None) with ``hd95=False``, e.g. for huge volumes."""
    prediction = np.asarray(prediction)
    ref, table = reference.array, reference.labels
    if hd95:
        classes = evaluate(prediction, ref, geometry, table, region)["labels"]
    else:
        inside = np.ones(ref.shape, dtype=bool) if region is None else region
        classes = [{"name": lab.name, "value": lab.value, "dice": dice((prediction == lab.value) & inside,
                                                                       (ref == lab.value) & inside),
                    "hd95_mm": None, "ref_voxels": int(np.count_nonzero((ref == lab.value) & inside)),
                    "pred_voxels": int(np.count_nonzero((prediction == lab.value) & inside))} for lab in table]
    volume_dice = [dice(prediction == lab.value, ref == lab.value) for lab in table]
    return {"dice": _mean([c["dice"] for c in classes]), "hd95_mm": _mean([c["hd95_mm"] for c in classes]),
            "classes": classes, "dice_volume": _mean(volume_dice)}


def _mean(values: list) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None
