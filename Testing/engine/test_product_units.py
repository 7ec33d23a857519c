"""Unit tests, with hand-computed expectations, for what makes the product differ from a plain MONAI
pipeline: the annotation region, the annotated-components post-processing, the ROI and slab
stitching of prediction, and the retreats on out-of-memory."""
import numpy as np
import pytest
import torch

from hssl import finetune as finetune_module
from hssl import postprocess, predict, workflow
from hssl.errors import OutOfMemory
from hssl.io import Geometry, LabelInfo, Volume
from hssl.model_store import Model
from hssl.normalize import Normalization
from hssl.plan import Plan
from hssl.sparse import annotation_roi


# ----------------------------------------------------------------------------- annotation_roi

def test_roi_grows_by_the_minimum_margin_in_mm_and_clips_at_the_border():
    labels = np.zeros((20, 80, 100), np.uint8)
    labels[10, 10:15, 20:30] = 1
    known = np.zeros(labels.shape, bool)
    known[10] = True
    # z: extent 1 slice, 20 mm / 5 mm = 4 slices of margin; y, x: 20 mm / 1 mm = 20 voxels, clipped at 0.
    assert annotation_roi(labels, known, (5.0, 1.0, 1.0)) == (slice(6, 15), slice(0, 35), slice(0, 50))


def test_roi_margin_is_half_the_extent_when_that_is_larger():
    labels = np.zeros((10, 200, 200), np.uint8)
    labels[3, 50:110, 100:102] = 1  # y extent 60 -> margin 30; x extent 2 -> margin 20 (mm rule)
    known = np.zeros(labels.shape, bool)
    known[3] = True
    roi = annotation_roi(labels, known, (1.0, 1.0, 1.0))
    assert roi == (slice(0, 10), slice(20, 140), slice(80, 122))


def test_roi_margin_is_at_least_two_voxels_on_coarse_axes():
    labels = np.zeros((30, 30, 30), np.uint8)
    labels[15, 15, 15] = 1
    known = np.ones(labels.shape, bool)
    # 20 mm at 50 mm/voxel rounds up to 1 voxel; the floor of 2 voxels wins.
    assert annotation_roi(labels, known, (50.0, 50.0, 50.0))[0] == slice(13, 18)


def test_roi_ignores_labels_outside_the_known_voxels_and_is_none_without_paint():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[2, 2, 2] = 1
    known = np.zeros(labels.shape, bool)
    known[7] = True
    assert annotation_roi(labels, known, (1.0, 1.0, 1.0)) is None


# ----------------------------------------------------------------------------- post-processing

def test_keep_annotated_components_removes_only_unpainted_blobs_of_painted_segments():
    pred = np.zeros((5, 12, 12), np.uint8)
    pred[1:4, 1:4, 1:4] = 1  # touches the painted voxel below: kept
    pred[1:4, 8:11, 8:11] = 1  # segment 1 elsewhere, touches nothing painted: removed
    pred[1:4, 8:11, 1:4] = 2  # segment 2 was never painted: kept as it is
    labels = np.zeros_like(pred)
    labels[2, 2, 2] = 1
    known = np.zeros(pred.shape, bool)
    known[2] = True
    out = postprocess.keep_annotated_components(pred, labels, known)
    expected = pred.copy()
    expected[1:4, 8:11, 8:11] = 0
    assert np.array_equal(out, expected)


def test_postprocess_keeps_the_painted_slices_exactly_as_painted():
    pred = np.ones((4, 6, 6), np.uint8)
    labels = np.zeros_like(pred)
    labels[1, 2:4, 2:4] = 1  # painted slice 1: foreground only in a 2x2 square
    known = np.zeros(pred.shape, bool)
    known[1] = True
    out = postprocess.apply(pred, labels, known, "annotated-components")
    np.testing.assert_array_equal(out[1], labels[1])
    # The rest of the blob is connected to the painted square through slices 0 and 2: kept.
    assert out[0].all() and out[2].all() and out[3].all()
    np.testing.assert_array_equal(postprocess.apply(pred, labels, known, "none")[1], labels[1])


# ----------------------------------------------------------------------------- prediction stitching

class Threshold(torch.nn.Module):
    """A voxel-wise 'network': class 1 where the input exceeds 0.5. Any misplaced slab, window or ROI
    offset in the stitching shows up as labels that disagree with the input."""

    def __init__(self, patch):
        super().__init__()
        self.plan = Plan((1.0, 1.0, 1.0), patch, ((1, 1, 1),), ((3, 3, 3),), (4,))
        self.out_channels = 2

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), 20.0 * (x - 0.5)], dim=1)


def _model(patch=(4, 8, 8)):
    return Model(Threshold(patch), [LabelInfo("a", 1, (1.0, 0.0, 0.0))], Normalization("percentile"), {})


