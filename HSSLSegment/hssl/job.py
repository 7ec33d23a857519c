"""The background job: ``python -m hssl job --job job.json`` (keys: ``hssl.jobspec``; docs/job-protocol.md).

Progress goes to stdout as JSON lines, human lines to stderr. The three kinds run the product's own
functions: ``finetune`` is ``workflow.finetune_and_predict`` (what ``hssl finetune`` runs),
``predict`` is ``workflow.run_predict`` with ``workflow.prediction_annotation`` (what
``hssl predict --annotation`` runs), ``device`` reports what ``device.resolve_device`` picks.
"""
from __future__ import annotations

import os

from .errors import HSSLError
from .jobspec import JobSpec, JobSpecError
from .progress import Progress


class PredictionStopped(Exception):
    """The stop file appeared while predicting (not an error: the job ends with exit code 0)."""


class _StoppableProgress(Progress):
    """JSON-line progress that ends a prediction between two sliding windows once the stop file exists."""

    def __init__(self, stop_file: str | None):
        super().__init__(json_lines=True, bar=False)
        self.stop_file = stop_file

    def stop_requested(self) -> bool:
        from . import lifeline

        # A prediction nobody will open (the parent is gone) stops like a cancelled one.
        return (bool(self.stop_file) and os.path.exists(self.stop_file)) or lifeline.lost()

    def update(self, phase: str, step: int, total: int, **fields) -> None:
        if phase == "predict" and self.stop_requested():
            raise PredictionStopped()
        super().update(phase, step, total, **fields)


def read_job(path: str) -> JobSpec:
    """The validated job of ``path``; every problem is an :class:`HSSLError` naming the key."""
    try:
        return JobSpec.read(path)
    except JobSpecError as err:
        raise HSSLError(str(err)) from None


def run_job(path: str, args=None) -> int:
    spec = read_job(path)
    progress = _StoppableProgress(spec.stop_file)
    if args is not None:
        args._progress = progress
    from . import lifeline

    # parent_pid: the program that waits for the job (Slicer); it may be a grandparent, behind PythonSlicer.
    lifeline.watch(spec.parent_pid, follow_ppid=True)
    if spec.kind == "device":
        return _run_device(spec, progress)
    from .device import set_threads

    # Leave one core to Slicer's user interface unless the job says otherwise.
    set_threads(spec.threads or max(1, (os.cpu_count() or 2) - 1))
    if spec.kind == "predict":
        return _run_predict(spec, progress)
    return _run_finetune(spec, progress)


def _run_finetune(spec: JobSpec, progress: Progress) -> int:
    from .finetune import FinetuneOptions
    from .workflow import finetune_and_predict

    opts = FinetuneOptions(steps=spec.steps, time_budget=spec.time_budget_s(), device=spec.device, seed=spec.seed,
                           init=spec.init, stop_file=spec.stop_file, modality=spec.modality,
                           batch_size=spec.batch_size, roi=spec.roi, precision=spec.precision,
                           final_step=spec.final_step or "auto", adapt_seconds=spec.adapt_s)
    opts.validate()
    progress.update("prepare", 0, 1, device=opts.device)
    finetune_and_predict(spec.image, spec.labels, spec.model_out, opts, progress, overwrite=spec.overwrite,
                         prediction_out=spec.prediction_out, postprocess_mode=spec.postprocess, names=spec.names,
                         segments=spec.segments, slices=spec.slices, known_mask=spec.known_mask)
    return 0


def _run_predict(spec: JobSpec, progress: _StoppableProgress) -> int:
    from .io import check_output, read_image
    from .workflow import prediction_annotation, run_predict

    check_output(spec.prediction_out, spec.overwrite)
    annotation = roi = None
    try:
        if progress.stop_requested():
            raise PredictionStopped()
        if spec.annotation:
            annotation, roi = prediction_annotation(spec.annotation, read_image(spec.image).geometry,
                                                    use_roi=spec.roi, slices=spec.slices)
        elif spec.slices:
            raise HSSLError("job key 'slices' needs the 'annotation' it refers to: add the annotation or leave "
                            "'slices' out")
        out = run_predict(spec.model, spec.image, spec.prediction_out, spec.device, segments=spec.segments,
                          overwrite=spec.overwrite, progress=progress, annotation=annotation,
                          postprocess_mode=spec.postprocess, roi=roi, precision=spec.precision,
                          final_step=None if spec.final_step in (None, "auto") else spec.final_step)
    except PredictionStopped:
        progress.close()
        progress.log("stop requested: the prediction was stopped and nothing was written")
        progress.event("done", stopped=True, prediction=None)
        return 0
    progress.event("done", stopped=False, prediction=out["path"])
    return 0


def _run_device(spec: JobSpec, progress: Progress) -> int:
    from .device import resolve_device

    device = resolve_device(spec.device)
    detail = device.type
    if device.type == "cuda":
        import torch

        detail = f"cuda ({torch.cuda.get_device_name(device)})"
    progress.event("done", stopped=False, device=device.type, message=detail)
    return 0
