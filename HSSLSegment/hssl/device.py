"""Device choice and memory errors."""
from __future__ import annotations

import torch

from .errors import HSSLError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU. Asking for an absent device is an error."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise HSSLError("--device cuda was asked for but this PyTorch sees no CUDA GPU: use --device cpu "
                            "(or auto), or install a CUDA build of PyTorch")
        return torch.device(name)
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise HSSLError("--device mps was asked for but Apple MPS is not available: use --device cpu or auto")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise HSSLError(f"unknown device '{name}': choose auto, cpu, cuda or mps")


def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def set_threads(threads: int | None) -> int:
    """Limit CPU threads (torch intra-op). ``None`` keeps PyTorch's default (all cores).

    On a busy machine fewer threads are often much faster: OpenMP threads that wait for a
    descheduled sibling spin, so 2 threads sharing 2 cores with another process measured 5x
    slower per step than 1 thread here. The Slicer job leaves one core to Slicer by default.
    """
    if threads is not None:
        if threads < 1:
            raise HSSLError(f"--threads must be at least 1 (got {threads})")
        torch.set_num_threads(threads)
    return torch.get_num_threads()
