"""APPO and the kernels inside other trainers.

- ``appo.integrations.verl``: verl plug-in (policy losses, advantage estimator, ``use_kernels``,
  ``select_branches``); needs ``pip install 'appo-kernels[verl]'``.
- ``appo.integrations.verl_appo``: verl plug-in of its own (trainer mode ``appo``, agent loops
  ``appo_tool_agent`` and ``appo_branch``, ``build_branch_rows``); the same install.
- ``appo.integrations.trl``: ``KernelGRPOTrainer``; needs ``pip install 'appo-kernels[trl]'``.
- ``appo.integrations.trl_appo``: ``APPOConfig`` / ``APPOTrainer``, APPO as a
  ``trl.GRPOTrainer`` subclass (docs/design.md, section 17); the same extra.

Each module imports its trainer package and fails with one clear ``ImportError`` without it.
"""
