"""Argument checks shared by every public op (docs/design.md, section 10).

Each helper raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape,
device or value) with a message naming the argument, what was expected and what was given.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_tensor(name: str, x: object) -> torch.Tensor:
    """A dense (strided) ``torch.Tensor``: sparse, nested and quantized tensors are rejected
    here rather than failing inside an op with an unrelated message."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout is not torch.strided or x.is_nested or x.is_quantized:
        kind = "nested" if x.is_nested else "quantized" if x.is_quantized else str(x.layout)
        raise TypeError(f"{name} must be a dense (strided) tensor, got a {kind} tensor")
    return x


def check_dtype(name: str, x: torch.Tensor, allowed: Sequence[torch.dtype], what: str) -> None:
    if x.dtype not in allowed:
        raise TypeError(f"{name} must be {what} ({', '.join(map(str, allowed))}), got {x.dtype}")


def check_float(
    name: str, x: object, allowed: Sequence[torch.dtype] = FLOAT_DTYPES
) -> torch.Tensor:
    x = check_tensor(name, x)
    if x.dtype not in allowed:  # (check_dtype raises; the test is inline, as it runs per call)
        check_dtype(name, x, allowed, "a floating tensor")
    return x


def check_int(name: str, x: object) -> torch.Tensor:
    x = check_tensor(name, x)
    if x.dtype not in INT_DTYPES:
        check_dtype(name, x, INT_DTYPES, "an integer tensor")
    return x


def check_bool(name: str, x: object, what: str = "a bool tensor") -> torch.Tensor:
    x = check_tensor(name, x)
    check_dtype(name, x, (torch.bool,), what)
    return x


def check_mask(name: str, x: object) -> torch.Tensor:
    """A {0, 1} mask: bool, integer or floating. Returned as given; callers convert."""
    x = check_tensor(name, x)
    if x.is_complex():
        raise TypeError(f"{name} must be a bool, integer or floating tensor, got {x.dtype}")
    return x


def check_ndim(name: str, x: torch.Tensor, ndim: int, layout: str) -> None:
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")


def check_shape(name: str, x: torch.Tensor, shape: Sequence[int], ref: str) -> None:
    if x.shape != shape and tuple(x.shape) != tuple(shape):  # (a torch.Size is a tuple)
        raise ValueError(f"{name} must have shape {tuple(shape)} (as {ref}), got {tuple(x.shape)}")


def check_same_device(named: dict[str, torch.Tensor | None]) -> torch.device:
    """The one device of the tensors of ``named`` (None entries are skipped)."""
    first_name = device = None
    for name, t in named.items():
        if t is None:
            continue
        if device is None:
            first_name, device = name, t.device
        elif t.device != device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {device}; "
                "all tensors must be on one device"
            )
    return device


def shown(value: int | float) -> int | float | str:
    """``value`` for an error message: huge ints (which print as hundreds of digits, or not at
    all past Python's int-to-str limit) by their size."""
    if isinstance(value, int) and abs(value) >= 1 << 63:
        return f"an int of {value.bit_length()} bits"
    return value


def _real(name: str, value: object) -> float:
    """A Python int or float (not bool) as a float; ints beyond the float range are an error
    rather than an OverflowError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a finite number, got {shown(value)}") from None


def check_positive(name: str, value: object) -> float:
    real = _real(name, value)
    if not 0.0 < real < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {shown(value)}")
    return real


def check_gamma(name: str, value: object) -> float:
    real = _real(name, value)
    if not 0.0 < real <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {shown(value)}")
    return real


def check_nonneg(name: str, value: object) -> float:
    real = _real(name, value)
    if not 0.0 <= real < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {shown(value)}")
    return real


def check_count(name: str, value: object, minimum: int = 0) -> int:
    """A Python int (not bool) >= ``minimum``: sizes, counts, indices."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {shown(value)}")
    return value


