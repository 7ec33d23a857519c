"""A job whose parent dies: the engine notices within a few seconds (a closed progress pipe, a changed
parent process, or an exited ``parent_pid``), stops gracefully and saves the model it was asked to
write, with ``"stop_reason": "parent-exited"`` in model.json; no traceback or BrokenPipeError noise.

Measured before these changes: ``hssl finetune --progress-json`` under a parent that reads its
stdout, parent SIGKILLed: the engine died of the broken pipe and wrote no model folder.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from engine_helpers import ENGINE
from hssl import lifeline
from test_real_scan import lung_crop  # noqa: F401 - the fixture: a real CT crop with 3 painted slices
from hssl.errors import HSSLError
from hssl.model_store import load_model

pytestmark = pytest.mark.skipif(os.name == "nt", reason="the tests kill processes with POSIX signals")
psutil = pytest.importorskip("psutil")
ENV = dict(os.environ, PYTHONPATH=str(ENGINE))
NOISE = ("Traceback", "BrokenPipeError", "Exception ignored")


def gone_within(pid, seconds):
    """Seconds until process ``pid`` has exited (a zombie counts as exited), or None after ``seconds``."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return time.monotonic() - start
        except psutil.NoSuchProcess:
            return time.monotonic() - start
        time.sleep(0.1)
    return None


def assert_saved_after_parent_exit(model):
    meta = json.loads((model / "model.json").read_text())
    training = meta["training"]
    assert training["stopped"] is True and training["stop_reason"] == "parent-exited", training.get("stop_reason")
    assert training["steps"] >= 1
    load_model(model)  # a complete, valid folder
    assert [p.name for p in model.parent.iterdir() if p.name.startswith(f".{model.name}")] == []


PARENT = textwrap.dedent("""
    # A stand-in for Slicer: start the engine, pass its progress lines on, never exit by itself.
    import subprocess, sys
    child = subprocess.Popen(sys.argv[2:], stdout=subprocess.PIPE, stderr=open(sys.argv[1], "w"), text=True)
    print(child.pid, flush=True)
    for line in child.stdout:
        print(line, end="", flush=True)
    child.wait()
""")


def test_sigkilled_parent_leaves_a_saved_model(lung_crop, tmp_path):
    """The reported scenario on a real CT crop: the parent reads the engine's stdout and is SIGKILLed
    during training; the engine stops, saves the model folder and exits on its own."""
    folder, _ = lung_crop
    model, child_err = tmp_path / "model", tmp_path / "engine.err"
    engine = [sys.executable, "-m", "hssl", "finetune", "--image", str(folder / "image.nrrd"),
              "--labels", str(folder / "sparse.nrrd"), "--out", str(model), "--time-budget", "300",
              "--device", "cpu", "--init", "scratch", "--threads", "1", "--progress-json"]
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(child_err), *engine], stdout=subprocess.PIPE,
                              text=True, env=ENV)
    child = None
    try:
        child = int(parent.stdout.readline())
        steps = 0
        for line in parent.stdout:
            if '"phase": "finetune"' in line:
                steps += 1
                if steps == 3:
                    break
        assert steps == 3, child_err.read_text()[-2000:]
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        took = gone_within(child, 60)
    finally:
        parent.kill()
        if child is not None and gone_within(child, 0) is None:
            os.kill(child, signal.SIGKILL)
    stderr = child_err.read_text()
    assert took is not None, stderr[-2000:]
    assert took < 20, took  # a few steps of 1 thread on a busy 2-core machine, then the save
    assert not any(n in stderr for n in NOISE), stderr[-2000:]
    assert "stdout was closed" in stderr or "parent process" in stderr, stderr[-2000:]
    assert_saved_after_parent_exit(model)


