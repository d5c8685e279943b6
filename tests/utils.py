"""Helpers shared by the kernel tests: random inputs, comparisons with the float64 references,
bad-input and ahead-of-time compilation assertions."""

from __future__ import annotations

import pytest
import torch
from aot import ARCHS, KernelCase, compile_kernels
from torch.utils._python_dispatch import TorchDispatchMode


class CustomOpCalls(TorchDispatchMode):
    """Records the ``appo_kernels`` custom ops that reach the dispatcher; being a dispatch mode,
    it also makes every op of the package take its custom op rather than the direct eager path
    (docs/design.md, section 2), so a call inside it is the custom-op twin of the same call
    outside."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "appo_kernels":
            self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def random_mask(gen: torch.Generator, B: int, T: int, keep: float = 0.7) -> torch.Tensor:
    """A random bool [B, T] mask whose first row is all invalid and second row has one valid
    position (when B allows), the edge cases every row op must handle."""
    mask = torch.rand(B, T, generator=gen) < keep
    if B >= 2:
        mask[0] = False
    if B >= 3 and T >= 1:
        mask[1] = False
        mask[1, T // 2] = True
    return mask


def assert_close_to_ref(actual: torch.Tensor, expected: torch.Tensor, scale=1.0, tol=1e-5):
    """|actual - expected| <= tol * (scale + 1) elementwise, with equal non-finite patterns."""
    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape
    actual = actual.double()
    assert torch.equal(actual.isnan(), expected.isnan())
    finite = expected.isfinite()
    assert torch.equal(actual[~finite & ~expected.isnan()], expected[~finite & ~expected.isnan()])
    error = (actual - expected).abs()[finite]
    limit = (tol * (torch.as_tensor(scale, dtype=torch.float64).expand(expected.shape) + 1))[finite]
    assert bool((error <= limit).all()), f"max error {error.max():.3g}"


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    """max |got - want| <= rel * max |want| over the finite entries, with equal non-finite
    patterns (gradients whose entries span many orders of magnitude)."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    assert got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    finite = torch.isfinite(want)
    err = (got[finite] - want[finite]).abs().max().item() if finite.any() else 0.0
    scale = want[finite].abs().max().item() if finite.any() else 0.0
    assert err <= rel * scale + 1e-12, f"max error {err:.3g} vs scale {scale:.3g}"


def assert_rejects(exc: type, arg_name: str, fn, *args, **kwargs) -> None:
    """``fn`` raises ``exc`` with a message that names ``arg_name``."""
    with pytest.raises(exc, match=arg_name):
        fn(*args, **kwargs)


def assert_compiles_without_spills(module: str, kernel: str, signature: dict, constexpr_sets):
    """AOT-compiles ``kernel`` for every arch in ``aot.ARCHS`` and every constexpr set; asserts
    no LOCAL (spill) memory."""
    cases = [
        KernelCase(module, kernel, signature, constexprs, arch=arch)
        for arch in ARCHS
        for constexprs in constexpr_sets
    ]
    for case, result in zip(cases, compile_kernels(cases)):
        assert result.local == 0, f"{kernel} sm_{case.arch} {case.constexprs}: {result}"
