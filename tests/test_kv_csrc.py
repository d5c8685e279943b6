"""The KV-cache CUDA sources (csrc/): compiled here with nvcc for sm_80 / sm_90 (no GPU needed),
the torch binding syntax-checked with g++, and -- only where the extension ``appo_kernels._C`` is
built and a GPU exists -- the kernels compared with the PyTorch fallback bit for bit."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from appo_kernels.kv import ops

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
NVCC = shutil.which("nvcc")


def _cuda_include() -> Path | None:
    roots = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    if NVCC:
        roots.append(str(Path(os.path.realpath(NVCC)).parent.parent))
    for root in filter(None, roots):
        if (Path(root) / "include" / "cuda_runtime_api.h").exists():
            return Path(root) / "include"
    return None


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{output}"
    return output


def test_csrc_has_sources():
    assert CU_FILES and list(CSRC.glob("*.cpp")) and list(CSRC.glob("*.h"))


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")
@pytest.mark.parametrize("arch", [80, 90])
def test_cu_compiles_cleanly_without_spills(arch, tmp_path):
    """Every .cu compiles with warnings as errors; no kernel spills to local memory; the aligned
    instantiations use 16-byte vector loads."""
    triton_bin = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin"
    for cu in CU_FILES:
        obj = tmp_path / f"{cu.stem}.o"
        ptx = tmp_path / f"{cu.stem}.ptx"
        flags = [
            f"-arch=sm_{arch}",
            "-std=c++17",
            "-O3",
            "-Werror",
            "all-warnings",
            "-Xcompiler",
            "-Wall,-Wextra",
            str(cu),
        ]
        output = _run([NVCC, *flags, "-c", "-o", str(obj)])
        assert "warning" not in output.lower(), output
        _run([NVCC, *flags, "-ptx", "-o", str(ptx)])
        assert re.search(r"ld\.global(\.nc)?\.v4\.", ptx.read_text()), "no 16-byte vector loads"
        usage = _run([str(triton_bin / "cuobjdump"), "-res-usage", str(obj)])
        kernels = re.findall(r"LOCAL:(\d+)", usage)
        assert kernels and all(int(n) == 0 for n in kernels), usage


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed on this machine")
def test_binding_cpp_syntax(tmp_path):
    """The torch binding parses and type-checks against this torch's headers (-fsyntax-only).

    The CPU wheel of torch ships the c10/cuda headers but not the CMake-generated
    ``c10/cuda/impl/cuda_cmake_macros.h``; a one-line stand-in (the shared-library build's
    setting) goes in tmp_path. The CUDA runtime headers come from the local CUDA toolkit."""
    from torch.utils.cpp_extension import include_paths

    cuda_include = _cuda_include()
    if cuda_include is None:
        pytest.skip("no CUDA toolkit headers (cuda_runtime_api.h) on this machine")
    macros = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    macros.parent.mkdir(parents=True)
    macros.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    system = [
        arg for p in [*include_paths(), str(tmp_path), str(cuda_include)] for arg in ("-isystem", p)
    ]
    for cpp in sorted(CSRC.glob("*.cpp")):
        output = _run(
            ["g++", "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", *system, str(cpp)]
        )
        assert "warning" not in output.lower(), output


# ------------------------------------------------------------------------------------------------
# On a CUDA machine with the extension built: kernels == fallback, bit for bit.
# ------------------------------------------------------------------------------------------------
needs_extension = pytest.mark.skipif(
    not (ops.HAS_EXTENSION and torch.cuda.is_available()),
    reason="runs only where the CUDA extension appo_kernels._C is built and a GPU is present "
    "(pip install -e . on a CUDA machine); here the fallback is what runs",
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _random(shape, dtype, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype).cuda()


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 36])  # 36: the scalar (non-vector) path in fp16
def test_extension_matches_fallback(dtype, head_dim, gen):
    layers, blocks, block_size, heads = 3, 20, 16, 4
    kv = _random((layers, 2, blocks, block_size, heads, head_dim), dtype, gen)
    perm = torch.randperm(blocks, generator=gen).cuda()

    for num_tokens in (1, 7, block_size):
        src, dst = perm[:5], perm[5:10]
        expected = kv.clone()
        ops.copy_block_prefix_torch(expected, src, dst, num_tokens)
        ops.copy_block_prefix(kv, src, dst, num_tokens)
        assert torch.equal(kv.view(torch.uint8), expected.view(torch.uint8))

    key_cache, value_cache = kv[1, 0], kv[1, 1]
    slots = torch.randperm(blocks * block_size, generator=gen)[:37].cuda()
    wide = _random((37, heads, head_dim + 8), dtype, gen)  # strided rows
    key, value = wide[..., :head_dim], _random((37, heads, head_dim), dtype, gen)
    exp_k, exp_v = key_cache.clone(), value_cache.clone()
    ops.write_slots_torch(exp_k, exp_v, key, value, slots)
    ops.write_slots(key_cache, value_cache, key, value, slots)
    assert torch.equal(key_cache.view(torch.uint8), exp_k.view(torch.uint8))
    assert torch.equal(value_cache.view(torch.uint8), exp_v.view(torch.uint8))

    lengths = torch.tensor([0, 5, 16, 33, 70], dtype=torch.int64).cuda()
    table = torch.randint(0, blocks, (5, 6), generator=gen, dtype=torch.int32).cuda()
    got = ops.gather_padded(key_cache, value_cache, table, lengths, 70)
    want = ops.gather_padded_torch(key_cache, value_cache, table, lengths, 70)
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.equal(g.view(torch.uint8), w.view(torch.uint8))
