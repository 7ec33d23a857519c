"""The Slicer-side workflow around one background job: nodes -> files -> engine -> nodes.

:class:`SegmentationJobs` is what the module's Logic, the headless example script and the tests
share: export the volume and the sparse annotation to a private temporary folder, write
``job.json`` (``hssl.jobspec``), start ``<python> -m hssl job --job job.json`` (``<python>`` is
``PythonSlicer`` in Slicer, any interpreter that can import the engine elsewhere), feed its events
to the caller, and when it ends import the prediction as a segmentation node and remove the
temporary folder. Every kind of work runs that way: fine-tuning, prediction (Predict: the
annotated volume with its annotation, so the result is the one fine-tuning showed; Apply: another
volume, whole), the device check, and fetching the sample scans (``python -m hssl data fetch``).

Polling, not threads, drives it: call :meth:`SegmentationJobs.poll` from the main thread (Slicer:
a QTimer) or :meth:`SegmentationJobs.wait` (headless). Callbacks run inside those calls.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

from hssl.model_format import ModelFormatError, parse_init

from .annotated_slices import formatSlices, parseSlices
from .job_protocol import EventType, JobEvent, JobSpec
from .model_registry import ModelError, ModelInfo, ModelRegistry, checkModelSegments, readModelInfo
from .mrml_io import (ExportResult, InputError, checkScalarVolume, exportJobInputs, exportPredictionAnnotation,
                      importPrediction, resolveSegmentIds, segmentIdsAndNames, volumeAxisNames)
from .process import JobAlreadyRunningError, JobProcess, JobResult, JobState, makeWorkDir

log = logging.getLogger(__name__)

KINDS = ("finetune", "predict", "device", "fetch")


class EngineNotFoundError(RuntimeError):
    """No interpreter to run the engine with; the message says what to reinstall."""


@dataclasses.dataclass
class JobOutcome:
    """What a finished job produced, after import."""

    kind: str  # one of KINDS
    result: JobResult
    predictionNode: object | None = None  # vtkMRMLSegmentationNode
    model: ModelInfo | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    annotatedSlices: list[str] = dataclasses.field(default_factory=list)
    volumeNode: object | None = None  # the volume that was segmented
    log: list[str] = dataclasses.field(default_factory=list)  # the job's last output lines

    @property
    def ok(self) -> bool:
        return self.result.ok

    @property
    def cancelled(self) -> bool:
        """The user stopped it: killed, or a prediction stopped before it wrote anything."""
        return self.result.state is JobState.CANCELLED or (
            self.kind == "predict" and self.result.stopped and self.predictionNode is None)

    @property
    def errorMessage(self) -> str | None:
        return self.result.errorMessage


@dataclasses.dataclass
class _Context:
    kind: str
    job: JobProcess
    workDir: Path
    volumeNode: object | None = None
    annotationNode: object | None = None  # the segmentation whose colours and names the prediction takes
    predictionTarget: object | None = None
    predictionPath: Path | None = None
    modelOut: Path | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    annotatedSlices: list[str] = dataclasses.field(default_factory=list)
    model: ModelInfo | None = None


class SegmentationJobs:
    """Runs fine-tune, predict, device-check and sample-fetch jobs for MRML nodes, one at a time.

    pythonExecutable: interpreter for the engine (PythonSlicer in Slicer), or None when none was
    found (every start then raises :class:`EngineNotFoundError` with ``missingEngineMessage``).
    engineDir: the folder that holds the ``hssl`` package (put on PYTHONPATH). registry: where new
    models are written. parentPid: written into every job (``parent_pid``) so that a job whose
    program is gone stops and saves its work; default this process.
    """

    def __init__(self, pythonExecutable: str | None, engineDir: str | os.PathLike, registry: ModelRegistry,
                 hangTimeoutS: float | None = 600.0, stopTimeoutS: float = 60.0, keepJobFiles: bool = False,
                 extraEnvironment: dict[str, str] | None = None, parentPid: int | None = None,
                 missingEngineMessage: str = "No Python interpreter to run the engine with was found."):
        self.pythonExecutable = pythonExecutable
        self.engineDir = Path(engineDir)
        self.registry = registry
        self.hangTimeoutS = hangTimeoutS
        self.stopTimeoutS = stopTimeoutS
        self.keepJobFiles = keepJobFiles
        self.extraEnvironment = dict(extraEnvironment or {})
        self.parentPid = parentPid if parentPid is not None else os.getpid()
        self.missingEngineMessage = missingEngineMessage
        self.onEvent: Callable[[JobEvent], None] | None = None
        self.onFinished: Callable[[JobOutcome], None] | None = None
        self.lastOutcome: JobOutcome | None = None
        self._context: _Context | None = None

    # ------------------------------------------------------------------ state

    @property
    def isRunning(self) -> bool:
        return self._context is not None and self._context.job.isRunning

    @property
    def job(self) -> JobProcess | None:
        return self._context.job if self._context is not None else None

    @property
    def kind(self) -> str | None:
        """The kind of the job in progress (one of KINDS), or None."""
        return self._context.kind if self._context is not None else None

    def _checkIdle(self) -> None:
        if self.pythonExecutable is None:
            raise EngineNotFoundError(self.missingEngineMessage)
        if self.isRunning or JobProcess.activeJob() is not None:
            raise JobAlreadyRunningError("A job is already running: wait for it to finish or cancel it first.")

    def environment(self, device: str) -> dict[str, str]:
        env = dict(os.environ)
        paths = [str(self.engineDir)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = "-1"  # the engine must not even initialise a GPU
        env.update(self.extraEnvironment)
        return env

    # ------------------------------------------------------------------ start

    def startFinetune(self, volumeNode, annotationNode, segments: Iterable[str] | None = None,
                      init: str = "auto", timeBudgetS: float | None = None, steps: int | None = None,
                      device: str = "auto", seed: int = 0, backgroundSlices: str | Sequence[str] = "",
                      predict: bool = True, modelOut: str | os.PathLike | None = None,
                      overwrite: bool = False, predictionTarget=None) -> JobProcess:
        """Export the inputs and start fine-tuning (plus prediction of the same volume if ``predict``).

        init: ``auto`` (the engine's default start), ``scratch``, ``bundled[:NAME]`` or a model
        folder (warm start). timeBudgetS: None for the engine's default (``hssl.recipe``) unless
        ``steps`` is given. backgroundSlices: slices annotated as background only, e.g.
        ``"axial:3, axial:40"``; when given, the job gets the explicit slice list (detected + these).
        Raises InputError / ModelError / JobAlreadyRunningError with a one-line message.
        """
        self._checkIdle()
        checkScalarVolume(volumeNode)
        if annotationNode is None:
            raise InputError("No annotation: select the segmentation that holds your painted slices.")
        segmentIds = resolveSegmentIds(annotationNode, segments)
        names = dict(segmentIdsAndNames(annotationNode))
        segmentNames = [names[sid] for sid in segmentIds]
        warnings: list[str] = []
        init = self._checkedInit(init, segmentNames, warnings)
        workDir = makeWorkDir()
        try:
            exported = exportJobInputs(volumeNode, annotationNode, segmentIds, workDir)
            warnings.extend(exported.warnings)
            slices = _jobSlices(volumeNode, exported, backgroundSlices)
            modelPath = Path(modelOut) if modelOut is not None else self.registry.newModelFolder(volumeNode.GetName())
            predictionPath = workDir / "prediction.seg.nrrd" if predict else None
            spec = JobSpec(kind="finetune", image=str(exported.imagePath), labels=str(exported.labelsPath),
                           model_out=str(modelPath), segments=segmentNames, slices=slices,
                           prediction_out=str(predictionPath) if predictionPath else None, init=init,
                           time_budget=float(timeBudgetS) if timeBudgetS and not steps else None,
                           steps=int(steps) if steps else None, device=device, seed=int(seed),
                           stop_file=str(workDir / "STOP"), overwrite=bool(overwrite), parent_pid=self.parentPid)
            jobFile = spec.write(workDir / "job.json")
        except Exception:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        return self._start(_Context("finetune", None, workDir, volumeNode, annotationNode, predictionTarget,
                                    predictionPath, modelPath, warnings, slices or list(exported.annotatedSlices)),
                           self._jobCommand(jobFile), device)

    def startPrediction(self, volumeNode, model: str | os.PathLike | ModelInfo, segments: Iterable[str] | None = None,
                        device: str = "auto", annotationNode=None, backgroundSlices: str | Sequence[str] = "",
                        colorNode=None, predictionTarget=None) -> JobProcess:
        """Predict ``volumeNode`` with a saved or bundled model.

        annotationNode: the sparse annotation *of this volume* (Predict after fine-tuning): the job
        gets it, numbered as the model numbers its segments, so the result equals it on the painted
        slices, is limited to the region around the painted structures and post-processed, exactly
        as the prediction fine-tuning makes. None (Apply to another volume): the whole volume.
        backgroundSlices: as for :meth:`startFinetune`. colorNode: a segmentation whose segment
        colours the prediction takes (default ``annotationNode``). segments: names to keep (each
        must be one the model was trained on).
        """
        self._checkIdle()
        checkScalarVolume(volumeNode)
        info = model if isinstance(model, ModelInfo) else self.registry.find(str(model))
        names = list(segments) if segments is not None else []
        checkModelSegments(info, names, forPrediction=True)
        warnings: list[str] = []
        workDir = makeWorkDir()
        try:
            exported = exportPredictionAnnotation(volumeNode, annotationNode, info.labels, workDir)
            slices = None
            annotated: list[str] = []
            if exported is not None:
                warnings.extend(exported.warnings)
                slices = _jobSlices(volumeNode, exported, backgroundSlices)
                annotated = slices or list(exported.annotatedSlices)
            elif annotationNode is not None:
                warnings.append(f"'{annotationNode.GetName()}' has no painted voxel of the model's segments "
                                f"({', '.join(info.segmentNames)}): the whole volume is predicted.")
            predictionPath = workDir / "prediction.seg.nrrd"
            spec = JobSpec(kind="predict", model=str(info.path), image=str(workDir / "image.nrrd"),
                           annotation=str(exported.labelsPath) if exported is not None else None, slices=slices,
                           prediction_out=str(predictionPath), segments=names or None, device=device,
                           stop_file=str(workDir / "STOP"), parent_pid=self.parentPid)
            jobFile = spec.write(workDir / "job.json")
        except Exception:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        return self._start(_Context("predict", None, workDir, volumeNode, colorNode or annotationNode,
                                    predictionTarget, predictionPath, None, warnings, annotated, info),
                           self._jobCommand(jobFile), device)

    def startDeviceCheck(self, device: str = "auto") -> JobProcess:
        """Which device the engine picks for ``device`` (it imports torch, so it takes seconds: a
        background job like the others). The outcome's ``result.device`` and ``result.detail``
        (e.g. ``cuda (NVIDIA ...)``) tell; an absent device is the job's one-line error."""
        self._checkIdle()
        workDir = makeWorkDir()
        try:
            jobFile = JobSpec(kind="device", device=device, parent_pid=self.parentPid).write(workDir / "job.json")
        except Exception:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        return self._start(_Context("device", None, workDir), self._jobCommand(jobFile), device)

    def startSampleFetch(self, source: str = "pyradiomics") -> JobProcess:
        """Fetch the engine's sample scans of ``source`` into its cache (``hssl data fetch``; once,
        it needs access to PyPI; afterwards everything works offline)."""
        self._checkIdle()
        workDir = makeWorkDir()
        command = [self.pythonExecutable, "-m", "hssl", "data", "fetch", "--source", source]
        return self._start(_Context("fetch", None, workDir), command, "cpu")

    def _jobCommand(self, jobFile: Path) -> list[str]:
        return [self.pythonExecutable, "-m", "hssl", "job", "--job", str(jobFile)]

    def _checkedInit(self, init: str, segmentNames: list[str], warnings: list[str]) -> str:
        """The job's ``init`` for a warm start checked against the model (its segments), unchanged
        for ``auto`` and ``scratch``."""
        try:
            how, _where = parse_init(init)
        except ModelFormatError as err:
            raise ModelError(str(err)) from None
        if how in ("auto", "scratch"):
            return init
        model = self.registry.find(init)
        note = checkModelSegments(model, segmentNames, forPrediction=False)
        if note:
            warnings.append(note)
        return model.initValue

    def _start(self, context: _Context, command: list[str], device: str) -> JobProcess:
        stopFile = context.workDir / "STOP" if context.kind in ("finetune", "predict") else None
        job = JobProcess(command, env=self.environment(device), cwd=str(context.workDir), stopFile=stopFile,
                         hangTimeoutS=self.hangTimeoutS, stopTimeoutS=self.stopTimeoutS, workDir=context.workDir,
                         removeWorkDir=not self.keepJobFiles)
        try:
            job.start()
        except Exception:
            shutil.rmtree(context.workDir, ignore_errors=True)
            raise
        context.job = job
        self._context = context
        for text in context.warnings:
            self._emit(JobEvent(EventType.LOG, message=f"warning: {text}", stream="hsslsegment"))
        return job

    # ------------------------------------------------------------------ run

    def _emit(self, event: JobEvent) -> None:
        if self.onEvent is not None:
            try:
                self.onEvent(event)
            except Exception:  # noqa: BLE001 - a GUI callback error must not kill the job bookkeeping
                log.exception("error in the job event callback")

    def poll(self) -> list[JobEvent]:
        """Drain the job's output (callbacks run here); import the results once it has ended."""
        context = self._context
        if context is None:
            return []
        events = context.job.poll()
        for event in events:
            if event.type is EventType.START and event.annotated_slices:
                context.annotatedSlices = list(event.annotated_slices)
            self._emit(event)
        if not context.job.isRunning and context.job.result is not None:
            self._finish(context)
        return events

    def _finish(self, context: _Context) -> None:
        self._context = None
        result = context.job.result
        outcome = JobOutcome(context.kind, result, warnings=list(context.warnings),
                             annotatedSlices=context.annotatedSlices, volumeNode=context.volumeNode,
                             log=list(context.job.logTail)[-200:])
        try:
            if result.ok:
                modelPath = result.model or (str(context.modelOut) if context.modelOut else None)
                if context.kind == "finetune" and modelPath and Path(modelPath).is_dir():
                    outcome.model = readModelInfo(modelPath)
                    self.registry.recordSource(outcome.model, context.volumeNode, context.annotationNode)
                elif context.kind == "predict":
                    outcome.model = context.model
                predictionPath = Path(result.prediction) if result.prediction else context.predictionPath
                if predictionPath is not None and predictionPath.exists():
                    imported = importPrediction(predictionPath, context.volumeNode, context.annotationNode,
                                                targetNode=context.predictionTarget)
                    outcome.predictionNode = imported.node
                    outcome.warnings.extend(imported.warnings)
        except Exception as err:  # noqa: BLE001 - report an import failure as the job's error
            log.exception("importing the job's results failed")
            outcome.result = dataclasses.replace(result, state=JobState.FAILED,
                                                 errorMessage=f"the job finished but its result could not be "
                                                              f"loaded: {err}")
        finally:
            context.job.cleanup()
        self.lastOutcome = outcome
        if self.onFinished is not None:
            self.onFinished(outcome)

    def wait(self, timeoutS: float | None = None, pollIntervalS: float = 0.1,
             idle: Callable[[], None] | None = None) -> JobOutcome | None:
        """Block until the running job has ended and its results are imported (headless use)."""
        deadline = None if timeoutS is None else time.monotonic() + timeoutS
        while self._context is not None:
            self.poll()
            if self._context is None:
                break
            if deadline is not None and time.monotonic() > deadline:
                self._context.job.kill(f"the job did not finish within {timeoutS:.0f} s and was killed")
                deadline = None
            if idle is not None:
                idle()
            time.sleep(pollIntervalS)
        return self.lastOutcome

    def cancel(self, graceful: bool = True) -> None:
        """Graceful: the job stops at its next step (a fine-tuning saves its model; a prediction
        writes nothing), killed if it does not within stopTimeoutS. Not graceful: kill the whole
        process tree now. Either way the outcome is never reported as a failure."""
        if self._context is None:
            return
        if graceful:
            self._context.job.requestStop()
        else:
            self._context.job.kill()

    def shutdown(self, graceS: float = 5.0) -> None:
        """Stop any running job and remove its files (scene close, application exit)."""
        context = self._context
        if context is None:
            return
        context.job.shutdown(graceS)
        self._context = None
        context.job.cleanup()


def _jobSlices(volumeNode, exported: ExportResult, backgroundSlices: str | Sequence[str]) -> list[str] | None:
    """The job's explicit slice list: the detected painted slices plus the background-only ones, or
    None (the engine detects them) when there are no background-only slices."""
    extraText = backgroundSlices if isinstance(backgroundSlices, str) else " ".join(backgroundSlices)
    if not extraText.strip():
        return None
    names = volumeAxisNames(volumeNode)
    dims = volumeNode.GetImageData().GetDimensions()
    shape = (dims[2], dims[1], dims[0])
    try:
        extra = parseSlices(extraText, shape, names)
    except ValueError as err:
        raise InputError(f"Background-only slices: {err}") from None
    detected = parseSlices(exported.annotatedSlices, shape, names)
    return formatSlices(set(extra) | set(detected), names)
