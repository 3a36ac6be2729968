"""The GPU script, bench/run_gpu_all.sh, without a GPU: its commands (--dry-run) and its logic (with
python3 stubbed)."""

from __future__ import annotations

import os
import pathlib
import shlex
import subprocess
import sys
import types

import torch

from fused_dreamer_loss.bench import cli, presets

GPU_SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "bench" / "run_gpu_all.sh"


def test_gpu_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(GPU_SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_gpu_script_dry_run_prints_commands_the_cli_accepts(tmp_path, monkeypatch):
    """``--dry-run`` prints each command, runs none; every benchmark it would run parses with the
    CLI's own argparse (as on a GPU machine with matplotlib), and together they cover the tables:
    V1 and V3 presets, float32 and bfloat16, all four implementations, as CUDA-graph replays and
    launched from Python, and the train-step workload of each loss; the test suite first, each step
    timed out."""
    folder = tmp_path / "results"
    proc = subprocess.run(["bash", str(GPU_SCRIPT), "--dry-run", str(folder)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert not folder.exists(), "a dry run created the output folder"
    commands = [shlex.split(line) for line in proc.stdout.splitlines()]
    assert commands and all(c[:3] == ["timeout", "-k", "10"] and int(c[3]) > 0 for c in commands)
    commands = [c[4:] for c in commands]
    runs = [c[3:] for c in commands if c[:3] == ["python3", "-m", "fused_dreamer_loss.bench"]]
    first_bench = commands.index(["python3", "-m", "fused_dreamer_loss.bench", *runs[0]])
    assert ["python3", "-m", "pytest", "-q", "-rs"] == commands[first_bench - 1][:5]
    assert commands[first_bench - 1][-1] == "tests"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "matplotlib", types.ModuleType("matplotlib"))
    parsed = [cli.parse_args(argv) for argv in runs]  # SystemExit(2) on any error
    for args in parsed:
        for path in (args.json, args.markdown, args.plot):
            assert pathlib.Path(path).parent == folder and "DEVICE" in path
    assert len({args.json for args in parsed}) == len(parsed)
    loss_runs = [(args.loss, args.cuda_graph) for args in parsed if args.workload == "loss"]
    assert loss_runs == [("v3", True), ("v3-behavior", True), ("v1", True), ("v3", False),
                         ("v1", False)]
    for args in parsed:
        if args.workload == "loss" and args.loss == "v3-behavior":
            assert args.preset == ["behavior", "behavior-large"] and args.dtype == ["float32"]
            assert args.impl == ["fused", "eager", "torchrl"] and args.mode == ["fwd+bwd"]
        elif args.workload == "loss":
            assert set(args.preset) == ({"v3", "v3-r2", "v3-large"} if args.loss == "v3" else
                                        {"small", "default", "large"})
            assert args.dtype == ["float32", "bfloat16"] and args.impl == list(presets.IMPLS)
            assert args.mode == (["fwd+bwd"] if args.cuda_graph else list(presets.MODES))
    train_steps = [args for args in parsed if args.workload == "train-step"]
    assert [(args.loss, args.preset) for args in train_steps] == [("v1", ["small", "default"]),
                                                                  ("v3", ["v3"])]
    assert train_steps[1].convention == presets.DEFAULT_CONVENTION
    for args in train_steps:
        assert args.dtype == ["float32", "bfloat16"]
    assert train_steps[0].impl == ["fused", "eager"]
    assert train_steps[1].impl == list(presets.V3_TRAIN_STEP_IMPLS)


# A stand-in for python3 on the GPU machine: names a device, prints its arguments and a table row,
# writes the Markdown file it is given; sleeps $FAKE_SLEEP s as the test suite; fails as the
# train-step benchmarks.
FAKE_PYTHON = """#!/usr/bin/env bash
[[ $1 == -c ]] && { echo Fake-GPU; exit 0; }
echo "ran: $*"
echo "| table row |"
[[ $* == *pytest* ]] && sleep "${FAKE_SLEEP:-0}"
[[ $* == *train-step* ]] && exit 3
while (($#)); do [[ $1 == --markdown ]] && echo "| table $2 |" >"$2"; shift; done
exit 0
"""


def run_gpu_script(tmp_path, folder, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").write_text(FAKE_PYTHON)
    (bin_dir / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env}
    return subprocess.run(["bash", str(GPU_SCRIPT), str(folder)], capture_output=True, text=True,
                          env=env, timeout=60)


def test_gpu_script_runs_every_step_and_reports_the_failed_ones(tmp_path):
    """The script's own logic, with python3 stubbed: every step runs, its output (table rows
    included) in its log and on the screen less the table rows; the tables are printed at the end;
    a failed step makes the exit status 1 and is named; a second run starts its logs afresh."""
    folder = tmp_path / "results"
    for _ in range(2):
        proc = run_gpu_script(tmp_path, folder)
    assert proc.returncode == 1
    failed = proc.stderr.splitlines()
    assert len(failed) == 2
    assert failed[0].startswith("failed: python3 -m fused_dreamer_loss.bench --workload "
                                "train-step --preset small")
    assert failed[1].startswith("failed: python3 -m fused_dreamer_loss.bench --workload "
                                "train-step --loss v3")
    assert all(line.endswith(": exit status 3") for line in failed)
    assert "ran: -m pytest" in proc.stdout and "| table row |" not in proc.stdout
    assert proc.stdout.count("| table ") == 8  # the loss, learner and host benchmarks' tables
    kernel_times = (folder / "kernel-times-Fake-GPU.txt").read_text()
    assert kernel_times.count("ran: bench/kernel_times.py") == 6
    assert kernel_times.count("| table row |") == 6
    assert {p.name for p in folder.glob("*.md")} == {
        f"{name}-Fake-GPU.md" for name in ("bench-v3-graph", "learner-graph", "host",
                                           "bench-behavior-graph", "bench-graph", "bench-v3",
                                           "bench", "learner")}
    assert (folder / "tests-Fake-GPU.log").read_text().startswith("ran: -m pytest")


def test_gpu_script_stops_starting_steps_when_the_budget_is_spent(tmp_path):
    """With 21 s of budget and a test suite that takes 2, fewer than the 20 s a step needs are
    left: the benchmarks are not started, each is reported, and the exit status is 1."""
    folder = tmp_path / "results"
    proc = run_gpu_script(tmp_path, folder, BUDGET_S="21", FAKE_SLEEP="2")
    assert proc.returncode == 1
    assert sorted(p.name for p in folder.iterdir()) == ["setup-Fake-GPU.log", "tests-Fake-GPU.log"]
    failed = proc.stderr.splitlines()
    assert len(failed) == 10 + 6 + 1  # the benchmark runs, the kernel times, the sweep
    assert all(line.endswith("s of the 21 s budget spent") for line in failed)
