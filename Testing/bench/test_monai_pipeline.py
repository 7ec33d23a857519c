"""The plain MONAI pipeline peer (scripts/bench/baselines.py) on a small synthetic phantom: MONAI's own
UNet with its usual settings, patches centred on painted voxels only, a time or step budget, MONAI's
default inference on the whole volume, label values mapped back, and it learns."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from bench import baselines  # noqa: E402

from hssl import fewslice  # noqa: E402
from hssl.io import Volume  # noqa: E402


SPACING = (2.0, 1.5, 1.5)  # [z, y, x] mm: already at the CT working spacing, so not resampled


def phantom():
    """A 24 x 40 x 40 CT-like volume (HU) with a bright ellipsoid labelled 5 on slices 4..19."""
    rng = np.random.default_rng(0)
    z, y, x = np.indices((24, 40, 40))
    blob = ((z - 12) / 8.5) ** 2 + ((y - 20) / 10) ** 2 + ((x - 18) / 9) ** 2 <= 1
    image = np.where(blob, 200.0, -100.0) + rng.normal(0, 20, blob.shape)
    ref = np.where(blob, 5, 0).astype(np.uint8)
    volume = Volume(image.astype(np.int16), fewslice.array_geometry(ref.shape, SPACING))
    return fewslice.make_case(volume, ref, 3)


def test_the_network_is_monais_unet_with_its_usual_settings():
    from monai.networks.nets import UNet

    net = baselines.unet(3)
    assert isinstance(net, UNet)
    assert baselines.UNET == {"spatial_dims": 3, "in_channels": 1, "channels": (16, 32, 64, 128, 256),
                              "strides": (2, 2, 2, 2), "num_res_units": 2}
    # Sides of 16, never more than the cap nor (down to 32) than the volume.
    assert baselines.monai_patch((25, 256, 256)) == (32, 96, 96)
    assert baselines.monai_patch((61, 512, 512)) == (48, 96, 96)
    assert baselines.monai_patch((189, 233, 197)) == (64, 96, 96)
    assert baselines.monai_patch((10, 40, 70)) == (32, 32, 64)
    # In-plane only, to MONAI's usual working spacing when finer: 0.63 mm CT -> 1.5 mm, 0.78 mm MR -> 1 mm.
    assert baselines.working_shape((61, 512, 512), (5.0, 0.63, 0.63), "ct") == (61, 215, 215)
    assert baselines.working_shape((25, 256, 256), (6.5, 0.78, 0.78), "percentile") == (25, 200, 200)
    assert baselines.working_shape((30, 100, 80), (1.0, 2.0, 2.0), "ct") == (30, 100, 80)


def test_it_learns_the_structure_and_predicts_label_values_on_the_input_grid(tmp_path):
    torch.set_num_threads(2)
    case = phantom()
    known = case.annotation.known
    model, info = baselines.train_monai(case.volume.array, case.sparse, known, SPACING, "ct", seed=0,
                                        device=torch.device("cpu"), steps=40)
    assert info["steps"] == 40 and info["patch"] == [32, 32, 32] and info["batch"] == 2
    # Patches hold the painted voxel they were placed around (but for the rare offset 0 of a 16-voxel margin).
    assert info["crops_without_known_voxel"] < 0.1
    assert model.values == [5]
    labels = baselines.predict_monai(model, case.volume.array, SPACING, torch.device("cpu"))
    assert labels.shape == case.sparse.shape and set(np.unique(labels)) <= {0, 5}
    # Between the painted slices (8, 12 and 16) it interpolates the bright blob well; beyond them it
    # extrapolates worse (no post-processing), which the suite measures on real scans.
    between = fewslice.score_labels(labels, case.reference, case.volume.geometry, case.between(), hd95=False)
    assert case.slices == [8, 12, 16] and between["dice"] > 0.8
    # Saved and loaded again, it predicts the same.
    again = baselines.MonaiModel.load(model.save(tmp_path / "unet"))
    assert np.array_equal(baselines.predict_monai(again, case.volume.array, SPACING, torch.device("cpu")), labels)


def test_a_time_budget_stops_training():
    case = phantom()
    _, info = baselines.train_monai(case.volume.array, case.sparse, case.annotation.known, SPACING, "ct", seed=0,
                                    device=torch.device("cpu"), time_budget=1.0)
    assert info["steps"] >= 1 and 1.0 <= info["seconds"] < 10.0
    with pytest.raises(ValueError, match="budget"):
        baselines.train_monai(case.volume.array, case.sparse, case.annotation.known, SPACING, "ct", 0,
                              torch.device("cpu"))
