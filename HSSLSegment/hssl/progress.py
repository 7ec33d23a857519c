"""Progress reporting: a human progress bar on stderr and, optionally, JSON lines on stdout.

The JSON protocol (one object per line, see docs/job-protocol.md) is what the Slicer module
parses; anything else a job prints goes to stderr so stdout stays machine-readable.

A stream whose reader has gone (a broken pipe: the parent died or closed it) is not an error
here: it is handed to ``hssl.lifeline.stream_closed`` (which silences it and lets training stop
gracefully) and nothing more is written to it.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from typing import Any

from tqdm import tqdm

from . import lifeline


class Progress:
    def __init__(self, json_lines: bool = False, bar: bool = True, stream=None):
        self.json_lines = json_lines
        self.bar_enabled = bar
        self.stream = stream or sys.stdout
        self._bar: tqdm | None = None
        self._phase = None

    def event(self, event: str, **fields: Any) -> None:
        """Emit one protocol event (JSON line) when enabled."""
        if self.json_lines:
            record = {"event": event, **{k: _clean(v) for k, v in fields.items()}}
            try:
                self.stream.write(json.dumps(record) + "\n")
                self.stream.flush()
            except OSError as err:
                if not lifeline.is_broken_pipe(err):
                    raise
                self.json_lines = False
                lifeline.stream_closed(self.stream)

    def update(self, phase: str, step: int, total: int, **fields: Any) -> None:
        self.event("progress", phase=phase, step=step, total=total, **fields)
        if not self.bar_enabled:
            return
        with self._stderr():
            if self._bar is None or self._phase != phase:
                self.close()
                self._bar = tqdm(total=total, desc=phase, file=sys.stderr, leave=True, dynamic_ncols=True)
                self._phase = phase
            if total and self._bar.total != total:
                self._bar.total = total
            self._bar.n = step
            shown = {k: v for k, v in fields.items() if k in ("loss", "heldout_dice") and v is not None}
            self._bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()}, refresh=False)
            self._bar.refresh()

    def log(self, message: str) -> None:
        """A human line: stderr, never the JSON stream."""
        with self._stderr():
            if self._bar is not None:
                self._bar.write(message, file=sys.stderr)
            else:
                print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            bar, self._bar = self._bar, None
            with self._stderr():
                bar.close()

    @contextlib.contextmanager
    def _stderr(self):
        """Writes to stderr; a broken pipe there ends the progress bar and silences stderr."""
        try:
            yield
        except OSError as err:
            if not lifeline.is_broken_pipe(err):
                raise
            self.bar_enabled, self._bar = False, None
            lifeline.stream_closed(sys.stderr)


def say(message: str, stream=None) -> None:
    """Print one line to ``stream`` (default stderr), silently when its reader has gone."""
    stream = stream or sys.stderr
    try:
        print(message, file=stream, flush=True)
    except OSError as err:
        if not lifeline.is_broken_pipe(err):
            raise
        lifeline.stream_closed(stream)


def _clean(v: Any) -> Any:
    if isinstance(v, float):
        return None if math.isnan(v) or math.isinf(v) else round(v, 5)
    return v


class Eta:
    """Remaining time from the progress fraction."""

    def __init__(self):
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self, fraction: float) -> float | None:
        if fraction <= 0:
            return None
        return max(0.0, self.elapsed() * (1 - fraction) / fraction)
