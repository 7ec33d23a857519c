"""Geometry survives every round trip bit-exact; segment tables survive; bad files fail clearly."""
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from engine_helpers import make_volume, oblique_direction
from hssl import io
from hssl.errors import HSSLError


def geometry_of(path):
    img = sitk.ReadImage(str(path))
    return img.GetSpacing(), img.GetOrigin(), img.GetDirection()


@pytest.mark.parametrize("direction", [None, oblique_direction()], ids=["axis-aligned", "oblique"])
@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_prediction_outputs_keep_input_geometry_exactly(tmp_path, direction, suffix):
    image, labels = make_volume(spacing=(0.7123456789, 0.6987654321, 4.9999), origin=(-170.123456789, 22.5, -359.99),
                                direction=direction)
    src = tmp_path / f"image{suffix}"
    sitk.WriteImage(image, str(src))
    vol = io.read_image(src)
    assert vol.array.shape == image.GetSize()[::-1]  # [z, y, x]
    arr = sitk.GetArrayFromImage(labels)
    table = io.default_label_table([1, 2], {1: "organ", 2: "spot"})
    outs = [tmp_path / "pred.seg.nrrd", tmp_path / "pred.nrrd", tmp_path / f"pred_label{suffix}"]
    for out in outs:
        io.write_prediction(out, arr, vol.geometry, table)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), arr)
        if suffix == ".nrrd" or not out.name.endswith(".nrrd"):
            # Same format in and out: bit-exact.
            assert geometry_of(out) == geometry_of(src), out
        else:
            # NIfTI/MHA in, NRRD out: ITK's NRRD reader divides the stored vectors by their norm, which
            # can move a direction cosine by one unit in the last place; nothing more.
            for got, want in zip(geometry_of(out), geometry_of(src)):
                np.testing.assert_allclose(got, want, rtol=0, atol=4e-16 * max(1.0, np.max(np.abs(want))))
    if suffix == ".nrrd":
        # The NRRD header vectors are repeated verbatim, not recomputed from spacing x direction.
        h_in, h_out = nrrd.read_header(str(src)), nrrd.read_header(str(outs[0]))
        np.testing.assert_array_equal(h_in["space directions"], h_out["space directions"])
        np.testing.assert_array_equal(h_in["space origin"], h_out["space origin"])


def test_ras_nrrd_header_is_converted_exactly_to_lps(tmp_path):
    data = np.zeros((6, 5, 4), dtype=np.uint8)  # pynrrd order (i, j, k)
    header = {"space": "right-anterior-superior", "space directions": np.diag([0.7, 0.8, 2.5]),
              "space origin": np.array([10.1, -20.2, 30.3]), "kinds": ["domain"] * 3}
    src = tmp_path / "ras.nrrd"
    nrrd.write(str(src), data, header)
    image = sitk.ReadImage(str(src))
    g = io.Geometry.from_sitk(image, nrrd.read_header(str(src)))
    out = tmp_path / "out.seg.nrrd"
    io.write_segmentation(out, np.ones((4, 5, 6), np.uint8), g, io.default_label_table([1]))
    assert geometry_of(out) == (image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def test_seg_nrrd_round_trip_keeps_names_colours_values(tmp_path):
    image, labels = make_volume()
    g = io.Geometry.from_sitk(image)
    table = [io.LabelInfo("liver", 3, (0.1, 0.2, 0.3)), io.LabelInfo("tumour", 7, (0.9, 0.8, 0.7))]
    arr = sitk.GetArrayFromImage(labels).astype(np.uint8)
    arr = np.select([arr == 1, arr == 2], [3, 7], 0).astype(np.uint8)
    io.write_segmentation(tmp_path / "a.seg.nrrd", arr, g, table)
    back = io.read_labels(tmp_path / "a.seg.nrrd", g)
    assert back.labels == table
    np.testing.assert_array_equal(back.array, arr)


def test_cropped_segmentation_is_pasted_into_the_image_grid(tmp_path):
    image, labels = make_volume(direction=oblique_direction())
    g = io.Geometry.from_sitk(image)
    arr = sitk.GetArrayFromImage(labels)
    # Slicer stores segmentations cropped to their extent: simulate with a voxel-aligned sub-grid.
    crop = labels[5:30, 8:35, 4:16]  # SimpleITK slicing is (x, y, z) and keeps physical positions
    sitk.WriteImage(crop, str(tmp_path / "crop.nrrd"))
    back = io.read_labels(tmp_path / "crop.nrrd", g)
    expected = np.zeros_like(arr)
    expected[4:16, 8:35, 5:30] = arr[4:16, 8:35, 5:30]
    assert back.array.shape == arr.shape and expected.any()
    np.testing.assert_array_equal(back.array, expected)


def test_labels_with_other_geometry_are_refused(tmp_path):
    image, labels = make_volume()
    labels.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(labels, str(tmp_path / "l.nrrd"))
    with pytest.raises(HSSLError, match="do not match the image geometry"):
        io.read_labels(tmp_path / "l.nrrd", io.Geometry.from_sitk(image))


def test_label_value_absent_from_names_table(tmp_path):
    image, labels = make_volume()
    sitk.WriteImage(labels, str(tmp_path / "l.nrrd"))
    with pytest.raises(HSSLError, match=r"value\(s\) \[2\] absent from the names table"):
        io.read_labels(tmp_path / "l.nrrd", io.Geometry.from_sitk(image), {1: "organ"})


@pytest.mark.parametrize("case, message", [
    ("2d", "is 2D"), ("4d", "is 4D"), ("rgb", "component"), ("nan", "NaN"), ("allnan", "only NaN"),
    ("constant", "constant"), ("corrupt", "cannot be read"), ("missing", "does not exist"),
    ("single-slice", "single slice"),
])
def test_bad_images_fail_with_a_clear_message(tmp_path, case, message):
    path = tmp_path / "bad.nrrd"
    if case == "2d":
        sitk.WriteImage(sitk.Image(10, 10, sitk.sitkInt16), str(path))
    elif case == "4d":
        sitk.WriteImage(sitk.Image([4, 4, 4, 3], sitk.sitkInt16), str(path))
    elif case == "rgb":
        sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkVectorUInt8, 3), str(path))
    elif case in ("nan", "allnan"):
        a = np.random.rand(4, 5, 6).astype(np.float32)
        if case == "nan":
            a[1, 2, 3] = np.nan
        else:
            a[:] = np.nan
        sitk.WriteImage(sitk.GetImageFromArray(a), str(path))
    elif case == "constant":
        sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 5, 6), 7, np.int16)), str(path))
    elif case == "corrupt":
        image, _ = make_volume()
        sitk.WriteImage(image, str(path), useCompression=True)
        path.write_bytes(path.read_bytes()[:400])
    elif case == "single-slice":
        sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(1, 5, 6).astype(np.float32)), str(path))
    else:
        path = tmp_path / "nope.nrrd"
    with pytest.raises(HSSLError, match=message):
        io.read_image(path)


