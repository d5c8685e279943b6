"""The run folder: ``metrics.jsonl`` (one line per step), ``heldout.jsonl`` (one line per held-out
evaluation), ``reward_entropy.png``, ``trace.md`` (one prompt's rollout tree with every branch
point's entropy H, future value Ω and score), ``summary.json``; and the summary table printed at
the end of a run."""

from __future__ import annotations

import html
import json
import math
import tempfile
from pathlib import Path

from appo.trainer import StepRecord


class RunFolder:
    """A new run's folder. Construct it only once the run can start (model loaded, arguments
    valid): it creates the folder; :meth:`check_path` vets a path beforehand without writing."""

    def __init__(self, path: str | Path):
        self.path = self.check_path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"
        self.metrics_path.open("x").close()  # exclusive: never truncates an earlier run's file
        self.heldout_path = self.path / "heldout.jsonl"
        self.heldout_path.open("x").close()
        self.history: list[dict] = []
        self.evaluations: list[dict] = []

    @staticmethod
    def check_path(path: str | Path) -> Path:
        """``path`` as a ``Path`` if a run folder can be made there: it does not exist yet (and
        its nearest existing ancestor is a writable directory) or it is an empty directory. An
        earlier run's folder, a file, a path below a file or an unwritable place (``/proc``)
        raise ``ValueError``. Nothing is left behind (writability is probed with a temporary
        directory that is removed at once)."""
        path = Path(path)
        try:
            if path.exists():
                if not path.is_dir():
                    raise ValueError(f"run folder {path} exists and is not a directory")
                if any(path.iterdir()):
                    raise ValueError(
                        f"run folder {path} already holds files (an earlier run?); "
                        "give a new or empty folder"
                    )
                probe_in = path
            else:
                probe_in = path.parent
                while not probe_in.exists():
                    probe_in = probe_in.parent
                if not probe_in.is_dir():
                    raise ValueError(f"run folder {path} would be below {probe_in}, a file")
            Path(tempfile.mkdtemp(prefix=".appo-probe-", dir=probe_in)).rmdir()
        except OSError as error:
            raise ValueError(
                f"run folder {path} cannot be created: {error.strerror or error}"
            ) from None
        return path

    def log_step(self, metrics: dict) -> None:
        self.history.append(metrics)
        _append_json(self.metrics_path, metrics)

    def log_eval(self, steps_done: int, result: dict) -> None:
        """One held-out evaluation after ``steps_done`` RL steps (0: before RL)."""
        line = {"steps_done": steps_done, **result}
        self.evaluations.append(line)
        _append_json(self.heldout_path, line)

    def plot(self) -> Path:
        """Top: held-out accuracy at each evaluation, and the training reward of each step's
        initial rollouts with its trailing mean over ``SMOOTHING`` steps; bottom: mean token
        entropy and (when logged) the KL to the policy RL started from."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        done = [m["step"] + 1 for m in self.history]  # RL steps done after each step
        rewards = [m["reward"] for m in self.history]
        top.plot(done, rewards, ".", color="tab:blue", alpha=0.35, label="training reward")
        if rewards:
            smoothed = trailing_mean(rewards, SMOOTHING)
            label = f"training reward, mean of the last {SMOOTHING} steps"
            top.plot(done, smoothed, color="tab:blue", label=label)
        if self.evaluations:
            steps = [e["steps_done"] for e in self.evaluations]
            accuracy = [e["accuracy"] for e in self.evaluations]
            label = f"held-out accuracy ({self.evaluations[0]['questions']} questions, greedy)"
            top.plot(steps, accuracy, "o-", color="tab:green", label=label)
        top.set_ylabel("accuracy / reward")
        top.set_ylim(-0.05, 1.05)
        top.legend(fontsize=8)
        bottom.plot(done, [m["entropy"] for m in self.history], marker="o", color="tab:red")
        bottom.set_ylabel("mean token entropy (nats)", color="tab:red")
        if any("kl_to_start" in m for m in self.history):
            kl = bottom.twinx()
            values = [m.get("kl_to_start", math.nan) for m in self.history]
            kl.plot(done, values, marker="x", color="tab:purple")
            kl.set_ylabel("KL to the start of RL", color="tab:purple")
        bottom.set_xlabel("RL steps done")
        fig.tight_layout()
        out = self.path / "reward_entropy.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out

    def write_trace(
        self, record: StepRecord, tokenizer, step: int, group: int | None = None
    ) -> Path:
        """``trace.md`` of one prompt group of ``record``: by default the first group with a
        branch past the response's first token (else group 0)."""
        if group is None:
            past_start = [record.rollouts[r].group for r, p in record.branch_points if p > 0]
            group = past_start[0] if past_start else 0
        self.path.joinpath("trace.md").write_text(
            rollout_tree_markdown(record, tokenizer, step, group)
        )
        return self.path / "trace.md"

    def write_summary(self, summary: dict) -> None:
        self.path.joinpath("summary.json").write_text(
            json.dumps(summary, indent=2, allow_nan=False, default=_json_number) + "\n"
        )


