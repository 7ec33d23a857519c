"""A stand-in for ``python -m hssl job`` used by the process-control tests.

Usage: stub_job.py MODE STOP_FILE PID_FILE. It speaks the job protocol (JSON lines mixed with human
log lines) and misbehaves on purpose, depending on MODE:

progress  a few progress events among non-JSON lines, then done (exit 0)
graceful  progress until STOP_FILE exists, then a saved and a done event with stopped=true (exit 0)
stubborn  starts a grandchild, writes both pids to PID_FILE, ignores STOP_FILE and SIGTERM forever
fail      an error event plus "error: ..." on stderr (exit 2)
crash     a traceback on stderr (exit 1)
hang      one start event, then silence forever
"""
import json
import os
import signal
import subprocess
import sys
import time


def emit(event, **fields):
    print(json.dumps({"event": event, **fields}), flush=True)


def main():
    mode, stopFile, pidFile = sys.argv[1], sys.argv[2], sys.argv[3]
    print("stub job starting (a human log line)", flush=True)
    emit("start", device="cpu", phase="prepare", annotated_slices=["axial:3", "axial:7"],
         labels=[{"name": "ball", "value": 1, "color": [0.9, 0.3, 0.2]}])
    if mode == "progress":
        for step in range(1, 6):
            print(f"step {step}: not json {{broken", flush=True)
            emit("progress", phase="finetune", step=step, total=5, loss=1.0 / step,
                 heldout_dice=None if step < 3 else 0.1 * step, eta_s=5 - step, elapsed_s=step, device="cpu")
            print("{\"event\": \"progress\", \"step\":", flush=True)  # a truncated JSON line
        print("warning on stderr", file=sys.stderr, flush=True)
        emit("saved", model="/nowhere/model")
        emit("done", stopped=False, model="/nowhere/model", prediction=None)
        return 0
    if mode == "graceful":
        step = 0
        while not os.path.exists(stopFile):
            step += 1
            emit("progress", phase="finetune", step=step, total=1000, loss=1.0, eta_s=100.0, device="cpu")
            time.sleep(0.05)
        emit("saved", model="/nowhere/model")
        emit("done", stopped=True, model="/nowhere/model", prediction=None)
        return 0
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import signal, time\n"
                                  "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                  "while True: time.sleep(1)"])
        with open(pidFile, "w") as f:
            f.write(f"{os.getpid()} {child.pid}\n")
        while True:
            emit("progress", phase="finetune", step=1, total=10, loss=1.0, device="cpu")
            time.sleep(0.2)
    if mode == "fail":
        emit("error", message="labels have no annotated voxel: paint at least one slice of a segment")
        print("error: labels have no annotated voxel: paint at least one slice of a segment", file=sys.stderr)
        return 2
    if mode == "crash":
        raise RuntimeError("simulated internal failure")
    if mode == "hang":
        while True:
            time.sleep(1)
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main())
