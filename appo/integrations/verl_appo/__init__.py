"""APPO inside verl's own training loop (verl 0.9.1; docs/design.md section 18).

verl loads this package on ``import verl`` through its own ``verl.plugins`` entry point
(``appo_trainer``), apart from ``appo.integrations.verl``'s (``appo``): a failure here never takes
the losses and the estimator down. Importing it registers

- the agent loops ``appo_tool_agent`` (``ToolAgentLoop`` that records what a branch needs to
  resume) and ``appo_branch`` (continues a rollout from a split inside a turn);
- the trainer mode ``appo`` (``PPOTrainerSync`` with APPO's branching step).

A user sets ``trainer.v1.trainer_mode=appo``, ``+trainer.v1.appo.budget=4``,
``actor_rollout_ref.rollout.agent.default_agent_loop=appo_tool_agent``,
``actor_rollout_ref.rollout.calculate_log_probs=true`` and ``algorithm.adv_estimator=appo``
(``examples/verl/``).
"""

from appo.integrations.verl_appo.agent_loops import APPOBranchAgentLoop, APPOToolAgentLoop
from appo.integrations.verl_appo.branch_rows import build_branch_rows
from appo.integrations.verl_appo.trainer import APPOTrainer, APPOTrainerOptions, check_config

__all__ = [
    "APPOBranchAgentLoop",
    "APPOToolAgentLoop",
    "APPOTrainer",
    "APPOTrainerOptions",
    "build_branch_rows",
    "check_config",
]
