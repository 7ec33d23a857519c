"""The network plan: patch size, per-level strides and kernels, channels - derived from the data.

Like nnU-Net's planning, the plan follows the voxel spacing: an axis is only downsampled once its
(current) spacing is within a factor 2 of the finest axis, and convolutions along a much coarser
axis use kernel 1 until then. A 0.6 x 0.6 x 5 mm CT therefore keeps its through-plane resolution
for the first levels instead of collapsing its few slices. The plan is saved with the model.

All tuples here are in numpy ``[z, y, x]`` order.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from .errors import HSSLError
from .model_format import MAX_PATCH_SIDE, MAX_PATCH_VOXELS, ModelFormatError, check_plan
from .recipe import CPU_PATCH_VOXELS, GPU_PATCH_VOXELS  # noqa: F401  (re-exported)

MAX_LEVELS = 5
MIN_FEATURE = 4  # never downsample an axis of the deepest feature map below this many voxels
BASE_CHANNELS = 16
MAX_CHANNELS = 256
# Voxels per training patch: the recipe's budgets (hssl.recipe), smaller on a CPU than on a GPU.
DEFAULT_PATCH_VOXELS = GPU_PATCH_VOXELS


@dataclasses.dataclass(frozen=True)
class Plan:
    spacing: tuple[float, float, float]  # mm, [z, y, x], of the data the plan was made for
    patch_size: tuple[int, int, int]
    strides: tuple[tuple[int, int, int], ...]  # per level; level 0 is (1, 1, 1)
    kernels: tuple[tuple[int, int, int], ...]
    channels: tuple[int, ...]

    def to_json(self) -> dict:
        return {k: _listify(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict) -> "Plan":
        """A plan read from a model folder (user input): validated against the bounds of
        ``hssl.model_format.check_plan`` before anything is built from it."""
        try:
            check_plan(d)
        except ModelFormatError as err:
            raise HSSLError(f"{err}: the model folder is corrupt; re-train the model") from None
        return cls(tuple(float(v) for v in d["spacing"]), tuple(d["patch_size"]), tuple(tuple(s) for s in d["strides"]),
                   tuple(tuple(k) for k in d["kernels"]), tuple(d["channels"]))

    @property
    def divisor(self) -> tuple[int, int, int]:
        """A patch dimension must be a multiple of this (the product of strides)."""
        return tuple(int(np.prod([s[a] for s in self.strides])) for a in range(3))


def _listify(v):
    if isinstance(v, tuple):
        return [_listify(x) for x in v]
    return v


def make_plan(spacing_zyx: Sequence[float], shape_zyx: Sequence[int],
              patch_voxels: int = DEFAULT_PATCH_VOXELS, patch_size: Sequence[int] | None = None) -> Plan:
    """Derive a plan for data of this spacing and size (both ``[z, y, x]``)."""
    spacing = np.asarray(spacing_zyx, dtype=float)
    shape = np.asarray(shape_zyx, dtype=int)
    if patch_size is None:
        patch = _patch_for(spacing, shape, patch_voxels)
    else:
        patch = np.asarray(patch_size, dtype=int)
        if patch.shape != (3,) or (patch < 1).any():
            raise HSSLError(f"patch size {tuple(patch_size)} must be three positive integers (z, y, x)")
        if (patch > MAX_PATCH_SIDE).any() or int(np.prod(patch, dtype=np.int64)) > MAX_PATCH_VOXELS:
            raise HSSLError(f"patch size {tuple(patch_size)} is too large: at most {MAX_PATCH_SIDE} voxels per side "
                            f"and {MAX_PATCH_VOXELS} in all (e.g. 64,256,256)")
    strides, kernels = [(1, 1, 1)], []
    current = spacing.copy()
    feature = patch.astype(float)
    kernels.append(tuple(3 if current[a] <= 2 * current.min() else 1 for a in range(3)))
    for _ in range(MAX_LEVELS - 1):
        down = [bool(current[a] <= 2 * current.min() and feature[a] / 2 >= MIN_FEATURE) for a in range(3)]
        if not any(down):
            break
        stride = tuple(2 if d else 1 for d in down)
        current = current * np.array(stride)
        feature = feature / np.array(stride)
        strides.append(stride)
        kernels.append(tuple(3 if current[a] <= 2 * current.min() else 1 for a in range(3)))
    divisor = np.prod(np.array(strides), axis=0)
    patch = (np.ceil(patch / divisor) * divisor).astype(int)
    channels = tuple(min(BASE_CHANNELS * 2 ** i, MAX_CHANNELS) for i in range(len(strides)))
    return Plan(tuple(float(s) for s in spacing), tuple(int(p) for p in patch), tuple(strides),
                tuple(kernels), channels)


def _patch_for(spacing: np.ndarray, shape: np.ndarray, voxels: int) -> np.ndarray:
    # Start from the whole volume and shrink the physically longest side until the patch fits the
    # voxel budget: patches end up as isotropic in millimetres as the volume allows.
    patch = shape.astype(float).copy()
    while np.prod(patch) > voxels:
        extent = patch * spacing
        axis = int(np.argmax(np.where(patch > 8, extent, -1)))
        if patch[axis] <= 8:
            break
        patch[axis] = max(8, math.floor(patch[axis] * 0.9))
    return np.maximum(patch.astype(int), 8)
