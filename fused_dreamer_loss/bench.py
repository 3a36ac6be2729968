"""Benchmark CLI: the fused Dreamer loss against eager torch, torch.compile and torchrl.

Run ``fused-dreamer-loss-bench --help`` (or ``python -m fused_dreamer_loss.bench --help``).

Every implementation is timed on the same inputs, and every row reports the achieved bandwidth under
one minimal-traffic model (DESIGN §3: each input read once, each needed gradient written once), so
GB/s ratios are speed ratios. On CUDA the timer is ``triton.testing.do_bench`` (median) over
several input sets in rotation, next to a device-to-device copy measured in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from . import reference
from .functional import dreamer_model_loss

PRESETS = {
    # name: (batch, time, image shape, latent dim)
    "tiny": (4, 8, (3, 16, 16), 30),
    "small": (16, 50, (3, 64, 64), 30),
    "default": (200, 50, (3, 64, 64), 30),
    "large": (1024, 64, (3, 64, 64), 30),
    "v3": (16, 64, (3, 64, 64), 1024),
}
IMPLS = ("fused", "eager", "compiled", "torchrl")
MODES = ("fwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DISTANCES = ("l2", "l1", "smooth_l1")
#: Input sets the timer rotates through, so that the cache is not what is timed.
ROTATION = 3
#: Bytes copied to measure the device's copy bandwidth.
COPY_BYTES = 1 << 30
#: Inputs that need a gradient in a training step: the latents, the decoded frames, the predicted
#: reward (not the targets).
NEEDS_GRAD = (True, True, True, True, False, True, False, True)
CPU_REPEATS = 5


@dataclass
class Row:
    impl: str
    preset: str
    frames: int
    image_shape: list[int]
    latent_dim: int
    dtype: str
    mode: str
    median_ms: float | None
    gbps: float | None
    peak_mem_mb: float | None
    frac_copy: float | None = None
    speedup_vs_eager: float | None = None
    compile_s: float | None = None
    status: str = "ok"
    extra: dict = field(default_factory=dict)


def minimal_bytes(frames: int, image_numel: int, latent_dim: int, itemsize: int, mode: str) -> int:
    """Fewest bytes a pass must move: read all eight inputs once, and for fwd+bwd write each needed
    gradient once (4 latents, reco_pixels, pred_reward)."""
    reads = (4 * latent_dim + 2 * image_numel + 2) * frames
    writes = (4 * latent_dim + image_numel + 1) * frames if mode == "fwd+bwd" else 0
    return (reads + writes) * itemsize


def make_inputs(preset: str, dtype: torch.dtype, device: str, seed: int) -> list[torch.Tensor]:
    batch, steps, image, latent_dim = PRESETS[preset]
    g = torch.Generator(device).manual_seed(seed)
    B = (batch, steps)

    def rand(*shape, lo=0.0, width=1.0):
        return torch.rand(*shape, generator=g, device=device) * width + lo

    tensors = [
        torch.randn(*B, latent_dim, generator=g, device=device),
        rand(*B, latent_dim, lo=0.1, width=1.5),
        torch.randn(*B, latent_dim, generator=g, device=device),
        rand(*B, latent_dim, lo=0.1, width=1.5),
        rand(*B, *image),
        rand(*B, *image, lo=-0.5, width=2.0),
        torch.randn(*B, 1, generator=g, device=device),
        torch.randn(*B, 1, generator=g, device=device),
    ]
    return [t.to(dtype).requires_grad_(n) for t, n in zip(tensors, NEEDS_GRAD)]


def torchrl_loss_fn(reco_loss: str):
    """torchrl's own path: DreamerModelLoss.kl_loss and distance_loss, reduced as its forward does."""
    from torch import nn
    from torchrl.objectives import DreamerModelLoss
    from torchrl.objectives.utils import distance_loss

    loss = DreamerModelLoss(nn.ModuleList([nn.Sequential(nn.Identity()), nn.Identity()]),
                            reco_loss=reco_loss)

    def fn(pm, ps, qm, qs, pixels, reco, true_reward, pred_reward):
        kl = loss.kl_loss(pm, ps, qm, qs)
        reco_term = distance_loss(pixels, reco, reco_loss).sum((-3, -2, -1)).mean()
        reward = distance_loss(true_reward, pred_reward, "l2").squeeze(-1).mean()
        return kl, reco_term, reward

    return fn


