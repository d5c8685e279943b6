"""``bench/overhead.py`` end to end at a tiny size: every op is timed against its eager formula
(after the bench has checked that both give the same result), and the training-step table of the
token-id range check is written."""

import importlib
import re
from pathlib import Path

import torch


def test_overhead_bench_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("APPO_KERNELS_BACKEND", raising=False)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    bench = importlib.import_module("overhead")
    threads = torch.get_num_threads()
    out = tmp_path / "overhead.md"
    argv = ["--repeats", "3", "--calls", "2", "--step", "--step-rows", "32", "--step-hidden",
            "16", "--step-vocab", "64", "--out", str(out)]  # fmt: skip
    rows = bench.main(argv)
    assert torch.get_num_threads() == threads  # the bench's one thread is not left behind
    names = [case.name for case in bench.cases(torch.device("cpu"))]
    assert [r["op"] for r in rows] == names
    for op in ("token_stats", "branching_score", "linear_token_stats", "select_branch_points"):
        assert op in names
    for r in rows:
        assert r["op_us"] > 0 and r["eager_us"] > 0
        assert abs(r["ratio"] - r["op_us"] / r["eager_us"]) < 1e-9
    table = out.read_text()
    assert table in capsys.readouterr().out
    for r in rows:
        assert re.search(rf"\| {re.escape(r['op'])} \| .* \| {r['ratio']:.2f} \|", table)
    step_table = table.split("## Token-id range check")[1].splitlines()
    steps = [line.split(" | ")[0] for line in step_table if line.startswith(("| LM", "| lin"))]
    assert steps == ["| LM head + token_stats", "| linear_token_stats"]


def test_eager_formulas_are_the_ops(monkeypatch):
    """The bench's equality checks can fail: an op that computed something else is caught."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    bench = importlib.import_module("overhead")
    case = next(c for c in bench.cases(torch.device("cpu")) if c.name == "branching_score")
    case.same(case.op(), case.eager())
    wrong = list(case.op())
    wrong[3] = wrong[3] * 1.01  # future values 1% off
    try:
        case.same(tuple(wrong), case.eager())
    except AssertionError:
        return
    raise AssertionError("a 1% error in the future value went unnoticed")
