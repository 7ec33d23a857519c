"""Labels stored on the image grid indexed the other way along some axes (how Slicer exports a
segmentation of a left-handed volume) are flipped back onto the image grid; any other grid
difference, a permutation of axes included, is still refused."""
import json
import logging

import numpy as np
import pytest
import SimpleITK as sitk

from engine_helpers import assert_one_line_error, oblique_direction, run_cli
from hssl import io
from hssl.errors import HSSLError

REV_SHAPE = (12, 16, 18)  # [z, y, x]
REV_SPACING = (0.75, 0.75, 3.0)  # (x, y, z) mm; equal in-plane spacing so a transposed grid differs only by axis order
REV_ORIGIN = (-20.5, 14.25, 88.0)


def rev_left_handed_direction():
    """An oblique rotation with its k column negated: determinant -1, like brain1."""
    d = np.array(oblique_direction()).reshape(3, 3)
    d[:, 2] = -d[:, 2]
    assert np.linalg.det(d) < 0
    return tuple(d.reshape(-1))


def rev_reference_array():
    """[z, y, x] labels that no flip maps onto themselves."""
    a = np.zeros(REV_SHAPE, dtype=np.uint8)
    a[2:7, 3:9, 4:15] = 1
    a[8:11, 10:15, 1:5] = 2
    return a


def rev_prediction_array():
    """The reference moved by a voxel here and there: Dice below 1 for both labels."""
    a = np.zeros(REV_SHAPE, dtype=np.uint8)
    a[3:8, 3:9, 5:16] = 1
    a[8:11, 11:15, 1:6] = 2
    return a


def rev_sitk(array, spacing=REV_SPACING, origin=REV_ORIGIN, direction=None):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetDirection(direction or rev_left_handed_direction())
    return image


def rev_reversed_grid(array, axes, spacing=REV_SPACING, origin=REV_ORIGIN, direction=None):
    """``array`` and the grid holding the same voxel centres indexed backwards along image axes
    ``axes`` (0 = i, 1 = j, 2 = k): (flipped array, origin, direction). Computed here by hand,
    independently of hssl.io."""
    d = np.array(direction or rev_left_handed_direction()).reshape(3, 3)
    o = np.array(origin, dtype=np.float64)
    size_xyz = array.shape[::-1]
    for a in axes:
        o = o + (size_xyz[a] - 1) * spacing[a] * d[:, a]
        d[:, a] = -d[:, a]
    flipped = np.ascontiguousarray(np.flip(array, [2 - a for a in axes]))
    return flipped, tuple(o), tuple(d.reshape(-1))


def rev_write_reversed(path, array, axes):
    """Write ``array`` (on the image grid) as a labelmap or .seg.nrrd on the reversed grid."""
    flipped, origin, direction = rev_reversed_grid(array, axes)
    if str(path).endswith(".seg.nrrd"):
        size = tuple(int(s) for s in flipped.shape[::-1])
        geometry = io.Geometry(size, REV_SPACING, origin, direction)
        io.write_segmentation(path, flipped, geometry, io.default_label_table([1, 2]))
    else:
        sitk.WriteImage(rev_sitk(flipped, origin=origin, direction=direction), str(path))
    return path


@pytest.fixture
def rev_image(tmp_path):
    """(path, Geometry) of a left-handed image written as NRRD."""
    rng = np.random.default_rng(3)
    path = tmp_path / "image.nrrd"
    sitk.WriteImage(rev_sitk(rng.normal(0, 100, REV_SHAPE).astype(np.int16)), str(path))
    return path, io.read_image(path).geometry


@pytest.mark.parametrize("suffix", [".nrrd", ".seg.nrrd"])
def test_left_handed_labels_stored_with_k_reversed_read_like_the_original(tmp_path, rev_image, suffix):
    _, geometry = rev_image
    assert np.linalg.det(np.array(geometry.direction).reshape(3, 3)) < 0
    ref = rev_reference_array()
    sitk.WriteImage(rev_sitk(ref), str(tmp_path / "as_is.nrrd"))
    reversed_path = rev_write_reversed(tmp_path / f"reversed{suffix}", ref, axes=(2,))
    stored = sitk.ReadImage(str(reversed_path))
    assert np.linalg.det(np.array(stored.GetDirection()).reshape(3, 3)) > 0  # Slicer's right-handed grid
    as_is = io.read_labels(tmp_path / "as_is.nrrd", geometry)
    back = io.read_labels(reversed_path, geometry)
    np.testing.assert_array_equal(as_is.array, ref)
    np.testing.assert_array_equal(back.array, ref)
    assert back.array.shape == geometry.shape and back.array.flags.c_contiguous


@pytest.mark.parametrize("axes", [(0,), (1,), (0, 2), (0, 1, 2)])
def test_labels_reversed_along_in_plane_axes_read_like_the_original(tmp_path, rev_image, axes):
    _, geometry = rev_image
    ref = rev_reference_array()
    for suffix in (".nrrd", ".seg.nrrd"):
        path = rev_write_reversed(tmp_path / f"reversed{suffix}", ref, axes)
        back = io.read_labels(path, geometry).array
        np.testing.assert_array_equal(back, ref)
        assert back.shape == geometry.shape and back.any()


def test_reversed_and_cropped_segmentation_is_flipped_and_pasted(tmp_path, rev_image):
    _, geometry = rev_image
    ref = rev_reference_array()
    # A voxel-aligned part of the grid (Slicer crops segmentations to their extent), stored backwards.
    z0, y0, x0 = 1, 2, 3
    part = ref[z0:11, y0:15, x0:16]
    origin = np.array(REV_ORIGIN) + np.array(rev_left_handed_direction()).reshape(3, 3) @ (
        np.array([x0, y0, z0]) * np.array(REV_SPACING))
    flipped, o, d = rev_reversed_grid(part, (0, 2), origin=origin)
    sitk.WriteImage(rev_sitk(flipped, origin=o, direction=d), str(tmp_path / "crop.nrrd"))
    expected = np.zeros_like(ref)
    expected[z0:11, y0:15, x0:16] = part
    back = io.read_labels(tmp_path / "crop.nrrd", geometry).array
    np.testing.assert_array_equal(back, expected)
    assert back.shape == geometry.shape and int(back.sum()) == int(part.sum()) > 0


