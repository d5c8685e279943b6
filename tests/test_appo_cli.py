"""``appo-train``: a run folder end to end on a tiny model; every bad argument refused with one
line before the model loads; an earlier run's folder never touched; Ctrl-C finishing the folder."""

import json

import pytest
import torch

import appo.model
from appo.cli import main
from appo.model import tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    model, tokenizer = tiny_model(seed=2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _args(model_dir, out, *extra):
    return [
        "--model",
        str(model_dir),
        "--steps",
        "2",
        "--n",
        "2",
        "--b",
        "1",
        "--prompts-per-step",
        "1",
        "--cold-start-steps",
        "1",
        "--max-new-tokens",
        "6",
        "--eval-prompts",
        "2",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--out",
        str(out),
        *extra,
    ]


@pytest.mark.parametrize("algo", ["appo", "arpo", "random"])
def test_cli_writes_run_folder(algo, model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = _args(model_dir, out, "--algo", algo, "--steps", "3", "--eval-every", "2")
    assert main(argv + ["--eval-raw"]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert all(m["kl_to_start"] >= 0 for m in metrics)
    evaluations = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    assert [e["steps_done"] for e in evaluations] == [0, 2, 3]  # before RL, every 2, the end
    assert all(e["questions"] == 2 for e in evaluations)
    assert (out / "reward_entropy.png").read_bytes()[:4] == b"\x89PNG"
    trace = (out / "trace.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    before, after = evaluations[0]["accuracy"], evaluations[-1]["accuracy"]
    assert summary["heldout_accuracy_before_after"] == f"{before:.3f} -> {after:.3f} (2 questions)"
    assert "heldout_accuracy_raw" in summary and "interrupted_after_steps" not in summary
    if algo != "arpo":  # arpo branches only after tool results, which this tiny model rarely writes
        assert summary["branches"] == 3 and summary["fork_reused_prefix_tokens"] > 0
        assert "| branch | position | token | H | Ω | score |" in trace
    assert "Rollout tree" in trace
    assert "heldout_accuracy_before_after" in capsys.readouterr().out


def test_trace_is_of_the_latest_step_with_a_branch_past_the_first_token(tmp_path):
    from appo.cli import _Run
    from appo.trainer import StepRecord

    run = _Run(None, None, None, {}, 0.0)
    records = [StepRecord([], [], [], branch_points=points) for points in ([(0, 3)], [], [(1, 2)])]
    for step, record in enumerate(records):
        run.keep_record(record, step)
    assert run.record is records[2] and run.record_step == 2
    run.keep_record(StepRecord([], [], [], branch_points=[]), 3)  # none past the start: kept 2
    assert run.record is records[2]
    first = _Run(None, None, None, {}, 0.0)
    first.keep_record(StepRecord([], [], [], branch_points=[]), 0)
    first.keep_record(StepRecord([], [], [], branch_points=[]), 1)
    assert first.record_step == 1  # the latest while no step has one


def _bad_arguments(tmp_path, model_dir):
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage.gguf").write_bytes(b"\x00junk" * 20)
    earlier = tmp_path / "earlier-run"
    earlier.mkdir()
    (earlier / "metrics.jsonl").write_text('{"step": 0}\n')
    model = ["--model", str(model_dir)]
    cases = {
        "missing model": (["--model", str(tmp_path / "nope")], "does not exist"),
        "text file model": (["--model", str(tmp_path / "notes.txt")], ".gguf"),
        "empty directory model": (["--model", str(tmp_path / "empty")], "config.json"),
        "garbage gguf": (["--model", str(tmp_path / "garbage.gguf")], "not a GGUF file"),
        "bogus device": (model + ["--device", "bogus"], "--device"),
        "negative threads": (model + ["--threads", "-1"], "--threads"),
        "negative lr": (model + ["--lr", "-1"], "lr must be a finite number > 0"),
        "nan lr": (model + ["--lr", "nan"], "lr must be a finite number > 0"),
        "zero steps": (model + ["--steps", "0"], "--steps"),
        "text as int": (model + ["--n", "four"], "expected int"),
        "out under /proc": (model + ["--out", "/proc/appo-run"], "cannot be created"),
        "out on a file": (model + ["--out", str(tmp_path / "notes.txt")], "not a directory"),
        "out below a file": (model + ["--out", str(tmp_path / "notes.txt" / "run")], "a file"),
        "out an earlier run": (model + ["--out", str(earlier)], "already holds files"),
    }
    if not torch.cuda.is_available():
        cases["cuda without CUDA"] = (model + ["--device", "cuda"], "no CUDA device")
    return cases


def test_bad_arguments_give_one_line_before_the_model_loads(
    tmp_path, model_dir, monkeypatch, capsys
):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(appo.model, "load_model", no_loading)
    for name, (argv, message) in _bad_arguments(tmp_path, model_dir).items():
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, name
        assert err.count("\n") == 1 and err.startswith("appo-train: error:"), (name, err)
        assert message in err, (name, err)
    assert (tmp_path / "earlier-run" / "metrics.jsonl").read_text() == '{"step": 0}\n'
    assert sorted(p.name for p in (tmp_path / "earlier-run").iterdir()) == ["metrics.jsonl"]


def test_a_model_that_fails_to_load_leaves_no_run_folder(tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    out = tmp_path / "run"
    assert main(_args(broken, out)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot load the model" in err
    assert not out.exists()


def test_ctrl_c_finishes_the_run_folder_and_exits_130(model_dir, tmp_path, monkeypatch, capsys):
    from appo.trainer import Trainer

    real_step, calls = Trainer.step, []

    def step_then_interrupt(self, tasks):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_step(self, tasks)

    monkeypatch.setattr(Trainer, "step", step_then_interrupt)
    out = tmp_path / "run"
    assert main(_args(model_dir, out, "--steps", "5")) == 130
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("appo-train:")] == [
        f"appo-train: interrupted after 1 of 5 RL steps; {out} holds what was done"
    ]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted_after_steps"] == 1 and summary["reward_first_step"] >= 0
    assert "heldout_accuracy_after_rl" not in summary
    assert (out / "reward_entropy.png").read_bytes()[:4] == b"\x89PNG"
    assert "Rollout tree — step 0" in (out / "trace.md").read_text()


def test_default_run_folders_never_collide(tmp_path):
    from appo.cli import default_run_path

    first = default_run_path(tmp_path)
    first.mkdir()
    second = default_run_path(tmp_path)
    assert second != first and second.parent == tmp_path
