#!/usr/bin/env bash
# Device-time figures: per-kernel times of the fused step, and the benchmark timed as CUDA-graph
# replays (no Python or launch overhead in the numbers). Results go to $OUT (default bench/results).
set -uo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
dev=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
export PYTHONUNBUFFERED=1
for preset in small default large; do
  for dtype in float32 bfloat16; do
    timeout 120 python3 bench/kernel_times.py "$preset" "$dtype"
  done
done 2>&1 | grep -v Warn | tee "$out/kernel-times-$dev.txt"
timeout 400 python3 -m fused_dreamer_loss.bench --cuda-graph --preset small default \
    --dtype float32 bfloat16 --mode fwd+bwd --impl fused eager compiled torchrl \
    --json "$out/bench-graph-$dev.json" --markdown "$out/bench-graph-$dev.md" | grep -v '^|'
cat "$out/bench-graph-$dev.md"
