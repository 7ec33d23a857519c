"""job.json writing/validation and JSON-line parsing (stdlib only, no Slicer needed)."""
import json

import pytest

import slicer_test_helpers  # noqa: F401 - puts the module folder on sys.path
from HSSLSegmentLib.job_protocol import (EventType, ExitCode, JobSpec, JobSpecError, Phase, describeProgress,
                                         formatDuration, parseLine)


def spec(tmp_path, **overrides):
    fields = dict(image=str(tmp_path / "image.nrrd"), labels=str(tmp_path / "labels.seg.nrrd"),
                  model_out=str(tmp_path / "model"), stop_file=str(tmp_path / "STOP"))
    fields.update(overrides)
    return JobSpec(**fields)


def test_job_file_round_trip_leaves_out_unset_fields(tmp_path):
    job = spec(tmp_path, segments=["tumour", "liver"], slices=["axial:12", "coronal:40"], steps=3, device="cpu",
               prediction_out=str(tmp_path / "prediction.seg.nrrd"), init="bundled:default")
    path = job.write(tmp_path / "job.json")
    data = json.loads(path.read_text())
    assert data["segments"] == ["tumour", "liver"] and data["steps"] == 3
    assert "time_budget" not in data  # None fields are not written
    assert JobSpec.read(path) == job


@pytest.mark.parametrize("overrides, words", [
    (dict(image="relative/image.nrrd"), "absolute"),
    (dict(device="gpu"), "device"),
    (dict(steps=0), "steps"),
    (dict(steps=True), "steps"),
    (dict(time_budget=-5), "time_budget"),
    (dict(init="my_model"), "init"),
    (dict(segments=["a", "a"]), "twice"),
    (dict(slices=["axial12"]), "axial:12"),
    (dict(labels=None), "labels"),
    (dict(prediction_out="/tmp/out.png"), "prediction_out"),
])
def test_invalid_jobs_are_refused_with_the_field_named(tmp_path, overrides, words):
    with pytest.raises(JobSpecError, match=words):
        spec(tmp_path, **overrides).write(tmp_path / "job.json")
    assert not (tmp_path / "job.json").exists()


def test_unknown_key_is_named(tmp_path):
    data = spec(tmp_path).toDict()
    data["learning_rate"] = 0.1
    with pytest.raises(JobSpecError, match="learning_rate"):
        JobSpec.fromDict(data)


def test_job_keys_are_the_engines(tmp_path):
    """Every key we may write is one the engine's job spec accepts, and we write all it requires."""
    from hssl.jobspec import KEYS, JobSpec as EngineSpec

    ours = set(JobSpec.__dataclass_fields__)
    assert ours <= set(KEYS), ours - set(KEYS)
    written = spec(tmp_path).toDict()
    EngineSpec.from_dict(written)  # the engine reads what we write


def test_progress_parsing_tolerates_interleaved_lines():
    lines = [
        "loading image...\n",
        '{"event": "start", "device": "cpu", "phase": "prepare", "annotated_slices": ["axial:12"], '
        '"labels": [{"name": "tumour", "value": 1, "color": [0.9, 0.2, 0.2]}]}\n',
        '{"event": "progress", "phase": "finetune", "step": 40, "total": 200, "loss": 0.41, '
        '"heldout_dice": 0.72, "eta_s": 55.0, "elapsed_s": 20.1, "device": "cpu"}\n',
        '{"event": "progress", "step": \n',  # truncated
        '{"not_an_event": 1}\n',
        '[1, 2, 3]\n',
        '{"event": "telemetry", "x": 1}\n',  # unknown event type: kept as a log line
        '{"event": "progress", "phase": "warp", "step": "x", "total": null, "loss": NaN}\n',
        '{"event": "done", "stopped": true, "model": "/m", "prediction": null}\n',
        '{"event": "error", "message": "labels have no annotated voxel"}\r\n',
    ]
    events = [parseLine(line) for line in lines]
    kinds = [e.type for e in events]
    assert kinds == [EventType.LOG, EventType.START, EventType.PROGRESS, EventType.LOG, EventType.LOG,
                     EventType.LOG, EventType.LOG, EventType.PROGRESS, EventType.DONE, EventType.ERROR]
    start, progress, odd, done, error = events[1], events[2], events[7], events[8], events[9]
    assert start.annotated_slices == ["axial:12"] and start.labels[0]["name"] == "tumour"
    assert progress.phase is Phase.FINETUNE and progress.step == 40 and progress.total == 200
    assert progress.fraction == pytest.approx(0.2) and progress.heldout_dice == pytest.approx(0.72)
    assert odd.phase is None and odd.step is None and odd.loss is None and odd.fraction is None
    assert done.stopped is True and done.model == "/m" and done.prediction is None
    assert error.message == "labels have no annotated voxel"
    assert events[0].message == "loading image..."
    # stderr lines are never parsed as events, even if they look like JSON
    assert parseLine('{"event": "done"}', stream="stderr").type is EventType.LOG


def test_human_progress_text_and_exit_codes():
    event = parseLine('{"event": "progress", "phase": "finetune", "step": 40, "total": 200, "loss": 0.41, '
                      '"heldout_dice": 0.72, "eta_s": 75, "device": "cuda"}')
    text = describeProgress(event)
    assert text.startswith("Fine-tuning 40/200") and "ETA 1:15" in text and "cuda" in text and "0.72" in text
    assert formatDuration(3700) == "1:01:40" and formatDuration(None) == "?"
    assert ExitCode.describe(2) == "input error" and ExitCode.describe(3) == "out of memory"
    assert ExitCode.describe(-9) == "killed by signal 9" and ExitCode.describe(7) == "exit code 7"
