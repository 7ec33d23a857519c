"""MRML nodes <-> job files: export a volume and a sparse segmentation, import a prediction.

Everything takes nodes explicitly (no ``slicer.mrmlScene``, no ``slicer.app``), so it runs in the
Slicer application and with the ``slicer-core`` wheel alike.

Geometry conventions
- Arrays are numpy ``[k, j, i]`` (``slicer.util.arrayFromVolume`` order).
- The job files are written on the *volume's* voxel grid: same size, spacing, origin and axis
  directions as the volume file (NRRD stores them in LPS; MRML holds them in RAS; the storage nodes
  convert). A segmentation drawn on another grid is resampled (nearest neighbour) onto it and the
  export says so.

Label table: the selected segments get the values 1..N in the order given; where segments overlap
the *later* segment in that order wins, and the export reports how many voxels that touched.

The annotation node is never modified: exports work on a deep copy in a private scratch scene.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .annotated_slices import axisNames, detectAnnotatedSlices, formatSlices, knownMask, parseSlices

log = logging.getLogger(__name__)


class InputError(ValueError):
    """Bad input the user can fix; the message is one line that says what to do."""


@dataclasses.dataclass
class LabelEntry:
    """One exported segment: its name, label value in the job files, RGB colour (0-1), source id."""

    name: str
    value: int
    color: tuple[float, float, float]
    segmentId: str = ""


@dataclasses.dataclass
class ExportResult:
    imagePath: Path
    labelsPath: Path
    labels: list[LabelEntry]
    voxelCounts: dict[str, int]  # painted voxels per segment name, before overlap resolution
    overlaps: list[tuple[str, str, int]]  # (earlier, later, voxels) - the later one won
    resampled: bool
    annotatedSlices: list[str]
    warnings: list[str]


@dataclasses.dataclass
class ImportResult:
    node: "slicer.vtkMRMLSegmentationNode"
    segmentNames: list[str]
    resampled: bool
    warnings: list[str]


# ---------------------------------------------------------------------------------- basics

def registerSegmentationConverters() -> None:
    """Register the segmentation representation converters if nobody has (slicer-core does not;
    the Slicer application does it at startup). Without them no binary labelmap can be created."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if len(factory.GetConverterRules()) > 0:
        return
    for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                 slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
                 slicer.vtkClosedSurfaceToFractionalLabelmapConversionRule,
                 slicer.vtkFractionalLabelmapToClosedSurfaceConversionRule):
        factory.RegisterConverterRule(rule())


def _matrixToArray(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def ijkToRas(volumeNode) -> np.ndarray:
    """4x4 matrix mapping (i, j, k, 1) voxel indices to RAS millimetres."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return _matrixToArray(matrix)


def volumeAxisNames(volumeNode) -> tuple[str, str, str]:
    """Slice orientation along each numpy axis (k, j, i) of the volume's array."""
    return axisNames(ijkToRas(volumeNode)[:3, :3])


def sameGrid(a: np.ndarray, b: np.ndarray, tolerance: float = 1e-4) -> bool:
    """True when two IJK-to-world matrices describe the same voxel grid (relative tolerance on
    the axis vectors, in voxels on the origin)."""
    axesA, axesB = a[:3, :3], b[:3, :3]
    scale = max(np.abs(axesA).max(), 1e-12)
    if np.abs(axesA - axesB).max() > tolerance * scale:
        return False
    originOffsetVoxels = np.linalg.solve(axesA, b[:3, 3] - a[:3, 3])
    return bool(np.abs(originOffsetVoxels).max() < 1e-3)


def checkScalarVolume(volumeNode) -> None:
    """Raise :class:`InputError` unless ``volumeNode`` is one 3D scalar volume with voxels."""
    if volumeNode is None:
        raise InputError("No input volume: select the scan to segment.")
    name = volumeNode.GetName()
    if volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"'{name}' is a labelmap, not a scan: select the image volume as input "
                         "(convert the labelmap to a segmentation to use it as annotation).")
    if volumeNode.IsA("vtkMRMLVectorVolumeNode") or volumeNode.IsA("vtkMRMLMultiVolumeNode") \
            or volumeNode.IsA("vtkMRMLDiffusionWeightedVolumeNode") or volumeNode.IsA("vtkMRMLTensorVolumeNode"):
        raise InputError(f"'{name}' is a {volumeNode.GetClassName().replace('vtkMRML', '').replace('Node', '')} "
                         "(several values per voxel): extract one scalar 3D volume first (e.g. Vector to "
                         "Scalar Volume module, or one frame of a 4D sequence).")
    if not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"'{name}' is not a scalar volume: select a 3D scan.")
    image = volumeNode.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise InputError(f"Volume '{name}' holds no voxels: load the scan again.")
    components = image.GetNumberOfScalarComponents()
    if components != 1:
        raise InputError(f"Volume '{name}' has {components} values per voxel (RGB or vector image): "
                         "convert it to a scalar volume first (Vector to Scalar Volume module).")
    dims = image.GetDimensions()
    if min(dims) < 2:
        raise InputError(f"Volume '{name}' is {dims[0]}x{dims[1]}x{dims[2]}: a 3D volume of several "
                         "slices is needed.")


