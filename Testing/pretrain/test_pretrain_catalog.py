"""The catalog on tiny MSD-style trees and folders built here: tasks and groups, skipped images,
preprocessing into the cache, the manifest, and balanced sampling."""
import json
import os

import numpy as np
import pytest

from hssl.errors import HSSLError
from hssl.pretrain.catalog import build_catalog, load_manifest
from hssl.pretrain.config import AugmentConfig, DataConfig
from hssl.pretrain.sampling import BalancedSampler, PairBatches
from pretrain_helpers import body_volume, make_msd, tiny_tree, write_volume

CROP = [4, 16, 16]


def _data(sources, **kw):
    return DataConfig(sources=sources, spacing={"ct": [3.0, 1.5, 1.5], "mr": [4.0, 1.5, 1.5]}, **kw)


def test_msd_and_folder_sources_make_tasks_groups_and_a_cache(tmp_path):
    sources = tiny_tree(tmp_path / "data")
    warnings = []
    cat = build_catalog(_data(sources), tmp_path / "cache", CROP, warnings.append)
    assert sorted(cat.tasks) == cat.tasks
    assert set(cat.tasks) == {"CT", "mr_scans"}  # MSD task name from dataset.json ("Task01_CT" -> "CT")
    assert cat.groups == ["ct", "mr"]
    assert len(cat.images) == 5 and not cat.skipped and not warnings
    ct = [im for im in cat.images if im.group == "ct"]
    assert len(ct) == 3 and all(im.task == "CT" and im.task_id == cat.tasks.index("CT") for im in ct)
    assert {im.group_id for im in cat.images if im.task == "mr_scans"} == {cat.groups.index("mr")}
    for im in cat.images:
        a = im.array(cat.cache_dir)
        assert isinstance(a, np.memmap) and a.dtype == np.float16 and a.shape == im.shape
        assert float(a.min()) >= 0 and float(a.max()) <= 1.0
        # Resampled from 1 mm to 1.5 mm in-plane (40 -> 27 voxels), then cropped to the body (< 27).
        assert im.spacing[1:] == (1.5, 1.5) and a.shape[1] < 27 and a.shape[2] < 27
    ct_values = ct[0].array(cat.cache_dir)
    # CT uses the fixed HU window of hssl.normalize: tissue at 40 HU sits at (40 + 1000) / 2000.
    assert abs(float(np.median(ct_values[ct_values > 0.3])) - 0.52) < 0.03
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["tasks"] == cat.tasks and len(manifest["images"]) == 5
    assert all((tmp_path / "cache" / e["file"]).is_file() for e in manifest["images"])
    assert load_manifest(tmp_path / "cache").tasks == cat.tasks


def test_cache_is_reused_and_refreshed_when_settings_change(tmp_path):
    sources = tiny_tree(tmp_path / "data")
    cat = build_catalog(_data(sources), tmp_path / "cache", CROP, lambda m: None)
    files = {im.file: os.stat(tmp_path / "cache" / im.file).st_mtime_ns for im in cat.images}
    again = build_catalog(_data(sources), tmp_path / "cache", CROP, lambda m: None)
    assert {im.file: os.stat(tmp_path / "cache" / im.file).st_mtime_ns for im in again.images} == files
    changed = build_catalog(_data(sources, body_margin=1), tmp_path / "cache", CROP, lambda m: None)
    assert not set(im.file for im in changed.images) & set(files)


def test_missing_2d_corrupt_and_4d_images_are_skipped_and_counted(tmp_path):
    root = make_msd(tmp_path, "Task02_Mixed", n_train=2, n_test=0, missing=2)
    write_volume(root / "imagesTs" / "flat.nii.gz", body_volume((1, 30, 30)))  # one slice
    (root / "imagesTs" / "broken.nii.gz").write_bytes(b"not an image at all")
    meta = json.loads((root / "dataset.json").read_text())
    meta["test"] = ["./imagesTs/flat.nii.gz", "./imagesTs/broken.nii.gz"]
    (root / "dataset.json").write_text(json.dumps(meta))
    warnings = []
    cat = build_catalog(_data([{"kind": "msd", "path": str(root)}]), tmp_path / "cache", CROP, warnings.append)
    assert len(cat.images) == 2
    assert len(cat.skipped["missing"]) == 2 and len(cat.skipped["not 3D"]) == 1 and len(cat.skipped["unreadable"]) == 1
    assert any("4 image(s) skipped" in w and "2 used" in w for w in warnings)
    assert sum("gone_" in w for w in warnings) == 2


