#!/usr/bin/env bash
# The one GPU check (under 8 minutes on an H200): the kernel tests without interpret
# mode, kernel throughput against the XLA reference, and a DeiT-S bfloat16 training
# step, baseline vs mesa, with real peak memory. Results go to $OUT (or $1).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh /tmp/gpu   # tiny shapes: a CPU dry run
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-results/gpu}}
mkdir -p "$out"
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
  scale=0.01; batch=4; model=vit-c100; kernels=pallas_interpret; impls="xla pallas_interpret"; repeats=2
else
  scale=1; batch=128; model=deit-s; kernels=pallas; impls="xla pallas"; repeats=20
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python -c "import jax; print('jax', jax.__version__, jax.devices())"; } > "$out/env.txt" 2>&1

if python -c "import pytest" 2>/dev/null; then
  MESA_JAX_TEST_KERNELS=$kernels timeout 240 python -m pytest -q -p no:cacheprovider -m "" tests/test_kernels.py \
    > "$out/kernel_tests.txt" 2>&1
  echo "kernel tests: exit $?" >> "$out/kernel_tests.txt"
else
  echo "pytest is not installed here: kernel tests skipped" > "$out/kernel_tests.txt"
fi

timeout 150 python -m benchmarks.kernels --impl $impls --scale $scale --repeats $repeats \
  --json "$out/kernels.json" > "$out/kernels.md" 2>&1

for method in baseline mesa8; do
  timeout 100 python -m benchmarks.device_step --method $method --model $model --batch $batch \
    --json "$out/step_$method.json" > "$out/step_$method.txt" 2>&1
done
timeout 150 python -m benchmarks.speed --model $model --batch $batch --dtype bfloat16 \
  --methods baseline mesa8 --repeats 5 --steps 3 > "$out/speed.md" 2>&1

tail -n 3 "$out/kernel_tests.txt"; cat "$out/kernels.md" "$out/speed.md" "$out"/step_*.txt
