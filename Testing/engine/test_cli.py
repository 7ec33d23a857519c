"""The CLI as users and the Slicer job run it: JSON progress, graceful stop, and every bad input
ending in one clear line with a non-zero exit and nothing half-written."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk

from engine_helpers import ENGINE, assert_one_line_error, make_volume, run_cli

FAST = ["--steps", "2", "--device", "cpu", "--patch-size", "8,32,32"]


def json_lines(stdout):
    """Every stdout line must be a JSON object (the protocol); returns them."""
    records = []
    for line in stdout.splitlines():
        if line.strip():
            obj = json.loads(line)
            assert isinstance(obj, dict) and "event" in obj, line
            records.append(obj)
    return records


def test_finetune_predict_evaluate_and_json_protocol(synthetic, tmp_path):
    model, pred = tmp_path / "model", tmp_path / "pred.seg.nrrd"
    proc = run_cli("finetune", "--image", synthetic["image"], "--labels", synthetic["sparse"], "--out", model,
                   "--names", "1=organ,2=spot", "--progress-json", "--predict", pred, *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json_lines(proc.stdout)
    events = [r["event"] for r in records]
    assert events[0] == "start" and events[-1] == "done"
    assert {"progress", "saved", "prediction"} <= set(events)
    start = records[0]
    assert start["annotated_slices"] == ["axial:6", "axial:10", "axial:14"]
    # The small 'spot' is painted on axial:10 only, so that slice stays in training (choose_holdout).
    assert start["heldout"] == "axial:14"
    assert [lab["name"] for lab in start["labels"]] == ["organ", "spot"]
    steps = [r for r in records if r["event"] == "progress" and r["phase"] in ("finetune", "refine")]
    for key in ("phase", "step", "total", "loss", "heldout_dice", "eta_s", "device"):
        assert key in steps[-1], key
    assert steps[-1]["step"] == 2 and steps[-1]["device"] == "cpu"
    assert records[-1]["stopped"] is False and records[-1]["steps"] == 2
    meta = json.loads((model / "model.json").read_text())
    assert meta["format"] == "hssl-model/1" and meta["plan"]["patch_size"] == [8, 32, 32]
    assert [lab["name"] for lab in meta["labels"]] == ["organ", "spot"]
    assert meta["training"]["annotated_slices"] == ["axial:6", "axial:10", "axial:14"]
    # The prediction is a Slicer segmentation in the image's exact geometry.
    img, out = sitk.ReadImage(str(synthetic["image"])), sitk.ReadImage(str(pred))
    assert (out.GetSpacing(), out.GetOrigin(), out.GetDirection()) == (img.GetSpacing(), img.GetOrigin(),
                                                                       img.GetDirection())
    # Standalone predict + evaluate.
    pred2 = tmp_path / "pred2.nii.gz"
    proc = run_cli("predict", "--model", model, "--image", synthetic["image"], "--out", pred2, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("evaluate", "--pred", pred, "--ref", synthetic["full"], "--exclude-annotated",
                   synthetic["sparse"], "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["region"] == "unannotated slices"
    assert [row["name"] for row in result["labels"]] == ["organ", "spot"]
    assert result["region_voxels"] == 20 * 40 * 44 - 3 * 40 * 44


def test_graceful_stop_saves_the_model(synthetic, tmp_path):
    stop, model = tmp_path / "STOP", tmp_path / "model"
    env = dict(os.environ, PYTHONPATH=str(ENGINE))
    proc = subprocess.Popen([sys.executable, "-m", "hssl", "finetune", "--image", str(synthetic["image"]),
                             "--labels", str(synthetic["sparse"]), "--out", str(model), "--time-budget", "300",
                             "--device", "cpu", "--patch-size", "8,32,32", "--progress-json",
                             "--stop-file", str(stop)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, encoding="utf-8", errors="replace", env=env)
    seen_step = False
    for line in proc.stdout:
        if '"progress"' in line and '"finetune"' in line:
            seen_step = True
            stop.touch()
            break
    out, err = proc.communicate(timeout=120)
    assert seen_step and proc.returncode == 0, err[-2000:]
    done = json_lines(out)[-1]
    assert done["event"] == "done" and done["stopped"] is True
    assert (model / "model.safetensors").exists()


def test_sigterm_is_a_graceful_stop(synthetic, tmp_path):
    model = tmp_path / "model"
    env = dict(os.environ, PYTHONPATH=str(ENGINE))
    proc = subprocess.Popen([sys.executable, "-m", "hssl", "finetune", "--image", str(synthetic["image"]),
                             "--labels", str(synthetic["sparse"]), "--out", str(model), "--time-budget", "300",
                             "--device", "cpu", "--patch-size", "8,32,32", "--progress-json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                            errors="replace", env=env)
    for line in proc.stdout:
        if '"progress"' in line and '"finetune"' in line:
            proc.terminate()
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert json_lines(out)[-1]["stopped"] is True and (model / "model.json").exists()


@pytest.fixture
def trained(synthetic, tmp_path_factory):
    model = tmp_path_factory.mktemp("m") / "model"
    proc = run_cli("finetune", "--image", synthetic["image"], "--labels", synthetic["sparse"], "--out", model,
                   "--names", "1=organ,2=spot", *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return model


def write(path, array, like=None, spacing=(1.0, 1.0, 1.0)):
    img = sitk.GetImageFromArray(array)
    if like is not None:
        img.CopyInformation(like)
    else:
        img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    return path


def test_bad_inputs_fail_with_one_clear_line(synthetic, tmp_path):
    img = sitk.ReadImage(str(synthetic["image"]))
    arr = sitk.GetArrayFromImage(img)
    cases = []
    cases.append((["--image", write(tmp_path / "2d.nrrd", arr[5].copy())], "is 2D"))
    four = sitk.JoinSeries([img, img])
    sitk.WriteImage(four, str(tmp_path / "4d.nrrd"))
    cases.append((["--image", tmp_path / "4d.nrrd"], "is 4D"))
    nan = arr.astype(np.float32)
    nan[:] = np.nan
    cases.append((["--image", write(tmp_path / "nan.nrrd", nan, img)], "NaN"))
    cases.append((["--image", write(tmp_path / "const.nrrd", np.zeros_like(arr), img)], "constant"))
    other = sitk.ReadImage(str(synthetic["sparse"]))
    other.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(other, str(tmp_path / "moved.nrrd"))
    cases.append((["--labels", tmp_path / "moved.nrrd"], "do not match the image geometry"))
    cases.append((["--labels", write(tmp_path / "empty.nrrd", np.zeros(arr.shape, np.uint8), img)],
                  "no annotated voxel"))
    cases.append((["--names", "1=organ"], "absent from the names table"))
    corrupt = tmp_path / "corrupt.nrrd"
    corrupt.write_bytes(synthetic["image"].read_bytes()[:300])
    cases.append((["--image", corrupt], "cannot be read"))
    cases.append((["--segments", "liver"], "not in the labels"))
    cases.append((["--init", "bundled:nonexistent"], "no pretrained model 'nonexistent' is bundled with this version "
                                                    "(bundled: default"))
    cases.append((["--device", "cuda"], "no CUDA"))
    cases.append((["--steps", "0"], "at least 1"))
    for extra, message in cases:
        args = {"--image": synthetic["image"], "--labels": synthetic["sparse"], "--out": tmp_path / "m",
                "--steps": 2, "--patch-size": "8,32,32", "--device": "cpu"}
        args.update(dict(zip(extra[::2], extra[1::2])))
        flat = [str(v) for kv in args.items() for v in kv]
        proc = run_cli("finetune", *flat)
        assert_one_line_error(proc, message)
        assert not (tmp_path / "m").exists(), extra


def test_json_error_event(synthetic, tmp_path):
    proc = run_cli("finetune", "--image", tmp_path / "missing.nrrd", "--labels", synthetic["sparse"], "--out",
                   tmp_path / "m", "--progress-json", *FAST)
    assert_one_line_error(proc, "does not exist")
    assert json_lines(proc.stdout)[-1] == {"event": "error", "message": proc.stderr.strip()[len("error: "):]}


def test_existing_and_unwritable_outputs(synthetic, trained, tmp_path):
    proc = run_cli("finetune", "--image", synthetic["image"], "--labels", synthetic["sparse"], "--out", trained,
                   *FAST)
    assert_one_line_error(proc, "already exists", "--overwrite")
    pred = tmp_path / "p.seg.nrrd"
    pred.write_text("keep me")
    proc = run_cli("predict", "--model", trained, "--image", synthetic["image"], "--out", pred)
    assert_one_line_error(proc, "already exists")
    assert pred.read_text() == "keep me"
    if os.geteuid() != 0:  # root can write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        proc = run_cli("predict", "--model", trained, "--image", synthetic["image"], "--out", locked / "p.nrrd")
        assert_one_line_error(proc, "cannot write")
    proc = run_cli("predict", "--model", trained, "--image", synthetic["image"], "--out", "/proc/nope/p.nrrd")
    assert_one_line_error(proc, "cannot")


def test_model_folder_problems(synthetic, trained, tmp_path):
    out = tmp_path / "p.seg.nrrd"
    proc = run_cli("predict", "--model", tmp_path / "nothing", "--image", synthetic["image"], "--out", out)
    assert_one_line_error(proc, "does not exist")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.json").write_text((trained / "model.json").read_text())
    (broken / "model.safetensors").write_bytes((trained / "model.safetensors").read_bytes()[:1000])
    proc = run_cli("predict", "--model", broken, "--image", synthetic["image"], "--out", out)
    assert_one_line_error(proc, "corrupt")
    (broken / "model.json").write_text("{not json")
    proc = run_cli("predict", "--model", broken, "--image", synthetic["image"], "--out", out)
    assert_one_line_error(proc, "corrupt")
    proc = run_cli("predict", "--model", trained, "--image", synthetic["image"], "--out", out, "--segments", "liver")
    assert_one_line_error(proc, "trained on segments", "liver")
    assert not out.exists()


def test_volume_too_large_for_memory(synthetic, tmp_path):
    # A header-only NRRD claiming 4000^3 voxels of int16: refused before any allocation.
    big = tmp_path / "big.nhdr"
    big.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 4000 4000 4000\nencoding: raw\n"
                   "space: left-posterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n"
                   "space origin: (0,0,0)\ndata file: big.raw\n")
    (tmp_path / "big.raw").write_bytes(b"")
    proc = run_cli("finetune", "--image", big, "--labels", synthetic["sparse"], "--out", tmp_path / "m", *FAST)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error:")


def test_job_file_runs_and_rejects_unknown_keys(synthetic, tmp_path):
    job = {"image": str(synthetic["image"]), "labels": str(synthetic["sparse"]), "model_out": str(tmp_path / "m"),
           "prediction_out": str(tmp_path / "p.seg.nrrd"), "steps": 2, "device": "cpu", "names": "1=organ,2=spot"}
    (tmp_path / "job.json").write_text(json.dumps({**job, "colour": "red"}))
    proc = run_cli("job", "--job", tmp_path / "job.json")
    assert_one_line_error(proc, "unknown key", "colour")
    (tmp_path / "job.json").write_text(json.dumps(job))
    proc = run_cli("job", "--job", tmp_path / "job.json", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = json_lines(proc.stdout)
    assert records[-1]["event"] == "done" and records[-1]["prediction"] == job["prediction_out"]
    seg = sitk.ReadImage(job["prediction_out"])
    assert seg.GetMetaData("Segment0_Name") == "organ" and seg.GetMetaData("Segment1_Name") == "spot"


def test_bundled_pretrained_model_loads_and_fine_tunes(synthetic, tmp_path):
    from hssl.finetune import bundled_model_dir

    if not (bundled_model_dir() / "model.json").exists():
        pytest.skip("no pretrained model is bundled")
    model = tmp_path / "m"
    proc = run_cli("finetune", "--image", synthetic["image"], "--labels", synthetic["sparse"], "--out", model,
                   "--init", "bundled", "--steps", "2", "--device", "cpu", "--progress-json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    start = json_lines(proc.stdout)[0]
    assert start["init"] == "bundled"
    # The pretraining normalised every modality it saw the way fine-tuning does: no mismatch note.
    assert "normalisation" not in proc.stderr + proc.stdout
    meta = json.loads((model / "model.json").read_text())
    bundled = json.loads((bundled_model_dir() / "model.json").read_text())
    # The pretrained architecture is kept; only the patch size follows the new volume.
    assert meta["plan"]["channels"] == bundled["plan"]["channels"]
    assert meta["plan"]["kernels"] == bundled["plan"]["kernels"]
