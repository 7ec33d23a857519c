"""The real engine in a child process, driven from MRML nodes exactly as the module does it:
export -> python -m hssl job (3 CPU steps) -> import; Predict with the annotation gives exactly the
prediction fine-tuning made; apply a model to another volume; a graceful stop of a real job; a
cancelled prediction (never a failure); the device check; a real engine error surfaced. Needs
slicer-core, torch and MONAI."""
import json
import shutil
import sys
import time

import numpy as np
import pytest

from slicer_test_helpers import (MODULE_DIR, addAnnotation, addVolume, ballVolume, engineAvailable,
                                 engineEnvironment, slicerCore, sparse)

slicer = slicerCore()
if not engineAvailable():
    pytest.skip("the engine needs torch and MONAI", allow_module_level=True)

from HSSLSegmentLib import mrml_io  # noqa: E402
from HSSLSegmentLib.job_protocol import EventType, JobSpec, Phase  # noqa: E402
from HSSLSegmentLib.model_registry import ModelError, ModelRegistry, readModelInfo  # noqa: E402
from HSSLSegmentLib.process import JobAlreadyRunningError, JobProcess, JobState  # noqa: E402
from HSSLSegmentLib.segmentation_jobs import SegmentationJobs  # noqa: E402

nrrd = pytest.importorskip("nrrd")


def ijkToLps(header):
    m = np.eye(4)
    m[:3, :3] = np.array(header["space directions"], dtype=float).T
    m[:3, 3] = header["space origin"]
    return m


@pytest.fixture
def jobs(tmp_path):
    runner = SegmentationJobs(sys.executable, MODULE_DIR, ModelRegistry(None, tmp_path / "models"),
                              hangTimeoutS=300, stopTimeoutS=60)
    yield runner
    runner.shutdown(graceS=5)
    assert JobProcess.activeJob() is None


@pytest.fixture
def inputs(scene):
    image, ball = ballVolume((16, 24, 28))
    volume = addVolume(scene, image)
    bar = np.zeros_like(ball)
    bar[:, 2:4, 3:9] = True
    annotation = addAnnotation(scene, volume, {"ball": sparse(ball, 0, [5, 8, 11]), "bar": sparse(bar, 0, [5, 8, 11])},
                               colors=[(0.9, 0.3, 0.2), (0.2, 0.8, 0.3)])
    return volume, annotation


