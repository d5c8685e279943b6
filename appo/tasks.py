"""Shopping-arithmetic tasks that need several tool calls: look up one or two unit prices, then
compute with them. Answers are exact integers.

Four kinds of question (the ideal calls in brackets):

* ``one_item``   "What do 4 pears cost?"                          [lookup, calc]
* ``two_items``  "What do 3 apples and 2 pears cost?"             [lookup, lookup, calc]
* ``change``     "I buy 3 pens and pay with 10 dollars. How much change do I get?"  [lookup, calc]
* ``difference`` "How much more does one mango cost than one kiwi?"  [lookup, lookup, calc]

Train and held-out splits are disjoint by *item combination*: every (kind, set of items) pair
belongs to one split, chosen by a stable hash, so held-out questions combine items in ways that
training never showed. ``make_tasks`` is deterministic in ``(seed, n, split)``.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

from appo.tools import ITEM_PHRASES, PRICES, extract_answer, run_tool_call

SPLITS = ("train", "heldout")
KINDS = ("one_item", "two_items", "change", "difference")
HELDOUT_EVERY = 5  # about one item combination in five is held out

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Task:
    """One question, its exact answer and the ideal tool calls ``(tool, argument)`` in order."""

    prompt: str
    answer: str
    steps: tuple[tuple[str, str], ...]
    kind: str
    items: tuple[str, ...]

    @property
    def split(self) -> str:
        return split_of(self.kind, self.items)


def split_of(kind: str, items: tuple[str, ...]) -> str:
    """The split an item combination belongs to (a stable hash, independent of item order)."""
    key = f"{kind}:{'+'.join(sorted(items))}".encode()
    return "heldout" if int(hashlib.sha256(key).hexdigest(), 16) % HELDOUT_EVERY == 0 else "train"


def _singular(item: str) -> str:
    return ITEM_PHRASES[item][0]


def _plural(item: str) -> str:
    return ITEM_PHRASES[item][1]


def _task(kind: str, items: tuple[str, ...], prompt: str, expression: str, answer: int) -> Task:
    steps = tuple(("lookup", item) for item in items) + (("calc", expression),)
    return Task(prompt=prompt, answer=str(answer), steps=steps, kind=kind, items=items)


def _one_item() -> list[Task]:
    return [
        _task(
            "one_item", (x,), f"What do {a} {_plural(x)} cost?", f"{a}*{PRICES[x]}", a * PRICES[x]
        )
        for x in PRICES
        for a in range(2, 10)
    ]


def _two_items() -> list[Task]:
    return [
        _task(
            "two_items",
            (x, y),
            f"What do {a} {_plural(x)} and {b} {_plural(y)} cost?",
            f"{a}*{PRICES[x]}+{b}*{PRICES[y]}",
            a * PRICES[x] + b * PRICES[y],
        )
        for x, y in itertools.permutations(PRICES, 2)
        for a in range(2, 6)
        for b in range(2, 6)
    ]


def _change() -> list[Task]:
    tasks = []
    for x in PRICES:
        for a in range(2, 7):
            cost = a * PRICES[x]
            for paid in (10 * (cost // 10 + 1), 10 * (cost // 10 + 2)):
                tasks.append(
                    _task(
                        "change",
                        (x,),
                        f"I buy {a} {_plural(x)} and pay with {paid} dollars. "
                        "How much change do I get?",
                        f"{paid}-{a}*{PRICES[x]}",
                        paid - cost,
                    )
                )
    return tasks


def _difference() -> list[Task]:
    return [
        _task(
            "difference",
            (x, y),
            f"How much more does one {_singular(x)} cost than one {_singular(y)}?",
            f"{PRICES[x]}-{PRICES[y]}",
            PRICES[x] - PRICES[y],
        )
        for x, y in itertools.permutations(PRICES, 2)
        if PRICES[x] > PRICES[y]
    ]


@functools.cache
def _pools() -> dict[tuple[str, str], tuple[Task, ...]]:
    """Every question, by (split, kind)."""
    builders = {
        "one_item": _one_item,
        "two_items": _two_items,
        "change": _change,
        "difference": _difference,
    }
    pools: dict[tuple[str, str], list[Task]] = {(s, k): [] for s in SPLITS for k in KINDS}
    for kind in KINDS:
        for task in builders[kind]():
            pools[(task.split, kind)].append(task)
    return {key: tuple(tasks) for key, tasks in pools.items()}


def all_tasks() -> tuple[Task, ...]:
    """Every question of both splits (a few thousand), e.g. to build a task vocabulary."""
    return tuple(task for pool in _pools().values() for task in pool)


def make_tasks(seed: int, n: int, split: str = "train") -> list[Task]:
    """``n`` tasks of ``split`` ("train" or "heldout"): the first ``n`` of
    :func:`task_stream` ``(seed, split)``, so deterministic in ``(seed, split)`` and a prefix of
    any longer list of the same seed and split."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return list(itertools.islice(task_stream(seed, split), n))


def task_stream(seed: int, split: str = "train") -> Iterator[Task]:
    """An endless stream of tasks of ``split``, deterministic in ``(seed, split)``, built one at a
    time (a long run never holds its tasks in memory).

    Each task's kind is drawn uniformly; within a kind, questions are drawn without replacement
    until that kind's pool is used up (then the pool is reshuffled).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return _stream(seed, split)


def _stream(seed: int, split: str) -> Iterator[Task]:
    rng = random.Random(f"appo-tasks:{split}:{seed}")
    pools = {kind: _pools()[(split, kind)] for kind in KINDS}
    kinds = [kind for kind in KINDS if pools[kind]]
    queues: dict[str, list[Task]] = {kind: [] for kind in kinds}
    while True:
        kind = rng.choice(kinds)
        if not queues[kind]:
            queues[kind] = rng.sample(pools[kind], len(pools[kind]))
        yield queues[kind].pop()


def reward(task: Task, response_text: str) -> float:
    """1.0 when the response's first ``<answer>`` is a number equal to the task's answer (a
    leading ``$`` and thousands commas are allowed), else 0.0. There is no format reward."""
    answer = extract_answer(response_text)
    if answer is None:
        return 0.0
    answer = answer.replace(",", "").removeprefix("$").strip()
    if not _NUMBER.fullmatch(answer):
        return 0.0
    return (
        1.0 if math.isclose(float(answer), float(task.answer), rel_tol=0.0, abs_tol=1e-9) else 0.0
    )


def demonstration(task: Task) -> str:
    """The ideal response: each call followed by its true observation, one step per line, then the
    answer. Exactly what a rollout produces when the model writes the calls and the answer."""
    lines = []
    for tool, argument in task.steps:
        call = f"<{tool}>{argument}</{tool}>"
        lines.append(call + run_tool_call(call))
    lines.append(f"<answer>{task.answer}</answer>")
    return "\n".join(lines)


_EXAMPLE = _task(
    "two_items",
    ("lemon", "cup"),
    "What do 2 lemons and 3 cups cost?",
    f"2*{PRICES['lemon']}+3*{PRICES['cup']}",
    2 * PRICES["lemon"] + 3 * PRICES["cup"],
)


def system_prompt() -> str:
    """A short instruction with one worked example, for the system turn of a chat template."""
    return (
        "Answer the shopping question with tools. Get the price of one item with "
        "<lookup>item</lookup> and compute with <calc>expression</calc>; each result comes back "
        "as <out>...</out>. End with <answer>number</answer>.\n\n"
        f"Example question: {_EXAMPLE.prompt}\n{demonstration(_EXAMPLE)}"
    )
