"""Static checks of the Slicer module files that cannot be imported outside Slicer: the .ui
against the Widget, the parameter node and the widget classes' property types, the template shape,
the import rules (no torch, ever, also at run time), Slicer 5.8's Python 3.9 syntax for what loads
before the version check, and the CMake lists and extension metadata against the files on disk."""
import ast
import re
import subprocess
import sys
import tomllib
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
    "TableWidget": "QTableWidget",
}

# The type of every property the .ui sets, by class, and the .ui element each type is written as.
# A .ui element that does not match the declared type is dropped or mangled by Qt's form loader
# (an <enum> on an int property loads as -1: the QFormBuilder's enum lookup on a property without
# an enumerator). Checked against the headers, Slicer 5.8.1 and 5.10.0 alike:
# qMRMLNodeComboBox.h Q_PROPERTY lines 61-87 (Libs/MRML/Widgets), qMRMLSegmentsTableView.h lines
# 54-69 (Modules/Loadable/Segmentations/Widgets; selectionMode is `int`), CTK's
# ctkCollapsibleButton.h line 48 (collapsed); the rest are Qt's own (QWidget, QAbstractButton,
# QLabel, QLineEdit, QSpinBox, QPlainTextEdit, QProgressBar, QAbstractItemView, QTableWidget).
ELEMENT_OF_TYPE = {"bool": "bool", "int": "number", "QString": "string", "QStringList": "stringlist",
                   "QRect": "rect", "QSize": "size", "QSizePolicy": "sizepolicy", "enum": "enum", "flags": "set"}
QWIDGET_PROPERTIES = {"toolTip": "QString", "geometry": "QRect", "sizePolicy": "QSizePolicy", "minimumSize": "QSize"}
PROPERTY_TYPES = {
    "qMRMLWidget": {},
    "QWidget": {},
    "ctkCollapsibleButton": {"text": "QString", "collapsed": "bool"},
    "qMRMLNodeComboBox": {"nodeTypes": "QStringList", "showChildNodeTypes": "bool", "noneEnabled": "bool",
                          "addEnabled": "bool", "removeEnabled": "bool", "editEnabled": "bool",
                          "renameEnabled": "bool", "selectNodeUponCreation": "bool"},
    "qMRMLSegmentsTableView": {"selectionMode": "int", "visibilityColumnVisible": "bool",
                               "opacityColumnVisible": "bool", "colorColumnVisible": "bool",
                               "statusColumnVisible": "bool", "readOnly": "bool", "headerVisible": "bool"},
    "QLabel": {"text": "QString", "wordWrap": "bool"},
    "QPushButton": {"text": "QString"},
    "QCheckBox": {"text": "QString"},
    "QComboBox": {},
    "QLineEdit": {"text": "QString", "placeholderText": "QString", "readOnly": "bool"},
    "QSpinBox": {"minimum": "int", "maximum": "int", "suffix": "QString", "value": "int"},
    "QPlainTextEdit": {"readOnly": "bool", "maximumBlockCount": "int"},
    "QProgressBar": {"value": "int"},
    "QTableWidget": {"columnCount": "int", "editTriggers": "flags", "selectionMode": "enum",
                     "selectionBehavior": "enum"},
}
LAYOUT_PROPERTIES = {"leftMargin": "int", "topMargin": "int", "rightMargin": "int", "bottomMargin": "int",
                     "spacing": "int"}
SPACER_PROPERTIES = {"orientation": "enum", "sizeHint": "QSize"}


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


def widgetsUsedByTheWidget():
    """Names of .ui widgets HSSLSegment.py uses: ``self.ui.NAME`` and the slice-view buttons it
    reaches with ``getattr(self.ui, f"mark{view}SliceButton")`` for each of SLICE_VIEWS."""
    text = MODULE_FILE.read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", text)) | set(re.findall(r"\bui\.(\w+)", text))
    views = next(ast.literal_eval(n.value) for n in moduleTree().body if isinstance(n, ast.Assign)
                 and getattr(n.targets[0], "id", "") == "SLICE_VIEWS")
    assert 'f"mark{view}SliceButton"' in text
    return used | {f"mark{view}SliceButton" for view in views}


def test_every_widget_the_widget_uses_exists_with_the_expected_class():
    widgets, _params = uiWidgets()
    used = widgetsUsedByTheWidget()
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


