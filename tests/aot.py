"""Ahead-of-time compilation of Triton kernels for real GPUs, on a machine without one.

The interpreter accepts code that the GPU compiler rejects, so every kernel is also compiled for
sm_80 and sm_90 (``triton.compile`` needs no GPU). Compilation runs in a subprocess because the
test process has ``TRITON_INTERPRET=1``, under which ``@triton.jit`` yields interpreted functions.

``compile_kernels`` returns, per case, the register count, shared memory and LOCAL (spill) bytes
reported by ``cuobjdump -res-usage``, and the set of global-load instructions in the PTX (to see
whether loads are 16-byte vectors, ``ld.global.v4.b32``, or scalar).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

ARCHS = (80, 90)

_WORKER = r"""
import importlib, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
results = []
for case in json.load(sys.stdin):
    kernel = getattr(importlib.import_module(case["module"]), case["kernel"])
    names = list(kernel.arg_names)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in case["divisible"]}
    signature = dict(case["signature"])
    for name in case["constexprs"]:
        signature[name] = "constexpr"
    src = ASTSource(fn=kernel, signature=signature, constexprs=case["constexprs"], attrs=attrs)
    options = {"num_warps": case["num_warps"]}
    compiled = triton.compile(src, target=GPUTarget("cuda", case["arch"], 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True,
                           check=True).stdout
    os.unlink(f.name)
    line = next(l for l in usage.splitlines() if "REG:" in l)
    fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
    loads = sorted(set(re.findall(r"\b(ld\.global[\.\w]*)", compiled.asm["ptx"])))
    results.append({"regs": int(fields["REG"]), "shared": int(fields["SHARED"]),
                    "local": int(fields["LOCAL"]), "loads": loads})
json.dump(results, sys.stdout)
"""


@dataclass
class KernelCase:
    """One kernel specialisation to compile: ``signature`` maps each runtime argument to a
    Triton type string (``*bf16``, ``*fp32``, ``i32``, ``i64``, ...), ``constexprs`` gives the
    compile-time constants, ``divisible`` names the arguments known to be multiples of 16 (what
    the JIT would specialise for aligned pointers, strides and sizes)."""

    module: str
    kernel: str
    signature: dict
    constexprs: dict
    divisible: tuple = ()
    num_warps: int = 4
    arch: int = 90


@dataclass
class CompileResult:
    regs: int
    shared: int
    local: int
    loads: list


def compile_kernels(cases: list[KernelCase]) -> list[CompileResult]:
    """Compiles every case in one subprocess (import and compiler start-up are paid once)."""
    payload = [dict(c.__dict__, divisible=list(c.divisible)) for c in cases]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    if proc.returncode != 0:
        raise AssertionError(f"AOT compilation failed:\n{proc.stderr[-6000:]}")
    return [CompileResult(**r) for r in json.loads(proc.stdout)]
