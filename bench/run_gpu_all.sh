#!/usr/bin/env bash
# Everything the README's results come from, in one call of under 10 minutes on an H100: the test
# suite with the compiled kernels (V1 and V3), then the benchmarks, most important first: the V3
# tables timed as CUDA-graph replays; torchrl's DreamerV3 learner as torchrl's defaults run it
# (compiled, CUDA-graph captured) with its world-model loss and ours; the host time of the loss
# calls; the behaviour objective's graph tables; the V1 graph tables; the tables launched from
# Python (forward-only rows too); the train-step workloads (V1, then V3); the learner eager and
# compiled; per-kernel times and the tile sweep. Each step has a timeout, and all of them together stay within BUDGET_S seconds (default
# 560): a step that would start too late is reported as not run. JSON, Markdown, PNG and logs go to
# the folder given as first argument (default $OUT if set, else bench/results), named after the
# device.
#
#   bash bench/run_gpu_all.sh [FOLDER]             # from anywhere in the checkout
#   bash bench/run_gpu_all.sh --dry-run [FOLDER]   # print the commands, run nothing
#
# Without internet: the packages the machine lacks (tensordict, torchrl) are installed from the
# wheels in ./.whl when it exists (`bash bench/wheels.sh --torchrl` fetches them where
# there is internet). Where only a few files can come back from the machine, pass a scratch folder
# and archive it: bash bench/run_gpu_all.sh /tmp/r; tar -czf "$OUT/results.tar.gz" -C /tmp/r .
set -uo pipefail
dry=0
if [[ ${1:-} == --dry-run ]]; then
  dry=1
  shift
fi
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-${OUT:-$root/bench/results}}")
cd "$root"
budget=${BUDGET_S:-560}
export PYTHONUNBUFFERED=1
failed=()
tables=()
declare -A written=()

# step LIMIT FILE CMD...: CMD within LIMIT seconds (fewer when less of the budget is left), its
# output in $out/FILE (appended after the first step that writes it) and on the screen less the
# table rows (the tables are printed at the end).
step() {
  local limit=$1 file=$out/$2
  shift 2
  if ((dry)); then
    echo "timeout -k 10 $limit $(printf '%q ' "$@")"
    return
  fi
  local left=$((budget - SECONDS))
  if ((left < 20)); then
    failed+=("$*: not run, ${SECONDS} s of the ${budget} s budget spent")
    return
  fi
  ((limit > left)) && limit=$left
  [[ -v written[$file] ]] || : >"$file"
  written[$file]=1
  echo "== $* (at most $limit s)"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$file" | grep -v '^|'
  local rc=${PIPESTATUS[0]}
  if ((rc == 124 || rc == 137)); then
    failed+=("$*: stopped at its $limit s limit")
  elif ((rc != 0)); then
    failed+=("$*: exit status $rc")
  fi
}

# bench NAME LIMIT ARGS...: the benchmark CLI with ARGS, writing NAME-<device>.{json,md,png,log}.
bench() {
  local name=$1 limit=$2
  shift 2
  step "$limit" "$name-$dev.log" python3 -m fused_dreamer_loss.bench "$@" \
    --json "$out/$name-$dev.json" --markdown "$out/$name-$dev.md" --plot "$out/$name-$dev.png"
  tables+=("$out/$name-$dev.md")
}

if ((dry)); then
  dev=DEVICE
else
  mkdir -p "$out"
  dev=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))") || exit 1
fi
if [[ -d .whl ]]; then
  step 60 "setup-$dev.log" python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
# The console script next to python3, as the README's install makes it (the README test runs it).
step 60 "setup-$dev.log" python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .

step 200 "tests-$dev.log" python3 -m pytest -q -rs -n 8 -p no:cacheprovider tests

all=(--dtype float32 bfloat16 --impl fused eager compiled torchrl)
v3=(--loss v3 --preset v3 v3-r2 v3-large)
v1=(--preset small default large)
bench bench-v3-graph 120 "${v3[@]}" "${all[@]}" --cuda-graph --mode fwd+bwd
# torchrl's DreamerV3 learner as torchrl's defaults run it on CUDA (compiled, CUDA-graph captured),
# with its world-model loss and ours; then the host time of a loss call.
learner=(--workload learner --loss v3 --preset v3 --dtype float32 --impl torchrl fused)
bench learner-graph 180 "${learner[@]}" --cuda-graph
bench host 60 --workload host
# The behaviour objective (returns, scale, actor, critic, replay value) as CUDA-graph replays.
bench bench-behavior-graph 60 --loss v3-behavior --preset behavior behavior-large \
  --dtype float32 --impl fused eager torchrl --cuda-graph --mode fwd+bwd
bench bench-graph 120 "${v1[@]}" "${all[@]}" --cuda-graph --mode fwd+bwd
bench bench-v3 120 "${v3[@]}" "${all[@]}"
bench bench 120 "${v1[@]}" "${all[@]}"
bench train-step 60 --workload train-step --preset small default --dtype float32 bfloat16 \
  --impl fused eager
bench train-step-v3 90 --workload train-step --loss v3 --preset v3 --dtype float32 bfloat16 \
  --impl fused eager torchrl
bench learner 180 "${learner[@]}"
for preset in small default large; do
  for dtype in float32 bfloat16; do
    step 20 "kernel-times-$dev.txt" python3 bench/kernel_times.py "$preset" "$dtype"
  done
done
step 90 "sweep-$dev.txt" python3 bench/sweep.py

((dry)) && exit 0
for table in "${tables[@]}"; do
  [[ -f $table ]] && cat "$table"
done
if ((${#failed[@]})); then
  printf 'failed: %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "All steps passed in $SECONDS s; results in $out"