SMOOTHING = 5  # steps in the plot's trailing mean of the training reward


def trailing_mean(values: list[float], window: int) -> list[float]:
    """The mean of the last ``window`` values (fewer at the start) at each index."""
    return [
        sum(values[max(0, i + 1 - window) : i + 1]) / min(window, i + 1) for i in range(len(values))
    ]


def _append_json(path: Path, line: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(line, allow_nan=False, default=_json_number) + "\n")


def _json_number(value):
    raise TypeError(f"not JSON-serialisable: {value!r}")


def _text(tokenizer, rollout, start: int, end: int) -> str:
    """Response tokens [start, end) as HTML-escaped text with observations in bold."""
    out, i = [], start
    while i < end:
        j = i
        while j < end and rollout.is_observation[j] == rollout.is_observation[i]:
            j += 1
        piece = html.escape(tokenizer.decode(rollout.tokens[i:j])).replace("\n", "⏎")
        out.append(f"<b>{piece}</b>" if rollout.is_observation[i] else piece)
        i = j
    return "".join(out)


def rollout_tree_markdown(record: StepRecord, tokenizer, step: int, group: int = 0) -> str:
    """Markdown of one prompt group: each initial rollout (observations in bold), the branch
    points on it (position, token, H, Ω, score) and each branch's continuation and reward."""
    task = record.tasks[group]
    lines = [
        f"# Rollout tree — step {step}, prompt {group}",
        "",
        f"**Question:** {html.escape(task.prompt)}  ",
        f"**Answer:** {task.answer}",
        "",
        "Observations (tool output, never trained on or branched) are in **bold**; ⏎ is a newline.",
        "",
    ]
    if record.omega:
        lines += [_omega_line(record.omega), ""]
    rows = [i for i, r in enumerate(record.rollouts) if r.group == group and not r.is_branch]
    for row in rows:
        r = record.rollouts[row]
        lines += [
            f"## Rollout {row} — reward {record.rewards[row]:.0f}, {r.tool_calls} tool calls, "
            f"stop: {r.stop}",
            "",
            f"<pre>{_text(tokenizer, r, 0, len(r.tokens))}</pre>",
            "",
        ]
        children = [i for i, b in enumerate(record.rollouts) if b.parent == row]
        if not children:
            continue
        lines += [
            "| branch | position | token | H | Ω | score | reward | continuation |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for i in children:
            b = record.rollouts[i]
            position = b.point
            token = (
                html.escape(tokenizer.decode([r.tokens[position]]))
                .replace("\n", "⏎")
                .replace("|", "\\|")
            )
            stats = [(record.entropy, 3), (record.future_value, 4), (record.score, 3)]
            h, omega, score = (
                "" if s is None else f"{float(s[row, position]):.{digits}f}" for s, digits in stats
            )
            cont = _text(tokenizer, b, b.split, len(b.tokens)).replace("|", "\\|")
            lines.append(
                f"| {i} | {position} | <code>{token}</code> | {h} | {omega} | {score} | "
                f"{record.rewards[i]:.0f} | {cont} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def _omega_line(omega: dict) -> str:
    return (
        "**Ω over this step's sampled tokens** (trainer vs behaviour policy): summed log-ratio "
        f"std {omega['omega_logratio_sum_std']:.4f}, mean |log-ratio| per token "
        f"{omega['logratio_abs_mean']:.4f}; Ω at its lower bound {omega['omega_at_low']:.1%}, "
        f"at its upper bound {omega['omega_at_high']:.1%}."
    )


def summary_table(summary: dict) -> str:
    """A fixed-width two-column table of the run's summary."""

    def show(value):
        if isinstance(value, float):
            return f"{value:.3f}"
        return str(value)

    width = max(len(k) for k in summary)
    rule = "-" * (width + 24)
    body = [f"{key:<{width}}  {show(value)}" for key, value in summary.items()]
    return "\n".join([rule, *body, rule])
