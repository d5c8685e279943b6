"""The host side of the ops (docs/design.md, sections 2 and 10.2): the direct eager path to each
op's implementation computes what the ``torch.library`` custom op computes, values and gradients;
``torch.compile``, fake tensors, meta tensors, dispatch modes and autocast still go through the
custom op; every public call checks each argument once, composites included; and the token-id
range check can be turned off."""

import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from utils import CustomOpCalls, assert_rejects

import appo_kernels as ak
from appo_kernels import validation
from appo_kernels.token_stats import token_stats_forward

B, T, V, H = 2, 6, 11, 5


def spy_on_custom_ops(monkeypatch, fail: bool = False) -> list[str]:
    """Wraps the custom op of every ``EagerCustomOp`` of the package: returns the list that the
    names of the ops called through the dispatcher are appended to (``fail``: such a call raises
    instead)."""
    called = []
    for module in list(sys.modules.values()):
        if module is None or not module.__name__.startswith("appo_kernels."):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, ak._ops.EagerCustomOp):

                def spy(*args, _op=value.op, _name=value.name):
                    if fail:
                        raise AssertionError(f"{_name} was called through the dispatcher")
                    called.append(_name.split("::")[1])
                    return _op(*args)

                monkeypatch.setattr(value, "op", spy)
    return called


