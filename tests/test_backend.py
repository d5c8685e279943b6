"""Backend selection (APPO_KERNELS_BACKEND) and the PyTorch path where triton is not installed
(triton ships for Linux only; the package must import and run its CPU path elsewhere)."""

import os
import subprocess
import sys

import pytest
import torch

from appo_kernels._backend import forced_backend, use_triton

NO_TRITON = r"""
import sys
sys.modules["triton"] = None  # every `import triton...` now raises ImportError
import torch
import appo_kernels as ak
from appo_kernels._backend import HAS_TRITON, use_triton
assert not HAS_TRITON
gen = torch.Generator().manual_seed(0)
logits = torch.randn(2, 6, 11, generator=gen, requires_grad=True)
tokens = torch.randint(0, 11, (2, 6), generator=gen)
stats = ak.token_stats(logits, tokens)
(stats.logprob.sum() + stats.entropy.sum()).backward()
mask = torch.ones(2, 6, dtype=torch.bool)
bs = ak.branching_score(logits.detach(), tokens, stats.logprob.detach() - 0.1, mask)
points = ak.select_branch_points(bs.score, mask, torch.tensor([0, 0]), 3)
ak.future_value(stats.logprob.detach(), torch.zeros(2, 6), mask)
ak.discounted_future_sum(torch.randn(2, 6, generator=gen), mask, gamma=0.9)
assert torch.isfinite(logits.grad).all() and (points.rows[0] >= 0).all()
try:
    use_triton(torch.device("cuda"))
except RuntimeError as error:
    assert "triton" in str(error)
else:
    raise AssertionError("CUDA tensors without triton must raise")
print("ok")
"""


def test_imports_and_runs_the_torch_path_without_triton():
    env = {
        k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "APPO_KERNELS_BACKEND")
    }
    proc = subprocess.run(
        [sys.executable, "-c", NO_TRITON], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_forced_backend(monkeypatch):
    monkeypatch.setenv("APPO_KERNELS_BACKEND", "torch")
    assert forced_backend() == "torch" and not use_triton(torch.device("cpu"))
    monkeypatch.setenv("APPO_KERNELS_BACKEND", "Triton ")
    assert forced_backend() == "triton"
    monkeypatch.setenv("APPO_KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="APPO_KERNELS_BACKEND"):
        use_triton(torch.device("cpu"))
    monkeypatch.delenv("APPO_KERNELS_BACKEND")
    assert forced_backend() is None and not use_triton(torch.device("cpu"))


def test_environment_variable_follows_os_environ(monkeypatch):
    """``environment_variable`` (the backend choice's reader) sees what ``os.environ`` holds,
    including changes made after import."""
    from appo_kernels._backend import environment_variable

    name = "APPO_KERNELS_TEST_VARIABLE"
    monkeypatch.delenv(name, raising=False)
    assert environment_variable(name) is None
    for value in ("torch", "", " Triton ", "ü-\u00e9"):
        monkeypatch.setenv(name, value)
        assert environment_variable(name) == value == os.environ[name]
    monkeypatch.delenv(name)
    assert environment_variable(name) is None
    assert environment_variable("PATH") == os.environ.get("PATH")