def segmentIdsAndNames(segmentationNode) -> list[tuple[str, str]]:
    segmentation = segmentationNode.GetSegmentation()
    return [(segmentation.GetNthSegmentID(i), segmentation.GetNthSegment(i).GetName())
            for i in range(segmentation.GetNumberOfSegments())]


def resolveSegmentIds(segmentationNode, segments: Iterable[str] | None) -> list[str]:
    """Segment ids for a selection given as ids or names (None: all segments, in node order)."""
    pairs = segmentIdsAndNames(segmentationNode)
    if segments is None:
        return [sid for sid, _ in pairs]
    ids = []
    byName = {name: sid for sid, name in pairs}
    known = {sid for sid, _ in pairs}
    for item in segments:
        if item in known:
            ids.append(item)
        elif item in byName:
            ids.append(byName[item])
        else:
            raise InputError(f"Segmentation '{segmentationNode.GetName()}' has no segment '{item}': "
                             f"choose among {', '.join(name for _, name in pairs) or '(none)'}.")
    if len(set(ids)) != len(ids):
        raise InputError("A segment is selected twice: select each segment once.")
    return ids


def _checkTransforms(volumeNode, segmentationNode) -> None:
    volumeTransform = volumeNode.GetParentTransformNode()
    segmentationTransform = segmentationNode.GetParentTransformNode()
    if volumeTransform is not segmentationTransform:
        which = segmentationNode.GetName() if segmentationTransform is not None else volumeNode.GetName()
        raise InputError(f"'{which}' is under a transform that the other input does not share: harden the "
                         "transform (Data module: right-click > Harden transform) and try again.")


def segmentationMatchesVolume(segmentationNode, volumeNode) -> tuple[bool, str]:
    """Whether the segmentation's binary labelmaps lie on the volume's voxel grid (no resampling
    needed). Returns (matches, reason when not)."""
    segmentation = segmentationNode.GetSegmentation()
    if segmentation.GetNumberOfSegments() == 0:
        return True, ""
    binaryName = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if segmentation.GetSourceRepresentationName() != binaryName:
        return False, f"its segments are stored as {segmentation.GetSourceRepresentationName().lower()}"
    volumeMatrix = ijkToRas(volumeNode)
    for layer in range(segmentation.GetNumberOfLayers()):
        image = segmentation.GetLayerDataObject(layer)
        if image is None:
            continue
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        if not sameGrid(volumeMatrix, _matrixToArray(matrix)):
            spacing = tuple(round(s, 4) for s in image.GetSpacing())
            return False, (f"its voxel grid (spacing {spacing} mm) differs from the volume's "
                           f"(spacing {tuple(round(s, 4) for s in volumeNode.GetSpacing())} mm)")
    return True, ""


