"""APPO trainer layer: tools and tasks of the agent, procedure-level advantages, the policy loss,
and (in other modules) the branching rollout engine and the training loop built on
``appo_kernels``. Import the submodule you need, e.g. ``from appo.loss import policy_loss``.
"""