def test_slabs_and_windows_stitch_back_exactly(monkeypatch):
    rng = np.random.default_rng(0)
    image = rng.random((23, 17, 19)).astype(np.float32)
    monkeypatch.setattr(predict, "SLAB_VOXELS", 5 * 17 * 19)  # several slabs along z
    labels, probs = predict.predict_array(_model(), image, torch.device("cpu"), overlap=0.25, probabilities=True)
    np.testing.assert_array_equal(labels, (image > 0.5).astype(np.uint8))
    assert probs.shape == (2, 23, 17, 19)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=2e-3)


def test_roi_prediction_is_background_outside_and_exact_inside():
    rng = np.random.default_rng(1)
    image = rng.random((20, 30, 30)).astype(np.float32)
    roi = (slice(3, 11), slice(5, 25), slice(-4, 12))  # a start below 0 is clipped
    labels, probs = predict.predict_array(_model(), image, torch.device("cpu"), roi=roi, probabilities=True)
    expected = np.zeros(image.shape, np.uint8)
    inside = (slice(3, 11), slice(5, 25), slice(0, 12))
    expected[inside] = image[inside] > 0.5
    np.testing.assert_array_equal(labels, expected)
    outside = np.ones(image.shape, bool)
    outside[inside] = False
    assert (probs[0][outside] == 1).all() and (probs[1][outside] == 0).all()


@pytest.mark.parametrize("roi", [None, (slice(3, 11), slice(5, 25), slice(-4, 12))])
def test_the_window_count_the_time_estimates_use_is_what_prediction_runs(monkeypatch, roi):
    # The estimates of the final step's and the prediction's seconds count windows with
    # predicted_windows: the ROI's half-patch of context and the z-slabs included.
    image = np.random.default_rng(3).random((23, 30, 30)).astype(np.float32)
    monkeypatch.setattr(predict, "SLAB_VOXELS", 5 * 30 * 30)
    model = _model()
    seen, bar = [], []
    forward = model.net.forward
    model.net.forward = lambda x: (seen.append(x.shape[0]), forward(x))[1]
    predict.predict_array(model, image, torch.device("cpu"), overlap=0.5, roi=roi,
                          on_progress=lambda done, total: bar.append((done, total)))
    expected = predict.predicted_windows(image.shape, (4, 8, 8), 0.5, 2, roi=roi)
    assert sum(seen) == expected
    inner = [min(r.stop, n) - max(r.start, 0) for r, n in zip(roi, image.shape)] if roi else image.shape
    assert expected > predict.window_count(inner, (4, 8, 8), 0.5) or roi is None
    # The progress bar counts windows, not batches of them.
    assert bar[-2] == (expected, expected) and bar[0][0] == seen[0]


# ----------------------------------------------------------------------------- out-of-memory retreats

def _volume(shape=(6, 10, 10)):
    rng = np.random.default_rng(2)
    array = (rng.random(shape) * 100).astype(np.float32)
    geometry = Geometry(shape[::-1], (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).reshape(-1)))
    return Volume(array, geometry, "mem.nrrd")


def test_predict_volume_retries_one_window_then_falls_back_to_the_cpu(monkeypatch):
    calls = []

    def fake_predict_array(model, x, dev, overlap, sw_batch_size, **kwargs):
        calls.append((dev.type, sw_batch_size))
        if len(calls) < 3:
            raise OutOfMemory("GPU memory ran out")
        return np.zeros(x.shape, np.uint8), None

    monkeypatch.setattr(workflow, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(workflow, "predict_array", fake_predict_array)
    notes = []
    progress = workflow.Progress(bar=False)
    monkeypatch.setattr(progress, "log", notes.append)
    pred = workflow.predict_volume(_model(), _volume(), "cuda", sw_batch_size=4, progress=progress)
    assert calls == [("cuda", 4), ("cuda", 1), ("cpu", 1)]
    assert pred.device == "cpu" and len(notes) == 2 and "CPU" in notes[1]


def test_predict_volume_out_of_memory_on_the_cpu_is_the_users_error(monkeypatch):
    def fake_predict_array(*args, **kwargs):
        raise OutOfMemory("host memory ran out")

    monkeypatch.setattr(workflow, "predict_array", fake_predict_array)
    with pytest.raises(OutOfMemory):
        workflow.predict_volume(_model(), _volume(), "cpu", progress=workflow.Progress(bar=False))


def test_finetune_oom_halves_the_batch_then_moves_to_the_cpu_then_gives_up():
    net = torch.nn.Linear(1, 1)
    progress = workflow.Progress(bar=False)
    notes = []
    progress.log = notes.append
    assert finetune_module._after_oom(4, torch.device("cpu"), net, progress) == (2, torch.device("cpu"))
    batch, device = finetune_module._after_oom(1, torch.device("meta"), net, progress)
    assert (batch, device.type) == (1, "cpu") and "CPU" in notes[-1]
    with pytest.raises(OutOfMemory):
        finetune_module._after_oom(1, torch.device("cpu"), net, progress)
