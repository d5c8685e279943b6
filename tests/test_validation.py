"""Hostile and careless arguments to every public op end in a ValueError or TypeError that names
the argument (docs/design.md, section 10), never in an error from deep inside an op: tensors that
are not dense (sparse, nested, quantized) in every tensor argument, and numbers beyond what the
kernels' arguments can hold. The checks run before any backend is chosen, so the default backend
is enough here."""

import pytest
import torch

import appo_kernels as ak

B, T, V = 2, 5, 7
pytestmark = pytest.mark.filterwarnings(  # torch's notes on building the odd tensors below
    "ignore:.*nested tensors.*", "ignore:.*quantize_per_tensor.*", "ignore:Sparse CSR"
)


def valid_calls() -> dict:
    """op name -> (op, keyword arguments of a valid call)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=gen)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    x = -torch.rand(B, T, generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    log_ratio = dict(logprob=x, behavior_logprob=x - 0.1, mask=mask)
    return {
        "token_stats": (ak.token_stats, dict(logits=logits, tokens=tokens)),
        "discounted_future_sum": (ak.discounted_future_sum, dict(values=x, mask=mask)),
        "future_value": (ak.future_value, log_ratio),
        "branching_score_from_stats": (
            ak.branching_score_from_stats,
            dict(entropy=x.abs(), **log_ratio),
        ),
        "branching_score": (
            ak.branching_score,
            dict(logits=logits, tokens=tokens, behavior_logprob=x, mask=mask),
        ),
        "select_branch_points": (
            ak.select_branch_points,
            dict(
                score=x, candidates=mask, group_ids=torch.tensor([0, 1]), budget=2, preferred=mask
            ),
        ),
    }


def not_dense(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same data as tensors that are not dense (strided)."""
    variants = {"sparse_coo": x.to_sparse()}
    if x.dim() == 2:
        variants["sparse_csr"] = x.to_sparse_csr()
    if x.is_floating_point():
        variants["nested"] = torch.nested.nested_tensor(list(x))
        variants["quantized"] = torch.quantize_per_tensor(x, 0.1, 0, torch.qint8)
    return variants


TENSOR_ARGS = [
    (op_name, arg)
    for op_name, (_, kwargs) in valid_calls().items()
    for arg, value in kwargs.items()
    if isinstance(value, torch.Tensor)
]


@pytest.mark.parametrize("op_name", list(valid_calls()))
def test_the_valid_calls_are_valid(op_name):
    op, kwargs = valid_calls()[op_name]
    op(**kwargs)


@pytest.mark.parametrize("op_name, arg", TENSOR_ARGS)
def test_tensors_that_are_not_dense_are_rejected_by_name(op_name, arg):
    op, kwargs = valid_calls()[op_name]
    for value in not_dense(kwargs[arg]).values():
        with pytest.raises(TypeError, match=f"{arg} must be a dense"):
            op(**{**kwargs, arg: value})


HUGE = 2**2000  # an int far beyond float64
NUMBERS = [
    ("token_stats", "temperature", HUGE),
    ("token_stats", "temperature", -HUGE),
    ("branching_score", "temperature", HUGE),
    ("branching_score", "ignore_index", 2**63),
    ("branching_score", "ignore_index", -(2**63) - 1),
    ("discounted_future_sum", "gamma", HUGE),
    ("future_value", "gamma", 2**1100),  # a float, but far outside (0, 1]
    ("future_value", "clip", HUGE),
    ("branching_score_from_stats", "clip", -HUGE),
    ("select_branch_points", "budget", 2**62),
    ("select_branch_points", "budget", 2**64),
    ("select_branch_points", "budget", 10**5000),  # too long even to print in full
    ("select_branch_points", "num_groups", 2**64),
    ("select_branch_points", "num_groups", 10**9),
]


def _number_id(value):
    return (
        f"{'-' if value < 0 else ''}2^{abs(value).bit_length() - 1}"
        if isinstance(value, int) and abs(value) > 2**40
        else str(value)
    )


@pytest.mark.parametrize("op_name, arg, value", NUMBERS, ids=_number_id)
def test_numbers_out_of_range_are_rejected_by_name(op_name, arg, value):
    op, kwargs = valid_calls()[op_name]
    with pytest.raises(ValueError, match=arg) as error:
        op(**{**kwargs, arg: value})
    assert len(str(error.value)) < 300


def test_meta_tensors_need_an_explicit_group_count():
    _, kwargs = valid_calls()["select_branch_points"]
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match="num_groups"):
        ak.select_branch_points(**meta)
    out = ak.select_branch_points(**meta, num_groups=2)  # shapes only
    assert out.rows.shape == (2, 2) and out.rows.device.type == "meta"
