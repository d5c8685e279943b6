"""``bench/default_run.py`` end to end on a tiny model: two seeds of ``appo-train`` as
subprocesses (two at once), their before / after table from each run's own summary."""

import importlib
import json
from pathlib import Path

import pytest

from appo.model import tiny_model

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCH))
        yield importlib.import_module("default_run")


def test_default_run_bench_tabulates_each_seed(bench, tmp_path, capsys):
    model_dir = tmp_path / "model"
    model, tokenizer = tiny_model(seed=2)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    flags = ["--model", str(model_dir), "--steps", "1", "--n", "2", "--b", "1"]
    flags += ["--prompts-per-step", "1", "--cold-start-steps", "1", "--max-new-tokens", "6"]
    flags += ["--eval-prompts", "3", "--device", "cpu"]
    runs, out = tmp_path / "runs", tmp_path / "results"
    argv = ["--seeds", "2", "--parallel", "2", "--name", "t", "--runs", str(runs)]
    assert bench.main([*argv, "--out", str(out), "--", *flags]) == 0
    saved = json.loads((out / "default_run_t.json").read_text())
    assert saved["extra"] == flags and [r["seed"] for r in saved["runs"]] == [0, 1]
    for run in saved["runs"]:
        summary = json.loads((runs / "t" / f"seed{run['seed']}" / "summary.json").read_text())
        assert run["before"] == summary["heldout_accuracy_before_rl"]
        assert run["after"] == summary["heldout_accuracy_after_rl"]
        assert run["questions"] == 3 and run["change"] == run["after"] - run["before"]
    table = (out / "default_run_t.md").read_text()
    assert "| 0 |" in table and "| 1 |" in table and "of 2 seeds" in table
    assert table in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exists"):  # an earlier run's folders are never reused
        bench.main([*argv, "--out", str(out), "--", *flags])