def check_int64(name: str, value: object) -> int:
    """A Python int (not bool) that fits int64, as the custom ops' ``int`` arguments must."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not -(1 << 63) <= value < 1 << 63:
        raise ValueError(f"{name} must fit int64 ([-2^63, 2^63)), got {shown(value)}")
    return value


def check_fraction(name: str, value: object) -> float:
    """A real number in [0, 1): clip ranges, probabilities of leaving something out."""
    real = _real(name, value)
    if not 0.0 <= real < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {shown(value)}")
    return real


def capturing_cuda_graph(x: torch.Tensor) -> bool:
    """Whether ``x`` lives on a CUDA stream that is capturing a graph: data-dependent checks (a
    host sync) must be skipped then; the kernels stay in bounds on their own."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def min_max(x: torch.Tensor) -> tuple[int | float, int | float]:
    """The smallest and largest value of a non-empty tensor, read with one host sync."""
    low, high = torch.stack(torch.aminmax(x)).tolist()
    return low, high


def check_index_range(name: str, x: torch.Tensor, upper: int, ignore_index: int) -> None:
    """Every id of ``x`` in ``[0, upper)`` (``upper >= 1``) or equal to ``ignore_index``: the ids
    that clamping into ``[0, upper)`` changes must be exactly the ``ignore_index`` ones (none when
    ``ignore_index`` lies in the range). Four small ops and one host sync; the offending value
    is fetched only on failure. Compared as int64, so narrow integer dtypes do not wrap
    ``upper`` or ``ignore_index`` around."""
    x = x.to(torch.int64)
    outside = x.clamp(0, upper - 1) != x
    if 0 <= ignore_index < upper:
        valid = not bool(outside.any())
    else:  # the ignore_index ids lie outside the range too
        valid = torch.equal(outside, x == ignore_index)
    if not valid:
        raise ValueError(
            f"{name} must hold ids in [0, {upper}) or ignore_index={ignore_index}, "
            f"got {x[outside & (x != ignore_index)][0].item()}"
        )


_TOKEN_ID_CHECKS_ENV = "APPO_KERNELS_CHECK_TOKEN_IDS"
_token_id_checks = os.environ.get(_TOKEN_ID_CHECKS_ENV, "1").strip() != "0"


def token_id_checks_enabled() -> bool:
    """Whether the token-id range checks run (``token_id_checks``)."""
    return _token_id_checks


@contextlib.contextmanager
def token_id_checks(enabled: bool) -> Iterator[None]:
    """Turns the token-id range check of ``token_stats``, ``token_stats_forward``,
    ``branching_score`` and ``linear_token_stats`` on or off inside the ``with`` block (for the
    whole process, every thread; the previous setting comes back on exit).

    The check is one reduction over the ids and a host sync: on CUDA tensors it stalls the
    host until the GPU has caught up (docs/design.md, section 10.2, has its measured cost). With
    it off, an id outside ``[0, V)`` other than ``ignore_index`` raises nothing: the kernels
    never read out of bounds and give a NaN log-prob for it.
    ``APPO_KERNELS_CHECK_TOKEN_IDS=0`` in the environment turns it off from the start. It is
    always skipped while a CUDA graph is being captured.

    >>> import torch, appo_kernels as ak
    >>> with ak.token_id_checks(False):
    ...     ak.token_stats(torch.zeros(1, 4), torch.tensor([7])).logprob
    tensor([nan])
    """
    global _token_id_checks
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    previous, _token_id_checks = _token_id_checks, enabled
    try:
        yield
    finally:
        _token_id_checks = previous


def check_device(name: str, device: object) -> torch.device:
    """A device this process can use, as a ``torch.device``; a bare ``"cuda"`` becomes the current
    CUDA device (``cuda:0``, say), so that it compares equal to the device of tensors put there."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"{name} must be a str or torch.device, got {type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(
            f"{name} must name a device such as 'cpu' or 'cuda:0', got {device!r}"
        ) from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{name} is {str(device)!r} but this torch build or machine has no CUDA device"
            )
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"{name} is {str(device)!r} but only {torch.cuda.device_count()} CUDA "
                "device(s) exist"
            )
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise ValueError(f"{name} must be a CPU or CUDA device, got {str(device)!r}")
    return device
