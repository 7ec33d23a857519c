"""The background-job protocol between the Slicer module and the engine (docs/job-protocol.md).

The Slicer side writes a ``job.json`` (:class:`JobSpec`, defined once in the engine's stdlib-only
``hssl.jobspec`` and imported here), starts ``python -m hssl job --job job.json`` and reads its
stdout line by line. Every line that parses as a JSON object with an ``event`` key is an event
(:class:`JobEvent`); every other line is a human log line and is kept as an ``EventType.LOG``
event, never an error.

Field names of :class:`JobSpec` and :class:`JobEvent` are the protocol's JSON keys (snake_case) on
purpose: one name per concept on both sides of the process boundary.

Stdlib only (``hssl.jobspec`` and ``hssl.recipe`` are stdlib too): this module is imported by the
Slicer module, by tests without Slicer and by scripts.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import math
from typing import Any

from hssl.jobspec import DEVICES, JobSpec, JobSpecError  # noqa: F401 - the protocol's one definition
from hssl.recipe import DEFAULT_TIME_BUDGET_S  # noqa: F401 - the default budget of every front end


class ExitCode(enum.IntEnum):
    """Exit codes of ``python -m hssl job`` (see docs/job-protocol.md)."""

    DONE = 0  # also after a graceful stop: the done event then says "stopped": true
    INTERNAL_ERROR = 1  # traceback on stderr
    USER_ERROR = 2  # one-line "error: ..." on stderr and an error event
    OUT_OF_MEMORY = 3  # message says what to change

    @classmethod
    def describe(cls, code: int | None) -> str:
        """A short human meaning of any exit status, including signals (negative on POSIX)."""
        if code is None:
            return "still running"
        try:
            return {
                cls.DONE: "finished",
                cls.INTERNAL_ERROR: "internal error",
                cls.USER_ERROR: "input error",
                cls.OUT_OF_MEMORY: "out of memory",
            }[cls(code)]
        except ValueError:
            if code < 0:
                return f"killed by signal {-code}"
            return f"exit code {code}"


class EventType(str, enum.Enum):
    START = "start"
    PROGRESS = "progress"
    SAVED = "saved"
    PREDICTION = "prediction"
    DONE = "done"
    ERROR = "error"
    FINAL_STEP = "final_step"  # which final step (network, network+grow, grow) won on the held-out slice
    LOG = "log"  # a non-JSON line (stdout or stderr); not sent by the engine as JSON


class Phase(str, enum.Enum):
    PREPARE = "prepare"
    ADAPT = "adapt"  # self-supervised adaptation to the scan, before fine-tuning
    FINETUNE = "finetune"
    REFINE = "refine"  # the held-out slice is added back
    SAVE = "save"
    PREDICT = "predict"

    @property
    def label(self) -> str:
        return {
            Phase.PREPARE: "Preparing",
            Phase.ADAPT: "Adapting to the scan",
            Phase.FINETUNE: "Fine-tuning",
            Phase.REFINE: "Refining",
            Phase.SAVE: "Saving model",
            Phase.PREDICT: "Predicting",
        }[self]


@dataclasses.dataclass
class JobEvent:
    """One line of the job's output. ``type`` is LOG for a non-JSON line (its text in ``message``).

    Progress fields: step/total (optimiser steps; total is an estimate under a time budget),
    loss, heldout_dice (None until there is an estimate), eta_s/elapsed_s (seconds).
    """

    type: EventType
    phase: Phase | None = None
    step: int | None = None
    total: int | None = None
    loss: float | None = None
    heldout_dice: float | None = None
    eta_s: float | None = None
    elapsed_s: float | None = None
    device: str | None = None
    message: str | None = None
    model: str | None = None
    prediction: str | None = None
    path: str | None = None
    stopped: bool | None = None
    annotated_slices: list[str] | None = None
    labels: list[dict[str, Any]] | None = None
    stream: str = "stdout"
    raw: dict[str, Any] | None = None

    @property
    def fraction(self) -> float | None:
        """Progress in [0, 1] within the current phase, or None."""
        if self.step is None or not self.total:
            return None
        return max(0.0, min(1.0, self.step / self.total))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def parseLine(line: str, stream: str = "stdout") -> JobEvent:
    """Parse one output line. Never raises: anything that is not a JSON event becomes a LOG event."""
    text = line.rstrip("\r\n")
    stripped = text.strip()
    if stream == "stdout" and stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("event"), str):
            try:
                kind = EventType(data["event"])
            except ValueError:
                kind = None
            if kind is not None and kind is not EventType.LOG:
                return _eventFromDict(kind, data, stream)
    return JobEvent(EventType.LOG, message=text, stream=stream)


def _eventFromDict(kind: EventType, data: dict[str, Any], stream: str) -> JobEvent:
    phase = None
    if isinstance(data.get("phase"), str):
        try:
            phase = Phase(data["phase"])
        except ValueError:
            phase = None
    step, total = _number(data.get("step")), _number(data.get("total"))
    slices = data.get("annotated_slices")
    labels = data.get("labels")

    def text(key: str) -> str | None:
        value = data.get(key)
        return str(value) if value is not None else None

    return JobEvent(
        type=kind,
        phase=phase,
        step=int(step) if step is not None else None,
        total=int(total) if total is not None else None,
        loss=_number(data.get("loss")),
        heldout_dice=_number(data.get("heldout_dice")),
        eta_s=_number(data.get("eta_s")),
        elapsed_s=_number(data.get("elapsed_s")),
        device=text("device"),
        message=text("message"),
        model=text("model"),
        prediction=text("prediction"),
        path=text("path"),
        stopped=bool(data["stopped"]) if "stopped" in data else None,
        annotated_slices=[str(s) for s in slices] if isinstance(slices, list) else None,
        labels=[entry for entry in labels if isinstance(entry, dict)] if isinstance(labels, list) else None,
        stream=stream,
        raw=data,
    )


def formatDuration(seconds: float | None) -> str:
    """``75`` -> ``"1:15"``, ``3700`` -> ``"1:01:40"``; unknown -> ``"?"``."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def describeFinalStep(event: JobEvent) -> list[str]:
    """Log lines for a ``final_step`` event: the choice with every candidate's mean held-out Dice, then
    one warning naming the segments that stay poorly learned, e.g.
    ``Final step: network+grow (held-out Dice: network 0.41, network+grow 0.62, grow 0.55)``."""
    data = event.raw or {}
    scores = data.get("heldout_dice") if isinstance(data.get("heldout_dice"), dict) else {}
    parts = []
    for name, per in scores.items():
        values = [v for v in per.values() if isinstance(v, (int, float))] if isinstance(per, dict) else []
        if values:
            parts.append(f"{name} {sum(values) / len(values):.2f}")
    lines = [f"Final step: {data.get('chosen', '?')}" + (f" (held-out Dice: {', '.join(parts)})" if parts else "")]
    poor = data.get("poor_segments")
    if isinstance(poor, list) and poor:
        lines.append(f"Poorly learned on the held-out slice: {', '.join(map(str, poor))}. Paint them on more "
                     "slices (or in another orientation) and fine-tune again.")
    return lines


def describeProgress(event: JobEvent) -> str:
    """One status line for a progress event, e.g. ``Fine-tuning 40/200, ETA 0:55, cpu``."""
    parts = [event.phase.label if event.phase else "Working"]
    if event.step is not None and event.total:
        parts[0] += f" {event.step}/{event.total}"
    if event.loss is not None:
        parts.append(f"loss {event.loss:.3f}")
    if event.heldout_dice is not None:
        parts.append(f"held-out Dice {event.heldout_dice:.2f}")
    if event.eta_s is not None:
        parts.append(f"ETA {formatDuration(event.eta_s)}")
    if event.device:
        parts.append(event.device)
    return ", ".join(parts)
