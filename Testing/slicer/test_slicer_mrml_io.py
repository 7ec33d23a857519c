"""MRML conversions with the real Slicer MRML libraries (slicer-core wheel): export of the job
inputs, import of a prediction, copy into the annotation, bad input."""
import numpy as np
import pytest

from slicer_test_helpers import addAnnotation, addVolume, ballVolume, slicerCore, sparse

slicer = slicerCore()
import vtk  # noqa: E402 - after the skip

from HSSLSegmentLib import mrml_io  # noqa: E402
from HSSLSegmentLib.training_chart import TrainingChart  # noqa: E402

nrrd = pytest.importorskip("nrrd")


def ijkToLps(header):
    """4x4 voxel->LPS matrix from a NRRD header (3D, or 4D with a leading list axis)."""
    directions = np.array([d for d in header["space directions"] if np.all(np.isfinite(np.asarray(d, dtype=float)))],
                          dtype=float)
    m = np.eye(4)
    m[:3, :3] = directions.T
    m[:3, 3] = header["space origin"]
    if header.get("space") in ("right-anterior-superior", "RAS"):
        m = np.diag([-1, -1, 1, 1]) @ m
    return m


def volumeIjkToLps(volumeNode):
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ mrml_io.ijkToRas(volumeNode)


@pytest.fixture
def twoSegments(scene):
    image, ball = ballVolume()
    volume = addVolume(scene, image)
    tumour = sparse(ball, 0, [5, 8, 11])
    liver = np.zeros_like(ball)
    liver[8, 2:8, 2:10] = True  # on the same painted slice
    liver[8, 9:14, 10:16] |= ball[8, 9:14, 10:16]  # overlaps the tumour there
    annotation = addAnnotation(scene, volume, {"tumour": tumour, "liver": liver})
    return volume, annotation, tumour, liver


def test_export_writes_the_volume_grid_exactly(tmp_path, twoSegments):
    volume, annotation, tumour, liver = twoSegments
    before = mrml_io.segmentationFingerprint(annotation)
    mtime = annotation.GetMTime()
    nodesBefore = volume.GetScene().GetNumberOfNodes()
    result = mrml_io.exportJobInputs(volume, annotation, ["tumour", "liver"], tmp_path)

    image, imageHeader = nrrd.read(str(result.imagePath))
    labels, labelsHeader = nrrd.read(str(result.labelsPath))
    # pynrrd arrays are [i, j, k]; MRML arrays are [k, j, i]
    assert image.shape == labels.shape == slicer.util.arrayFromVolume(volume).shape[::-1]
    np.testing.assert_array_equal(image.transpose(2, 1, 0), slicer.util.arrayFromVolume(volume))
    np.testing.assert_allclose(ijkToLps(imageHeader), volumeIjkToLps(volume), atol=1e-9)
    np.testing.assert_allclose(ijkToLps(labelsHeader), volumeIjkToLps(volume), atol=1e-9)

    # label table: values 1..N in the selected order, names and colours kept
    assert [(e.name, e.value) for e in result.labels] == [("tumour", 1), ("liver", 2)]
    assert result.labels[0].color == pytest.approx((0.9, 0.3, 0.2))
    assert labelsHeader["Segment0_Name"] == "tumour" and labelsHeader["Segment1_Name"] == "liver"
    assert labelsHeader["Segment0_LabelValue"] == "1" and labelsHeader["Segment1_LabelValue"] == "2"
    lab = labels.transpose(2, 1, 0)
    overlap = tumour & liver
    assert overlap.any()
    assert np.all(lab[overlap] == 2), "the later segment must win where segments overlap"
    assert np.all(lab[tumour & ~liver] == 1) and np.all(lab[~tumour & ~liver] == 0)
    assert result.overlaps == [("tumour", "liver", int(overlap.sum()))]
    assert any("overlap" in w and "'liver'" in w for w in result.warnings)
    assert result.voxelCounts == {"tumour": int(tumour.sum()), "liver": int(liver.sum())}
    assert result.annotatedSlices == ["axial:5", "axial:8", "axial:11"]
    assert not result.resampled

    # the annotation and the user's scene are untouched
    assert mrml_io.segmentationFingerprint(annotation) == before
    assert annotation.GetMTime() == mtime
    assert volume.GetScene().GetNumberOfNodes() == nodesBefore
    assert volume.GetStorageNode() is None


