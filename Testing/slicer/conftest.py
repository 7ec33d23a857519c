"""Fixtures for the Slicer-side tests: HSSLSegmentLib with the slicer-core wheel (real MRML)."""
import pytest

from slicer_test_helpers import slicerCore


@pytest.fixture
def slicerModule():
    return slicerCore()


@pytest.fixture
def scene(slicerModule):
    from HSSLSegmentLib import mrml_io

    mrml_io.registerSegmentationConverters()
    scene = slicerModule.vtkMRMLScene()
    yield scene
    scene.Clear(True)


