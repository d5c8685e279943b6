"""The examples in the public docstrings run and print what they say, on both backends."""

import doctest
import importlib
import pkgutil

import appo_kernels
import appo_kernels as ak

# Ops whose docstrings follow the NumPy layout with an Example section.
DOCUMENTED = [
    ak.discounted_future_sum,
    ak.future_value,
    ak.branching_score,
    ak.branching_score_from_stats,
    ak.select_branch_points,
]
SECTIONS = ("Parameters\n", "Returns\n", "Notes\n", "Example\n", ">>> ")


def test_public_ops_have_numpy_docstrings_with_examples():
    for op in DOCUMENTED:
        missing = [s.strip() for s in SECTIONS if s not in op.__doc__]
        assert not missing, f"{op.__name__}: no {missing}"


def test_examples_run(backend):
    attempted = 0
    for info in pkgutil.walk_packages(appo_kernels.__path__, "appo_kernels."):
        module = importlib.import_module(info.name)
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0, f"{info.name}: {result.failed} example(s) failed"
        attempted += result.attempted
    assert attempted >= 4 * len(DOCUMENTED)
