"""``bench/learning.py`` end to end at a tiny size: every algorithm and seed runs from the seed's
cold-started checkpoint to the token budget, and the PNG, table and JSON are written."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from appo.config import ALGOS
from appo.tasks import all_tasks, demonstration, system_prompt

BENCH = Path(__file__).resolve().parents[1] / "bench" / "learning.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("learning_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_learning_bench_end_to_end(bench, tmp_path, capsys):
    """Two seeds run as two parts (as separate processes would), then tabulated together."""
    for seed in (1, 0):
        out = str(tmp_path / f"part{seed}")
        argv = ["--setting", "tiny", "--seeds", "1", "--first-seed", str(seed), "--out", out]
        assert bench.main([*argv, "--checkpoints", str(tmp_path / "checkpoints")]) == 0
    assert len(list((tmp_path / "checkpoints").glob("*-seed[01].pt"))) == 2
    again = ["--setting", "tiny", "--seeds", "1", "--algos", "grpo", "--out", str(tmp_path / "a")]
    assert bench.main([*again, "--checkpoints", str(tmp_path / "checkpoints")]) == 0  # reused
    parts = [str(tmp_path / f"part{seed}" / "learning_tiny.json") for seed in (1, 0)]
    capsys.readouterr()
    assert bench.main(["--setting", "tiny", "--combine", *parts, "--out", str(tmp_path)]) == 0
    with pytest.raises(SystemExit):  # parts of another setting are refused
        bench.main(["--setting", "cpu", "--combine", parts[0], "--out", str(tmp_path)])
    reused = json.loads((tmp_path / "a" / "learning_tiny.json").read_text())["runs"][0]
    runs = json.loads((tmp_path / "learning_tiny.json").read_text())["runs"]
    assert reused["curve"][0] == runs[0]["curve"][0]  # the same cold-started seed-0 checkpoint
    assert [(r["seed"], r["algo"]) for r in runs] == [(s, a) for s in (0, 1) for a in ALGOS]
    assert sorted((r["algo"], r["seed"]) for r in runs) == sorted(
        (algo, seed) for algo in ALGOS for seed in (0, 1)
    )
    setting = bench.SETTINGS["tiny"]
    for run in runs:
        tokens = [point["tokens"] for point in run["curve"]]
        assert len(tokens) == 1 + setting.evals and tokens == sorted(tokens)
        assert tokens[0] == 0 and tokens[-1] >= setting.budget
        assert run["rl_steps"] >= 1 and 0 <= run["train_tool_calls"]
    for seed in (0, 1):  # every algorithm starts from the same checkpoint
        starts = {json.dumps(r["curve"][0]) for r in runs if r["seed"] == seed}
        assert len(starts) == 1
    assert (tmp_path / "learning_tiny.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "learning_tiny.md").read_text()
    assert all(f"| {algo} | 2 |" in table for algo in ALGOS)
    assert table in capsys.readouterr().out


def test_summary_is_the_mean_and_95_percent_t_interval_over_seeds(bench):
    def run(seed, accuracy):
        curve = [
            {"tokens": 0, "accuracy": 0.25, "tool_calls": 1.0},
            {"tokens": 100 + seed, "accuracy": accuracy, "tool_calls": 2.0 + seed},
        ]
        return {
            "algo": "grpo",
            "seed": seed,
            "curve": curve,
            "train_tool_calls": 1.5,
            "rl_steps": 4,
            "wall_s": 1.0,
        }

    table = bench.summarise([run(0, 0.5), run(1, 0.7)])["grpo"]
    # two seeds: sample std 0.1 * sqrt(2), t(0.975, 1 dof) = 12.706, half-width t * s / sqrt(2)
    assert table["final"] == pytest.approx((0.6, 12.706 * 0.1))
    assert table["gain"] == pytest.approx((0.35, 12.706 * 0.1))
    assert table["eval_tool_calls"] == pytest.approx((2.5, 12.706 * 0.5))
    assert table["curve"][1]["tokens"] == pytest.approx(100.5)


def test_task_tokenizer_round_trips_every_task_text(bench):
    tokenizer = bench.task_tokenizer()
    texts = [system_prompt()] + [t.prompt + "\n" + demonstration(t) for t in all_tasks()]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == text
