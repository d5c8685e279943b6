#!/usr/bin/env bash
# APPO inside verl 0.9.1's own loop (FSDP actor, vLLM rollout), one node with GPUs: trainer mode
# `appo` (verl's sync trainer plus APPO's branching step), agent loop `appo_tool_agent`, the APPO
# loss and the procedure-level estimator.
#   pip install 'appo-kernels[verl]' 'verl[vllm]==0.9.1'      # a verl environment, not next to [train]
#   MODEL=Qwen/Qwen2.5-7B-Instruct TRAIN=train.parquet VAL=test.parquet bash examples/verl/run_appo.sh
# TRAIN / VAL: verl RL parquet files (prompt messages, data_source, reward_model.ground_truth);
# TOOLS: a verl function-tool file (default: calculator_tools.py); REWARD: a reward function file
# with compute_score (default: verl's rule-based scores by data_source).
# Every line of overrides.txt is passed to verl's trainer; extra arguments are appended, so any
# verl override can be changed on the command line (e.g. +trainer.v1.appo.budget=2).
# APPO_VERL_KERNELS=1 makes every verl process compute log-probs and entropies with appo_kernels.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
mapfile -t appo < <(grep -v -e '^#' -e '^$' "$here/overrides.txt")
reward=()
if [[ -n "${REWARD:-}" ]]; then
  reward=(reward.custom_reward_function.path="$REWARD" reward.custom_reward_function.name=compute_score)
fi
APPO_VERL_KERNELS=1 python -m verl.trainer.main_ppo \
    "${appo[@]}" \
    "${reward[@]}" \
    data.train_files="${TRAIN:?set TRAIN to a parquet file of prompts}" \
    data.val_files="${VAL:?set VAL to a parquet file of prompts}" \
    data.train_batch_size=64 \
    data.max_prompt_length=1024 \
    data.max_response_length=2048 \
    actor_rollout_ref.model.path="${MODEL:-Qwen/Qwen2.5-7B-Instruct}" \
    actor_rollout_ref.actor.ppo_mini_batch_size=16 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2 \
    actor_rollout_ref.actor.use_fused_kernels=true \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n=8 \
    actor_rollout_ref.rollout.multi_turn.format=hermes \
    actor_rollout_ref.rollout.multi_turn.max_assistant_turns=8 \
    actor_rollout_ref.rollout.multi_turn.function_tool_path="${TOOLS:-$here/calculator_tools.py}" \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4 \
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4 \
    trainer.use_v1=true \
    trainer.n_gpus_per_node="${N_GPUS:-8}" \
    trainer.nnodes=1 \
    trainer.total_epochs=1 \
    trainer.logger=console \
    "$@"