def test_multichannel_msd_uses_the_chosen_channel_and_mr_modality(tmp_path):
    root = make_msd(tmp_path, "Task03_Brain", modality={"0": "FLAIR", "1": "T1w"}, n_train=2, n_test=0,
                    channels=2, kind="mr")
    cat = build_catalog(_data([{"kind": "msd", "path": str(root)}]), tmp_path / "c0", CROP, lambda m: None)
    assert cat.groups == ["mr"] and len(cat.images) == 2
    other = build_catalog(_data([{"kind": "msd", "path": str(root), "channel": 1}]), tmp_path / "c1", CROP,
                          lambda m: None)
    a0 = cat.images[0].array(cat.cache_dir)
    a1 = other.images[0].array(other.cache_dir)
    assert a0.shape != a1.shape or not np.array_equal(a0, a1)  # a different phantom per channel
    with pytest.raises(HSSLError, match="no usable image"):
        build_catalog(_data([{"kind": "msd", "path": str(root), "channel": 5}]), tmp_path / "c5", CROP, lambda m: None)


def test_empty_and_all_skipped_catalogs_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(HSSLError, match="catalog is empty"):
        build_catalog(_data([{"kind": "folder", "path": str(tmp_path / "empty")}]), tmp_path / "c", CROP, lambda m: None)
    root = make_msd(tmp_path, "Task04_Gone", n_train=0, n_test=0, missing=3)
    with pytest.raises(HSSLError, match=r"all 3 listed image\(s\) were skipped \(missing: 3\)"):
        build_catalog(_data([{"kind": "msd", "path": str(root)}]), tmp_path / "c", CROP, lambda m: None)
    with pytest.raises(HSSLError, match="does not exist"):
        build_catalog(_data([{"kind": "msd", "path": str(tmp_path / "nowhere")}]), tmp_path / "c", CROP, lambda m: None)
    with pytest.raises(HSSLError, match="unknown config key 'data.sources\\[0\\].pth'"):
        build_catalog(_data([{"kind": "folder", "pth": "x"}]), tmp_path / "c", CROP, lambda m: None)


def test_include_exclude_and_explicit_task_group(tmp_path):
    for i in range(3):
        write_volume(tmp_path / "scans" / f"s{i}.nrrd", body_volume(modality="ct", seed=i))
    src = {"kind": "folder", "path": str(tmp_path / "scans"), "glob": "*.nrrd", "exclude": ["s1.*"],
           "task": "chest", "group": "ct-chest", "modality": "ct"}
    cat = build_catalog(_data([src]), tmp_path / "c", CROP, lambda m: None)
    assert cat.tasks == ["chest"] and cat.groups == ["ct-chest"] and len(cat.images) == 2
    assert all(not im.source_path.endswith("s1.nrrd") for im in cat.images)


def test_hierarchical_balance_gives_small_tasks_their_share(tmp_path):
    # group ct: task big (6 images) and task small (1 image); group mr: one task of 1 image.
    sources = []
    for task, n, kind in (("big", 6, "ct"), ("small", 1, "ct"), ("mri", 1, "mr")):
        for i in range(n):
            write_volume(tmp_path / task / f"{i}.nrrd", body_volume(modality=kind, seed=i))
        sources.append({"kind": "folder", "path": str(tmp_path / task), "glob": "*.nrrd", "modality": kind})
    cat = build_catalog(_data(sources), tmp_path / "c", CROP, lambda m: None)
    by_task = lambda p: {t: sum(p[i] for i, im in enumerate(cat.images) if im.task == t) for t in cat.tasks}  # noqa: E731
    assert by_task(BalancedSampler(cat, "hierarchical").probabilities()) == pytest.approx(
        {"big": 0.25, "small": 0.25, "mri": 0.5})
    assert by_task(BalancedSampler(cat, "task").probabilities()) == pytest.approx({t: 1 / 3 for t in cat.tasks})
    assert by_task(BalancedSampler(cat, "image").probabilities()) == pytest.approx(
        {"big": 0.75, "small": 0.125, "mri": 0.125})
    sampler = BalancedSampler(cat, "hierarchical")
    rng = np.random.default_rng(0)
    counts = np.bincount([sampler.choose(rng) for _ in range(4000)], minlength=len(cat.images)) / 4000
    assert np.allclose(counts, sampler.probabilities(), atol=0.03)


def test_pair_batches_are_a_function_of_the_step(tmp_path):
    cat = build_catalog(_data(tiny_tree(tmp_path / "data")), tmp_path / "c", CROP, lambda m: None)
    batches = PairBatches(cat, CROP, 3, AugmentConfig(), seed=1)
    a, b = batches.batch(5), batches.batch(5)
    assert a["views"].shape == (6, 1, 4, 16, 16) and a["clean"].shape == (6, 1, 4, 16, 16)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["views"], batches.batch(6)["views"])
    assert not np.array_equal(a["views"][:3], a["views"][3:])  # the two views differ
    other_rank = PairBatches(cat, CROP, 3, AugmentConfig(), seed=1, rank=1).batch(5)
    assert not np.array_equal(a["views"], other_rank["views"])
    assert a["task"].dtype == np.int64 and set(a["task"]) <= set(range(len(cat.tasks)))
