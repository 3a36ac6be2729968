"""Where a train-step's time goes, fused vs eager loss: host time per step and the top kernels.

    python bench/profile_train_step.py small float32
"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fused_dreamer_loss.bench.peers import loss_fn
from fused_dreamer_loss.bench.presets import DTYPES, PRESETS
from fused_dreamer_loss.models import ConvWorldModel

preset, dtype_name = sys.argv[1], sys.argv[2]
batch, steps_, image, latent = PRESETS[preset]
dtype = DTYPES[dtype_name]
pixels = torch.rand(batch, steps_, *image, device="cuda")
reward = torch.randn(batch, steps_, 1, device="cuda")
for impl in ("fused", "eager", "fused"):
    torch.manual_seed(0)
    model = ConvWorldModel(image, latent).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss = loss_fn(impl, "l2")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = model(pixels)
        sum(t.float() for t in loss(*out[:4], pixels, out[4], reward, out[5])).backward()
        opt.step()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        step()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    print(f"{impl}: host {1e3 * (t1 - t0) / 20:.2f} ms/step, wall {1e3 * (t2 - t0) / 20:.2f}")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=6, max_name_column_width=70))