def test_export_order_decides_values_and_overlap_winner(tmp_path, twoSegments):
    volume, annotation, tumour, liver = twoSegments
    result = mrml_io.exportJobInputs(volume, annotation, ["liver", "tumour"], tmp_path)
    labels, _header = nrrd.read(str(result.labelsPath))
    lab = labels.transpose(2, 1, 0)
    assert [(e.name, e.value) for e in result.labels] == [("liver", 1), ("tumour", 2)]
    assert np.all(lab[tumour & liver] == 2)
    # one segment only
    single = mrml_io.exportJobInputs(volume, annotation, ["tumour"], tmp_path / "one")
    assert [e.name for e in single.labels] == ["tumour"] and single.overlaps == []


def test_resampled_when_the_segmentation_has_another_grid(tmp_path, scene):
    image, ball = ballVolume()
    volume = addVolume(scene, image)
    coarse = addVolume(scene, image[:, ::2, ::2], spacing=(1.6, 1.4, 2.0), name="coarse")
    annotation = addAnnotation(scene, coarse, {"ball": sparse(ball[:, ::2, ::2], 0, [8])})
    ok, reason = mrml_io.segmentationMatchesVolume(annotation, volume)
    assert not ok and "spacing" in reason
    result = mrml_io.exportJobInputs(volume, annotation, None, tmp_path)
    assert result.resampled and any("resampled" in w for w in result.warnings)
    labels, header = nrrd.read(str(result.labelsPath))
    assert labels.shape == image.shape[::-1]
    np.testing.assert_allclose(ijkToLps(header), volumeIjkToLps(volume), atol=1e-9)
    assert labels.transpose(2, 1, 0)[8].sum() > 0 and labels.transpose(2, 1, 0)[:8].sum() == 0


def test_bad_input_gives_one_line_errors(tmp_path, scene, twoSegments):
    volume, annotation, _tumour, _liver = twoSegments
    with pytest.raises(mrml_io.InputError, match="No input volume"):
        mrml_io.exportJobInputs(None, annotation, None, tmp_path)
    with pytest.raises(mrml_io.InputError, match="No annotation"):
        mrml_io.exportJobInputs(volume, None, None, tmp_path)
    with pytest.raises(mrml_io.InputError, match="no segment 'spleen'"):
        mrml_io.exportJobInputs(volume, annotation, ["spleen"], tmp_path)
    annotation.GetSegmentation().AddEmptySegment("", "kidney", [0.5, 0.5, 0.5])
    with pytest.raises(mrml_io.InputError, match="'kidney' has no painted voxel"):
        mrml_io.exportJobInputs(volume, annotation, None, tmp_path)
    # a segment hidden completely under a later one
    hidden = addAnnotation(scene, volume, {"inner": _tumour, "outer": _tumour | _liver}, name="nested")
    with pytest.raises(mrml_io.InputError, match="'inner' lies entirely under later segments"):
        mrml_io.exportJobInputs(volume, hidden, None, tmp_path)
    # RGB volume
    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "photo")
    data = vtk.vtkImageData()
    data.SetDimensions(8, 8, 4)
    data.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    rgb.SetAndObserveImageData(data)
    with pytest.raises(mrml_io.InputError, match="several values per voxel"):
        mrml_io.exportJobInputs(rgb, annotation, None, tmp_path)
    # a labelmap selected as the scan
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "mask")
    labelmap.SetAndObserveImageData(volume.GetImageData())
    with pytest.raises(mrml_io.InputError, match="is a labelmap"):
        mrml_io.exportJobInputs(labelmap, annotation, None, tmp_path)
    # a single slice
    flat = addVolume(scene, np.zeros((1, 8, 8), np.int16), name="flat")
    with pytest.raises(mrml_io.InputError, match="several slices"):
        mrml_io.checkScalarVolume(flat)
    # a transform on the annotation only
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    annotation.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(mrml_io.InputError, match="Harden transform"):
        mrml_io.exportJobInputs(volume, annotation, ["tumour"], tmp_path)
    # nothing was written by the failed exports
    assert not list(tmp_path.glob("*.nrrd"))


