"""Process control for background jobs: start, read progress, stop gracefully, kill the whole tree.

Threading model: two reader threads (stdout, stderr) only push raw lines into a queue; everything
else (parsing, state changes, callbacks, the hang watchdog) happens in :meth:`JobProcess.poll`,
which the caller runs on its own thread - in Slicer the main thread through a ``qt.QTimer``, in a
headless script or a test through :meth:`JobProcess.wait`. No Qt object is ever touched here.

Stopping: :meth:`JobProcess.requestStop` creates the job's stop file (the engine finishes its
step, saves the model and exits 0); if the job is still running ``stopTimeoutS`` later, the whole
process tree is killed. ``PythonSlicer`` is a launcher, so the engine is a grandchild of the process
we start: killing only the direct child would leave the engine running.

A stop the user asked for (:meth:`JobProcess.requestStop`, :meth:`JobProcess.kill`) ends as
``CANCELLED`` whatever exit code the job then returns, never as ``FAILED``; a job that stops
gracefully and exits 0 ends as ``FINISHED`` with ``stopped`` set (its model was saved).

Stdlib only at module level. ``psutil`` is used when present; Slicer does not ship it (it is not
among the Python packages of Slicer's SuperBuild), so without it the POSIX process group (the job
runs in its own session) or Windows' ``taskkill /T`` does the tree kill. Nothing started here opens
a console window on Windows (``CREATE_NO_WINDOW``).
"""
from __future__ import annotations

import atexit
import collections
import dataclasses
import enum
import logging
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, ClassVar, Mapping, Sequence

from .job_protocol import EventType, ExitCode, JobEvent, parseLine

log = logging.getLogger(__name__)


# Windows: a child of a GUI program gets no console window (a console program would flash one).
NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0)


class JobAlreadyRunningError(RuntimeError):
    """A second job was started while one is running (one job at a time)."""


class JobState(str, enum.Enum):
    NOT_STARTED = "not started"
    RUNNING = "running"
    STOPPING = "stopping"  # graceful stop requested, waiting for the job to save and exit
    FINISHED = "finished"  # exit code 0 (also after a graceful stop)
    FAILED = "failed"  # non-zero exit code
    CANCELLED = "cancelled"  # killed on request
    HUNG = "hung"  # killed by the watchdog: no output for hangTimeoutS

    @property
    def isActive(self) -> bool:
        return self in (JobState.RUNNING, JobState.STOPPING)


@dataclasses.dataclass
class JobResult:
    """Outcome of a finished job. ``errorMessage`` is one line, fit for a message box."""

    state: JobState
    exitCode: int | None
    errorMessage: str | None = None
    stopped: bool = False  # the job stopped early on request (model saved, exit 0)
    model: str | None = None
    prediction: str | None = None
    device: str | None = None
    durationS: float = 0.0
    detail: str | None = None  # the done event's message (e.g. the device check's "cuda (NVIDIA ...)")

    @property
    def ok(self) -> bool:
        return self.state is JobState.FINISHED and self.exitCode == 0


