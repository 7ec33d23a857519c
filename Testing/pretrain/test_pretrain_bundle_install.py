"""Shipping pretrained models: scripts/bundle_model.py (export.install_bundled) copies a pretrained
model folder into a Models folder, optionally as float16, and every model that ships loads."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hssl.errors import HSSLError
from hssl.finetune import bundled_model_dir
from hssl.io import LabelInfo
from hssl.model_store import load_model, save_model
from hssl.network import SegNet
from hssl.normalize import Normalization
from hssl.plan import Plan
from hssl.pretrain.export import install_bundled
from pretrain_helpers import REPO, TINY_MODEL

PLAN = Plan((3.0, 1.0, 1.0), (4, 16, 16), tuple(map(tuple, TINY_MODEL["strides"])),
            tuple(map(tuple, TINY_MODEL["kernels"])), tuple(TINY_MODEL["channels"]))


@pytest.fixture
def pretrained(tmp_path):
    torch.manual_seed(0)
    net = SegNet(PLAN, 1)
    folder = save_model(tmp_path / "pretrained", net, [], Normalization("ct"),
                        extra={"name": "tiny", "description": "a tiny pretrained net",
                               "pretraining": {"method": "dense voxel InfoNCE"}})
    (folder / "MODEL_CARD.md").write_text("# tiny\n\na tiny pretrained net\n\n## Training\n- 3 steps\n")
    return folder, net


def test_half_copy_loads_and_keeps_the_weights(tmp_path, pretrained):
    source, net = pretrained
    dest = install_bundled(source, "dense", half=True, description="Dense, for the test", root=tmp_path / "Models")
    assert dest == tmp_path / "Models" / "dense"
    raw = load_file(str(dest / "model.safetensors"))
    assert all(v.dtype == torch.float16 for v in raw.values() if v.is_floating_point())
    loaded = load_model(dest)
    for k, v in net.state_dict().items():
        got = loaded.net.state_dict()[k]
        assert got.dtype == v.dtype  # float32 again in the network
        assert torch.allclose(got, v, rtol=1e-3, atol=1e-4), k
    meta = json.loads((dest / "model.json").read_text())
    assert meta["name"] == "dense" and meta["description"] == "Dense, for the test"
    assert meta["weights_dtype"] == "float16" and meta["pretraining"]["method"] == "dense voxel InfoNCE"
    card = (dest / "MODEL_CARD.md").read_text()
    assert card.splitlines()[2] == "Dense, for the test" and "a tiny pretrained net" not in card
    assert "--init bundled:dense" in card and "## Training" in card
    assert oct(os.stat(dest).st_mode & 0o777) == "0o755"
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_float32_copy_is_bit_exact(tmp_path, pretrained):
    source, net = pretrained
    dest = install_bundled(source, "exact", root=tmp_path)
    loaded = load_model(dest)
    assert all(torch.equal(loaded.net.state_dict()[k], v) for k, v in net.state_dict().items())


def test_refusals(tmp_path, pretrained):
    source, net = pretrained
    install_bundled(source, "dense", root=tmp_path)
    with pytest.raises(HSSLError, match="already exists .* --overwrite"):
        install_bundled(source, "dense", root=tmp_path)
    install_bundled(source, "dense", half=True, root=tmp_path, overwrite=True)
    with pytest.raises(HSSLError, match="must be letters, digits"):
        install_bundled(source, "../escape", root=tmp_path)
    finetuned = save_model(tmp_path / "ft", SegNet(PLAN, 2), [LabelInfo("tumour", 1, (1.0, 0.0, 0.0))],
                           Normalization("ct"))
    with pytest.raises(HSSLError, match="fine-tuned model"):
        install_bundled(finetuned, "ft", root=tmp_path / "M")
    with pytest.raises(HSSLError, match="does not exist"):
        install_bundled(tmp_path / "nothing", "x", root=tmp_path / "M")
    assert not (tmp_path / "M" / "ft").exists()


def test_script_one_line_error_and_success(tmp_path, pretrained):
    source, _ = pretrained
    script = REPO / "scripts" / "bundle_model.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run([sys.executable, str(script), str(source), "x", "--half", "--root", str(tmp_path / "M")],
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "--init bundled:x" in ok.stdout, ok.stderr
    again = subprocess.run([sys.executable, str(script), str(source), "x", "--root", str(tmp_path / "M")],
                           capture_output=True, text=True, env=env)
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "Traceback" not in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_every_shipped_model_loads_with_finite_weights_and_a_card():
    root = bundled_model_dir().parent
    shipped = sorted(p for p in root.iterdir() if (p / "model.json").is_file()) if root.is_dir() else []
    if not shipped:
        pytest.skip("no pretrained model is shipped in this tree")
    assert "default" in [p.name for p in shipped]
    for folder in shipped:
        model = load_model(folder)
        assert not model.labels, folder  # pretrained bodies only: fine-tuning trains the head
        assert all(np.isfinite(v.numpy()).all() for v in model.net.state_dict().values())
        assert (folder / "MODEL_CARD.md").is_file() and model.meta.get("pretraining", {}).get("method")
        assert sum(f.stat().st_size for f in folder.iterdir()) < 25e6, folder  # each under ~25 MB