def test_ui_properties_match_the_widget_classes_property_types():
    """Every property the .ui sets is one its class declares, written as the element of its type
    (no <enum> on an int property such as qMRMLSegmentsTableView.selectionMode)."""
    root = ET.parse(UI_FILE).getroot()
    checked = 0
    for element, table in ([(w, None) for w in root.iter("widget")] + [(l, LAYOUT_PROPERTIES) for l in root.iter("layout")]
                           + [(sp, SPACER_PROPERTIES) for sp in root.iter("spacer")]):
        cls = element.get("class", "spacer")
        for prop in element.findall("property"):
            if prop.get("stdset") == "0":
                continue  # a dynamic property (SlicerParameterName): no declared type
            name, (value,) = prop.get("name"), list(prop)
            if table is None:
                assert cls in PROPERTY_TYPES, f"widget class {cls}: add its property types to the test from its header"
                declared = PROPERTY_TYPES[cls].get(name) or QWIDGET_PROPERTIES.get(name)
            else:
                declared = table.get(name)
            assert declared, f"{cls}.{name} ({element.get('name')}): check its type in the class header, add it here"
            assert value.tag == ELEMENT_OF_TYPE[declared], (
                f"{element.get('name')}: {cls}.{name} is {declared}, so the .ui must write <{ELEMENT_OF_TYPE[declared]}>, "
                f"not <{value.tag}> (set it from Python if the form loader cannot)")
            checked += 1
    assert checked > 100
    source = MODULE_FILE.read_text()
    assert "segmentsTableView.selectionMode = qt.QAbstractItemView.ExtendedSelection" in source


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
    allowed |= {"hssl"}  # only its torch-free modules, below
    assert topLevel <= allowed, f"{path.name} imports {topLevel - allowed} at module level"
    everywhere = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    everywhere |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not everywhere & {"torch", "qt", "ctk", "monai"}
    engine = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
              and n.module.split(".")[0] == "hssl"}
    engine |= {f"hssl.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "hssl"
               for a in n.names}
    assert engine <= TORCH_FREE_ENGINE | {"hssl"}, f"{path.name} imports {engine - TORCH_FREE_ENGINE}"


# The engine modules the Slicer library may import: stdlib and numpy only.
TORCH_FREE_ENGINE = {"hssl.jobspec", "hssl.model_format", "hssl.recipe", "hssl.sparse", "hssl.errors", "hssl.data"}


def test_the_slicer_library_never_pulls_torch_in():
    """Importing every HSSLSegmentLib module (with slicer-core) loads no torch, MONAI or SimpleITK."""
    pytest.importorskip("slicer", reason="slicer-core wheel not installed")
    modules = sorted(p.stem for p in (MODULE_DIR / "HSSLSegmentLib").glob("*.py") if p.stem != "__init__")
    code = ("import sys\n" f"sys.path.insert(0, {str(MODULE_DIR)!r})\n"
            + "".join(f"import HSSLSegmentLib.{m}\n" for m in modules)
            + "heavy = sorted(m for m in ('torch', 'monai', 'SimpleITK', 'qt') if m in sys.modules)\n"
              "engine = sorted(m for m in sys.modules if m.startswith('hssl.'))\n"
              "print(heavy, engine)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    heavy, engine = done.stdout.strip().splitlines()[-1].split("] [")
    assert heavy == "[", f"the Slicer library imported {heavy}]"
    assert {m.strip("' []") for m in engine.split(",")} <= TORCH_FREE_ENGINE


def test_what_loads_before_the_version_check_parses_as_python_3_9():
    """Slicer 5.8 ships Python 3.9: the module file, the library and the engine modules it imports
    must load there, so that such a Slicer shows the one-line 'needs Slicer 5.10' message."""
    files = [MODULE_FILE, *sorted((MODULE_DIR / "HSSLSegmentLib").glob("*.py"))]
    files += [MODULE_DIR / (name.replace(".", "/") + ".py") for name in sorted(TORCH_FREE_ENGINE)]
    files.append(MODULE_DIR / "hssl" / "__init__.py")
    for path in files:
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 9))
    from HSSLSegmentLib import dependencies

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    minimum = re.match(r">=(\d+)\.(\d+)", project["project"]["requires-python"])
    assert dependencies.MINIMUM_PYTHON == (int(minimum.group(1)), int(minimum.group(2)))
    assert dependencies.pythonProblem((3, 12, 10)) is None
    message = dependencies.pythonProblem((3, 9, 10))
    assert message.startswith("HSSLSegment needs Slicer 5.10 or later") and "Python 3.9.10" in message
    top = (REPO / "CMakeLists.txt").read_text()
    assert f"find_package(Slicer {dependencies.MINIMUM_SLICER} REQUIRED)" in top


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


def test_extension_metadata_names_no_placeholder_and_no_missing_file():
    """Every file the extension metadata points into this repository exists, and no URL is a
    guess: the public repository is given when building (HSSLSegment_REPOSITORY)."""
    top = (REPO / "CMakeLists.txt").read_text()
    assert "github.com/HSSLSegment/HSSLSegment" not in top and "example.com" not in top
    for path in re.findall(r"\$\{HSSLSegment_REPOSITORY\}/raw/[^/\s\"]+/([^\s\"]+)", top):
        assert (REPO / path).is_file(), f"the extension metadata points at {path}, which does not exist"
    assert re.search(r"EXTENSION_ICONURL .*Resources/Icons/HSSLSegment\.png", top)


def test_icon_is_a_128_pixel_png():
    data = (MODULE_DIR / "Resources" / "Icons" / "HSSLSegment.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (128, 128)
