"""Dense voxel-level pretraining: views, corruptions and the voxel vector (Kats et al., ISBI 2024,
which extends vox2vec; what we know of the method and its code is in docs/methods.md, section 3).

One step of ``method: dense``:

1. ``pairs_per_step`` crop pairs. For each pair an anchor voxel is drawn among the body voxels of a
   volume (all pairs of a step from one volume when ``same_volume``, as in the paper; otherwise one
   volume per pair, chosen by the balance rule). Two crops of ``data.crop_size`` that both contain the
   anchor are placed independently, so the views differ by a translation. Up to ``voxels_per_pair``
   body voxels of their overlap are sampled; ``voxels1``/``voxels2`` give each sampled voxel's index in
   view 1 and in view 2 (the same physical voxel).
2. Each view is corrupted independently with the Models-Genesis style "local" corruptions: local pixel
   shuffling, a monotone Bezier intensity curve and in-painting of noise cuboids. ``clean`` keeps the
   crop before corruption (the restoration target).
3. The network's feature pyramid is read at every level at ``voxel // cumulative_stride`` and turned
   into one vector per voxel (:class:`VoxelHead`): ``balanced`` projects each level to ``level_width``
   channels with a 1x1x1 projection (learned, or fixed random as in the released code) and
   concatenates; ``unbalanced`` concatenates the raw levels (vox2vec: coarse levels dominate, 16 + 32
   + 64 + 128 + 256 channels here). An MLP (BN + ReLU) maps it to the contrastive space.
4. Loss: ``w_voxel`` x symmetric voxel InfoNCE (the positive is the same voxel in the other view; the
   negatives are all other sampled voxels of both views, over the whole step) + ``w_restore`` x MSE
   between the network's own 1x1x1 output on the corrupted view and the clean crop.

Crops larger than a volume: the volume is padded with zeros (the bottom of the normalised range) up
to the crop size, and the padding is never sampled (it is not body). A volume without body voxels
under ``data.body_threshold`` is skipped with a warning (an error if no volume is left). A pair whose
overlap holds fewer than ``min_overlap_voxels`` body voxels is redrawn (up to 20 times, then the
pair is taken with what it has, at least one voxel).

Like :class:`hssl.pretrain.sampling.PairBatches`, a batch is a pure function of (seed, rank, step).
"""
from __future__ import annotations

import sys
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import HSSLError
from ..plan import Plan
from .catalog import Catalog
from .config import DataConfig, DenseConfig
from .sampling import BalancedSampler

REDRAWS = 20


# ------------------------------------------------------------------------------ corruptions

def local_shuffle(x: np.ndarray, rng: np.random.Generator, blocks: int, max_size: Sequence[int]) -> np.ndarray:
    """Shuffle the voxels inside ``blocks`` small random boxes (each at most ``max_size``, [z, y, x]).
    The multiset of values is unchanged; local texture is destroyed."""
    x = x.copy()
    for _ in range(blocks):
        size = [int(rng.integers(1, max(1, min(m, s)) + 1)) for m, s in zip(max_size, x.shape)]
        at = [int(rng.integers(0, s - k + 1)) for s, k in zip(x.shape, size)]
        sl = tuple(slice(a, a + k) for a, k in zip(at, size))
        block = x[sl]
        x[sl] = rng.permutation(block.ravel()).reshape(block.shape)
    return x


