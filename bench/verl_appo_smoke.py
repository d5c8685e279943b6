"""GPU smoke run of APPO inside verl's own loop: two training steps of ``verl.trainer.main_ppo``
with ``trainer.v1.trainer_mode=appo`` on a tiny random Qwen2 model (FSDP actor, vLLM or SGLang
rollout, one GPU) with the offline tokenizer, add tool and reward of tests/verl_tiny.py.

What the CPU tests cannot run: real rollout replicas woken, generating branch rows from a prefix
and put to sleep, the actor's log-prob pass over branch rows, the update. The run passes when
main_ppo exits 0 and its log shows the branching step's metrics (``appo/branch/points``).

  python bench/verl_appo_smoke.py              # on a GPU machine with verl 0.9.1 and vLLM/SGLang
  python bench/verl_appo_smoke.py --dry-run    # anywhere with verl: write the inputs, compose and
                                               # check the overrides, launch nothing

Without CUDA, verl or an engine it says so and exits 0 (bench/gpu_session.sh runs it).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # verl_tiny: the offline tokenizer and task files

PROMPTS = [  # (question, answer)
    ("Add 2 and 3.", "5"),
    ("Add 4 and 4.", "8"),
    ("Add 1 and 6.", "7"),
    ("Add 5 and 1.", "6"),
]


def missing() -> list[str]:
    """What this machine lacks for the run."""
    lacking = [name for name in ("verl", "pandas") if importlib.util.find_spec(name) is None]
    engines = [name for name in ("vllm", "sglang") if importlib.util.find_spec(name) is not None]
    if not engines:
        lacking.append("vLLM or SGLang")
    import torch

    if not torch.cuda.is_available():
        lacking.append("a CUDA device")
    return lacking


def prepare(folder: Path) -> dict[str, Path]:
    """The model (random weights), tokenizer, tool, reward and data files of the run."""
    import pandas
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from verl_tiny import tiny_tokenizer, write_sources

    tokenizer = tiny_tokenizer()
    model_dir, tokenizer_dir = folder / "model", folder / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)  # the engine reads one next to the weights
    tools, reward = write_sources(folder)
    rows = [
        {
            "data_source": "appo_smoke",
            "prompt": [{"role": "user", "content": f"{question} Use the add tool."}],
            "reward_model": {"ground_truth": answer},
            "extra_info": {"index": index},
        }
        for index, (question, answer) in enumerate(PROMPTS)
    ]
    data = folder / "train.parquet"
    pandas.DataFrame(rows).to_parquet(data)
    return {
        "model": model_dir,
        "tokenizer": tokenizer_dir,
        "tools": tools,
        "reward": reward,
        "data": data,
    }


def overrides(paths: dict[str, Path], engine: str) -> list[str]:
    lines = (HERE.parent / "examples/verl/overrides.txt").read_text().splitlines()
    recipe = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    recipe = [line for line in recipe if not line.startswith("+trainer.v1.appo.budget")]
    return recipe + [
        "+trainer.v1.appo.budget=2",
        f"actor_rollout_ref.model.path={paths['model']}",
        f"actor_rollout_ref.model.tokenizer_path={paths['tokenizer']}",
        f"data.train_files={paths['data']}",
        f"data.val_files={paths['data']}",
        "data.train_batch_size=4",
        "data.max_prompt_length=512",
        "data.max_response_length=256",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4",
        f"actor_rollout_ref.rollout.name={engine}",
        "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.3",
        "actor_rollout_ref.rollout.enforce_eager=true",
        "actor_rollout_ref.rollout.multi_turn.format=hermes",
        "actor_rollout_ref.rollout.multi_turn.max_assistant_turns=3",
        f"actor_rollout_ref.rollout.multi_turn.function_tool_path={paths['tools']}",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        f"reward.custom_reward_function.path={paths['reward']}",
        "reward.custom_reward_function.name=compute_score",
        "trainer.use_v1=true",
        "trainer.n_gpus_per_node=1",
        "trainer.nnodes=1",
        "trainer.total_training_steps=2",
        "trainer.val_before_train=false",
        "trainer.test_freq=-1",
        "trainer.save_freq=-1",
        "trainer.logger=console",
        "trainer.project_name=appo_smoke",
        "trainer.experiment_name=appo_smoke",
    ]


def check(arguments: list[str]) -> None:
    """Composes the overrides with verl's config and runs verl's and APPO's checks."""
    from hydra import compose, initialize_config_module
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from appo.integrations.verl_appo import check_config

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        config = compose(config_name="ppo_trainer", overrides=arguments)
    validate_config(config, need_reference_policy(config), need_critic(config))
    options = check_config(config)
    print(f"overrides compose; verl's validate_config and APPO's check_config pass: {options}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="prepare and check, no launch")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    args = parser.parse_args()
    lacking = missing()
    if args.dry_run:
        lacking = [item for item in lacking if item not in ("vLLM or SGLang", "a CUDA device")]
    if lacking:
        print(f"verl APPO smoke: not run, this machine has no {', '.join(lacking)}")
        return 0
    engine = "sglang" if importlib.util.find_spec("vllm") is None and not args.dry_run else "vllm"
    folder = Path(tempfile.mkdtemp(prefix="appo_verl_smoke_"))
    arguments = overrides(prepare(folder), engine)
    check(arguments)
    if args.dry_run:
        print("dry run: python -m verl.trainer.main_ppo", " ".join(arguments))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "verl_appo_smoke.log"
    path = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    with log.open("w") as sink:
        done = subprocess.run(
            [sys.executable, "-m", "verl.trainer.main_ppo", *arguments],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=1500,
        )
    text = log.read_text(errors="replace")
    points = re.findall(r"appo/branch/points:\s*([0-9.]+)", text)
    print(
        f"verl APPO smoke ({engine}): main_ppo exit status {done.returncode}, branching steps "
        f"logged: {len(points)} (points per step: {points}); log: {log}"
    )
    print("\n".join(text.splitlines()[-15:]))
    return 0 if done.returncode == 0 and points else 1


if __name__ == "__main__":
    sys.exit(main())
