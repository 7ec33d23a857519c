"""Self-supervised adaptation to the scan before fine-tuning (hssl.adapt): the crop pairs, the
budget, the stop request, and what model.json records."""
import numpy as np
import pytest
import torch

from hssl import adapt
from hssl.errors import HSSLError
from hssl.network import SegNet
from hssl.plan import make_plan
from hssl.pretrain.config import DenseConfig


def _scan(shape=(16, 32, 32), seed=0):
    """A bright textured box on an empty (zero) background."""
    rng = np.random.default_rng(seed)
    image = np.zeros(shape, np.float32)
    image[4:12, 8:24, 8:24] = 0.5 + 0.3 * rng.random((8, 16, 16))
    return image


def _net(shape=(16, 32, 32)):
    torch.manual_seed(0)
    return SegNet(make_plan((1.0, 1.0, 1.0), shape, 8 * 16 * 16, (8, 16, 16)), 2)


def test_the_two_views_of_a_pair_hold_the_same_voxels_of_the_scan():
    image = _scan()
    pairs = adapt.ScanPairs(image, (8, 16, 16), DenseConfig(pairs_per_step=2, voxels_per_pair=32), 3, 0.05)
    batch = pairs.batch(0)
    assert batch["views"].shape == (4, 1, 8, 16, 16) and batch["clean"].shape == (4, 1, 8, 16, 16)
    assert 0.0 <= batch["views"].min() and batch["views"].max() <= 1.0
    v1, v2 = batch["voxels1"], batch["voxels2"]
    at = lambda v: batch["clean"][v[:, 0], 0, v[:, 1], v[:, 2], v[:, 3]]  # noqa: E731
    assert len(v1) > 0 and np.array_equal(at(v1), at(v2))
    assert (at(v1) > 0.05).all()  # sampled voxels are body, never the empty background
    assert np.array_equal(pairs.batch(0)["views"], batch["views"])  # a pure function of (seed, step)