def test_detected_slices_in_any_orientation(scene):
    image, ball = ballVolume()
    volume = addVolume(scene, image)
    painted = sparse(ball, 0, [6, 10]) | sparse(ball, 2, [14])
    annotation = addAnnotation(scene, volume, {"ball": painted})
    assert mrml_io.volumeAxisNames(volume) == ("axial", "coronal", "sagittal")
    assert mrml_io.detectSlices(volume, annotation) == ["axial:6", "axial:10", "sagittal:14"]


def test_import_prediction_keeps_names_colours_and_grid(tmp_path, twoSegments):
    volume, annotation, tumour, liver = twoSegments
    exported = mrml_io.exportJobInputs(volume, annotation, None, tmp_path)
    annotation.GetSegmentation().GetSegment(exported.labels[0].segmentId).SetColor(0.1, 0.2, 0.3)
    result = mrml_io.importPrediction(exported.labelsPath, volume, annotationNode=annotation)
    node = result.node
    assert node.GetName() == "CT prediction" and node is not annotation
    assert result.segmentNames == ["tumour", "liver"] and not result.resampled
    segment = node.GetSegmentation().GetSegment(mrml_io.resolveSegmentIds(node, ["tumour"])[0])
    assert segment.GetColor() == pytest.approx((0.1, 0.2, 0.3))  # from the annotation, by name
    assert mrml_io.segmentationMatchesVolume(node, volume)[0]
    np.testing.assert_array_equal(mrml_io.segmentMask(node, "liver", volume), liver)
    np.testing.assert_array_equal(mrml_io.segmentMask(node, "tumour", volume), tumour & ~liver)
    # next to the volume in the subject hierarchy
    sh = slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(volume.GetScene())
    assert sh.GetItemByDataNode(node) != 0
    # importing again into the same node replaces its segments instead of adding a node
    count = volume.GetScene().GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    again = mrml_io.importPrediction(exported.labelsPath, volume, targetNode=node)
    assert again.node is node and node.GetSegmentation().GetNumberOfSegments() == 2
    assert volume.GetScene().GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == count
    with pytest.raises(mrml_io.InputError, match="Cannot read the prediction"):
        mrml_io.importPrediction(tmp_path / "missing.seg.nrrd", volume)


def test_copy_prediction_into_annotation_only_on_request(tmp_path, scene):
    image, ball = ballVolume()
    volume = addVolume(scene, image)
    painted = sparse(ball, 0, [8])
    annotation = addAnnotation(scene, volume, {"ball": painted})
    predictedBall = ball.copy()
    predictedBall[8] = False  # the "network" missed the painted slice: the user's paint must win there
    prediction = addAnnotation(scene, volume, {"ball": predictedBall, "rim": sparse(ball, 0, [3])}, name="CT prediction")
    before = mrml_io.segmentationFingerprint(annotation)
    written = mrml_io.copySegmentsToAnnotation(prediction, annotation, volume, keepAnnotatedSlices=True,
                                               extraSlices="axial:3")
    assert written == ["ball", "rim"]
    assert mrml_io.segmentationFingerprint(annotation) != before
    result = mrml_io.segmentMask(annotation, "ball", volume)
    np.testing.assert_array_equal(result[8], painted[8])  # painted slice kept
    np.testing.assert_array_equal(result[10], ball[10])  # elsewhere: the prediction
    rim = mrml_io.segmentMask(annotation, "rim", volume)
    assert not rim[3].any()  # axial:3 was declared background-only by the user
    # replace mode
    mrml_io.copySegmentsToAnnotation(prediction, annotation, volume, ["ball"], keepAnnotatedSlices=False)
    np.testing.assert_array_equal(mrml_io.segmentMask(annotation, "ball", volume), predictedBall)
    with pytest.raises(mrml_io.InputError, match="same node"):
        mrml_io.copySegmentsToAnnotation(annotation, annotation, volume)


def test_training_chart_nodes(scene):
    chart = TrainingChart(scene)
    chart.addPoint(1, 0.9, None)
    chart.addPoint(2, 0.7, 0.4)
    points = chart.points()
    assert points[0][:2] == (1.0, 0.9) and np.isnan(points[0][2]) and points[1] == (2.0, 0.7, 0.4)
    assert chart.chartNode.GetNumberOfPlotSeriesNodes() == 2
    reused = TrainingChart(scene, chart.chartNode)
    assert reused.tableNode is chart.tableNode
    reused.clear()
    assert chart.points() == []