class _ScratchScene:
    """A private MRML scene for temporary nodes, so the user's scene is never touched."""

    def __init__(self, volumeNode):
        registerSegmentationConverters()
        self.scene = slicer.vtkMRMLScene()
        # Default colour tables, so labelmap display nodes created by the exports find theirs.
        self._colorLogic = slicer.vtkMRMLColorLogic()
        self._colorLogic.SetMRMLScene(self.scene)
        self.reference = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "reference")
        self.reference.CopyOrientation(volumeNode)
        # Shares the voxels (read only): only the grid matters for a reference geometry.
        self.reference.SetAndObserveImageData(volumeNode.GetImageData())

    def copyOf(self, segmentationNode):
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "work")
        node.GetSegmentation().DeepCopy(segmentationNode.GetSegmentation())
        return node

    def masks(self, segmentationNode, segmentIds: Sequence[str]) -> dict[str, np.ndarray]:
        """Boolean ``[k, j, i]`` mask of each segment on the volume grid (resampled if needed).

        ``segmentationNode`` must belong to this scratch scene (see :meth:`copyOf`).
        """
        out = {}
        labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
        for segmentId in segmentIds:
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segmentId)
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentationNode, ids, labelmap, self.reference)
            if not ok or labelmap.GetImageData() is None:
                raise InputError(f"Segment '{segmentId}' could not be converted to a labelmap on the volume grid.")
            array = slicer.util.arrayFromVolume(labelmap)
            out[segmentId] = array != 0
        return out

    def labelmapNode(self, array: np.ndarray):
        """A labelmap node on the volume grid holding ``array`` (``[k, j, i]``)."""
        node = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
        node.CopyOrientation(self.reference)
        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
        return node

    def close(self) -> None:
        self.reference.SetAndObserveImageData(None)
        self._colorLogic.SetMRMLScene(None)
        self.scene.Clear(True)


# ---------------------------------------------------------------------------------- files

def loadVolumeFile(scene, path: str | os.PathLike, name: str | None = None, keepFileGrid: bool = True):
    """Read a scalar volume file (NRRD, NIfTI, MHA...) into a new node of ``scene``; headless
    scripts use it where ``slicer.util.loadVolume`` (which needs the application) is unavailable.

    keepFileGrid: keep the file's voxel order even when its axes are left-handed. Slicer's default
    reverses the slice axis of such files (same voxel positions, other index order), so outputs
    written from the node would not share the input file's index grid.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Volume file '{path}' does not exist: check the path.")
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or _stem(path))
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetForceRightHandedIJKCoordinateSystem(not keepFileGrid)
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        raise InputError(f"Cannot read volume '{path}': is it a complete NRRD, NIfTI or MHA file?")
    try:
        checkScalarVolume(node)
    except InputError:
        scene.RemoveNode(node)
        raise
    return node


def loadSegmentationFile(scene, path: str | os.PathLike, volumeNode, names: dict[int, str] | None = None,
                         name: str | None = None):
    """Read a ``.seg.nrrd`` or a labelmap file (0 = background) into a new segmentation node.

    For a labelmap, ``names`` maps label values to segment names (default ``Label_<value>``).
    """
    registerSegmentationConverters()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Annotation file '{path}' does not exist: check the path.")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or _stem(path))
    if path.name.lower().endswith(".seg.nrrd"):
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(path))
        ok = storage.ReadData(node)
    else:
        labelmap = slicer.vtkMRMLLabelMapVolumeNode()
        scratch = slicer.vtkMRMLScene()
        scratch.AddNode(labelmap)
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        storage.SetForceRightHandedIJKCoordinateSystem(False)  # voxel positions are what count here
        ok = storage.ReadData(labelmap)
        if ok:
            node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, node)
        scratch.Clear(True)
        segmentation = node.GetSegmentation()
        for i in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(i)
            value = segment.GetLabelValue()
            segment.SetName((names or {}).get(value, f"Label_{value}"))
    if not ok:
        scene.RemoveNode(node)
        raise InputError(f"Cannot read the annotation '{path}': use a Slicer .seg.nrrd or a labelmap (.nrrd, .nii.gz).")
    node.CreateDefaultDisplayNodes()
    return node


def saveSegmentationFile(segmentationNode, path: str | os.PathLike) -> Path:
    """Write a segmentation node as a ``.seg.nrrd`` (without attaching the storage node)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.WriteData(segmentationNode) or not path.exists():
        raise InputError(f"Cannot write '{path}': check the folder is writable and has free space.")
    return path


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".seg.nrrd", ".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


