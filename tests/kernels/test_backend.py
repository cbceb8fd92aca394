"""The backend dispatch: one function decides, and bad requests are clear errors."""
import pytest
import torch

from dasg_kernels.backend import interpreter_enabled, resolve_backend


def test_torch_backend_always_available():
    assert resolve_backend("torch", torch.zeros(1)) == "torch"


def test_auto_on_cpu_follows_interpreter():
    expected = "triton" if interpreter_enabled() else "torch"
    assert resolve_backend("auto", torch.zeros(1)) == expected


def test_unknown_backend_is_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", torch.zeros(1), op="swa_attention")


def test_triton_on_cpu_without_interpreter_is_clear(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.zeros(1), op="swa_attention")


def test_mixed_devices_rejected():
    meta = torch.zeros(1, device="meta")
    with pytest.raises(ValueError, match="one device"):
        resolve_backend("auto", torch.zeros(1), meta)
