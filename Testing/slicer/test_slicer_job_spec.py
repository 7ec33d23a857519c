"""The job spec (hssl.jobspec) both sides import, its documentation, and the engine's job runner
(hssl.job) for the three kinds: a predict job with the annotation gives exactly the prediction
that fine-tuning made, a stop file ends a prediction with nothing written, the device kind reports
the device. The runner tests need torch and MONAI."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from slicer_test_helpers import MODULE_DIR, REPO, ballVolume, engineAvailable, engineEnvironment, sparse

from hssl.jobspec import KEYS, KINDS, JobSpec, JobSpecError, markdown_table

DOC = REPO / "docs" / "job-protocol.md"


def finetuneSpec(tmp_path, **overrides):
    fields = dict(image=str(tmp_path / "image.nrrd"), labels=str(tmp_path / "labels.seg.nrrd"),
                  model_out=str(tmp_path / "model"), stop_file=str(tmp_path / "STOP"))
    fields.update(overrides)
    return JobSpec(**fields)


def test_round_trip_writes_only_the_keys_of_the_kind(tmp_path):
    job = finetuneSpec(tmp_path, segments=["tumour", "liver"], slices=["axial:12", "coronal:40"], steps=3,
                       device="cpu", prediction_out=str(tmp_path / "prediction.seg.nrrd"), init="bundled:dense",
                       parent_pid=4242)
    path = job.write(tmp_path / "job.json")
    data = json.loads(path.read_text())
    assert data["segments"] == ["tumour", "liver"] and data["steps"] == 3 and data["parent_pid"] == 4242
    assert "time_budget" not in data and "model" not in data and "annotation" not in data
    assert data["init"] == "bundled:dense" and data["kind"] == "finetune"
    assert JobSpec.read(path) == job
    assert not list(tmp_path.glob(".job.json*")), "the temporary file is renamed into place"
    assert JobSpec(kind="finetune").init == "auto"  # the engine's default start, as on the command line
    assert finetuneSpec(tmp_path).time_budget_s() == 150 and finetuneSpec(tmp_path, steps=3).time_budget_s() is None


@pytest.mark.parametrize("overrides, words", [
    (dict(image="relative/image.nrrd"), "absolute"),
    (dict(device="gpu"), "'device' must be one of auto, cpu, cuda, mps"),
    (dict(steps=0), "'steps' must be at least 1"),
    (dict(steps=True), "'steps' must be an integer"),
    (dict(time_budget=-5), "'time_budget' must be a positive number"),
    (dict(time_budget=float("nan")), "'time_budget' must be a positive number"),
    (dict(init="my_model"), "'init' must be auto, scratch"),
    (dict(init="bundled:../x"), "not a bundled model name"),
    (dict(segments=["a", "a"]), "twice"),
    (dict(segments="tumour"), "'segments' must be a list"),
    (dict(labels=None), "needs the key 'labels'"),
    (dict(model="/models/m"), "'model' is not used by a finetune job"),
    (dict(kind="train"), "'kind' must be one of finetune, predict, device"),
    (dict(roi="yes"), "'roi' must be true or false"),
    (dict(parent_pid=0), "'parent_pid' must be at least 1"),
    (dict(modality="pet"), "'modality' must be one of auto, ct, mr"),
])
def test_invalid_jobs_are_refused_with_the_key_named(tmp_path, overrides, words):
    with pytest.raises(JobSpecError, match=re.escape(words)):
        finetuneSpec(tmp_path, **overrides).write(tmp_path / "job.json")
    assert not (tmp_path / "job.json").exists()


def test_predict_and_device_kinds_need_their_keys(tmp_path):
    predict = JobSpec(kind="predict", model=str(tmp_path / "m"), image=str(tmp_path / "i.nrrd"),
                      prediction_out=str(tmp_path / "p.seg.nrrd"), annotation=str(tmp_path / "a.seg.nrrd"))
    assert predict.validate().to_dict()["annotation"].endswith("a.seg.nrrd")
    with pytest.raises(JobSpecError, match="a predict job needs the key 'prediction_out'"):
        JobSpec(kind="predict", model=str(tmp_path / "m"), image=str(tmp_path / "i.nrrd")).validate()
    with pytest.raises(JobSpecError, match="'labels' is not used by a predict job"):
        JobSpec.from_dict({**predict.to_dict(), "labels": str(tmp_path / "l.nrrd")})
    assert JobSpec(kind="device", device="cpu").validate().to_dict() == {"kind": "device", "device": "cpu"}
    with pytest.raises(JobSpecError, match="unknown key 'learning_rate'"):
        JobSpec.from_dict({"kind": "device", "learning_rate": 0.1})


def test_job_protocol_doc_lists_exactly_the_spec_keys():
    """docs/job-protocol.md holds the table generated from the spec, and its examples use only
    keys the spec knows, each under the kind that accepts it."""
    text = DOC.read_text(encoding="utf-8")
    assert markdown_table() in text, ("docs/job-protocol.md's key table differs from the spec: paste the output "
                                      "of `PYTHONPATH=HSSLSegment python -m hssl.jobspec`")
    documented = re.findall(r"^\| `(\w+)` \|", text, flags=re.M)
    assert documented == list(KEYS)
    examples = re.findall(r"```json\n(\{\n.*?\n\})\n```", text, flags=re.S)
    assert len(examples) >= len(KINDS)
    for example in examples:
        data = json.loads(re.sub(r"\s+//[^\n]*", "", example))
        JobSpec.from_dict(data)  # every example is a valid job
    assert {json.loads(re.sub(r"\s+//[^\n]*", "", e)).get("kind", "finetune") for e in examples} == set(KINDS)


def test_both_sides_import_the_one_spec():
    from HSSLSegmentLib import job_protocol

    assert job_protocol.JobSpec is JobSpec and job_protocol.JobSpecError is JobSpecError
    engineJob = (MODULE_DIR / "hssl" / "job.py").read_text()
    assert "from .jobspec import" in engineJob and "KEYS = {" not in engineJob
    ours = (MODULE_DIR / "HSSLSegmentLib" / "job_protocol.py").read_text()
    assert "class JobSpec" not in ours


# ---------------------------------------------------------------------------------- the runner

needsEngine = pytest.mark.skipif(not engineAvailable(), reason="the engine needs torch and MONAI")


def runJob(tmp_path, spec, name="job.json", timeout=300):
    path = spec.write(tmp_path / name)
    done = subprocess.run([sys.executable, "-m", "hssl", "job", "--job", str(path)], capture_output=True, text=True,
                          env=engineEnvironment(), timeout=timeout)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    return done, events


@pytest.fixture
def files(tmp_path):
    """A ball volume with two labels painted on three axial slices, as NRRD files."""
    sitk = pytest.importorskip("SimpleITK")
    image, ball = ballVolume((16, 24, 28))
    bar = np.zeros_like(ball)
    bar[:, 2:4, 3:9] = True
    labels = sparse(ball, 0, [5, 8, 11]).astype(np.uint8)
    labels[sparse(bar, 0, [5, 8, 11])] = 2
    paths = {}
    for name, array in (("image", image), ("labels", labels)):
        itk = sitk.GetImageFromArray(array)
        itk.SetSpacing((0.8, 0.7, 2.0))
        itk.SetOrigin((12.0, -30.0, 5.0))
        paths[name] = tmp_path / f"{name}.nrrd"
        sitk.WriteImage(itk, str(paths[name]))
    return paths


@needsEngine
def test_predict_job_with_the_annotation_equals_the_fine_tuning_prediction(tmp_path, files):
    sitk = pytest.importorskip("SimpleITK")
    model, first, second = tmp_path / "model", tmp_path / "first.seg.nrrd", tmp_path / "second.seg.nrrd"
    done, events = runJob(tmp_path, JobSpec(
        image=str(files["image"]), labels=str(files["labels"]), model_out=str(model), prediction_out=str(first),
        names="1=ball,2=bar", init="scratch", steps=3, device="cpu", slices=["axial:5,8,11", "axial:2"]))
    assert done.returncode == 0, done.stderr[-2000:]
    assert events[-1]["event"] == "done" and events[-1]["prediction"] == str(first)
    done, events = runJob(tmp_path, JobSpec(
        kind="predict", model=str(model), image=str(files["image"]), annotation=str(files["labels"]),
        slices=["axial:5,8,11", "axial:2"], prediction_out=str(second), device="cpu"), name="predict.json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert [e["event"] for e in events][-2:] == ["prediction", "done"] and events[-1]["stopped"] is False
    a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in (first, second))
    assert a.shape == b.shape and a.any()
    np.testing.assert_array_equal(a, b)
    # without the annotation (a model applied to another scan): the whole volume, not post-processed
    whole = tmp_path / "whole.seg.nrrd"
    done, _events = runJob(tmp_path, JobSpec(kind="predict", model=str(model), image=str(files["image"]),
                                             prediction_out=str(whole), device="cpu"), name="whole.json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert whole.exists()


@needsEngine
def test_stop_file_ends_a_prediction_with_nothing_written_and_device_kind(tmp_path, files):
    model = tmp_path / "model"
    done, _ = runJob(tmp_path, JobSpec(image=str(files["image"]), labels=str(files["labels"]),
                                       model_out=str(model), init="scratch", steps=1, device="cpu"))
    assert done.returncode == 0, done.stderr[-2000:]
    stop = tmp_path / "STOP"
    stop.touch()
    out = tmp_path / "p.seg.nrrd"
    done, events = runJob(tmp_path, JobSpec(kind="predict", model=str(model), image=str(files["image"]),
                                            prediction_out=str(out), stop_file=str(stop), device="cpu"),
                          name="predict.json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert events[-1] == {"event": "done", "stopped": True, "prediction": None}
    assert not out.exists() and not list(tmp_path.glob(".p.seg.nrrd*"))
    done, events = runJob(tmp_path, JobSpec(kind="device", device="cpu"), name="device.json")
    assert done.returncode == 0 and events[-1]["device"] == "cpu" and events[-1]["event"] == "done"
    # bad jobs end in one line naming the key
    (tmp_path / "bad.json").write_text(json.dumps({"kind": "predict", "image": str(files["image"])}))
    bad = subprocess.run([sys.executable, "-m", "hssl", "job", "--job", str(tmp_path / "bad.json")],
                         capture_output=True, text=True, env=engineEnvironment(), timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: a predict job needs the key 'model'")
    assert "Traceback" not in bad.stderr