# ---------------------------------------------------------------------------------- export

def writeVolume(volumeNode, path: str | os.PathLike, compress: bool = False) -> Path:
    """Write the volume's voxels and geometry to ``path`` (.nrrd) without attaching a storage node
    to it (the node's own storage node and modified state are untouched)."""
    path = Path(path)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(1 if compress else 0)
    if not storage.WriteData(volumeNode) or not path.exists():
        raise InputError(f"Cannot write volume '{volumeNode.GetName()}' to '{path}': check free disk space.")
    return path


def _writeLabelSegmentation(scratch: _ScratchScene, labelArray: np.ndarray, labels: Sequence[LabelEntry],
                            path: Path, terminology: dict[str, str]) -> Path:
    labelmap = scratch.labelmapNode(labelArray.astype(np.int16))
    out = scratch.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "labels")
    out.SetReferenceImageGeometryParameterFromVolumeNode(scratch.reference)
    if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, out):
        raise InputError("Cannot convert the annotation labelmap to a segmentation.")
    segmentation = out.GetSegmentation()
    byValue = {entry.value: entry for entry in labels}
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        entry = byValue.get(segment.GetLabelValue())
        if entry is None:
            continue
        segment.SetName(entry.name)
        segment.SetNameAutoGenerated(False)
        segment.SetColor(*entry.color)
        segment.SetColorAutoGenerated(False)
        if entry.name in terminology:
            segment.SetTag(segment.GetTerminologyEntryTagName(), terminology[entry.name])
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    storage.CropToMinimumExtentOff()  # the engine wants the labels on the full volume grid
    if not storage.WriteData(out) or not path.exists():
        raise InputError(f"Cannot write the annotation to '{path}': check free disk space.")
    return path


def exportJobInputs(volumeNode, segmentationNode, segments: Iterable[str] | None, folder: str | os.PathLike,
                    imageName: str = "image.nrrd", labelsName: str = "labels.seg.nrrd") -> ExportResult:
    """Write a fine-tuning job's image and sparse-annotation files into ``folder``.

    volumeNode: scalar volume (the scan). segmentationNode: the sparse annotation. segments: ids or
    names to learn, in label-value order (None: all). The labels file is a single-layer
    ``.seg.nrrd`` on the volume's exact grid, segments numbered 1..N in that order, names and
    colours kept. Raises :class:`InputError` for unusable input; warnings (overlaps, resampling)
    are in the result.
    """
    checkScalarVolume(volumeNode)
    if segmentationNode is None:
        raise InputError("No annotation: select the segmentation that holds your painted slices.")
    if segmentationNode.GetSegmentation().GetNumberOfSegments() == 0:
        raise InputError(f"Segmentation '{segmentationNode.GetName()}' has no segment: add a segment and "
                         "paint it on a few slices (Segment Editor).")
    segmentIds = resolveSegmentIds(segmentationNode, segments)
    if not segmentIds:
        raise InputError("No segment selected: select the segments to learn.")
    result = _exportLabels(volumeNode, segmentationNode, list(zip(segmentIds, range(1, len(segmentIds) + 1))),
                           Path(folder), imageName, labelsName, dropEmpty=False)
    assert result is not None
    return result


