"""pytest-benchmark entry for the CPU path of ``token_stats`` against the eager formula.

    python -m pytest bench/test_token_stats_benchmark.py --benchmark-enable

Compare the two groups' medians in the printed table (same machine, same run).
"""

import pytest
import torch
from token_stats import chunked_eager_token_stats, eager_token_stats

import appo_kernels as ak

SHAPES = [(2048, 32000), (256, 151936)]


@pytest.fixture(params=SHAPES, ids=lambda s: f"N{s[0]}-V{s[1]}")
def inputs(request):
    rows, vocab = request.param
    gen = torch.Generator().manual_seed(0)
    return torch.randn(rows, vocab, generator=gen), torch.randint(0, vocab, (rows,), generator=gen)


@pytest.mark.parametrize(
    "impl",
    [ak.token_stats, eager_token_stats, chunked_eager_token_stats],
    ids=["appo_kernels", "eager", "eager-row-chunked"],
)
def test_token_stats_cpu(benchmark, monkeypatch, inputs, impl):
    monkeypatch.setenv("APPO_KERNELS_BACKEND", "torch")
    logits, tokens = inputs
    logprob, entropy = benchmark(impl, logits, tokens)[:2]
    ref_logprob, ref_entropy = eager_token_stats(logits, tokens)
    torch.testing.assert_close(logprob, ref_logprob, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-5, atol=1e-4)
