"""Token statistics: log-probability of the sampled token and full-vocabulary entropy.

For a row of logits ``x`` (``V`` entries), sampled token ``y`` and temperature ``tau``, with
``z = x / tau`` (SPEC section 2.1)::

    lse     = log sum_j exp(z_j)
    logprob = z_y - lse                          (0 where y == ignore_index)
    entropy = lse - sum_j p_j z_j,  p = softmax(z)

All statistics are float32 whatever the logits dtype. Everything is computed in one streaming
pass over the vocabulary that keeps, per row, the running max ``m``, ``s = sum exp(z - m)`` and
``a = sum (z - m) exp(z - m)``; then ``lse = m + log s`` and ``entropy = log s - a / s``. Nothing of
size [N, V] is stored: backward re-reads the logits once and writes the gradient.

Entry points
------------
``token_stats(logits, tokens, *, temperature=1.0, ignore_index=-100) -> TokenStats``
    The public, differentiable op: ``TokenStats(logprob, entropy)``, float32 ``logits.shape[:-1]``.
``token_stats_forward(logits, tokens, *, temperature=1.0, ignore_index=-100)
        -> TokenStatsForward``
    For callers that only need forward statistics (e.g. ``branching_score``):
    ``TokenStatsForward(logprob, entropy, lse)``, computed without recording anything for autograd
    (the outputs never require grad).

Layout: ``logits`` is ``[..., V]`` with a contiguous last dimension. The leading dimensions are
read in place when they collapse into at most two strided levels, so ``logits[:, :-1]`` of a
``[B, T, V]`` tensor costs no copy (row ``r`` lives at
``(r // T) * stride_0 + (r % T) * stride_1``).
A copy is made only when no such view exists or when the last dimension is not contiguous.

Backends: CUDA tensors run the Triton kernels below; CPU tensors run a chunked PyTorch path of the
same math (extra memory bounded by a few MB per chunk, independent of N * V);
``APPO_KERNELS_BACKEND=triton|torch`` forces one (on CPU, ``triton`` means Triton's interpreter).
Both are behind the ``torch.library`` custom ops ``appo_kernels::token_stats_fwd`` and
``appo_kernels::token_stats_bwd``, so ``torch.compile(fullgraph=True)`` and CUDA graphs capture
them.

Bad input: token ids outside ``[0, V)`` other than ``ignore_index`` raise ``ValueError`` (checked
with one reduction, skipped while a CUDA graph is being captured; the kernels never read out of
bounds and give NaN log-probs for such ids). A NaN in a row gives NaN in that row only. A row
whose logits are all ``-inf`` has no distribution and gives NaN.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from appo_kernels import validation as _validation
from appo_kernels._backend import HAS_TRITON, launch_device, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl


class TokenStats(NamedTuple):
    logprob: torch.Tensor
    entropy: torch.Tensor


class TokenStatsForward(NamedTuple):
    logprob: torch.Tensor
    entropy: torch.Tensor
    lse: torch.Tensor


# --------------------------------------------------------------------------------------------
# Row layout: logits [..., V] as (outer, inner) strided rows
# --------------------------------------------------------------------------------------------


def _row_view(logits: torch.Tensor) -> torch.Tensor:
    """Returns ``logits`` as a [R, T, V] strided view (R * T = N rows, last dim contiguous),
    copying only when the leading dimensions do not collapse into two strided levels or the last
    dimension is not contiguous."""
    vocab = logits.shape[-1]
    if vocab > 1 and logits.stride(-1) != 1:
        logits = logits.contiguous()
    levels: list[list[int]] = []  # [size, stride], outermost first, size-1 dims dropped
    for size, stride in zip(logits.shape[:-1], logits.stride()[:-1]):
        if size == 1:
            continue
        if levels and levels[-1][1] == stride * size:
            levels[-1] = [levels[-1][0] * size, stride]
        else:
            levels.append([size, stride])
    if len(levels) > 2:
        logits = logits.contiguous()
        levels = [[logits.numel() // vocab, vocab]]
    while len(levels) < 2:
        levels.insert(0, [1, 0])
    (outer, outer_stride), (inner, inner_stride) = levels
    return logits.as_strided((outer, inner, vocab), (outer_stride, inner_stride, 1))


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

if HAS_TRITON:
    NEG_INF = tl.constexpr(float("-inf"))

    @triton.jit
    def _row_offset(row, T1, stride_outer, stride_inner):
        """Element offset (int64) of row ``row`` = (row // T1, row % T1) of the [R, T1, V] view."""
        row = row.to(tl.int64)
        return (row // T1) * stride_outer + (row % T1) * stride_inner

    @triton.jit
    def _rebase(m, s, a, new_max):
        """Re-expresses partial states (m, s, a) relative to ``new_max`` >= m.

        With d = m - new_max and w = e^d: s' = w s and a' = w (a + d s). An empty partial
        (m = -inf, s = a = 0) gives (0, 0); the guards keep 0 * (-inf) out of the sums. With
        ``s = 1, a = 0`` this turns raw logits z into their terms e^(z-M) and (z-M) e^(z-M).
        """
        shift = tl.where(new_max == NEG_INF, 0.0, new_max)
        empty = m == NEG_INF
        d = tl.where(empty, 0.0, m - shift)
        w = tl.where(empty, 0.0, tl.exp(d))
        return w * s, w * (a + d * s)

    @triton.jit
    def _store_row_stats(
        row,
        m,
        s,
        a,
        x_row,
        tokens_ptr,
        logprob_ptr,
        entropy_ptr,
        lse_ptr,
        V,
        inv_temp,
        ignore_index,
    ):
        """lse = m + log s, entropy = log s - a / s, logprob = z_y - lse (one scalar load of
        x[row, y]; 0 for ignore_index, NaN for an id outside [0, V), never read out of bounds)."""
        log_s = tl.log(s)
        lse = m + log_s
        y = tl.load(tokens_ptr + row).to(tl.int64)
        in_range = (y >= 0) & (y < V)
        z_y = tl.load(x_row + y, mask=in_range, other=0.0).to(tl.float32) * inv_temp
        logprob = tl.where(in_range, z_y - lse, float("nan"))
        logprob = tl.where(y == ignore_index, 0.0, logprob)
        tl.store(lse_ptr + row, lse)
        tl.store(entropy_ptr + row, log_s - a / s)
        tl.store(logprob_ptr + row, logprob)

    @triton.jit
    def _token_stats_fwd_kernel(
        x_ptr,
        tokens_ptr,
        logprob_ptr,
        entropy_ptr,
        lse_ptr,
        part_m_ptr,
        part_s_ptr,
        part_a_ptr,
        V,
        T1,
        stride_outer,
        stride_inner,
        cols_per_split,
        inv_temp,
        ignore_index,
        BLOCK_V: tl.constexpr,
        SPLIT: tl.constexpr,
    ):
        """Program (row, split) streams columns [split * cols_per_split, ...) of one row in
        BLOCK_V chunks, keeping (m, s, a). When the max grows from m to m', with c = e^(m - m'):
        s <- c s and a <- c (a + (m - m') s), then the chunk's terms are added. Without a split
        it writes the row's statistics; with one it writes the partial (m, s, a) for the merge."""
        row = tl.program_id(0)
        split = tl.program_id(1)
        x_row = x_ptr + _row_offset(row, T1, stride_outer, stride_inner)
        col_begin = split * cols_per_split
        col_end = tl.minimum(col_begin + cols_per_split, V)
        m = tl.full([], NEG_INF, tl.float32)
        s = tl.zeros([], tl.float32)
        a = tl.zeros([], tl.float32)
        for start in range(col_begin, col_end, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            z = tl.where(mask, x * inv_temp, NEG_INF)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s, a = _rebase(m, s, a, m_new)
            e, ze = _rebase(z, 1.0, 0.0, m_new)
            s += tl.sum(e, axis=0)
            a += tl.sum(ze, axis=0)
            m = m_new
        if SPLIT:
            part = row.to(tl.int64) * tl.num_programs(1) + split
            tl.store(part_m_ptr + part, m)
            tl.store(part_s_ptr + part, s)
            tl.store(part_a_ptr + part, a)
        else:
            _store_row_stats(
                row,
                m,
                s,
                a,
                x_row,
                tokens_ptr,
                logprob_ptr,
                entropy_ptr,
                lse_ptr,
                V,
                inv_temp,
                ignore_index,
            )

    @triton.jit
    def _token_stats_merge_kernel(
        x_ptr,
        tokens_ptr,
        logprob_ptr,
        entropy_ptr,
        lse_ptr,
        part_m_ptr,
        part_s_ptr,
        part_a_ptr,
        V,
        T1,
        stride_outer,
        stride_inner,
        num_splits,
        inv_temp,
        ignore_index,
        SPLITS_POW2: tl.constexpr,
    ):
        """Merges a row's partials: M = max m_i, S = sum s_i e^(m_i - M),
        A = sum e^(m_i - M) (a_i + (m_i - M) s_i); then writes the row's statistics."""
        row = tl.program_id(0)
        idx = tl.arange(0, SPLITS_POW2)
        mask = idx < num_splits
        part = row.to(tl.int64) * num_splits + idx
        m_i = tl.load(part_m_ptr + part, mask=mask, other=NEG_INF)
        s_i = tl.load(part_s_ptr + part, mask=mask, other=0.0)
        a_i = tl.load(part_a_ptr + part, mask=mask, other=0.0)
        m = tl.max(m_i, axis=0)
        s_i, a_i = _rebase(m_i, s_i, a_i, m)
        x_row = x_ptr + _row_offset(row, T1, stride_outer, stride_inner)
        _store_row_stats(
            row,
            m,
            tl.sum(s_i, axis=0),
            tl.sum(a_i, axis=0),
            x_row,
            tokens_ptr,
            logprob_ptr,
            entropy_ptr,
            lse_ptr,
            V,
            inv_temp,
            ignore_index,
        )

    @triton.jit
    def _token_stats_bwd_kernel(
        x_ptr,
        tokens_ptr,
        lse_ptr,
        entropy_ptr,
        grad_logprob_ptr,
        grad_entropy_ptr,
        dx_ptr,
        V,
        T1,
        stride_outer,
        stride_inner,
        cols_per_split,
        inv_temp,
        ignore_index,
        HAS_GRAD_LOGPROB: tl.constexpr,
        HAS_GRAD_ENTROPY: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """dx_j = (1/tau) [g_lp (1[j = y] - p_j) - g_H p_j (z_j - lse + H)], p_j = e^(z_j - lse);
        program (row, split) streams its columns once (read x, write dx in x's dtype)."""
        row = tl.program_id(0)
        split = tl.program_id(1)
        x_row = x_ptr + _row_offset(row, T1, stride_outer, stride_inner)
        dx_row = dx_ptr + row.to(tl.int64) * V
        lse = tl.load(lse_ptr + row)
        entropy = tl.load(entropy_ptr + row)
        y = tl.load(tokens_ptr + row).to(tl.int64)
        if HAS_GRAD_LOGPROB:
            g_lp = tl.load(grad_logprob_ptr + row)
            g_lp = tl.where(y == ignore_index, 0.0, g_lp)
        else:
            g_lp = 0.0
        if HAS_GRAD_ENTROPY:
            g_h = tl.load(grad_entropy_ptr + row)
        else:
            g_h = 0.0
        col_begin = split * cols_per_split
        col_end = tl.minimum(col_begin + cols_per_split, V)
        for start in range(col_begin, col_end, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            z = tl.where(mask, x * inv_temp, NEG_INF)
            p = tl.exp(z - lse)
            centred = tl.where(z == NEG_INF, 0.0, z - lse + entropy)
            dz = tl.where(cols == y, g_lp, 0.0) - p * (g_lp + g_h * centred)
            tl.store(dx_row + cols, (dz * inv_temp).to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------

_WARPS = 8  # per program for large rows
_VECTORS_PER_THREAD = 2  # 16-byte loads per thread and chunk
_MIN_BLOCKS_PER_SPLIT = 4  # a vocabulary split streams at least this many chunks
_MAX_SPLITS = 128
_PROGRAMS_PER_SM = 4  # below N = 4 * SMs rows, the vocabulary is split


class _LaunchConfig(NamedTuple):
    block_v: int
    num_warps: int
    num_splits: int
    cols_per_split: int


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch_config(
    n_rows: int,
    vocab: int,
    dtype: torch.dtype,
    device: torch.device,
    block_v: int = 0,
    num_splits: int = 0,
) -> _LaunchConfig:
    """Chunk size, warps and vocabulary splits for a [n_rows, vocab] launch (0 = choose).

    A chunk gives each of 8 warps' threads two 16-byte loads (4096 bf16/fp16 or 2048 fp32
    columns), capped by the row length. Rows split into several programs only on CUDA when
    there are fewer than 4 programs per SM and each split keeps >= 4 chunks; off-GPU (the
    interpreter) the split count is 1 unless forced.
    """
    if block_v == 0:
        per_thread = _VECTORS_PER_THREAD * 16 // dtype.itemsize
        block_v = min(triton.next_power_of_2(vocab), _WARPS * 32 * per_thread)
    num_warps = max(1, min(_WARPS, block_v // (32 * 8)))
    n_blocks = triton.cdiv(vocab, block_v)
    if num_splits == 0:
        num_splits = 1
        if device.type == "cuda":
            wanted = triton.cdiv(_PROGRAMS_PER_SM * _sm_count(device), max(n_rows, 1))
            num_splits = max(1, min(wanted, n_blocks // _MIN_BLOCKS_PER_SPLIT, _MAX_SPLITS))
    cols_per_split = triton.cdiv(n_blocks, min(num_splits, n_blocks)) * block_v
    return _LaunchConfig(block_v, num_warps, triton.cdiv(vocab, cols_per_split), cols_per_split)


def _empty_stats(shape, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three separate float32 outputs (custom-op outputs must not alias each other)."""
    return tuple(torch.empty(shape, device=device, dtype=torch.float32) for _ in range(3))


def _kernel_rows(rows: torch.Tensor) -> tuple[int, int, int]:
    """(T1, stride_outer, stride_inner) of a [R, T, V] row view, with T1 = 1 for one level."""
    outer, inner, _ = rows.shape
    if outer == 1:
        return 1, rows.stride(1), 0
    return inner, rows.stride(0), rows.stride(1)


def _triton_forward(rows, tokens, temperature, ignore_index, block_v, num_splits):
    outer, inner, vocab = rows.shape
    n_rows = outer * inner
    cfg = _launch_config(n_rows, vocab, rows.dtype, rows.device, block_v, num_splits)
    T1, stride_outer, stride_inner = _kernel_rows(rows)
    logprob, entropy, lse = _empty_stats((n_rows,), rows.device)
    split = cfg.num_splits > 1
    parts = torch.empty(
        (3, n_rows * cfg.num_splits if split else 1), device=rows.device, dtype=torch.float32
    )
    with launch_device(rows):
        _token_stats_fwd_kernel[(n_rows, cfg.num_splits)](
            rows,
            tokens,
            logprob,
            entropy,
            lse,
            parts[0],
            parts[1],
            parts[2],
            vocab,
            T1,
            stride_outer,
            stride_inner,
            cfg.cols_per_split,
            1.0 / temperature,
            ignore_index,
            BLOCK_V=cfg.block_v,
            SPLIT=split,
            num_warps=cfg.num_warps,
        )
        if split:
            _token_stats_merge_kernel[(n_rows,)](
                rows,
                tokens,
                logprob,
                entropy,
                lse,
                parts[0],
                parts[1],
                parts[2],
                vocab,
                T1,
                stride_outer,
                stride_inner,
                cfg.num_splits,
                1.0 / temperature,
                ignore_index,
                SPLITS_POW2=triton.next_power_of_2(cfg.num_splits),
                num_warps=1,
            )
    return logprob, entropy, lse


def _triton_backward(
    rows,
    tokens,
    lse,
    entropy,
    grad_logprob,
    grad_entropy,
    temperature,
    ignore_index,
    block_v,
    num_splits,
):
    outer, inner, vocab = rows.shape
    n_rows = outer * inner
    cfg = _launch_config(n_rows, vocab, rows.dtype, rows.device, block_v, num_splits)
    T1, stride_outer, stride_inner = _kernel_rows(rows)
    dx = torch.empty((n_rows, vocab), device=rows.device, dtype=rows.dtype)
    with launch_device(rows):
        _token_stats_bwd_kernel[(n_rows, cfg.num_splits)](
            rows,
            tokens,
            lse,
            entropy,
            grad_logprob if grad_logprob is not None else lse,
            grad_entropy if grad_entropy is not None else lse,
            dx,
            vocab,
            T1,
            stride_outer,
            stride_inner,
            cfg.cols_per_split,
            1.0 / temperature,
            ignore_index,
            HAS_GRAD_LOGPROB=grad_logprob is not None,
            HAS_GRAD_ENTROPY=grad_entropy is not None,
            BLOCK_V=cfg.block_v,
            num_warps=cfg.num_warps,
        )
    return dx


# --------------------------------------------------------------------------------------------
# PyTorch path: the same math in float32, a few MB of rows at a time
# --------------------------------------------------------------------------------------------

_TORCH_CHUNK_BYTES = 4 << 20  # float32 working set of one chunk of rows
_FLOAT32_MIN = torch.finfo(torch.float32).min


def _row_chunks(rows: torch.Tensor):
    """Yields (first_row, [n, V] view) over the [R, T, V] row view, a few MB at a time."""
    outer, inner, vocab = rows.shape
    step = max(1, _TORCH_CHUNK_BYTES // (4 * vocab))
    for i in range(outer):
        for t in range(0, inner, step):
            yield i * inner + t, rows[i, t : t + step]


def _torch_forward(rows, tokens, temperature, ignore_index):
    outer, inner, vocab = rows.shape
    logprob, entropy, lse = _empty_stats((outer * inner,), rows.device)
    inv_temp = 1.0 / temperature
    for r0, chunk in _row_chunks(rows):
        r1 = r0 + chunk.shape[0]
        z = chunk.to(torch.float32, copy=True).mul_(inv_temp)
        m = z.amax(dim=-1, keepdim=True)  # NaN propagates
        shift = m.masked_fill(m == float("-inf"), 0.0)
        # d = z - shift; -inf entries become the float32 minimum so that e^d = 0 and d e^d = 0
        d = z.sub_(shift).clamp_min_(_FLOAT32_MIN)
        e = torch.exp(d)
        s = e.sum(dim=-1)
        a = e.mul_(d).sum(dim=-1)
        log_s = torch.log(s)
        lse[r0:r1] = m.squeeze(-1) + log_s
        entropy[r0:r1] = log_s - a / s
        y = tokens[r0:r1]
        in_range = (y >= 0) & (y < vocab)
        z_y = chunk.gather(-1, torch.where(in_range, y, 0).unsqueeze(-1)).squeeze(-1)
        lp = torch.where(in_range, z_y.float() * inv_temp - lse[r0:r1], float("nan"))
        logprob[r0:r1] = lp.masked_fill_(y == ignore_index, 0.0)
    return logprob, entropy, lse


def _torch_backward(
    rows, tokens, lse, entropy, grad_logprob, grad_entropy, temperature, ignore_index
):
    outer, inner, vocab = rows.shape
    dx = torch.empty((outer * inner, vocab), device=rows.device, dtype=rows.dtype)
    for r0, chunk in _row_chunks(rows):
        r1 = r0 + chunk.shape[0]
        # centred = z - lse (the float32 minimum for -inf entries, so p = 0 and p * centred = 0)
        centred = chunk.to(torch.float32, copy=True).mul_(1.0 / temperature)
        centred.sub_(lse[r0:r1, None]).clamp_min_(_FLOAT32_MIN)
        p = torch.exp(centred)
        dz = torch.zeros_like(p)
        if grad_entropy is not None:
            # -g_H p (z - lse + H)
            dz.addcmul_(p, centred.add_(entropy[r0:r1, None]), value=-1.0)
            dz.mul_(grad_entropy[r0:r1, None])
        if grad_logprob is not None:
            y = tokens[r0:r1]
            g_lp = grad_logprob[r0:r1].masked_fill(y == ignore_index, 0.0)
            dz.addcmul_(p, g_lp[:, None], value=-1.0)
            in_range = (y >= 0) & (y < vocab)
            dz.scatter_add_(
                -1,
                torch.where(in_range, y, 0).unsqueeze(-1),
                torch.where(in_range, g_lp, 0.0).unsqueeze(-1),
            )
        dx[r0:r1] = dz.mul_(1.0 / temperature)
    return dx


# --------------------------------------------------------------------------------------------
# Custom ops (backend chosen inside), autograd, public API
# --------------------------------------------------------------------------------------------


def _flat_ids(tokens: torch.Tensor) -> torch.Tensor:
    """Contiguous int64 ids (N elements, cheap): ignore_index and range comparisons stay exact
    for narrow integer dtypes (a uint8 tensor compared with -100 would wrap around)."""
    return tokens.reshape(-1).to(torch.int64).contiguous()


def _check_token_ids(tokens: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """One reduction over the ids; skipped while a CUDA graph is captured (no host sync)."""
    if _validation.capturing_cuda_graph(tokens):
        return
    _validation.check_index_range("tokens", tokens, vocab, ignore_index)


@torch.library.custom_op("appo_kernels::token_stats_fwd", mutates_args=())
def _token_stats_fwd(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float,
    ignore_index: int,
    block_v: int,
    num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lead = logits.shape[:-1]
    flat_tokens = _flat_ids(tokens)
    _check_token_ids(flat_tokens, logits.shape[-1], ignore_index)
    if tokens.numel() == 0:
        return _empty_stats(lead, logits.device)
    rows = _row_view(logits)
    if use_triton(logits.device):
        out = _triton_forward(rows, flat_tokens, temperature, ignore_index, block_v, num_splits)
    else:
        out = _torch_forward(rows, flat_tokens, temperature, ignore_index)
    logprob, entropy, lse = (t.view(lead) for t in out)
    return logprob, entropy, lse


@_token_stats_fwd.register_fake
def _(logits, tokens, temperature, ignore_index, block_v, num_splits):
    return _empty_stats(logits.shape[:-1], logits.device)


@torch.library.custom_op("appo_kernels::token_stats_bwd", mutates_args=())
def _token_stats_bwd(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logprob: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    block_v: int,
    num_splits: int,
) -> torch.Tensor:
    if logits.numel() == 0:
        return torch.zeros(logits.shape, device=logits.device, dtype=logits.dtype)
    rows = _row_view(logits)
    flat = [
        None if t is None else t.reshape(-1).to(torch.float32).contiguous()
        for t in (lse, entropy, grad_logprob, grad_entropy)
    ]
    flat_tokens = _flat_ids(tokens)
    if use_triton(logits.device):
        dx = _triton_backward(
            rows, flat_tokens, *flat, temperature, ignore_index, block_v, num_splits
        )
    else:
        dx = _torch_backward(rows, flat_tokens, *flat, temperature, ignore_index)
    return dx.view(logits.shape)


@_token_stats_bwd.register_fake
def _(
    logits,
    tokens,
    lse,
    entropy,
    grad_logprob,
    grad_entropy,
    temperature,
    ignore_index,
    block_v,
    num_splits,
):
    return torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)


def _setup_context(ctx, inputs, output):
    logits, tokens, temperature, ignore_index, block_v, num_splits = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, tokens, lse, entropy)
    ctx.args = (temperature, ignore_index, block_v, num_splits)


def _backward(ctx, grad_logprob, grad_entropy, grad_lse):
    # lse is exposed only through token_stats_forward, which records no graph: grad_lse unused.
    logits, tokens, lse, entropy = ctx.saved_tensors
    if grad_logprob is None and grad_entropy is None:
        return (None,) * 6
    dx = _token_stats_bwd(logits, tokens, lse, entropy, grad_logprob, grad_entropy, *ctx.args)
    return dx, None, None, None, None, None


_token_stats_fwd.register_autograd(_backward, setup_context=_setup_context)


def _checked_args(logits, tokens, temperature, ignore_index, block_v, num_splits):
    logits = _validation.check_float("logits", logits)
    tokens = _validation.check_int("tokens", tokens)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    _validation.check_shape("tokens", tokens, logits.shape[:-1], "logits.shape[:-1]")
    _validation.check_same_device({"logits": logits, "tokens": tokens})
    temperature = _validation.check_positive("temperature", temperature)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    for name, value in (("_block_v", block_v), ("_num_splits", num_splits)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0 (0 = automatic), got {value!r}")
    if block_v & (block_v - 1):
        raise ValueError(f"_block_v must be a power of two, got {block_v}")
    return logits, tokens, temperature


def token_stats(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    _block_v: int = 0,
    _num_splits: int = 0,
) -> TokenStats:
    """Log-probability of ``tokens`` and full-vocabulary entropy under ``softmax(logits / tau)``.

    Args:
        logits: ``[..., V]`` float16 / bfloat16 / float32, last dimension contiguous (other
            strides are free: ``logits[:, :-1]`` is read without a copy).
        tokens: ``[...]`` integer ids in ``[0, V)`` or ``ignore_index``.
        temperature: ``tau > 0``.
        ignore_index: rows with this id get ``logprob = 0`` and no logprob gradient; their
            entropy is still computed.
        _block_v, _num_splits: tuning / test hooks for the Triton kernels (chunk width, a power
            of two, and number of vocabulary splits); 0 chooses automatically.

    Returns:
        ``TokenStats(logprob, entropy)``, float32 ``logits.shape[:-1]``, both differentiable
        with respect to ``logits``.
    """
    logits, tokens, temperature = _checked_args(
        logits, tokens, temperature, ignore_index, _block_v, _num_splits
    )
    logprob, entropy, _ = _token_stats_fwd(
        logits, tokens, temperature, ignore_index, _block_v, _num_splits
    )
    return TokenStats(logprob, entropy)


def token_stats_forward(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    _block_v: int = 0,
    _num_splits: int = 0,
) -> TokenStatsForward:
    """Like :func:`token_stats`, plus ``lse = log sum exp(logits / tau)``, and not differentiable:
    nothing is recorded for autograd and the outputs never require grad."""
    logits, tokens, temperature = _checked_args(
        logits, tokens, temperature, ignore_index, _block_v, _num_splits
    )
    out = _token_stats_fwd(
        logits.detach(), tokens, temperature, ignore_index, _block_v, _num_splits
    )
    return TokenStatsForward(*out)
