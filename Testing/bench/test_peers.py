"""The Slicer peer methods (scripts/bench/peers.py) on small crops of real scans.

Each peer runs slicer-core's own filter; what is checked is the wrapping: the output lies on the
input grid with the input's dtype, the painted slices come back exactly, something is filled
between them, the grow-cut's extra background label never leaks out, the effect's region is
the one Slicer computes, and the process exits cleanly after the filters ran.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from bench import devset, peers  # noqa: E402
from hssl.demo import pick_slices  # noqa: E402
from hssl.evaluate import dice  # noqa: E402
from hssl.sparse import SliceRef, known_mask  # noqa: E402



def import_slicer_core():
    """slicer-core's ``slicer`` meta-package imports every module of every ``slicer`` folder on
    sys.path; pytest puts Testing/ there, whose slicer/ holds the Slicer-side tests, which cannot
    be imported from here. Importing it once without Testing/ on the path avoids that."""
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "Testing"]
    try:
        return pytest.importorskip("slicer", reason="slicer-core is not installed (scripts/requirements-ci.txt has it)")
    finally:
        sys.path[:] = saved


import_slicer_core()


def needs(name):
    if not devset.available(name):
        pytest.skip(f"sample data for '{name}' not cached: run 'hssl data fetch'")


def crop_case(name, margin):
    """A case cropped to its reference's box plus ``margin`` voxels (z, y, x), with 3 painted axial slices."""
    needs(name)
    case = devset.load_case(name)
    ref = case.reference.array
    box = tuple(slice(max(0, int(idx.min()) - m), int(idx.max()) + m + 1) for idx, m in zip(np.nonzero(ref), margin))
    image, ref = case.volume.array[box], ref[box]
    slices = pick_slices(ref > 0, 3, case.axis)
    known = known_mask(ref.shape, [SliceRef(case.axis, s) for s in slices])
    sparse = np.where(known, ref, 0).astype(ref.dtype)
    spacing = case.volume.geometry.spacing[::-1]
    return image, ref, sparse, known, slices, spacing


@pytest.fixture(scope="module")
def tumour():
    return crop_case("lung2_tumour", (2, 12, 12))


@pytest.fixture(scope="module")
def nuclei():
    return crop_case("mni_nuclei", (4, 6, 6))


def check_common(out, ref, sparse, known, slices):
    assert out.shape == sparse.shape and out.dtype == sparse.dtype
    assert np.array_equal(out[known], sparse[known]), "the painted slices changed"
    between = np.zeros(out.shape, bool)
    between[slices[0] + 1:slices[-1]] = True
    between &= ~known
    assert out[between].any(), "nothing was filled between the painted slices"
    assert set(np.unique(out)) <= set(np.unique(ref)), "a label value that was never painted appeared"


def test_fill_between_slices_on_a_real_tumour(tumour):
    image, ref, sparse, known, slices, spacing = tumour
    out = peers.fill_between_slices(sparse, known, spacing)
    check_common(out, ref, sparse, known, slices)
    # Interpolation never reaches beyond the outermost painted slices.
    assert not out[:slices[0]].any() and not out[slices[-1] + 1:].any()
    assert dice(out[~known] > 0, ref[~known] > 0) > 0.6


def test_grow_from_seeds_on_a_real_tumour(tumour):
    image, ref, sparse, known, slices, spacing = tumour
    out = peers.grow_from_seeds(image, sparse, known, spacing)
    check_common(out, ref, sparse, known, slices)
    assert out.max() == 1, "the extra background label leaked into the output"
    assert dice(out[~known] > 0, ref[~known] > 0) > 0.6


def test_both_peers_keep_four_label_values(nuclei):
    image, ref, sparse, known, slices, spacing = nuclei
    for out in (peers.fill_between_slices(sparse, known, spacing),
                peers.grow_from_seeds(image, sparse, known, spacing)):
        check_common(out, ref, sparse, known, slices)
        assert set(np.unique(out)) == {0, 1, 2, 3, 4}
        for value in range(1, 5):
            assert dice(out[~known] == value, ref[~known] == value) > 0.3


