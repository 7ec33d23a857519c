"""Annotated-slice naming/detection (must agree with the engine), the model registry and the
dependency list (must agree with the engine's pyproject). Numpy and stdlib only."""
import json
import sys
import tomllib

import numpy as np
import pytest

from slicer_test_helpers import MODULE_DIR, REPO, ballVolume, sparse
from HSSLSegmentLib import annotated_slices as slices
from HSSLSegmentLib import dependencies
from HSSLSegmentLib.model_registry import ModelError, ModelRegistry, checkModelSegments, readModelInfo


def engineSparse():
    sys.path.insert(0, str(MODULE_DIR))
    return pytest.importorskip("hssl.sparse")


def cases():
    _image, ball = ballVolume((20, 26, 30))
    two = np.zeros_like(ball, dtype=np.uint8)
    two[sparse(ball, 0, [7])] = 1
    two[sparse(ball, 0, [12])] = 2
    stacked = sparse(ball, 0, [9, 10, 11])  # adjacent painted slices
    mixed = sparse(ball, 0, [8, 12]) | sparse(ball, 1, [13]) | sparse(ball, 2, [15])
    blob = np.zeros_like(ball)
    blob[4:7, 3:5, 10:20] = True  # a thick brush stroke: no plane explains it
    return {"axial": sparse(ball, 0, [5, 10, 14]), "two labels": two, "stacked": stacked, "mixed": mixed,
            "blob": blob, "empty": np.zeros_like(ball)}


@pytest.mark.parametrize("name", list(cases()))
def test_slice_detection_matches_the_engine(name):
    sparseModule = engineSparse()
    labels = cases()[name].astype(np.uint8)
    ours = slices.detectAnnotatedSlices(labels)
    theirs = [(ref.axis, ref.index) for ref in sparseModule.detect_annotated_slices(labels)]
    assert ours == theirs
    if name == "mixed":
        assert ours == [(0, 8), (0, 12), (1, 13), (2, 15)]
    if name == "empty":
        assert ours == []


def test_orientation_names_and_parsing_match_the_engine():
    sparseModule = engineSparse()
    # i axis along A/P, j along S/I, k along R/L (a sagittal acquisition)
    directions = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float)
    names = slices.axisNames(directions)
    assert names == ("sagittal", "axial", "coronal")
    shape = (10, 20, 30)
    ours = slices.parseSlices("sagittal:3, axial:7,8; coronal:29", shape, names)
    theirs = sparseModule.parse_slices(["sagittal:3", "axial:7,8", "coronal:29"], shape, names)
    assert ours == [(ref.axis, ref.index) for ref in theirs]
    assert slices.formatSlices(ours, names) == ["sagittal:3", "axial:7", "axial:8", "coronal:29"]
    with pytest.raises(ValueError, match="outside 0..9"):
        slices.parseSlices("sagittal:10", shape, names)
    with pytest.raises(ValueError, match="cannot read slice 'axial12'"):
        slices.parseSlices("axial12", shape, names)
    mask = slices.knownMask(shape, [(0, 2), (2, 5)])
    assert mask[2].all() and mask[:, :, 5].all() and mask.sum() == 20 * 30 + 10 * 20 - 20


def writeModel(folder, labels, fmt="hssl-model/1"):
    folder.mkdir(parents=True)
    (folder / "model.json").write_text(json.dumps({"format": fmt, "labels": labels, "created": "2026-01-02T03:04:05"}))
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    return folder


def test_model_registry(tmp_path):
    tumour = [{"name": "tumour", "value": 1, "color": [0.9, 0.2, 0.2]}]
    writeModel(tmp_path / "bundled" / "default", tumour)
    writeModel(tmp_path / "saved" / "lung-1", tumour + [{"name": "liver", "value": 2, "color": [0.2, 0.9, 0.2]}])
    writeModel(tmp_path / "saved" / "alien", tumour, fmt="other/9")
    (tmp_path / "saved" / "half").mkdir()
    registry = ModelRegistry(tmp_path / "bundled", tmp_path / "saved")
    assert [m.name for m in registry.bundledModels()] == ["default"]
    assert [m.name for m in registry.savedModels()] == ["lung-1"]  # foreign and half-written folders skipped
    bundled = registry.find("bundled:default")
    assert registry.find("bundled").path == bundled.path  # the engine's "bundled" means "bundled:default"
    assert bundled.initValue == "bundled:default" and bundled.kind == "bundled"
    saved = registry.find("lung-1")
    assert saved.initValue == str(tmp_path / "saved" / "lung-1") and saved.segmentNames == ["tumour", "liver"]
    with pytest.raises(ModelError, match="No bundled model 'big'"):
        registry.find("bundled:big")
    with pytest.raises(ModelError, match="format 'other/9'"):
        readModelInfo(tmp_path / "saved" / "alien")
    with pytest.raises(ModelError, match="not an HSSLSegment model"):
        readModelInfo(tmp_path / "saved" / "half")

    # a model trained on other segments
    with pytest.raises(ModelError, match="trained on tumour, liver, not on spleen"):
        checkModelSegments(saved, ["spleen"], forPrediction=True)
    assert checkModelSegments(saved, ["liver"], forPrediction=True) is None
    note = checkModelSegments(saved, ["spleen"], forPrediction=False)
    assert "new output layer" in note

    first = registry.newModelFolder("CT chest/1")
    assert first.parent == tmp_path / "saved" and first.name.startswith("CT_chest_1-") and not first.exists()
    copied = registry.copyModel(saved.path, tmp_path / "export" / "lung-copy")
    assert copied.segmentNames == saved.segmentNames and (copied.path / "model.safetensors").is_file()
    with pytest.raises(ModelError, match="already exists"):
        registry.copyModel(saved.path, copied.path)
    imported = registry.importModel(copied.path)
    assert imported.path.parent == tmp_path / "saved" and imported.path != copied.path
    assert registry.importModel(imported.path).path == imported.path  # already there: not copied again


def test_dependency_bounds_match_the_engine():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    engine = {}
    for spec in project["project"]["dependencies"]:
        name, _, minimum = spec.partition(">=")
        engine[name.strip().lower()] = minimum.strip()
    ours = {r.distribution.lower(): r.minimum for r in dependencies.requirements()}
    assert ours == engine
    assert dependencies.versionTuple("2.13.0+cpu") == (2, 13, 0)
    assert dependencies.versionTuple("1.4rc1") == (1, 4)
    fake = dependencies.Requirement("torch", "torch", "2.2", "2.1.0")
    assert not fake.satisfied and "too old" in fake.describe()
    assert dependencies.Requirement("x", "x", "1.0", None).describe() == "x (missing, need >= 1.0)"
    assert dependencies.Requirement("x", "x", "1.0", "1.0").pipSpec == "x>=1.0"
