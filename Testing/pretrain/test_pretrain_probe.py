"""The linear probe (hssl.pretrain.probe): the heads learn what is linear in the features, only the
annotated voxels count, the probed network stays untouched, bad input fails with one line.

Synthetic tensors and a 3-level network keep these in a few seconds; one smoke test runs on a
real sample scan when the scans are cached."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hssl.errors import HSSLError
from hssl.network import SegNet
from hssl.plan import Plan
from hssl.pretrain import probe

TINY_PLAN = Plan(spacing=(3.0, 1.0, 1.0), patch_size=(8, 16, 16), strides=((1, 1, 1), (1, 2, 2), (2, 2, 2)),
                 kernels=((1, 3, 3), (3, 3, 3), (3, 3, 3)), channels=(4, 8, 16))


def linear_problem(seed=0):
    """Two levels of random features and a target that is a thresholded linear function of them
    (the coarse level upsampled trilinearly, as the probe does): a probe can represent it exactly."""
    g = torch.Generator().manual_seed(seed)
    fine = torch.randn(4, 8, 16, 16, generator=g)
    coarse = torch.randn(8, 4, 8, 8, generator=g)
    w_fine, w_coarse = torch.randn(4, generator=g), torch.randn(8, generator=g)
    score = torch.einsum("c,czyx->zyx", w_fine, fine)
    score = score + F.interpolate(torch.einsum("c,czyx->zyx", w_coarse, coarse)[None, None], size=(8, 16, 16),
                                  mode="trilinear", align_corners=False)[0, 0]
    target = (score > score.quantile(0.7)).long()
    known = torch.zeros(8, 16, 16, dtype=torch.bool)
    known[[1, 4, 6]] = True
    return [fine, coarse], target, known


def dice(a, b):
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def test_probe_learns_a_linear_target_from_the_known_slices():
    features, target, known = linear_problem()
    fit = probe.fit_probe(features, target, known, steps=200, seed=0)
    assert fit.logits.shape == (2, 8, 16, 16)
    assert len(fit.heads) == 2 and fit.heads[1].in_channels == 8
    assert fit.losses[-1] < fit.losses[0]
    unknown = ~known
    assert dice((fit.prediction == 1) & unknown, (target == 1) & unknown) > 0.9


def test_unknown_voxels_have_no_influence():
    features, target, known = linear_problem(seed=1)
    scrambled = target.clone()
    noise = torch.randint(0, 2, target.shape, generator=torch.Generator().manual_seed(3))
    scrambled[~known] = noise[~known]
    assert not torch.equal(scrambled, target)
    a = probe.fit_probe(features, target, known, steps=30, seed=0)
    b = probe.fit_probe(features, scrambled, known, steps=30, seed=0)
    assert torch.equal(a.logits, b.logits)
    for (_, x), (_, y) in zip(a.heads.state_dict().items(), b.heads.state_dict().items()):
        assert torch.equal(x, y)


def test_the_seed_sets_the_heads_without_touching_the_global_rng():
    features, target, known = linear_problem()
    state = torch.random.get_rng_state()
    a = probe.fit_probe(features, target, known, steps=3, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = probe.fit_probe(features, target, known, steps=3, seed=0)
    c = probe.fit_probe(features, target, known, steps=3, seed=1)
    assert torch.equal(a.logits, b.logits) and not torch.equal(a.logits, c.logits)


def test_fit_probe_rejects_bad_input():
    features, target, known = linear_problem()
    with pytest.raises(HSSLError):
        probe.fit_probe(features, target, torch.zeros_like(known), steps=3)
    with pytest.raises(HSSLError):
        probe.fit_probe(features, target, known[:4], steps=3)
    with pytest.raises(HSSLError):
        probe.fit_probe(features, target, known, steps=0)


def blob_case(shape=(10, 28, 28)):
    """A bright sphere-ish blob in noise (already normalised to about [0, 1]) and its 0/1 reference."""
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    ref = (((z - 5) / 3.0) ** 2 + ((y - 14) / 6.0) ** 2 + ((x - 13) / 6.0) ** 2) < 1
    image = (0.3 + 0.5 * ref + rng.normal(0, 0.05, shape)).astype(np.float32)
    return image, ref.astype(np.uint8)


def test_probe_volume_leaves_the_network_unchanged():
    torch.manual_seed(0)
    net = SegNet(TINY_PLAN, out_channels=2)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    image, ref = blob_case()
    row = probe.probe_volume(net, image, ref, (3.0, 1.0, 1.0), n_slices=2, seed=0, steps=40)
    after = net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert net.training and all(p.grad is None for p in net.parameters())
    assert row["levels"] == [0, 1, 2] and row["channels"] == [4, 8, 16]
    assert all(s % d == 0 for s, d in zip(row["roi_shape"], TINY_PLAN.divisor))
    assert len(row["annotated"]) == 2 and row["dice"] is not None and 0.0 <= row["dice"] <= 1.0
    lo, hi = min(row["annotated"]), max(row["annotated"])
    if hi - lo > 1:  # unannotated slices between the annotated ones: the interpolation score exists
        assert row["dice_between"] is not None and 0.0 <= row["dice_between"] <= 1.0
    assert 0.0 <= row["dice_raw"] <= 1.0


def test_dice_between_scores_only_the_slices_between_the_annotated_ones(monkeypatch):
    # A read-out that is perfect between the annotated slices and paints everything beyond them:
    # dice_between is 1, the Dice over all unannotated slices is much lower.
    torch.manual_seed(0)
    net = SegNet(TINY_PLAN, out_channels=2)
    image, ref = blob_case()
    span = np.nonzero(ref.any(axis=(1, 2)))[0]

    def fake_fit(features, target, known, steps, seed, lr, n_classes=2):
        pred = np.ones(ref.shape, dtype=np.int64)
        pred[span[0]:span[-1] + 1] = ref[span[0]:span[-1] + 1]
        return SimpleNamespace(prediction=torch.from_numpy(pred), losses=[0.0])

    monkeypatch.setattr(probe, "fit_probe", fake_fit)
    monkeypatch.setattr(probe, "crop_box", lambda roi, shape, divisor: (tuple(slice(0, s) for s in shape), (0, 0, 0)))
    row = probe.probe_volume(net, image, ref, (3.0, 1.0, 1.0), n_slices=2, seed=0, steps=1)
    assert row["dice_between"] == pytest.approx(1.0)
    assert row["dice"] < 0.9


def test_levels_choose_the_heads():
    net = SegNet(TINY_PLAN, out_channels=2)
    image, ref = blob_case()
    row = probe.probe_volume(net, image, ref, (3.0, 1.0, 1.0), n_slices=2, seed=0, steps=3, levels=[1, 0])
    assert row["levels"] == [0, 1] and row["channels"] == [4, 8]
    with pytest.raises(HSSLError, match="levels"):
        probe.probe_volume(net, image, ref, (3.0, 1.0, 1.0), n_slices=2, seed=0, steps=3, levels=[3])


def test_bad_slice_counts_fail_with_an_hssl_error():
    net = SegNet(TINY_PLAN, out_channels=2)
    image, ref = blob_case()
    spans = int(ref.any(axis=(1, 2)).sum())
    with pytest.raises(HSSLError, match="spans"):
        probe.probe_volume(net, image, ref, (3.0, 1.0, 1.0), n_slices=spans + 1, seed=0, steps=2)
    with pytest.raises(HSSLError):
        probe.probe_volume(net, image, ref, (3.0, 1.0, 1.0), n_slices=0, seed=0, steps=2)


def test_crop_box_is_a_multiple_of_the_divisor_inside_the_volume():
    box, pad = probe.crop_box((slice(3, 6), slice(5, 22), slice(0, 4)), (10, 40, 6), (2, 16, 4))
    sizes = [b.stop - b.start + p for b, p in zip(box, pad)]
    assert sizes == [4, 32, 8]
    assert all(0 <= b.start < b.stop <= n for b, n in zip(box, (10, 40, 6)))
    assert box[0] == slice(3, 7) and pad[:2] == (0, 0)
    assert box[2] == slice(0, 6) and pad[2] == 2  # the volume is too thin: padded after the end
    assert box[1].start <= 5 and box[1].stop >= 22


def test_main_refuses_bad_input_with_one_line(tmp_path, capsys):
    assert probe.main(["--out", str(tmp_path), "--cases", "nosuchcase"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "nosuchcase" in err and len(err.splitlines()) == 1
    assert probe.main(["--out", str(tmp_path), "--cases", "brain1", "--init", f"x={tmp_path / 'missing'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing" in err and len(err.splitlines()) == 1


def test_main_appends_rows_and_resumes(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_case(value, case, n, seed, steps, threads, lr, levels):
        calls.append((value, case, n, seed))
        return {"case": case, "init": value, "slices": n, "annotated": [1], "seed": seed, "steps": steps,
                "dice": 0.5, "hd95_mm": 1.0, "seconds": 0.1}

    monkeypatch.setattr(probe, "probe_case", fake_case)
    monkeypatch.setattr(probe, "resolve_network", lambda value: None)
    done = {"case": "brain1", "init": "rand", "slices": 2, "seed": 0, "steps": 7, "dice": 0.25}
    (tmp_path / "results.jsonl").write_text(json.dumps(done) + "\n")
    argv = ["--out", str(tmp_path), "--cases", "brain1", "--slices", "2", "--seeds", "0", "1",
            "--init", "rand=scratch", "hssl=bundled", "--steps", "7"]
    assert probe.main(argv) == 0
    assert calls == [("bundled", "brain1", 2, 0), ("scratch", "brain1", 2, 1), ("bundled", "brain1", 2, 1)]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["init"] for r in rows} == {"rand", "hssl"}
    assert rows[1]["init_value"] == "bundled"
    out = capsys.readouterr().out
    assert "| brain1 | 2 |" in out and "rand" in out and "hssl" in out
    calls.clear()
    assert probe.main(argv) == 0 and calls == []  # everything done: nothing runs again
    assert probe.main(argv + ["--levels", "0", "1"]) == 0 and len(calls) == 4  # another probe: new rows
    assert json.loads((tmp_path / "results.jsonl").read_text().splitlines()[-1])["level_set"] == "0 1"


def test_real_scan_smoke():
    from hssl import data

    try:
        data.sample_path("brain1_image.nrrd")
        data.sample_path("brain1_label.nrrd")
    except HSSLError as err:
        pytest.skip(f"sample scans not cached ({err}); run 'hssl data fetch'")
    row = probe.probe_case("scratch", "brain1", 2, seed=0, steps=5, threads=1)
    assert row["case"] == "brain1" and row["init"] == "scratch" and row["levels"] == [0, 1, 2, 3, 4]
    assert row["dice"] is None or 0.0 <= row["dice"] <= 1.0
    with pytest.raises(HSSLError, match="spans"):
        probe.probe_case("scratch", "brain1", 50, seed=0, steps=5, threads=1)


def test_tables_leave_out_runs_without_a_value_but_count_empty_dice_as_zero():
    from hssl.pretrain.benchmark import table

    rows = [{"case": "c", "slices": 3, "init": "scratch", "dice": None, "dice_between": None},
            {"case": "c", "slices": 3, "init": "scratch", "dice": 0.5, "dice_between": 0.8}]
    assert "| c | 3 | 0.250 (0.000, 0.500) |" in table(rows)
    assert "| c | 3 | 0.800 (0.800) |" in table(rows, "dice_between")
    assert "| c | 3 | - |" in table(rows[:1], "dice_between")
