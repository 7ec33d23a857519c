"""A full disk while saving: every writer (model folder, checkpoint, pretraining export, bundled
copy, prediction and labelmap outputs, text files) ends in one line naming the problem, leaves no
temporary file or folder, and leaves an existing output as it was.

Two variants of each fault: a real tmpfs of a few hundred KiB that fills up (Linux as root; skipped
with the reason elsewhere), and the disk-full error injected at the write call (always): an
``OSError(ENOSPC)``, safetensors' ``SafetensorError`` that wraps it, torch.save's bare
``RuntimeError``, or ITK's silent truncation.
"""
import errno
import gc
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from engine_helpers import ENGINE, assert_one_line_error, make_volume, run_cli
from hssl import io
from hssl.errors import HSSLError
from hssl.io import LabelInfo
from hssl.model_store import load_model, save_model
from hssl.network import SegNet
from hssl.normalize import Normalization
from hssl.plan import Plan

FAST = ["--steps", "2", "--device", "cpu", "--patch-size", "8,32,32", "--init", "scratch"]
PLAN = Plan((3.0, 1.0, 1.0), (4, 16, 16), ((1, 1, 1), (1, 2, 2), (2, 2, 2)), ((1, 3, 3), (3, 3, 3), (3, 3, 3)),
            (4, 8, 16))
LABELS = [LabelInfo("organ", 1, (0.9, 0.35, 0.25))]
SAFETENSORS_ENOSPC = "Error while serializing: I/O error: No space left on device (os error 28)"
TORCH_ENOSPC = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"  # measured on a full tmpfs


@pytest.fixture
def small_fs(tmp_path):
    """``small_fs(bytes)``: an empty folder on a tmpfs of that size, or a skip saying why there is none."""
    mounts = []

    def make(size):
        if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a small tmpfs needs root on Linux; the injected-error tests cover the same writers")
        folder = tmp_path / f"fs{len(mounts)}"
        folder.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()[:100] or 'mount failed'}); the "
                        "injected-error tests cover the same writers")
        mounts.append(folder)
        return folder

    yield make
    gc.collect()  # a failed writer's file object may still be open in a reference cycle
    for folder in mounts:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder, leave):
    """Fill ``folder``'s filesystem up to ``leave`` free bytes with one file, ``filler``."""
    free = shutil.disk_usage(folder).free
    (folder / "filler").write_bytes(b"\0" * max(0, free - leave))
    return folder / "filler"


def tiny_net(out_channels=2, seed=0):
    torch.manual_seed(seed)
    return SegNet(PLAN, out_channels)


def partial_then(error):
    """A fake writer(obj, path) that writes part of a file at ``path``, then raises ``error``."""
    def write(*args, **kwargs):
        target = next(a for a in args if isinstance(a, (str, os.PathLike)) or hasattr(a, "write"))
        if hasattr(target, "write"):  # torch.save into an open file
            target.write(b"partial")
        else:
            with open(target, "wb") as f:
                f.write(b"partial")
        raise error
    return write


# ------------------------------------------------------------------ the model folder

def test_save_model_injected_safetensors_error_keeps_the_previous_model(tmp_path, monkeypatch):
    from safetensors import SafetensorError
    import safetensors.torch

    folder = save_model(tmp_path / "model", tiny_net(seed=1), LABELS, Normalization("ct"))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.setattr(safetensors.torch, "save_file", partial_then(SafetensorError(SAFETENSORS_ENOSPC)))
    with pytest.raises(HSSLError, match="no space left on the device while writing the model folder"):
        save_model(folder, tiny_net(seed=2), LABELS, Normalization("ct"), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no .model.XXXX left
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_save_model_injected_oserror_on_model_json(tmp_path, monkeypatch):
    real = type(tmp_path).write_text

    def full(self, *args, **kwargs):
        if self.name == "model.json":
            real(self, "{")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(tmp_path), "write_text", full)
    with pytest.raises(HSSLError, match="no space left"):
        save_model(tmp_path / "model", tiny_net(), LABELS, Normalization("ct"))
    assert list(tmp_path.iterdir()) == []


