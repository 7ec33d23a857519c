"""Training patches from a sparsely annotated volume.

Every patch holds a known voxel chosen at random; with probability ``fg_fraction`` a foreground
voxel of a class chosen uniformly, so small structures are not drowned by background. Along an axis
across the painted slices (one along which some slice is known whole) that voxel may sit anywhere
in the patch: the loss only sees the painted slices, so a patch that always had them near its
middle would leave the network untrained at its ends, which is where a sliding window's edges and
the slices beyond the painting are predicted (measured: a lung CT's bone predicted over the whole
body on the two slices where axial windows meet, a brain tumour leaking to the region's end).
Along the other axes the voxel stays within a quarter patch of the middle. Augmentations (``PatchAugment``) respect
anisotropy: flips and 90-degree rotations only act in the axes of comparable spacing.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .sparse import whole_slices

MAX_CENTRES = 1_000_000  # candidate centres kept per class (sub-sampled beyond this)


class PatchSampler:
    """``image`` float32, ``target`` integer classes, ``known`` bool: all ``[z, y, x]`` of one volume."""

    def __init__(self, image: np.ndarray, target: np.ndarray, known: np.ndarray, patch: Sequence[int],
                 rng: np.random.Generator, fg_fraction: float):
        self.patch = np.asarray(patch, dtype=int)
        pad = [(0, max(0, int(p) - s)) for p, s in zip(self.patch, image.shape)]
        # Padding is unknown (known=False), so it never counts in the loss.
        self.image = np.pad(image, pad, constant_values=float(image.min())) if any(p[1] for p in pad) else image
        self.target = np.pad(target, pad) if any(p[1] for p in pad) else target
        self.known = np.pad(known, pad) if any(p[1] for p in pad) else known
        self.rng = rng
        self.fg_fraction = fg_fraction
        self.known_idx = self._subsample(np.flatnonzero(self.known))
        flat_target = self.target.reshape(-1)
        known_fg = flat_target[self.known_idx]
        self.fg_idx = {int(c): self.known_idx[known_fg == c] for c in np.unique(known_fg) if c != 0}
        self.across = np.array([whole_slices(known, a).size > 0 for a in range(3)])  # before the padding

    def _subsample(self, idx: np.ndarray) -> np.ndarray:
        if idx.size > MAX_CENTRES:
            idx = np.sort(self.rng.choice(idx, MAX_CENTRES, replace=False))
        return idx

    def centre(self) -> np.ndarray:
        if self.fg_idx and self.rng.random() < self.fg_fraction:
            cls = list(self.fg_idx)[self.rng.integers(len(self.fg_idx))]
            pool = self.fg_idx[cls]
        else:
            pool = self.known_idx
        return np.array(np.unravel_index(pool[self.rng.integers(pool.size)], self.image.shape))

    def sample(self) -> dict[str, np.ndarray]:
        """One patch: ``image`` (1, Z, Y, X) float32, ``label`` (1, Z, Y, X) int64, ``known`` (1, Z, Y, X) float32."""
        c = self.centre()
        jitter = self.rng.integers(-(self.patch // 4), self.patch // 4 + 1)
        # Across the painted slices the chosen voxel's place in the patch is uniform.
        offset = np.where(self.across, self.rng.integers(0, self.patch), self.patch // 2 - jitter)
        start = np.clip(c - offset, 0, np.array(self.image.shape) - self.patch)
        # The jitter must not push the chosen voxel out of the patch.
        start = np.clip(start, c - self.patch + 1, c)
        sl = tuple(slice(int(s), int(s + p)) for s, p in zip(start, self.patch))
        return {"image": self.image[sl][None].astype(np.float32),
                "label": self.target[sl][None].astype(np.int64),
                "known": self.known[sl][None].astype(np.float32)}


class PatchAugment:
    """Random flips and 90-degree rotations in the axes of comparable spacing (image, label and
    known alike), then intensity scale (x(1 + U(-0.1, 0.1)), p 0.5), shift (+U(-0.1, 0.1), p 0.5) and
    Gaussian noise (std U(0, 0.02), p 0.3) on the image: the augmentations MONAI's RandFlipd,
    RandRotate90d, RandScaleIntensityd, RandShiftIntensityd and RandGaussianNoised give, done with
    numpy views because MONAI's dictionary transforms cost 50 ms per flip of a 56x56x48 patch here
    (a third of a bf16 training step); these cost about 1 ms in all."""

    def __init__(self, spacing_zyx: Sequence[float], patch: Sequence[int], seed: int):
        spacing = np.asarray(spacing_zyx, dtype=float)
        self.flip_axes = [a for a in range(3) if spacing[a] <= 2 * spacing.min()]
        self.rotate_axes = None
        if len(self.flip_axes) >= 2:
            a, b = self.flip_axes[-2], self.flip_axes[-1]
            if np.isclose(spacing[a], spacing[b], rtol=0.05) and patch[a] == patch[b]:
                self.rotate_axes = (a, b)
        self.rng = np.random.default_rng([seed, 7])

    def __call__(self, sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rng = self.rng
        arrays = dict(sample)
        for axis in self.flip_axes:
            if rng.random() < 0.5:
                arrays = {k: np.flip(v, axis + 1) for k, v in arrays.items()}
        if self.rotate_axes is not None and rng.random() < 0.5:
            k = int(rng.integers(1, 4))
            axes = (self.rotate_axes[0] + 1, self.rotate_axes[1] + 1)
            arrays = {key: np.rot90(v, k, axes) for key, v in arrays.items()}
        out = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        image = out["image"]
        if rng.random() < 0.5:
            image *= np.float32(1.0 + rng.uniform(-0.1, 0.1))
        if rng.random() < 0.5:
            image += np.float32(rng.uniform(-0.1, 0.1))
        if rng.random() < 0.3:
            std = rng.uniform(0.0, 0.02)
            image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(std)
        return out


def augmentation(spacing_zyx: Sequence[float], patch: Sequence[int], seed: int) -> PatchAugment:
    """Random flips/rotations in the in-plane axes, intensity scale/shift and noise (``PatchAugment``)."""
    return PatchAugment(spacing_zyx, patch, seed)
