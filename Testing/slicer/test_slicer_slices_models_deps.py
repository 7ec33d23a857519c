"""Annotated-slice naming (the engine's grammar and detection, Slicer's orientation names), the
model registry and models folder, and the dependency list (must agree with the engine's pyproject)."""
import json
import tomllib

import numpy as np
import pytest

from slicer_test_helpers import REPO, ballVolume
from HSSLSegmentLib import annotated_slices as slices
from HSSLSegmentLib import dependencies
from HSSLSegmentLib.model_registry import ModelError, ModelRegistry, checkModelSegments, readModelInfo


def test_orientation_names_agree_with_the_engine_for_the_same_file(tmp_path, scene):
    """The one Slicer-specific part of slice naming: orientation names from a node's IJK-to-RAS
    directions must be the engine's names (from the file's LPS directions) for the same volume."""
    sitk = pytest.importorskip("SimpleITK")
    from hssl.io import read_image

    from HSSLSegmentLib import mrml_io

    image, _ball = ballVolume((10, 20, 30))
    itk = sitk.GetImageFromArray(image)
    itk.SetSpacing((0.7, 0.8, 2.5))
    # i along A/P, j along S/I, k along R/L (a sagittal acquisition), in LPS
    itk.SetDirection((0, 0, -1, -1, 0, 0, 0, -1, 0))
    sitk.WriteImage(itk, str(tmp_path / "sagittal.nrrd"))
    node = mrml_io.loadVolumeFile(scene, tmp_path / "sagittal.nrrd")
    names = mrml_io.volumeAxisNames(node)
    assert names == read_image(str(tmp_path / "sagittal.nrrd")).geometry.axis_names()
    assert names == ("sagittal", "axial", "coronal")
    assert slices.axisNames(np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float)) == names


def test_slice_text_as_the_panel_shows_it_is_the_engines_grammar():
    from hssl.sparse import SliceRef, parse_slices

    names = ("sagittal", "axial", "coronal")
    shape = (10, 20, 30)
    ours = slices.parseSlices("sagittal:3, axial:7,8; coronal:29", shape, names)
    assert ours == parse_slices(["sagittal:3", "axial:7,8", "coronal:29"], shape, names)
    assert ours == [SliceRef(0, 3), SliceRef(1, 7), SliceRef(1, 8), SliceRef(2, 29)]
    assert slices.formatSlices(ours, names) == ["sagittal:3", "axial:7", "axial:8", "coronal:29"]
    assert slices.parseSlices(["axial:3", "axial:3 axial:4"], shape, names) == [SliceRef(1, 3), SliceRef(1, 4)]
    with pytest.raises(ValueError, match="index 10 is outside 0..9"):
        slices.parseSlices("sagittal:10", shape, names)
    with pytest.raises(ValueError, match="orientation 'axial12' is not one of"):
        slices.parseSlices("axial12", shape, names)
    mask = slices.knownMask(shape, [SliceRef(0, 2), SliceRef(2, 5)])
    assert mask[2].all() and mask[:, :, 5].all() and mask.sum() == 20 * 30 + 10 * 20 - 20
    two = np.zeros(shape, dtype=np.uint8)
    two[4, 2:9, 3:9] = 1
    two[:, 12, 3:5] = 2
    assert slices.detectAnnotatedSlices(two) == [SliceRef(0, 4), SliceRef(1, 12)]
    assert slices.detectAnnotatedSlices(np.zeros((4, 4), dtype=np.uint8)) == []


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
    assert bundled.initValue == "bundled" and bundled.kind == "bundled"
    saved = registry.find("lung-1")
    assert saved.initValue == str(tmp_path / "saved" / "lung-1") and saved.segmentNames == ["tumour", "liver"]
    with pytest.raises(ModelError, match="No bundled model 'big'"):
        registry.find("bundled:big")
    with pytest.raises(ModelError, match="not a bundled model name"):
        registry.find("bundled:../lung-1")
    with pytest.raises(ModelError, match="has format 'other/9'"):
        readModelInfo(tmp_path / "saved" / "alien")
    with pytest.raises(ModelError, match="missing model.json"):
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
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["lung-copy"]  # no staging folder left
    with pytest.raises(ModelError, match="already exists"):
        registry.copyModel(saved.path, copied.path)
    imported = registry.importModel(copied.path)
    assert imported.path.parent == tmp_path / "saved" and imported.path != copied.path
    assert registry.importModel(imported.path).path == imported.path  # already there: not copied again


