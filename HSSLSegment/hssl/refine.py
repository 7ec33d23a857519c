"""The final segmentation: the network's prediction, optionally refined on the scan's intensities.

Candidates (``CANDIDATES``):
- ``network``: the fine-tuned network's argmax.
- ``network+grow``: the network decides *where* each structure is, the intensities decide the exact
  boundary. Seeds are the painted slices (their unpainted voxels as background) plus the voxels the
  network is sure about (probability >= ``confidence``, shrunk by ``erode`` voxels away from
  the network's boundary, except for a thin class that the shrinking would halve); the undecided band between them is labelled by seeded region competition
  on the intensities (``hssl.grow``). A structure the network missed stays missed; a leak that
  the intensities alone would make is stopped by the network's confident background.
- ``grow``: region competition from the painted slices alone (what Slicer's *Grow from seeds* does
  with the same information), for structures that intensity alone defines. Across the painted
  slices it stays within their span plus a quarter of it on either side (``painted_span``; Slicer's
  effect keeps to the seeds' extent plus 10 %): with nothing painted beyond the outermost slice,
  growing further mostly leaks (development set, whole region against the span plus a quarter:
  hippocampus+amygdala 0.46 -> 0.58, deep nuclei 0.69 -> 0.76 and 0.66 -> 0.77, lung2 tumour
  0.74 -> 0.87, breast lesion 0.82 -> 0.79, head CT 0.87 -> 0.86). Which neighbours it competes
  over matters per scan: over all 26 (as Slicer's effect) the head CT's ventricles grow to 0.88
  where 6 give 0.78, the MNI tissue to 0.92 against 0.85, but the deep nuclei, the hippocampus and
  two lesions lose 0.02-0.17 (3 painted slices, grow alone): with 3 or more painted slices the
  held-out slice chooses (``hssl.finetune``, recorded as ``grow_connectivity``).

Beyond its painted slices the network extrapolates, which the held-out slice (always between two
painted ones) does not test. A segment that runs to a face of the prediction region (the box
around the painting, ``hssl.sparse.annotation_roi``) with more voxels there than on its largest
painted slice has leaked into something else (``leaking``): outside the bounding box of its painted
voxels it is taken from ``grow`` instead (``confine``). On the development set no reference
structure has more than 3 % of its largest painted section on such a face.

Which candidate wins differs per scan; with 3 or more painted slices fine-tuning scores each one on
the held-out slice and keeps the best (``hssl.finetune``); the choice and the scores are recorded.
Arrays are ``[z, y, x]``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .grow import grow_from_seeds, max_voxels
from .sparse import whole_slices

CANDIDATES = ("network", "network+grow", "grow")
# Ties on the held-out slice go to the earlier one: on the development set network+grow was the best
# or close to it on every case where the network learned the structure (docs/results.md).
PREFERENCE = ("network+grow", "network", "grow")
CONFIDENCE = 0.9
ERODE = 1
SPAN_MARGIN = 0.25  # grow: how far beyond the outermost painted slices, as a share of their span
THIN_KEEP = 0.5  # a class whose sure voxels the erosion would halve keeps them all


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius <= 0 or not mask.any():
        return mask
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    return sitk.GetArrayFromImage(sitk.BinaryErode(img, [radius] * 3)).astype(bool)


def painted_seeds(sparse: np.ndarray, known: np.ndarray, background: int) -> np.ndarray:
    """Seeds from the annotation: painted classes as they are, unpainted known voxels = ``background``."""
    seeds = np.zeros(sparse.shape, dtype=np.int32)
    seeds[known] = np.where(sparse[known] > 0, sparse[known], background)
    return seeds


def network_seeds(probs: np.ndarray, sparse: np.ndarray, known: np.ndarray, background: int,
                  confidence: float = CONFIDENCE, erode: int = ERODE, distrust: Sequence[int] = ()) -> np.ndarray:
    """Painted seeds plus the network's confident voxels. ``probs`` ``(C, z, y, x)``, class 0 =
    background; ``sparse`` holds class indices 1..C-1. Painted voxels always win. The network's
    voxels of a class in ``distrust`` (one it did not learn) seed nothing."""
    seeds = np.zeros(sparse.shape, dtype=np.int32)
    for c in range(probs.shape[0]):
        if c in distrust:
            continue
        sure = probs[c] >= confidence
        eroded = _erode(sure, erode)
        # A thin structure (cortical bone, a vessel wall) would lose most of its seeds to the erosion
        # and then be grown over by its neighbours: keep it whole.
        if np.count_nonzero(eroded) < THIN_KEEP * np.count_nonzero(sure):
            eroded = sure
        seeds[eroded] = background if c == 0 else c
    painted = painted_seeds(sparse, known, background)
    seeds[known] = painted[known]
    return seeds


def painted_span(known: np.ndarray, margin: float = SPAN_MARGIN) -> tuple[slice, ...]:
    """The part of a region that ``grow`` fills: along every axis with two or more painted slices (known
    whole) from the first to the last, plus ``margin`` of that span (at least 3 slices, as Slicer's
    effect) on either side; the whole region along the other axes (one painted slice says nothing
    of the structure's extent)."""
    box = []
    for axis in range(3):
        whole = whole_slices(known, axis)
        if whole.size < 2:
            box.append(slice(0, known.shape[axis]))
            continue
        lo, hi = int(whole[0]), int(whole[-1])
        pad = max(3, int(np.ceil(margin * (hi - lo))))
        box.append(slice(max(0, lo - pad), min(known.shape[axis], hi + pad + 1)))
    return tuple(box)


def candidate(name: str, image: np.ndarray, probs: np.ndarray | None, sparse: np.ndarray, known: np.ndarray,
              spacing_zyx: Sequence[float], confidence: float = CONFIDENCE, erode: int = ERODE,
              distrust: Sequence[int] = (), span_margin: float = SPAN_MARGIN, connectivity: int = 6) -> np.ndarray:
    """One candidate segmentation (class indices, 0 = background) of a region.

    image: the normalised intensities of the region; probs: the network's ``(C, z, y, x)``
    probabilities there (not needed for ``grow``); sparse/known: the annotation in class indices;
    distrust: classes whose network voxels seed nothing (``network_seeds``); span_margin: how far
    ``grow`` goes beyond the painted slices (``painted_span``); connectivity: the neighbours ``grow``
    competes over (6 or 26, ``hssl.grow``; 6 where its box is too large for more, ``max_voxels``).
    ``network+grow`` always uses 6.
    """
    if name == "network":
        return probs.argmax(0).astype(np.uint8)
    n_classes = probs.shape[0] if probs is not None else int(sparse.max()) + 1
    background = n_classes  # a label of its own while growing, 0 afterwards
    box = tuple(slice(0, n) for n in sparse.shape)
    if name == "grow":
        box = painted_span(known, span_margin)
        seeds = painted_seeds(sparse[box], known[box], background)
    elif name == "network+grow":
        seeds = network_seeds(probs, sparse, known, background, confidence, erode, distrust)
    else:
        raise ValueError(f"unknown candidate {name!r}: one of {CANDIDATES}")
    size = int(np.prod([b.stop - b.start for b in box]))
    wide = connectivity if name == "grow" and size <= max_voxels(connectivity) else 6
    grown = grow_from_seeds(image[box], seeds, spacing_zyx, connectivity=wide)
    grown[grown == background] = 0
    out = np.zeros(sparse.shape, dtype=np.uint8)
    out[box] = grown
    return out


def selection_region(slices: Sequence, holdout, roi: tuple[slice, ...] | None,
                     shape: Sequence[int]) -> tuple[slice, ...]:
    """Where the candidates are compared: the ROI (or the whole volume), limited along the held-out
    slice's axis to the painted slices on either side of it (or the ROI's end where there is none),
    so that the seeds that shape the held-out slice are inside and the region stays small."""
    region = list(roi) if roi is not None else [slice(0, n) for n in shape]
    axis, index = holdout.axis, holdout.index
    same = sorted(s.index for s in slices if s.axis == axis and s != holdout)
    before = [i for i in same if i < index]
    after = [i for i in same if i > index]
    lo = before[-1] if before else region[axis].start
    hi = after[0] + 1 if after else region[axis].stop
    region[axis] = slice(max(lo, region[axis].start), min(hi, region[axis].stop))
    return tuple(region)


def slice_dice(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray, classes: Sequence[int]) -> dict[int, float]:
    """Dice per class on ``mask`` (bool, the held-out slice near the structures); a class absent from
    both ``pred`` and ``ref`` there is left out."""
    scores = {}
    for c in classes:
        p, r = (pred == c) & mask, (ref == c) & mask
        total = np.count_nonzero(p) + np.count_nonzero(r)
        if total:
            scores[int(c)] = 2.0 * np.count_nonzero(p & r) / total
    return scores


def choose(scores: dict[str, dict[int, float]], order: Sequence[str] | None = None,
           margins: dict[str, float] | None = None) -> str:
    """The candidate with the highest mean held-out Dice, less its handicap in ``margins``; ties go
    to the earlier one in ``order`` (default ``PREFERENCE``).

    The mean runs over every class that any candidate was scored on. ``slice_dice`` leaves out a
    class that a candidate and the reference both lack, so a candidate missing a class another one
    has a score for agreed with the reference that it is not there: it counts 1 for that class
    (a candidate that puts a class on the slice where there is none must not win by having been
    scored on fewer classes)."""
    margins = margins or {}
    order = PREFERENCE if order is None else order
    classes = sorted({c for per in scores.values() for c in per})
    best, best_value = order[0], -np.inf
    for name in order:
        if name not in scores or not classes:
            continue
        value = float(np.mean([scores[name].get(c, 1.0) for c in classes])) - margins.get(name, 0.0)
        if value > best_value + 1e-9:
            best, best_value = name, value
    return best


def choose_per_class(scores: dict[str, dict[int, float]], order: Sequence[str] | None = None,
                     margins: dict[str, float] | None = None, poor: float | None = None) -> dict[int, str]:
    """For every class scored on the held-out slice, the candidate that segments it best there (less
    its handicap in ``margins``; ties to the earlier one in ``order``). A thin structure that the
    intensity refinement erodes away can then keep the network's result while a large one next to
    it takes the refined one.

    With ``poor``: a class the network alone scores below ``poor`` was not learned when it was
    scored. What ``network+grow`` scored for it was then the intensities' work (from the painted
    seeds), not the network's, so nothing justifies a handicap on ``grow``: the class takes the better
    of the two intensity candidates on plain scores, ties to ``grow`` (which ships what was scored;
    ``network+grow`` would ship seeds from the network as trained further, never tested)."""
    classes = sorted({c for per in scores.values() for c in per})
    out = {}
    for c in classes:
        per_c = {name: {c: per[c]} if c in per else {} for name, per in scores.items()}
        network = scores.get("network", {}).get(c)
        if poor is not None and network is not None and network < poor and \
                any(c in scores.get(name, {}) for name in ("grow", "network+grow")):
            per_c = {name: v for name, v in per_c.items() if name != "network"}
            out[c] = choose(per_c, ("grow", "network+grow"))
        else:
            out[c] = choose(per_c, order, margins)
    return out


def compose(results: dict[str, np.ndarray], per_class: dict[int, str], default: str, classes: Sequence[int]) -> np.ndarray:
    """One segmentation from several candidates' results (class indices): class ``c`` is taken from
    ``results[per_class.get(c, default)]``; where two classes claim a voxel the later class wins."""
    shape = next(iter(results.values())).shape
    out = np.zeros(shape, dtype=np.uint8)
    for c in classes:
        out[results[per_class.get(c, default)] == c] = c
    return out


def unlearned_step(refined: np.ndarray, grown: np.ndarray, c: int, keep_share: float) -> tuple[str, float]:
    """The final step for class ``c``, which the network did not learn (``painted_fit``): both
    candidates grow it from the painted slices alone (``refined`` is ``network+grow`` with ``c``
    distrusted, see ``network_seeds``), but ``network+grow`` also holds the network's sure voxels of
    the other classes and of the background, which stop a leak or, where the network took the
    structure for something else, erase it. ``network+grow`` is kept when it gives the class at
    least ``keep_share`` of the voxels ``grow`` gives it, else ``grow``. Returns (the candidate,
    that share)."""
    grown_voxels = int(np.count_nonzero(grown == c))
    share = np.count_nonzero(refined == c) / grown_voxels if grown_voxels else 1.0
    return ("network+grow" if share >= keep_share else "grow"), float(share)


def painted_fit(network: np.ndarray, sparse: np.ndarray, known: np.ndarray, classes: Sequence[int]) -> dict[int, float]:
    """Dice of the network's classes against the painting on the painted voxels, per painted class:
    how well the network reproduces the very slices it was trained on. A class far below the
    others there was not learned at all (too few painted voxels, too few steps)."""
    return slice_dice(network, sparse, known, [c for c in classes if np.any((sparse == c) & known)])


def painted_section(sparse: np.ndarray, known: np.ndarray, c: int,
                    whole: Sequence[np.ndarray] | None = None) -> int:
    """The most voxels of class ``c`` on one painted slice (``hssl.sparse.whole_slices``; ``whole``: those
    of each axis when already known), in any orientation."""
    whole = whole if whole is not None else [whole_slices(known, axis) for axis in range(3)]
    most = 0
    painted = (sparse == c) & known
    for axis in range(3):
        if whole[axis].size:
            other = tuple(a for a in range(3) if a != axis)
            most = max(most, int(painted.sum(axis=other)[whole[axis]].max()))
    return most


def leaking(result: np.ndarray, sparse: np.ndarray, known: np.ndarray, region: Sequence[slice],
            shape: Sequence[int], classes: Sequence[int], ratio: float) -> dict[int, tuple[int, int]]:
    """Classes of ``result`` (class indices on ``region`` of a volume of ``shape``) that run to a face
    of ``region`` inside the volume with more than ``ratio`` times the voxels of their largest painted
    slice (``painted_section``) on it: a structure does not widen to the edge of the box drawn around
    its painting, a leak does. Returns ``{class: (voxels on the fullest such face, painted section)}``."""
    faces = []
    for axis in range(3):
        for index, inside in ((0, region[axis].start > 0), (-1, region[axis].stop < shape[axis])):
            if inside:
                cut = [slice(None)] * 3
                cut[axis] = index
                faces.append(result[tuple(cut)])
    out = {}
    whole = [whole_slices(known, axis) for axis in range(3)]
    for c in classes:
        section = painted_section(sparse, known, c, whole)
        if section == 0 or not faces:
            continue
        fullest = max(int(np.count_nonzero(face == c)) for face in faces)
        if fullest > ratio * section:
            out[int(c)] = (fullest, section)
    return out


def confine(result: np.ndarray, grown: np.ndarray, sparse: np.ndarray, known: np.ndarray,
            classes: Sequence[int]) -> np.ndarray:
    """``result`` with each class in ``classes`` replaced by ``grown``'s (the ``grow`` candidate) outside
    the bounding box of its painted voxels; inside the box, and for other classes, ``result`` stays."""
    out = result.copy()
    for c in classes:
        hit = np.nonzero((sparse == c) & known)
        if hit[0].size == 0:
            continue
        outside = np.ones(result.shape, dtype=bool)
        outside[tuple(slice(int(i.min()), int(i.max()) + 1) for i in hit)] = False
        out[outside & (out == c)] = 0
        out[outside & (grown == c) & (out == 0)] = c
    return out
