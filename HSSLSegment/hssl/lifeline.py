"""Noticing that the program waiting for a job is gone, so that the job stops and keeps its work.

A fine-tuning started by the Slicer module (or by any program that reads ``--progress-json``)
reports to that program; once it is gone, nobody will read the progress or load the result, and
a job that goes on holds the CPU or GPU unseen. Any one of three signs counts as the parent gone:

1. the progress stream is closed: a write to stdout (or stderr) fails with a broken pipe
   (``hssl.progress.Progress`` calls :func:`stream_closed`; that stream is then pointed at the null
   device, so neither later writes nor Python's flush at exit print a ``BrokenPipeError``);
2. the parent process changed: ``os.getppid()`` differs from its value at start (on Linux and
   macOS an orphan is re-parented to init or a subreaper). Only watched while stdout is a pipe,
   that is while the parent reads it: a run under ``nohup`` writes to a file and must go on;
3. a named process exited: the job file's ``parent_pid`` or ``--parent-pid`` (the Slicer process:
   Slicer starts the engine through its PythonSlicer launcher, which may outlive Slicer).

A daemon thread checks 2 and 3 every ``POLL_S`` seconds. ``hssl.finetune.StopRequest`` asks
:func:`lost` once per training step and then stops gracefully: the model trained so far is saved
atomically to the folder the job was asked to write, with ``"stop_reason": "parent-exited"`` in
model.json's ``training`` section (:func:`note_stop` records the reason of every stop).

Windows: ``os.getppid()`` does not change when the parent exits there, so only 1 and 3 apply;
3 uses psutil when installed (Slicer bundles it), else the Win32 process handle.

Stdlib only (psutil when present).
"""
from __future__ import annotations

import errno
import os
import stat
import sys
import threading
import time
from typing import Callable

from .errors import HSSLError

POLL_S = 0.5
PARENT_EXITED = "parent-exited"


class _State:
    def __init__(self):
        self.lost: str | None = None  # what showed that the parent is gone, for the log
        self.thread: threading.Thread | None = None
        self.stop_reason: str | None = None


_state = _State()


def watch(parent_pid: int | None = None, follow_ppid: bool = True) -> None:
    """Start watching the parent (once per process): ``parent_pid`` when given, and the direct parent
    when ``follow_ppid`` and stdout is a pipe. Raises :class:`HSSLError` for a ``parent_pid`` that is not
    a running process."""
    probe = None
    if parent_pid is not None:
        if isinstance(parent_pid, bool) or not isinstance(parent_pid, int) or parent_pid <= 0:
            raise HSSLError(f"the parent process id {parent_pid!r} must be a positive integer: give the process "
                            "id of the program that waits for this job (job file parent_pid or --parent-pid)")
        probe = process_probe(parent_pid)
        if not probe():
            raise HSSLError(f"the parent process {parent_pid} is not running: give the process id of the running "
                            "program that waits for this job (job file parent_pid or --parent-pid), or leave it out")
    ppid = os.getppid() if follow_ppid and os.name != "nt" and _is_pipe(sys.stdout) else None
    if (probe is None and ppid is None) or _state.thread is not None:
        return
    _state.thread = threading.Thread(target=_poll, args=(ppid, parent_pid, probe), name="hssl-lifeline",
                                     daemon=True)
    _state.thread.start()


def lost() -> str | None:
    """``"parent-exited"`` once the parent is known to be gone, else None."""
    return PARENT_EXITED if _state.lost else None


def stream_closed(stream) -> None:
    """``stream`` (stdout or stderr) hit a broken pipe: its reader is gone. Point it at the null device,
    so that later writes and the flush at exit succeed silently, and count the parent as gone."""
    silence(stream)
    name = getattr(stream, "name", None)
    _lose(f"{name.strip('<>') if isinstance(name, str) else 'the output stream'} was closed by its reader")


def note_stop(reason: str | None) -> None:
    """Record why the current training stopped early (None: it has not); read by the model writer."""
    _state.stop_reason = reason


def stop_reason() -> str | None:
    return _state.stop_reason


def is_broken_pipe(err: BaseException) -> bool:
    """A write to a pipe whose reader has gone (EPIPE; Windows reports EINVAL on such a flush)."""
    return isinstance(err, OSError) and (isinstance(err, BrokenPipeError) or err.errno == errno.EPIPE
                                         or (os.name == "nt" and err.errno == errno.EINVAL))


def silence(stream) -> None:
    """Redirect ``stream``'s file descriptor to the null device (no-op for streams without one)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def process_probe(pid: int) -> Callable[[], bool]:
    """A function telling whether process ``pid`` still runs. psutil and the Windows handle are bound
    to the process found now, so a later process that reuses the id is not mistaken for it."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            process = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return lambda: False

        def alive() -> bool:
            try:
                return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False
            except psutil.AccessDenied:
                return True
        return alive
    if os.name == "nt":
        return _windows_probe(pid)

    def alive() -> bool:
        try:
            os.kill(pid, 0)  # signal 0: only checks that the process exists
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not _is_zombie(pid)
    return alive


def _windows_probe(pid: int) -> Callable[[], bool]:
    # os.kill(pid, 0) would terminate the process on Windows; a SYNCHRONIZE handle can be waited on.
    import ctypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.OpenProcess.restype = ctypes.c_void_p
    synchronize, wait_timeout, access_denied = 0x00100000, 0x102, 5
    handle = kernel32.OpenProcess(synchronize, False, pid)
    if not handle:
        running = ctypes.get_last_error() == access_denied  # it exists, but we may not watch it
        return lambda: running
    return lambda: kernel32.WaitForSingleObject(ctypes.c_void_p(handle), 0) == wait_timeout


def _is_zombie(pid: int) -> bool:
    """An exited process that its own parent has not reaped yet (Linux /proc; False elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def _is_pipe(stream) -> bool:
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (AttributeError, OSError, ValueError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _poll(ppid: int | None, parent_pid: int | None, probe: Callable[[], bool] | None) -> None:
    while not _state.lost:
        if ppid is not None and os.getppid() != ppid:
            _lose(f"the parent process {ppid} exited")
        elif probe is not None and not probe():
            _lose(f"the parent process {parent_pid} exited")
        time.sleep(POLL_S)


def _lose(detail: str) -> None:
    if _state.lost:
        return
    _state.lost = detail
    try:
        print(f"note: {detail}: stopping after the current training step", file=sys.stderr, flush=True)
    except OSError as err:
        if is_broken_pipe(err):
            silence(sys.stderr)
