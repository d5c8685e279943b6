"""The package's custom ops: a ``torch.library`` custom op per op, with a direct eager path.

``custom_op(name)`` decorates an op's implementation like ``torch.library.custom_op`` and returns
an ``EagerCustomOp``: the registered custom op (``torch.ops.appo_kernels.<name>``, what
``torch.compile``, fake tensors, ``torch.library.opcheck`` and ``torch.export`` see) plus a call
that, in plain eager mode, runs the implementation itself. A call through the dispatcher costs
tens of microseconds of Python per op (argument binding, the generated autograd wrapper, a
redispatch below autograd), several times the work of an op on a small input; the direct call
skips it and computes the same thing (docs/design.md, section 2).

The direct path is taken only when nothing could tell the difference: not while ``torch.compile``
or ``torch.export`` traces, no ``TorchDispatchMode`` active (fake tensors, ``make_fx``, flop
counters), no ``torch.func`` transform active, and every tensor argument a plain
``torch.Tensor`` (or ``torch.nn.Parameter``) on a CPU or CUDA device (not a subclass such as
``FakeTensor`` or ``DTensor``, not ``meta``). Autocast does not matter: no op registers an
autocast rule (``linear_token_stats`` casts its inputs in its public function and runs its
chunks with autocast off), so the dispatcher would pass the call through unchanged; an op that
gains such a rule must route autocast calls to the dispatcher here too (tests/test_host_path.py
checks that none has one).

When a gradient is needed the direct path runs through a ``torch.autograd.Function`` built from
the same ``setup_context`` and ``backward`` as the custom op's autograd registration, so the two
paths share every line of the op's math and its derivative. CUDA-graph capture behaves the same
either way: the implementation is what a capture records in both.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable

import torch

# torch.nn.Parameter (an LM head's weight) behaves as a plain tensor in every op (its
# __torch_function__ is disabled); subclasses of either go through the custom op.
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


class EagerCustomOp:
    """A ``torch.library`` custom op (``.op``) and its implementation (``.impl``); calling it
    picks the path (module doc). ``register_fake`` and ``register_autograd`` register on the
    custom op as ``torch.library``'s own do; the latter also builds the eager autograd path."""

    def __init__(self, name: str, impl: Callable):
        self.op = torch.library.custom_op(name, impl, mutates_args=())
        self.name, self.impl = name, impl
        self._function: type[torch.autograd.Function] | None = None
        hints = typing.get_type_hints(impl)
        self._tensor_args = tuple(  # positions of the Tensor / Tensor | None arguments
            i
            for i, arg in enumerate(inspect.signature(impl).parameters)
            if torch.Tensor in (hints[arg], *typing.get_args(hints[arg]))
        )

    def register_fake(self, fake: Callable) -> Callable:
        return self.op.register_fake(fake)

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        impl = self.impl

        def forward(ctx, *args):
            output = impl(*args)
            setup_context(ctx, args, output)
            return output

        # The custom op's own autograd wrapper is such a Function too (forward with ctx, gradients
        # materialised), so both paths hand ``backward`` the same arguments.
        name = self.name.replace("::", "_")
        methods = {"forward": staticmethod(forward), "backward": staticmethod(backward)}
        self._function = type(f"Eager_{name}", (torch.autograd.Function,), methods)

    def __call__(self, *args):
        if (  # something records or transforms the ops: torch.compile / torch.export tracing,
            # a TorchDispatchMode (fake tensors, make_fx, flop counters), a torch.func transform
            torch.compiler.is_compiling()
            or torch._C._len_torch_dispatch_stack()
            or torch._C._are_functorch_transforms_active()
        ):
            return self.op(*args)
        needs_grad = False
        for i in self._tensor_args:
            a = args[i]
            if a is not None:
                if type(a) not in _PLAIN_TENSORS or not (a.is_cpu or a.is_cuda):
                    return self.op(*args)  # a subclass (FakeTensor, DTensor, ...) or meta
                needs_grad = needs_grad or a.requires_grad
        if needs_grad and torch.is_grad_enabled():
            # Without an autograd registration the custom op decides what a gradient means.
            return self.op(*args) if self._function is None else self._function.apply(*args)
        return self.impl(*args)


def detached(t: torch.Tensor) -> torch.Tensor:
    """``t`` without autograd history: ``t.detach()``, or ``t`` itself when it has none (so a
    call on inputs that need no gradient makes no extra view)."""
    return t.detach() if t.requires_grad else t


def custom_op(name: str) -> Callable[[Callable], EagerCustomOp]:
    """``@custom_op("appo_kernels::x")`` over an implementation whose annotations give the schema
    (as ``torch.library.custom_op`` with ``mutates_args=()``: no op of the package mutates its
    inputs)."""
    return lambda impl: EagerCustomOp(name, impl)