def test_adaptation_trains_the_body_within_its_seconds_and_stops_when_asked():
    image, net = _scan(), _net()
    before = [p.detach().clone() for p in net.encoder.parameters()]
    times = []
    record = adapt.adapt(net, image, None, 1.5, torch.device("cpu"), None, 0, lambda: False,
                         report=lambda step, elapsed, loss: times.append(elapsed))
    # It ran until the budget was spent, and no step started after that.
    assert record["steps"] == len(times) >= 1 and "skipped" not in record
    assert record["seconds"] >= 1.5 and (len(times) == 1 or times[-2] < 1.5)
    assert np.isfinite(record["first_loss"]) and np.isfinite(record["last_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, net.encoder.parameters()))
    asked = []
    record = adapt.adapt(_net(), image, None, 60.0, torch.device("cpu"), None, 0, lambda: asked.append(1) or len(asked) > 2)
    assert record["steps"] == 2 and record["skipped"] == "stopped"
    record = adapt.adapt(_net(), image, None, 60.0, torch.device("cpu"), None, 0, lambda: True)
    assert record["steps"] == 0 and record["first_loss"] is None and record["skipped"] == "stopped"


def test_a_region_without_body_is_not_adapted_and_the_network_is_unchanged():
    image, net = np.zeros((16, 32, 32), np.float32), _net()
    before = [p.detach().clone() for p in net.parameters()]
    record = adapt.adapt(net, image, (slice(2, 6), slice(4, 8), slice(4, 8)), 5.0, torch.device("cpu"), None, 0,
                         lambda: False)
    assert record["steps"] == 0 and "no voxel of the region" in record["skipped"]
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_the_crops_come_from_the_painted_region_grown_by_one_patch():
    assert adapt.context_region((40, 100, 100), (slice(10, 20), slice(30, 50), slice(0, 5)), (8, 16, 16)) == (
        slice(2, 28), slice(14, 66), slice(0, 21))
    assert adapt.context_region((4, 5, 6), None, (8, 16, 16)) == (slice(0, 4), slice(0, 5), slice(0, 6))


def _box_case():
    from hssl.fewslice import array_geometry, make_case
    from hssl.io import Volume

    image = _scan((16, 24, 24))
    truth = np.zeros(image.shape, np.uint8)
    truth[4:12, 8:24, 8:24] = 1
    volume = Volume((image * 100).astype(np.float32), array_geometry(image.shape, (1.0, 1.0, 1.0)), "box")
    return make_case(volume, truth, 3)


def test_finetuning_with_adaptation_records_it_and_keeps_the_time_budget(monkeypatch):
    from hssl import finetune as finetune_module
    from hssl.finetune import FinetuneOptions, finetune
    from hssl.progress import Progress

    budgets = set()
    fraction = finetune_module._fraction

    def spy(step, elapsed, opts, reserve=0.0):
        budgets.add(opts.time_budget)
        return fraction(step, elapsed, opts, reserve)

    monkeypatch.setattr(finetune_module, "_fraction", spy)
    case = _box_case()
    notes = []
    progress = Progress(bar=False)
    progress.log = notes.append
    opts = FinetuneOptions(time_budget=4.0, adapt_seconds=1.0, device="cpu", patch_size=(8, 16, 16),
                           init="scratch", final_step="network")
    result = finetune(case.volume, case.labels, case.annotation, opts, progress)
    record = result.model.meta["training"]["adaptation"]
    assert record["objective"] == "dense" and record["steps"] >= 1 and record["seconds"] >= 1.0
    # Fine-tuning had what the adaptation left of the budget.
    assert budgets == {4.0 - record["seconds"]}
    assert any(n.startswith("adapted to this scan:") for n in notes)
    assert result.steps >= 1
    # Off by default: nothing is recorded.
    plain = finetune(case.volume, case.labels, case.annotation,
                     FinetuneOptions(steps=2, device="cpu", patch_size=(8, 16, 16), init="scratch"), Progress(bar=False))
    assert plain.model.meta["training"]["adaptation"] is None


def test_a_stop_during_adaptation_ends_with_one_line(tmp_path):
    from hssl.finetune import FinetuneOptions, finetune
    from hssl.progress import Progress

    stop_file = tmp_path / "STOP"

    class StopWhileAdapting(Progress):
        adapted = 0

        def update(self, phase, step, total, **fields):
            super().update(phase, step, total, **fields)
            if phase == "adapt":
                self.adapted = step
                if step == 1:
                    stop_file.touch()

    case = _box_case()
    opts = FinetuneOptions(time_budget=20.0, adapt_seconds=5.0, device="cpu", patch_size=(8, 16, 16),
                           init="scratch", stop_file=str(stop_file))
    progress = StopWhileAdapting(bar=False)
    with pytest.raises(HSSLError, match=r"stopped before its first step \(during the adaptation to the scan\)"):
        finetune(case.volume, case.labels, case.annotation, opts, progress)
    assert progress.adapted == 1  # the next check of the stop request ended the adaptation
    # A stop before the first adaptation step ends the same way.
    notes = []
    progress = Progress(bar=False)
    progress.log = notes.append
    with pytest.raises(HSSLError, match=r"during the adaptation to the scan"):
        finetune(case.volume, case.labels, case.annotation, opts, progress)
    assert "note: no adaptation to this scan: stopped" in notes


@pytest.mark.parametrize("seconds, budget, message", [(-1.0, 10.0, "non-negative"), (float("nan"), 10.0, "non-negative"),
                                                      (5.0, 10.0, "less than half")])
def test_adaptation_seconds_are_checked(seconds, budget, message):
    from hssl.finetune import FinetuneOptions

    with pytest.raises(HSSLError, match=message):
        FinetuneOptions(time_budget=budget, adapt_seconds=seconds).validate()
    FinetuneOptions(time_budget=budget, adapt_seconds=4.9).validate()


def test_the_job_key_for_adaptation_is_checked():
    from hssl.jobspec import JobSpec, JobSpecError

    base = dict(kind="finetune", image="/data/ct.nrrd", labels="/data/seg.nrrd", model_out="/data/model")
    assert JobSpec(**base, adapt_s=10.0).validate().to_dict()["adapt_s"] == 10.0
    assert JobSpec(**base, adapt_s=0).validate().to_dict()["adapt_s"] == 0
    with pytest.raises(JobSpecError, match="adapt_s"):
        JobSpec(**base, adapt_s=-1.0).validate()


def test_out_of_memory_ends_the_adaptation_and_fine_tuning_goes_on(monkeypatch):
    image, net = _scan(), _net()
    calls = []

    def pyramid(x):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return SegNet.pyramid(net, x)

    monkeypatch.setattr(net, "pyramid", pyramid)
    record = adapt.adapt(net, image, None, 60.0, torch.device("cpu"), None, 0, lambda: False)
    assert record["steps"] == 1 and record["skipped"] == "out of memory on cpu at step 2"
    monkeypatch.setattr(net, "pyramid", lambda x: (_ for _ in ()).throw(RuntimeError("a real bug")))
    with pytest.raises(RuntimeError, match="a real bug"):  # anything else is not swallowed
        adapt.adapt(net, image, None, 60.0, torch.device("cpu"), None, 0, lambda: False)