def test_save_model_onto_a_full_tmpfs(small_fs):
    fs = small_fs(64 * 1024)  # the tiny net's weights are 81 KB
    with pytest.raises(HSSLError, match="no space left on the device"):
        save_model(fs / "model", tiny_net(), LABELS, Normalization("ct"))
    assert list(fs.iterdir()) == []


def test_publish_puts_the_previous_folder_back_when_the_last_rename_fails(tmp_path, monkeypatch):
    folder = save_model(tmp_path / "model", tiny_net(seed=1), LABELS, Normalization("ct"))
    before = (folder / "model.safetensors").read_bytes()
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new folder onto the model's name
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(HSSLError, match="no space left"):
        save_model(folder, tiny_net(seed=2), LABELS, Normalization("ct"), overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (folder / "model.safetensors").read_bytes() == before
    load_model(folder)


def test_finetune_cli_onto_a_full_tmpfs(synthetic, small_fs):
    """The reported command: before, a SafetensorError traceback and a hidden .model.XXXX folder."""
    fs = small_fs(1024 * 1024)  # the fine-tuned model is about 5 MB
    proc = run_cli("finetune", "--image", synthetic["image"], "--labels", synthetic["sparse"], "--out", fs / "model",
                   "--progress-json", *FAST)
    line = assert_one_line_error(proc, "no space left on the device", str(fs / "model"))
    assert list(fs.iterdir()) == [], list(fs.iterdir())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"event": "error", "message": line[len("error: "):]}


