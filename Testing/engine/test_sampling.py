"""Training patches from painted slices: where the painted voxels land in a patch."""
import numpy as np

from hssl.sampling import PatchSampler
from hssl.sparse import SliceRef, known_mask


def _positions(known, patch, samples=400):
    image = np.zeros(known.shape, np.float32)
    target = np.zeros(known.shape, np.uint8)
    sampler = PatchSampler(image, target, known, patch, np.random.default_rng(0), fg_fraction=0.0)
    return [sampler.sample()["known"][0] for _ in range(samples)]


def test_the_painted_slice_lands_at_every_depth_of_the_patch():
    # The loss sees only the painted slice: unless it lands at every depth of the patch, the
    # network's outputs near the patch ends (a sliding window's seams) are never trained.
    known = known_mask((40, 30, 30), [SliceRef(0, 20)])
    depths = {int(np.nonzero(k.any(axis=(1, 2)))[0][0]) for k in _positions(known, (12, 16, 16))}
    assert depths == set(range(12))


def test_across_a_sagittal_painting_the_same_holds_and_patches_stay_inside_the_volume():
    known = known_mask((20, 30, 60), [SliceRef(2, 30)])
    patches = _positions(known, (8, 16, 24))
    places = {int(np.nonzero(k.any(axis=(0, 1)))[0][0]) for k in patches}
    assert places == set(range(24))
    assert all(k.shape == (8, 16, 24) and k.any() for k in patches)


def test_a_painting_without_whole_slices_keeps_its_voxel_near_the_middle():
    known = np.zeros((40, 40, 40), bool)
    known[20, 20, 20] = True  # one painted voxel: no axis is across whole painted slices
    for k in _positions(known, (12, 12, 12), 100):
        z, y, x = np.argwhere(k)[0]
        assert all(3 <= v <= 9 for v in (z, y, x))
