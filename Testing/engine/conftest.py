import numpy as np
import pytest
import SimpleITK as sitk

from engine_helpers import make_volume


@pytest.fixture
def synthetic(tmp_path):
    """Paths of a synthetic image, its full labels and a 3-axial-slice sparse annotation."""
    image, labels = make_volume()
    paths = {"image": tmp_path / "image.nrrd", "full": tmp_path / "full.nrrd", "sparse": tmp_path / "sparse.nrrd"}
    sitk.WriteImage(image, str(paths["image"]))
    sitk.WriteImage(labels, str(paths["full"]))
    full = sitk.GetArrayFromImage(labels)
    sparse = np.zeros_like(full)
    for s in (6, 10, 14):
        sparse[s] = full[s]
    sparse_img = sitk.GetImageFromArray(sparse)
    sparse_img.CopyInformation(labels)
    sitk.WriteImage(sparse_img, str(paths["sparse"]))
    return paths