def test_finetune_job_round_trip(tmp_path, scene, inputs, jobs):
    volume, annotation = inputs
    before = mrml_io.segmentationFingerprint(annotation)
    events = []
    jobs.onEvent = events.append
    jobs.keepJobFiles = True  # to read the prediction file the engine wrote
    job = jobs.startFinetune(volume, annotation, init="scratch", steps=3, device="cpu", seed=0, predict=True)
    assert job.isRunning and jobs.isRunning
    written = json.loads((job.workDir / "job.json").read_text())
    assert written["kind"] == "finetune" and written["parent_pid"] == jobs.parentPid and written["init"] == "scratch"
    outcome = jobs.wait(timeoutS=240)
    assert outcome.ok, outcome.errorMessage
    assert outcome.result.device == "cpu" and not outcome.result.stopped

    kinds = {e.type for e in events}
    assert {EventType.START, EventType.PROGRESS, EventType.SAVED, EventType.PREDICTION, EventType.DONE} <= kinds
    steps = [e.step for e in events if e.type is EventType.PROGRESS and e.phase is Phase.FINETUNE]
    assert steps[-1] == 3
    assert outcome.annotatedSlices == ["axial:5", "axial:8", "axial:11"]

    # the model folder
    assert outcome.model is not None and outcome.model.segmentNames == ["ball", "bar"]
    assert outcome.model.path.parent == tmp_path / "models"

    # the prediction file: names, colours, label values, grid of the source volume
    predictionFile = job.workDir / "prediction.seg.nrrd"
    labels, header = nrrd.read(str(predictionFile))
    assert labels.shape == slicer.util.arrayFromVolume(volume).shape[::-1]
    np.testing.assert_allclose(ijkToLps(header), np.diag([-1.0, -1, 1, 1]) @ mrml_io.ijkToRas(volume), atol=1e-9)
    assert (header["Segment0_Name"], header["Segment0_LabelValue"]) == ("ball", "1")
    assert (header["Segment1_Name"], header["Segment1_LabelValue"]) == ("bar", "2")
    assert set(np.unique(labels)) <= {0, 1, 2}
    shutil.rmtree(job.workDir)

    # the imported node
    node = outcome.predictionNode
    assert node.GetName() == "CT prediction" and node.GetScene() is scene
    assert [name for _sid, name in mrml_io.segmentIdsAndNames(node)] == ["ball", "bar"]
    colors = {name: node.GetSegmentation().GetSegment(sid).GetColor() for sid, name in mrml_io.segmentIdsAndNames(node)}
    assert colors["ball"] == pytest.approx((0.9, 0.3, 0.2)) and colors["bar"] == pytest.approx((0.2, 0.8, 0.3))
    assert mrml_io.segmentationMatchesVolume(node, volume) == (True, "")
    assert mrml_io.segmentMask(node, "ball", volume).shape == slicer.util.arrayFromVolume(volume).shape

    # the annotation was never modified
    assert mrml_io.segmentationFingerprint(annotation) == before

    # Predict on the annotated volume with its annotation: the very prediction fine-tuning made
    fineTuned = {name: mrml_io.segmentMask(node, name, volume) for name in ("ball", "bar")}
    jobs.keepJobFiles = True
    predictJob = jobs.startPrediction(volume, outcome.model, device="cpu", annotationNode=annotation)
    spec = json.loads((predictJob.workDir / "job.json").read_text())
    assert spec["kind"] == "predict" and spec["annotation"].endswith("labels.seg.nrrd") and "slices" not in spec
    predicted = jobs.wait(timeoutS=120)
    assert predicted.ok and not predicted.cancelled, predicted.errorMessage
    _labels, annotationHeader = nrrd.read(str(predictJob.workDir / "labels.seg.nrrd"))
    assert (annotationHeader["Segment0_Name"], annotationHeader["Segment0_LabelValue"]) == ("ball", "1")
    shutil.rmtree(predictJob.workDir)
    jobs.keepJobFiles = False
    for name, mask in fineTuned.items():
        np.testing.assert_array_equal(mrml_io.segmentMask(predicted.predictionNode, name, volume), mask)
    assert mrml_io.segmentationFingerprint(annotation) == before

    # apply the model to another volume (a prediction job), keeping one segment
    other = addVolume(scene, np.flip(slicer.util.arrayFromVolume(volume), axis=2), name="other",
                      spacing=(0.9, 0.7, 2.5), origin=(0.0, 0.0, 0.0), flipIJ=False)
    with pytest.raises(ModelError, match="not on spleen"):
        jobs.startPrediction(other, outcome.model, segments=["spleen"], device="cpu")
    applyJob = jobs.startPrediction(other, outcome.model, segments=["ball"], device="cpu", colorNode=annotation)
    assert "annotation" not in json.loads((applyJob.workDir / "job.json").read_text())  # the whole volume
    applied = jobs.wait(timeoutS=120)
    assert applied.ok, applied.errorMessage
    assert applied.predictionNode.GetName() == "other prediction"
    assert [name for _sid, name in mrml_io.segmentIdsAndNames(applied.predictionNode)] == ["ball"]
    sid = applied.predictionNode.GetSegmentation().GetNthSegmentID(0)
    assert applied.predictionNode.GetSegmentation().GetSegment(sid).GetColor() == pytest.approx((0.9, 0.3, 0.2))
    assert mrml_io.segmentationMatchesVolume(applied.predictionNode, other)[0]
    assert not list(tmp_path.glob("HSSLSegment-*"))


