"""The engine's real sample scans as Slicer nodes (what the Sample Data module's HSSLSegment entries load).

The scans are the engine's (``hssl.data``: pyradiomics' BSD-3 cases, checksummed, cached once in
``$HSSL_DATA_DIR`` or ``~/.cache/hssl`` by ``hssl data fetch``); nothing here downloads. Each case
loads as its image and its reference segmentation; the tutorial case (``brain1``) loads instead
with a ready sparse annotation: the reference tumour kept on three axial slices, the start of
docs/slicer-module.md's tutorial.

Takes the scene explicitly (slicer core classes, numpy, the stdlib ``hssl.data``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from hssl import data as engineData
from hssl.errors import HSSLError

from .annotated_slices import SliceRef, knownMask
from .mrml_io import (InputError, loadSegmentationFile, loadVolumeFile, placeNextTo, segmentIdsAndNames,
                      segmentMask, setSegmentMask)

SOURCE = "pyradiomics"
STRUCTURES = {"brain": "tumour", "lung": "tumour", "breast": "lesion"}  # the structure each case's label marks
TUTORIAL_CASE = "brain1"
# The tutorial's painted slices, as its text asks ("one near the top of the tumour, one through
# its middle, one near its bottom"): the second, the middle and the second-last of the axial slices
# that hold brain1's tumour (7..13), indexed as Slicer loads the volume (it reverses the slice order
# of this left-handed file; the file's slices are 24 - these). A test checks them against the label.
TUTORIAL_SLICES = (SliceRef(0, 8), SliceRef(0, 10), SliceRef(0, 12))


@dataclasses.dataclass
class SampleCase:
    volumeNode: object
    segmentationNode: object  # the reference, or the tutorial's sparse annotation
    annotated: bool  # True: a sparse annotation on TUTORIAL_SLICES; False: the full reference


def cases() -> list[str]:
    """The sample cases with an image and a reference label, e.g. ``["brain1", "brain2", ...]``."""
    source = next(s for s in engineData.SOURCES if s.name == SOURCE)
    names = {Path(member).name for member in source.members}
    return sorted(name[: -len("_image.nrrd")] for name in names
                  if name.endswith("_image.nrrd") and name.replace("_image", "_label") in names)


def structureOf(case: str) -> str:
    return next((name for prefix, name in STRUCTURES.items() if case.startswith(prefix)), "structure")


def caseFiles(case: str) -> tuple[Path, Path]:
    """The cached image and label files of ``case``; :class:`InputError` when not fetched yet."""
    if case not in cases():
        raise InputError(f"'{case}' is not a sample case: choose one of {', '.join(cases())}.")
    try:
        return engineData.sample_path(f"{case}_image.nrrd"), engineData.sample_path(f"{case}_label.nrrd")
    except HSSLError as err:
        raise InputError(f"{err}.") from None


def isCached(case: str) -> bool:
    try:
        caseFiles(case)
    except InputError:
        return False
    return True


def loadCase(scene, case: str, annotated: bool | None = None) -> SampleCase:
    """Load a cached case into ``scene``: the volume ``<case>_image`` (as Slicer's loader orients it)
    and either ``<case> reference`` or, for the tutorial case (``annotated`` default), ``<case>
    annotation`` with the reference kept on :data:`TUTORIAL_SLICES` only."""
    annotated = (case == TUTORIAL_CASE) if annotated is None else annotated
    if annotated and case != TUTORIAL_CASE:
        raise InputError(f"Only '{TUTORIAL_CASE}' comes with a ready sparse annotation.")
    imagePath, labelPath = caseFiles(case)
    volume = loadVolumeFile(scene, imagePath, name=f"{case}_image", keepFileGrid=False)
    volume.CreateDefaultDisplayNodes()
    structure = structureOf(case)
    reference = loadSegmentationFile(scene, labelPath, volume, names={1: structure}, name=f"{case} reference")
    placeNextTo(reference, volume)
    if not annotated:
        return SampleCase(volume, reference, False)
    try:
        mask = segmentMask(reference, structure, volume)
        painted = mask & knownMask(mask.shape, TUTORIAL_SLICES)
        annotation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{case} annotation")
        annotation.CreateDefaultDisplayNodes()
        annotation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        (sid, _name), = segmentIdsAndNames(reference)
        color = reference.GetSegmentation().GetSegment(sid).GetColor()
        segmentId = annotation.GetSegmentation().AddEmptySegment("", structure, color)
        setSegmentMask(annotation, segmentId, painted, volume)
        placeNextTo(annotation, volume)
    finally:
        scene.RemoveNode(reference)
    return SampleCase(volume, annotation, True)
