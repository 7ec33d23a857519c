"""The pretrained-model picker: which bundled models the GUI lists (HSSLSegmentLib, no Qt), how the
Logic turns the choice into the job's ``init``, and the .ui widgets that show it.

Model folders are fakes written to a temporary Resources/Models: the registry only reads
model.json and checks that the weights file exists, so an empty model.safetensors is enough.
"""
import ast
import importlib.util
import json
import sys
import types
import xml.etree.ElementTree as ET

import pytest

from slicer_test_helpers import MODULE_DIR

from HSSLSegmentLib.model_registry import (DEFAULT_BUNDLED, ModelError, ModelRegistry, autoStartsPretrained,
                                           bundledModelChoices, readModelInfo)

UI_FILE = MODULE_DIR / "Resources" / "UI" / "HSSLSegment.ui"
MODULE_FILE = MODULE_DIR / "HSSLSegment.py"

# Long pretraining.method texts in the style the engine's export writes into model.json.
METHODS = {
    "default": "HSSL reconstruction: NT-Xent image contrast + task and group classification + restoration",
    "dense": "dense voxel InfoNCE on the feature pyramid, balanced vector (16 channels per level, learned "
             "projections) + restoration",
    "hssl-dense": "HSSL reconstruction: NT-Xent image contrast + task and group classification + dense voxel "
                  "InfoNCE on the feature pyramid, balanced vector (16 channels per level, learned projections) "
                  "+ restoration",
}


def writeBundledModel(root, folderName, method=None, card=True, weights=True):
    """A model folder shaped like Resources/Models/default (labels empty: pretrained, no head)."""
    folder = root / folderName
    folder.mkdir(parents=True)
    meta = {
        "format": "hssl-model/1",
        "labels": [],
        "normalization": {"scheme": "percentile", "window": [-1000.0, 1000.0], "percentiles": [0.5, 99.5]},
        "plan": {"spacing": [5.0, 0.8, 0.8], "patch_size": [8, 48, 48], "channels": [16, 32, 64, 128, 256]},
        "created": "2026-11-22T13:54:54+0000",
        "name": f"samples-{folderName}",
        "description": f"{folderName} pretraining on the sample scans, lung2 and brain2 held out",
    }
    if method is not None:
        meta["pretraining"] = {"method": method, "steps": 1000, "device": "cpu", "tasks": ["lung_ct"]}
    (folder / "model.json").write_text(json.dumps(meta), encoding="utf-8")
    if weights:
        (folder / "model.safetensors").write_bytes(b"")
    if card:
        (folder / "MODEL_CARD.md").write_text(f"# {folderName}\n", encoding="utf-8")
    return folder


@pytest.fixture
def models(tmp_path):
    """Resources/Models with default, dense and hssl-dense (the last without a card), and one
    half-written folder (no weights) that is not a model."""
    root = tmp_path / "Models"
    for name in ("hssl-dense", "dense", "default"):
        writeBundledModel(root, name, METHODS[name], card=name != "hssl-dense")
    writeBundledModel(root, "half-copied", METHODS["dense"], weights=False)
    return root


def test_model_info_reads_the_pretraining_method_and_the_card(models):
    info = readModelInfo(models / "dense", "bundled")
    assert info.pretrainingMethod == METHODS["dense"]
    assert info.modelCard == models / "dense" / "MODEL_CARD.md"
    assert readModelInfo(models / "hssl-dense", "bundled").modelCard is None
    assert info.initValue == "bundled:dense"


def test_choices_list_default_first_with_description_and_method_as_tooltip(models):
    registry = ModelRegistry(models, models.parent / "saved")
    choices = bundledModelChoices(registry.bundledModels(), "default")
    assert [c.name for c in choices] == ["default", "dense", "hssl-dense"]  # the half-written folder is skipped
    assert [c.label for c in choices] == ["default", "dense", "hssl-dense"]
    assert all(c.available for c in choices)
    dense = choices[1]
    assert "dense pretraining on the sample scans" in dense.toolTip
    assert "Pretraining: " + METHODS["dense"] in dense.toolTip
    assert dense.modelCard == models / "dense" / "MODEL_CARD.md" and str(dense.modelCard) in dense.toolTip
    assert choices[2].modelCard is None and "No model card." in choices[2].toolTip


