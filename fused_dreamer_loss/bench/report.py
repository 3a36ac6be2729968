"""The report: its rows (:class:`Row`, the ``--json`` schema of one result), the table's header and
Markdown, the plot, the progress line of a row and the list of rows that failed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .peers import fused_rtol
from .presets import DTYPES, IMPLS
from .timing import CPU_REPEATS, NOISY_SPREAD

if TYPE_CHECKING:
    from .losses import Case


@dataclass
class Row:
    """One result of a run, as the ``--json`` report holds it (a figure not measured is None)."""

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
    #: Kernel launches of one step (see :func:`.timing.count_launches`); None where not counted.
    launches: int | None = None
    #: Bytes one step moves under the minimal-traffic model (:func:`.presets.minimal_bytes`,
    #: :func:`.presets.minimal_bytes_v3`).
    model_bytes: int | None = None
    #: Which loss: "v1" (the Dreamer loss) or "v3" (the DreamerV3 loss, whose ``latent_dim`` is
    #: categoricals × classes, ``latent_shape`` the two, ``convention`` its options).
    loss: str = "v1"
    convention: str | None = None
    latent_shape: list[int] | None = None
    #: The fastest and slowest of the CPU repeats (None on CUDA and where not timed), and whether
    #: their spread makes the median doubtful (:data:`.timing.NOISY_SPREAD`).
    min_ms: float | None = None
    max_ms: float | None = None
    noisy: bool | None = None


#: How a figure that was not measured shows in the table.
ABSENT = "—"


def _fmt(v, fmt: str) -> str:
    return ABSENT if v is None else format(v, fmt)


def _fmt_gbps(v: float | None) -> str:
    """Bandwidth with three significant digits below 100 GB/s (a CPU's tiny preset moves less
    than 1 GB/s: not "0"), whole numbers above."""
    if v is None:
        return ABSENT
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def header(report: dict) -> str:
    """The table's first line: device, versions and what the bandwidth is compared with."""
    line = f"Device: {report['device']}; torch {report['torch']}, triton {report['triton']}"
    if report["copy_gbps"] is not None:
        line += (f"; device-to-device copy: {report['copy_gbps']:.0f} GB/s "
                 "(bytes read + written)")
    else:
        line += "; no copy bandwidth (measured on CUDA only)"
    if report.get("loss") == "v3":
        line += f"; DreamerV3 loss, {report['convention']} options"
    if report.get("cuda_graph"):
        line += "; timed as CUDA-graph replays"
    if report.get("interpreter"):
        line += "; fused kernels through Triton's interpreter: checked, not timed"
    return line + "."


def _fmt_spread(row: dict) -> str:
    """``min–max`` ms, followed by "noisy" where the spread makes the median doubtful."""
    if row.get("min_ms") is None or row.get("max_ms") is None:
        return ABSENT
    return f"{row['min_ms']:.3f}–{row['max_ms']:.3f}" + (" noisy" if row.get("noisy") else "")


def markdown(report: dict) -> str:
    lines = [
        header(report),
        "",
        "| impl | preset | dtype | mode | median ms | min–max ms | launches | GB/s | of copy "
        "| peak MiB | vs eager | status |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in report["results"]:
        speedup = ABSENT if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}×"
        lines.append(
            f"| {r['impl']} | {r['preset']} | {r['dtype']} | {r['mode']} "
            f"| {_fmt(r['median_ms'], '.3f')} | {_fmt_spread(r)} "
            f"| {_fmt(r.get('launches'), 'd')} | {_fmt_gbps(r['gbps'])} "
            f"| {_fmt(r['frac_copy'], '.0%')} | {_fmt(r['peak_mem_mb'], '.0f')} | {speedup} "
            f"| {r['status']} |"
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
    loss = ("DreamerV3 model loss, " + report["convention"] if report.get("loss") == "v3"
            else "Dreamer model loss")
    ax.set_title(f"{loss} on {report['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def progress(row: Row) -> str:
    """What the progress output says of a finished row: its time or its status, and its launches."""
    if row.median_ms is not None:
        shown = f"{row.median_ms:.3f} ms"
        if row.compile_s is not None:
            shown += f" (compile {row.compile_s:.1f} s, apart)"
    else:
        shown = row.status
    if row.launches is not None:
        shown += f"; {row.launches} launch{'' if row.launches == 1 else 'es'}"
    return shown


def failures(report: dict) -> list[str]:
    """One line per row that failed: a wrong fused result or an implementation that crashed."""
    return [f"{r['impl']} {r['preset']} {r['dtype']} {r['mode']}: {r['status']}"
            for r in report["results"] if r["status"].startswith(("wrong", "failed"))]



def footnotes(rows: list[Row], case: Case) -> str:
    """The lines printed under the table, each where a row needs it: what a launch is (and what a
    fwd+bwd step's launches include), what a noisy row is and, where the fused kernels were
    checked through the interpreter, on what and within which tolerance."""
    lines = []
    if any(r.launches is not None for r in rows):
        line = ("launches: kernels per step (CUDA: what the device ran; CPU: ATen operators that "
                "compute, torch.compile's C++ kernels, Triton launches).")
        if any(r.mode == "fwd+bwd" for r in rows):
            line += (f" fwd+bwd includes the {case.losses} grad-output fills of "
                     "torch.autograd.grad, one per loss.")
        lines.append(line)
    if any(r.noisy for r in rows):
        lines.append(f"noisy: the slowest of the {CPU_REPEATS} repeats took over {NOISY_SPREAD:g}× "
                     "the fastest (a busy machine): the median may be off; rerun the row.")
    checked = sorted({(r.preset, r.dtype) for r in rows if r.impl == "fused" and
                      r.status.startswith("correct")})
    if checked:
        where = ", ".join(f"{p} {d}" for p, d in checked)
        rtols = ", ".join(sorted({f"{fused_rtol(DTYPES[d]):.0e}" for _, d in checked}))
        lines.append(f"fused: correct (interpreter) on {where}: {case.checked()} agree with the "
                     f"float64 reference (relative error within {rtols}).")
        lines.append("Speed figures for the fused kernels need a CUDA GPU (the interpreter's "
                     "speed says nothing about the kernels').")
    return "\n".join(lines)
