"""The background job's description, ``job.json``: every key, its type, default and check, once.

The Slicer module writes it (``HSSLSegmentLib.job_protocol``), the engine's job runner reads it
(``hssl.job``, ``python -m hssl job --job job.json``) and docs/job-protocol.md lists the same keys:
its key table is :func:`markdown_table` (a test compares them; ``python -m hssl.jobspec`` prints it).

A job has a ``kind``: ``finetune`` (train on a sparse annotation, save the model, optionally
predict), ``predict`` (segment an image with a model folder, optionally with this image's sparse
annotation) or ``device`` (report which device ``device`` resolves to). Each key says which kinds
accept it; a key another kind uses is an error, as is an unknown key, so a typo never passes
silently.

Stdlib only (plus the stdlib ``hssl.model_format`` and ``hssl.recipe``): the Slicer process imports
this without torch, and on Slicer's own Python.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from .model_format import ModelFormatError, parse_init
from .recipe import DEFAULT_RECIPE, DEFAULT_TIME_BUDGET_S, time_budget_or_default

KINDS = ("finetune", "predict", "device")
DEVICES = ("auto", "cpu", "cuda", "mps")
MODALITIES = ("auto", "ct", "mr")
POSTPROCESS = ("annotated-components", "none")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FINAL_STEPS = ("network", "network+grow", "grow")  # hssl.refine.CANDIDATES (a test keeps them equal)

_TRAIN = ("finetune",)
_IMAGE = ("finetune", "predict")
_ALL = KINDS

# JSON value types a key may hold; "path" is an absolute path string, "strings" a list of strings.
TYPES = ("path", "string", "integer", "number", "boolean", "strings")


class JobSpecError(ValueError):
    """A job description the engine refuses; the one-line message names the key and the fix."""


def _key(doc: str, kinds: tuple[str, ...], json_type: str, default: Any = None, required: tuple[str, ...] = (),
         choices: tuple[str, ...] | None = None, minimum: int | float | None = None):
    """A JobSpec field: ``default`` when left out; ``required`` lists the kinds that need it."""
    assert json_type in TYPES and set(kinds) <= set(KINDS) and set(required) <= set(kinds)
    return dataclasses.field(default=default, metadata={
        "doc": doc, "kinds": kinds, "type": json_type, "required": required, "choices": choices,
        "minimum": minimum})


@dataclasses.dataclass
class JobSpec:
    """The content of ``job.json``; field names are its keys. ``None`` means "left out" (the default
    the description names applies) and is never written."""

    kind: str = _key("what the job does: `finetune`, `predict` or `device`", _ALL, "string", "finetune",
                     choices=KINDS)
    image: str | None = _key("the scalar volume (`.nrrd`, `.nii.gz`, `.mha`, a DICOM folder)", _IMAGE, "path",
                             required=_IMAGE)
    labels: str | None = _key("the sparse annotation to learn from: Slicer `.seg.nrrd` or a labelmap on the "
                              "image grid", _TRAIN, "path", required=_TRAIN)
    model_out: str | None = _key("the model folder to write (must not exist, unless `overwrite`)", _TRAIN, "path",
                                 required=_TRAIN)
    model: str | None = _key("the model folder to predict with", ("predict",), "path", required=("predict",))
    annotation: str | None = _key(
        "this image's sparse annotation (label values as in the model): the output equals it on the annotated "
        "slices, only the region around the painted structures is predicted (`roi`) and `postprocess` applies; "
        "left out, the whole volume is predicted", ("predict",), "path")
    prediction_out: str | None = _key(
        "where to write the prediction (`.seg.nrrd` for a Slicer segmentation, or a labelmap suffix); for "
        "`finetune` optional: predict the image after training", _IMAGE, "path", required=("predict",))
    segments: list[str] | None = _key("segment names to learn (`finetune`) or to keep (`predict`); default all",
                                      _IMAGE, "strings")
    slices: list[str] | None = _key(
        "the annotated slices, e.g. `[\"axial:12,30\", \"coronal:40\"]` (orientation of the image axis, index "
        "along it), background-only slices included; default: detected from the painted voxels", _IMAGE,
        "strings")
    names: str | None = _key("names of a plain labelmap's values, e.g. `1=tumour,2=liver`", _TRAIN, "string")
    known_mask: str | None = _key("an explicit known-voxel mask (non-zero = annotated) instead of slices", _TRAIN,
                                  "path")
    init: str = _key("where training starts: `auto` (the default start, today `scratch`: see docs/results.md), "
                     "`scratch`, `bundled`, `bundled:NAME` or the absolute path of a model folder (warm start)",
                     _TRAIN, "string", "auto")
    time_budget: float | None = _key(f"seconds of training; default {DEFAULT_TIME_BUDGET_S:g} unless `steps` is "
                                     "given", _TRAIN, "number")
    steps: int | None = _key("optimiser steps (training ends at whichever budget ends first)", _TRAIN, "integer",
                             minimum=1)
    adapt_s: float | None = _key("seconds of self-supervised adaptation to the image before fine-tuning, taken out "
                                 "of the time budget (less than half of it); default 0 (off)", _TRAIN, "number",
                                 minimum=0)
    seed: int = _key("random seed", _TRAIN, "integer", 0, minimum=0)
    modality: str = _key("intensity normalisation: `auto`, `ct` (fixed HU window) or `mr` (percentiles)", _TRAIN,
                         "string", "auto", choices=MODALITIES)
    batch_size: int | None = _key(f"patches per step; default {DEFAULT_RECIPE.batch_size}", _TRAIN, "integer", minimum=1)
    device: str = _key("`auto` (CUDA, then Apple MPS, then CPU), `cpu`, `cuda` or `mps`", _ALL, "string", "auto",
                       choices=DEVICES)
    roi: bool = _key("train and predict only around the painted structures", _IMAGE, "boolean", True)
    postprocess: str = _key("`annotated-components` keeps only the predicted components that touch a voxel "
                            "painted with that segment; `none` keeps everything", _IMAGE, "string",
                            "annotated-components", choices=POSTPROCESS)
    precision: str = _key("arithmetic: `auto` (bfloat16 on GPUs and CPUs that compute it natively, else float32), "
                          "`fp32`, `bf16` or `fp16` (CUDA only)", _IMAGE, "string", "auto", choices=PRECISIONS)
    final_step: str | None = _key(
        "the final step with an annotation: `network`, `network+grow` (the network's sure voxels grown on the "
        "intensities) or `grow` (intensities only); `finetune` default `auto` = chosen on the held-out slice, "
        "`predict` default = the model's own choice", _IMAGE, "string", choices=("auto", *FINAL_STEPS))
    stop_file: str | None = _key("once this file exists the job stops gracefully: training saves its model, a "
                                 "prediction writes nothing; both end with exit code 0", _IMAGE, "path")
    overwrite: bool = _key("replace existing outputs", _IMAGE, "boolean", False)
    threads: int | None = _key("CPU threads; default all cores but one (Slicer stays responsive)", _IMAGE, "integer",
                               minimum=1)
    parent_pid: int | None = _key(
        "the process id of the program that started the job (Slicer): once that process is gone the job stops "
        "gracefully, and training saves its model with `training.stop_reason: \"parent-exited\"` in "
        "`model.json`", _ALL, "integer", minimum=1)

    # ------------------------------------------------------------------ checks

    def validate(self) -> "JobSpec":
        """Check every key against its description (types, kinds, choices, absolute paths, the init
        grammar); raise :class:`JobSpecError` naming the first bad key. Returns self."""
        if self.kind not in KINDS:
            raise JobSpecError(f"job key 'kind' must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for field in dataclasses.fields(self):
            _check(field, getattr(self, field.name), self.kind)
        if self.kind == "finetune":
            try:
                how, where = parse_init(self.init)
            except ModelFormatError as err:
                raise JobSpecError(f"job key 'init': {err}") from None
            if how == "path" and not os.path.isabs(where):
                raise JobSpecError(f"job key 'init' must be auto, scratch, bundled, bundled:NAME or an absolute "
                                   f"model folder, got {self.init!r}")
        if self.segments is not None and len(set(self.segments)) != len(self.segments):
            raise JobSpecError(f"job key 'segments' names a segment twice: {self.segments}")
        return self

    def time_budget_s(self) -> float | None:
        """The seconds to train: as given, else the recipe's default unless a step budget is given."""
        return time_budget_or_default(self.time_budget, self.steps)

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        """The keys this kind of job uses that carry a value (``None`` is left out), in declaration order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None and self.kind in f.metadata["kinds"]}

    def write(self, path: str | os.PathLike) -> Path:
        """Validate, then write ``path`` (UTF-8 JSON) through a temporary file and a rename."""
        self.validate()
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(self.to_dict(), indent=2) + "\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobSpec":
        if not isinstance(data, dict):
            raise JobSpecError("a job must be a JSON object of keys and values")
        unknown = sorted(set(data) - set(KEYS))
        if unknown:
            raise JobSpecError(f"job has unknown key '{unknown[0]}': the keys are {', '.join(KEYS)}")
        return cls(**data).validate()

    @classmethod
    def read(cls, path: str | os.PathLike) -> "JobSpec":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise JobSpecError(f"job file '{path}' does not exist: check the path") from None
        except (OSError, ValueError) as err:
            raise JobSpecError(f"job file '{path}' is not valid JSON ({err}): write one JSON object") from None
        if not isinstance(data, dict):
            raise JobSpecError(f"job file '{path}' must hold a JSON object")
        return cls.from_dict(data)


KEYS: dict[str, dict] = {f.name: dict(f.metadata, default=f.default) for f in dataclasses.fields(JobSpec)}


def _check(field: dataclasses.Field, value: Any, kind: str) -> None:
    meta = field.metadata
    name = field.name
    if value is None:
        if kind in meta["required"]:
            raise JobSpecError(f"a {kind} job needs the key '{name}' ({meta['doc'].split(';')[0]})")
        return
    if kind not in meta["kinds"] and value != field.default:
        raise JobSpecError(f"job key '{name}' is not used by a {kind} job (it is for {' and '.join(meta['kinds'])} "
                           "jobs): leave it out")
    kind_of_value = meta["type"]
    if kind_of_value == "path":
        if not isinstance(value, str) or not value:
            raise JobSpecError(f"job key '{name}' must be a non-empty path string, got {value!r}")
        if not os.path.isabs(value):
            raise JobSpecError(f"job key '{name}' must be an absolute path, got '{value}'")
    elif kind_of_value == "string":
        if not isinstance(value, str) or not value.strip():
            raise JobSpecError(f"job key '{name}' must be a non-empty string, got {value!r}")
        if meta["choices"] and value not in meta["choices"]:
            raise JobSpecError(f"job key '{name}' must be one of {', '.join(meta['choices'])}, got '{value}'")
    elif kind_of_value == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            raise JobSpecError(f"job key '{name}' must be an integer, got {value!r}")
        if meta["minimum"] is not None and value < meta["minimum"]:
            raise JobSpecError(f"job key '{name}' must be at least {meta['minimum']}, got {value}")
    elif kind_of_value == "number":
        number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if meta["minimum"] is not None:
            if not number or value < meta["minimum"]:
                raise JobSpecError(f"job key '{name}' must be a number of at least {meta['minimum']}, got {value!r}")
        elif not number or value <= 0:
            raise JobSpecError(f"job key '{name}' must be a positive number, got {value!r}")
    elif kind_of_value == "boolean":
        if not isinstance(value, bool):
            raise JobSpecError(f"job key '{name}' must be true or false, got {value!r}")
    elif kind_of_value == "strings":
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise JobSpecError(f"job key '{name}' must be a list of non-empty strings, got {value!r}")


def markdown_table() -> str:
    """The key table of docs/job-protocol.md (one row per key, in declaration order)."""
    rows = ["| key | kinds | type | default | meaning |", "|---|---|---|---|---|"]
    for name, meta in KEYS.items():
        kinds = ", ".join(meta["kinds"]) if meta["kinds"] != _ALL else "all"
        required = meta["required"]
        if required:
            default = "required" if required == meta["kinds"] else f"required for {', '.join(required)}"
        elif meta["default"] is None:
            default = "-"
        else:
            default = f"`{json.dumps(meta['default'])}`"
        rows.append(f"| `{name}` | {kinds} | {meta['type']} | {default} | {meta['doc']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(markdown_table() + "\n")
