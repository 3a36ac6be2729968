#!/usr/bin/env bash
# Everything the GPU work reports, in one call: the test suite with compiled kernels, then the
# benchmark CLI. Results go to $OUT (default bench/results), named after the device.
set -uo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
dev=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
export PYTHONUNBUFFERED=1

timeout 300 python3 -m pytest -q -n 8 -p no:cacheprovider tests 2>&1 | tee "$out/tests-$dev.log" | tail -4

timeout 420 python3 -m fused_dreamer_loss.bench --preset small default large \
    --dtype float32 bfloat16 --impl fused eager torchrl \
    --json "$out/bench-$dev.json" --markdown "$out/bench-$dev.md" --plot "$out/bench-$dev.png" \
    | grep -v '^|'

timeout 300 python3 -m fused_dreamer_loss.bench --preset small default --dtype float32 bfloat16 \
    --mode fwd+bwd --impl fused eager compiled \
    --json "$out/bench-compiled-$dev.json" --markdown "$out/bench-compiled-$dev.md" | grep -v '^|'
cat "$out"/bench-*"$dev".md
