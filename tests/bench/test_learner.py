"""The learner workload (``--workload learner``, :mod:`fused_dreamer_loss.bench.learner`) on a CPU,
its host-sync count, its entry point, and its steps in bench/run_gpu_all.sh."""

from __future__ import annotations

import doctest
import json
import shlex
import subprocess
import sys
import types

import pytest
import torch

from fused_dreamer_loss.bench import cli, timing
from tests.bench.helpers_bench import CPU, ROW_KEYS, numbers
from tests.helpers import one_thread  # noqa: F401 (autouse: this module runs on one thread)
from tests.bench.test_run_gpu_all import GPU_SCRIPT

pytest.importorskip("torchrl")
from fused_dreamer_loss.bench import learner  # noqa: E402

# torchrl.trainers, imported by the learner, defines classes that torchrl itself deprecates.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Creating .* which inherits from WeightUpdaterBase is deprecated:DeprecationWarning")


def test_docstring_examples():
    result = doctest.testmod(learner, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_host_syncs_are_counted():
    """Each value read and each value-dependent size, by operator; nothing else."""
    x = torch.arange(6.0)

    def step():
        float(x.sum())
        x[x > 2].sum().item()  # boolean-mask indexing runs nonzero
        x.add(1).mul(2)

    assert learner.count_host_syncs(step, cuda=False) == {"aten::_local_scalar_dense": 2,
                                                          "aten::nonzero": 1}
    assert learner.count_host_syncs(lambda: x.add(1), cuda=False) == {}


@pytest.mark.skipif(not CPU, reason="the CPU path: fused through Triton's interpreter")
def test_learner_workload_on_cpu(tmp_path, monkeypatch):
    """v3-tiny, the recipe's convention: an eager update with each world-model loss; torchrl's
    and ours with backend torch timed, the fused one checked through the interpreter and counted,
    not timed; every figure of an update and of the loss alone; the compiled rows skipped, with
    why."""
    monkeypatch.setattr(timing, "CPU_REPEATS", 2)
    out = tmp_path / "learner.json"
    assert cli.main(["--workload", "learner", "--loss", "v3", "--device", "cpu",
                     "--impl", "torchrl", "eager", "fused", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {(r["impl"], r["mode"]): r for r in data["results"]}
    assert sorted(rows) == sorted((impl, mode) for impl in ("torchrl", "eager", "fused")
                                  for mode in ("eager", "compiled"))
    for impl in ("torchrl", "eager", "fused"):
        assert rows[impl, "compiled"]["status"] == (
            "skipped: Inductor takes minutes to compile the whole learner step on a CPU")
        row = rows[impl, "eager"]
        assert ROW_KEYS <= row.keys() and row["extra"]["workload"] == "learner"
        assert (row["preset"], row["frames"], row["convention"]) == ("v3-tiny", 8,
                                                                     "dreamerv3-2024")
        assert all(v is None or v > 0 for v in numbers(row)), row
        x = row["extra"]
        assert 0 < x["loss_launches"] < row["launches"] == sum(x["launched"].values())
        assert x["loss_share_launches"] == x["loss_launches"] / row["launches"]
        assert x["host_syncs"] == sum(x["host_syncs_by"].values())
        assert set(x["host_syncs_by"]) <= learner.SYNC_OPS
        assert x["networks"]["horizon"] == learner.NETWORKS["v3-tiny"].horizon
    for impl in ("torchrl", "eager"):
        row = rows[impl, "eager"]
        assert row["status"] == "ok" and row["median_ms"] > 0
        assert row["extra"]["loss_share_time"] == row["extra"]["loss_ms"] / row["median_ms"]
    fused = rows["fused", "eager"]
    assert fused["status"].startswith("correct (interpreter)") and fused["median_ms"] is None
    assert "loss_ms" not in fused["extra"]
    # Our kernels: a few launches for the whole loss, forward and backward
    assert fused["extra"]["loss_launches"] < rows["torchrl", "eager"]["extra"]["loss_launches"]


def test_learner_needs_the_v3_loss(tmp_path):
    out = tmp_path / "learner.json"
    assert cli.main(["--workload", "learner", "--device", "cpu", "--preset", "tiny",
                     "--impl", "torchrl", "--json", str(out)]) == 0
    statuses = {r["status"] for r in json.loads(out.read_text())["results"]}
    assert statuses == {"n/a: the learner is torchrl's DreamerV3 learner: run it with --loss v3"}


def test_module_entry_point():
    """``python -m fused_dreamer_loss.bench.learner`` is the command with the learner workload:
    its help, without runpy's warning about a module imported before it runs."""
    proc = subprocess.run([sys.executable, "-m", "fused_dreamer_loss.bench.learner", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "learner: one update of torchrl's DreamerV3 learner" in " ".join(proc.stdout.split())
    assert "RuntimeWarning" not in proc.stderr


def test_gpu_script_runs_the_learner_and_the_host_workloads(tmp_path, monkeypatch):
    """The dry run lists the learner with torchrl's defaults (compiled and CUDA-graph captured,
    its loss and ours, the DreamerV3 preset) and the host-overhead workload right after the V3
    graph tables, and the learner eager and compiled after the train steps."""
    proc = subprocess.run(["bash", str(GPU_SCRIPT), "--dry-run", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    commands = [shlex.split(line)[4:] for line in proc.stdout.splitlines()]
    runs = [c[3:] for c in commands if c[:3] == ["python3", "-m", "fused_dreamer_loss.bench"]]
    workloads = [run[run.index("--workload") + 1] if "--workload" in run else "loss"
                 for run in runs]
    assert workloads[:3] == ["loss", "learner", "host"]
    assert workloads.count("learner") == 2 and workloads.count("host") == 1
    assert workloads.index("learner", 2) > max(i for i, w in enumerate(workloads)
                                               if w == "train-step")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "matplotlib", types.ModuleType("matplotlib"))
    captured, plain = (cli.parse_args(run) for run, w in zip(runs, workloads) if w == "learner")
    for args in (captured, plain):
        assert (args.loss, args.preset, args.dtype) == ("v3", ["v3"], ["float32"])
        assert args.impl == ["torchrl", "fused"] and args.convention == "dreamerv3-2024"
    assert captured.cuda_graph and not plain.cuda_graph
