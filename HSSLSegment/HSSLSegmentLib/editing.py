"""Painting from the module panel: the annotation to paint into, Slicer's Segment Editor pointed at
it, and the slice a slice view shows, named as the engine names slices.

MRML only (slicer core classes, numpy): the Widget switches modules and finds the views; everything
that decides what to edit and which slice is shown is here and runs with slicer-core.
"""
from __future__ import annotations

import numpy as np
import slicer
import vtk

from .annotated_slices import SliceRef
from .mrml_io import InputError, checkScalarVolume, placeNextTo, volumeAxisNames

# The singleton tag of the Segment Editor module's parameter node: that module looks its node up by
# this tag when it is entered (Modules/Scripted/SegmentEditor/SegmentEditor.py, selectParameterNode).
SEGMENT_EDITOR_SINGLETON = "SegmentEditor"

# vtkMRMLSliceLogic::GetSliceIndexFromOffset's "no index" results (vtkMRMLSliceLogic.cxx).
SLICE_INDEX_ROTATED, SLICE_INDEX_OUT_OF_VOLUME, SLICE_INDEX_NO_VOLUME = -1, -2, -3


def ensureAnnotation(volumeNode, segmentationNode=None, segmentName: str = "Segment_1"):
    """The segmentation to paint the volume's annotation into, ready for the Segment Editor.

    ``segmentationNode``, or a new ``"<volume> annotation"`` on the volume's grid next to the volume
    when None; one empty segment is added when it has no segment (nothing else is ever changed).
    Returns ``(segmentationNode, added)`` with ``added`` True when a node or a segment was created.
    """
    checkScalarVolume(volumeNode)
    added = False
    if segmentationNode is None:
        scene = volumeNode.GetScene()
        segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volumeNode.GetName()} annotation")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        placeNextTo(segmentationNode, volumeNode)
        added = True
    segmentation = segmentationNode.GetSegmentation()
    if segmentation.GetNumberOfSegments() == 0:
        segmentation.AddEmptySegment("", segmentName)
        added = True
    return segmentationNode, added


def pointSegmentEditorAt(volumeNode, segmentationNode):
    """Make the Segment Editor module edit ``segmentationNode`` over ``volumeNode``: set its
    parameter node (created as the module creates it when absent) to that segmentation, source
    volume and the first segment. Returns the parameter node; entering the module then shows them."""
    scene = volumeNode.GetScene()
    editorNode = scene.GetSingletonNode(SEGMENT_EDITOR_SINGLETON, "vtkMRMLSegmentEditorNode")
    if editorNode is None:
        editorNode = slicer.vtkMRMLSegmentEditorNode()
        editorNode.SetSingletonTag(SEGMENT_EDITOR_SINGLETON)
        editorNode = scene.AddNode(editorNode)
    editorNode.SetAndObserveSegmentationNode(segmentationNode)
    editorNode.SetAndObserveSourceVolumeNode(volumeNode)
    segmentation = segmentationNode.GetSegmentation()
    selected = editorNode.GetSelectedSegmentID()
    if segmentation.GetNumberOfSegments() and (not selected or segmentation.GetSegmentIndex(selected) < 0):
        editorNode.SetSelectedSegmentID(segmentation.GetNthSegmentID(0))
    return editorNode


def sliceInView(volumeNode, sliceLogic, viewName: str = "") -> tuple[SliceRef, str]:
    """The slice of ``volumeNode`` that a slice view shows, as ``(SliceRef, "axial:12")``.

    sliceLogic: the view's ``vtkMRMLSliceLogic`` (in Slicer ``layoutManager().sliceWidget("Red")
    .sliceLogic()``). The index is Slicer's own (``GetSliceIndexFromOffset``); the axis is the voxel
    axis along the view's normal. Raises :class:`InputError` for a view rotated against the voxel
    axes or showing a plane outside the volume.
    """
    checkScalarVolume(volumeNode)
    where = f"The {viewName} view" if viewName else "The slice view"
    index = sliceLogic.GetSliceIndexFromOffset(sliceLogic.GetSliceOffset(), volumeNode)
    if index == SLICE_INDEX_ROTATED:
        raise InputError(f"{where} is rotated against the voxel axes of '{volumeNode.GetName()}': align it with the "
                         "volume (slice view menu: Reset field of view, or Rotate to volume plane) and try again.")
    if index == SLICE_INDEX_OUT_OF_VOLUME:
        raise InputError(f"{where} shows a plane outside '{volumeNode.GetName()}': page to a slice of the volume "
                         "and try again.")
    if index < 1:
        raise InputError(f"{where} shows no volume: select the input volume and try again.")
    ijkToRas = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRas)
    transform = volumeNode.GetParentTransformNode()
    if transform is not None:
        toWorld = vtk.vtkMatrix4x4()
        transform.GetMatrixTransformToWorld(toWorld)
        vtk.vtkMatrix4x4.Multiply4x4(toWorld, ijkToRas, ijkToRas)
    axes = np.array([[ijkToRas.GetElement(r, c) for c in range(3)] for r in range(3)])
    sliceToRas = sliceLogic.GetSliceNode().GetSliceToRAS()
    normal = np.array([sliceToRas.GetElement(r, 2) for r in range(3)])
    alignment = np.abs(normal @ (axes / np.linalg.norm(axes, axis=0))) / np.linalg.norm(normal)
    ijkAxis = int(np.argmax(alignment))
    ref = SliceRef(2 - ijkAxis, index - 1)  # numpy axis 0 is voxel axis k
    return ref, ref.name(volumeAxisNames(volumeNode))


def addSlice(text: str, name: str) -> str:
    """``text`` (a list of slices as the GUI shows it) with ``name`` appended unless already there."""
    present = [word.strip(",;") for word in text.replace(";", " ").split() if word.strip(",;")]
    if name in present:
        return ", ".join(present)
    return ", ".join(present + [name])
