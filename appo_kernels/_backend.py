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


def environment_variable(name: str) -> str | None:
    """``os.environ.get(name)``, read from the dict that CPython's ``os.environ`` keeps its
    variables in (``os.environ._data``, which every write through ``os.environ`` updates) where
    there is one. ``os.environ.get`` of a variable that is not set raises and catches two
    ``KeyError``s on the way: in bench/overhead.py that cost ~20 µs per op call, as much as the
    arithmetic of a small ``token_stats`` call; the dict lookup costs next to nothing."""
    data = getattr(os.environ, "_data", None)
    if data is None:  # pragma: no cover - an os.environ without CPython's layout
        return os.environ.get(name)
    key = _ENCODED_NAMES.get(name)
    if key is None:
        key = _ENCODED_NAMES[name] = os.environ.encodekey(name)
    value = data.get(key)
    return None if value is None else os.environ.decodevalue(value)


_ENCODED_NAMES: dict[str, object] = {}  # name -> its key in os.environ._data


def interpreter_enabled() -> bool:
    return environment_variable("TRITON_INTERPRET") not in (None, "", "0")


def forced_backend() -> str | None:
    """The backend ``APPO_KERNELS_BACKEND`` forces (None: each device's own), read at call
    time."""
    choice = environment_variable(_ENV)
    if not choice:
        return None
    choice = choice.strip().lower()
    if not choice:
        return None
    if choice not in _CHOICES:
        raise ValueError(f"{_ENV} must be one of {_CHOICES}, got {choice!r}")
    return choice


_CPU = torch.device("cpu")


def is_cuda(device: torch.device) -> bool:
    """``device.type == "cuda"``; a torch.device's ``.type`` builds a new string each time
    (~1 µs), so a CPU device is told apart without it."""
    return device != _CPU and device.type == "cuda"


def device_type(t: torch.Tensor) -> str:
    """``t.device.type`` ("cpu" / "cuda" from the tensor's flags, without a torch.device)."""
    return "cpu" if t.is_cpu else "cuda" if t.is_cuda else t.device.type


def use_triton(device: torch.device) -> bool:
    """Whether an op on tensors of ``device`` runs the Triton kernels."""
    choice = forced_backend()
    if choice == "torch" or (choice is None and device == _CPU):  # (CPU: the usual case first)
        return False
    if is_cuda(device):
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