def exportPredictionAnnotation(volumeNode, segmentationNode, modelLabels: Sequence[dict], folder: str | os.PathLike,
                               imageName: str = "image.nrrd", labelsName: str = "labels.seg.nrrd"
                               ) -> ExportResult | None:
    """Write a prediction job's image and this volume's sparse annotation, numbered as the model
    numbers its segments (``modelLabels``: model.json's ``[{"name", "value"}]``).

    The annotation's segments that carry a model segment's name are written with that segment's
    label value; segments the model does not know, and segments with no painted voxel, are left
    out. Returns None (and writes only the image) when nothing of the model's segments is painted:
    the whole volume is then predicted.
    """
    checkScalarVolume(volumeNode)
    folder = Path(folder)
    byName = {name: sid for sid, name in segmentIdsAndNames(segmentationNode)} if segmentationNode else {}
    chosen = [(byName[str(label.get("name"))], int(label["value"])) for label in modelLabels
              if str(label.get("name")) in byName and "value" in label]
    result = _exportLabels(volumeNode, segmentationNode, chosen, folder, imageName, labelsName,
                           dropEmpty=True) if chosen else None
    if result is None:
        folder.mkdir(parents=True, exist_ok=True)
        writeVolume(volumeNode, folder / imageName)
    return result


def _exportLabels(volumeNode, segmentationNode, idsAndValues: Sequence[tuple[str, int]], folder: Path,
                  imageName: str, labelsName: str, dropEmpty: bool) -> ExportResult | None:
    """The image and the label file of ``(segment id, label value)`` pairs (later pairs win where
    segments overlap). ``dropEmpty``: leave out segments with no painted voxel (None when all are),
    else refuse them."""
    _checkTransforms(volumeNode, segmentationNode)
    folder.mkdir(parents=True, exist_ok=True)
    warnings: list[str] = []
    matches, reason = segmentationMatchesVolume(segmentationNode, volumeNode)
    if not matches:
        warnings.append(f"Segmentation '{segmentationNode.GetName()}' does not lie on the voxel grid of "
                        f"'{volumeNode.GetName()}' ({reason}): it was resampled (nearest neighbour) onto the "
                        "volume grid for the job.")
    scratch = _ScratchScene(volumeNode)
    try:
        work = scratch.copyOf(segmentationNode)
        masks = scratch.masks(work, [sid for sid, _value in idsAndValues])
        names = dict(segmentIdsAndNames(segmentationNode))
        counts = {names[sid]: int(masks[sid].sum()) for sid, _value in idsAndValues}
        empty = [names[sid] for sid, _value in idsAndValues if counts[names[sid]] == 0]
        if empty and not dropEmpty:
            raise InputError(f"Segment{'s' if len(empty) > 1 else ''} {', '.join(repr(n) for n in empty)} "
                             "has no painted voxel: paint it on at least one slice or deselect it.")
        idsAndValues = [(sid, value) for sid, value in idsAndValues if counts[names[sid]] > 0]
        if not idsAndValues:
            return None
        labelArray = np.zeros(next(iter(masks.values())).shape, dtype=np.int16)
        labels: list[LabelEntry] = []
        terminology: dict[str, str] = {}
        overlaps: list[tuple[str, str, int]] = []
        for sid, value in idsAndValues:
            segment = segmentationNode.GetSegmentation().GetSegment(sid)
            mask = masks[sid]
            for earlier in labels:
                shared = int(np.count_nonzero(mask & (labelArray == earlier.value)))
                if shared:
                    overlaps.append((earlier.name, segment.GetName(), shared))
            labelArray[mask] = value
            labels.append(LabelEntry(segment.GetName(), value, tuple(segment.GetColor()), sid))
            tag = vtk.reference("")
            if segment.GetTag(segment.GetTerminologyEntryTagName(), tag):
                terminology[segment.GetName()] = str(tag)
        for earlier, later, voxels in overlaps:
            warnings.append(f"Segments '{earlier}' and '{later}' overlap in {voxels} voxels: the later "
                            f"segment ('{later}') is used there.")
        hidden = [entry.name for entry in labels if not np.any(labelArray == entry.value)]
        if hidden:
            raise InputError(f"Segment '{hidden[0]}' lies entirely under later segments: erase the overlap "
                             "or change the segment order.")
        refs = detectAnnotatedSlices(labelArray)
        imagePath = writeVolume(volumeNode, folder / imageName)
        labelsPath = _writeLabelSegmentation(scratch, labelArray, labels, folder / labelsName, terminology)
    finally:
        scratch.close()
    for text in warnings:
        log.warning("%s", text)
    return ExportResult(imagePath, labelsPath, labels, counts, overlaps, not matches,
                        formatSlices(refs, volumeAxisNames(volumeNode)), warnings)


