"""Static checks of the Slicer module files that cannot be imported outside Slicer: the .ui
against the Widget and the parameter node, the template shape, the import rules, and the CMake
lists against the files on disk."""
import ast
import re
import xml.etree.ElementTree as ET

import pytest

from slicer_test_helpers import MODULE_DIR, REPO

MODULE_FILE = MODULE_DIR / "HSSLSegment.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "HSSLSegment.ui"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"

# Which widget classes the parameterNodeWrapper's GUI connectors bind to which field types
# (Slicer's parameterNodeWrapper/guiConnectors.py; QComboBox needs a Choice annotation for str/int).
CONNECTABLE = {
    "bool": {"QCheckBox", "QPushButton"},
    "int": {"QSpinBox", "QSlider", "QComboBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "QComboBox"},
    "str": {"QLineEdit", "QTextEdit", "QComboBox"},
    "pathlib.Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "node": {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView"},
}
# Expected widget class by the name suffix the Widget code uses.
SUFFIX_CLASS = {
    "Button": "QPushButton", "CheckBox": "QCheckBox", "SpinBox": "QSpinBox", "Selector": "qMRMLNodeComboBox",
    "Label": "QLabel", "ComboBox": "QComboBox", "TableView": "qMRMLSegmentsTableView", "TextEdit": "QPlainTextEdit",
    "ProgressBar": "QProgressBar", "Placeholder": "QWidget", "PathLineEdit": "ctkPathLineEdit", "LineEdit": "QLineEdit",
}


def uiWidgets():
    root = ET.parse(UI_FILE).getroot()
    widgets, params = {}, {}
    for w in root.iter("widget"):
        widgets[w.get("name")] = w.get("class")
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                params[w.get("name")] = prop.find("string").text
    return widgets, params


def moduleTree():
    return ast.parse(MODULE_FILE.read_text())


def classNamed(tree, name):
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


def parameterFields():
    """{field: (type text, has Choice annotation)} of the @parameterNodeWrapper class."""
    node = classNamed(moduleTree(), "HSSLSegmentParameterNode")
    assert any(ast.unparse(d) == "parameterNodeWrapper" for d in node.decorator_list)
    fields = {}
    for item in node.body:
        if isinstance(item, ast.AnnAssign):
            text = ast.unparse(item.annotation)
            base = text
            if text.startswith("Annotated["):
                base = ast.unparse(item.annotation.slice.elts[0])
            fields[item.target.id] = (base, "Choice(" in text)
    return fields


def kindOf(typeText):
    if typeText.startswith("vtkMRML"):
        return "node"
    return typeText


def test_every_widget_the_widget_uses_exists_with_the_expected_class():
    widgets, _params = uiWidgets()
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))
    assert used, "the Widget should use widgets from the .ui"
    missing = sorted(used - set(widgets))
    assert not missing, f"used by HSSLSegment.py but absent from the .ui: {missing}"
    for name in sorted(used):
        suffix = next((s for s in sorted(SUFFIX_CLASS, key=len, reverse=True) if name.lower().endswith(s.lower())), None)
        assert suffix is not None, f"widget {name}: unknown naming, add its suffix to the test"
        assert widgets[name] == SUFFIX_CLASS[suffix], f"{name} is a {widgets[name]}, expected {SUFFIX_CLASS[suffix]}"


def test_every_slicer_parameter_name_is_a_bindable_parameter_node_field():
    widgets, params = uiWidgets()
    fields = parameterFields()
    assert params, "the .ui should bind widgets to the parameter node"
    assert len(set(params.values())) == len(params), "two widgets bound to the same field"
    for widget, field in params.items():
        assert field in fields, f"{widget} binds '{field}', which is not a parameter node field"
        typeText, hasChoice = fields[field]
        cls = widgets[widget]
        assert cls in CONNECTABLE[kindOf(typeText)], f"{widget} ({cls}) cannot be bound to {field}: {typeText}"
        if cls == "QComboBox":
            assert hasChoice, f"{field} is shown in a QComboBox and needs a Choice annotation"
    # fields that are GUI state but deliberately not bound to a widget (set by code; bundledModel's
    # combo box is filled from the models found on disk, which a static Choice cannot list)
    unbound = set(fields) - set(params.values())
    assert unbound == {"selectedSegments", "trainingChart", "lastStatus", "bundledModel"}