def test_file_helpers_for_headless_scripts(tmp_path, twoSegments, scene):
    volume, annotation, tumour, liver = twoSegments
    mrml_io.writeVolume(volume, tmp_path / "image.nrrd")
    mrml_io.saveSegmentationFile(annotation, tmp_path / "annotation.seg.nrrd")
    loaded = mrml_io.loadVolumeFile(scene, tmp_path / "image.nrrd")
    assert loaded.GetName() == "image"
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(loaded), slicer.util.arrayFromVolume(volume))
    np.testing.assert_allclose(mrml_io.ijkToRas(loaded), mrml_io.ijkToRas(volume), atol=1e-9)
    segmentation = mrml_io.loadSegmentationFile(scene, tmp_path / "annotation.seg.nrrd", loaded)
    assert [n for _sid, n in mrml_io.segmentIdsAndNames(segmentation)] == ["tumour", "liver"]
    np.testing.assert_array_equal(mrml_io.segmentMask(segmentation, "liver", loaded), liver)
    # a labelmap file with named values
    labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    labels.CopyOrientation(volume)
    slicer.util.updateVolumeFromArray(labels, (tumour * 4).astype(np.uint8))
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(tmp_path / "labels.nrrd"))
    assert storage.WriteData(labels)
    fromLabelmap = mrml_io.loadSegmentationFile(scene, tmp_path / "labels.nrrd", loaded, names={4: "tumour"})
    assert [n for _sid, n in mrml_io.segmentIdsAndNames(fromLabelmap)] == ["tumour"]
    np.testing.assert_array_equal(mrml_io.segmentMask(fromLabelmap, "tumour", loaded), tumour)
    with pytest.raises(mrml_io.InputError, match="does not exist"):
        mrml_io.loadVolumeFile(scene, tmp_path / "nope.nrrd")
    (tmp_path / "broken.nrrd").write_text("NRRD0004\ntype: nonsense\n")
    with pytest.raises(mrml_io.InputError, match="Cannot read volume"):
        mrml_io.loadVolumeFile(scene, tmp_path / "broken.nrrd")


def test_left_handed_files_keep_their_grid_through_export(tmp_path, scene):
    """Slicer reverses the slice axis of left-handed files by default; the headless file helpers
    keep the file's index grid so that job files and outputs match the input file exactly."""
    image, ball = ballVolume((12, 20, 22))
    header = {"space": "left-posterior-superior", "space directions": np.diag([0.78125, -0.78125, 6.5]),
              "space origin": np.array([-99.6, 99.6, -78.0]), "kinds": ["domain"] * 3}
    nrrd.write(str(tmp_path / "left.nrrd"), np.ascontiguousarray(image.transpose(2, 1, 0)), header)
    nrrd.write(str(tmp_path / "left_label.nrrd"),
               np.ascontiguousarray(sparse(ball, 0, [4, 6]).astype(np.uint8).transpose(2, 1, 0)), header)
    volume = mrml_io.loadVolumeFile(scene, tmp_path / "left.nrrd")
    assert np.linalg.det(mrml_io.ijkToRas(volume)[:3, :3]) < 0
    annotation = mrml_io.loadSegmentationFile(scene, tmp_path / "left_label.nrrd", volume, names={1: "ball"})
    result = mrml_io.exportJobInputs(volume, annotation, None, tmp_path / "job")
    for path in (result.imagePath, result.labelsPath):
        written = nrrd.read_header(str(path))
        np.testing.assert_allclose(written["space directions"], header["space directions"], atol=1e-9)
        np.testing.assert_allclose(written["space origin"], header["space origin"], atol=1e-9)
    assert result.annotatedSlices == ["axial:4", "axial:6"]
    flipped = mrml_io.loadVolumeFile(scene, tmp_path / "left.nrrd", keepFileGrid=False)
    assert np.linalg.det(mrml_io.ijkToRas(flipped)[:3, :3]) > 0  # Slicer's default, for comparison
