"""Fine-tune + predict on a real CT (pyradiomics' lung2, cached by `hssl data fetch`) at a tiny
budget. The Dice floor is far above what a broken pipeline gives (shifted/transposed labels,
unknown voxels used as background, lost geometry all give Dice near 0 here)."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from engine_helpers import run_cli
from hssl import data


@pytest.fixture(scope="module")
def lung_crop(tmp_path_factory):
    try:
        image_path, label_path = data.sample_path("lung2_image.nrrd"), data.sample_path("lung2_label.nrrd")
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"sample scans not cached ({err}); run 'hssl data fetch'")
    image, label = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path))
    ref = sitk.GetArrayFromImage(label)
    z, y, x = np.nonzero(ref)
    m = 12  # a real sub-volume around the tumour keeps the test to seconds on 2 cores
    box = (slice(int(x.min()) - m, int(x.max()) + m), slice(int(y.min()) - m, int(y.max()) + m),
           slice(int(z.min()) - 2, int(z.max()) + 3))
    folder = tmp_path_factory.mktemp("lung")
    crop_img, crop_ref = image[box], label[box]
    sitk.WriteImage(crop_img, str(folder / "image.nrrd"))
    sitk.WriteImage(crop_ref, str(folder / "reference.nrrd"))
    ref = sitk.GetArrayFromImage(crop_ref)
    present = np.nonzero(ref.any(axis=(1, 2)))[0]
    picks = [int(present[int(q * (len(present) - 1))]) for q in (0.25, 0.5, 0.75)]
    sparse = np.zeros_like(ref)
    sparse[picks] = ref[picks]
    sparse_img = sitk.GetImageFromArray(sparse)
    sparse_img.CopyInformation(crop_ref)
    sitk.WriteImage(sparse_img, str(folder / "sparse.nrrd"))
    return folder, picks


def test_real_ct_few_slices_reaches_a_dice_floor(lung_crop, tmp_path):
    folder, picks = lung_crop
    pred = tmp_path / "pred.seg.nrrd"
    proc = run_cli("finetune", "--image", folder / "image.nrrd", "--labels", folder / "sparse.nrrd", "--out",
                   tmp_path / "model", "--names", "1=tumour", "--steps", "60", "--patch-size", "8,64,64",
                   "--device", "cpu", "--seed", "0", "--predict", pred, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli("evaluate", "--pred", pred, "--ref", folder / "reference.nrrd", "--exclude-annotated",
                   folder / "sparse.nrrd", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    tumour = result["labels"][0]
    print("real-scan Dice on unannotated slices:", tumour["dice"], "HD95:", tumour["hd95_mm"])
    assert tumour["name"] == "tumour"
    assert tumour["dice"] >= 0.4, tumour  # measured 0.59 (seed 0); unknown-as-background gives 0.00
    # On the annotated slices the output is exactly the user's annotation.
    out = sitk.GetArrayFromImage(sitk.ReadImage(str(pred)))
    ref_sparse = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "sparse.nrrd")))
    np.testing.assert_array_equal(out[picks], ref_sparse[picks])
