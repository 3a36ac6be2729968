"""Per-kernel device times of one fused forward + backward, from torch.profiler (CUDA only).

    python bench/kernel_times.py default bfloat16
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from fused_dreamer_loss import dreamer_model_loss
from fused_dreamer_loss.bench.presets import DTYPES, make_inputs

preset, dtype = sys.argv[1], DTYPES[sys.argv[2]]
inputs = make_inputs(preset, dtype, "cuda", seed=0)
wanted = [t for t in inputs if t.requires_grad]
ones = [torch.ones((), device="cuda", dtype=dtype)] * 3
for _ in range(3):
    torch.autograd.backward(dreamer_model_loss(*inputs), ones, inputs=wanted)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(10):
        torch.autograd.backward(dreamer_model_loss(*inputs), ones, inputs=wanted)
    torch.cuda.synchronize()
for event in prof.key_averages():
    if event.device_type == torch.autograd.DeviceType.CUDA:
        print(f"{preset} {sys.argv[2]} {event.key}: {event.device_time_total / event.count:.1f} us x {event.count}")
