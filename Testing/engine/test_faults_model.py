"""A model folder is user input: every field of a corrupted or hostile model.json (and a weights file
whose tensors disagree with it) is refused on load with one line naming the field, before anything
is allocated; loading never runs code and never allocates more than the validated plan allows."""
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from engine_helpers import ENGINE, assert_one_line_error, run_cli
from hssl import model_format
from hssl.errors import HSSLError
from hssl.io import LabelInfo
from hssl.model_store import load_model, save_model
from hssl.network import SegNet
from hssl.normalize import Normalization
from hssl.plan import Plan, make_plan

PLAN = Plan((3.0, 0.7, 0.8), (8, 32, 32), ((1, 1, 1), (1, 2, 2), (1, 2, 2), (2, 2, 2)),
            ((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3)), (16, 32, 64, 128))
LABELS = [LabelInfo("organ", 1, (0.9, 0.35, 0.25)), LabelInfo("spot", 2, (0.3, 0.7, 0.35))]
# Generous for torch + MONAI + a small prediction; the 274 GB a 4096^3 patch asks for fails at once.
ADDRESS_SPACE_LIMIT = 16 * 2**30


def _plan(**changes):
    def change(meta):
        meta["plan"].update(changes)
    return change


def _label(n, **changes):
    def change(meta):
        meta["labels"][n].update(changes)
    return change


def _norm(**changes):
    def change(meta):
        meta["normalization"].update(changes)
    return change


def _add_label(meta):
    meta["labels"].append({"name": "third", "value": 3, "color": [0.1, 0.2, 0.3]})


def _per_modality_list(meta):
    meta["pretraining"] = {"normalization_per_modality": [{"scheme": "ct"}]}


# (name, change to model.json, fragment the error line must contain)
HOSTILE_META = [
    ("patch 4096^3", _plan(patch_size=[4096, 4096, 4096]), "plan.patch_size"),
    ("patch of 1 G voxels", _plan(patch_size=[1024, 1024, 1024]), "voxels per window"),
    ("patch not a multiple of the strides", _plan(patch_size=[9, 32, 32]), "multiple of the total stride"),
    ("negative patch", _plan(patch_size=[8, -32, 32]), "plan.patch_size"),
    ("stride 9", _plan(strides=[[1, 1, 1], [1, 2, 2], [1, 2, 2], [9, 9, 9]]), "plan.strides[3]"),
    ("strides of another depth", _plan(strides=[[1, 1, 1], [1, 2, 2]]), "one entry per level"),
    ("first stride 2", _plan(strides=[[2, 2, 2], [1, 2, 2], [1, 2, 2], [2, 2, 2]]), "plan.strides[0]"),
    ("even kernel", _plan(kernels=[[1, 3, 3], [1, 3, 3], [2, 2, 2], [3, 3, 3]]), "plan.kernels[2]"),
    ("a billion channels", _plan(channels=[16, 32, 64, 10**9]), "plan.channels[3]"),
    ("fractional channels", _plan(channels=[16, 32, 64.5, 128]), "plan.channels[2]"),
    ("twenty levels", _plan(channels=[16] * 20), "plan.channels"),
    ("NaN spacing", _plan(spacing=[float("nan"), 0.7, 0.8]), "plan.spacing"),
    ("plan a list", lambda m: m.update(plan=[8, 32, 32]), "plan must be an object"),
    ("label value used twice", _label(1, value=1), "labels[1].value"),
    ("label value 0", _label(0, value=0), "labels[0].value"),
    ("label value a string", _label(0, value="1"), "labels[0].value"),
    ("label value 2^20", _label(0, value=2**20), "labels[0].value"),
    ("label name a number", _label(0, name=7), "labels[0].name"),
    ("label name used twice", _label(1, name="organ"), "labels[1].name"),
    ("colour out of range", _label(0, color=[2.0, 0.0, 0.0]), "labels[0].color"),
    ("colour of two numbers", _label(1, color=[0.1, 0.2]), "labels[1].color"),
    ("labels not a list", lambda m: m.update(labels={"organ": 1}), "labels must be a list"),
    ("NaN normalisation window", _norm(window=[float("nan"), 1000.0]), "normalization.window"),
    ("infinite window", _norm(window=[-1000.0, float("inf")]), "normalization.window"),
    ("window upside down", _norm(window=[1000.0, -1000.0]), "normalization.window"),
    ("percentiles beyond 100", _norm(percentiles=[0.5, 250.0]), "normalization.percentiles"),
    ("unknown scheme", _norm(scheme="zscore"), "normalization.scheme"),
    ("normalisation per modality a list", _per_modality_list, "normalization_per_modality"),
    # The plan is valid, but the weights were trained for other sizes:
    ("channels that disagree with the weights", _plan(channels=[16, 32, 64, 256]), "has shape"),
    ("a label the weights have no class for", _add_label, "has shape"),
    ("kernels that disagree with the weights", _plan(kernels=[[3, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]]),
     "has shape"),
]


