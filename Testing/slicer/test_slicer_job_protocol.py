"""JSON-line parsing, progress text and exit codes of the job protocol (stdlib only, no Slicer
needed). job.json itself is the engine's hssl.jobspec: test_slicer_job_spec.py."""
import pytest

from HSSLSegmentLib.job_protocol import EventType, ExitCode, Phase, describeProgress, formatDuration, parseLine


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


def test_final_step_event_is_parsed_and_described_with_its_warning():
    from HSSLSegmentLib.job_protocol import EventType, describeFinalStep, parseLine

    line = ('{"event": "final_step", "chosen": "network+grow", "seconds": 3.2, "heldout_dice": '
            '{"network": {"caudate": 0.4, "putamen": 0.6}, "network+grow": {"caudate": 0.7, "putamen": 0.8}, '
            '"grow": {"caudate": 0.5}}, "poor_segments": ["pallidum"]}')
    event = parseLine(line)
    assert event.type is EventType.FINAL_STEP
    lines = describeFinalStep(event)
    assert lines[0] == "Final step: network+grow (held-out Dice: network 0.50, network+grow 0.75, grow 0.50)"
    assert "pallidum" in lines[1] and len(lines) == 2
    assert describeFinalStep(parseLine('{"event": "final_step", "chosen": "network"}')) == ["Final step: network"]
