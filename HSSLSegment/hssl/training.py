"""The optimiser step shared by fine-tuning, pretraining and the benchmark's MONAI baseline.

One place for what must be identical wherever a network is trained: zero the gradients, backward
(through the AMP grad scaler on CUDA), unscale, clip the global gradient norm, step, update the
scaler; and the autocast context for the forward pass. Losses and data stay with their callers.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch


def autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass: ``dtype`` float16/bfloat16, or None for full precision."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def backward_and_step(loss: torch.Tensor, parameters: Iterable[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler | None = None, clip: float | None = None) -> None:
    """Backward ``loss`` and take one optimiser step with gradient-norm clipping at ``clip``."""
    parameters = list(parameters)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if clip:
            torch.nn.utils.clip_grad_norm_(parameters, clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(parameters, clip)
        optimizer.step()


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