def test_flip_is_logged(tmp_path, rev_image, caplog):
    _, geometry = rev_image
    path = rev_write_reversed(tmp_path / "reversed.seg.nrrd", rev_reference_array(), axes=(2,))
    with caplog.at_level(logging.INFO, logger="hssl.io"):
        io.read_labels(path, geometry)
    notes = [r.getMessage() for r in caplog.records if "reversed" in r.getMessage()]
    assert len(notes) == 1 and "axis k (axial)" in notes[0] and "flipped onto the image grid" in notes[0], notes
    caplog.clear()
    sitk.WriteImage(rev_sitk(rev_reference_array()), str(tmp_path / "as_is.nrrd"))
    with caplog.at_level(logging.INFO, logger="hssl.io"):
        io.read_labels(tmp_path / "as_is.nrrd", geometry)
    assert not caplog.records


def rev_other_grids():
    """(name, array, spacing, origin, direction) of grids that are not the image grid reversed."""
    ref = rev_reference_array()
    d = np.array(rev_left_handed_direction()).reshape(3, 3)
    flipped, origin, direction = rev_reversed_grid(ref, (2,))
    half_voxel = tuple(np.array(origin) + 0.5 * REV_SPACING[0] * d[:, 0])
    # Transposed: i and j swapped (array, spacing and direction columns together), physically the same voxels.
    swapped = d[:, [1, 0, 2]]
    transposed = np.ascontiguousarray(ref.transpose(0, 2, 1))
    # Transposed and reversed along k.
    t_flipped = np.ascontiguousarray(transposed[::-1])
    t_origin = tuple(np.array(REV_ORIGIN) + (REV_SHAPE[0] - 1) * REV_SPACING[2] * d[:, 2])
    t_direction = swapped.copy()
    t_direction[:, 2] = -t_direction[:, 2]
    return [
        ("half-voxel", flipped, REV_SPACING, half_voxel, direction),
        ("spacing", flipped, (0.75, 0.75, 2.9), origin, direction),
        ("transposed", transposed, REV_SPACING, REV_ORIGIN, tuple(swapped.reshape(-1))),
        ("transposed-reversed", t_flipped, REV_SPACING, t_origin, tuple(t_direction.reshape(-1))),
    ]


@pytest.mark.parametrize("case", [c[0] for c in rev_other_grids()])
def test_other_grids_are_still_refused(tmp_path, rev_image, case):
    _, geometry = rev_image
    _, array, spacing, origin, direction = next(c for c in rev_other_grids() if c[0] == case)
    sitk.WriteImage(rev_sitk(array, spacing, origin, direction), str(tmp_path / "other.nrrd"))
    with pytest.raises(HSSLError, match="do not match the image geometry") as err:
        io.read_labels(tmp_path / "other.nrrd", geometry)
    assert "\n" not in str(err.value)


def rev_scores(proc):
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    rows = [(r["value"], r["dice"], r["hd95_mm"], r["ref_voxels"], r["pred_voxels"]) for r in result["labels"]]
    return rows, result["mean_dice"], result["region_voxels"]


def test_cli_evaluate_reversed_prediction_scores_like_the_original(tmp_path):
    ref, pred = rev_reference_array(), rev_prediction_array()
    sparse = np.zeros_like(ref)
    sparse[[3, 9]] = ref[[3, 9]]
    sitk.WriteImage(rev_sitk(ref), str(tmp_path / "ref.nrrd"))
    sitk.WriteImage(rev_sitk(pred), str(tmp_path / "pred.nrrd"))
    sitk.WriteImage(rev_sitk(sparse), str(tmp_path / "sparse.nrrd"))
    rev_write_reversed(tmp_path / "pred_slicer.seg.nrrd", pred, axes=(2,))
    rev_write_reversed(tmp_path / "sparse_slicer.seg.nrrd", sparse, axes=(2,))
    env = {"PYTHONUTF8": "1"}

    def evaluate(*args):
        return rev_scores(run_cli("evaluate", "--ref", tmp_path / "ref.nrrd", "--json", *args, env=env))

    whole = evaluate("--pred", tmp_path / "pred.nrrd")
    assert whole == evaluate("--pred", tmp_path / "pred_slicer.seg.nrrd")
    assert 0 < whole[1] < 1 and all(0 < row[1] < 1 for row in whole[0])
    unannotated = evaluate("--pred", tmp_path / "pred.nrrd", "--exclude-annotated", tmp_path / "sparse.nrrd")
    assert unannotated == evaluate("--pred", tmp_path / "pred_slicer.seg.nrrd",
                                   "--exclude-annotated", tmp_path / "sparse_slicer.seg.nrrd")
    assert unannotated[2] < whole[2]
    # A transposed prediction stays a one-line input error.
    sitk.WriteImage(rev_sitk(np.ascontiguousarray(pred.transpose(0, 2, 1)), direction=tuple(
        np.array(rev_left_handed_direction()).reshape(3, 3)[:, [1, 0, 2]].reshape(-1))), str(tmp_path / "t.nrrd"))
    proc = run_cli("evaluate", "--ref", tmp_path / "ref.nrrd", "--pred", tmp_path / "t.nrrd", env=env)
    assert_one_line_error(proc, "do not match the image geometry")