def makeWorkDir(prefix: str = "HSSLSegment-") -> Path:
    """A fresh private temporary folder for one job's files (system temp location)."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def killProcessTree(pid: int, processGroup: int | None = None, timeoutS: float = 5.0) -> list[int]:
    """Kill ``pid`` and all its descendants (SIGKILL / TerminateProcess). Returns the killed pids.

    Children are listed before anything is killed, so none is lost by being re-parented.
    """
    killed: list[int] = []
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            parent = psutil.Process(pid)
            procs = parent.children(recursive=True) + [parent]
        except psutil.NoSuchProcess:
            procs = []
        for proc in procs:
            try:
                proc.kill()
                killed.append(proc.pid)
            except psutil.NoSuchProcess:
                pass
            except psutil.AccessDenied:
                log.warning("cannot kill process %d (access denied)", proc.pid)
        psutil.wait_procs(procs, timeout=timeoutS)
    if os.name == "posix" and processGroup is not None:
        # Catches descendants psutil could not see (e.g. double-forked into our session).
        try:
            os.killpg(processGroup, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    elif os.name == "nt" and psutil is None:
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(pid)], capture_output=True, check=False,
                       creationflags=NO_WINDOW)
        killed.append(pid)
    return killed


class JobProcess:
    """One background job: a child process that prints JSON-line events (docs/job-protocol.md).

    Usage (headless)::

        job = JobProcess([sys.executable, "-m", "hssl", "job", "--job", str(jobFile)],
                         stopFile=stopFile, workDir=workDir)
        job.start()
        result = job.wait(onEvent=print)

    In Slicer, call :meth:`poll` from a timer instead of :meth:`wait`. Only one job runs at a time
    in a process; starting a second raises :class:`JobAlreadyRunningError`.
    """

    _active: ClassVar["JobProcess | None"] = None
    _activeLock: ClassVar[threading.Lock] = threading.Lock()
    _atexitRegistered: ClassVar[bool] = False

    def __init__(self, command: Sequence[str], env: Mapping[str, str] | None = None,
                 cwd: str | os.PathLike | None = None, stopFile: str | os.PathLike | None = None,
                 hangTimeoutS: float | None = 600.0, stopTimeoutS: float = 30.0,
                 workDir: str | os.PathLike | None = None, removeWorkDir: bool = True,
                 logLines: int = 5000):
        self.command = [str(c) for c in command]
        self.env = dict(env) if env is not None else None
        self.cwd = str(cwd) if cwd is not None else None
        self.stopFile = Path(stopFile) if stopFile is not None else None
        self.hangTimeoutS = hangTimeoutS
        self.stopTimeoutS = stopTimeoutS
        self.workDir = Path(workDir) if workDir is not None else None
        self.removeWorkDir = removeWorkDir
        self.state = JobState.NOT_STARTED
        self.events: list[JobEvent] = []  # every protocol event (no log lines)
        self.logTail: collections.deque[str] = collections.deque(maxlen=logLines)
        self.lastProgress: JobEvent | None = None
        self.result: JobResult | None = None
        self._popen: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._readers: list[threading.Thread] = []
        self._startTime = 0.0
        self._lastOutputTime = 0.0
        self._stopRequestedTime: float | None = None
        self._userStopped = False  # the user asked for a stop or a kill: never reported as a failure
        self._exitSeenTime: float | None = None
        self._killedBy: JobState | None = None
        self._killMessage: str | None = None
        self._stderrError: str | None = None
        self._stderrLast: str | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def isRunning(self) -> bool:
        return self.state.isActive

    @classmethod
    def activeJob(cls) -> "JobProcess | None":
        with cls._activeLock:
            return cls._active if cls._active is not None and cls._active.isRunning else None

    def start(self) -> "JobProcess":
        """Start the child process. Raises :class:`JobAlreadyRunningError` if a job is running."""
        if self.state is not JobState.NOT_STARTED:
            raise RuntimeError("a JobProcess can be started only once; create a new one")
        with JobProcess._activeLock:
            other = JobProcess._active
            if other is not None and other.isRunning:
                raise JobAlreadyRunningError(
                    f"another HSSLSegment job is running (pid {other.pid}): cancel it or wait until it "
                    "finishes")
            env = dict(os.environ if self.env is None else self.env)
            env["PYTHONUNBUFFERED"] = "1"  # progress lines must arrive as they are printed
            env.setdefault("PYTHONIOENCODING", "utf-8")
            kwargs: dict = {}
            if os.name == "posix":
                kwargs["start_new_session"] = True  # own process group, so the tree can be killed
            elif os.name == "nt":
                kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | NO_WINDOW
            if self.stopFile is not None and self.stopFile.exists():
                self.stopFile.unlink()
            try:
                self._popen = subprocess.Popen(
                    self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    cwd=self.cwd, env=env, text=True, encoding="utf-8", errors="replace", bufsize=1,
                    **kwargs)
            except OSError as err:
                self.state = JobState.FAILED
                self.result = JobResult(JobState.FAILED, None,
                                        f"cannot start the job ({self.command[0]}): {err.strerror or err}")
                raise
            JobProcess._active = self
            if not JobProcess._atexitRegistered:
                atexit.register(stopActiveJob, 2.0)
                JobProcess._atexitRegistered = True
        self.state = JobState.RUNNING
        self._startTime = self._lastOutputTime = time.monotonic()
        for name, stream in (("stdout", self._popen.stdout), ("stderr", self._popen.stderr)):
            thread = threading.Thread(target=self._readStream, args=(name, stream),
                                      name=f"HSSLSegment-{name}-reader", daemon=True)
            thread.start()
            self._readers.append(thread)
        log.info("started job pid %d: %s", self._popen.pid, " ".join(self.command))
        return self

    def _readStream(self, name: str, stream) -> None:
        # Worker thread: only reads and queues, so the main thread never blocks on the pipe.
        try:
            for line in iter(stream.readline, ""):
                self._queue.put((name, line))
        except (OSError, ValueError):
            pass
        finally:
            try:
                stream.close()
            except OSError:
                pass

    # ------------------------------------------------------------------ main-thread polling

    def poll(self) -> list[JobEvent]:
        """Drain new output, apply the watchdog and stop timeouts, detect the end. Main thread only.

        Returns the new events (log lines included, as ``EventType.LOG``) in arrival order. When the
        job has ended, :attr:`result` is set and :attr:`state` is final.
        """
        new: list[JobEvent] = []
        while True:
            try:
                stream, line = self._queue.get_nowait()
            except queue.Empty:
                break
            self._lastOutputTime = time.monotonic()
            event = parseLine(line, stream)
            self._record(event)
            new.append(event)
        if not self.isRunning or self._popen is None:
            return new
        now = time.monotonic()
        exited = self._popen.poll() is not None
        readersDone = not any(t.is_alive() for t in self._readers)
        if exited:
            if self._exitSeenTime is None:
                self._exitSeenTime = now
            if not readersDone and now - self._exitSeenTime > 2.0:
                # The job exited but a descendant still holds the pipes open: it is an orphan.
                killProcessTree(self._popen.pid, self._processGroup())
                for t in self._readers:
                    t.join(timeout=1.0)
                readersDone = True
            if readersDone and self._queue.empty():
                self._finish()
            return new
        if self.state is JobState.STOPPING and self._stopRequestedTime is not None \
                and now - self._stopRequestedTime > self.stopTimeoutS:
            self._kill(JobState.CANCELLED,
                       f"the job did not stop within {self.stopTimeoutS:.0f} s and was killed")
        elif self.state is JobState.RUNNING and self.hangTimeoutS is not None \
                and now - self._lastOutputTime > self.hangTimeoutS:
            self._kill(JobState.HUNG, f"the job printed nothing for {self.hangTimeoutS:.0f} s and was "
                                      "stopped (it seemed to hang); see the log")
        return new

    def _record(self, event: JobEvent) -> None:
        if event.type is EventType.LOG:
            self.logTail.append(event.message or "")
            if event.stream == "stderr" and event.message and event.message.strip():
                text = event.message.strip()
                self._stderrLast = text
                if text.lower().startswith("error:"):
                    self._stderrError = text[len("error:"):].strip()
            return
        self.events.append(event)
        if event.type is EventType.PROGRESS:
            self.lastProgress = event

    def _processGroup(self) -> int | None:
        # start_new_session makes the child the leader of a group whose id is its pid.
        return self._popen.pid if (os.name == "posix" and self._popen is not None) else None

    def _kill(self, state: JobState, message: str) -> None:
        self._killedBy = state
        self._killMessage = message
        log.warning("%s", message)
        if self._popen is not None:
            killProcessTree(self._popen.pid, self._processGroup())
            try:
                self._popen.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                log.error("job pid %d survived SIGKILL", self._popen.pid)

    def _finish(self) -> None:
        code = self._popen.returncode if self._popen is not None else None
        done = next((e for e in reversed(self.events) if e.type is EventType.DONE), None)
        errorEvent = next((e for e in reversed(self.events) if e.type is EventType.ERROR), None)
        start = next((e for e in self.events if e.type is EventType.START), None)
        saved = next((e for e in reversed(self.events) if e.type is EventType.SAVED), None)
        predicted = next((e for e in reversed(self.events) if e.type is EventType.PREDICTION), None)
        message = None
        if self._killedBy is not None:
            state = self._killedBy
            message = self._killMessage
        elif code == 0:
            state = JobState.FINISHED
        elif self._userStopped:
            state = JobState.CANCELLED
            message = f"stopped on request ({ExitCode.describe(code)})"
        else:
            state = JobState.FAILED
            detail = (errorEvent.message if errorEvent and errorEvent.message else None) \
                or self._stderrError or self._stderrLast
            meaning = ExitCode.describe(code)
            message = f"{detail} ({meaning})" if detail else f"the job ended with {meaning}; see the log"
        device = (self.lastProgress.device if self.lastProgress else None) or (start.device if start else None) \
            or (done.device if done else None)
        self.result = JobResult(
            state=state, exitCode=code, errorMessage=message,
            stopped=bool(done.stopped) if done else state is JobState.CANCELLED,
            model=(done.model if done and done.model else (saved.model if saved else None)),
            prediction=(done.prediction if done and done.prediction else (predicted.path if predicted else None)),
            device=device, durationS=time.monotonic() - self._startTime,
            detail=done.message if done and done.message else None)
        self.state = state
        with JobProcess._activeLock:
            if JobProcess._active is self:
                JobProcess._active = None
        log.info("job pid %s %s (%s)", self.pid, state.value, ExitCode.describe(code))

    # ------------------------------------------------------------------ control

    def requestStop(self) -> None:
        """Ask the job to stop gracefully (it saves its model); escalates to a kill after stopTimeoutS.

        Without a stop file: SIGINT on POSIX; on Windows a kill at once, since a console control
        event cannot reach a child started without a console (``CREATE_NO_WINDOW``)."""
        if not self.isRunning:
            return
        self._userStopped = True
        if self.stopFile is None and os.name == "nt":
            self.kill()
            return
        if self.stopFile is not None:
            try:
                self.stopFile.parent.mkdir(parents=True, exist_ok=True)
                self.stopFile.touch()
            except OSError as err:
                log.warning("cannot create the stop file %s (%s): killing the job", self.stopFile, err)
                self.kill()
                return
        elif self._popen is not None:
            try:
                self._popen.send_signal(signal.SIGINT)
            except (OSError, ValueError):
                pass
        if self.state is JobState.RUNNING:
            self.state = JobState.STOPPING
            self._stopRequestedTime = time.monotonic()

    def kill(self, message: str = "the job was cancelled") -> None:
        """Hard cancel now: kill the whole process tree. The next :meth:`poll` finishes the job."""
        if self.isRunning:
            self._userStopped = True
            self._kill(JobState.CANCELLED, message)

    def wait(self, timeoutS: float | None = None, pollIntervalS: float = 0.05,
             onEvent: Callable[[JobEvent], None] | None = None,
             idle: Callable[[], None] | None = None) -> JobResult:
        """Poll until the job ends (blocking; for headless use and tests).

        ``onEvent`` receives every event; ``idle`` runs between polls (e.g. ``slicer.app.processEvents``).
        On ``timeoutS`` the job is killed and the result is CANCELLED.
        """
        deadline = None if timeoutS is None else time.monotonic() + timeoutS
        while True:
            for event in self.poll():
                if onEvent is not None:
                    onEvent(event)
            if self.result is not None and not self.isRunning:
                return self.result
            if deadline is not None and time.monotonic() > deadline:
                self.kill(f"the job did not finish within {timeoutS:.0f} s and was killed")
                deadline = None
            if idle is not None:
                idle()
            time.sleep(pollIntervalS)

    def shutdown(self, graceS: float = 5.0) -> JobResult | None:
        """Stop the job (graceful for up to ``graceS``, then kill) and clean up. For scene close/app exit."""
        if self.isRunning:
            self.requestStop()
            self.stopTimeoutS = min(self.stopTimeoutS, graceS)
            try:
                self.wait(timeoutS=graceS + 10.0)
            except Exception:  # noqa: BLE001 - shutting down: never raise from here
                log.exception("error while stopping the job")
                self.kill()
        self.cleanup()
        return self.result

    def cleanup(self) -> None:
        """Remove the job's temporary folder (when it owns one and is not running)."""
        if self.isRunning or self.workDir is None or not self.removeWorkDir:
            return
        shutil.rmtree(self.workDir, ignore_errors=True)

    def processTreePids(self) -> list[int]:
        """Pids of the started process and its live descendants (needs psutil; [] without it)."""
        if self._popen is None:
            return []
        try:
            import psutil
            parent = psutil.Process(self._popen.pid)
            return [parent.pid] + [p.pid for p in parent.children(recursive=True)]
        except Exception:  # noqa: BLE001 - psutil missing or the process is gone
            return []


def stopActiveJob(graceS: float = 5.0) -> JobResult | None:
    """Stop the running job of this process, if any (scene close, application exit)."""
    job = JobProcess.activeJob()
    if job is None:
        return None
    return job.shutdown(graceS)
