"""The benchmark's volumes: the sample scans, a CT-sized volume tiled from one, and the synthetic
volumes of the tiny mode; the annotated slices of each budget. Cases and scores are
``hssl.fewslice``'s."""
from __future__ import annotations

import math

import numpy as np

from .settings import CT_SHAPE

LESION_COLOUR = (0.90, 0.35, 0.25)
SCORE_KEYS = ("dice", "hd95_mm", "scored_on", "dice_volume")  # what a results row keeps of a score


def synthetic_case(seed: int):
    """A CT-like ``[z, y, x]`` volume (HU) of 20 x 48 x 48 voxels at 0.8 x 0.8 x 3 mm with an
    ellipsoid 'lesion' across 11 slices. Only for the tiny mode (the harness test)."""
    rng = np.random.default_rng(seed)
    shape = (20, 48, 48)
    z, y, x = np.indices(shape)
    body = ((y - 24) / 20) ** 2 + ((x - 24) / 21) ** 2 <= 1
    cy, cx = 22 + 3 * seed, 26 - 2 * seed
    lesion = ((z - 10) / 5.6) ** 2 + ((y - cy) / 8) ** 2 + ((x - cx) / 7) ** 2 <= 1
    image = np.full(shape, -1000.0)
    image[body] = 30
    image[lesion] = 160
    image = (image + rng.normal(0, 15, shape)).astype(np.int16)
    return image, lesion.astype(np.uint8), (0.8, 0.8, 3.0)


def load_case(name: str, ct_source: str = "lung2", ct_shape=CT_SHAPE, with_ref: bool = True):
    """-> (Volume, reference uint8 [z, y, x] or None, slice axis, structure name).

    ``ct512`` is ``ct_source`` tiled along z to ``ct_shape`` (a CT-sized volume made of real data)."""
    from hssl import data
    from hssl.fewslice import SAMPLE_CASES, load_sample
    from hssl.io import Geometry, Volume, read_image

    if name == "ct512":
        volume, ref, axis, structure = load_case(ct_source, with_ref=with_ref)
        reps = [math.ceil(c / s) for c, s in zip(ct_shape, volume.array.shape)]
        crop = tuple(slice(0, c) for c in ct_shape)
        array = np.tile(volume.array, reps)[crop]
        tiled = np.tile(ref, reps)[crop] if ref is not None else None
        g = volume.geometry
        geometry = Geometry((int(ct_shape[2]), int(ct_shape[1]), int(ct_shape[0])), g.spacing, g.origin, g.direction)
        return Volume(array, geometry, f"{ct_source} tiled to {tuple(ct_shape)}"), tiled, axis, structure
    if name.startswith("synthetic"):
        image, ref, spacing = synthetic_case(0 if name == "synthetic" else 1)
        size = (image.shape[2], image.shape[1], image.shape[0])
        geometry = Geometry(size, spacing, (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        return Volume(image, geometry, name), (ref if with_ref else None), 0, "lesion"
    if with_ref:
        volume, labels = load_sample(name)
        ref = labels.array
    else:
        volume, ref = read_image(data.sample_path(f"{name}_image.nrrd")), None
    axis = volume.geometry.axis_names().index("axial")
    return volume, ref, axis, SAMPLE_CASES.get(name, "structure")


def reference_labels(ref: np.ndarray, structure: str):
    """A benchmark volume's binary ``[z, y, x]`` reference as ``hssl.io.Labels``: one segment."""
    from hssl.io import LabelInfo, Labels

    return Labels(ref, [LabelInfo(structure, 1, LESION_COLOUR)])


def few_case(volume, ref: np.ndarray, structure: str, slices, axis: int):
    """The ``hssl.fewslice`` case of a benchmark volume: ``slices`` (a list) painted along ``axis``."""
    from hssl.fewslice import make_case

    return make_case(volume, reference_labels(ref, structure), slices, axis)


def budget_slices(ref: np.ndarray, budget: str, axis: int = 0) -> list[int]:
    """The annotated slices for a budget: ``"3"`` slices or ``"10%"`` of the slices holding the
    structure (rounded up, at least 1; ``"100%"`` = all of them), spread by ``pick_slices``."""
    from hssl.fewslice import pick_slices, structure_slices

    present = structure_slices(ref, axis)
    if budget.endswith("%"):
        n = max(1, math.ceil(float(budget[:-1]) / 100 * len(present) - 1e-9))
    else:
        n = int(budget)
    if n < 1:
        raise SystemExit(f"error: budget '{budget}' gives no slice")
    if n >= len(present):
        return present
    return pick_slices(ref, n, axis)