def annotationLabelArray(volumeNode, segmentationNode, segments: Iterable[str] | None = None) -> np.ndarray:
    """``[k, j, i]`` int16 label array of the selected segments on the volume grid (later wins)."""
    checkScalarVolume(volumeNode)
    segmentIds = resolveSegmentIds(segmentationNode, segments)
    scratch = _ScratchScene(volumeNode)
    try:
        masks = scratch.masks(scratch.copyOf(segmentationNode), segmentIds)
    finally:
        scratch.close()
    dims = volumeNode.GetImageData().GetDimensions()
    out = np.zeros((dims[2], dims[1], dims[0]), dtype=np.int16)
    for value, sid in enumerate(segmentIds, start=1):
        out[masks[sid]] = value
    return out


def detectSlices(volumeNode, segmentationNode, segments: Iterable[str] | None = None) -> list[str]:
    """Annotated slices of the selection, e.g. ``["axial:12", "axial:30"]`` (the engine's names)."""
    return formatSlices(detectAnnotatedSlices(annotationLabelArray(volumeNode, segmentationNode, segments)),
                        volumeAxisNames(volumeNode))


# ---------------------------------------------------------------------------------- import

def _readSegmentationFile(path: Path, scene) -> "slicer.vtkMRMLSegmentationNode":
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "read")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not path.exists() or not storage.ReadData(node) or node.GetSegmentation().GetNumberOfSegments() == 0:
        raise InputError(f"Cannot read the prediction '{path}': the job did not write a valid .seg.nrrd.")
    return node


def placeNextTo(node, referenceNode) -> None:
    """Put ``node`` in the subject hierarchy folder/study that holds ``referenceNode``."""
    scene = referenceNode.GetScene()
    shNode = slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(scene)
    if shNode is None:
        return
    referenceItem = shNode.GetItemByDataNode(referenceNode)
    item = shNode.GetItemByDataNode(node)
    if not item:
        item = shNode.CreateItem(shNode.GetSceneItemID(), node)
    parent = shNode.GetItemParent(referenceItem) if referenceItem else shNode.GetSceneItemID()
    shNode.SetItemParent(item, parent)