def test_exited_parent_pid_of_a_job_stops_it_and_skips_the_prediction(synthetic, tmp_path):
    """``parent_pid`` in the job file (the Slicer process, behind the PythonSlicer launcher): the job's own
    parent (this test) stays and keeps reading; the named process exits; the job saves, reports and
    makes no prediction (nobody would open it)."""
    slicer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    job = {"image": str(synthetic["image"]), "labels": str(synthetic["sparse"]), "model_out": str(tmp_path / "m"),
           "prediction_out": str(tmp_path / "p.seg.nrrd"), "time_budget": 300, "device": "cpu", "threads": 1,
           "init": "scratch", "parent_pid": slicer.pid}
    (tmp_path / "job.json").write_text(json.dumps(job))
    proc = subprocess.Popen([sys.executable, "-m", "hssl", "job", "--job", str(tmp_path / "job.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        for line in proc.stdout:
            if '"phase": "finetune"' in line:
                slicer.kill()  # not reaped yet: a zombie must count as exited
                break
        out, err = proc.communicate(timeout=60)
    finally:
        slicer.kill()
        slicer.wait()
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert not any(n in err for n in NOISE) and f"parent process {slicer.pid} exited" in err, err[-2000:]
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events][-2:] == ["saved", "done"], events[-3:]
    assert events[-1]["stopped"] is True and events[-1]["prediction"] is None
    assert not (tmp_path / "p.seg.nrrd").exists()
    assert_saved_after_parent_exit(tmp_path / "m")


def test_reader_closing_the_pipe_stops_quietly(synthetic, tmp_path):
    """The reader closes the progress pipe but stays: no BrokenPipeError (at exit either), model saved."""
    model = tmp_path / "m"
    proc = subprocess.Popen([sys.executable, "-m", "hssl", "finetune", "--image", str(synthetic["image"]),
                             "--labels", str(synthetic["sparse"]), "--out", str(model), "--time-budget", "300",
                             "--device", "cpu", "--patch-size", "8,32,32", "--init", "scratch", "--threads", "1",
                             "--progress-json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        for line in proc.stdout:
            if '"phase": "finetune"' in line:
                break
        proc.stdout.close()
        err = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert not any(n in err for n in NOISE) and "stdout was closed" in err, err[-2000:]
    assert_saved_after_parent_exit(model)


WATCHER = textwrap.dedent("""
    # Watch the parent like a job does, without torch; report how soon the loss was seen.
    import sys, time
    from pathlib import Path
    from hssl import lifeline
    report = Path(sys.argv[1])
    lifeline.watch(int(sys.argv[2]) if len(sys.argv) > 2 else None, follow_ppid=True)
    report.write_text("ready")
    while not lifeline.lost():
        time.sleep(0.05)
    report.write_text(f"lost {time.time()}")
""")


def _wait_for(path, text, seconds=30):
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if path.exists() and path.read_text().startswith(text):
            return path.read_text()
        time.sleep(0.05)
    return None


def test_a_changed_parent_process_alone_is_noticed(tmp_path):
    """Only the parent process changes: the watcher's stdout is a pipe whose reader (this test) stays
    open, so no write fails; the re-parenting alone must be seen, within a second or so."""
    report = tmp_path / "report"
    read_end, write_end = os.pipe()
    middle = ("import subprocess, sys, time; "
              f"subprocess.Popen([sys.executable, '-c', {WATCHER!r}, {str(report)!r}], stdout={write_end}); "
              "time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", middle], pass_fds=(write_end,), env=ENV)
    os.close(write_end)
    try:
        assert _wait_for(report, "ready"), "the watcher did not start"
        killed = time.time()
        parent.kill()
        parent.wait()
        seen = _wait_for(report, "lost", seconds=10)
    finally:
        parent.kill()
        os.close(read_end)
    assert seen is not None, "a re-parented watcher did not notice"
    assert float(seen.split()[1]) - killed < 3


def test_an_exited_parent_pid_is_noticed_even_unreaped(tmp_path):
    report = tmp_path / "report"
    named = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    watcher = subprocess.Popen([sys.executable, "-c", WATCHER, str(report), str(named.pid)], env=ENV,
                               stdout=subprocess.DEVNULL)
    try:
        assert _wait_for(report, "ready"), "the watcher did not start"
        killed = time.time()
        named.kill()  # left unreaped until the end: a zombie
        seen = _wait_for(report, "lost", seconds=10)
    finally:
        named.kill()
        named.wait()
        watcher.kill()
        watcher.wait()
    assert seen is not None and float(seen.split()[1]) - killed < 3


def test_a_parent_pid_that_is_not_running_is_refused():
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    for pid, message in ((done.pid, "is not running"), (-3, "positive integer"), ("123", "positive integer")):
        with pytest.raises(HSSLError, match=message):
            lifeline.watch(pid)


def test_stop_reasons_reach_model_json(synthetic, tmp_path, monkeypatch):
    """Each kind of graceful stop is recorded: the stop file, a signal, the parent gone (in-process)."""
    from hssl.finetune import FinetuneOptions
    from hssl.progress import Progress
    from hssl.workflow import run_finetune

    stop_file = tmp_path / "STOP"
    triggers = {"stop-file": lambda: stop_file.touch(),
                "signal": lambda: os.kill(os.getpid(), signal.SIGTERM),
                "parent-exited": lambda: lifeline._lose("a test stand-in for the parent exited")}

    class StopAtStep(Progress):
        def update(self, phase, step, total, **fields):
            super().update(phase, step, total, **fields)
            if phase == "finetune" and step == 1:
                self.trigger()

    for reason, trigger in triggers.items():
        monkeypatch.setattr(lifeline, "_state", lifeline._State())
        stop_file.unlink(missing_ok=True)
        progress = StopAtStep(bar=False)
        progress.trigger = trigger
        opts = FinetuneOptions(steps=50, device="cpu", patch_size=(8, 32, 32), init="scratch",
                               stop_file=str(stop_file))
        result = run_finetune(str(synthetic["image"]), str(synthetic["sparse"]), str(tmp_path / reason), opts,
                              progress)
        training = json.loads((tmp_path / reason / "model.json").read_text())["training"]
        assert result.stopped and result.steps < 50
        assert (training["stopped"], training["stop_reason"]) == (True, reason)
    monkeypatch.setattr(lifeline, "_state", lifeline._State())
    opts = FinetuneOptions(steps=1, device="cpu", patch_size=(8, 32, 32), init="scratch")
    run_finetune(str(synthetic["image"]), str(synthetic["sparse"]), str(tmp_path / "full"), opts, Progress(bar=False))
    training = json.loads((tmp_path / "full" / "model.json").read_text())["training"]
    assert (training["stopped"], training["stop_reason"]) == (False, None)


def test_progress_on_a_closed_pipe_goes_quiet_and_counts_the_parent_gone(monkeypatch):
    from hssl.progress import Progress

    monkeypatch.setattr(lifeline, "_state", lifeline._State())
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    os.close(read_end)
    progress = Progress(json_lines=True, bar=False, stream=stream)
    progress.event("start")  # EPIPE: swallowed, the stream is pointed at the null device
    progress.event("progress", step=1)
    assert lifeline.lost() == "parent-exited" and progress.json_lines is False
    stream.write("flushes now succeed\n")
    stream.flush()
    stream.close()