def test_choices_keep_a_name_this_version_does_not_ship(models):
    registry = ModelRegistry(models, models.parent / "saved")
    choices = bundledModelChoices(registry.bundledModels(), "vox2vec")
    missing = choices[-1]
    assert (missing.name, missing.available, missing.modelCard) == ("vox2vec", False, None)
    assert missing.label == "vox2vec (not in this version)"
    assert "bundled: default, dense, hssl-dense" in missing.toolTip
    assert [c.name for c in bundledModelChoices([], None)] == []
    assert [c.available for c in bundledModelChoices([], DEFAULT_BUNDLED)] == [False]


def test_choices_without_a_pretraining_block(tmp_path):
    writeBundledModel(tmp_path / "Models", "default", method=None)
    (choice,) = bundledModelChoices(ModelRegistry(tmp_path / "Models", tmp_path / "saved").bundledModels())
    assert "Pretraining:" not in choice.toolTip and "default pretraining" in choice.toolTip


def test_bundled_init_mapping(models):
    registry = ModelRegistry(models, models.parent / "saved")
    assert registry.bundledInit("default") == "bundled"
    assert registry.bundledInit("") == "bundled" and registry.bundledInit(None) == "bundled"
    assert registry.bundledInit("dense") == "bundled:dense"
    assert registry.bundledInit("hssl-dense") == "bundled:hssl-dense"
    with pytest.raises(ModelError, match=r"No bundled model 'hssl' in this version \(bundled: default, dense, "
                                         r"hssl-dense\): pick one of those"):
        registry.bundledInit("hssl")
    with pytest.raises(ModelError, match="No bundled model 'half-copied'"):
        registry.bundledInit("half-copied")
    # what the job runner resolves an init value to is the same folder
    assert registry.find(registry.bundledInit("dense")).path == models / "dense"
    assert registry.find(registry.bundledInit("default")).path == models / "default"
    with pytest.raises(ModelError, match="No pretrained model is bundled with this version: choose 'From scratch'"):
        ModelRegistry(models.parent / "nothing", models.parent / "saved").bundledInit("default")


def test_the_default_start_follows_the_engine(models, monkeypatch):
    """A new scene starts where ``init: auto`` starts: the engine's DEFAULT_START, pretrained only
    when a default model is bundled."""
    from HSSLSegmentLib import model_registry

    monkeypatch.setattr(model_registry, "DEFAULT_START", "scratch")
    assert not autoStartsPretrained(models)
    monkeypatch.setattr(model_registry, "DEFAULT_START", "bundled")
    assert autoStartsPretrained(models) and not autoStartsPretrained(models.parent / "nothing")


# ---------------------------------------------------------------------- the Logic in HSSLSegment.py