INJECT = textwrap.dedent("""
    import sys
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a model")
        raise SafetensorError({message!r})

    safetensors.torch.save_file = full
    from hssl.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_finetune_cli_with_the_safetensors_error_injected(synthetic, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ENGINE))
    proc = subprocess.run([sys.executable, "-c", INJECT.format(message=SAFETENSORS_ENOSPC), "finetune",
                           "--image", str(synthetic["image"]), "--labels", str(synthetic["sparse"]),
                           "--out", str(out / "model"), *FAST], capture_output=True, text=True, env=env, timeout=300)
    assert_one_line_error(proc, "no space left on the device", "model folder")
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------ predictions and labelmaps

def _prediction_inputs():
    """An incompressible 35 KB label array (random bytes) and its grid."""
    image, _ = make_volume()
    geometry = io.Geometry.from_sitk(image)
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=geometry.shape, dtype=np.uint8), geometry


SUFFIXES = [".seg.nrrd", ".nrrd", ".nii.gz", ".mha", ".nii"]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_prediction_writers_onto_a_nearly_full_tmpfs(small_fs, suffix):
    fs = small_fs(256 * 1024)
    array, geometry = _prediction_inputs()
    filler = fill(fs, 8 * 1024)  # the 35 KB prediction does not fit
    with pytest.raises(HSSLError, match="no space left on the device"):
        io.write_prediction(fs / f"pred{suffix}", array, geometry, io.default_label_table([1, 2]))
    assert list(fs.iterdir()) == [filler]
    # The same writer succeeds once there is room: the failure above was the disk.
    filler.unlink()
    io.write_prediction(fs / f"pred{suffix}", array, geometry, io.default_label_table([1, 2]))


def test_nifti_like_the_source_onto_a_nearly_full_tmpfs(small_fs, tmp_path):
    # The nibabel path: a NIfTI input's header is copied to NIfTI outputs.
    image, _ = make_volume()
    sitk.WriteImage(image, str(tmp_path / "image.nii.gz"))
    geometry = io.read_image(tmp_path / "image.nii.gz").geometry
    fs = small_fs(256 * 1024)
    array = np.random.default_rng(0).integers(0, 256, size=geometry.shape, dtype=np.uint8)
    filler = fill(fs, 8 * 1024)
    with pytest.raises(HSSLError, match="no space left on the device"):
        io.write_labelmap(fs / "pred.nii", array, geometry)
    assert list(fs.iterdir()) == [filler]


def _fake_sitk_truncating(image, path, *args, **kwargs):
    with open(path, "wb") as f:  # what ITK's NIfTI writer leaves on a full disk, without an error
        f.write(b"\x5c\x01" + b"\0" * 100)


# (suffix, module attribute to replace, replacement)
INJECTED_WRITERS = [
    (".seg.nrrd", "slicerio.write_segmentation", partial_then(OSError(errno.ENOSPC, "No space left on device"))),
    (".nrrd", "nrrd.write", partial_then(OSError(errno.ENOSPC, "No space left on device"))),
    (".mha", "SimpleITK.WriteImage", partial_then(RuntimeError("ITK ERROR: MetaImageIO: File cannot be written"))),
    (".nii.gz", "SimpleITK.WriteImage", _fake_sitk_truncating),
]


@pytest.mark.parametrize("suffix,target,fake", INJECTED_WRITERS, ids=[w[0] + " " + w[1] for w in INJECTED_WRITERS])
def test_prediction_writers_with_the_error_injected(tmp_path, monkeypatch, suffix, target, fake):
    array, geometry = _prediction_inputs()
    out = tmp_path / f"pred{suffix}"
    io.write_prediction(out, array, geometry, io.default_label_table([1, 2]))
    before = out.read_bytes()
    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(__import__(module), name, fake)
    monkeypatch.setattr(io, "free_bytes", lambda folder: 0)  # the disk is what is full
    with pytest.raises(HSSLError, match="no space left on the device"):
        io.write_prediction(out, array, geometry, io.default_label_table([1, 2]), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    assert out.read_bytes() == before


def test_a_complete_write_on_a_nearly_full_disk_is_kept(tmp_path, monkeypatch):
    """The read-back after ITK writes (free space low) accepts a file that is complete."""
    array, geometry = _prediction_inputs()
    monkeypatch.setattr(io, "free_bytes", lambda folder: 0)
    io.write_labelmap(tmp_path / "p.nii.gz", array, geometry)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "p.nii.gz"))), array)


def test_text_files_are_atomic(tmp_path, monkeypatch):
    path = io.atomic_write_text(tmp_path / "summary.json", '{"a": 1}\n', "summary")
    real = type(tmp_path).write_text

    def full(self, text, *args, **kwargs):
        real(self, text[:3])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(tmp_path), "write_text", full)
    with pytest.raises(HSSLError, match="no space left on the device while writing the summary"):
        io.atomic_write_text(path, '{"a": 2}\n', "summary")
    monkeypatch.undo()
    assert path.read_text() == '{"a": 1}\n' and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


# ------------------------------------------------------------------ pretraining: checkpoints and exports

def _checkpoint_state(values):
    return {"format": "hssl-pretrain-checkpoint/1", "step": 1, "weights": torch.randn(values)}


def test_checkpoint_injected_torch_error_keeps_the_previous_one(tmp_path, monkeypatch):
    from hssl.pretrain import trainer

    first = trainer.save_checkpoint(tmp_path / "step-0000010.pt", _checkpoint_state(10))
    monkeypatch.setattr(trainer.torch, "save", partial_then(RuntimeError(TORCH_ENOSPC)))
    monkeypatch.setattr(io, "free_bytes", lambda folder: 0)
    with pytest.raises(HSSLError, match="no space left.*step-0000010.pt is intact"):
        trainer.save_checkpoint(tmp_path / "step-0000020.pt", _checkpoint_state(10))
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [first.name]
    assert trainer.load_checkpoint(first)["step"] == 1


def test_checkpoint_onto_a_full_tmpfs(small_fs):
    from hssl.pretrain import trainer

    fs = small_fs(512 * 1024)
    first = trainer.save_checkpoint(fs / "step-0000010.pt", _checkpoint_state(1000))
    with pytest.raises(HSSLError, match="no space left.*step-0000010.pt is intact"):
        trainer.save_checkpoint(fs / "step-0000020.pt", _checkpoint_state(200_000))  # 800 KB
    assert [p.name for p in fs.iterdir()] == [first.name]
    assert trainer.load_checkpoint(first)["step"] == 1


def _export_inputs():
    from hssl.pretrain.config import PretrainConfig

    cfg = PretrainConfig()
    summary = {"steps": 3, "seconds_total": 1.0, "device": "cpu", "processes": 1, "threads": 1, "final_loss": 1.0,
               "tasks": ["t"], "groups": ["ct"], "commit": "test",
               "images": [{"task": "t", "group": "ct", "source": "a.nrrd", "shape": [8, 48, 48],
                           "spacing": [5.0, 0.7, 0.7]}]}
    return cfg, summary


@pytest.mark.parametrize("where", ["injected", "tmpfs"])
def test_monai_bundle_export_on_a_full_disk(tmp_path, monkeypatch, small_fs, where):
    from hssl.pretrain import export

    cfg, summary = _export_inputs()
    net = export.SegNet_from(cfg, summary)  # 5 M parameters: 20 MB
    if where == "tmpfs":
        root = small_fs(1024 * 1024)
    else:
        root = tmp_path
        export.export_bundle(root / "bundle", net, cfg, summary)
        before = (root / "bundle" / "models" / "model.pt").read_bytes()
        monkeypatch.setattr(export.torch, "save", partial_then(RuntimeError(TORCH_ENOSPC)))
        monkeypatch.setattr(io, "free_bytes", lambda folder: 0)
    with pytest.raises(HSSLError, match="no space left on the device while writing the MONAI bundle"):
        export.export_bundle(root / "bundle", net, cfg, summary)
    monkeypatch.undo()
    if where == "tmpfs":
        assert list(root.iterdir()) == []
    else:
        assert [p.name for p in root.iterdir()] == ["bundle"]
        assert (root / "bundle" / "models" / "model.pt").read_bytes() == before


def test_hssl_model_export_writes_its_card_inside_the_atomic_folder(tmp_path, monkeypatch):
    from hssl.pretrain import export

    cfg, summary = _export_inputs()
    net = tiny_net(out_channels=1)
    folder = export.export_hssl_model(tmp_path / "model", net, cfg, summary)
    assert sorted(p.name for p in folder.iterdir()) == ["MODEL_CARD.md", "model.json", "model.safetensors"]
    real = type(tmp_path).write_text

    def full(self, text, *args, **kwargs):
        if self.name == "MODEL_CARD.md":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tmp_path), "write_text", full)
    with pytest.raises(HSSLError, match="no space left"):
        export.export_hssl_model(tmp_path / "model2", net, cfg, summary)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_bundled_copy_onto_a_full_disk(tmp_path, monkeypatch, small_fs):
    from safetensors import SafetensorError
    import safetensors.torch

    from hssl.pretrain.export import install_bundled

    source = save_model(tmp_path / "pretrained", tiny_net(out_channels=1), [], Normalization("ct"))
    monkeypatch.setattr(safetensors.torch, "save_file", partial_then(SafetensorError(SAFETENSORS_ENOSPC)))
    with pytest.raises(HSSLError, match="no space left on the device while writing the bundled model"):
        install_bundled(source, "tiny", root=tmp_path / "Models")
    assert list((tmp_path / "Models").iterdir()) == []
    monkeypatch.undo()
    fs = small_fs(64 * 1024)
    with pytest.raises(HSSLError, match="no space left on the device while writing the bundled model"):
        install_bundled(source, "tiny", root=fs)
    assert list(fs.iterdir()) == []


# ------------------------------------------------------------------ the command line's last resort

def test_cli_turns_any_disk_full_error_into_one_line(monkeypatch, capsys):
    from hssl import cli

    def writes_a_log(a):
        raise OSError(errno.ENOSPC, "No space left on device", "/somewhere/log.csv")

    monkeypatch.setitem(cli.COMMANDS, "evaluate", writes_a_log)
    assert cli.main(["evaluate", "--pred", "p.nrrd", "--ref", "r.nrrd"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no space left on the device") and "log.csv" in err

    def a_bug(a):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setitem(cli.COMMANDS, "evaluate", a_bug)
    with pytest.raises(OSError):  # anything else is not hidden
        cli.main(["evaluate", "--pred", "p.nrrd", "--ref", "r.nrrd"])
