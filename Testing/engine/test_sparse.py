"""Annotated-slice detection (any orientation), known-voxel masks and the hold-out choice."""
import numpy as np
import pytest

from hssl.errors import HSSLError
from hssl.sparse import (SliceRef, choose_holdout, detect_annotated_slices, known_mask, parse_slices,
                         resolve_annotation)

NAMES = ("axial", "coronal", "sagittal")


def blob(shape=(30, 40, 50)):
    z, y, x = np.indices(shape)
    return (((z - 15) / 10) ** 2 + ((y - 20) / 12) ** 2 + ((x - 25) / 15) ** 2 <= 1).astype(np.uint8)


def paint(full, refs):
    out = np.zeros_like(full)
    mask = known_mask(full.shape, refs)
    out[mask] = full[mask]
    return out


@pytest.mark.parametrize("refs", [
    [SliceRef(0, 10), SliceRef(0, 15), SliceRef(0, 20)],  # axial
    [SliceRef(1, 14), SliceRef(1, 25)],  # coronal
    [SliceRef(2, 20)],  # one sagittal slice
    [SliceRef(0, 15), SliceRef(1, 20), SliceRef(2, 25)],  # all three orientations at once
    [SliceRef(0, 12), SliceRef(0, 13), SliceRef(0, 20)],  # two adjacent slices
])
def test_detects_painted_slices(refs):
    full = blob()
    assert detect_annotated_slices(paint(full, refs)) == sorted(refs)


def test_multiclass_slices_are_detected():
    full = blob()
    full[full.shape[0] // 2:][full[full.shape[0] // 2:] == 1] = 2
    refs = [SliceRef(0, 10), SliceRef(0, 18), SliceRef(2, 25)]
    sparse = paint(full, refs)
    assert set(np.unique(sparse)) == {0, 1, 2}
    assert detect_annotated_slices(sparse) == refs


def test_unknown_voxels_are_outside_painted_slices_and_painted_background_is_known():
    full = blob()
    refs = [SliceRef(0, 10), SliceRef(1, 20)]
    ann = resolve_annotation(paint(full, refs), NAMES)
    assert ann.source == "detected"
    assert ann.known[10].all() and ann.known[:, 20].all()  # background pixels of painted slices are known
    assert not ann.known[5, 5, 5] and ann.known.sum() == 40 * 50 + 30 * 50 - 50


def test_explicit_slice_list_adds_background_only_slices():
    full = blob()
    sparse = paint(full, [SliceRef(0, 15)])
    ann = resolve_annotation(sparse, NAMES, slices=["axial:15,2", "sagittal:0"])
    assert ann.slices == [SliceRef(0, 2), SliceRef(0, 15), SliceRef(2, 0)]
    assert ann.known[2].all() and not sparse[2].any()


def test_listed_slices_must_cover_all_painted_voxels():
    sparse = paint(blob(), [SliceRef(0, 15), SliceRef(0, 18)])
    with pytest.raises(HSSLError, match="outside the given annotated slices"):
        resolve_annotation(sparse, NAMES, slices=["axial:15"])


@pytest.mark.parametrize("spec, message", [("oblique:3", "orientation"), ("axial:x", "integers"),
                                           ("axial:99", "outside"), ("axial:", "names no index")])
def test_bad_slice_specs(spec, message):
    with pytest.raises(HSSLError, match=message):
        parse_slices([spec], (30, 40, 50), NAMES)


def test_index_axes_and_orientation_names_agree():
    assert parse_slices(["k:3", "axial:4", "i:7"], (30, 40, 50), NAMES) == [
        SliceRef(0, 3), SliceRef(0, 4), SliceRef(2, 7)]


def test_empty_annotation_is_an_error():
    with pytest.raises(HSSLError, match="no annotated voxel"):
        resolve_annotation(np.zeros((5, 6, 7), np.uint8), NAMES)
    with pytest.raises(HSSLError, match="mask is empty"):
        resolve_annotation(np.zeros((5, 6, 7), np.uint8), NAMES, mask=np.zeros((5, 6, 7), bool))


def test_holdout_needs_three_slices_and_keeps_two_with_foreground():
    full = blob()
    two = [SliceRef(0, 10), SliceRef(0, 20)]
    assert choose_holdout(paint(full, two), two) is None
    three = [SliceRef(0, 8), SliceRef(0, 15), SliceRef(0, 22)]
    assert choose_holdout(paint(full, three), three) == SliceRef(0, 15)


def test_holdout_never_hides_a_segment_painted_on_one_slice_only():
    labels = np.zeros((30, 20, 20), np.uint8)
    slices = [SliceRef(0, 5), SliceRef(0, 15), SliceRef(0, 25)]
    for ref in slices:
        labels[ref.index, 5:10, 5:10] = 1
    labels[15, 12:15, 12:15] = 2  # segment 2 only on the middle slice
    assert choose_holdout(labels, slices) == SliceRef(0, 25)  # nearest the middle that hides nothing
    labels[25, 12:15, 2:4] = 3  # ... and segment 3 only on the last one
    assert choose_holdout(labels, slices) == SliceRef(0, 5)
    labels[5, 1:3, 1:3] = 4  # every slice now holds a segment of its own
    assert choose_holdout(labels, slices) is None
