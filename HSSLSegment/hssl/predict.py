"""Whole-volume prediction with MONAI's sliding-window inference (Gaussian blending).

Memory: the volume is processed in slabs along numpy axis 0 (z) so that only one slab's class
probabilities are held at a time; slabs overlap by half a patch and each keeps only its central
part, so the result equals one sliding window over the whole volume up to blending at slab seams.
A 512 x 512 x 300 CT then stays within a few GB on CPU.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from .device import autocast_dtype, is_oom
from .errors import OutOfMemory
from .model_store import Model
from .training import autocast

SLAB_VOXELS = 48 * 2**20  # voxels per slab (about 200 MB of float32 input)
# MONAI accumulates (classes x slab) float32 values: beyond this many classes the slab shrinks so that
# a model with many labels (at most model_format.MAX_LABELS) needs no more than one with 2 labels.
SLAB_CLASSES = 3


def window_count(shape, roi, overlap) -> int:
    """Sliding windows of size ``roi`` that cover ``shape`` at ``overlap`` (as MONAI places them)."""
    n = 1
    for s, r in zip(shape, roi):
        step = max(1, int(r * (1 - overlap)))
        n *= 1 if s <= r else math.ceil((s - r) / step) + 1
    return n


def _context(roi: tuple[slice, ...], patch, shape) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """``roi`` clipped to ``shape`` and the part predict_array reads for it (half a patch of context)."""
    roi = tuple(slice(max(0, r.start), min(n, r.stop)) for r, n in zip(roi, shape))
    context = tuple(slice(max(0, r.start - p // 2), min(n, r.stop + p // 2)) for r, p, n in zip(roi, patch, shape))
    return roi, context


def _slab_starts(shape, patch, classes: int) -> tuple[list[tuple[int, int, int]], int]:
    """The z-slabs predict_array runs one after another on a ``shape`` volume: (first slice, read from,
    read to) each, and the slab depth."""
    nz, plane = shape[0], int(np.prod(shape[1:]))
    slab = max(patch[0] * 2, SLAB_VOXELS * SLAB_CLASSES // max(classes, SLAB_CLASSES) // max(plane, 1))
    margin = patch[0] // 2
    starts = list(range(0, nz, slab)) if nz > slab else [0]
    return [(s, max(0, s - margin), min(nz, s + slab + margin)) for s in starts], slab


def predicted_windows(shape, patch, overlap: float, classes: int, roi: tuple[slice, ...] | None = None) -> int:
    """The sliding windows predict_array runs on a ``shape`` volume (within ``roi``: its context
    included), so that time estimates count what prediction does."""
    if roi is not None:
        _, context = _context(roi, patch, shape)
        shape = [c.stop - c.start for c in context]
    slabs, _ = _slab_starts(shape, patch, classes)
    return sum(window_count((hi - lo, *shape[1:]), patch, overlap) for _, lo, hi in slabs)


def predict_array(model: Model, image: np.ndarray, device: torch.device, overlap: float = 0.25,
                  sw_batch_size: int = 4, precision: str = "auto", probabilities: bool = False,
                  on_progress: Callable[[int, int], None] | None = None, roi: tuple[slice, ...] | None = None):
    """Segment a normalised ``[z, y, x]`` float32 volume.

    Returns ``labels`` (``[z, y, x]`` uint8/uint16 class indices, 0 = background) and, when asked,
    ``probs`` (``(C, z, y, x)`` float16 softmax probabilities). With ``roi`` (``[z, y, x]``
    slices) only that region is predicted (with half a patch of context around it); everything
    outside it is background.
    """
    if roi is not None:
        roi, context = _context(roi, model.plan.patch_size, image.shape)
        sub_labels, sub_probs = predict_array(model, image[context], device, overlap, sw_batch_size, precision,
                                              probabilities, on_progress)
        inner = tuple(slice(r.start - c.start, r.stop - c.start) for r, c in zip(roi, context))
        labels = np.zeros(image.shape, dtype=sub_labels.dtype)
        labels[roi] = sub_labels[inner]
        probs = None
        if sub_probs is not None:
            probs = np.zeros((sub_probs.shape[0], *image.shape), dtype=np.float16)
            probs[0] = 1.0
            probs[(slice(None), *roi)] = sub_probs[(slice(None), *inner)]
        return labels, probs
    net, roi = model.net.to(device).eval(), model.plan.patch_size
    nz = image.shape[0]
    classes = model.net.out_channels
    labels = np.zeros(image.shape, dtype=np.uint8 if classes < 256 else np.uint16)
    probs = np.zeros((classes, *image.shape), dtype=np.float16) if probabilities else None
    slabs, slab = _slab_starts(image.shape, roi, classes)
    total = predicted_windows(image.shape, roi, overlap, classes)
    done = [0]
    dtype = autocast_dtype(device, precision)

    def predictor(x: torch.Tensor) -> torch.Tensor:
        with autocast(device.type, dtype):
            out = torch.softmax(net(x).float(), dim=1)
        done[0] += x.shape[0]  # a batch of windows
        if on_progress is not None:
            on_progress(min(done[0], total), total)
        return out

    try:
        with torch.inference_mode():
            for s, lo, hi in slabs:
                x = torch.from_numpy(np.ascontiguousarray(image[lo:hi]))[None, None].to(device)
                out = sliding_window_inference(x, roi, sw_batch_size, predictor, overlap=overlap, mode="gaussian",
                                               padding_mode="replicate")
                keep = slice(s - lo, min(s + slab, nz) - lo)
                out = out[0, :, keep]
                labels[s:min(s + slab, nz)] = out.argmax(0).to("cpu").numpy().astype(labels.dtype)
                if probs is not None:
                    probs[:, s:min(s + slab, nz)] = out.to("cpu", torch.float16).numpy()
                del out, x
    except (RuntimeError, MemoryError) as err:
        if isinstance(err, MemoryError) or is_oom(err):
            where = "GPU" if device.type == "cuda" else "host"
            raise OutOfMemory(f"{where} memory ran out while predicting a volume of {image.shape} voxels: "
                              + ("retry with --device cpu or a smaller --sw-batch-size" if device.type == "cuda"
                                 else "close other programs, lower --sw-batch-size, or crop the volume")) from None
        raise
    # Window count is estimated per slab; finish the bar exactly.
    if on_progress is not None:
        on_progress(total, total)
    return labels, probs