def _inputs(gen):
    logits = torch.randn(B, T, V, generator=gen)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    tokens[0, 1] = -100
    behavior = -torch.rand(B, T, generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.2
    return logits, tokens, behavior, mask


def _every_op(gen):
    """(name, call) of every public op on small inputs; each call returns a tuple of tensors."""
    logits, tokens, behavior, mask = _inputs(gen)
    hidden, head = torch.randn(B, T, H, generator=gen), torch.randn(V, H, generator=gen)
    score = torch.randn(B, T, generator=gen)
    groups = torch.tensor([0, 0])
    return [
        ("token_stats", lambda: tuple(ak.token_stats(logits, tokens, temperature=0.7))),
        ("linear_token_stats", lambda: tuple(ak.linear_token_stats(hidden, head, tokens))),
        ("branching_score", lambda: tuple(ak.branching_score(logits, tokens, behavior, mask))),
        ("future_value", lambda: (ak.future_value(behavior, behavior * 0.9, mask),)),
        ("discounted_future_sum", lambda: (ak.discounted_future_sum(behavior, mask, gamma=0.9),)),
        ("select_branch_points", lambda: tuple(ak.select_branch_points(score, mask, groups, 3))),
    ]


@pytest.mark.parametrize("case", [name for name, _ in _every_op(torch.Generator())])
def test_direct_path_equals_the_custom_op(backend, gen, case):
    call = dict(_every_op(gen))[case]
    with CustomOpCalls() as calls:
        through_op = call()
    assert calls.names, "the dispatch mode must route the call through the custom op"
    direct = call()
    for a, b in zip(direct, through_op, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_eager_calls_do_not_enter_the_dispatcher(gen, monkeypatch):
    """In plain eager mode the implementations run directly: the custom ops are never called
    (here they would raise)."""
    spy_on_custom_ops(monkeypatch, fail=True)
    for _, call in _every_op(gen):
        call()
    logits = torch.randn(4, V, generator=gen, requires_grad=True)  # and with autograd
    tokens = torch.randint(0, V, (4,), generator=gen)
    ak.token_stats(logits, tokens).logprob.sum().backward()
    assert logits.grad is not None


@pytest.mark.parametrize("op", ["token_stats", "linear_token_stats"])
def test_direct_autograd_equals_the_custom_op(backend, gen, op):
    logits, tokens, _, _ = _inputs(gen)
    hidden, head = torch.randn(B, T, H, generator=gen), torch.randn(V, H, generator=gen)
    weights = torch.randn(2, B, T, generator=gen)

    def grads():
        if op == "token_stats":
            leaves = [logits.clone().requires_grad_()]
            logprob, entropy = ak.token_stats(leaves[0], tokens, temperature=1.3)
        else:
            leaves = [hidden.clone().requires_grad_(), head.clone().requires_grad_()]
            logprob, entropy = ak.linear_token_stats(*leaves, tokens)
        ((logprob * weights[0]).sum() + (entropy * weights[1]).sum()).backward()
        return [leaf.grad for leaf in leaves]

    with CustomOpCalls() as calls:
        through_op = grads()
    assert f"{op}_bwd" in calls.names
    for a, b in zip(grads(), through_op, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compile_records_the_custom_ops(gen):
    """``torch.compile(fullgraph=True)`` traces the custom ops themselves, not their insides."""
    logits, tokens, behavior, mask = _inputs(gen)
    targets = []

    def recording_backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    def f(logits, tokens, behavior, mask):
        stats = ak.token_stats(logits, tokens)
        return ak.branching_score(logits, tokens, behavior, mask).score, stats.entropy

    compiled = torch.compile(f, fullgraph=True, backend=recording_backend)
    for a, b in zip(compiled(logits, tokens, behavior, mask), f(logits, tokens, behavior, mask)):
        torch.testing.assert_close(a, b)
    assert "appo_kernels.token_stats_fwd.default" in targets
    assert "appo_kernels.branching_score_from_stats.default" in targets


def test_fake_and_meta_tensors_use_the_fakes(gen, monkeypatch):
    called = spy_on_custom_ops(monkeypatch)
    logits, tokens, behavior, mask = _inputs(gen)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (logits, tokens, behavior, mask)]
        out = ak.branching_score(*fake)
        assert out.score.shape == (B, T) and out.score.dtype == torch.float32
    meta = [t.to("meta") for t in (logits, tokens)]
    stats = ak.token_stats(*meta)
    assert stats.logprob.device.type == "meta" and stats.entropy.shape == (B, T)
    assert called == ["token_stats_fwd", "branching_score_from_stats", "token_stats_fwd"]


def test_autocast_takes_the_direct_path_with_the_same_result(gen, monkeypatch):
    """No op registers an autocast rule (the dispatcher would pass autocast calls through
    unchanged), so calls inside ``torch.autocast`` stay on the direct path and give what the
    custom op gives there; ``linear_token_stats`` casts its inputs itself."""
    for name in torch._C._dispatch_get_all_op_names():
        if name.startswith("appo_kernels::"):
            for key in ("AutocastCPU", "AutocastCUDA"):
                assert not torch._C._dispatch_has_kernel_for_dispatch_key(name, key), (name, key)
    logits, tokens, _, _ = _inputs(gen)
    hidden, head = torch.randn(B, T, H, generator=gen), torch.randn(V, H, generator=gen)

    def calls():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return [*ak.token_stats(logits, tokens), *ak.linear_token_stats(hidden, head, tokens)]

    with CustomOpCalls():
        through_op = calls()
    called = spy_on_custom_ops(monkeypatch)
    for a, b in zip(calls(), through_op, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert called == []


def test_each_argument_is_checked_once(gen, monkeypatch):
    """One public call checks each tensor argument once, composites included (branching_score
    used to check its logits three times: itself, through token_stats and through
    branching_score_from_stats)."""
    checked = []
    check_tensor = validation.check_tensor

    def recording(name, x):
        checked.append(name)
        return check_tensor(name, x)

    monkeypatch.setattr(validation, "check_tensor", recording)
    logits, tokens, behavior, mask = _inputs(gen)
    calls = {
        "branching_score": (
            lambda: ak.branching_score(logits, tokens, behavior, mask),
            ["logits", "behavior_logprob", "mask", "tokens"],
        ),
        "branching_score_from_stats": (
            lambda: ak.branching_score_from_stats(behavior.abs(), behavior, behavior, mask),
            ["logprob", "behavior_logprob", "mask", "entropy"],
        ),
        "token_stats": (lambda: ak.token_stats(logits, tokens), ["logits", "tokens"]),
    }
    for name, (call, expected) in calls.items():
        checked.clear()
        call()
        assert sorted(checked) == sorted(expected), (name, checked)


def test_composite_bad_input_names_the_argument(gen):
    logits, tokens, behavior, mask = _inputs(gen)
    f = ak.branching_score
    assert_rejects(ValueError, "logits", f, logits[..., :0], tokens, behavior, mask)
    assert_rejects(ValueError, "tokens", f, logits, tokens[:, :-1], behavior, mask)
    assert_rejects(ValueError, "tokens", f, logits, tokens.to("meta"), behavior, mask)
    assert_rejects(ValueError, "tokens", f, logits, tokens.clamp(min=0) - 1, behavior, mask)
    assert_rejects(TypeError, "tokens", f, logits, tokens.tolist(), behavior, mask)
    assert_rejects(TypeError, "ignore_index", f, logits, tokens, behavior, mask, ignore_index=None)
    assert_rejects(
        ValueError, "ignore_index", f, logits, tokens, behavior, mask, ignore_index=2**63
    )
    assert_rejects(TypeError, "temperature", f, logits, tokens, behavior, mask, temperature="1")
    assert_rejects(ValueError, "clip", f, logits, tokens, behavior, mask, clip=-0.1)


def test_range_check_message_is_the_same_on_every_path(backend, gen):
    """The PyTorch path on CPU leaves the range check to the nll_loss it runs (its bounds check
    raises first); the kernels check first. Either way the error is the range check's ValueError
    naming the first bad id, with nothing chained to it."""
    logits, tokens, behavior, mask = _inputs(gen)
    hidden, head = torch.randn(B, T, H, generator=gen), torch.randn(V, H, generator=gen)
    bad = tokens.clone()
    bad[1, 2], bad[1, 4] = V + 2, -7
    message = rf"^tokens must hold ids in \[0, {V}\) or ignore_index=-100, got {V + 2}$"
    calls = {
        "token_stats": lambda: ak.token_stats(logits, bad),
        "token_stats_forward": lambda: token_stats_forward(logits, bad),
        "linear_token_stats": lambda: ak.linear_token_stats(hidden, head, bad),
        "branching_score": lambda: ak.branching_score(logits, bad, behavior, mask),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=message) as error:
            call()
        assert error.value.__context__ is None and error.value.__cause__ is None, name


def test_parameters_take_the_direct_path(gen, monkeypatch):
    """An LM head's weight is a ``torch.nn.Parameter``: ``linear_token_stats`` on it still runs
    the implementation directly, with the custom op's values and gradients."""
    _, tokens, _, _ = _inputs(gen)
    hidden = torch.randn(B, T, H, generator=gen)
    head = torch.randn(V, H, generator=gen)

    def run():
        leaves = [hidden.clone().requires_grad_(), torch.nn.Parameter(head.clone())]
        logprob, entropy = ak.linear_token_stats(*leaves, tokens)
        (logprob.sum() + 0.5 * entropy.sum()).backward()
        return [logprob, entropy, *(leaf.grad for leaf in leaves)]

    with CustomOpCalls() as calls:
        through_op = run()
    assert "linear_token_stats_bwd" in calls.names
    called = spy_on_custom_ops(monkeypatch)
    for a, b in zip(run(), through_op, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert called == []


def test_range_check_with_ignore_index_inside_the_vocabulary():
    ids = torch.tensor([0, 3, 10], dtype=torch.uint8)
    validation.check_index_range("tokens", ids, 11, ignore_index=3)
    with pytest.raises(ValueError, match=r"tokens must hold ids in \[0, 11\).*got 11"):
        validation.check_index_range("tokens", torch.tensor([3, 11]), 11, ignore_index=3)
    with pytest.raises(ValueError, match="got -100"):  # -100 is not the ignore_index here
        validation.check_index_range("tokens", torch.tensor([3, -100]), 11, ignore_index=3)
    with pytest.raises(ValueError, match="got 200"):  # uint8 200 is not -100 wrapped around
        validation.check_index_range("tokens", torch.tensor([200], dtype=torch.uint8), 11, -100)


def test_token_id_checks_off(backend, gen):
    logits, tokens, behavior, mask = _inputs(gen)
    bad = tokens.clone()
    bad[1, 2] = V + 4
    hidden, head = torch.randn(B, T, H, generator=gen), torch.randn(V, H, generator=gen)
    with pytest.raises(ValueError, match="tokens"):
        ak.token_stats(logits, bad)
    grads = []
    for ids in (tokens, bad):
        with ak.token_id_checks(False):
            leaf = logits.clone().requires_grad_()
            stats = ak.token_stats(leaf, ids)
            (stats.logprob.nan_to_num(0.0).sum() + stats.entropy.sum()).backward()
            grads.append(leaf.grad)
            scores = ak.branching_score(logits, ids, behavior, mask)
            linear = ak.linear_token_stats(hidden, head, ids)
        assert validation.token_id_checks_enabled()  # restored on exit
    good = ak.token_stats(logits, tokens)
    assert stats.logprob[1, 2].isnan() and linear.logprob[1, 2].isnan()
    assert scores.logprob[1, 2].isnan()  # and the NaN stays in its row
    torch.testing.assert_close(
        scores.score[0], ak.branching_score(logits, tokens, behavior, mask).score[0]
    )
    others = torch.ones(B, T, dtype=torch.bool)
    others[1, 2] = False
    torch.testing.assert_close(stats.logprob[others], good.logprob[others])
    torch.testing.assert_close(stats.entropy, good.entropy)  # the entropy ignores the id
    assert grads[1].isfinite().all()  # the kernels stay in bounds in the backward pass too
    torch.testing.assert_close(grads[1][others], grads[0][others])


def test_token_id_checks_nest_and_validate():
    with ak.token_id_checks(False):
        with ak.token_id_checks(True):
            assert validation.token_id_checks_enabled()
        assert not validation.token_id_checks_enabled()
    assert validation.token_id_checks_enabled()
    with pytest.raises(TypeError, match="enabled"):
        with ak.token_id_checks(0):
            pass


def test_token_id_checks_environment_variable():
    code = (
        "import torch, appo_kernels as ak\n"
        "print(ak.token_stats(torch.zeros(1, 4), torch.tensor([9])).logprob.isnan().item())"
    )
    env = dict(os.environ, APPO_KERNELS_CHECK_TOKEN_IDS="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]
