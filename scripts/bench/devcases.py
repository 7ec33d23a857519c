"""The cases of the few-slice comparison suite: the development set (``bench.devset``: real scans
with dense references in three kinds) when it is installed, else its lesion cases (the pyradiomics
tumours with their own labels, ``hssl.fewslice.load_sample``) in the same shape; plus the tiny
suite's case, a crop of one of them.

A case is ``DevCase(name, kind, volume, reference, description)``: ``volume`` an ``hssl.io.Volume``,
``reference`` ``hssl.io.Labels`` on the same ``[z, y, x]`` grid (0 = background, one value per class).
"""
from __future__ import annotations

import dataclasses

import numpy as np

TINY = "brain1_tumour_crop"
LESIONS = {"lung1_tumour": "lung1", "lung2_tumour": "lung2", "brain1_tumour": "brain1", "brain2_tumour": "brain2",
           "breast1_lesion": "breast1"}


@dataclasses.dataclass
class DevCase:
    """One case: a real volume and its dense reference on the same grid (as ``bench.devset`` has it)."""

    name: str
    kind: str
    volume: object  # hssl.io.Volume
    reference: object  # hssl.io.Labels
    description: str


def devset():
    """The development-set module, or None when ``scripts/bench/devset.py`` is not there."""
    try:
        from . import devset as module
    except ImportError:
        return None
    return module


def case_names(kind: str | None = None) -> list[str]:
    """Every case name, in the set's order (of one kind)."""
    module = devset()
    if module is not None:
        return list(module.case_names(kind))
    return [] if kind not in (None, "lesion") else list(LESIONS)


def source() -> str:
    """Where the cases come from, for the report."""
    return ("the development set (scripts/bench/devset.py)" if devset() is not None else
            "the pyradiomics lesion cases only (scripts/bench/devset.py is not installed)")


def load_case(name: str) -> DevCase:
    """Build case ``name`` (or the tiny suite's ``TINY``)."""
    if name == TINY:
        return tiny_case()
    module = devset()
    if module is not None:
        case = module.load_case(name)
        return DevCase(case.name, case.kind, case.volume, case.reference, case.description)
    from hssl.errors import HSSLError
    from hssl.fewslice import load_sample

    if name not in LESIONS:
        raise HSSLError(f"unknown case '{name}': choose from {case_names()} (the development set "
                        "scripts/bench/devset.py is not installed)")
    volume, reference = load_sample(LESIONS[name])
    return DevCase(name, "lesion", volume, reference, f"{LESIONS[name]} with its pyradiomics {reference.labels[0].name} "
                                                     "label")


def tiny_case() -> DevCase:
    """brain1 (MR, 256 x 256 x 25) cropped to the 25 x 48 x 48 voxels around its tumour: a real scan
    small enough for the suite's test."""
    from hssl.fewslice import load_sample
    from hssl.io import Geometry, Labels, Volume

    volume, reference = load_sample("brain1")
    _, ys, xs = np.nonzero(reference.array)
    cy, cx = int(ys.mean()), int(xs.mean())
    box = (slice(None), slice(max(0, cy - 24), max(0, cy - 24) + 48), slice(max(0, cx - 24), max(0, cx - 24) + 48))
    g = volume.geometry
    # The crop's first voxel, in LPS mm: the index offset through the direction and spacing.
    offset = np.array([box[2].start, box[1].start, 0], dtype=float)
    origin = tuple(float(v) for v in np.asarray(g.origin) + np.asarray(g.direction).reshape(3, 3) @ (offset * g.spacing))
    array = np.ascontiguousarray(volume.array[box])
    geometry = Geometry((array.shape[2], array.shape[1], array.shape[0]), g.spacing, origin, g.direction)
    return DevCase(TINY, "lesion", Volume(array, geometry, "brain1, cropped"),
                   Labels(np.ascontiguousarray(reference.array[box]), reference.labels),
                   "brain1 cropped to 48 x 48 voxels around its tumour (the tiny suite: a check of the harness)")
