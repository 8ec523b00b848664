#!/usr/bin/env bash
# The one GPU check (under 9 minutes on an H200: give the run a 560 s limit): the kernel
# tests without interpret mode, kernel throughput against the XLA reference, and a DeiT-S
# bfloat16 training step, baseline vs flash-like remat vs mesa, with real peak memory beside
# XLA's plans (plan_vs_real.md): the compile-time analysis of the program that ran, and,
# in the time left, the plan from XLA's description of this GPU compiled as on a CPU machine
# (benchmarks.step_plan), so that every lent GPU checks the planner. The baseline step's
# buffer assignment on this GPU goes to dump_baseline/ (its memory-usage report and live
# ranges: why the real peak differs from the plan). Results go to $OUT (or $1).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh /tmp/gpu   # tiny shapes: a CPU dry run
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-results/gpu}}
mkdir -p "$out"
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
  scale=0.01; batch=4; model=vit-c100; kernels=pallas_interpret; impls="xla pallas_interpret"; repeats=2
  description=h200
else
  scale=1; batch=128; model=deit-s; kernels=pallas; impls="xla pallas"; repeats=20
  case "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)" in
    *H200*) description=h200 ;; *H100*) description=h100 ;; *) description= ;;
  esac
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"; } > "$out/env.txt" 2>&1

if python -c "import pytest" 2>/dev/null; then
  MESA_JAX_TEST_KERNELS=$kernels timeout 150 python -m pytest -v --tb=short -p no:cacheprovider -m "" tests/test_kernels.py \
    > "$out/kernel_tests.txt" 2>&1
  echo "kernel tests: exit $?" >> "$out/kernel_tests.txt"
else
  echo "pytest is not installed here: kernel tests skipped" > "$out/kernel_tests.txt"
fi

timeout 80 python -m benchmarks.kernels --impl $impls --scale $scale --repeats $repeats \
  --json "$out/kernels.json" > "$out/kernels.md" 2>&1

# One method per process (the peak is a process-wide high-water mark); mesa8's step took
# about 100 s to compile on an H200, so it gets the longest limit. The baseline's XLA dumps
# are written outside $out and only the memory files kept (the rest is PTX and LLVM IR).
dump=$(mktemp -d)
for run in baseline:60 flash_like:60 mesa8:170; do
  method=${run%%:*}
  flags=${XLA_FLAGS:-}
  [ $method = baseline ] && flags="$flags --xla_dump_to=$dump --xla_dump_hlo_module_re=.*train_step.*"
  XLA_FLAGS="$flags" timeout ${run##*:} python -m benchmarks.device_step --method $method --model $model \
    --batch $batch > "$out/step_$method.txt" 2>&1
done
mkdir -p "$out/dump_baseline"
cp "$dump"/*train_step*{memory-usage-report,live-range}.txt "$out/dump_baseline/" 2>/dev/null
rm -rf "$dump"

# The description's plan, compiled without using the GPU, in the time left (560 s in all).
left=$((530 - SECONDS))
if [ -n "$description" ] && [ $left -gt 20 ]; then
  timeout $left python -m benchmarks.step_plan --target $description --model $model --batch $batch \
    --methods baseline flash_like mesa8 --json "$out/plan.json" > "$out/plan.md" 2>&1
else
  echo "no description plan: target '$description', ${left}s left" > "$out/plan.md"
fi
python -m benchmarks.step_plan --compare "$out" > "$out/plan_vs_real.md" 2>&1

grep -E "FAILED|ERROR|passed|failed|exit" "$out/kernel_tests.txt" | tail -n 30
cat "$out/kernels.md" "$out"/step_*.txt "$out/plan.md" "$out/plan_vs_real.md"
