#!/usr/bin/env bash
# The suite with compiled kernels, the tile/warps sweep and the train-step benchmark.
set -uo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
dev=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
export PYTHONUNBUFFERED=1
timeout 240 python3 -m pytest -q -n 8 -p no:cacheprovider tests 2>&1 | tee "$out/tests-$dev.log" | tail -3
timeout 150 python3 bench/sweep.py 2>&1 | grep -v Warn | tee "$out/sweep-$dev.txt"
timeout 150 python3 -m fused_dreamer_loss.bench --workload train-step --preset small default \
    --dtype float32 bfloat16 --impl fused eager \
    --json "$out/train-step-$dev.json" --markdown "$out/train-step-$dev.md" | grep -v '^|'
cat "$out/train-step-$dev.md"