def test_grow_from_seeds_stays_in_the_effects_region(tumour):
    image, ref, sparse, known, slices, spacing = tumour
    # Seeds cover whole slices (the extra background), so the region is every row and column
    # and, along z, the painted range plus max(3, 10% of it).
    region = peers.effect_region(known)
    margin = max(3, int(0.1 * (slices[-1] - slices[0])))
    assert region == (slice(max(0, slices[0] - margin), min(ref.shape[0], slices[-1] + margin + 1)),
                      slice(0, ref.shape[1]), slice(0, ref.shape[2]))
    grown = peers.grow_from_seeds(np.pad(image, ((10, 10), (0, 0), (0, 0)), mode="edge"),
                                  np.pad(sparse, ((10, 10), (0, 0), (0, 0))),
                                  np.pad(known, ((10, 10), (0, 0), (0, 0))), spacing)
    first, last = slices[0] + 10 - margin, slices[-1] + 10 + margin
    assert not grown[:first].any() and not grown[last + 1:].any()


def test_effect_region_matches_slicers_margin_rule():
    labelled = np.zeros((50, 60, 70), bool)
    labelled[10:41, 20:23, 0:70] = True  # extents 30, 2 and 69 voxels
    assert peers.effect_region(labelled) == (slice(7, 44), slice(17, 26), slice(0, 70))
    assert peers.effect_region(labelled, margin_ratio=0.5) == (slice(0, 50), slice(17, 26), slice(0, 70))
    assert peers.effect_region(np.zeros((4, 4, 4), bool)) is None


def test_nothing_painted_gives_an_empty_result():
    sparse = np.zeros((6, 8, 8), np.uint8)
    known = np.zeros(sparse.shape, bool)
    known[2] = True
    image = np.arange(sparse.size, dtype=np.int16).reshape(sparse.shape)
    assert not peers.fill_between_slices(sparse, known).any()
    assert not peers.grow_from_seeds(image, sparse, known, (1, 1, 1)).any()


def test_bad_inputs_are_refused():
    sparse = np.zeros((6, 8, 8), np.uint8)
    with pytest.raises(ValueError, match="same 3D"):
        peers.fill_between_slices(sparse, np.zeros((6, 8, 7), bool))
    with pytest.raises(ValueError, match="integers"):
        peers.fill_between_slices(sparse.astype(np.float32), np.zeros(sparse.shape, bool))
    with pytest.raises(ValueError, match="same shape"):
        peers.grow_from_seeds(np.zeros((6, 8, 9)), sparse, np.zeros(sparse.shape, bool), (1, 1, 1))


def test_the_process_exits_cleanly_after_the_filters(tmp_path):
    """slicer-core's contour interpolator crashes the interpreter at exit unless ITK's threader is
    chosen before it runs (peers does that); a crash would turn every benchmark run's status red."""
    needs("lung2_tumour")
    script = (
        "import sys, numpy as np\n"
        f"sys.path[:0] = [{str(ROOT / 'scripts')!r}, {str(ROOT / 'HSSLSegment')!r}]\n"
        "from bench import peers\n"
        "from hssl import data, io\n"
        "volume = io.read_image(data.sample_path('lung2_image.nrrd'))\n"
        "crop = (slice(13, 28), slice(250, 400), slice(250, 450))\n"
        "ref = io.read_labels(data.sample_path('lung2_label.nrrd'), volume.geometry).array[crop]\n"
        "known = np.zeros(ref.shape, bool); known[[4, 7, 10]] = True\n"
        "sparse = np.where(known, ref, 0).astype(ref.dtype)\n"
        "out = peers.fill_between_slices(sparse, known)\n"
        "out |= peers.grow_from_seeds(volume.array[crop], sparse, known, (5, 0.6, 0.6))\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, out)\n")
    env = {k: v for k, v in os.environ.items() if k != "ITK_GLOBAL_DEFAULT_THREADER"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, f"exit status {proc.returncode}: {proc.stderr[-2000:]}"
    assert np.load(tmp_path / "out.npy").any()
