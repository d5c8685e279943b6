"""Backend selection: Triton kernels on CUDA tensors, a PyTorch path of the same math on CPU.

``APPO_KERNELS_BACKEND=triton|torch`` forces one backend (read at call time). On CPU tensors,
``triton`` runs the real kernels through Triton's interpreter, which needs ``TRITON_INTERPRET=1``
before any kernel module is imported; we set it here when the variable asks for Triton on a machine
without CUDA, so ``APPO_KERNELS_BACKEND=triton python ...`` works on its own.
"""

from __future__ import annotations

import contextlib
import os

import torch

_ENV = "APPO_KERNELS_BACKEND"
_CHOICES = ("triton", "torch")

if os.environ.get(_ENV) == "triton" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:  # triton is a Linux-only dependency; the torch path works without it
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def forced_backend() -> str | None:
    choice = os.environ.get(_ENV, "").strip().lower()
    if not choice:
        return None
    if choice not in _CHOICES:
        raise ValueError(f"{_ENV} must be one of {_CHOICES}, got {choice!r}")
    return choice


def use_triton(device: torch.device) -> bool:
    """Whether an op on tensors of ``device`` runs the Triton kernels."""
    choice = forced_backend()
    if choice == "torch":
        return False
    if device.type == "cuda":
        if not HAS_TRITON:
            raise RuntimeError("CUDA tensors need triton; install it (pip install triton)")
        return True
    if choice == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"{_ENV}=triton but triton is not installed")
        if device.type != "cpu" or not interpreter_enabled():
            raise RuntimeError(
                f"{_ENV}=triton on {device.type} tensors needs Triton's interpreter: set "
                "TRITON_INTERPRET=1 before importing appo_kernels"
            )
        return True
    return False


def launch_device(t: torch.Tensor):
    """Makes ``t``'s CUDA device current around a Triton launch: Triton launches on the current
    device (and its current stream), not on the tensors' device. No-op for CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
