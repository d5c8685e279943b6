"""Tasks: deterministic by seed, disjoint splits, and demonstrations that earn reward 1.0 when
their calls are replayed through the real tools."""

import time

import pytest

from appo.tasks import (
    KINDS,
    Task,
    demonstration,
    make_tasks,
    reward,
    split_of,
    system_prompt,
    task_stream,
)
from appo.tools import CALL_CLOSE_TAGS, PRICES, extract_answer, parse_tool_call, run_tool_call


def replay(response: str) -> str:
    """Re-run a response the way a rollout does: cut after every call, append the tool's own
    observation, and continue with the model's text after the observation it quoted."""
    produced = ""
    rest = response
    while True:
        ends = [rest.find(tag) + len(tag) for tag in CALL_CLOSE_TAGS if tag in rest]
        if not ends:
            return produced + rest
        cut = min(ends)
        produced += rest[:cut]
        observation = run_tool_call(produced)
        assert rest[cut:].startswith(observation), (rest[cut:], observation)
        produced += observation
        rest = rest[cut + len(observation) :]


def test_make_tasks_is_deterministic_and_seed_dependent():
    assert make_tasks(3, 50) == make_tasks(3, 50)
    assert make_tasks(3, 50, "heldout") == make_tasks(3, 50, "heldout")
    assert make_tasks(3, 50) != make_tasks(4, 50)
    assert make_tasks(3, 0) == []


def test_splits_are_disjoint_by_item_combination():
    train, heldout = make_tasks(0, 2000), make_tasks(0, 500, "heldout")
    assert all(t.split == "train" for t in train) and all(t.split == "heldout" for t in heldout)
    combos = lambda tasks: {(t.kind, frozenset(t.items)) for t in tasks}  # noqa: E731
    assert not combos(train) & combos(heldout)
    assert not {t.prompt for t in train} & {t.prompt for t in heldout}
    assert {t.kind for t in train} == {t.kind for t in heldout} == set(KINDS)
    # the split of a combination does not depend on item order
    assert split_of("two_items", ("apple", "pear")) == split_of("two_items", ("pear", "apple"))


def test_tasks_need_several_calls_and_have_small_integer_answers():
    for task in make_tasks(1, 300) + make_tasks(1, 100, "heldout"):
        tools = [tool for tool, _ in task.steps]
        assert tools[-1] == "calc" and tools[:-1] == ["lookup"] * len(task.items)
        assert len(task.steps) >= 2
        assert int(task.answer) >= 0 and str(int(task.answer)) == task.answer
        assert all(item in PRICES for item in task.items)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_demonstrations_replay_to_reward_one(split):
    for task in make_tasks(7, 200, split):
        response = demonstration(task)
        assert replay(response) == response
        assert reward(task, response) == 1.0
        assert extract_answer(response) == task.answer


def test_answers_are_independent_of_the_demonstration():
    """The expected answer is recomputed from the price table and the question's numbers."""
    for task in make_tasks(2, 200):
        prices = [PRICES[item] for item in task.items]
        counts = [int(w) for w in task.prompt.replace("?", " ").split() if w.isdigit()]
        if task.kind == "one_item":
            expected = counts[0] * prices[0]
        elif task.kind == "two_items":
            expected = counts[0] * prices[0] + counts[1] * prices[1]
        elif task.kind == "change":
            expected = counts[1] - counts[0] * prices[0]
        else:
            expected = prices[0] - prices[1]
        assert int(task.answer) == expected, task


def test_reward_checks_the_answer_numerically():
    task = Task(
        prompt="q", answer="26", steps=(("calc", "3*4+2*7"),), kind="one_item", items=("apple",)
    )
    assert reward(task, "<answer>26</answer>") == 1.0
    assert reward(task, "<answer> 26.0 </answer>") == 1.0
    assert reward(task, "<answer>$26</answer>") == 1.0
    assert reward(task, "<answer>25</answer>") == 0.0
    assert reward(task, "<answer>26 dollars or 27</answer>") == 0.0
    assert reward(task, "<answer>nan</answer>") == 0.0
    assert reward(task, "26") == 0.0
    assert reward(task, "<answer>26") == 0.0
    assert reward(task, "<answer>25</answer><answer>26</answer>") == 0.0


def test_system_prompt_shows_the_format_with_a_correct_example():
    prompt = system_prompt()
    for tag in ("<lookup>", "<calc>", "<out>", "<answer>"):
        assert tag in prompt
    example = prompt[prompt.index("Example question:") :].split("\n", 1)[1]
    assert parse_tool_call(example[: example.index("</lookup>") + len("</lookup>")]) is not None
    assert replay(example) == example
    assert extract_answer(example) is not None


def test_make_tasks_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        make_tasks(0, 3, "test")
    with pytest.raises(ValueError, match="n"):
        make_tasks(0, -1)
    with pytest.raises(TypeError, match="seed"):
        make_tasks("0", 3)
    with pytest.raises(TypeError, match="n"):
        make_tasks(0, 2.5)


def test_task_stream_is_lazy_and_make_tasks_is_its_prefix():
    stream = task_stream(4, "heldout")
    first = [next(stream) for _ in range(50)]
    assert first == make_tasks(4, 50, "heldout")
    assert make_tasks(4, 20, "heldout") == first[:20]
    with pytest.raises(ValueError, match="split"):
        task_stream(0, "test")
    with pytest.raises(TypeError, match="seed"):
        task_stream(0.5)


@pytest.mark.parametrize(
    "text",
    [
        "<answer>" * 20_000,
        "<answer>" + "1" * 200_000 + "</answer>",
        "<answer>" + "1," * 100_000 + ".5</answer>",
        "<answer>" + "-" * 200_000 + "</answer>",
    ],
    ids=["open-tags", "digits", "commas", "signs"],
)
def test_reward_is_linear_in_hostile_output(text):
    task = make_tasks(0, 1)[0]
    started = time.perf_counter()
    assert reward(task, text) == 0.0
    assert time.perf_counter() - started < 0.25
