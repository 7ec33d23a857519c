"""Runs HSSLSegment.py's Logic and its in-Slicer self-test (HSSLSegmentTest) outside Slicer.

The MRML scene, the nodes, slicer.util and the engine are real (slicer-core wheel, the real
``python -m hssl job`` in a child process). What the Slicer application adds is replaced by small
stand-ins: ``qt``/``ctk`` (never used by the Logic), the ScriptedLoadableModule base classes,
``slicer.app`` and the parameterNodeWrapper (a plain attribute store that also checks each
default against its Choice/WithinRange annotation). The Widget is not exercised here.
"""
import importlib.util
import os
import pathlib
import sys
import types
import unittest

import pytest

from slicer_test_helpers import MODULE_DIR, engineAvailable, slicerCore

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
    logic = moduleFile.HSSLSegmentLogic()
    parameters = logic.getParameterNode()
    assert parameters.modelSource == "From scratch" and parameters.device == "auto" and parameters.timeBudgetS == 120
    assert parameters.selectedSegments == [] and moduleFile._modelPathOrNone(parameters.currentModelPath) is None
    assert logic.jobs.engineDir == MODULE_DIR
    assert logic.registry.savedDir == tmp_path / "settings" / "HSSLSegment" / "Models"
    assert logic.pythonExecutable() == sys.executable  # no PythonSlicer here
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
