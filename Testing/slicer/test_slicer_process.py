"""Process control with a stub job: progress among log lines, graceful stop, hard kill of the whole
process tree, errors surfaced, hang watchdog, one job at a time, temp folder cleanup."""
import sys
import time

import pytest

from slicer_test_helpers import STUB_JOB
from HSSLSegmentLib.job_protocol import EventType
from HSSLSegmentLib.process import JobAlreadyRunningError, JobProcess, JobState, makeWorkDir, stopActiveJob

psutil = pytest.importorskip("psutil")


def stubJob(mode, tmp_path, **kwargs):
    workDir = makeWorkDir("HSSLSegmentTest-")
    command = [sys.executable, str(STUB_JOB), mode, str(workDir / "STOP"), str(tmp_path / "pids")]
    return JobProcess(command, stopFile=workDir / "STOP", workDir=workDir, **kwargs)


@pytest.fixture(autouse=True)
def noJobLeftBehind():
    yield
    leftover = JobProcess.activeJob()
    if leftover is not None:
        leftover.kill()
        leftover.wait(timeoutS=10)
        pytest.fail("a test left a job running")


def isGone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_progress_events_are_parsed_among_log_lines(tmp_path):
    job = stubJob("progress", tmp_path).start()
    seen = []
    result = job.wait(timeoutS=30, onEvent=seen.append)
    assert result.ok and result.state is JobState.FINISHED and result.exitCode == 0
    progress = [e for e in seen if e.type is EventType.PROGRESS]
    assert [e.step for e in progress] == [1, 2, 3, 4, 5]
    assert progress[0].heldout_dice is None and progress[-1].heldout_dice == pytest.approx(0.5)
    logs = [e.message for e in seen if e.type is EventType.LOG]
    assert "stub job starting (a human log line)" in logs
    assert any(line.startswith("step 3: not json") for line in logs)
    assert any(e.stream == "stderr" and e.message == "warning on stderr" for e in seen)
    assert result.model == "/nowhere/model" and result.device == "cpu" and result.stopped is False
    assert job.lastProgress.step == 5
    job.cleanup()
    assert not job.workDir.exists()


def test_graceful_stop_through_the_stop_file(tmp_path):
    job = stubJob("graceful", tmp_path).start()
    deadline = time.monotonic() + 20
    while job.lastProgress is None and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.02)
    assert job.lastProgress is not None, "the stub never reported progress"
    job.requestStop()
    assert job.state is JobState.STOPPING and job.stopFile.exists()
    result = job.wait(timeoutS=20)
    assert result.ok and result.stopped is True and result.exitCode == 0
    assert result.model == "/nowhere/model"
    job.cleanup()


def test_stop_escalates_to_killing_the_whole_tree(tmp_path):
    job = stubJob("stubborn", tmp_path, stopTimeoutS=1.0).start()
    deadline = time.monotonic() + 20
    while not (tmp_path / "pids").exists() and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    parentPid, grandchildPid = (int(p) for p in (tmp_path / "pids").read_text().split())
    assert set(job.processTreePids()) >= {parentPid, grandchildPid}
    job.requestStop()  # the stub ignores it
    result = job.wait(timeoutS=30)
    assert result.state is JobState.CANCELLED and not result.ok
    assert "did not stop within 1 s" in result.errorMessage
    for pid in (parentPid, grandchildPid):
        deadline = time.monotonic() + 5
        while not isGone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert isGone(pid), f"process {pid} survived the cancel"
    job.cleanup()


def test_hard_cancel_kills_at_once(tmp_path):
    job = stubJob("stubborn", tmp_path).start()
    deadline = time.monotonic() + 20
    while not (tmp_path / "pids").exists() and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    started = time.monotonic()
    job.kill()
    result = job.wait(timeoutS=20)
    assert result.state is JobState.CANCELLED and time.monotonic() - started < 10
    assert all(isGone(pid) for pid in pids)
    job.cleanup()


def test_user_error_message_is_surfaced(tmp_path):
    job = stubJob("fail", tmp_path).start()
    result = job.wait(timeoutS=30)
    assert result.state is JobState.FAILED and result.exitCode == 2
    assert result.errorMessage == "labels have no annotated voxel: paint at least one slice of a segment (input error)"
    job.cleanup()


def test_internal_error_shows_the_last_traceback_line(tmp_path):
    job = stubJob("crash", tmp_path).start()
    result = job.wait(timeoutS=30)
    assert result.state is JobState.FAILED and result.exitCode == 1
    assert "RuntimeError: simulated internal failure" in result.errorMessage
    assert "internal error" in result.errorMessage
    job.cleanup()


def test_hang_watchdog_kills_a_silent_job(tmp_path):
    job = stubJob("hang", tmp_path, hangTimeoutS=1.0).start()
    pid = job.pid
    result = job.wait(timeoutS=30)
    assert result.state is JobState.HUNG
    assert "printed nothing for 1 s" in result.errorMessage
    assert isGone(pid)
    job.cleanup()


def test_one_job_at_a_time_and_shutdown(tmp_path):
    first = stubJob("graceful", tmp_path).start()
    second = stubJob("progress", tmp_path)
    with pytest.raises(JobAlreadyRunningError, match="another HSSLSegment job is running"):
        second.start()
    assert second.state is JobState.NOT_STARTED
    workDir = first.workDir
    result = stopActiveJob(graceS=10)  # what scene close / application exit does
    assert result is not None and result.ok and result.stopped
    assert JobProcess.activeJob() is None and not workDir.exists()
    second.start()  # now allowed
    assert second.wait(timeoutS=30).ok
    second.cleanup()
    assert not second.workDir.exists()


def test_missing_executable_is_a_clear_error(tmp_path):
    job = JobProcess([str(tmp_path / "no-such-python"), "-V"])
    with pytest.raises(OSError):
        job.start()
    assert job.state is JobState.FAILED and "cannot start the job" in job.result.errorMessage
    assert JobProcess.activeJob() is None
