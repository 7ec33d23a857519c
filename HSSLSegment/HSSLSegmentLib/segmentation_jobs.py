"""The Slicer-side workflow around one background job: nodes -> files -> engine -> nodes.

:class:`SegmentationJobs` is what the module's Logic, the headless example script and the tests
share: export the volume and the sparse annotation to a private temporary folder, write
``job.json``, start ``<python> -m hssl job --job job.json`` (``<python>`` is ``PythonSlicer`` in
Slicer, any interpreter that can import the engine elsewhere), feed its events to the caller,
and when it ends import the prediction as a segmentation node and remove the temporary folder.
Prediction with an existing model runs ``<python> -m hssl predict ... --progress-json``, which
prints the same events.

Polling, not threads, drives it: call :meth:`SegmentationJobs.poll` from the main thread (Slicer:
a QTimer) or :meth:`SegmentationJobs.wait` (headless). Callbacks run inside those calls.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .annotated_slices import formatSlices, parseSlices
from .job_protocol import EventType, JobEvent, JobSpec
from .model_registry import ModelInfo, ModelRegistry, checkModelSegments, readModelInfo
from .mrml_io import (InputError, checkScalarVolume, exportJobInputs, importPrediction, resolveSegmentIds,
                      segmentIdsAndNames, volumeAxisNames, writeVolume)
from .process import JobAlreadyRunningError, JobProcess, JobResult, JobState, makeWorkDir

log = logging.getLogger(__name__)


@dataclasses.dataclass
class JobOutcome:
    """What a finished job produced, after import."""

    kind: str  # "finetune" | "predict"
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
    def errorMessage(self) -> str | None:
        return self.result.errorMessage


@dataclasses.dataclass
class _Context:
    kind: str
    job: JobProcess
    workDir: Path
    volumeNode: object
    annotationNode: object | None
    predictionTarget: object | None
    predictionPath: Path | None
    modelOut: Path | None
    warnings: list[str]
    annotatedSlices: list[str]
    model: ModelInfo | None = None


class SegmentationJobs:
    """Runs fine-tune and predict jobs for MRML nodes, one at a time.

    pythonExecutable: interpreter for the engine (PythonSlicer in Slicer). engineDir: the folder
    that holds the ``hssl`` package (put on PYTHONPATH). registry: where new models are written.
    """

    def __init__(self, pythonExecutable: str, engineDir: str | os.PathLike, registry: ModelRegistry,
                 hangTimeoutS: float | None = 600.0, stopTimeoutS: float = 60.0, keepJobFiles: bool = False,
                 extraEnvironment: dict[str, str] | None = None):
        self.pythonExecutable = pythonExecutable
        self.engineDir = Path(engineDir)
        self.registry = registry
        self.hangTimeoutS = hangTimeoutS
        self.stopTimeoutS = stopTimeoutS
        self.keepJobFiles = keepJobFiles
        self.extraEnvironment = dict(extraEnvironment or {})
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

    def _checkIdle(self) -> None:
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
                      init: str = "scratch", timeBudgetS: float | None = 120.0, steps: int | None = None,
                      device: str = "auto", seed: int = 0, backgroundSlices: str | Sequence[str] = "",
                      predict: bool = True, modelOut: str | os.PathLike | None = None,
                      overwrite: bool = False, predictionTarget=None) -> JobProcess:
        """Export the inputs and start fine-tuning (plus prediction of the same volume if ``predict``).

        init: ``scratch``, ``bundled[:NAME]`` or a model folder (warm start). backgroundSlices:
        slices annotated as background only, e.g. ``"axial:3; axial:40"``; when given, the job gets
        the explicit slice list (detected + these). Raises InputError / ModelError /
        JobAlreadyRunningError with a one-line message.
        """
        self._checkIdle()
        checkScalarVolume(volumeNode)
        if annotationNode is None:
            raise InputError("No annotation: select the segmentation that holds your painted slices.")
        segmentIds = resolveSegmentIds(annotationNode, segments)
        names = dict(segmentIdsAndNames(annotationNode))
        segmentNames = [names[sid] for sid in segmentIds]
        warnings: list[str] = []
        if init not in ("scratch",):
            model = self.registry.find(init) if not os.path.isabs(init) else readModelInfo(init)
            note = checkModelSegments(model, segmentNames, forPrediction=False)
            if note:
                warnings.append(note)
            init = model.initValue
        workDir = makeWorkDir()
        try:
            exported = exportJobInputs(volumeNode, annotationNode, segmentIds, workDir)
            warnings.extend(exported.warnings)
            slices = None
            annotated = list(exported.annotatedSlices)
            extraText = backgroundSlices if isinstance(backgroundSlices, str) else " ".join(backgroundSlices)
            if extraText.strip():
                axisNames = volumeAxisNames(volumeNode)
                dims = volumeNode.GetImageData().GetDimensions()
                shape = (dims[2], dims[1], dims[0])
                extra = parseSlices(backgroundSlices, shape, axisNames)
                detected = parseSlices(exported.annotatedSlices, shape, axisNames)
                slices = formatSlices(set(extra) | set(detected), axisNames)
                annotated = slices
            modelPath = Path(modelOut) if modelOut is not None else self.registry.newModelFolder(volumeNode.GetName())
            predictionPath = workDir / "prediction.seg.nrrd" if predict else None
            spec = JobSpec(image=str(exported.imagePath), labels=str(exported.labelsPath), model_out=str(modelPath),
                           segments=segmentNames, slices=slices,
                           prediction_out=str(predictionPath) if predictionPath else None, init=init,
                           time_budget=float(timeBudgetS) if timeBudgetS and not steps else None,
                           steps=int(steps) if steps else None, device=device, seed=int(seed),
                           stop_file=str(workDir / "STOP"), overwrite=bool(overwrite))
            jobFile = spec.write(workDir / "job.json")
        except Exception:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        command = [self.pythonExecutable, "-m", "hssl", "job", "--job", str(jobFile)]
        return self._start("finetune", command, device, workDir, volumeNode, annotationNode, predictionTarget,
                           predictionPath, modelPath, warnings, annotated, stopFile=workDir / "STOP")

    def startPrediction(self, volumeNode, model: str | os.PathLike | ModelInfo, segments: Iterable[str] | None = None,
                        device: str = "auto", annotationNode=None, predictionTarget=None) -> JobProcess:
        """Predict ``volumeNode`` with a saved or bundled model (apply a model to any volume).

        segments: names to keep (each must be one the model was trained on).
        """
        self._checkIdle()
        checkScalarVolume(volumeNode)
        info = model if isinstance(model, ModelInfo) else (
            self.registry.find(str(model)) if not os.path.isabs(str(model)) else readModelInfo(model))
        names = list(segments) if segments is not None else []
        checkModelSegments(info, names, forPrediction=True)
        workDir = makeWorkDir()
        try:
            imagePath = writeVolume(volumeNode, workDir / "image.nrrd")
        except Exception:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        predictionPath = workDir / "prediction.seg.nrrd"
        command = [self.pythonExecutable, "-m", "hssl", "predict", "--model", str(info.path), "--image",
                   str(imagePath), "--out", str(predictionPath), "--device", device, "--progress-json"]
        if names:
            command += ["--segments", ",".join(names)]
        return self._start("predict", command, device, workDir, volumeNode, annotationNode, predictionTarget,
                           predictionPath, None, [], [], stopFile=None, model=info)

    def _start(self, kind, command, device, workDir, volumeNode, annotationNode, predictionTarget,
               predictionPath, modelOut, warnings, annotatedSlices, stopFile, model=None) -> JobProcess:
        job = JobProcess(command, env=self.environment(device), cwd=str(workDir), stopFile=stopFile,
                         hangTimeoutS=self.hangTimeoutS, stopTimeoutS=self.stopTimeoutS, workDir=workDir,
                         removeWorkDir=not self.keepJobFiles)
        try:
            job.start()
        except Exception:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        self._context = _Context(kind, job, workDir, volumeNode, annotationNode, predictionTarget,
                                 predictionPath, modelOut, warnings, annotatedSlices, model)
        for text in warnings:
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
        """Graceful: the job saves its model and stops (killed if it does not within stopTimeoutS).
        Not graceful: kill the whole process tree now."""
        if self._context is None:
            return
        if graceful:
            self._context.job.requestStop()
        else:
            self._context.job.kill()

    def probeDevice(self, device: str = "auto", timeoutS: float = 120.0) -> str:
        """Which device the engine would use for ``device`` (imports torch in a child process, so it
        takes seconds: call it only on an explicit user action). Returns e.g. ``"cuda"`` or an
        ``"error: ..."`` line."""
        code = ("import sys\n"
                "from hssl.device import resolve_device\n"
                "from hssl.errors import HSSLError\n"
                "try:\n    print(resolve_device(sys.argv[1]))\n"
                "except HSSLError as err:\n    print('error: ' + str(err))\n")
        try:
            done = subprocess.run([self.pythonExecutable, "-c", code, device], env=self.environment(device),
                                  capture_output=True, text=True, timeout=timeoutS, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"error: cannot run the engine ({err})"
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        if done.returncode != 0 or not lines:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return f"error: {tail}"
        return lines[-1].strip()

    def shutdown(self, graceS: float = 5.0) -> None:
        """Stop any running job and remove its files (scene close, application exit)."""
        context = self._context
        if context is None:
            return
        context.job.shutdown(graceS)
        self._context = None
        context.job.cleanup()
