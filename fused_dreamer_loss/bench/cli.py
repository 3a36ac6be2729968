"""The command line: its parser (every option; the losses and workloads it offers are read from
:mod:`.registry`), :func:`run` (the report) and :func:`main` (the console script
``fused-dreamer-loss-bench``, which restarts itself with Triton's interpreter on a CPU)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

import torch

from ..world_model_v3.conventions import V3_CONVENTIONS
from .presets import DEFAULT_CONVENTION, DISTANCES, DTYPES, IMPLS, MODES
from .registry import LOSSES, WORKLOADS
from .report import failures, footnotes, markdown, plot
from .timing import MODULE, checks_fused_on_cpu, copy_gbps, interpreting, use_interpreter
from .workloads import Run


def make_parser() -> argparse.ArgumentParser:
    """The command line's parser (also read by the README test, for the options it names)."""
    p = argparse.ArgumentParser(
        prog="fused-dreamer-loss-bench",
        description="Time the Dreamer model loss (V1) or the DreamerV3 model loss: fused Triton "
                    "kernels vs eager torch (our reference), torch.compile of it, and torchrl's "
                    "own code. Reports median time, bandwidth under the minimal-traffic model, "
                    "its fraction of the device's copy bandwidth, peak memory and speed-up vs "
                    "eager.")
    p.add_argument("--loss", choices=list(LOSSES), default="v1",
                   help="one per run: " + "; ".join(f"{name}: {loss.help}"
                                                    for name, loss in LOSSES.items())
                   + ". Default: v1")
    p.add_argument("--convention", choices=list(V3_CONVENTIONS),
                   help=f"--loss v3 only: whose options (fused_dreamer_loss.V3_CONVENTIONS). "
                        f"Default: {DEFAULT_CONVENTION}")
    p.add_argument("--preset", nargs="+", choices=[name for loss in LOSSES.values()
                                                   for name in loss.presets],
                   help="input sizes (frames = batch x time). " + " ".join(
                       f"--loss {name} {loss.preset_help}. Default: "
                       f"{' and '.join(loss.gpu_presets)} on a GPU, "
                       f"{' and '.join(loss.cpu_presets)} on a CPU."
                       for name, loss in LOSSES.items()))
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["float32"],
                   help="input dtype(s); with --loss v3 the network outputs' (the targets stay "
                        "uint8 frames, float32 rewards, bool terminal flags). Default: float32")
    p.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES),
                   help="fwd: loss only, under no_grad; fwd+bwd: loss and the gradients of the "
                        "latents (v3: posterior and prior logits), decoded frames and predicted "
                        "reward (v3: reward and continue logits). Default: both")
    p.add_argument("--impl", nargs="+", choices=IMPLS, default=list(IMPLS),
                   help="fused: our kernels (timed on CUDA; on a CPU checked and counted "
                        "through Triton's interpreter, not timed); eager: the pure-torch reference; "
                        "compiled: torch.compile of it (compile time reported apart); torchrl: "
                        "torchrl's kl_loss + distance_loss (v3: the functions of "
                        "DreamerV3ModelLoss's forward; n/a for a convention with options torchrl "
                        "lacks). Default: all")
    p.add_argument("--reco-loss", choices=DISTANCES, default="l2",
                   help="reconstruction distance (--loss v3: l2 or l1). Default: l2")
    p.add_argument("--device", choices=["cuda", "cpu"],
                   help="where to run. Default: cuda when available, else cpu (the fused kernels "
                        "then run through Triton's interpreter: checked, launches counted, "
                        "not timed)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="time replays of each step captured in a CUDA graph: the device time "
                        "without Python and launch overhead (as in a graph-captured training "
                        "step). CUDA only")
    p.add_argument("--workload", choices=list(WORKLOADS), default="loss",
                   help="one per run: " + "; ".join(f"{name}: {workload.help}"
                                                    for name, workload in WORKLOADS.items())
                   + ". Default: loss")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the results table as Markdown")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of time per implementation and "
                                                   "preset (needs matplotlib)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line, completed (device, presets, the loss's own defaults) and checked:
    what it refuses is an argparse error (exit status 2, a usage line)."""
    p = make_parser()
    args = p.parse_args(argv)
    if args.plot:  # refuse now, not after the whole run
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib: pip install matplotlib")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.cuda_graph and args.device != "cuda":
        p.error("--cuda-graph needs --device cuda")
    loss = LOSSES[args.loss]
    refused = loss.settle(args)
    if refused:
        p.error(refused)
    if args.preset is None:
        args.preset = list(loss.gpu_presets if args.device == "cuda" else loss.cpu_presets)
    others = [name for name in args.preset if name not in loss.presets]
    if others:
        hint = "".join(f"; {loss.renamed[name]}" for name in others if name in loss.renamed)
        p.error(f"--preset {' '.join(others)}: not a preset of --loss {args.loss} "
                f"({', '.join(loss.presets)}){hint}")
    return args


def run(argv: list[str] | None = None) -> dict:
    """Run the benchmark the command line describes; return the report (the ``--json`` schema).

    An implementation that raises gets a row with status ``failed: ...`` (its traceback goes to
    stderr) and the run goes on; :func:`failures` lists such rows and wrong fused results.
    """
    args = parse_args(argv)
    cuda = args.device == "cuda"
    use_interpreter(args)
    interpreter = checks_fused_on_cpu(args) and interpreting()
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    copy = copy_gbps() if cuda else None
    case = LOSSES[args.loss].case(args)
    report = {"device": device_name, "torch": torch.__version__, "triton": triton_version,
              "copy_gbps": copy, "cuda_graph": args.cuda_graph, "interpreter": interpreter,
              "loss": args.loss, "convention": args.convention, "results": []}
    if cuda:
        print(f"{device_name}: copy {copy:.0f} GB/s", flush=True)
    else:
        print(f"{device_name}, no CUDA device: the pure-torch implementations are timed on this "
              "CPU.", flush=True)
        if interpreter:
            print("The fused kernels run through Triton's interpreter (TRITON_INTERPRET=1): "
                  "checked against the float64 reference, launches counted, not timed.",
                  flush=True)
    rows = WORKLOADS[args.workload].rows(Run(args, case, copy))
    for row in rows:
        eager = next((r for r in rows if r.impl == "eager" and r.median_ms and
                      (r.preset, r.dtype, r.mode) == (row.preset, row.dtype, row.mode)), None)
        if eager and row.median_ms:
            row.speedup_vs_eager = eager.median_ms / row.median_ms
    report["results"] = [asdict(r) for r in rows]
    table = markdown(report)
    print(table)
    print(footnotes(rows, case))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(table)
    if args.plot:
        plot(report, args.plot)
    return report


def main(argv: list[str] | None = None) -> int:
    """The console script ``fused-dreamer-loss-bench``: 0 when every implementation ran and every
    fused result was right, 1 otherwise (the reasons on stderr); 2 for bad arguments.

    Without CUDA the fused kernels need Triton's interpreter, which has to be chosen before triton
    is imported (see :func:`.timing.use_interpreter`), and importing this package imported it
    already. So the command (``argv`` None: the arguments are this process's own) restarts itself
    once, as ``python -m fused_dreamer_loss.bench`` with ``TRITON_INTERPRET=1`` in its
    environment; the variable being set is what stops a second restart. Called from Python with
    ``argv``, it never restarts: the fused rows then say why they are skipped.
    """
    # The profiler behind the launch counts logs "profiler_start"/"profiler_stop" lines to stderr.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    if argv is None:
        args = parse_args(None)  # --help and bad arguments end here, before any restart
        if not use_interpreter(args):
            os.environ["TRITON_INTERPRET"] = "1"
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(sys.executable, [sys.executable, "-m", MODULE, *sys.argv[1:]])
    report = run(argv)
    failed = failures(report)
    if failed:
        print(f"fused-dreamer-loss-bench: {len(failed)} of {len(report['results'])} failed:",
              file=sys.stderr)
        for line in failed:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0