def test_graceful_stop_saves_the_model_and_one_job_at_a_time(tmp_path, inputs, jobs):
    volume, annotation = inputs
    jobs.startFinetune(volume, annotation, init="scratch", timeBudgetS=300, device="cpu", predict=False)
    with pytest.raises(JobAlreadyRunningError):
        jobs.startFinetune(volume, annotation, init="scratch", steps=1, device="cpu")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        jobs.poll()
        progress = jobs.job.lastProgress if jobs.job else None
        if progress is not None and progress.phase is Phase.FINETUNE:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the engine never started fine-tuning")
    started = time.monotonic()
    jobs.cancel(graceful=True)
    outcome = jobs.wait(timeoutS=120)
    assert outcome.ok and outcome.result.stopped, outcome.errorMessage
    assert time.monotonic() - started < 60
    assert readModelInfo(outcome.model.path).segmentNames == ["ball", "bar"]
    assert outcome.predictionNode is None and not outcome.cancelled

    # A prediction cancelled through its stop file ends as cancelled, not failed, and imports nothing.
    jobs.startPrediction(volume, outcome.model, device="cpu", annotationNode=annotation)
    jobs.cancel(graceful=True)
    cancelled = jobs.wait(timeoutS=120)
    assert cancelled.cancelled and cancelled.result.state is not JobState.FAILED, cancelled.errorMessage
    assert cancelled.result.exitCode == 0 and cancelled.result.stopped and cancelled.predictionNode is None
    # Killed at once: cancelled as well, whatever the exit code.
    jobs.startPrediction(volume, outcome.model, device="cpu")
    jobs.cancel(graceful=False)
    killed = jobs.wait(timeoutS=60)
    assert killed.result.state is JobState.CANCELLED and killed.cancelled

    # The device check is a background job too.
    jobs.startDeviceCheck("cpu")
    checked = jobs.wait(timeoutS=120)
    assert checked.ok and checked.result.device == "cpu" and checked.result.detail == "cpu"


def test_engine_error_is_surfaced(tmp_path):
    spec = JobSpec(image=str(tmp_path / "missing.nrrd"), labels=str(tmp_path / "labels.seg.nrrd"),
                   model_out=str(tmp_path / "model"), init="scratch", steps=1, device="cpu",
                   stop_file=str(tmp_path / "STOP"))
    jobFile = spec.write(tmp_path / "job.json")
    assert json.loads(jobFile.read_text())["steps"] == 1
    job = JobProcess([sys.executable, "-m", "hssl", "job", "--job", str(jobFile)], env=engineEnvironment(),
                     stopFile=tmp_path / "STOP").start()
    result = job.wait(timeoutS=120)
    assert result.state is JobState.FAILED and result.exitCode == 2
    assert "missing.nrrd" in result.errorMessage and "does not exist" in result.errorMessage
    assert result.errorMessage.endswith("(input error)") and "\n" not in result.errorMessage


def test_headless_example_script_under_plain_python(tmp_path, scene):
    """scripts/slicer_finetune_example.py with a plain interpreter (slicer-core): a labelmap with
    named values in, a model folder and a .seg.nrrd out; bad input exits 2 with one line."""
    import subprocess

    from slicer_test_helpers import REPO

    image, ball = ballVolume((16, 24, 28))
    volume = addVolume(scene, image)
    mrml_io.writeVolume(volume, tmp_path / "image.nrrd", compress=True)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    labelmap.CopyOrientation(volume)
    slicer.util.updateVolumeFromArray(labelmap, sparse(ball, 0, [5, 8, 11]).astype(np.uint8) * 3)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(tmp_path / "labels.nrrd"))
    assert storage.WriteData(labelmap)
    script = REPO / "scripts" / "slicer_finetune_example.py"
    command = [sys.executable, str(script), "--", "--image", str(tmp_path / "image.nrrd"), "--labels",
               str(tmp_path / "labels.nrrd"), "--names", "3=ball", "--out", str(tmp_path / "out"), "--steps", "3",
               "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "prediction:" in done.stdout
    assert readModelInfo(tmp_path / "out" / "model").segmentNames == ["ball"]
    prediction = mrml_io.loadSegmentationFile(scene, tmp_path / "out" / "prediction.seg.nrrd", volume)
    assert [name for _sid, name in mrml_io.segmentIdsAndNames(prediction)] == ["ball"]
    assert mrml_io.segmentationMatchesVolume(prediction, volume)[0]
    # the model folder exists now: refused without --overwrite
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr
    missing = subprocess.run([sys.executable, str(script), "--image", str(tmp_path / "nope.nrrd"), "--labels",
                              str(tmp_path / "labels.nrrd"), "--out", str(tmp_path / "o2")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0
    assert "nope.nrrd' does not exist" in missing.stderr
