"""The trainer: resume after a kill continues exactly, checkpoints survive interrupted writes and a
full disk, resume refuses another configuration, and the exports load in hssl and in MONAI."""
import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from hssl.errors import HSSLError
from hssl.pretrain import trainer
from hssl.pretrain.config import build_config
from hssl.pretrain.trainer import list_checkpoints, load_checkpoint, pretrain
from pretrain_helpers import SCRIPT, read_log, tiny_config, tiny_tree, write_config


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return tiny_tree(tmp_path_factory.mktemp("data"))


def test_resume_after_a_kill_gives_the_same_next_losses(tmp_path, sources):
    # A long run in a child process, killed (SIGKILL) once it has written a checkpoint.
    tree = tiny_config(tmp_path / "killed", sources, max_steps=400, checkpoint_every=3)
    tree["export"] = {"hssl_model": False, "monai_bundle": False}
    config = write_config(tmp_path / "c.json", tree)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, str(SCRIPT), "--config", str(config)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if list_checkpoints(tmp_path / "killed" / "checkpoints"):
                break
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL, "the child finished before it could be killed"
    newest = list_checkpoints(tmp_path / "killed" / "checkpoints")[-1]
    k = load_checkpoint(newest)["step"]
    assert k % 3 == 0 and k < 400

    resumed = pretrain(build_config({**tree, "train": {**tree["train"], "stop_at_step": k + 2}}), resume="auto",
                       export=False)
    assert resumed.steps == k + 2 and resumed.stopped_by == "stop_at_step"
    reference_tree = {**tree, "output_dir": str(tmp_path / "reference")}
    reference_tree["train"] = {**tree["train"], "stop_at_step": k + 2}
    reference = pretrain(build_config(reference_tree), export=False)
    after_kill, uninterrupted = read_log(tmp_path / "killed"), read_log(tmp_path / "reference")
    for step in (k + 1, k + 2):
        assert float(after_kill[step]["loss"]) == pytest.approx(float(uninterrupted[step]["loss"]), rel=1e-6, abs=1e-7)
        assert float(after_kill[step]["lr"]) == pytest.approx(float(uninterrupted[step]["lr"]), rel=1e-9)
    assert sorted(after_kill) == list(range(1, k + 3))  # rows the killed run logged after step k are replaced
    a = load_checkpoint(resumed.checkpoint)["model"]
    b = load_checkpoint(reference.checkpoint)["model"]
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)


def test_interrupted_and_failed_checkpoint_writes_keep_the_previous_one(tmp_path, sources, monkeypatch):
    tree = tiny_config(tmp_path / "out", sources, max_steps=4, checkpoint_every=2)
    tree["export"] = {"hssl_model": False, "monai_bundle": False}
    result = pretrain(build_config(tree), export=False)
    good = result.checkpoint
    before = good.read_bytes()

    real_save = torch.save

    def killed_mid_write(obj, f, *a, **kw):  # half the bytes, then the process "dies"
        real_save(obj, f, *a, **kw)
        f.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(good, {"format": "x"})
    assert good.read_bytes() == before and load_checkpoint(good)["step"] == 4
    assert not [p for p in good.parent.iterdir() if p.name.endswith(".tmp")]

    def disk_full(obj, f, *a, **kw):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(HSSLError, match=r"no space left on the device while writing checkpoint .*step-0000006.pt"):
        trainer.save_checkpoint(good.parent / "step-0000006.pt", {"format": "x"})
    assert load_checkpoint(good)["step"] == 4 and not (good.parent / "step-0000006.pt").exists()
    monkeypatch.setattr(torch, "save", real_save)

    # A truncated newest checkpoint (e.g. copied while being written) is passed over by --resume.
    (good.parent / "step-0000008.pt").write_bytes(before[:200])
    assert trainer.find_resume("auto", build_config(tree)) == good


def test_resume_refuses_another_configuration_and_a_used_output(tmp_path, sources):
    tree = tiny_config(tmp_path / "out", sources, max_steps=2)
    pretrain(build_config(tree), export=False)
    changed = {**tree, "loss": {"w_restore": 0.5, "temperature": 0.9}}
    with pytest.raises(HSSLError, match=r"another configuration \(differs in: loss.temperature\)"):
        pretrain(build_config(changed), resume="auto", export=False)
    with pytest.raises(HSSLError, match="already holds a pretraining"):
        pretrain(build_config(tree), export=False)


def test_time_budget_stops_with_a_checkpoint(tmp_path, sources):
    tree = tiny_config(tmp_path / "out", sources, max_steps=100000, time_budget=1.0, checkpoint_every=1000)
    result = pretrain(build_config(tree), export=False)
    assert result.stopped_by == "time_budget" and 0 < result.steps < 100000
    assert load_checkpoint(result.checkpoint)["step"] == result.steps


def test_exports_load_in_hssl_and_in_monai(tmp_path, sources):
    tree = tiny_config(tmp_path / "out", sources, max_steps=3)
    result = pretrain(build_config(tree))
    out = tmp_path / "out"
    for name in ("log.csv", "summary.json", "config.json"):
        assert (out / name).is_file()
    if _has("matplotlib"):
        assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    if _has("tensorboard"):
        assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    from hssl.model_store import load_model

    model = load_model(result.model_dir)
    assert model.labels == [] and model.net.out_channels == 1
    assert model.meta["pretraining"]["tasks"] == ["CT", "mr_scans"] and model.meta["pretraining"]["steps"] == 3
    card = (result.model_dir / "MODEL_CARD.md").read_text()
    assert "reconstruction" in card and "Reproduce" in card and "Commit" in card

    # The network fine-tuning starts from: same body, a new head for the new labels.
    from hssl.finetune import FinetuneOptions, initial_model
    from hssl.io import Geometry, LabelInfo, Volume
    from hssl.normalize import Normalization
    from hssl.progress import Progress

    geometry = Geometry((48, 40, 10), (0.8, 0.8, 5.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    volume = Volume(np.zeros((10, 40, 48), np.int16), geometry)
    net, continuing = initial_model(str(result.model_dir), volume, [LabelInfo("x", 1, (1, 0, 0))],
                                    Normalization("ct"), FinetuneOptions(steps=1), Progress(bar=False),
                                    torch.device("cpu"))
    # A new head for new labels: not a continuation (so the scratch learning rate applies).
    assert not continuing and net.out_channels == 2 and net.plan.strides == model.net.plan.strides
    assert torch.equal(net.encoder[0].conv1.conv.weight, model.net.encoder[0].conv1.conv.weight)

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(result.bundle_dir / "configs" / "inference.json"))
    parser.read_meta(str(result.bundle_dir / "configs" / "metadata.json"))
    bundle_net = parser.get_parsed_content("network_def")
    bundle_net.load_state_dict(torch.load(result.bundle_dir / "models" / "model.pt", weights_only=True))
    x = torch.rand(1, 1, 4, 16, 16)
    with torch.no_grad():
        assert torch.allclose(bundle_net.eval()(x), model.net.eval()(x))
    assert parser.get("_meta_")["network_data_format"]["inputs"]["image"]["num_channels"] == 1


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False
