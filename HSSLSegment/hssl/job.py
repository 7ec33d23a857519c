"""The Slicer background job: ``python -m hssl job --job job.json`` (see docs/job-protocol.md).

Fine-tunes, saves the model folder, optionally predicts; progress as JSON lines on stdout.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import HSSLError
from .finetune import FinetuneOptions
from .progress import Progress
from .recipe import time_budget_or_default

KEYS = {"image", "labels", "segments", "slices", "model_out", "prediction_out", "init", "time_budget", "steps",
        "device", "seed", "stop_file", "overwrite", "names", "known_mask", "modality", "batch_size",
        "postprocess", "roi", "threads", "parent_pid"}
REQUIRED = {"image", "labels", "model_out"}


def read_job(path: str) -> dict:
    try:
        job = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise HSSLError(f"job file '{path}' does not exist") from None
    except (OSError, ValueError) as err:
        raise HSSLError(f"job file '{path}' is not valid JSON ({err})") from None
    if not isinstance(job, dict):
        raise HSSLError(f"job file '{path}' must hold a JSON object")
    unknown = sorted(set(job) - KEYS)
    if unknown:
        raise HSSLError(f"job file '{path}' has unknown key(s) {unknown}: allowed keys are {sorted(KEYS)}")
    missing = sorted(REQUIRED - set(job))
    if missing:
        raise HSSLError(f"job file '{path}' lacks the key(s) {missing}")
    return job


def run_job(path: str, args=None) -> int:
    from .workflow import run_finetune, run_predict

    progress = Progress(json_lines=True, bar=False)
    if args is not None:
        args._progress = progress
    job = read_job(path)
    from . import lifeline

    # parent_pid: the program that waits for the job (Slicer); it may be a grandparent, behind PythonSlicer.
    lifeline.watch(job.get("parent_pid"), follow_ppid=True)
    import os

    from .device import set_threads

    # Leave one core to Slicer's user interface unless the job says otherwise.
    set_threads(job.get("threads") or max(1, (os.cpu_count() or 2) - 1))
    opts = FinetuneOptions(steps=job.get("steps"), time_budget=time_budget_or_default(job.get("time_budget"), job.get("steps")),
                           device=job.get("device", "auto"), seed=int(job.get("seed", 0)),
                           init=job.get("init", "auto"), stop_file=job.get("stop_file"),
                           modality=job.get("modality", "auto"), batch_size=job.get("batch_size"),
                           roi=bool(job.get("roi", True)))
    opts.validate()
    overwrite = bool(job.get("overwrite", False))
    prediction = job.get("prediction_out")
    if prediction:
        from .io import check_output
        check_output(prediction, overwrite)
    progress.update("prepare", 0, 1, device=opts.device)
    result = run_finetune(job["image"], job["labels"], job["model_out"], opts, progress, overwrite=overwrite,
                          names=job.get("names"), segments=job.get("segments"), slices=job.get("slices"),
                          known_mask=job.get("known_mask"))
    if prediction and lifeline.lost():
        prediction = None  # nobody would open it; the module predicts from the saved model later
    if prediction:
        run_predict(result.model, job["image"], prediction, device=opts.device, overwrite=overwrite,
                    progress=progress, annotation=result.annotation,
                    postprocess_mode=job.get("postprocess", "annotated-components"), roi=result.roi)
    progress.event("done", stopped=result.stopped, model=job["model_out"], prediction=prediction,
                   heldout_dice=result.heldout_dice, steps=result.steps, seconds=round(result.seconds, 1))
    return 0