def test_existing_output_needs_overwrite_and_nothing_is_half_written(tmp_path):
    image, labels = make_volume()
    g = io.Geometry.from_sitk(image)
    arr = sitk.GetArrayFromImage(labels)
    out = tmp_path / "p.seg.nrrd"
    io.write_segmentation(out, arr, g, io.default_label_table([1, 2]))
    with pytest.raises(HSSLError, match="already exists"):
        io.write_segmentation(out, arr, g, io.default_label_table([1, 2]))

    def broken_writer(tmp):
        tmp.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(HSSLError, match="no space left"):
        io.atomic_write(tmp_path / "q.nrrd", broken_writer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.seg.nrrd"]


def test_dicom_series_folder_is_read_with_its_geometry(tmp_path):
    image, _ = make_volume(shape=(5, 16, 18), spacing=(0.5, 0.6, 2.0), origin=(1.5, -2.25, 10.0))
    folder = tmp_path / "dicom"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        s = image[:, :, k]
        for key, value in (("0020|000e", "1.2.826.0.1.3680043.2.1125.1"), ("0020|0013", str(k + 1)),
                           ("0020|0032", "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k)))),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0018|0050", "2.0"), ("0008|0060", "CT")):
            s.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(s)
    vol = io.read_image(folder)
    assert vol.array.shape == (5, 16, 18)
    np.testing.assert_allclose(vol.geometry.spacing, (0.5, 0.6, 2.0), rtol=1e-6)
    np.testing.assert_allclose(vol.geometry.origin, (1.5, -2.25, 10.0), atol=1e-6)


def test_axis_names_follow_the_direction_matrix():
    image, _ = make_volume()
    assert io.Geometry.from_sitk(image).axis_names() == ("axial", "coronal", "sagittal")
    # A volume stored sagittal-first: its array axis 0 points left-right.
    image.SetDirection((0, 0, 1, 0, 1, 0, 1, 0, 0))
    assert io.Geometry.from_sitk(image).axis_names() == ("sagittal", "coronal", "axial")


@pytest.mark.skipif(not hasattr(io.os, "getuid"), reason="POSIX permissions")
def test_atomic_outputs_get_the_permissions_of_a_plain_write(tmp_path):
    """The temporary file is private (mkstemp: 0600); the finished output is not: 0666 less the umask."""
    old = io.os.umask(0o022)
    try:
        out = io.atomic_write_text(tmp_path / "table.md", "| a |\n")
        plain = tmp_path / "plain.md"
        plain.write_text("| a |\n")
        assert (out.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777) == 0o644
        io.os.umask(0o077)
        assert (io.atomic_write_text(tmp_path / "private.md", "x").stat().st_mode & 0o777) == 0o600
    finally:
        io.os.umask(old)
