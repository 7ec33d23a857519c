"""Pretraining batches: which image a crop comes from (balanced across tasks and groups), where the
crop lies, and the two augmented views of it.

A batch is a pure function of ``(seed, rank, step)``: its random generator is seeded with those
three numbers. Resuming at step N therefore sees exactly the batches an uninterrupted run would
have seen (the "data position" is the step), every process of a distributed run draws different
crops, and batches can be prepared ahead in a thread without changing anything.

Arrays are ``[z, y, x]``; z is the slice axis. Geometric augmentations act in-plane only (y, x),
because the through-plane spacing is several times coarser (see ``hssl.sampling``).
"""
from __future__ import annotations

import concurrent.futures
from typing import Sequence

import numpy as np

from .catalog import Catalog
from .config import AugmentConfig


class BalancedSampler:
    """Chooses images: ``hierarchical`` (a group uniformly, then a task of it, then an image of it),
    ``task`` (a task uniformly, then an image), ``group`` (a group, then an image) or ``image``
    (uniform over images, so big datasets dominate)."""

    def __init__(self, catalog: Catalog, balance: str = "hierarchical"):
        self.catalog, self.balance = catalog, balance
        self.by_task: dict[int, list[int]] = {}
        self.by_group: dict[int, list[int]] = {}
        self.tasks_of_group: dict[int, list[int]] = {}
        for n, im in enumerate(catalog.images):
            self.by_task.setdefault(im.task_id, []).append(n)
            self.by_group.setdefault(im.group_id, []).append(n)
            tasks = self.tasks_of_group.setdefault(im.group_id, [])
            if im.task_id not in tasks:
                tasks.append(im.task_id)

    def probabilities(self) -> np.ndarray:
        """Probability of each catalog image under the balance rule (used by tests and the log)."""
        n = len(self.catalog.images)
        p = np.zeros(n)
        for i, im in enumerate(self.catalog.images):
            if self.balance == "image":
                p[i] = 1 / n
            elif self.balance == "task":
                p[i] = 1 / len(self.by_task) / len(self.by_task[im.task_id])
            elif self.balance == "group":
                p[i] = 1 / len(self.by_group) / len(self.by_group[im.group_id])
            else:
                group_tasks = self.tasks_of_group[im.group_id]
                p[i] = 1 / len(self.by_group) / len(group_tasks) / len(self.by_task[im.task_id])
        return p

    def choose(self, rng: np.random.Generator) -> int:
        if self.balance == "image":
            return int(rng.integers(len(self.catalog.images)))
        if self.balance == "task":
            pool = self.by_task[sorted(self.by_task)[rng.integers(len(self.by_task))]]
        elif self.balance == "group":
            pool = self.by_group[sorted(self.by_group)[rng.integers(len(self.by_group))]]
        else:
            group = sorted(self.by_group)[rng.integers(len(self.by_group))]
            tasks = self.tasks_of_group[group]
            pool = self.by_task[tasks[rng.integers(len(tasks))]]
        return pool[int(rng.integers(len(pool)))]


