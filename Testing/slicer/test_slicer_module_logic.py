"""Runs HSSLSegment.py's Logic and its in-Slicer self-test (HSSLSegmentTest) outside Slicer.

The MRML scene, the nodes, slicer.util and the engine are real (slicer-core wheel, the real
``python -m hssl job`` in a child process). What the Slicer application adds is replaced by small
stand-ins: ``qt``/``ctk`` (never used by the Logic), the ScriptedLoadableModule base classes,
``slicer.app`` and the parameterNodeWrapper (a plain attribute store that also checks each
default against its Choice/WithinRange annotation). The Widget and the self-test's GUI smoke test
need the Slicer application and are not exercised here.
"""
import contextlib
import importlib.util
import json
import os
import pathlib
import shutil
import sys
import types
import unittest

import numpy as np
import pytest
import vtk

from slicer_test_helpers import MODULE_DIR, addAnnotation, addVolume, ballVolume, engineAvailable, slicerCore, sparse

slicer = slicerCore()


class _Choice:
    def __init__(self, choices):
        self.choices = list(choices)


class _WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum


def _parameterNodeWrapper(cls):
    """Stand-in for slicer.parameterNodeWrapper: typed attributes with checked defaults."""
    import typing

    hints = typing.get_type_hints(cls, include_extras=True)
    defaults = {}
    for name, hint in hints.items():
        base, extras = hint, []
        if typing.get_origin(hint) is typing.Annotated:
            base, *extras = typing.get_args(hint)
        if hasattr(cls, name):
            value = getattr(cls, name)
        elif base is pathlib.Path:
            value = pathlib.Path()
        elif typing.get_origin(base) is list:
            value = []
        else:
            value = None  # MRML node references
        for extra in extras:
            if isinstance(extra, _Choice):
                assert value in extra.choices, f"{name}: default {value!r} not in {extra.choices}"
            if isinstance(extra, _WithinRange):
                assert extra.minimum <= value <= extra.maximum, f"{name}: default {value} out of range"
        defaults[name] = value

    class Wrapped:
        def __init__(self, node):
            object.__setattr__(self, "parameterNode", node)
            object.__setattr__(self, "_values", {k: (list(v) if isinstance(v, list) else v) for k, v in defaults.items()})

        def __getattr__(self, name):
            values = object.__getattribute__(self, "_values")
            if name not in values:
                raise AttributeError(name)
            return values[name]

        def __setattr__(self, name, value):
            if name not in self._values:
                raise AttributeError(f"{cls.__name__} has no parameter '{name}'")
            self._values[name] = value

    Wrapped.__name__ = cls.__name__
    Wrapped.fields = dict(defaults)
    return Wrapped


class _ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent


class _ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent


class _ScriptedLoadableModuleLogic:
    def __init__(self):
        pass

    def getParameterNode(self):
        node = slicer.mrmlScene.GetSingletonNode("HSSLSegment", "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag("HSSLSegment")
            slicer.mrmlScene.AddNode(node)
        return node


class _ScriptedLoadableModuleTest(unittest.TestCase):
    messages = []

    def delayDisplay(self, message, msec=None):
        self.messages.append(message)


class _App:
    def __init__(self, home):
        self.slicerHome = str(home)
        self.temporaryPath = str(home / "tmp")
        self.slicerUserSettingsFilePath = str(home / "settings" / "Slicer.ini")
        os.makedirs(self.temporaryPath, exist_ok=True)

    def processEvents(self):
        pass

    # slicer.app.testingEnabled(): the module skips interactive offers while tests run
    testingEnabled = staticmethod(lambda: True)

    def connect(self, signal, slot):
        self.connections = getattr(self, "connections", []) + [(signal, slot)]


@pytest.fixture
def moduleFile(tmp_path, monkeypatch, scene):
    fakeModules = {
        "qt": types.ModuleType("qt"),
        "ctk": types.ModuleType("ctk"),
        "slicer.ScriptedLoadableModule": types.ModuleType("slicer.ScriptedLoadableModule"),
        "slicer.parameterNodeWrapper": types.ModuleType("slicer.parameterNodeWrapper"),
    }
    slm = fakeModules["slicer.ScriptedLoadableModule"]
    slm.ScriptedLoadableModule = _ScriptedLoadableModule
    slm.ScriptedLoadableModuleWidget = _ScriptedLoadableModuleWidget
    slm.ScriptedLoadableModuleLogic = _ScriptedLoadableModuleLogic
    slm.ScriptedLoadableModuleTest = _ScriptedLoadableModuleTest
    pnw = fakeModules["slicer.parameterNodeWrapper"]
    pnw.parameterNodeWrapper = _parameterNodeWrapper
    pnw.Choice = _Choice
    pnw.WithinRange = _WithinRange
    for name, module in fakeModules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(slicer, "app", _App(tmp_path), raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    spec = importlib.util.spec_from_file_location("HSSLSegment", MODULE_DIR / "HSSLSegment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_logic_defaults_and_parameter_node(moduleFile, tmp_path):
    from hssl.recipe import DEFAULT_TIME_BUDGET_S

    logic = moduleFile.HSSLSegmentLogic()
    parameters = logic.getParameterNode()
    # The default start is the engine's ("init": "auto"): from scratch while DEFAULT_START says so,
    # else the shipped default pretrained model.
    from hssl.model_format import DEFAULT_START

    shipsDefault = (MODULE_DIR / "Resources" / "Models" / "default" / "model.json").is_file()
    pretrained = DEFAULT_START == "bundled" and shipsDefault
    assert parameters.modelSource == ("Pretrained (bundled)" if pretrained else "From scratch")
    assert parameters.device == "auto" and parameters.timeBudgetS == DEFAULT_TIME_BUDGET_S == 150
    assert parameters.currentModelPath == "" and moduleFile._modelPathOrNone(parameters.currentModelPath) is None
    assert moduleFile._modelPathOrNone(".") is None  # what a scene saved with a pathlib.Path field holds
    assert parameters.selectedSegments == []
    assert logic.jobs.engineDir == MODULE_DIR
    assert logic.jobs.parentPid == os.getpid()
    assert logic.registry.savedDir == tmp_path / "settings" / "HSSLSegment" / "Models"
    assert logic.registry.bundledDir == MODULE_DIR / "Resources" / "Models"
    assert logic.pythonExecutable() == sys.executable  # no PythonSlicer here: a plain Python runs the tests
    assert logic.initForSource("From scratch", None) == "scratch"
    assert logic.initForSource("Current model", "/models/a") == "/models/a"
    with pytest.raises(moduleFile.ModelError, match="No current model"):
        logic.initForSource("Current model", None)
    if logic.registry.bundledModels():
        assert logic.initForSource("Pretrained (bundled)", None) == "bundled"
    else:
        with pytest.raises(moduleFile.ModelError, match="No pretrained model is bundled"):
            logic.initForSource("Pretrained (bundled)", None)
    with pytest.raises(moduleFile.ModelError, match="No model"):
        logic.predict(None, None)
    assert not logic.isJobRunning()


def test_in_slicer_self_test_bad_input(moduleFile):
    moduleFile.HSSLSegmentTest("runTest").test_badInput()
    assert "Bad input test passed" in _ScriptedLoadableModuleTest.messages


@pytest.mark.skipif(not engineAvailable(), reason="the engine needs torch and MONAI")
def test_in_slicer_self_test_finetunes_a_tiny_volume(moduleFile):
    _ScriptedLoadableModuleTest.messages.clear()
    moduleFile.HSSLSegmentTest("runTest").test_finetuneTinyVolume()
    assert _ScriptedLoadableModuleTest.messages[-1] == "Self-test passed"
    prediction = slicer.mrmlScene.GetFirstNodeByName("tiny prediction")
    assert prediction is not None and prediction.GetSegmentation().GetNumberOfSegments() == 1


def test_without_pythonslicer_inside_slicer_the_start_is_a_clear_error(moduleFile, monkeypatch, scene):
    """Inside Slicer sys.executable is the application (SlicerApp-real), not a Python: when
    PythonSlicer cannot be found, nothing is started with it and the error says what to do."""
    monkeypatch.setattr(sys, "executable", "/opt/Slicer/bin/SlicerApp-real")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    logic = moduleFile.HSSLSegmentLogic()
    assert logic.pythonExecutable() is None
    image, ball = ballVolume((12, 16, 16))
    volume = addVolume(scene, image)
    annotation = addAnnotation(scene, volume, {"ball": sparse(ball, 0, [4, 6])})
    with pytest.raises(RuntimeError, match="PythonSlicer.*reinstall Slicer"):
        logic.finetune(volume, annotation, steps=1, device="cpu", waitForCompletion=False)
    assert not logic.isJobRunning()


def test_edit_annotation_points_the_segment_editor_at_the_volume(moduleFile, scene):
    logic = moduleFile.HSSLSegmentLogic()
    image, _ball = ballVolume((12, 16, 16))
    volume = addVolume(scene, image, name="brain")
    segmentation, added = logic.prepareAnnotationEditing(volume, None)
    assert added and segmentation.GetName() == "brain annotation"
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 1
    editor = scene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode")
    assert editor.GetSegmentationNode() is segmentation and editor.GetSourceVolumeNode() is volume
    assert editor.GetSelectedSegmentID() == segmentation.GetSegmentation().GetNthSegmentID(0)
    # an annotation with segments is used as it is: nothing added, nothing changed
    from HSSLSegmentLib import mrml_io

    before = mrml_io.segmentationFingerprint(segmentation)
    again, added = logic.prepareAnnotationEditing(volume, segmentation)
    assert again is segmentation and not added and mrml_io.segmentationFingerprint(segmentation) == before
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentEditorNode") == 1


def setSliceAxes(sliceNode, xAxis, yAxis, normal):
    sliceToRas = sliceNode.GetSliceToRAS()
    for column, vector in enumerate((xAxis, yAxis, normal)):
        for row in range(3):
            sliceToRas.SetElement(row, column, float(vector[row]))
    sliceNode.UpdateMatrices()


def test_background_slice_from_the_slice_view(moduleFile, scene):
    """The slice a view shows becomes 'axial:N' (Slicer's own slice-index rule); a rotated view
    and a plane outside the volume are one-line errors; a painted slice gets a note."""
    from HSSLSegmentLib import editing

    logic = moduleFile.HSSLSegmentLogic()
    image, ball = ballVolume((16, 24, 28))
    volume = addVolume(scene, image)  # spacing (0.8, 0.7, 2.0), i/j along L/P
    annotation = addAnnotation(scene, volume, {"ball": sparse(ball, 0, [7])})
    sliceNode = slicer.vtkMRMLSliceNode()
    sliceNode.SetLayoutName("Red")
    sliceNode.SetSingletonTag("Red")
    scene.AddNode(sliceNode)
    sliceLogic = slicer.vtkMRMLSliceLogic()
    sliceLogic.SetMRMLScene(scene)
    sliceLogic.SetSliceNode(sliceNode)
    origin = volume.GetOrigin()[2]
    sliceLogic.SetSliceOffset(origin + 3 * 2.0)
    name, note = logic.backgroundSliceInView(volume, sliceLogic, "Red", annotation)
    assert (name, note) == ("axial:3", None)
    sliceLogic.SetSliceOffset(origin + 7 * 2.0)
    name, note = logic.backgroundSliceInView(volume, sliceLogic, "Red", annotation)
    assert name == "axial:7" and "holds painted voxels" in note
    assert editing.addSlice("axial:3", "axial:7") == "axial:3, axial:7"
    assert editing.addSlice("axial:3, axial:7", "axial:7") == "axial:3, axial:7"
    sliceLogic.SetSliceOffset(origin + 100 * 2.0)
    with pytest.raises(moduleFile.mrml_io.InputError, match="The Red view shows a plane outside"):
        logic.backgroundSliceInView(volume, sliceLogic, "Red")
    # (slicer-core registers no orientation presets: the views' axes are set directly)
    setSliceAxes(sliceNode, (0, -1, 0), (0, 0, 1), (1, 0, 0))  # a sagittal view: normal along R
    sliceLogic.SetSliceOffset(volume.GetOrigin()[0] - 5 * 0.8)  # i runs towards L (-x in RAS)
    assert logic.backgroundSliceInView(volume, sliceLogic, "Red")[0] == "sagittal:5"
    tilt = np.radians(20.0)  # the view's normal tilted 20 degrees away from the S axis
    setSliceAxes(sliceNode, (1, 0, 0), (0, np.cos(tilt), np.sin(tilt)), (0, -np.sin(tilt), np.cos(tilt)))
    with pytest.raises(moduleFile.mrml_io.InputError, match="rotated against the voxel axes"):
        logic.backgroundSliceInView(volume, sliceLogic, "Red")


def sampleCacheOrSkip():
    from hssl import data

    folder = data.data_dir() / "pyradiomics"
    if not (folder / "brain1_image.nrrd").is_file() or not (folder / "brain1_label.nrrd").is_file():
        pytest.skip("the sample scans are not cached (hssl data fetch)")
    return folder


def test_sample_data_registration_and_the_tutorial_case_offline(moduleFile, monkeypatch, scene):
    """The engine's sample scans in the Sample Data module: one entry per case, loading from the
    cache without any download, brain1 with the tutorial's three painted slices."""
    from HSSLSegmentLib import mrml_io, sample_data

    folder = sampleCacheOrSkip()
    registered = []
    fakeSampleData = types.ModuleType("SampleData")
    fakeSampleData.SampleDataLogic = types.SimpleNamespace(
        registerCustomSampleDataSource=lambda **kwargs: registered.append(kwargs))
    monkeypatch.setitem(sys.modules, "SampleData", fakeSampleData)
    moduleFile.registerSampleData()
    assert [r["category"] for r in registered] == ["HSSLSegment"] * len(sample_data.cases())
    assert sample_data.cases() == ["brain1", "brain2", "breast1", "lung1", "lung2"]
    tutorial = next(r for r in registered if r["sampleName"].startswith("brain1"))
    assert "3 painted slices" in tutorial["sampleName"] and tutorial["uris"] == [] and tutorial["fileNames"] == []
    assert os.path.isfile(tutorial["thumbnailFileName"])

    shown = []
    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda **kwargs: shown.append(kwargs))
    monkeypatch.setattr(moduleFile.HSSLSegmentLogic, "checkPython", staticmethod(lambda: pytest.fail("fetched")))
    loaded = tutorial["customDownloader"](None)  # what the Sample Data button calls
    assert shown and shown[0]["background"] is loaded.volumeNode
    assert loaded.annotated and loaded.volumeNode.GetName() == "brain1_image"
    annotation = loaded.segmentationNode
    assert annotation.GetName() == "brain1 annotation"
    assert [name for _sid, name in mrml_io.segmentIdsAndNames(annotation)] == ["tumour"]
    assert scene.GetFirstNodeByName("brain1 reference") is None  # the full reference is not left behind
    assert mrml_io.detectSlices(loaded.volumeNode, annotation) == ["axial:8", "axial:10", "axial:12"]
    # the slices are the tutorial's rule: second, middle and second-last tumour slice as Slicer loads it
    reference = mrml_io.loadSegmentationFile(scene, folder / "brain1_label.nrrd", loaded.volumeNode, names={1: "t"})
    full = mrml_io.segmentMask(reference, "t", loaded.volumeNode)
    tumourSlices = list(np.nonzero(full.any(axis=(1, 2)))[0])
    chosen = [ref.index for ref in sample_data.TUTORIAL_SLICES]
    assert chosen == [tumourSlices[1], tumourSlices[len(tumourSlices) // 2], tumourSlices[-2]]
    painted = mrml_io.segmentMask(annotation, "tumour", loaded.volumeNode)
    assert np.array_equal(painted[chosen], full[chosen]) and painted.sum() == full[chosen].sum()
    other = sample_data.loadCase(scene, "brain2")
    assert not other.annotated and other.segmentationNode.GetName() == "brain2 reference"
    with pytest.raises(mrml_io.InputError, match="not a sample case"):
        sample_data.loadCase(scene, "liver9")


def test_recovered_models_are_offered_once_loaded(moduleFile, tmp_path):
    logic = moduleFile.HSSLSegmentLogic()
    folder = logic.registry.savedDir / "CT-20260101-120000"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "model.json").write_text(json.dumps({
        "format": "hssl-model/1", "labels": [{"name": "liver", "value": 1, "color": [1, 0, 0]}],
        "created": "2026-01-01T12:10:00", "training": {"steps": 40, "stopped": True, "stop_reason": "parent-exited"}}))
    (recovered,) = logic.recoverableModels()
    assert recovered.path == folder and recovered.segmentNames == ["liver"]
    info = logic.acceptRecoveredModel(recovered)
    assert info.loadedInSlicer and logic.recoverableModels() == []
    assert [m.name for m in logic.savedModels()] == ["CT-20260101-120000"]
    logic.deleteModel(info)
    assert logic.savedModels() == [] and not folder.exists()
