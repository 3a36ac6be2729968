"""Error against float64 of the fused loss and of torchrl's arithmetic, on bf16 world-model outputs
under CPU autocast (the README's figures). Runs the kernels in Triton's interpreter.

    python bench/autocast_error.py
"""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
from tests.world_model_v1.helpers_v1 import make_inputs  # noqa: E402
from tests.world_model_v1.test_training import torchrl_bf16  # noqa: E402

from fused_dreamer_loss import dreamer_model_loss, reference  # noqa: E402

inputs = [t.detach().to(torch.bfloat16)
          for t in make_inputs((16, 50), 30, (3, 64, 64), torch.float32, "cpu", seed=40)]
exact = reference.dreamer_model_loss(*(t.double() for t in inputs), free_nats=1.0)
with torch.autocast("cpu", dtype=torch.bfloat16):
    ours = dreamer_model_loss(*inputs, free_nats=1.0, backend="triton")
    theirs = torchrl_bf16(inputs, free_nats=1.0)
for name, o, t, e in zip(("kl", "reco", "reward"), ours, theirs, exact):
    e = float(e)
    print(f"{name}: float64 {e:.6f}  fused {float(o):.6f} ({o.dtype}, rel err "
          f"{abs(float(o) - e) / abs(e):.1e})  torchrl {float(t):.6f} ({t.dtype}, rel err "
          f"{abs(float(t) - e) / abs(e):.1e})")
