"""Which arithmetic fine-tuning and prediction use (hssl.device.autocast_dtype)."""
import pytest
import torch

from hssl import device as device_module
from hssl.device import autocast_dtype
from hssl.errors import HSSLError


def test_fp32_is_always_full_precision():
    for name in ("cpu", "cuda", "mps"):
        assert autocast_dtype(torch.device(name), "fp32") is None


def test_cpu_auto_follows_native_bf16(monkeypatch):
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: True)
    assert autocast_dtype(torch.device("cpu"), "auto") is torch.bfloat16
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: False)
    assert autocast_dtype(torch.device("cpu"), "auto") is None
    assert autocast_dtype(torch.device("cpu"), "bf16") is torch.bfloat16  # asked for explicitly


def test_cuda_auto_prefers_bf16_and_falls_back_to_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert autocast_dtype(torch.device("cuda"), "auto") is torch.bfloat16
    assert autocast_dtype(torch.device("cuda"), "fp16") is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert autocast_dtype(torch.device("cuda"), "auto") is torch.float16


def test_unsupported_choices_are_one_line_errors():
    with pytest.raises(HSSLError, match="fp16 is for CUDA"):
        autocast_dtype(torch.device("cpu"), "fp16")
    with pytest.raises(HSSLError, match="unknown precision"):
        autocast_dtype(torch.device("cpu"), "int8")
    with pytest.raises(HSSLError, match="not supported on mps"):
        autocast_dtype(torch.device("mps"), "bf16")
    assert autocast_dtype(torch.device("mps"), "auto") is None
