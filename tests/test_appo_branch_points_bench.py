"""``bench/branch_points.py`` end to end at a tiny size: every rule branches the same initial
rollouts, and the table, plot and JSON are written; the tool-call token flags."""

import importlib
import json
import math
from pathlib import Path

import pytest

from appo.branching import RULES
from appo.model import char_tokenizer

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCH))
        yield importlib.import_module("branch_points")


def test_branch_points_bench_end_to_end(bench, tmp_path, capsys):
    assert bench.main(["--setting", "tiny", "--seeds", "2", "--out", str(tmp_path)]) == 0
    seeds = json.loads((tmp_path / "branch_points_tiny.json").read_text())["seeds"]
    setting = bench.SETTINGS["tiny"]
    assert [s["seed"] for s in seeds] == [0, 1]
    for seed in seeds:
        assert set(seed["rules"]) == set(RULES)
        for rule, row in seed["rules"].items():
            if rule == "arpo":  # only groups whose rollouts reached a tool result branch
                assert row["points"] <= setting.prompts * setting.budget
            else:
                assert row["points"] == setting.prompts * setting.budget
            assert len(row["positions"]) == row["points"]
            assert all(position > 0 for position in row["positions"])
            if not row["points"]:
                continue
            for key in ("reward_changed", "informative_points", "on_tool_call"):
                assert 0.0 <= row[key] <= 1.0, (rule, key)
            if rule == "arpo":  # by its definition, always the first candidate after a result
                assert row["after_tool_result"] == 1.0
    table = (tmp_path / "branch_points_tiny.md").read_text()
    assert all(f"| {rule} |" in table for rule in RULES)
    assert table in capsys.readouterr().out
    assert (tmp_path / "branch_points_tiny.png").read_bytes()[:4] == b"\x89PNG"


def test_tool_call_tokens_are_the_ones_inside_a_call(bench):
    tokenizer = char_tokenizer()
    text = "I <lookup>pear</lookup><out>7</out>\n<calc>2*7</calc><out>14</out> <answer>14"
    ids = tokenizer.encode(text, add_special_tokens=False)
    flags = bench.call_token_flags(tokenizer, ids)
    inside = [text[i] for i, flag in enumerate(flags) if flag]
    assert "".join(inside) == "<lookup>pear</lookup><calc>2*7</calc>"


def test_interval_is_the_t_interval(bench):
    mean, half = bench.interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert bench.interval([5.0]) == (5.0, 0.0)