def importPrediction(path: str | os.PathLike, volumeNode, annotationNode=None, name: str | None = None,
                     targetNode=None) -> ImportResult:
    """Load a predicted ``.seg.nrrd`` into a segmentation node on the volume's grid.

    The node is ``targetNode`` (its segments are replaced) or a new node named
    ``"<volume> prediction"``, placed next to the volume in the subject hierarchy. Segments whose
    name matches an ``annotationNode`` segment take that segment's colour and terminology. A
    prediction on another grid is resampled onto the volume grid (nearest neighbour) and reported.
    """
    checkScalarVolume(volumeNode)
    path = Path(path)
    scene = volumeNode.GetScene()
    warnings: list[str] = []
    scratch = _ScratchScene(volumeNode)
    try:
        read = _readSegmentationFile(path, scratch.scene)
        matches, reason = segmentationMatchesVolume(read, volumeNode)
        if not matches:
            # Rebuild every segment on the volume grid.
            ids = [sid for sid, _ in segmentIdsAndNames(read)]
            masks = scratch.masks(read, ids)
            rebuilt = scratch.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "rebuilt")
            rebuilt.SetReferenceImageGeometryParameterFromVolumeNode(scratch.reference)
            for sid in ids:
                segment = read.GetSegmentation().GetSegment(sid)
                newId = rebuilt.GetSegmentation().AddEmptySegment(sid, segment.GetName(), segment.GetColor())
                _setSegmentMask(rebuilt, newId, masks[sid], scratch)
            read = rebuilt
            warnings.append(f"The prediction did not lie on the voxel grid of '{volumeNode.GetName()}' "
                            f"({reason}): it was resampled onto it.")
        node = targetNode
        if node is None:
            node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{volumeNode.GetName()} prediction")
        wasModifying = node.StartModify()
        node.GetSegmentation().DeepCopy(read.GetSegmentation())
        node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        node.EndModify(wasModifying)
    finally:
        scratch.close()
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    segmentNames = [segmentName for _, segmentName in segmentIdsAndNames(node)]
    if annotationNode is not None:
        source = {n: sid for sid, n in segmentIdsAndNames(annotationNode)}
        for sid, segmentName in segmentIdsAndNames(node):
            if segmentName not in source:
                continue
            original = annotationNode.GetSegmentation().GetSegment(source[segmentName])
            segment = node.GetSegmentation().GetSegment(sid)
            segment.SetColor(original.GetColor())
            tag = vtk.reference("")
            if original.GetTag(original.GetTerminologyEntryTagName(), tag):
                segment.SetTag(segment.GetTerminologyEntryTagName(), str(tag))
    placeNextTo(node, volumeNode)
    for text in warnings:
        log.warning("%s", text)
    return ImportResult(node, segmentNames, not matches, warnings)


def segmentMask(segmentationNode, segment: str, volumeNode) -> np.ndarray:
    """Boolean ``[k, j, i]`` mask of one segment (id or name) on the volume grid."""
    (sid,) = resolveSegmentIds(segmentationNode, [segment])
    scratch = _ScratchScene(volumeNode)
    try:
        return scratch.masks(scratch.copyOf(segmentationNode), [sid])[sid]
    finally:
        scratch.close()


def _setSegmentMask(segmentationNode, segmentId: str, mask: np.ndarray, scratch: _ScratchScene) -> None:
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    logic.ClearSegment(segmentationNode, segmentId)
    if not mask.any():
        return
    labelmap = scratch.labelmapNode(mask.astype(np.uint8))
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segmentId)
    if not logic.ImportLabelmapToSegmentationNode(labelmap, segmentationNode, ids):
        raise InputError(f"Cannot write segment '{segmentId}' of '{segmentationNode.GetName()}'.")
    scratch.scene.RemoveNode(labelmap)


def setSegmentMask(segmentationNode, segment: str, mask: np.ndarray, volumeNode) -> None:
    """Replace one segment's voxels (id or name) by a boolean ``[k, j, i]`` mask on the volume grid."""
    (sid,) = resolveSegmentIds(segmentationNode, [segment])
    scratch = _ScratchScene(volumeNode)
    try:
        _setSegmentMask(segmentationNode, sid, np.asarray(mask, dtype=bool), scratch)
    finally:
        scratch.close()


