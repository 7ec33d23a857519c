"""hssl.fewslice: which slices a few-slice case paints, what is known, what is scored, and the score,
against expectations worked out by hand on tiny arrays."""
import numpy as np
import pytest

from hssl import fewslice
from hssl.errors import HSSLError
from hssl.io import LabelInfo, Labels, Volume, write_labelmap
from hssl.sparse import SliceRef
from hssl.workflow import load_inputs


def volume_of(shape, spacing_zyx=(3.0, 1.0, 1.0)):
    image = np.arange(np.prod(shape), dtype=np.int16).reshape(shape)  # not constant: a readable image
    return Volume(image, fewslice.array_geometry(shape, spacing_zyx))


def test_slices_are_spread_through_the_structure():
    ref = np.zeros((30, 8, 8), dtype=np.uint8)
    ref[10:21, 2:6, 2:6] = 1  # 11 slices: 10..20
    assert fewslice.structure_slices(ref) == list(range(10, 21))
    # Inner quantiles of the 11 slices: 1/2 -> index 5; 1/4, 2/4, 3/4 -> 2.5, 5, 7.5 -> 2, 5, 8 (round half even).
    assert fewslice.pick_slices(ref, 1) == [15]
    assert fewslice.pick_slices(ref, 3) == [12, 15, 18]
    # Along another axis: the structure spans y 2..5.
    assert fewslice.pick_slices(ref, 1, axis=1) == [4]
    with pytest.raises(HSSLError, match="empty"):
        fewslice.pick_slices(np.zeros_like(ref), 2)


def test_several_classes_are_spread_over_all_their_foreground():
    ref = np.zeros((20, 6, 6), dtype=np.uint8)
    ref[2:6, 1:3, 1:3] = 1  # class 1 on slices 2..5
    ref[12:16, 3:5, 3:5] = 2  # class 2 on slices 12..15
    # Foreground slices [2, 3, 4, 5, 12, 13, 14, 15]; quantiles 1/4, 2/4, 3/4 of 7 = 1.75, 3.5, 5.25 -> 2, 4, 5.
    assert fewslice.pick_slices(ref, 3) == [4, 12, 13]
    case = fewslice.make_case(volume_of(ref.shape), ref, 3)
    assert case.slices == [4, 12, 13] and case.unpainted_classes() == []
    assert [lab.value for lab in case.reference.labels] == [1, 2]
    one = fewslice.make_case(volume_of(ref.shape), ref, [3])
    assert one.unpainted_classes() == ["label_2"]


def test_the_annotation_is_what_finetune_slices_reads(tmp_path):
    ref = np.zeros((12, 5, 7), dtype=np.uint8)
    ref[3:9, 1:4, 2:5] = 1
    ref[5, 0, 0] = 2
    volume = volume_of(ref.shape)
    case = fewslice.make_case(volume, ref, [3, 5, 8])
    assert case.axis == 0 and case.slice_spec == "axial:3,5,8"
    # Painted slices carry the reference (background included), every other voxel is 0.
    assert np.array_equal(case.sparse[[3, 5, 8]], ref[[3, 5, 8]])
    assert not case.sparse[[0, 1, 2, 4, 6, 7, 9, 10, 11]].any()
    known = np.zeros(ref.shape, dtype=bool)
    known[[3, 5, 8]] = True
    assert np.array_equal(case.annotation.known, known)
    assert case.annotation.slices == [SliceRef(0, 3), SliceRef(0, 5), SliceRef(0, 8)]
    assert case.annotation.source == "listed"
    # The same files and --slices through the command line's reader give the same known voxels.
    write_labelmap(tmp_path / "image.nrrd", volume.array, volume.geometry)
    write_labelmap(tmp_path / "sparse.nrrd", case.sparse, volume.geometry)
    _, labels, annotation = load_inputs(str(tmp_path / "image.nrrd"), str(tmp_path / "sparse.nrrd"),
                                        slices=[case.slice_spec])
    assert np.array_equal(annotation.known, known) and np.array_equal(labels.array, case.sparse)


def test_the_score_region_is_the_unpainted_slices_or_the_whole_volume():
    ref = np.zeros((10, 4, 4), dtype=np.uint8)
    ref[2:7, 1:3, 1:3] = 1  # slices 2..6
    case = fewslice.make_case(volume_of(ref.shape), ref, 2)
    # Quantiles 1/3, 2/3 of 4 -> 1.33, 2.67 -> 1, 3: slices 3 and 5.
    assert case.slices == [3, 5] and not case.whole_volume and case.scored_on == "unannotated slices"
    expected = np.ones(ref.shape, dtype=bool)
    expected[[3, 5]] = False
    assert np.array_equal(case.region, expected)
    between = np.zeros(ref.shape, dtype=bool)
    between[4] = True
    assert np.array_equal(case.between(), between)
    # Asking for as many slices as the structure spans (or more) paints them all: the whole volume is scored.
    every = fewslice.make_case(volume_of(ref.shape), ref, 9)
    assert every.slices == [2, 3, 4, 5, 6] and every.whole_volume and every.region is None
    assert every.scored_on == "whole volume"