class PairBatches:
    """``batch(step)`` -> dict of numpy arrays for ``batch_size`` crops:
    ``views`` (2B, 1, Z, Y, X) float32 - rows i and B+i are the two views of crop i;
    ``clean`` (2B, 1, Z, Y, X) float32 - each view before its intensity corruptions (restore target);
    ``task``, ``group`` (B,) int64; ``image`` (B,) int64 catalog indices."""

    def __init__(self, catalog: Catalog, crop_size: Sequence[int], batch_size: int, augment: AugmentConfig,
                 balance: str = "hierarchical", seed: int = 0, rank: int = 0):
        self.catalog = catalog
        self.sampler = BalancedSampler(catalog, balance)
        self.crop = np.asarray(crop_size, dtype=int)
        self.batch_size, self.aug, self.seed, self.rank = batch_size, augment, seed, rank

    def rng(self, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.rank, step])

    def batch(self, step: int) -> dict[str, np.ndarray]:
        rng = self.rng(step)
        views, cleans, tasks, groups, images = [[], []], [[], []], [], [], []
        for _ in range(self.batch_size):
            index = self.sampler.choose(rng)
            im = self.catalog.images[index]
            region = self._region(im.array(self.catalog.cache_dir), rng)
            for v in range(2):
                view, clean = self._view(region, rng)
                views[v].append(view)
                cleans[v].append(clean)
            tasks.append(im.task_id)
            groups.append(im.group_id)
            images.append(index)
        return {"views": np.stack(views[0] + views[1])[:, None], "clean": np.stack(cleans[0] + cleans[1])[:, None],
                "task": np.asarray(tasks, dtype=np.int64), "group": np.asarray(groups, dtype=np.int64),
                "image": np.asarray(images, dtype=np.int64)}

    def _region(self, array: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A random box of crop size enlarged in-plane by ``view_shift``, padded (edge) if the image is smaller."""
        size = self.crop.copy()
        size[1:] = np.ceil(size[1:] * (1 + self.aug.view_shift)).astype(int)
        start = [int(rng.integers(0, max(1, s - c + 1))) for s, c in zip(array.shape, size)]
        box = np.asarray(array[tuple(slice(a, a + c) for a, c in zip(start, size))], dtype=np.float32)
        pad = [(0, int(c - s)) for s, c in zip(box.shape, size)]
        if any(p[1] for p in pad):
            box = np.pad(box, pad, mode="edge")
        return box

    def _view(self, region: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        a, c = self.aug, self.crop
        off = [int(rng.integers(0, s - k + 1)) for s, k in zip(region.shape, c)]
        x = region[tuple(slice(o, o + k) for o, k in zip(off, c))].copy()
        for axis in (1, 2):
            if rng.random() < a.flip:
                x = np.flip(x, axis)
        if c[1] == c[2] and rng.random() < a.rot90:
            x = np.rot90(x, int(rng.integers(1, 4)), axes=(1, 2))
        x = np.ascontiguousarray(x)
        clean = x.copy()
        g = float(np.exp(rng.uniform(-a.gamma, a.gamma)))
        x = np.clip(x, 0.0, None) ** g
        x = x * (1 + rng.uniform(-a.intensity_scale, a.intensity_scale)) + rng.uniform(-a.intensity_shift,
                                                                                          a.intensity_shift)
        if rng.random() < a.blur_prob:
            x = _box_blur_inplane(x)
        if rng.random() < a.noise_prob:
            x = x + rng.normal(0, a.noise_std, x.shape)
        if rng.random() < a.cutout_prob:
            for _ in range(a.cutout_boxes):
                size = [int(rng.integers(1, max(2, k // 3) + 1)) for k in c]
                at = [int(rng.integers(0, k - s + 1)) for k, s in zip(c, size)]
                sl = tuple(slice(p, p + s) for p, s in zip(at, size))
                x[sl] = rng.uniform(0, 1, size)
        return x.astype(np.float32), clean.astype(np.float32)


def _box_blur_inplane(x: np.ndarray) -> np.ndarray:
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
    out = np.zeros_like(x)
    for dy in range(3):
        for dx in range(3):
            out += p[:, dy:dy + x.shape[1], dx:dx + x.shape[2]]
    return out / 9.0


class Prefetcher:
    """Prepares the batches of the next steps in a background thread (batches depend only on the
    step, so this changes timing, never content)."""

    def __init__(self, batches: PairBatches, depth: int):
        self.batches, self.depth = batches, depth
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1) if depth > 0 else None
        self.pending: dict[int, concurrent.futures.Future] = {}

    def get(self, step: int) -> dict[str, np.ndarray]:
        if self.pool is None:
            return self.batches.batch(step)
        for s in range(step, step + self.depth + 1):
            if s not in self.pending:
                self.pending[s] = self.pool.submit(self.batches.batch, s)
        for s in [s for s in self.pending if s < step]:
            self.pending.pop(s).cancel()
        return self.pending.pop(step).result()

    def close(self) -> None:
        if self.pool is not None:
            for f in self.pending.values():
                f.cancel()
            self.pool.shutdown(wait=True)