def loss_fn(impl: str, reco_loss: str) -> Callable:
    if impl == "fused":
        return lambda *t: dreamer_model_loss(*t, reco_loss=reco_loss, backend="triton")
    if impl == "eager":
        return lambda *t: reference.dreamer_model_loss(*t, reco_loss=reco_loss)
    if impl == "compiled":
        return torch.compile(lambda *t: reference.dreamer_model_loss(*t, reco_loss=reco_loss))
    return torchrl_loss_fn(reco_loss)


def step_fn(fn: Callable, inputs: list[torch.Tensor], mode: str) -> Callable[[], None]:
    wanted = [t for t in inputs if t.requires_grad]
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(*inputs)
    else:
        def step():
            torch.autograd.grad(fn(*inputs), wanted)
    return step


def graphed(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` captured in a CUDA graph (after warm-up on a side stream); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def timed(steps: list[Callable[[], None]], cuda: bool) -> float:
    """Median milliseconds of one step, rotating through the input sets."""
    turn = [0]

    def rotate():
        steps[turn[0] % len(steps)]()
        turn[0] += 1

    if cuda:
        from triton.testing import do_bench
        return float(do_bench(rotate, warmup=50, rep=300, return_mode="median"))
    rotate()
    times = []
    for _ in range(CPU_REPEATS):
        start = time.perf_counter()
        rotate()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_gbps() -> float:
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = timed([lambda: dst.copy_(src)], cuda=True)
    return 2 * COPY_BYTES / ms / 1e6


def check_fused(inputs: list[torch.Tensor], reco_loss: str) -> str | None:
    """Why the fused result differs from the float64 reference, or None when it agrees."""
    dtype = inputs[0].dtype
    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    want = [t for t in leaves if t.requires_grad]
    ref = reference.dreamer_model_loss(*leaves, reco_loss=reco_loss)
    ref_grads = torch.autograd.grad(ref, want)
    out = dreamer_model_loss(*inputs, reco_loss=reco_loss, backend="triton")
    grads = torch.autograd.grad(out, [t for t in inputs if t.requires_grad])
    rtol = 1e-4 if dtype == torch.float32 else 2e-2
    for what, a, b in [*zip(("loss_kl", "loss_reco", "loss_reward"), out, ref),
                       *zip(("grad",) * 6, grads, ref_grads)]:
        err = float((a.double() - b).norm() / b.norm().clamp_min(1e-30))
        if not math.isfinite(err) or err > rtol:
            return f"{what}: relative error {err:.2e} > {rtol:.0e}"
    return None


def skip_reason(impl: str, cuda: bool) -> str | None:
    """Why ``impl`` cannot run here, or None."""
    if impl == "fused" and not cuda:
        return "skipped: the fused kernels need a CUDA device"
    if impl == "compiled" and sys.platform == "win32":
        return "skipped: torch.compile is not supported here"
    if impl == "torchrl":
        try:
            import torchrl  # noqa: F401
        except ImportError:
            return "skipped: torchrl is not installed"
    return None


def run_config(impl, preset, dtype_name, mode, reco_loss, device, copy,
               cuda_graph: bool = False) -> Row:
    batch, steps_, image, latent_dim = PRESETS[preset]
    frames, dtype = batch * steps_, DTYPES[dtype_name]
    row = Row(impl, preset, frames, list(image), latent_dim, dtype_name, mode, None, None, None)
    cuda = device == "cuda"
    skipped = skip_reason(impl, cuda)
    if skipped:
        row.status = skipped
        return row
    sets = [make_inputs(preset, dtype, device, seed) for seed in range(ROTATION if cuda else 1)]
    if impl == "fused":
        wrong = check_fused(sets[0], reco_loss)
        if wrong:
            row.status = f"wrong: {wrong}"
            return row
    fn = loss_fn(impl, reco_loss)
    steps = [step_fn(fn, inputs, mode) for inputs in sets]
    if impl == "compiled":
        start = time.perf_counter()
        steps[0]()
        if cuda:
            torch.cuda.synchronize()
        row.compile_s = time.perf_counter() - start
    if cuda:
        steps[0]()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        steps[0]()
        torch.cuda.synchronize()
        row.peak_mem_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    if cuda_graph:
        try:
            steps = [graphed(step) for step in steps]
        except Exception as exc:  # report, do not hide, an implementation that cannot be captured
            row.status = f"skipped: CUDA graph capture failed: {type(exc).__name__}"
            return row
        row.extra["cuda_graph"] = True
    row.median_ms = timed(steps, cuda)
    nbytes = minimal_bytes(frames, math.prod(image), latent_dim, dtype.itemsize, mode)
    row.gbps = nbytes / row.median_ms / 1e6
    if copy:
        row.frac_copy = row.gbps / copy
    return row


def run_train_step(impl: str, preset: str, dtype_name: str, reco_loss: str, device: str) -> Row:
    """One optimizer step of :class:`~fused_dreamer_loss.models.ConvWorldModel` with the loss of
    ``impl`` (fused or eager), under autocast for half dtypes."""
    from .models import ConvWorldModel

    batch, steps_, image, latent_dim = PRESETS[preset]
    cuda = device == "cuda"
    row = Row(impl, preset, batch * steps_, list(image), latent_dim, dtype_name, "train-step",
              None, None, None, extra={"workload": "train-step"})
    if impl not in ("fused", "eager"):
        row.status = "skipped: train-step compares fused with eager"
        return row
    skipped = skip_reason(impl, cuda)
    if skipped:
        row.status = skipped
        return row
    torch.manual_seed(0)
    model = ConvWorldModel(image, latent_dim).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    dtype = DTYPES[dtype_name]
    loss = loss_fn(impl, reco_loss)

    def frames_and_rewards(seed):
        g = torch.Generator(device).manual_seed(seed)
        return (torch.rand(batch, steps_, *image, generator=g, device=device),
                torch.randn(batch, steps_, 1, generator=g, device=device))

    sets = [frames_and_rewards(seed) for seed in range(ROTATION if cuda else 1)]

    def make_step(pixels, reward):
        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                pm, ps, qm, qs, reco, pred_reward = model(pixels)
            terms = loss(pm, ps, qm, qs, pixels, reco, reward, pred_reward)
            sum(t.float() for t in terms).backward()
            optimizer.step()
        return step

    steps = [make_step(*s) for s in sets]
    steps[0]()
    row.median_ms = timed(steps, cuda)
    return row


def markdown(report: dict) -> str:
    lines = [
        f"Device: {report['device']}; torch {report['torch']}, triton {report['triton']}; "
        f"device-to-device copy: {report['copy_gbps'] or 0:.0f} GB/s (bytes read + written)"
        f"{'; timed as CUDA-graph replays' if report.get('cuda_graph') else ''}.",
        "",
        "| impl | preset | dtype | mode | median ms | GB/s | of copy | peak MiB | vs eager | status |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    for r in report["results"]:
        lines.append(
            f"| {r['impl']} | {r['preset']} | {r['dtype']} | {r['mode']} | {f(r['median_ms'], '.3f')}"
            f" | {f(r['gbps'], '.0f')} | {f(r['frac_copy'], '.0%')} | {f(r['peak_mem_mb'], '.0f')}"
            f" | {f(r['speedup_vs_eager'], '.2f')}{'' if r['speedup_vs_eager'] is None else '×'}"
            f" | {r['status']} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
    rows = [r for r in report["results"] if r["median_ms"] is not None]
    groups = sorted({(r["preset"], r["dtype"], r["mode"]) for r in rows})
    impls = [i for i in IMPLS if any(r["impl"] == i for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        xs, ys = [], []
        for g, group in enumerate(groups):
            for r in rows:
                if r["impl"] == impl and (r["preset"], r["dtype"], r["mode"]) == group:
                    xs.append(g + k * width)
                    ys.append(r["median_ms"])
        ax.bar(xs, ys, width, label=impl)
    ax.set_xticks([g + width * (len(impls) - 1) / 2 for g in range(len(groups))])
    ax.set_xticklabels(["\n".join(g) for g in groups], fontsize=8)
    ax.set_ylabel("median ms per call (lower is better)")
    ax.set_yscale("log")
    ax.set_title(f"Dreamer model loss on {report['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fused-dreamer-loss-bench",
        description="Time the Dreamer model loss: fused Triton kernels vs eager torch (our "
                    "reference), torch.compile of it, and torchrl's own code. Reports median "
                    "time, bandwidth under the minimal-traffic model, its fraction of the "
                    "device's copy bandwidth, peak memory and speed-up vs eager.")
    p.add_argument("--preset", nargs="+", choices=list(PRESETS),
                   help="input sizes (frames = batch x time, 3x64x64 frames, 30 latents unless "
                        "said): tiny 4x8 of 3x16x16; small 16x50; default 200x50 (torchrl's "
                        "Dreamer); large 1024x64; v3 16x64 with 1024 latents. Default: small "
                        "and default on a GPU, tiny on a CPU")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["float32"],
                   help="input dtype(s). Default: float32")
    p.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES),
                   help="fwd: loss only, under no_grad; fwd+bwd: loss and the gradients of the "
                        "latents, decoded frames and predicted reward. Default: both")
    p.add_argument("--impl", nargs="+", choices=IMPLS, default=list(IMPLS),
                   help="fused: our kernels (CUDA only); eager: the pure-torch reference; "
                        "compiled: torch.compile of it (compile time reported apart); torchrl: "
                        "torchrl's kl_loss + distance_loss. Default: all")
    p.add_argument("--reco-loss", choices=DISTANCES, default="l2",
                   help="reconstruction distance. Default: l2")
    p.add_argument("--device", choices=["cuda", "cpu"],
                   help="Default: cuda when available")
    p.add_argument("--cuda-graph", action="store_true",
                   help="time replays of each step captured in a CUDA graph: the device time "
                        "without Python and launch overhead (as in a graph-captured training "
                        "step). CUDA only")
    p.add_argument("--workload", choices=["loss", "train-step"], default="loss",
                   help="loss: the loss alone; train-step: one optimizer step of a small conv "
                        "world model (fused_dreamer_loss.models) with the fused vs the eager "
                        "loss, to see what the loss speed-up is worth in a real step. "
                        "Default: loss")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the results table as Markdown")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of time per implementation and "
                                                   "preset (needs matplotlib)")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.cuda_graph and args.device != "cuda":
        p.error("--cuda-graph needs --device cuda")
    if args.preset is None:
        args.preset = ["small", "default"] if args.device == "cuda" else ["tiny"]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cuda = args.device == "cuda"
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    copy = copy_gbps() if cuda else None
    report = {"device": device_name, "torch": torch.__version__, "triton": triton_version,
              "copy_gbps": copy, "cuda_graph": args.cuda_graph, "results": []}
    print(f"{device_name}: copy {copy or 0:.0f} GB/s", flush=True)
    rows: list[Row] = []
    if args.workload == "train-step":
        modes = ["train-step"]

        def run(impl, preset, dtype, mode):
            return run_train_step(impl, preset, dtype, args.reco_loss, args.device)
    else:
        modes = args.mode

        def run(impl, preset, dtype, mode):
            return run_config(impl, preset, dtype, mode, args.reco_loss, args.device, copy,
                              args.cuda_graph)

    for preset, dtype, mode, impl in itertools.product(args.preset, args.dtype, modes, args.impl):
        print(f"  {preset:>7} {dtype:>8} {mode:>7} {impl:>8} ...", end="", flush=True)
        row = run(impl, preset, dtype, mode)
        rows.append(row)
        shown = f"{row.median_ms:.3f} ms" if row.median_ms is not None else row.status
        print(f" {shown}", flush=True)
        if cuda:
            torch.cuda.empty_cache()
    for row in rows:
        eager = next((r for r in rows if r.impl == "eager" and r.median_ms and
                      (r.preset, r.dtype, r.mode) == (row.preset, row.dtype, row.mode)), None)
        if eager and row.median_ms:
            row.speedup_vs_eager = eager.median_ms / row.median_ms
    report["results"] = [asdict(r) for r in rows]
    table = markdown(report)
    print(table)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(table)
    if args.plot:
        plot(report, args.plot)
    return report


if __name__ == "__main__":
    main()
