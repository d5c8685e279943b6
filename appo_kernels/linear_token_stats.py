"""Token statistics straight from hidden states: the LM head fused with ``token_stats``.

For hidden states ``h`` ([N, H]), the LM head ``W`` ([V, H]) and an optional bias ``b`` ([V]),
the logits are ``x = h W^T + b`` and the statistics those of ``token_stats(x, y)``::

    logprob = log softmax(x / tau)_y,   entropy = -sum_j p_j log p_j

without ever holding more than one chunk of rows of ``x``:

- forward, per chunk of rows ``c``: ``x_c = h_c W^T + b`` (one matmul into a chunk buffer), then
  the streaming token-statistics pass over ``x_c``; only per-row statistics are kept (``logprob``,
  ``entropy``, the row maximum and ``log sum exp``);
- backward, per chunk: recompute ``x_c``, turn it *in place* into ``dx_c = dL/dx_c`` with the
  streaming backward pass (one read, one write of the same buffer), then
  ``dh_c = dx_c W``, ``dW += dx_c^T h_c`` and ``db += sum_rows dx_c``.

That is four matmuls where an unfused model + ``token_stats`` runs three (the forward matmul is
recomputed), in exchange for ``[N, V]`` logits and their gradient never existing.

Soft-capping (Gemma 2's ``final_logit_softcapping``): with ``softcap=c`` the logits are
``c tanh(x / c)`` before the temperature, ``logprob = log softmax(c tanh(x / c) / tau)_y``, and the
gradient passes the cap's derivative, ``dL/dx = dL/dx_capped (1 - tanh^2(x / c))``. The cap is
applied where the logits are read, inside the streaming passes (in registers in the Triton
kernels, in the float32 work chunk of the PyTorch path), never as a pass of its own: the backward
still turns the chunk into ``dx_c`` in place, the capped values and ``tanh`` are float32 whatever
the chunk's dtype, and no second ``[chunk, V]`` buffer is needed for ``1 - tanh^2``.

Rows whose token is ``ignore_index`` are compacted away before any matmul or vocabulary pass:
they cost nothing, and get ``logprob = 0``, ``entropy = 0`` and a zero gradient. (This differs
from ``token_stats``, which still computes the entropy of such rows from the logits it is given.)

The logits chunk has the dtype of ``hidden`` and ``weight`` (what the model's own LM head would
produce); statistics are float32. ``dW`` and ``db`` accumulate over chunks in the weight's dtype
(float32 weights accumulate in float32).

Autocast: the op is a matmul, so it follows ``torch.nn.functional.linear``: inside
``torch.autocast(device, dtype)`` for the inputs' device, ``hidden``, ``weight`` and ``bias`` are
cast to the autocast dtype at entry (float64 is left alone, as autocast leaves it) and the op runs
in that dtype; the casts are ordinary autograd ops, so each input's gradient comes back in that
input's own dtype. The op's own work never consults autocast (forward and backward run with it
disabled), so a backward inside or outside the autocast region gives the same result.

Backends: on CUDA, cuBLAS matmuls plus the Triton token-statistics kernels; on CPU, the same
structure with the PyTorch path. The op is a ``torch.library`` custom op with fake
implementations, so ``torch.compile(fullgraph=True)`` captures forward and backward.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from appo_kernels import validation
from appo_kernels._backend import device_type, is_cuda
from appo_kernels._ops import custom_op
from appo_kernels.token_stats import (
    TEMPERATURE_RANGE,
    TokenStats,
    check_temperature,
    check_token_ids,
    flat_ids,
    rows_backward,
    rows_forward,
)

# Logits bytes of one chunk when chunk_size is not given: large enough for efficient matmuls
# (and few read-modify-write passes of dW, one per chunk), small next to the [N, V] logits it
# replaces (Qwen2.5's V = 152064 in bf16: 832 rows on CUDA; SmolLM2's 49152 in fp32: 512 on CPU).
_CHUNK_BYTES = {"cuda": 256 << 20, "cpu": 96 << 20}
_ROW_MULTIPLE = 64  # chunk rows are a multiple of this (matmul tiles), unless N is smaller


def default_chunk_size(n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk so that one chunk of logits takes about 256 MB on CUDA, 96 MB on CPU."""
    budget = _CHUNK_BYTES["cuda" if is_cuda(device) else "cpu"]
    rows = max(1, budget // (vocab * dtype.itemsize))
    if rows >= _ROW_MULTIPLE:
        rows -= rows % _ROW_MULTIPLE
    return max(1, min(rows, n_rows))


def _kept_rows(tokens: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Indices of the rows that are not ``ignore_index`` (one host sync), or None if all are."""
    keep = tokens != ignore_index
    if bool(keep.all()):
        return None
    return keep.nonzero().squeeze(1)


def _chunks(n_kept: int, chunk_size: int, kept: torch.Tensor | None) -> list[tuple]:
    """``(r0, r1, index)`` per chunk: rows ``r0:r1`` of the compacted order and, when rows were
    compacted, their indices into the full order (None when the order is the identity)."""
    if n_kept <= chunk_size:
        return [(0, n_kept, kept)] if n_kept else []
    starts = range(0, n_kept, chunk_size)
    ends = [min(r0 + chunk_size, n_kept) for r0 in starts]
    return [(r0, r1, None if kept is None else kept[r0:r1]) for r0, r1 in zip(starts, ends)]


def _take(x: torch.Tensor, r0: int, r1: int, index: torch.Tensor | None) -> torch.Tensor:
    if index is not None:
        return x.index_select(0, index)
    return x if r0 == 0 and r1 == x.shape[0] else x[r0:r1]


def _put(full: torch.Tensor, r0: int, r1: int, index: torch.Tensor | None, part: torch.Tensor):
    """Writes a chunk's rows back where ``_take`` read them."""
    if index is None:
        full[r0:r1] = part
    else:
        full.index_copy_(0, index, part)


def _chunk_logits(h, weight, bias, buffer):
    """A chunk's logits ``h W^T + b`` (in the hidden dtype): written into ``buffer``, the one
    ``[chunk_size, V]`` buffer of the call, so that a new chunk never coexists with the last one;
    with a single chunk (``buffer`` None), the matmul's own result (the same ``mm`` / ``addmm``)."""
    if buffer is None:
        return F.linear(h, weight, bias)
    out = buffer[: h.shape[0]]
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


_NO_CONTEXT = contextlib.nullcontext()


def _autocast_off(x: torch.Tensor):
    """The op's chunks are exact in the inputs' dtype: autocast (a bf16 ``dlogits @ W`` into a
    float32 gradient, say) must not re-type them, in forward or in backward. Nothing to do when
    autocast is off for ``x``'s device already (entering a ``torch.autocast`` costs as much as
    a small op)."""
    kind = device_type(x)
    return torch.autocast(kind, enabled=False) if torch.is_autocast_enabled(kind) else _NO_CONTEXT


def _chunk_plan(hidden, weight, ids, ignore_index, chunk_size):
    """The chunks of the rows that are not ``ignore_index`` (``_chunks``) and the
    logits buffer they share (None for a single chunk); forward and backward walk the same
    plan."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    kept = _kept_rows(ids, ignore_index) if n_rows else None
    n_kept = n_rows if kept is None else kept.numel()
    chunk_size = chunk_size or default_chunk_size(n_kept, vocab, hidden.dtype, hidden.device)
    buffer = None
    if chunk_size < n_kept:
        buffer = torch.empty((chunk_size, vocab), device=hidden.device, dtype=hidden.dtype)
    return _chunks(n_kept, chunk_size, kept), buffer


def _zero_stats(hidden: torch.Tensor) -> list[torch.Tensor]:
    """The four float32 [N] forward outputs, 0 until chunks are written into them."""
    return [hidden.new_zeros(hidden.shape[0], dtype=torch.float32) for _ in range(4)]


@custom_op("appo_kernels::linear_token_stats_fwd")
def _linear_token_stats_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tokens: torch.Tensor,
    temperature: float,
    ignore_index: int,
    chunk_size: int,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, H], weight [V, H], bias [V] or None, tokens [N] -> float32 (logprob, entropy,
    row_max, log_sum), each [N]; 0 on ignored rows."""
    ids = flat_ids(tokens)
    check_ids = check_token_ids(ids, weight.shape[0], ignore_index)  # True: left to the chunks
    stats = None  # the [N] outputs, zero on ignored rows, made when a chunk is not all of them
    with _autocast_off(hidden):
        chunks, buffer = _chunk_plan(hidden, weight, ids, ignore_index, chunk_size)
        for r0, r1, index in chunks:
            logits = _chunk_logits(_take(hidden, r0, r1, index), weight, bias, buffer)
            chunk_stats = rows_forward(
                logits, _take(ids, r0, r1, index), temperature, ignore_index, softcap=softcap,
                check_ids=check_ids,
            )  # fmt: skip
            if index is None and r1 - r0 == hidden.shape[0]:
                return chunk_stats  # one chunk of every row: its statistics are the outputs
            stats = stats or _zero_stats(hidden)
            for full, part in zip(stats, chunk_stats):
                _put(full, r0, r1, index, part)
    return tuple(stats or _zero_stats(hidden))


@_linear_token_stats_fwd.register_fake
def _(hidden, weight, bias, tokens, temperature, ignore_index, chunk_size, softcap):
    return tuple(hidden.new_empty(hidden.shape[0], dtype=torch.float32) for _ in range(4))


@custom_op("appo_kernels::linear_token_stats_bwd")
def _linear_token_stats_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tokens: torch.Tensor,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    entropy: torch.Tensor,
    grad_logprob: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    chunk_size: int,
    softcap: float | None,
    needs_weight_grad: bool,
    needs_bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (d_hidden [N, H], d_weight [V, H] or [0], d_bias [V] or [0]); the empty ones
    when that gradient is not needed (custom ops cannot return None)."""
    ids = flat_ids(tokens)
    d_hidden = torch.zeros_like(hidden)
    d_weight = torch.zeros_like(weight) if needs_weight_grad else weight.new_empty(0)
    d_bias = weight.new_zeros(weight.shape[0] if needs_bias_grad else 0)
    grads = [
        None if g is None else g.reshape(-1).to(torch.float32).contiguous()  # may be expanded
        for g in (grad_logprob, grad_entropy)
    ]
    with _autocast_off(hidden):
        chunks, buffer = _chunk_plan(hidden, weight, ids, ignore_index, chunk_size)
        for r0, r1, index in chunks:
            h = _take(hidden, r0, r1, index)
            logits = _chunk_logits(h, weight, bias, buffer)
            saved = [_take(t, r0, r1, index) for t in (row_max, log_sum, entropy)]
            upstream = [None if g is None else _take(g, r0, r1, index) for g in grads]
            dlogits = rows_backward(
                logits, _take(ids, r0, r1, index), *saved, *upstream, temperature,
                ignore_index, out=logits, softcap=softcap,
            )  # fmt: skip
            _put(d_hidden, r0, r1, index, dlogits @ weight)
            if needs_weight_grad:
                d_weight.addmm_(dlogits.t(), h)
            if needs_bias_grad:
                d_bias += dlogits.sum(0)
    return d_hidden, d_weight, d_bias


@_linear_token_stats_bwd.register_fake
def _(hidden, weight, bias, tokens, row_max, log_sum, entropy, grad_logprob, grad_entropy,
      temperature, ignore_index, chunk_size, softcap, needs_weight_grad,
      needs_bias_grad):  # fmt: skip
    vocab = weight.shape[0]
    return (
        torch.empty_like(hidden),
        torch.empty_like(weight) if needs_weight_grad else weight.new_empty(0),
        weight.new_empty(vocab if needs_bias_grad else 0),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, tokens, temperature, ignore_index, chunk_size, softcap = inputs
    _, entropy, row_max, log_sum = output
    ctx.save_for_backward(hidden, weight, bias, tokens, row_max, log_sum, entropy)
    ctx.args = (temperature, ignore_index, chunk_size, softcap)


def _backward(ctx, grad_logprob, grad_entropy, grad_row_max, grad_log_sum):
    hidden, weight, bias, tokens, row_max, log_sum, entropy = ctx.saved_tensors
    needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    if (grad_logprob is None and grad_entropy is None) or not (
        needs_hidden or needs_weight or needs_bias
    ):
        return (None,) * 8
    d_hidden, d_weight, d_bias = _linear_token_stats_bwd(
        hidden, weight, bias, tokens, row_max, log_sum, entropy, grad_logprob, grad_entropy,
        *ctx.args, needs_weight, bias is not None and needs_bias,
    )  # fmt: skip
    return (
        d_hidden if needs_hidden else None,
        d_weight if needs_weight else None,
        d_bias if bias is not None and needs_bias else None,
        None,
        None,
        None,
        None,
        None,
    )


_linear_token_stats_fwd.register_autograd(_backward, setup_context=_setup_context)


def check_softcap(softcap: object) -> float | None:
    """None (no soft cap) or a cap ``c`` in ``TEMPERATURE_RANGE`` (``x / c`` stays finite for
    finite logits; Gemma 2 uses 30)."""
    if softcap is None:
        return None
    softcap = validation.check_positive("softcap", softcap)
    low, high = TEMPERATURE_RANGE
    if not low <= softcap <= high:
        raise ValueError(f"softcap must be None or in [{low:g}, {high:g}], got {softcap:g}")
    return softcap


def _autocast_inputs(hidden, weight, bias):
    """Inside ``torch.autocast`` for the inputs' device, the floating inputs in the autocast
    dtype, as ``torch.nn.functional.linear`` casts them (float64 is not cast by autocast either).
    Anything that is not a CPU / CUDA tensor is left for the argument checks."""
    if not isinstance(hidden, torch.Tensor) or not (hidden.is_cpu or hidden.is_cuda):
        return hidden, weight, bias
    device = device_type(hidden)
    if not torch.is_autocast_enabled(device):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device)

    def cast(x):
        eligible = isinstance(x, torch.Tensor) and x.is_floating_point()
        return x.to(dtype) if eligible and x.dtype != torch.float64 else x

    return cast(hidden), cast(weight), cast(bias)


def _checked_args(hidden, weight, tokens, bias, temperature, ignore_index, chunk_size):
    hidden = validation.check_float("hidden", hidden)
    weight = validation.check_float("weight", weight)
    tokens = validation.check_int("tokens", tokens)
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"hidden must be [..., H] with H >= 1, got shape {tuple(hidden.shape)}")
    validation.check_ndim("weight", weight, 2, "[V, H] (the LM head)")
    if weight.shape[0] < 1 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V, H] with V >= 1 and H = hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"weight and hidden must share one dtype, got weight {weight.dtype} and hidden "
            f"{hidden.dtype}"
        )
    validation.check_shape("tokens", tokens, hidden.shape[:-1], "hidden.shape[:-1]")
    if bias is not None:
        bias = validation.check_float("bias", bias)
        validation.check_shape("bias", bias, weight.shape[:1], "[V] = weight.shape[:1]")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias must have the weight's dtype {weight.dtype}, got {bias.dtype}")
    device = hidden.device
    if (
        weight.device != device
        or tokens.device != device
        or (bias is not None and bias.device != device)
    ):
        named = {"hidden": hidden, "weight": weight, "tokens": tokens, "bias": bias}
        validation.check_same_device(named)
    temperature = check_temperature(temperature)
    validation.check_int64("ignore_index", ignore_index)
    if chunk_size is not None:
        validation.check_count("chunk_size", chunk_size, minimum=1)
        if chunk_size > 2**31:
            raise ValueError(f"chunk_size must be at most 2**31, got {chunk_size}")
    return hidden, weight, tokens, bias, temperature


def linear_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    softcap: float | None = None,
) -> TokenStats:
    """Log-probability and full-vocabulary entropy of ``tokens`` under
    ``softmax((hidden @ weight.T + bias) / tau)`` (soft-capped logits
    ``c tanh((hidden @ weight.T + bias) / c)`` with ``softcap=c``), without materialising the
    logits.

    Parameters
    ----------
    hidden : torch.Tensor
        ``[..., H]`` final hidden states (float16 / bfloat16 / float32; any strides).
    weight : torch.Tensor
        ``[V, H]`` the LM head, same dtype and device as ``hidden``. A weight tied to the input
        embedding receives this op's gradient on top of the embedding's.
    tokens : torch.Tensor
        ``[...]`` integer ids in ``[0, V)`` or ``ignore_index``.
    bias : torch.Tensor, optional
        ``[V]``, the LM head's bias, same dtype as ``weight``.
    temperature : float
        ``tau`` in ``[1e-30, 1e30]``.
    ignore_index : int
        Rows with this id are skipped entirely: ``logprob = 0``, ``entropy = 0``, zero gradient.
    chunk_size : int, optional
        Rows per chunk of logits; by default about 256 MB of logits on CUDA, 96 MB on CPU.
    softcap : float, optional
        ``c`` in ``[1e-30, 1e30]``: the logits become ``c * tanh(logits / c)`` before the
        temperature (Gemma 2's ``final_logit_softcapping``, applied in that order by the model).
        None (the default): no cap.

    Returns
    -------
    TokenStats
        ``(logprob, entropy)``, float32 ``hidden.shape[:-1]``, differentiable with respect to
        ``hidden``, ``weight`` and ``bias``.

    Notes
    -----
    Equals ``token_stats(hidden @ weight.T + bias, tokens)`` on the rows that are not ignored
    (the chunk's logits are computed in the inputs' dtype, as the model's LM head would). At most
    one chunk of logits is alive at a time; backward recomputes each chunk's logits (four matmuls
    in all where the unfused path runs three). Inside ``torch.autocast`` the inputs are cast to
    the autocast dtype first, as ``linear`` casts them. See the module docstring.

    Examples
    --------
    >>> hidden = torch.randn(2, 6, 16, requires_grad=True)
    >>> lm_head = torch.randn(100, 16, requires_grad=True)
    >>> tokens = torch.randint(0, 100, (2, 6))
    >>> lp, h = linear_token_stats(hidden, lm_head, tokens, temperature=0.7)
    >>> (lp.sum() + 0.01 * h.sum()).backward()
    >>> hidden.grad.shape, lm_head.grad.shape
    (torch.Size([2, 6, 16]), torch.Size([100, 16]))
    """
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    hidden, weight, tokens, bias, temperature = _checked_args(
        hidden, weight, tokens, bias, temperature, ignore_index, chunk_size
    )
    softcap = check_softcap(softcap)
    rows = hidden.dim() == 2  # already [N, H]: no reshapes
    logprob, entropy, _, _ = _linear_token_stats_fwd(
        hidden if rows else hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        tokens if rows else tokens.reshape(-1),
        temperature,
        ignore_index,
        chunk_size or 0,
        softcap,
    )
    if rows:
        return TokenStats(logprob, entropy)
    lead = tuple(hidden.shape[:-1])
    return TokenStats(logprob.view(lead), entropy.view(lead))