def _header_of(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_weights(path, header, data):
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def _huge_tensor(folder):
    # The header claims a tensor of 2^40 values; the file is small.
    weights = folder / "model.safetensors"
    header, data = _header_of(weights)
    header["encoder.0.conv1.conv.weight"]["shape"] = [2**20, 2**20]
    _write_weights(weights, header, data)


def _offsets_off(folder):
    # A shape twice as large as the bytes the offsets give it.
    weights = folder / "model.safetensors"
    header, data = _header_of(weights)
    header["encoder.1.conv1.conv.weight"]["shape"] = [32, 16, 1, 3, 3, 2]
    _write_weights(weights, header, data)


def _wrong_shape_same_bytes(folder):
    # Same bytes, another shape: the header is self-consistent but not what the plan implies.
    weights = folder / "model.safetensors"
    header, data = _header_of(weights)
    header["encoder.1.conv1.conv.weight"]["shape"] = [16, 32, 1, 3, 3]
    _write_weights(weights, header, data)


def _truncated(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


def _nan_weights(folder):
    weights = folder / "model.safetensors"
    header, data = _header_of(weights)
    begin, _ = header["head.conv.conv.weight"]["data_offsets"]
    data = bytearray(data)
    data[begin:begin + 4] = np.array([np.nan], dtype=np.float32).tobytes()
    _write_weights(weights, header, bytes(data))


def _integer_weights(folder):
    weights = folder / "model.safetensors"
    header, data = _header_of(weights)
    header["head.conv.conv.bias"]["dtype"] = "I32"
    _write_weights(weights, header, data)


def _deep_json(folder):
    (folder / "model.json").write_text('{"format": "hssl-model/1", "labels": ' + "[" * 100000 + "]" * 100000 + "}")


HOSTILE_FILES = [
    ("a tensor of 2^40 values", _huge_tensor, "holds more than"),
    ("offsets that disagree with the shape", _offsets_off, "data offsets"),
    ("a shape the plan does not imply", _wrong_shape_same_bytes, "encoder.1.conv1.conv.weight"),
    ("truncated weights", _truncated, "truncated"),
    ("NaN weights", _nan_weights, "NaN or infinite weights"),
    ("integer weights", _integer_weights, "dtype"),
    ("JSON nested 100000 deep", _deep_json, "corrupt"),
]


@pytest.fixture(scope="module")
def good_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good") / "model"
    save_model(folder, SegNet(PLAN, len(LABELS) + 1), LABELS, Normalization("ct"))
    return folder


def _hostile_folders(good, root):
    """name -> (folder, expected fragment) for every variant."""
    import shutil

    out = {}
    for n, (name, change, fragment) in enumerate(HOSTILE_META + HOSTILE_FILES):
        folder = root / f"hostile{n:02d}"
        shutil.copytree(good, folder)
        if n < len(HOSTILE_META):
            meta = json.loads((folder / "model.json").read_text())
            change(meta)
            (folder / "model.json").write_text(json.dumps(meta))
        else:
            change(folder)
        out[name] = (folder, fragment)
    return out


def test_every_hostile_variant_is_refused_by_load_naming_the_field(good_model, tmp_path):
    assert load_model(good_model).net.out_channels == 3  # the untouched folder loads
    for name, (folder, fragment) in _hostile_folders(good_model, tmp_path).items():
        with pytest.raises(HSSLError) as err:
            load_model(folder)
        message = str(err.value)
        assert fragment.lower() in message.lower(), (name, message)
        assert "\n" not in message and str(folder) in message, (name, message)


def test_torch_free_checks_need_no_torch(good_model, tmp_path):
    # model_format is what the Slicer side can use: it must not pull in torch (or numpy).
    code = ("import sys; from hssl import model_format as m; "
            f"meta, header = m.check_model_folder({str(good_model)!r}); "
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'imported torch/numpy'; "
            "print(len(header), header['head.conv.conv.weight'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ENGINE)), timeout=60)
    assert proc.returncode == 0, proc.stderr
    count, head = proc.stdout.split(" ", 1)
    assert int(count) == len(SegNet(PLAN, 3).state_dict())
    assert head.strip() == "('F32', (3, 16, 1, 1, 1))"


DRIVER = textwrap.dedent("""
    import contextlib, io, json, resource, sys, time, traceback
    resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
    from hssl.cli import main
    import hssl.workflow  # the imports (torch, MONAI) before the clock starts
    results = {{}}
    for name, folder in json.loads(sys.argv[1]).items():
        err = io.StringIO()
        start = time.monotonic()
        try:
            with contextlib.redirect_stderr(err):
                rc = main(["predict", "--model", folder, "--image", sys.argv[2], "--out", sys.argv[3] + "/p.nrrd",
                           "--device", "cpu", "--overwrite"])
        except BaseException:
            rc, _ = None, err.write(traceback.format_exc())
        results[name] = {{"rc": rc, "stderr": err.getvalue(), "seconds": time.monotonic() - start}}
    print(json.dumps(results))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS (the address-space cap) is enforced on "
                    "Linux only; the in-process test above covers the refusals everywhere")
def test_hssl_predict_refuses_every_variant_fast_under_a_memory_cap(good_model, synthetic, tmp_path):
    """``hssl predict`` (cli.main, as ``python -m hssl`` runs it) with every hostile folder, in one
    interpreter whose address space is capped: an attempt to allocate what a hostile plan asks for
    fails there instead of succeeding slowly or taking the machine down. The untouched model is the
    control: it predicts under the same cap."""
    hostile = _hostile_folders(good_model, tmp_path)
    folders = {name: str(folder) for name, (folder, _) in hostile.items()}
    folders["control: the valid model"] = str(good_model)
    proc = subprocess.run([sys.executable, "-c", DRIVER.format(limit=ADDRESS_SPACE_LIMIT), json.dumps(folders),
                           str(synthetic["image"]), str(tmp_path)], capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, PYTHONPATH=str(ENGINE)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    control = results.pop("control: the valid model")
    assert control["rc"] == 0, control["stderr"][-2000:]
    for name, r in results.items():
        assert r["rc"] == 2, (name, r)
        assert "Traceback" not in r["stderr"], (name, r["stderr"][-2000:])
        lines = [ln for ln in r["stderr"].splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and hostile[name][1].lower() in lines[0].lower(), (name, r["stderr"])
        assert r["seconds"] < 5, (name, r["seconds"])  # refused before any large allocation


def test_the_issue_command_patch_4096_cubed(good_model, synthetic, tmp_path):
    """The reported command: before, ``hssl predict`` tried to allocate 274877906944 bytes."""
    import shutil

    folder = tmp_path / "hostile"
    shutil.copytree(good_model, folder)
    meta = json.loads((folder / "model.json").read_text())
    meta["plan"]["patch_size"] = [4096, 4096, 4096]
    (folder / "model.json").write_text(json.dumps(meta))
    proc = run_cli("predict", "--model", folder, "--image", synthetic["image"], "--out", tmp_path / "p.nrrd",
                   "--device", "cpu", timeout=120)
    assert_one_line_error(proc, "plan.patch_size", "4096")
    assert not (tmp_path / "p.nrrd").exists()


def test_shipped_models_and_derived_plans_are_within_the_bounds():
    """The bounds must never refuse what the project itself writes."""
    root = model_format.bundled_models_dir()
    for name in model_format.bundled_model_names():
        meta, header = model_format.check_model_folder(root / name)
        assert header, name
    for spacing in ((0.7, 0.7, 5.0), (1.0, 1.0, 1.0), (0.3, 0.3, 0.3), (5.0, 0.5, 0.5)):
        for shape in ((512, 512, 300), (20, 40, 44), (256, 256, 25)):
            for voxels in (128 * 1024, 96 * 96 * 24):
                model_format.check_plan(make_plan(spacing, shape, voxels).to_json())
    model_format.check_plan(make_plan((1, 1, 1), (200, 200, 200), patch_size=(64, 256, 256)).to_json())


def test_absurd_patch_size_for_finetuning_is_refused_before_allocation():
    with pytest.raises(HSSLError, match="patch size .* too large"):
        make_plan((1.0, 1.0, 1.0), (64, 64, 64), patch_size=(4096, 4096, 4096))


def test_prediction_slab_shrinks_with_the_number_of_classes(monkeypatch):
    """MONAI holds (classes x slab) float32 values: a model with many labels predicts in thinner slabs,
    so its memory stays near that of a 2-label model (the sliding window itself is faked here)."""
    import torch

    from hssl import predict
    from hssl.model_store import Model

    seen = []

    def fake_window(x, roi, sw_batch_size, predictor, **kw):
        seen.append(x.shape[2])
        return torch.zeros((1, classes, *x.shape[2:]))

    monkeypatch.setattr(predict, "sliding_window_inference", fake_window)
    monkeypatch.setattr(predict, "SLAB_VOXELS", 200 * 64 * 64)
    image = np.zeros((200, 64, 64), dtype=np.float32)
    slabs = {}
    for classes in (3, 30):
        seen.clear()
        model = Model(SegNet(PLAN, classes), [], Normalization("ct"), {})
        predict.predict_array(model, image, torch.device("cpu"))
        slabs[classes] = max(seen)
    assert slabs[3] == 200  # one slab: unchanged for the usual 1-2 labels
    half = PLAN.patch_size[0] // 2
    assert slabs[30] <= math.ceil(200 * 3 / 30) + 2 * half, slabs


def test_label_values_above_255_that_validation_accepts_also_predict(synthetic):
    """Values up to 65535 pass validation (labelmaps use them), so prediction must carry them
    (it used to build a uint8 table from the number of labels and overflow)."""
    from hssl.io import read_image
    from hssl.model_store import Model
    from hssl.workflow import predict_volume

    labels = [LabelInfo("liver", 300, (0.9, 0.35, 0.25)), LabelInfo("tumour", 7, (0.3, 0.7, 0.35))]
    model = Model(SegNet(PLAN, 3), labels, Normalization("ct"), {})
    pred = predict_volume(model, read_image(synthetic["image"]), device="cpu")
    assert pred.labels.dtype == np.uint16 and set(np.unique(pred.labels)) <= {0, 7, 300}