def copySegmentsToAnnotation(predictionNode, annotationNode, volumeNode, segments: Iterable[str] | None = None,
                             keepAnnotatedSlices: bool = True, extraSlices: str | Sequence[str] = ()) -> list[str]:
    """Copy predicted segments into the annotation segmentation so the user can correct them.

    Segments are matched by name (a missing one is added with the prediction's colour). With
    ``keepAnnotatedSlices`` the slices the user painted (detected, plus ``extraSlices`` such as
    background-only slices) keep the user's voxels and only the other slices take the prediction;
    otherwise the prediction replaces the segment. Only call this on an explicit user request: it
    modifies ``annotationNode``. Returns the names of the segments written.
    """
    checkScalarVolume(volumeNode)
    if predictionNode is None or annotationNode is None:
        raise InputError("Select both the prediction and the annotation segmentation.")
    if predictionNode is annotationNode:
        raise InputError("The prediction and the annotation are the same node: nothing to copy.")
    predictedIds = resolveSegmentIds(predictionNode, segments)
    predictedNames = dict(segmentIdsAndNames(predictionNode))
    scratch = _ScratchScene(volumeNode)
    written: list[str] = []
    try:
        predicted = scratch.masks(scratch.copyOf(predictionNode), predictedIds)
        annotationIds = dict((n, sid) for sid, n in segmentIdsAndNames(annotationNode))
        known = None
        userMasks: dict[str, np.ndarray] = {}
        if keepAnnotatedSlices and annotationIds:
            byId = scratch.masks(scratch.copyOf(annotationNode), list(annotationIds.values()))
            userMasks = {n: byId[sid] for n, sid in annotationIds.items()}
            painted = np.zeros(next(iter(predicted.values())).shape, dtype=np.int16)
            for mask in userMasks.values():
                painted[mask] = 1
            refs = set(detectAnnotatedSlices(painted))
            if extraSlices:
                refs.update(parseSlices(extraSlices, painted.shape, volumeAxisNames(volumeNode)))
            known = knownMask(painted.shape, refs)
        wasModifying = annotationNode.StartModify()
        try:
            for sid in predictedIds:
                segmentName = predictedNames[sid]
                mask = predicted[sid]
                if known is not None and segmentName in userMasks:
                    mask = np.where(known, userMasks[segmentName], mask)
                elif known is not None:
                    mask = mask & ~known  # the user's painted slices say this structure is absent there
                targetId = annotationIds.get(segmentName)
                if targetId is None:
                    color = predictionNode.GetSegmentation().GetSegment(sid).GetColor()
                    targetId = annotationNode.GetSegmentation().AddEmptySegment("", segmentName, color)
                _setSegmentMask(annotationNode, targetId, mask, scratch)
                written.append(segmentName)
        finally:
            annotationNode.EndModify(wasModifying)
    finally:
        scratch.close()
    return written


# ---------------------------------------------------------------------------------- checks

def _tagNames(segment) -> list[str]:
    # vtkSegment cannot list its tags from Python; these are the ones Slicer's editors set.
    return [segment.GetTerminologyEntryTagName(), "Segmentation.Status"]


def segmentationFingerprint(segmentationNode) -> str:
    """A hash of everything a user would call the segmentation's content: segment ids, names,
    colours, terminology/status tags, label values, layers and the voxels of every layer. Equal fingerprints mean
    the node was not modified."""
    digest = hashlib.sha256()
    segmentation = segmentationNode.GetSegmentation()
    digest.update(segmentation.GetSourceRepresentationName().encode())
    for i in range(segmentation.GetNumberOfSegments()):
        sid = segmentation.GetNthSegmentID(i)
        segment = segmentation.GetSegment(sid)
        tagText = []
        for tagName in _tagNames(segment):
            value = vtk.reference("")
            segment.GetTag(tagName, value)
            tagText.append(f"{tagName}={value}")
        digest.update(repr((sid, segment.GetName(), tuple(round(c, 6) for c in segment.GetColor()),
                            segment.GetLabelValue(), segmentation.GetLayerIndex(sid), tagText)).encode())
    for layer in range(segmentation.GetNumberOfLayers()):
        image = segmentation.GetLayerDataObject(layer)
        if image is None or image.GetPointData().GetScalars() is None:
            continue
        digest.update(repr((image.GetExtent(), image.GetSpacing(), image.GetOrigin())).encode())
        digest.update(numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).tobytes())
    return digest.hexdigest()
