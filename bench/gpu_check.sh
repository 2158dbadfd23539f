#!/usr/bin/env bash
# Everything that can run on a CUDA machine, in one command (under 8 minutes on one H200):
#   1. one block step's sampler memory, torch.cuda.max_memory_allocated against the README's formula at the
#      released shape, and float32 parity of the core on CUDA against the core on CPU, TF32 off and on
#      (bench/device_checks.py);
#   2. the hub-path tests against the local fake hub (tests/test_hub_ids.py), where vLLM is importable;
#   3. the core's parity, NELBO, sampler and scoring tests with CUDA as the default device;
#   4. bench/bench_core.py on CUDA in float32 and bfloat16 (and on the CPU, for scale);
#   5. the lm-eval adapter on the bundled tasks, CUDA against the CPU (bench/gpu_lm_eval.py);
#   6. the vLLM tests and bench/bench_vllm.py, only where a CUDA build of vLLM is importable.
# It prints what ran, what was skipped and why, and exits non-zero if anything that ran failed.
#
#     bash bench/gpu_check.sh            # PYTHON=... to pick the interpreter (default: python3)
#     bash bench/gpu_check.sh --device cpu   # dry run: steps 1 and 2 on CPU (2 without its engine test)
#
# The machine needs torch with CUDA, transformers, safetensors and tokenizers. pytest and lm-eval's model API
# may come from runs/gpu_deps (made by bench/gpu_deps.sh on a machine that has the project's .venv).
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -d runs/gpu_deps ] && export PYTHONPATH=$PYTHONPATH:$PWD/runs/gpu_deps
export PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false
ran=() skipped=() failed=()

step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2; shift 2
    echo; echo "=== $name"; local start=$SECONDS
    if timeout "$limit" "$@"; then ran+=("$name ($((SECONDS - start)) s)")
    else failed+=("$name (exit $?, $((SECONDS - start)) s)"); fi
}
skip() { echo; echo "=== $1: skipped ($2)"; skipped+=("$1: $2"); }

device=cuda
if [ "${1:-}" = "--device" ]; then device=${2:?--device needs cpu or cuda}; fi
case $device in cpu|cuda) ;; *) echo "--device must be cpu or cuda, not $device"; exit 2;; esac

echo "=== machine"
if ! "$py" - "$device" <<'PY'
import platform, sys, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
if sys.argv[1] == "cpu":
    print("dry run on the CPU: the CUDA-only steps are skipped")
    raise SystemExit
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(f"device: {torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} visible")
PY
then echo "no usable CUDA: nothing to check"; exit 2; fi

step "sampler step memory vs formula ($device)" 120 "$py" bench/device_checks.py memory --device "$device"
step "float32 parity core on $device vs core on cpu" 180 "$py" bench/device_checks.py parity --device "$device"

if ! "$py" -c "import pytest" 2>/dev/null; then
    skip "hub path against the fake hub" "pytest is not importable (run bench/gpu_deps.sh where .venv exists)"
elif why=$("$py" -c "import vllm" 2>&1); then
    hub_filter=()
    [ "$device" = cpu ] && hub_filter=(-m "not engine")  # the dry run starts no engine
    step "hub path against the fake hub" 300 "$py" -m pytest -q -p no:cacheprovider "${hub_filter[@]}" tests/test_hub_ids.py
else skip "hub path against the fake hub" "vllm is not importable: $(echo "$why" | tail -1)"; fi

if [ "$device" = cpu ]; then
    skip "core tests, bench_core, lm-eval adapter and vllm backend on cuda" "dry run on the CPU"
    skip_cuda=1
else skip_cuda=0; fi

if [ $skip_cuda = 0 ]; then
    core_tests=$(ls tests/test_model.py tests/test_masks.py tests/test_noise.py tests/test_nelbo.py tests/test_sampling.py \
        tests/test_generate.py tests/test_scoring.py tests/test_checkpoint.py tests/test_estimators.py \
        tests/test_trajectory.py 2>/dev/null)
    if "$py" -c "import pytest" 2>/dev/null; then
        step "core tests on cuda" 240 env BD3_TEST_DEVICE=cuda "$py" -m pytest -q -p no:cacheprovider $core_tests
    else skip "core tests on cuda" "pytest is not importable (run bench/gpu_deps.sh where .venv exists)"; fi

    step "bench_core cuda float32" 90 "$py" bench/bench_core.py --device cuda --dtype float32
    step "bench_core cuda bfloat16" 90 "$py" bench/bench_core.py --device cuda --dtype bfloat16
    step "bench_core cpu float32" 120 "$py" bench/bench_core.py --device cpu --dtype float32 --repeats 1

    if "$py" -c "import lm_eval.api.model" 2>/dev/null; then
        step "lm-eval adapter cuda float32 vs cpu" 150 "$py" bench/gpu_lm_eval.py --device cuda --limit 64
        step "lm-eval adapter cuda bfloat16 vs cpu" 150 "$py" bench/gpu_lm_eval.py --device cuda --dtype bfloat16 --limit 32
    else skip "lm-eval adapter" "lm_eval is not importable (run bench/gpu_deps.sh where .venv exists)"; fi

    why=$("$py" - 2>&1 <<'PY'
import torch
try:
    import vllm
except Exception as err:
    raise SystemExit(f"vllm is not importable: {type(err).__name__}: {err}")
from vllm.platforms import current_platform
if not current_platform.is_cuda():
    raise SystemExit(f"vllm {vllm.__version__} is not a CUDA build (platform {current_platform.device_type})")
PY
    )
    if [ -z "$why" ]; then
        step "vllm backend tests on cuda" 300 "$py" -m pytest -q -p no:cacheprovider tests/test_vllm_backend.py
        step "bench_vllm on cuda" 600 "$py" bench/bench_vllm.py --threads 8
    else skip "vllm backend" "$(echo "$why" | tail -1)"; fi
fi

echo; echo "=== summary"
for s in "${ran[@]}"; do echo "ran:     $s"; done
for s in "${skipped[@]}"; do echo "skipped: $s"; done
for s in "${failed[@]}"; do echo "FAILED:  $s"; done
[ ${#failed[@]} -eq 0 ]
