"""Token statistics: log-probability of the sampled token and full-vocabulary entropy.

For a row of logits ``x`` (``V`` entries), sampled token ``y`` and temperature ``tau``, with
``z = x / tau``::

    lse     = log sum_j exp(z_j)
    logprob = z_y - lse                          (0 where y == ignore_index)
    entropy = lse - sum_j p_j z_j,  p = softmax(z)

All statistics are float32 whatever the logits dtype. One streaming pass over the vocabulary keeps,
per row, the running maximum ``m`` of the raw logits and, with ``d_j = (x_j - m) / tau``,
``s = sum_j e^(d_j)`` and ``a = sum_j d_j e^(d_j)``; then ``log s`` and ``entropy = log s - a / s``.
When ``m`` grows to ``m'``, with ``delta = (m - m') / tau`` and ``c = e^delta``:
``s <- c s`` and ``a <- c (a + delta s)``. Scaling the *difference* ``x - m`` by ``1 / tau`` (rather
than ``x`` itself) keeps every term finite for any temperature in the accepted range, so
``temperature=1e-30`` gives the argmax distribution rather than ``inf - inf``. A ``-inf`` logit
(masked vocabulary entry) adds 0 to both sums. Nothing of size ``[N, V]`` is stored: the op saves
``m`` and ``log s`` per row, and backward re-reads the logits once and writes the gradient::

    dL/dx_j = (1/tau) [g_lp (1[j = y] - p_j) - g_H p_j (d_j - log s + H)],  p_j = e^(d_j - log s)

Layout: ``logits`` is ``[..., V]`` with a contiguous last dimension. The leading dimensions are
read in place when they collapse into at most two strided levels ("outer" and "inner" rows), so
``logits[:, :-1]`` of a ``[B, T, V]`` tensor costs no copy: row ``r`` lives at
``(r // T1) * stride_outer + (r % T1) * stride_inner`` with ``T1`` the inner row count. A copy is
made only when no such view exists or when the last dimension is not contiguous.

Backends: CUDA tensors run the Triton kernels below; CPU tensors run a chunked PyTorch path of the
same math (a few MB of working space per chunk, independent of N * V);
``APPO_KERNELS_BACKEND=triton|torch`` forces one (on CPU, ``triton`` means Triton's interpreter).
Both sit behind the ``torch.library`` custom ops ``appo_kernels::token_stats_fwd`` and
``appo_kernels::token_stats_bwd``, so ``torch.compile(fullgraph=True)`` and CUDA graphs capture
them. ``linear_token_stats`` (hidden states and the LM head) reuses the row-level launchers,
which can also soft-cap each logit as they read it (``x <- c tanh(x / c)``, then the formulas
above on the capped logits; backward multiplies ``dL/dx_j`` by ``1 - tanh^2(x_j / c)``, from the
same load): the math is in ``linear_token_stats``'s docstring.

Bad input: token ids outside ``[0, V)`` other than ``ignore_index`` raise ``ValueError`` (checked
with four small ops and one host sync, skipped while a CUDA graph is being captured and inside
``appo_kernels.token_id_checks(False)``; the kernels never read out of bounds and give NaN
log-probs for such ids). A NaN in a row gives NaN in that row only. A row
whose logits are all ``-inf`` has no distribution and gives NaN. The temperature must lie in
``[1e-30, 1e30]`` (so that ``1 / tau`` is a normal float32).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from appo_kernels import validation
from appo_kernels._backend import HAS_TRITON, launch_device, use_triton
from appo_kernels._ops import custom_op, detached

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


TEMPERATURE_RANGE = (1e-30, 1e30)

# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

# fmt: off
# (kernel signatures are kept one argument group per line, with their shapes beside them)
if HAS_TRITON:
    NEG_INF = tl.constexpr(float("-inf"))

    @triton.jit
    def _row_offset(row, T1, stride_outer, stride_inner):
        """Element offset (int64) of row ``row`` = (row // T1, row % T1) of the [R, T1, V] view."""
        row = row.to(tl.int64)
        return (row // T1) * stride_outer + (row % T1) * stride_inner

    @triton.jit
    def _rebase(m, s, a, new_max, inv_temp):
        """Re-expresses partial states (m, s, a) relative to the maximum ``new_max`` >= m.

        With delta = (m - new_max) / tau and c = e^delta: s' = c s and a' = c (a + delta s). An
        empty partial (m = -inf, s = a = 0) gives (0, 0); the guard keeps 0 * (-inf) out of the
        sums: a term whose weight c underflowed to 0 contributes 0. With ``s = 1, a = 0`` this
        turns raw logits x into their terms e^d and d e^d.
        """
        shift = tl.where(new_max == NEG_INF, 0.0, new_max)
        delta = (m - shift) * inv_temp
        c = tl.exp(delta)
        return c * s, tl.where(c == 0.0, 0.0, c * (a + delta * s))

    @triton.jit
    def _tanh(u):
        """tanh(u) in float32 from e = exp(-2 |u|) in (0, 1]: no overflow, tanh(+-inf) = +-1,
        NaN stays NaN (the interpreter has no libdevice tanh)."""
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(u < 0, -t, t)

    @triton.jit
    def _store_row_stats(row, m, s, a, x_row, tokens_ptr, logprob_ptr, entropy_ptr, row_max_ptr,
                         log_sum_ptr, V, inv_temp, ignore_index, softcap, SOFTCAP: tl.constexpr):
        """entropy = log s - a / s, logprob = (x_y - m) / tau - log s (one scalar load of
        x[row, y], soft-capped like the row; 0 for ignore_index, NaN for an id outside [0, V),
        never read out of bounds); m and log s are kept for the backward pass."""
        log_s = tl.log(s)
        y = tl.load(tokens_ptr + row).to(tl.int64)
        in_range = (y >= 0) & (y < V)
        x_y = tl.load(x_row + y, mask=in_range, other=0.0).to(tl.float32)
        if SOFTCAP:
            x_y = softcap * _tanh(x_y / softcap)
        logprob = tl.where(in_range, (x_y - m) * inv_temp - log_s, float("nan"))
        logprob = tl.where(y == ignore_index, 0.0, logprob)
        tl.store(row_max_ptr + row, m)
        tl.store(log_sum_ptr + row, log_s)
        tl.store(entropy_ptr + row, log_s - a / s)
        tl.store(logprob_ptr + row, logprob)

    @triton.jit
    def _token_stats_fwd_kernel(
        x_ptr,  # [R, T1, V] logits (fp16/bf16/fp32), strided rows, contiguous vocabulary
        tokens_ptr,  # [N] int64 sampled ids, N = R * T1
        logprob_ptr, entropy_ptr,  # [N] float32 out
        row_max_ptr,  # [N] float32 out: max_j x_j (raw logits)
        log_sum_ptr,  # [N] float32 out: log sum_j e^((x_j - max) / tau)
        part_m_ptr, part_s_ptr, part_a_ptr,  # [N, splits] float32 partial states (when SPLIT)
        V, T1, stride_outer, stride_inner,  # row layout: module docstring
        cols_per_split,  # vocabulary columns of one program (a multiple of BLOCK_V)
        inv_temp, ignore_index,
        softcap,  # c of the soft cap x <- c tanh(x / c) (when SOFTCAP)
        BLOCK_V: tl.constexpr, SPLIT: tl.constexpr, SOFTCAP: tl.constexpr,
    ):
        """Program (row, split) streams columns [split * cols_per_split, ...) of one row in
        BLOCK_V chunks. It keeps the running maximum m as a scalar and the sums s, a as BLOCK_V-wide
        vectors (one lane per column slot), so each chunk costs one block reduction (its maximum)
        and the vectors are rescaled only in the rare chunks that raise m; the lanes are summed once
        at the end. The next chunk is loaded before the current one is reduced, so a load is in
        flight while the program waits on the reduction. With SOFTCAP each loaded logit is
        soft-capped in registers first (columns past V stay -inf). Without a split it writes the
        row's statistics; with one it writes the partial (m, s, a) for the merge kernel."""
        row = tl.program_id(0)
        split = tl.program_id(1)
        x_row = x_ptr + _row_offset(row, T1, stride_outer, stride_inner)
        col_begin = split * cols_per_split
        col_end = tl.minimum(col_begin + cols_per_split, V)
        m = tl.full([], NEG_INF, tl.float32)
        s_lanes = tl.zeros([BLOCK_V], tl.float32)
        a_lanes = tl.zeros([BLOCK_V], tl.float32)
        cols = col_begin + tl.arange(0, BLOCK_V)
        x_next = tl.load(x_row + cols, mask=cols < V, other=NEG_INF)
        for start in range(col_begin, col_end, BLOCK_V):
            x = x_next.to(tl.float32)
            if SOFTCAP:
                x = tl.where(cols < V, softcap * _tanh(x / softcap), NEG_INF)
            cols = start + BLOCK_V + tl.arange(0, BLOCK_V)
            x_next = tl.load(x_row + cols, mask=cols < V, other=NEG_INF)
            chunk_max = tl.max(x, axis=0)
            if chunk_max > m:
                s_lanes, a_lanes = _rebase(m, s_lanes, a_lanes, chunk_max, inv_temp)
                m = chunk_max
            e, de = _rebase(x, 1.0, 0.0, m, inv_temp)
            s_lanes += e
            a_lanes += de
        s = tl.sum(s_lanes, axis=0)
        a = tl.sum(a_lanes, axis=0)
        if SPLIT:
            part = row.to(tl.int64) * tl.num_programs(1) + split
            tl.store(part_m_ptr + part, m)
            tl.store(part_s_ptr + part, s)
            tl.store(part_a_ptr + part, a)
        else:
            _store_row_stats(row, m, s, a, x_row, tokens_ptr, logprob_ptr, entropy_ptr,
                             row_max_ptr, log_sum_ptr, V, inv_temp, ignore_index, softcap,
                             SOFTCAP)

    @triton.jit
    def _token_stats_merge_kernel(
        x_ptr, tokens_ptr, logprob_ptr, entropy_ptr, row_max_ptr, log_sum_ptr,  # as forward
        part_m_ptr, part_s_ptr, part_a_ptr,  # [N, num_splits] float32 partial states
        V, T1, stride_outer, stride_inner, num_splits, inv_temp, ignore_index, softcap,
        SPLITS_POW2: tl.constexpr, SOFTCAP: tl.constexpr,
    ):
        """Merges a row's partials: M = max m_i, then each (s_i, a_i) is rebased to M and
        summed; then writes the row's statistics."""
        row = tl.program_id(0)
        idx = tl.arange(0, SPLITS_POW2)
        mask = idx < num_splits
        part = row.to(tl.int64) * num_splits + idx
        m_i = tl.load(part_m_ptr + part, mask=mask, other=NEG_INF)
        s_i = tl.load(part_s_ptr + part, mask=mask, other=0.0)
        a_i = tl.load(part_a_ptr + part, mask=mask, other=0.0)
        m = tl.max(m_i, axis=0)
        s_i, a_i = _rebase(m_i, s_i, a_i, m, inv_temp)
        x_row = x_ptr + _row_offset(row, T1, stride_outer, stride_inner)
        _store_row_stats(row, m, tl.sum(s_i, axis=0), tl.sum(a_i, axis=0), x_row, tokens_ptr,
                         logprob_ptr, entropy_ptr, row_max_ptr, log_sum_ptr, V, inv_temp,
                         ignore_index, softcap, SOFTCAP)

    @triton.jit
    def _token_stats_bwd_kernel(
        x_ptr,  # [R, T1, V] logits, as forward
        tokens_ptr,  # [N] int64
        row_max_ptr, log_sum_ptr, entropy_ptr,  # [N] float32 saved by the forward pass
        grad_logprob_ptr, grad_entropy_ptr,  # [N] float32 upstream gradients (when HAS_*)
        dx_ptr,  # [N, V] out, logits dtype, contiguous; may be x_ptr itself (in place)
        V, T1, stride_outer, stride_inner, cols_per_split, inv_temp, ignore_index, softcap,
        HAS_GRAD_LOGPROB: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
        SOFTCAP: tl.constexpr,
    ):
        """dx_j = (1/tau) [g_lp (1[j = y] - p_j) - g_H p_j (d_j - log s + H)] with
        d_j = (x_j - m) / tau and p_j = e^(d_j - log s); program (row, split) streams its
        columns once (read x, write dx). With SOFTCAP, x_j is first replaced by c t_j,
        t_j = tanh(x_j / c), and dx_j multiplied by 1 - t_j^2 (all from the one load). Each
        element is read before it is written, so dx may alias x."""
        row = tl.program_id(0)
        split = tl.program_id(1)
        x_row = x_ptr + _row_offset(row, T1, stride_outer, stride_inner)
        dx_row = dx_ptr + row.to(tl.int64) * V
        m = tl.load(row_max_ptr + row)
        log_s = tl.load(log_sum_ptr + row)
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
            if SOFTCAP:
                t = _tanh(x / softcap)
                x = softcap * t
            centred = (x - m) * inv_temp - log_s  # log p_j
            p = tl.exp(centred)
            centred = tl.where(p == 0.0, 0.0, centred + entropy)  # no 0 * (-inf)
            dz = tl.where(cols == y, g_lp, 0.0) - p * (g_lp + g_h * centred)
            if SOFTCAP:
                dz = dz * (1.0 - t * t)
            tl.store(dx_row + cols, (dz * inv_temp).to(dx_ptr.dtype.element_ty), mask=mask)


# fmt: on

# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

# Per program: warps and 16-byte loads per thread for long rows, from an H200 sweep
# (bench/results/token_stats_forward_sweep_nvidia_h200.md). The forward pass reduces each chunk
# across the program and prefetches the next chunk into registers: small programs (2 warps, one
# load per thread and chunk) are fastest. The backward pass (no reductions, read + write) runs at
# ~95% of the copy bandwidth with 8 warps and two loads per thread.
FORWARD = (2, 1)
BACKWARD = (8, 2)
_WARPS_PER_SM = 32  # below this many warps per SM (N rows of `warps` each), the vocabulary is split
_MIN_BLOCKS_PER_SPLIT = 4  # a vocabulary split streams at least this many chunks
_MAX_SPLITS = 128


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
    shape: tuple[int, int] = FORWARD,
) -> _LaunchConfig:
    """Chunk size, warps and vocabulary splits for a [n_rows, vocab] launch (0 = choose).

    ``shape`` = (warps, 16-byte loads per thread): a chunk is ``warps * 32 * loads * 16 / itemsize``
    columns (the forward's (2, 1): 512 bf16/fp16 or 256 fp32 columns), capped by the row length.
    Rows split into several programs only on CUDA when fewer than 32 warps per SM would run and
    each split keeps >= 4 chunks; off-GPU (the interpreter) the split count is 1 unless forced.
    """
    warps, loads = shape
    if block_v == 0:
        block_v = min(triton.next_power_of_2(vocab), warps * 32 * loads * 16 // dtype.itemsize)
    num_warps = max(1, min(warps, block_v * dtype.itemsize // (32 * 16 * loads)))
    n_blocks = triton.cdiv(vocab, block_v)
    if num_splits == 0:
        num_splits = 1
        if device.type == "cuda":
            programs = _WARPS_PER_SM // num_warps * _sm_count(device)
            wanted = triton.cdiv(programs, max(n_rows, 1))
            num_splits = max(1, min(wanted, n_blocks // _MIN_BLOCKS_PER_SPLIT, _MAX_SPLITS))
    cols_per_split = triton.cdiv(n_blocks, min(num_splits, n_blocks)) * block_v
    return _LaunchConfig(block_v, num_warps, triton.cdiv(vocab, cols_per_split), cols_per_split)


def _kernel_rows(rows: torch.Tensor) -> tuple[int, int, int, int]:
    """(N, T1, stride_outer, stride_inner) of a row view: [N, V] (one level, T1 = 1) or
    [R, T1, V]."""
    if rows.dim() == 2:
        return rows.shape[0], 1, rows.stride(0), 0
    outer, inner, _ = rows.shape
    return outer * inner, inner, rows.stride(0), rows.stride(1)


def _triton_forward(rows, tokens, temperature, ignore_index, block_v, num_splits, softcap):
    vocab = rows.shape[-1]
    n_rows, T1, stride_outer, stride_inner = _kernel_rows(rows)
    cfg = _launch_config(n_rows, vocab, rows.dtype, rows.device, block_v, num_splits)
    logprob, entropy, row_max, log_sum = _empty_stats((n_rows,), rows.device)
    split = cfg.num_splits > 1
    parts = torch.empty(
        (3, n_rows * cfg.num_splits if split else 1), device=rows.device, dtype=torch.float32
    )
    with launch_device(rows):
        _token_stats_fwd_kernel[(n_rows, cfg.num_splits)](
            rows, tokens, logprob, entropy, row_max, log_sum, parts[0], parts[1], parts[2],
            vocab, T1, stride_outer, stride_inner, cfg.cols_per_split, 1.0 / temperature,
            ignore_index, softcap or 1.0, BLOCK_V=cfg.block_v, SPLIT=split,
            SOFTCAP=softcap is not None, num_warps=cfg.num_warps,
        )  # fmt: skip
        if split:
            _token_stats_merge_kernel[(n_rows,)](
                rows, tokens, logprob, entropy, row_max, log_sum, parts[0], parts[1], parts[2],
                vocab, T1, stride_outer, stride_inner, cfg.num_splits, 1.0 / temperature,
                ignore_index, softcap or 1.0, SPLITS_POW2=triton.next_power_of_2(cfg.num_splits),
                SOFTCAP=softcap is not None, num_warps=1,
            )  # fmt: skip
    return logprob, entropy, row_max, log_sum


def _triton_backward(rows, tokens, row_max, log_sum, entropy, grad_logprob, grad_entropy,
                     temperature, ignore_index, block_v, num_splits, softcap, out):  # fmt: skip
    vocab = rows.shape[-1]
    n_rows, T1, stride_outer, stride_inner = _kernel_rows(rows)
    cfg = _launch_config(n_rows, vocab, rows.dtype, rows.device, block_v, num_splits, BACKWARD)
    with launch_device(rows):
        _token_stats_bwd_kernel[(n_rows, cfg.num_splits)](
            rows, tokens, row_max, log_sum, entropy,
            grad_logprob if grad_logprob is not None else entropy,
            grad_entropy if grad_entropy is not None else entropy,
            out, vocab, T1, stride_outer, stride_inner, cfg.cols_per_split, 1.0 / temperature,
            ignore_index, softcap or 1.0, HAS_GRAD_LOGPROB=grad_logprob is not None,
            HAS_GRAD_ENTROPY=grad_entropy is not None, BLOCK_V=cfg.block_v,
            SOFTCAP=softcap is not None, num_warps=cfg.num_warps,
        )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------
# PyTorch path: the same math in float32, a few MB of rows at a time
# --------------------------------------------------------------------------------------------

_TORCH_CHUNK_BYTES = 4 << 20  # float32 working set of one chunk of rows
_FLOAT32_MIN = torch.finfo(torch.float32).min


def _capped(chunk: torch.Tensor, softcap: float, out: torch.Tensor | None) -> torch.Tensor:
    """``softcap * tanh(chunk / softcap)`` in float32, into the work buffer ``out`` when given
    (never in the logits themselves: the backward pass reuses it)."""
    x = chunk.to(torch.float32, copy=True) if out is None else out.copy_(chunk)
    return x.div_(softcap).tanh_().mul_(softcap)


def _row_chunks(rows: torch.Tensor, softcap: float | None = None):
    """Yields ``(first_row, chunk, d, e)`` over the row view ([N, V] or [R, T1, V]), a few MB of
    rows at a time: ``chunk`` an [n, V] view of the logits (with ``softcap``, a float32 buffer
    holding ``softcap * tanh(logits / softcap)`` instead), ``d`` and ``e`` two float32 [n, V]
    work buffers for ``out=`` (allocated once per call and reused, so no chunk pays for fresh
    pages; None when the rows fit in one chunk, so that the ops allocate their results
    themselves)."""
    vocab, inner = rows.shape[-1], rows.shape[-2]
    step = max(1, min(inner, _TORCH_CHUNK_BYTES // (4 * vocab)))
    if _one_chunk(rows):
        yield 0, (rows if softcap is None else _capped(rows, softcap, None)), None, None
        return
    work = torch.empty((2 + (softcap is not None), step, vocab), device=rows.device,
                       dtype=torch.float32)  # fmt: skip
    for i, level in enumerate((rows,) if rows.dim() == 2 else rows):
        for t in range(0, inner, step):
            chunk = level[t : t + step]
            n = chunk.shape[0]
            if softcap is not None:
                chunk = _capped(chunk, softcap, work[2, :n])
            yield i * inner + t, chunk, work[0, :n], work[1, :n]


def _scaled_shift(chunk, row_max, inv_temp, out):
    """(x - m) / tau in float32 (``row_max``: [n, 1] float32 m), into ``out`` when given."""
    d = torch.sub(chunk, row_max, out=out)
    return d if inv_temp == 1.0 else d.mul_(inv_temp)


def _exp_terms(d, out):
    """e^d after clamping ``d`` in place at the float32 minimum, so that a masked (-inf) entry
    gives e^d = 0 and d e^d = 0 rather than 0 * (-inf)."""
    return torch.exp(d.clamp_min_(_FLOAT32_MIN), out=out)


def _in_vocab(y: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids clamped into [0, V) as [n, 1] gather/scatter columns, whether each id lies outside):
    an id outside the vocabulary is never used as an index (its log-prob is NaN, its one-hot
    term dropped)."""
    column = y.clamp(0, vocab - 1)
    return column[:, None], column != y


def _token_logprob(d, log_s, y, ignore_index, check_ids):
    """logprob = d_y - log s, 0 where ``y == ignore_index``, from two picks of ``nll_loss``
    (``-input[i, y_i]``; 0 for ``ignore_index``, whose row it does not read): one from ``d``, one
    from log s broadcast along each row (a stride-0 view), so that their difference is
    d_y - log s, and exactly 0 on the ignored rows. Each reads n entries, not the rows. With
    ``check_ids``, ``nll_loss``'s own bounds check (on CPU it raises for a target outside
    [0, V) before reading it) is the token-id range check, and a failure is reported as the
    range check reports it, naming the first offending id; without, such ids get NaN."""
    targets, outside = y, None
    if not check_ids:
        _, outside = _in_vocab(y, d.shape[1])
        outside &= y != ignore_index
        targets = y.masked_fill(outside, ignore_index)  # not read by nll_loss, then NaN
    try:
        neg_d_y = F.nll_loss(d, targets, ignore_index=ignore_index, reduction="none")
    except IndexError as error:  # with check_ids only: an id outside [0, V)
        failure = error
    else:
        row_log_s = log_s.as_strided(d.shape, (1, 0))  # (log_s: a new contiguous [n])
        logprob = F.nll_loss(row_log_s, targets, ignore_index=ignore_index, reduction="none")
        logprob.sub_(neg_d_y)
        return logprob if outside is None else logprob.masked_fill_(outside, float("nan"))
    validation.check_index_range("tokens", y, d.shape[1], ignore_index)  # raises the ValueError
    raise failure


def _chunk_forward(chunk, y, inv_temp, ignore_index, check_ids, d=None, e=None):
    """``(logprob, entropy, row_max, log_sum)`` of one [n, V] chunk (``y``: its [n] int64 ids;
    ``d``, ``e``: work buffers or None): m = max x, d = (x - m) / tau, s = sum e^d and
    a = sum d e^d (cascaded sums), entropy = log s - a / s, logprob = d_y - log s
    (``_token_logprob``). A -inf logit gives d = -inf: e^d = 0, a term d e^d = NaN that
    ``nansum`` drops (it is exactly the term 0) and a -inf log-prob; a NaN anywhere in a row
    makes its s, and so everything but an ignored row's log-prob, NaN anyway."""
    m = chunk.amax(dim=1, keepdim=True)
    if m.dtype != torch.float32:
        m = m.float()  # NaN propagates
    d = _scaled_shift(chunk, m, inv_temp, d)
    e = torch.exp(d, out=e)
    total = e.sum(dim=1)
    log_s = total.log()
    entropy = torch.addcdiv(log_s, torch.nansum(torch.mul(d, e, out=e), dim=1), total, value=-1.0)
    return _token_logprob(d, log_s, y, ignore_index, check_ids), entropy, m.view(-1), log_s


def _one_chunk(rows: torch.Tensor) -> bool:
    """Whether the row view fits in one chunk of the PyTorch path (``_row_chunks``)."""
    return rows.dim() == 2 and rows.shape[0] <= max(1, _TORCH_CHUNK_BYTES // (4 * rows.shape[1]))


def _torch_forward(rows, tokens, temperature, ignore_index, softcap=None, check_ids=False):
    """``_chunk_forward`` over the chunks of ``_row_chunks`` (soft-capped first when ``softcap``
    is given); the statistics of a single chunk are the outputs as they are."""
    inv_temp = 1.0 / temperature
    if softcap is None and _one_chunk(rows):  # what _row_chunks would yield, without its loop
        return _chunk_forward(rows, tokens, inv_temp, ignore_index, check_ids)
    stats = [
        _chunk_forward(chunk, tokens[r0 : r0 + chunk.shape[0]], inv_temp, ignore_index,
                       check_ids, d, e)
        for r0, chunk, d, e in _row_chunks(rows, softcap)
    ]  # fmt: skip
    return stats[0] if len(stats) == 1 else tuple(map(torch.cat, zip(*stats)))


def _torch_backward(rows, tokens, row_max, log_sum, entropy, grad_logprob, grad_entropy,
                    temperature, ignore_index, out, softcap=None):  # fmt: skip
    """With log p = d - log s, clamped at the float32 minimum (so that a masked -inf entry
    gives p = 0 and a finite bracket below, never 0 * (-inf)), and p = e^(log p):
    dz = -(g_H / tau) p (log p + H) - (g_lp / tau) p, plus g_lp / tau at y. With ``softcap`` c,
    the chunk holds the capped logits c t (t = tanh(x / c)) and dz is multiplied by
    1 - t^2 = 1 - (chunk / c)^2."""
    vocab = rows.shape[-1]
    inv_temp = 1.0 / temperature
    for r0, chunk, d, p in _row_chunks(rows, softcap):
        r1 = r0 + chunk.shape[0]
        log_p = _scaled_shift(chunk, row_max[r0:r1, None], inv_temp, d)
        log_p.sub_(log_sum[r0:r1, None])
        p = _exp_terms(log_p, p)
        g_lp = None
        if grad_logprob is not None:
            y = tokens[r0:r1]
            g_lp = grad_logprob[r0:r1, None].masked_fill(y[:, None] == ignore_index, 0.0)
            g_lp.mul_(inv_temp)
        if grad_entropy is not None:
            g_h = grad_entropy[r0:r1, None] * -inv_temp
            dz = log_p.add_(entropy[r0:r1, None]).mul_(p).mul_(g_h)
            if g_lp is not None:
                dz.addcmul_(p, g_lp, value=-1.0)
        else:
            dz = p.mul_(-g_lp)
        if g_lp is not None:
            column, outside = _in_vocab(y, vocab)
            dz.scatter_add_(-1, column, g_lp.masked_fill_(outside[:, None], 0.0))
        if softcap is not None:  # the chunk is a work buffer: its capped logits become 1 - t^2
            dz.mul_(chunk.div_(softcap).square_().neg_().add_(1.0))
        out[r0:r1] = dz
    return out


# --------------------------------------------------------------------------------------------
# Row-level entry points (shared with linear_token_stats)
# --------------------------------------------------------------------------------------------


def _empty_stats(shape, device) -> tuple[torch.Tensor, ...]:
    """Separate float32 outputs (custom-op outputs must not alias each other)."""
    return tuple(torch.empty(shape, device=device, dtype=torch.float32) for _ in range(4))


def _row_view(logits: torch.Tensor) -> torch.Tensor:
    """Returns ``logits`` as a strided view of its N rows with a contiguous last dimension:
    [N, V] when the leading dimensions collapse into one strided level (``logits`` itself when
    it is a contiguous [N, V]), [R, T1, V] (R * T1 = N) when they collapse into two; copying
    only when they do not or the last dimension is not contiguous."""
    vocab = logits.shape[-1]
    if logits.is_contiguous():
        return logits if logits.dim() == 2 else logits.view(-1, vocab)
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
        return logits.contiguous().view(-1, vocab)
    if len(levels) < 2:
        rows, stride = levels[0] if levels else (1, vocab)
        return logits.as_strided((rows, vocab), (stride, 1))
    (outer, outer_stride), (inner, inner_stride) = levels
    return logits.as_strided((outer, inner, vocab), (outer_stride, inner_stride, 1))


def rows_forward(rows, tokens, temperature, ignore_index, block_v=0, num_splits=0, softcap=None,
                 check_ids=False):  # fmt: skip
    """Statistics of a row view (``_row_view``; ``tokens``: [N] int64) on the backend of its
    device: float32 ``(logprob, entropy, row_max, log_sum)``, each [N]. With ``softcap`` c, of
    the soft-capped logits ``c * tanh(x / c)`` (``row_max`` is then the capped maximum).
    ``check_ids``: the token-id range check is still to be made (``token_id_check_due``): the
    PyTorch path on CPU makes it with the ``nll_loss`` it runs anyway (``_token_logprob``), every
    other path first, with one reduction and a host sync (``validation.check_index_range``)."""
    if use_triton(rows.device):
        if check_ids:
            validation.check_index_range("tokens", tokens, rows.shape[-1], ignore_index)
        return _triton_forward(rows, tokens, temperature, ignore_index, block_v, num_splits,
                               softcap)  # fmt: skip
    if check_ids and not rows.is_cpu:  # APPO_KERNELS_BACKEND=torch on CUDA: no device asserts
        validation.check_index_range("tokens", tokens, rows.shape[-1], ignore_index)
    return _torch_forward(rows, tokens, temperature, ignore_index, softcap,
                          check_ids and rows.is_cpu)  # fmt: skip


def rows_backward(rows, tokens, row_max, log_sum, entropy, grad_logprob, grad_entropy,
                  temperature, ignore_index, out, block_v=0, num_splits=0,
                  softcap=None):  # fmt: skip
    """Writes the logits gradient of a row view (``_row_view``) into ``out`` ([N, V], contiguous,
    the logits dtype; ``out`` may be the row storage itself when that is contiguous) and
    returns it. ``grad_logprob`` / ``grad_entropy`` are [N] float32 or None. With ``softcap``,
    the gradient with respect to the raw logits, through the soft cap."""
    args = (rows, tokens, row_max, log_sum, entropy, grad_logprob, grad_entropy, temperature)
    if use_triton(rows.device):
        return _triton_backward(*args, ignore_index, block_v, num_splits, softcap, out)
    return _torch_backward(*args, ignore_index, out, softcap)


# --------------------------------------------------------------------------------------------
# Custom ops, autograd, public API
# --------------------------------------------------------------------------------------------


def flat_ids(tokens: torch.Tensor) -> torch.Tensor:
    """Contiguous int64 ids (N elements, cheap): ignore_index and range comparisons stay exact
    for narrow integer dtypes (a uint8 tensor compared with -100 would wrap around)."""
    ids = tokens if tokens.dim() == 1 else tokens.reshape(-1)
    ids = ids if ids.dtype == torch.int64 else ids.long()
    return ids if ids.is_contiguous() else ids.contiguous()


def token_id_check_due(tokens: torch.Tensor) -> bool:
    """Whether the token-id range check runs on these ids: not when there are none, not while a
    CUDA graph is captured (no host sync) and not inside ``validation.token_id_checks(False)``."""
    return (
        tokens.numel() != 0
        and validation.token_id_checks_enabled()
        and not validation.capturing_cuda_graph(tokens)
    )


def check_token_ids(tokens: torch.Tensor, vocab: int, ignore_index: int) -> bool:
    """The token-id range check of ids about to be split into chunks, where it is due: on CUDA
    tensors now, for all of them at once (one reduction and one host sync, not one per chunk);
    on CPU tensors left to ``rows_forward`` (True, for its ``check_ids``), whose PyTorch path
    makes it with the ``nll_loss`` it runs anyway."""
    if not token_id_check_due(tokens):
        return False
    if tokens.is_cpu:
        return True
    validation.check_index_range("tokens", tokens, vocab, ignore_index)
    return False


@custom_op("appo_kernels::token_stats_fwd")
def _token_stats_fwd(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float,
    ignore_index: int,
    block_v: int,
    num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = flat_ids(tokens)
    if ids.numel() == 0:
        return _empty_stats(logits.shape[:-1], logits.device)
    out = rows_forward(_row_view(logits), ids, temperature, ignore_index, block_v, num_splits,
                       check_ids=token_id_check_due(ids))  # fmt: skip
    if logits.dim() == 2:
        return out
    lead = tuple(logits.shape[:-1])
    return tuple(t.view(lead) for t in out)


@_token_stats_fwd.register_fake
def _(logits, tokens, temperature, ignore_index, block_v, num_splits):
    return _empty_stats(logits.shape[:-1], logits.device)


@custom_op("appo_kernels::token_stats_bwd")
def _token_stats_bwd(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
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
    row_stats = [
        None if t is None else t.reshape(-1).to(torch.float32).contiguous()
        for t in (row_max, log_sum, entropy, grad_logprob, grad_entropy)
    ]
    vocab = logits.shape[-1]
    dx = torch.empty((logits.numel() // vocab, vocab), device=logits.device, dtype=logits.dtype)
    rows_backward(rows, flat_ids(tokens), *row_stats, temperature, ignore_index, dx, block_v,
                  num_splits)  # fmt: skip
    return dx.view(logits.shape)


@_token_stats_bwd.register_fake
def _(logits, tokens, row_max, log_sum, entropy, grad_logprob, grad_entropy, temperature,
      ignore_index, block_v, num_splits):  # fmt: skip
    return torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)


def _setup_context(ctx, inputs, output):
    logits, tokens, temperature, ignore_index, block_v, num_splits = inputs
    _, entropy, row_max, log_sum = output
    ctx.save_for_backward(logits, tokens, row_max, log_sum, entropy)
    ctx.args = (temperature, ignore_index, block_v, num_splits)


def _backward(ctx, grad_logprob, grad_entropy, grad_row_max, grad_log_sum):
    # row_max / log_sum leave only through token_stats_forward, which records no graph.
    if grad_logprob is None and grad_entropy is None:
        return (None,) * 6
    logits, tokens, row_max, log_sum, entropy = ctx.saved_tensors
    dx = _token_stats_bwd(logits, tokens, row_max, log_sum, entropy, grad_logprob, grad_entropy,
                          *ctx.args)  # fmt: skip
    return dx, None, None, None, None, None


_token_stats_fwd.register_autograd(_backward, setup_context=_setup_context)


def check_temperature(temperature: object) -> float:
    """A temperature in ``TEMPERATURE_RANGE`` (1 / tau stays a normal float32)."""
    low, high = TEMPERATURE_RANGE
    if type(temperature) is float and low <= temperature <= high:
        return temperature  # the usual case, without the general number checks
    temperature = validation.check_positive("temperature", temperature)
    if not low <= temperature <= high:
        raise ValueError(f"temperature must be in [{low:g}, {high:g}], got {temperature:g}")
    return temperature


def check_token_args(logits, tokens, temperature, ignore_index) -> tuple[torch.Tensor, float]:
    """Checks of ``tokens``, ``temperature`` and ``ignore_index`` against ``logits``, which the
    caller has checked to be a floating tensor (``token_stats`` alone, ``branching_score``
    together with its other inputs). Returns ``(tokens, temperature)``."""
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    tokens = validation.check_int("tokens", tokens)
    validation.check_shape("tokens", tokens, logits.shape[:-1], "logits.shape[:-1]")
    if tokens.device != logits.device:
        validation.check_same_device({"logits": logits, "tokens": tokens})
    temperature = check_temperature(temperature)
    validation.check_int64("ignore_index", ignore_index)
    return tokens, temperature


def _checked_args(logits, tokens, temperature, ignore_index, block_v, num_splits):
    logits = validation.check_float("logits", logits)
    tokens, temperature = check_token_args(logits, tokens, temperature, ignore_index)
    if type(block_v) is not int or type(num_splits) is not int or block_v or num_splits:
        _check_tuning(block_v, num_splits)  # not the automatic (0, 0)
    return logits, tokens, temperature


def _check_tuning(block_v, num_splits) -> None:
    for name, value in (("_block_v", block_v), ("_num_splits", num_splits)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**16:
            raise ValueError(f"{name} must be an int in [0, 65536] (0 = automatic), got {value!r}")
    if block_v & (block_v - 1):
        raise ValueError(f"_block_v must be a power of two, got {block_v}")


def unchecked_forward(logits, tokens, temperature, ignore_index, block_v=0, num_splits=0):
    """``(logprob, entropy, row_max, log_sum)`` of arguments already checked, recording nothing
    for autograd: the body of ``token_stats_forward``, and what ``branching_score`` calls after
    checking its own arguments."""
    return _token_stats_fwd(detached(logits), tokens, temperature, ignore_index, block_v,
                            num_splits)  # fmt: skip


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

    Parameters
    ----------
    logits : torch.Tensor
        ``[..., V]`` float16 / bfloat16 / float32, last dimension contiguous (other strides are
        free: ``logits[:, :-1]`` of a ``[B, T, V]`` tensor is read without a copy).
    tokens : torch.Tensor
        ``[...]`` integer ids in ``[0, V)`` or ``ignore_index``, on the logits' device.
    temperature : float
        ``tau`` in ``[1e-30, 1e30]``; the distribution is ``softmax(logits / tau)``.
    ignore_index : int
        Rows with this id get ``logprob = 0`` and no log-prob gradient; their entropy is still
        computed.
    _block_v, _num_splits : int
        Tuning and test hooks for the Triton kernels (chunk width, a power of two, and number of
        vocabulary splits); 0 chooses automatically.

    Returns
    -------
    TokenStats
        ``(logprob, entropy)``, float32 ``logits.shape[:-1]``, both differentiable with respect
        to ``logits`` (backward is one more streaming pass; nothing ``[N, V]`` is saved).

    Notes
    -----
    One streaming pass over the vocabulary (online maximum, sum and entropy accumulator); see
    the module docstring for the recurrences and docs/design.md for the derivation.

    Examples
    --------
    >>> logits = torch.randn(2, 5, 32)
    >>> tokens = torch.randint(0, 32, (2, 5))
    >>> lp, h = token_stats(logits[:, :-1], tokens[:, 1:])  # no copy of the shifted view
    >>> lp.shape, h.dtype
    (torch.Size([2, 4]), torch.float32)
    """
    logits, tokens, temperature = _checked_args(
        logits, tokens, temperature, ignore_index, _block_v, _num_splits
    )
    logprob, entropy, _, _ = _token_stats_fwd(
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
    """Like :func:`token_stats`, plus ``lse = log sum exp(logits / tau)``, and not
    differentiable: nothing is recorded for autograd and the outputs never require grad."""
    logits, tokens, temperature = _checked_args(
        logits, tokens, temperature, ignore_index, _block_v, _num_splits
    )
    logprob, entropy, row_max, log_sum = unchecked_forward(
        logits, tokens, temperature, ignore_index, _block_v, _num_splits
    )
    return TokenStatsForward(logprob, entropy, row_max / temperature + log_sum)
