"""appo-kernels: fused kernels for APPO's compute (token statistics, branching scores,
branch-point selection) with a PyTorch path of the same math for CPU tensors.

Every op runs on CUDA tensors through Triton kernels and on CPU tensors through PyTorch;
``APPO_KERNELS_BACKEND=triton|torch`` forces one. The ops are ``torch.library`` custom ops, so
``torch.compile`` and CUDA graphs capture them. docs/design.md describes the math, the kernels and
the bad-input rules.
"""

from appo_kernels.branching_score import BranchingScore, branching_score, branching_score_from_stats
from appo_kernels.discounted_future_sum import discounted_future_sum
from appo_kernels.future_value import future_value
from appo_kernels.linear_token_stats import linear_token_stats
from appo_kernels.select_branch_points import BranchPoints, select_branch_points
from appo_kernels.token_stats import TokenStats, token_stats
from appo_kernels.validation import token_id_checks

__version__ = "0.1.0"

__all__ = [
    "TokenStats",
    "token_stats",
    "linear_token_stats",
    "discounted_future_sum",
    "future_value",
    "BranchingScore",
    "branching_score",
    "branching_score_from_stats",
    "BranchPoints",
    "select_branch_points",
    "token_id_checks",
]