def test_dice_and_hd95_on_a_tiny_case_by_hand():
    ref = np.zeros((4, 4, 4), dtype=np.uint8)
    ref[:, 1:3, 1:3] = 1  # a 2x2 column through all 4 slices
    ref[1, 0, 0] = 2  # one voxel of class 2 on slice 1
    case = fewslice.make_case(volume_of(ref.shape, (2.0, 1.0, 1.0)), ref, [0, 3])
    pred = np.zeros_like(ref)
    pred[1, 1:3, 1:3] = 1  # slice 1: all 4 voxels of class 1
    pred[2, 1, 1:3] = 1  # slice 2: 2 of the 4 ...
    pred[2, 3, 0:2] = 1  # ... and 2 false positives
    pred[0] = 1  # painted slices are not scored
    s = fewslice.score(case, pred)
    one, two = s["classes"]
    # Class 1 on slices 1-2: 6 true positives, 8 predicted, 8 in the reference: 12 / 16.
    assert one["dice"] == pytest.approx(0.75) and one["ref_voxels"] == 8 and one["pred_voxels"] == 8
    assert two["dice"] == 0.0 and two["hd95_mm"] is None  # missed: nothing predicted
    assert s["dice"] == pytest.approx(0.375) and s["hd95_mm"] == one["hd95_mm"] > 0
    assert s["scored_on"] == "unannotated slices"
    # Whole volume: class 1 has 4 + 4 + 2 = 10 TP, 24 predicted, 16 in the reference; class 2 is 0.
    assert s["dice_volume"] == pytest.approx((2 * 10 / 40 + 0.0) / 2)
    perfect = fewslice.score(case, ref)
    assert perfect["dice"] == 1.0 and perfect["hd95_mm"] == 0.0
    quick = fewslice.score(case, pred, hd95=False)
    assert quick["dice"] == s["dice"] and quick["hd95_mm"] is None
    with pytest.raises(HSSLError, match="shape"):
        fewslice.score(case, pred[:3])


def test_the_axis_is_found_by_its_orientation_name():
    # Array axis 2 (image i) points head-foot: its slices are the axial ones.
    ref = np.zeros((6, 5, 9), dtype=np.uint8)
    ref[1:4, 1:4, 2:7] = 1
    volume = volume_of(ref.shape)
    volume.geometry = type(volume.geometry)(volume.geometry.size, volume.geometry.spacing, (0.0, 0.0, 0.0),
                                            (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0))
    case = fewslice.make_case(volume, ref, 1)
    assert case.axis == 2 and case.slices == [4] and case.slice_spec == "axial:4"
    assert case.annotation.known[:, :, 4].all() and case.annotation.known.sum() == 6 * 5


def test_bad_cases_fail_with_an_hssl_error():
    ref = np.zeros((6, 4, 4), dtype=np.uint8)
    with pytest.raises(HSSLError, match="empty"):
        fewslice.make_case(volume_of(ref.shape), ref, 2)
    ref[2] = 1
    with pytest.raises(HSSLError, match="at least 1"):
        fewslice.make_case(volume_of(ref.shape), ref, 0)
    with pytest.raises(HSSLError, match="within 0..5"):
        fewslice.make_case(volume_of(ref.shape), ref, [2, 6])
    with pytest.raises(HSSLError, match="shape"):
        fewslice.make_case(volume_of((5, 4, 4)), ref, 1)
    with pytest.raises(HSSLError, match="unknown sample case"):
        fewslice.sample_case("lung9", 3)


def test_labels_keep_the_reference_table():
    ref = np.zeros((5, 3, 3), dtype=np.uint8)
    ref[1:4, 1, 1] = 7
    table = [LabelInfo("nodule", 7, (1.0, 0.0, 0.0))]
    case = fewslice.make_case(volume_of(ref.shape), Labels(ref, table), 1)
    assert case.slices == [2] and case.labels.labels == table and case.labels.array is case.sparse


def test_painting_axis_leaves_the_axial_slices_for_a_structure_too_thin_there():
    from hssl.fewslice import painting_axis

    ref = np.zeros((20, 40, 30), np.uint8)
    ref[8:11, 5:30, 10:20] = 1  # 3 axial slices, 25 along y, 10 along x
    assert painting_axis(ref, 3, 0) == 1
    assert painting_axis(ref, 1, 0) == 0  # 3 >= 2 x 1: axial is thick enough for one slice
    ref[2:18] = ref[8:11].max(axis=0)  # now 16 axial slices
    assert painting_axis(ref, 3, 0) == 0