class _Named:
    def __init__(self, name):
        self.name = name

    def GetName(self):
        return self.name


def test_models_folder_management_and_recovery(tmp_path):
    """The model list (volume, segments, date, size), deletion, the record the module writes, and
    the finder of models a job saved after its Slicer had exited (hand-made model.json files)."""
    from HSSLSegmentLib.model_registry import SOURCE_RECORD, formatSize, readModelCard

    saved = tmp_path / "saved"
    tumour = [{"name": "tumour", "value": 1, "color": [0.9, 0.2, 0.2]}]
    old = writeModel(saved / "brain1_image-20260101-100000", tumour)
    recovered = writeModel(saved / "brain1_image-20260102-100000", tumour)
    meta = json.loads((recovered / "model.json").read_text())
    meta["created"] = "2026-01-02T10:05:00"
    meta["training"] = {"steps": 412, "stopped": True, "stop_reason": "parent-exited"}
    (recovered / "model.json").write_text(json.dumps(meta))
    (old / "model.safetensors").write_bytes(b"\0" * 3000)
    outside = writeModel(tmp_path / "elsewhere" / "mine", tumour)
    registry = ModelRegistry(None, saved)

    listed = registry.savedModels()
    assert [m.name for m in listed] == [recovered.name, old.name]  # newest first
    sizes = {m.name: m.sizeBytes for m in listed}
    assert sizes[old.name] == 3000 + len((old / "model.json").read_bytes())
    assert registry.totalSize() == sum(sizes.values())
    assert formatSize(999) == "999 B" and formatSize(3100) == "3.1 kB" and formatSize(2_500_000_000) == "2.5 GB"

    (found,) = registry.recoverableModels()
    assert found.name == recovered.name and found.steps == 412 and found.stopReason == "parent-exited"
    registry.recordSource(found, _Named("brain1_image"), _Named("Segmentation"))
    record = json.loads((recovered / SOURCE_RECORD).read_text())
    assert record["volume"] == "brain1_image" and record["segments"] == ["tumour"]
    assert registry.recoverableModels() == []  # loaded once: not offered again
    assert readModelInfo(recovered).volumeName == "brain1_image"
    assert not list(recovered.glob(".slicer.json*"))
    registry.recordSource(readModelInfo(outside))  # a model outside the models folder is left as it is
    assert not (outside / SOURCE_RECORD).exists()
    # a shared copy does not carry the volume name
    copy = registry.copyModel(recovered, tmp_path / "share" / "m")
    assert not (copy.path / SOURCE_RECORD).exists()

    registry.deleteModel(readModelInfo(old))
    assert not old.exists() and [p.name for p in saved.iterdir()] == [recovered.name]
    with pytest.raises(ModelError, match="only fine-tuned models kept there can be deleted"):
        registry.deleteModel(outside)
    assert outside.is_dir()

    card = tmp_path / "MODEL_CARD.md"
    card.write_bytes(b"# card\n" + b"\xff" + b"x" * 2_000_000)
    text = readModelCard(card)
    assert text.startswith("# card\n\ufffd") and "the rest is not shown" in text and len(text) < 1_100_000
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


def test_pip_install_keeps_the_installed_torch(monkeypatch):
    """MONAI depends on torch: installing it must not replace the installed (e.g. CUDA) torch by PyPI's."""
    monkeypatch.setattr(dependencies, "installedVersion", lambda name: "2.5.1+cu121" if name == "torch" else None)
    missing = [dependencies.Requirement("monai", "monai", "1.4", None),
               dependencies.Requirement("tqdm", "tqdm", "4.60", "4.10")]
    assert dependencies.pipInstallArguments(missing) == ["monai>=1.4", "tqdm>=4.60", "torch==2.5.1+cu121"]
    torchOnly = [dependencies.Requirement("torch", "torch", "2.2", None)]
    assert dependencies.pipInstallArguments(torchOnly) == []
