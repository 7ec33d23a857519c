"""Adaptation to the scan being segmented: a short self-supervised phase on the very volume, before
its painted slices are used.

The objective is the dense voxel-level one of pretraining (``hssl.pretrain.dense``; Kats et al.,
ISBI 2024): two overlapping crops of the scan, each corrupted on its own, the same physical voxels'
pyramid vectors pulled together against all other sampled voxels (InfoNCE), and each crop restored
from its corrupted view. Crops are drawn from the region that fine-tuning and prediction will see
(the painted structures' region grown by one patch), never from the labels: nothing painted is
read. The voxel head and the restoration output exist only during this phase; the network's body
keeps what it learned and fine-tuning starts from it.

The phase takes its seconds out of the fine-tuning time budget (``FinetuneOptions.adapt_seconds``,
default ``recipe.adapt_share`` of the budget) and stops with the same stop request (stop file,
signal, parent gone).
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from .device import is_oom
from .network import SegNet
from .pretrain.config import DataConfig, DenseConfig
from .pretrain.dense import DensePairBatches, VoxelHead
from .pretrain.losses import DenseLoss
from .training import autocast, backward_and_step

# Voxels above this (in the normalised [0, 1] range) are body, the anchors of the crop pairs: the
# thresholds of pretraining (-500 HU in the CT window, the bottom 5 % of an MR's percentile range).
BODY_THRESHOLD = {"ct": DataConfig().body_threshold["ct"], "percentile": DataConfig().body_threshold["mr"]}


class ScanPairs(DensePairBatches):
    """Crop pairs of one in-memory volume (normalised to [0, 1]) instead of a pretraining catalog."""

    def __init__(self, array: np.ndarray, crop, cfg: DenseConfig, seed: int, threshold: float):
        # The catalog's sampling state is not needed: there is one volume and it is always chosen.
        self.cfg, self.seed, self.rank = cfg, seed, 0
        self.crop = np.asarray(crop, dtype=int)
        pad = [(0, max(0, int(c) - s)) for s, c in zip(array.shape, self.crop)]
        self.array = np.pad(array, pad) if any(p[1] for p in pad) else array
        self.thresholds = [threshold]
        self.catalog = SimpleNamespace(images=[SimpleNamespace(task_id=0, group_id=0)])

    def _volume(self, index: int) -> np.ndarray:
        return self.array

    def _choose(self, rng: np.random.Generator) -> int:
        return 0

    def has_body(self) -> bool:
        return bool((self.array > self.thresholds[0]).any())


def context_region(shape, roi, patch) -> tuple[slice, ...]:
    """``roi`` grown by one patch on every side (clipped to the volume); the whole volume without one."""
    if roi is None:
        return tuple(slice(0, n) for n in shape)
    return tuple(slice(max(0, r.start - p), min(n, r.stop + p)) for r, p, n in zip(roi, patch, shape))


def adapt(net: SegNet, image: np.ndarray, roi, seconds: float, device: torch.device, dtype, seed: int,
          stop, scheme: str = "percentile", cfg: DenseConfig | None = None, lr: float = 1e-3,
          clip: float | None = 1.0, report=None) -> dict:
    """Train ``net``'s body for up to ``seconds`` on crop pairs of ``image`` (normalised with
    ``scheme``) around ``roi``. ``stop()`` is asked before every step; ``report(step, elapsed_s,
    loss)`` is called after each. Returns what ran: steps, seconds, the first and last loss, and
    ``skipped`` (why it ended before its seconds: no body, a stop, a non-finite loss, out of memory)."""
    cfg = cfg or DenseConfig(pairs_per_step=2)
    patch = tuple(net.plan.patch_size)
    threshold = BODY_THRESHOLD.get(scheme, BODY_THRESHOLD["percentile"])
    pairs = ScanPairs(image[context_region(image.shape, roi, patch)], patch, cfg, seed, threshold)
    record = {"objective": "dense", "seconds_budget": round(float(seconds), 1), "steps": 0, "seconds": 0.0,
              "first_loss": None, "last_loss": None, "pairs_per_step": cfg.pairs_per_step}
    if not pairs.has_body():
        return {**record, "skipped": f"no voxel of the region is above {threshold} after normalisation"}
    torch.manual_seed(seed)
    head = VoxelHead(net.plan, cfg, seed).to(device)
    restore = nn.Conv3d(net.plan.channels[0], 1, kernel_size=1).to(device)
    loss_fn = DenseLoss(cfg)
    params = [*net.parameters(), *head.parameters(), *restore.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-5)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    net.train()
    head.train()
    t0 = time.monotonic()
    step = 0
    while time.monotonic() - t0 < seconds:
        if stop():
            record["skipped"] = "stopped"
            break
        try:
            batch = pairs.batch(step)
            views = torch.from_numpy(batch["views"]).to(device)
            voxels = torch.from_numpy(np.concatenate([batch["voxels1"], batch["voxels2"]])).to(device)
            with autocast(device.type, dtype):
                pyramid = net.pyramid(views)
                outputs = {"voxel": head(pyramid, voxels), "restore": restore(pyramid[0])}
            loss, _ = loss_fn(outputs, {"clean": torch.from_numpy(batch["clean"]).to(device)})
            if not torch.isfinite(loss):
                record["skipped"] = f"the self-supervised loss became {loss.item()} at step {step + 1}"
                break
            backward_and_step(loss, params, optimizer, scaler, clip)
        except (RuntimeError, MemoryError) as err:
            if not (isinstance(err, MemoryError) or is_oom(err)):
                raise
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            record["skipped"] = f"out of memory on {device.type} at step {step + 1}"
            break
        step += 1
        value = float(loss.item())
        record["first_loss"] = value if record["first_loss"] is None else record["first_loss"]
        record["last_loss"] = value
        if report is not None:
            report(step, time.monotonic() - t0, value)
    record["steps"], record["seconds"] = step, round(time.monotonic() - t0, 1)
    return record
