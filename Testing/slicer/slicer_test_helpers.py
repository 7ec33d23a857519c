"""Shared helpers of the Slicer-side tests (scenes, volumes, sparse annotations, the stub job)."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "HSSLSegment"
STUB_JOB = Path(__file__).resolve().parent / "stub_job.py"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))


def slicerCore():
    """The slicer-core wheel's ``slicer`` package, or skip the test cleanly without it."""
    slicer = pytest.importorskip("slicer", reason="slicer-core wheel not installed (pip install slicer-core)")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the installed 'slicer' package is not slicer-core")
    return slicer


def addVolume(scene, array, spacing=(0.8, 0.7, 2.0), origin=(12.0, -30.0, 5.0), flipIJ=True, name="CT"):
    """A scalar volume from a ``[k, j, i]`` array; with flipIJ the i/j axes point L and P (the
    usual DICOM-derived RAS direction), so LPS<->RAS handling is exercised."""
    import slicer
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    if flipIJ:
        directions = vtk.vtkMatrix4x4()
        directions.SetElement(0, 0, -1.0)
        directions.SetElement(1, 1, -1.0)
        node.SetIJKToRASDirectionMatrix(directions)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.CreateDefaultDisplayNodes()
    return node


def ballVolume(shape=(16, 24, 28)):
    """A bright ball in noise, int16, and its boolean mask. Shape ``[k, j, i]``."""
    k, j, i = np.indices(shape)
    centre = np.array(shape) / 2.0
    ball = ((k - centre[0]) * 2.0) ** 2 + ((j - centre[1]) * 0.7) ** 2 + ((i - centre[2]) * 0.8) ** 2 < 7.0 ** 2
    rng = np.random.default_rng(0)
    return (ball * 400 + rng.normal(0, 25, shape)).astype(np.int16), ball


def addAnnotation(scene, volumeNode, masks, name="annotation", colors=None):
    """A segmentation with one segment per ``{name: [k, j, i] bool mask}``, on the volume grid."""
    from HSSLSegmentLib import mrml_io

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    palette = colors or [(0.9, 0.3, 0.2), (0.2, 0.8, 0.3), (0.2, 0.4, 0.9)]
    for n, (segmentName, mask) in enumerate(masks.items()):
        segmentId = node.GetSegmentation().AddEmptySegment("", segmentName, palette[n % len(palette)])
        mrml_io.setSegmentMask(node, segmentId, mask, volumeNode)
    return node


def sparse(mask, axis, indices):
    """Keep ``mask`` only on the given slices along numpy ``axis``."""
    out = np.zeros_like(mask)
    for index in indices:
        view = [slice(None)] * 3
        view[axis] = index
        out[tuple(view)] = mask[tuple(view)]
    return out


def engineAvailable() -> bool:
    try:
        import monai  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return (MODULE_DIR / "hssl" / "job.py").is_file()


def engineEnvironment():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(MODULE_DIR)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env
