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


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AVX-512 BF16 or AMX): autocast to bf16 then
    roughly halves a training step (measured 2.1-2.6x on an AVX-512 BF16 EPYC); without it bf16 is
    emulated and slower than float32."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except RuntimeError:
            pass
    return False


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: full float32).

    ``auto``: bfloat16 on CUDA GPUs that support it (float16 on older ones), bfloat16 on CPUs with
    native bf16, float32 elsewhere (Apple MPS included).
    """
    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        raise HSSLError(f"unknown precision '{precision}': choose {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "fp16":
            return torch.float16
        if precision == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if device.type == "cpu":
        if precision == "fp16":
            raise HSSLError("--precision fp16 is for CUDA GPUs: use bf16 or fp32 on the CPU")
        if precision == "bf16" or cpu_has_native_bf16():
            return torch.bfloat16
        return None
    if precision != "auto":
        raise HSSLError(f"--precision {precision} is not supported on {device.type}: use fp32 or auto")
    return None


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