@pytest.fixture
def moduleFile(monkeypatch):
    """HSSLSegment.py imported with stand-ins for what only the Slicer application provides
    (qt, the ScriptedLoadableModule bases, the parameterNodeWrapper); the Logic's constructor is
    skipped, so no slicer.app is needed either."""
    slicer = pytest.importorskip("slicer", reason="slicer-core wheel not installed (pip install slicer-core)")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the installed 'slicer' package is not slicer-core")
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"):
        setattr(slm, name, type(name, (), {}))
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.Choice = lambda choices: ("Choice", tuple(choices))
    pnw.WithinRange = lambda low, high: ("WithinRange", low, high)
    for name, module in {"qt": types.ModuleType("qt"), "slicer.ScriptedLoadableModule": slm,
                         "slicer.parameterNodeWrapper": pnw}.items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("HSSLSegmentPickerUnderTest", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def logic(moduleFile, models):
    logic = moduleFile.HSSLSegmentLogic.__new__(moduleFile.HSSLSegmentLogic)
    logic.registry = ModelRegistry(models, models.parent / "saved")
    return logic


def test_parameter_node_remembers_the_default_bundled_model(moduleFile):
    assert moduleFile.HSSLSegmentParameterNode.bundledModel == DEFAULT_BUNDLED == "default"


def test_init_for_source_uses_the_chosen_bundled_model(moduleFile, logic):
    source = moduleFile.MODEL_SOURCES[0]
    assert source == "Pretrained (bundled)"
    assert logic.initForSource(source, None) == "bundled"  # console calls without a name get 'default'
    assert logic.initForSource(source, None, "default") == "bundled"
    assert logic.initForSource(source, "/models/current", "dense") == "bundled:dense"
    assert logic.initForSource(source, None, "hssl-dense") == "bundled:hssl-dense"
    with pytest.raises(moduleFile.ModelError, match="No bundled model 'hssl' in this version .*pick one of those"):
        logic.initForSource(source, None, "hssl")
    # the name only matters for the bundled source
    assert logic.initForSource("From scratch", None, "hssl") == "scratch"
    assert logic.initForSource("Current model", "/models/current", "hssl") == "/models/current"


def test_logic_lists_choices_and_finds_model_cards(moduleFile, logic, models):
    assert [c.name for c in logic.bundledModelChoices("default")] == ["default", "dense", "hssl-dense"]
    assert logic.bundledModelCard("dense") == str(models / "dense" / "MODEL_CARD.md")
    assert logic.bundledModelCard("") == str(models / "default" / "MODEL_CARD.md")
    with pytest.raises(moduleFile.ModelError, match="'hssl-dense' has no MODEL_CARD.md"):
        logic.bundledModelCard("hssl-dense")
    with pytest.raises(moduleFile.ModelError, match="No bundled model 'hssl'"):
        logic.bundledModelCard("hssl")


def test_the_shipped_models_are_listed_and_map_to_init_values():
    registry = ModelRegistry(MODULE_DIR / "Resources" / "Models", MODULE_DIR / "no-saved-models-here")
    choices = bundledModelChoices(registry.bundledModels(), DEFAULT_BUNDLED)
    if not any(c.available for c in choices):
        pytest.skip("no bundled model in this checkout")
    assert choices[0].name == DEFAULT_BUNDLED and choices[0].available
    for choice in choices:
        expected = "bundled" if choice.name == DEFAULT_BUNDLED else f"bundled:{choice.name}"
        assert registry.bundledInit(choice.name) == expected
        assert choice.toolTip.strip()


# ---------------------------------------------------------------------- the .ui and the Widget


def test_ui_has_the_picker_in_the_model_section_filled_by_code():
    root = ET.parse(UI_FILE).getroot()
    section = next(w for w in root.iter("widget") if w.get("name") == "modelCollapsibleButton")
    inSection = {w.get("name"): w for w in section.iter("widget")}
    assert inSection["bundledModelComboBox"].get("class") == "QComboBox"
    assert inSection["modelCardButton"].get("class") == "QPushButton"
    for name in ("bundledModelComboBox", "modelCardButton"):
        properties = {p.get("name") for p in inSection[name].findall("property")}
        assert "SlicerParameterName" not in properties, f"{name} is filled and synchronised by the Widget"
        assert "toolTip" in properties
    # the picker sits right under "Start from:" (modelSourceComboBox, row 0 of the same form)
    layout = section.find("layout")
    rows = {w.get("name"): int(item.get("row")) for item in layout.findall("item") for w in item.findall("widget")}
    assert rows["modelSourceComboBox"] == 0 and rows["bundledModelRow"] == 1
    cells = [(item.get("row"), item.get("column")) for item in layout.findall("item")]
    assert len(set(cells)) == len(cells), "two items share a cell of the model form"


def test_widget_wires_the_picker_to_the_parameter_node():
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "HSSLSegmentWidget")
    methods = {n.name: ast.unparse(n) for n in widget.body if isinstance(n, ast.FunctionDef)}
    assert "onBundledModelChanged" in methods["setup"] and "onModelCardButton" in methods["setup"]
    assert "bundledModel = " in methods["onBundledModelChanged"]
    assert "tryWithErrorDisplay" in methods["onModelCardButton"]
    assert "p.bundledModel" in methods["onFinetuneButton"]
    assert "bundledModelChoices" in methods["populateBundledModels"]
    assert "Pretrained (bundled)" in methods["updateBundledModelPicker"]