def bezier_curve(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random monotone increasing cubic Bezier curve through (0, 0) and (1, 1) applied to the
    intensities (expected in [0, 1]); the inner control points are sorted in both coordinates, which
    makes both coordinates non-decreasing in the curve parameter."""
    cx = np.sort(rng.uniform(0, 1, 2))
    cy = np.sort(rng.uniform(0, 1, 2))
    t = np.linspace(0.0, 1.0, 512)
    b = np.stack([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3])
    px = b[1] * cx[0] + b[2] * cx[1] + b[3]
    py = b[1] * cy[0] + b[2] * cy[1] + b[3]
    return np.interp(np.clip(x, 0.0, 1.0), px, py).astype(x.dtype)


def inpaint(x: np.ndarray, rng: np.random.Generator, boxes: int, max_fraction: float) -> np.ndarray:
    """Replace ``boxes`` random cuboids (edges up to ``max_fraction`` of the crop) by uniform noise in [0, 1]."""
    x = x.copy()
    for _ in range(boxes):
        size = [int(rng.integers(1, max(1, int(round(s * max_fraction))) + 1)) for s in x.shape]
        at = [int(rng.integers(0, s - k + 1)) for s, k in zip(x.shape, size)]
        x[tuple(slice(a, a + k) for a, k in zip(at, size))] = rng.uniform(0, 1, size)
    return x


def corrupt(x: np.ndarray, rng: np.random.Generator, cfg: DenseConfig) -> np.ndarray:
    """The three local corruptions, each with its probability; the result stays in [0, 1]."""
    if rng.random() < cfg.shuffle_prob:
        x = local_shuffle(x, rng, cfg.shuffle_blocks, cfg.shuffle_block_size)
    if rng.random() < cfg.bezier_prob:
        x = bezier_curve(x, rng)
    if rng.random() < cfg.inpaint_prob:
        x = inpaint(x, rng, cfg.inpaint_boxes, cfg.inpaint_size)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------ views

class DensePairBatches:
    """``batch(step)`` -> numpy arrays for ``pairs_per_step`` (P) crop pairs:
    ``views``/``clean`` (2P, 1, Z, Y, X) float32 (rows k and P+k are the two views of pair k);
    ``voxels1``/``voxels2`` (N, 4) int64 rows ``[view row, z, y, x]`` - row n of both is the same
    physical voxel; ``pair`` (N,) the pair of each voxel; ``task``, ``group``, ``image`` (P,) int64."""

    def __init__(self, catalog: Catalog, data: DataConfig, cfg: DenseConfig, seed: int = 0, rank: int = 0,
                 warn=None):
        self.catalog, self.cfg, self.seed, self.rank = catalog, cfg, seed, rank
        self.crop = np.asarray(data.crop_size, dtype=int)
        self.sampler = BalancedSampler(catalog, data.balance)
        self.thresholds = [data.body_threshold.get(im.group, data.body_threshold.get(im.modality, 0.05))
                           for im in catalog.images]
        self.unusable: set[int] = set()
        self.warn = warn or (lambda m: print(m, file=sys.stderr, flush=True))

    def rng(self, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.rank, step, 7])

    def _volume(self, index: int) -> np.ndarray:
        """The cached volume, zero-padded at the far end of any axis shorter than the crop."""
        array = self.catalog.images[index].array(self.catalog.cache_dir)
        pad = [(0, max(0, int(c) - s)) for s, c in zip(array.shape, self.crop)]
        if any(p[1] for p in pad):
            array = np.pad(np.asarray(array, dtype=np.float32), pad)
        return array

    def _choose(self, rng: np.random.Generator) -> int:
        for _ in range(1000):
            index = self.sampler.choose(rng)
            if index in self.unusable:
                continue
            array = self._volume(index)
            if self._anchor(array, self.thresholds[index], rng) is not None:
                return index
            self.unusable.add(index)
            self.warn(f"warning: {self.catalog.images[index].source_path} has no voxel above the body threshold "
                      f"{self.thresholds[index]}: skipped by the dense method")
            if len(self.unusable) == len(self.catalog.images):
                break
        raise HSSLError("no pretraining volume has body voxels above data.body_threshold: lower the threshold for "
                        "the dense method")

    @staticmethod
    def _anchor(array: np.ndarray, threshold: float, rng: np.random.Generator) -> np.ndarray | None:
        shape = np.asarray(array.shape)
        for _ in range(200):  # rejection sampling: cheap when the body fills much of the (body-cropped) volume
            p = (rng.random(3) * shape).astype(int)
            if array[tuple(p)] > threshold:
                return p
        hits = np.flatnonzero(np.asarray(array) > threshold)
        if hits.size == 0:
            return None
        return np.asarray(np.unravel_index(hits[int(rng.integers(hits.size))], array.shape))

    def _pair(self, array: np.ndarray, threshold: float, rng: np.random.Generator):
        shape, crop = np.asarray(array.shape), self.crop
        best = None
        for _ in range(REDRAWS):
            anchor = self._anchor(array, threshold, rng)
            # Each crop contains the anchor: its start lies in [anchor - crop + 1, anchor], inside the volume.
            lo = np.maximum(0, anchor - crop + 1)
            hi = np.minimum(anchor, shape - crop)
            s1 = np.array([rng.integers(a, b + 1) for a, b in zip(lo, hi)])
            s2 = np.array([rng.integers(a, b + 1) for a, b in zip(lo, hi)])
            start, stop = np.minimum(s1, s2), np.maximum(s1, s2) + crop
            region = np.asarray(array[tuple(slice(a, b) for a, b in zip(start, stop))], dtype=np.float32)
            o_lo, o_hi = np.maximum(s1, s2) - start, np.minimum(s1, s2) + crop - start
            overlap = region[tuple(slice(a, b) for a, b in zip(o_lo, o_hi))]
            body = np.argwhere(overlap > threshold)
            if best is None or len(body) > len(best[-1]):
                best = (s1 - start, s2 - start, region, o_lo, body)
            if len(body) >= self.cfg.min_overlap_voxels:
                break
        r1, r2, region, o_lo, body = best
        if len(body) > self.cfg.voxels_per_pair:
            body = body[rng.choice(len(body), self.cfg.voxels_per_pair, replace=False)]
        p = body + o_lo  # in region coordinates
        v1 = region[tuple(slice(a, a + c) for a, c in zip(r1, crop))]
        v2 = region[tuple(slice(a, a + c) for a, c in zip(r2, crop))]
        return v1, v2, p - r1, p - r2

    def batch(self, step: int) -> dict[str, np.ndarray]:
        rng = self.rng(step)
        cfg, n_pairs = self.cfg, self.cfg.pairs_per_step
        views, cleans, vox1, vox2, pairs, images = [[], []], [[], []], [], [], [], []
        index = self._choose(rng)
        for k in range(n_pairs):
            if k and not cfg.same_volume:
                index = self._choose(rng)
            v1, v2, i1, i2 = self._pair(self._volume(index), self.thresholds[index], rng)
            for v, clean in enumerate((v1, v2)):
                cleans[v].append(clean)
                views[v].append(corrupt(clean, rng, cfg))
            vox1.append(np.column_stack([np.full(len(i1), k), i1]))
            vox2.append(np.column_stack([np.full(len(i2), n_pairs + k), i2]))
            pairs.append(np.full(len(i1), k))
            images.append(index)
        ims = self.catalog.images
        return {"views": np.stack(views[0] + views[1])[:, None].astype(np.float32),
                "clean": np.stack(cleans[0] + cleans[1])[:, None].astype(np.float32),
                "voxels1": np.concatenate(vox1).astype(np.int64), "voxels2": np.concatenate(vox2).astype(np.int64),
                "pair": np.concatenate(pairs).astype(np.int64),
                "task": np.asarray([ims[i].task_id for i in images], dtype=np.int64),
                "group": np.asarray([ims[i].group_id for i in images], dtype=np.int64),
                "image": np.asarray(images, dtype=np.int64)}


# ------------------------------------------------------------------------------ voxel vector

def cumulative_strides(plan: Plan) -> list[tuple[int, int, int]]:
    """Level i of ``SegNet.pyramid`` is ``cumulative_strides(plan)[i]`` times coarser than the input."""
    out, acc = [], (1, 1, 1)
    for s in plan.strides:
        acc = tuple(a * b for a, b in zip(acc, s))
        out.append(acc)
    return out


class VoxelHead(nn.Module):
    """Pyramid features at given voxels -> one contrastive vector per voxel.

    ``balanced``: level i through a 1x1x1 projection to ``level_width`` channels (a linear map on the
    gathered vectors, which is the same thing), concatenated: ``levels x level_width`` wide. With
    ``learned_projection`` false the projections are fixed random buffers (seeded, saved with the
    model, never trained). ``unbalanced``: the raw levels concatenated (``sum(channels)`` wide).
    """

    def __init__(self, plan: Plan, cfg: DenseConfig, seed: int = 0):
        super().__init__()
        self.strides = cumulative_strides(plan)
        self.balanced = cfg.projection == "balanced"
        self.learned = cfg.learned_projection
        channels = list(plan.channels)
        if self.balanced:
            generator = torch.Generator().manual_seed(seed + 1234)
            weights = [torch.randn(cfg.level_width, c, generator=generator) / c ** 0.5 for c in channels]
            if self.learned:
                self.proj = nn.ParameterList(nn.Parameter(w) for w in weights)
            else:
                for i, w in enumerate(weights):
                    self.register_buffer(f"fixed_proj_{i}", w)
            width = cfg.level_width * len(channels)
        else:
            width = sum(channels)
        self.width = width
        layers: list[nn.Module] = []
        dims = [width, *cfg.head_dims]
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
        self.mlp = nn.Sequential(*layers)

    def projection(self, level: int) -> torch.Tensor:
        return self.proj[level] if self.learned else getattr(self, f"fixed_proj_{level}")

    def vector(self, pyramid: list[torch.Tensor], voxels: torch.Tensor) -> torch.Tensor:
        """The per-voxel vector before the MLP: ``voxels`` (N, 4) ``[batch row, z, y, x]`` -> (N, width)."""
        parts = []
        b = voxels[:, 0]
        for level, (feat, stride) in enumerate(zip(pyramid, self.strides)):
            z, y, x = (voxels[:, 1 + a] // stride[a] for a in range(3))
            f = feat.permute(0, 2, 3, 4, 1)[b, z, y, x].float()
            parts.append(f @ self.projection(level).t() if self.balanced else f)
        return torch.cat(parts, dim=1)

    def forward(self, pyramid: list[torch.Tensor], voxels: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.vector(pyramid, voxels))
