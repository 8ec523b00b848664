#!/usr/bin/env bash
# The one GPU check (about 9 minutes: give the run a 560 s limit): the kernel tests without
# interpret mode, kernel throughput against the XLA reference, and a DeiT-S bfloat16 training
# step per method (baseline, flash-like, block remat, mesa8 on XLA and with the Pallas
# kernels, mesa8 under block remat): real step time, compile time and real peak beside the
# compile-time analysis of the program that ran (plan_vs_real.md; compare with the H100/H200
# description's plan, python -m benchmarks.step_plan, made on any machine). The baseline
# step's buffer assignment on this GPU goes to dump_baseline/ (why its real peak differs from
# the plan), mesa8's device memory profile to mesa8_memory.prof. Results go to $OUT (or $1).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh /tmp/gpu   # tiny shapes: a CPU dry run
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-results/gpu}}
mkdir -p "$out"
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
  scale=0.01; batch=4; model=vit-c100; kernels=triton-interpret; backends="xla triton-interpret"; repeats=2
else
  scale=1; batch=128; model=deit-s; kernels=triton; backends="xla triton"; repeats=20
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"; } > "$out/env.txt" 2>&1

if python -c "import pytest" 2>/dev/null; then
  MESA_JAX_TEST_KERNELS=$kernels timeout 100 python -m pytest -v --tb=short -p no:cacheprovider -m "" tests/test_kernels.py \
    > "$out/kernel_tests.txt" 2>&1
  echo "kernel tests: exit $?" >> "$out/kernel_tests.txt"
else
  echo "pytest is not installed here: kernel tests skipped" > "$out/kernel_tests.txt"
fi

timeout 40 python -m benchmarks.kernels --backend $backends --scale $scale --repeats $repeats \
  --json "$out/kernels.json" > "$out/kernels.md" 2>&1

# One method per process (the peak is a process-wide high-water mark): the baseline, what a
# user would pick instead of mesa (flash-like attention remat, block remat), and mesa8 on the
# XLA path (the default), with the Pallas kernels, and under block remat. The baseline's XLA
# dumps are written outside $out and only the memory files kept (the rest is PTX and LLVM
# IR); mesa8's device memory profile (pprof) goes to $out. The description's plan of the
# same steps is made on any machine (python -m benchmarks.step_plan --target h100), not here.
dump=$(mktemp -d)
for run in baseline:45 flash_like:45 remat_nothing:50 mesa8:70 mesa8_pallas:90 mesa8_remat:70; do
  name=${run%%:*}; method=${name%_pallas}
  flags=${XLA_FLAGS:-}; extra=()
  [ $name = baseline ] && flags="$flags --xla_dump_to=$dump --xla_dump_hlo_module_re=.*train_step.*"
  [ $name = mesa8 ] && extra=(--memory-profile "$out/mesa8_memory.prof")
  backend=xla; [ $name = mesa8_pallas ] && backend=$kernels
  XLA_FLAGS="$flags" timeout ${run##*:} python -m benchmarks.device_step --method $method --backend $backend \
    --model $model --batch $batch "${extra[@]}" > "$out/step_$name.txt" 2>&1
done
mkdir -p "$out/dump_baseline"
cp "$dump"/*train_step*{memory-usage-report,live-range}.txt "$out/dump_baseline/" 2>/dev/null
rm -rf "$dump"
python -m benchmarks.step_plan --compare "$out" > "$out/plan_vs_real.md" 2>&1

grep -E "FAILED|ERROR|passed|failed|exit" "$out/kernel_tests.txt" | tail -n 30
cat "$out/kernels.md" "$out"/step_*.txt "$out/plan_vs_real.md"