def test_ui_is_wellformed_qt_designer_xml():
    root = ET.parse(UI_FILE).getroot()
    assert root.tag == "ui" and root.get("version") == "4.0" and root.find("class").text == "HSSLSegment"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "widget names must be unique"
    custom = {c.find("class").text for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    assert {c for c in used if c.startswith(("ctk", "qMRML"))} <= custom
    receivers = {c.find("receiver").text for c in root.iter("connection")}
    mrmlWidgets = {w.get("name") for w in root.iter("widget") if w.get("class") in ("qMRMLNodeComboBox", "qMRMLSegmentsTableView")}
    assert mrmlWidgets <= receivers, "every MRML widget must receive the scene"


def test_module_file_has_the_template_shape_and_no_torch():
    tree = moduleTree()
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    for name, base in (("HSSLSegment", "ScriptedLoadableModule"), ("HSSLSegmentWidget", "ScriptedLoadableModuleWidget"),
                       ("HSSLSegmentLogic", "ScriptedLoadableModuleLogic"), ("HSSLSegmentTest", "ScriptedLoadableModuleTest")):
        assert name in classes and base in [ast.unparse(b) for b in classes[name].bases]
        assert ast.get_docstring(classes[name])
    logic = {n.name for n in classes["HSSLSegmentLogic"].body if isinstance(n, ast.FunctionDef)}
    assert {"getParameterNode", "finetune", "predict", "cancelJob", "shutdown", "installDependencies",
            "copyPredictionToAnnotation", "saveModel", "loadModel"} <= logic
    widget = {n.name for n in classes["HSSLSegmentWidget"].body if isinstance(n, ast.FunctionDef)}
    assert {"setup", "cleanup", "onSceneStartClose", "onAboutToQuit", "onFinetuneButton"} <= widget
    test = {n.name for n in classes["HSSLSegmentTest"].body if isinstance(n, ast.FunctionDef)}
    assert {"runTest", "test_finetuneTinyVolume", "test_badInput"} <= test
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "torch" not in imported and "monai" not in imported and "hssl" not in imported
    # buttons are forwarded inside tryWithErrorDisplay
    source = MODULE_FILE.read_text()
    for slot in ("onFinetuneButton", "onPredictButton", "onApplyButton", "onCopyToAnnotationButton",
                 "onSaveModelButton", "onLoadModelButton", "onDependenciesButton", "onDetectSlicesButton"):
        body = ast.unparse(next(n for n in classes["HSSLSegmentWidget"].body
                                if isinstance(n, ast.FunctionDef) and n.name == slot))
        assert "tryWithErrorDisplay" in body, slot
    assert "pip_install" not in source.split("def installDependencies")[0], "no install outside installDependencies"


@pytest.mark.parametrize("path", sorted((MODULE_DIR / "HSSLSegmentLib").glob("*.py")), ids=lambda p: p.name)
def test_lib_modules_import_no_gui_and_no_torch(path):
    tree = ast.parse(path.read_text())
    topLevel = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            topLevel.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            topLevel.add(node.module.split(".")[0])
    allowed = {"slicer", "vtk", "numpy", "__future__"} | set(__import__("sys").stdlib_module_names)
    assert topLevel <= allowed, f"{path.name} imports {topLevel - allowed} at module level"
    everywhere = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    everywhere |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not everywhere & {"torch", "qt", "ctk", "monai", "hssl"}


def test_every_python_file_and_resource_is_listed_for_packaging():
    text = MODULE_CMAKE.read_text()
    for path in sorted(MODULE_DIR.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        rel = path.relative_to(MODULE_DIR).as_posix()
        assert rel in text, f"{rel} is not listed in HSSLSegment/CMakeLists.txt"
    for path in sorted((MODULE_DIR / "Resources").rglob("*")):
        if path.is_file() and "Models" not in path.parts:
            rel = path.relative_to(MODULE_DIR).as_posix()
            assert rel in text, f"resource {rel} is not listed in HSSLSegment/CMakeLists.txt"
    assert "hssl/*.py" in text and "Resources/Models/*" in text  # engine files added later are globbed
    assert "slicerMacroBuildScriptedModule" in text and "MODULE_PYTHON_RESOURCES" in text
    top = (REPO / "CMakeLists.txt").read_text()
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in top and 'set(EXTENSION_DEPENDS "PyTorch")' in top
    assert "add_subdirectory(HSSLSegment)" in top
    for key in ("HOMEPAGE", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert f"set(EXTENSION_{key} " in top


def test_icon_is_a_128_pixel_png():
    data = (MODULE_DIR / "Resources" / "Icons" / "HSSLSegment.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (128, 128)
