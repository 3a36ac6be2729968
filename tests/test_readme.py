"""The README's code blocks work as written: every ```python block runs (in a fresh Python, on the
CPU), and the commands of the ```bash blocks name things that exist (scripts, files, modules,
extras, the benchmark's options)."""

from __future__ import annotations

import glob
import importlib.util
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from fused_dreamer_loss import bench

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def toml_keys(table: str) -> set[str]:
    """The keys of one table of pyproject.toml (tomllib is Python 3.11+; we support 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    body = re.search(rf"^\[{re.escape(table)}\]\n(.*?)(?=^\[|\Z)", text, re.S | re.M).group(1)
    return set(re.findall(r"^([\w-]+)\s*=", body, re.M))


SCRIPTS = toml_keys("project.scripts")
EXTRAS = toml_keys("project.optional-dependencies")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(language: str) -> list[tuple[str, str]]:
    """``(section heading, code)`` of each block in ``language``, in README order."""
    found = []
    for m in FENCE.finditer(README):
        if m.group(1) == language:
            headings = re.findall(r"^#+ (.+)$", README[:m.start()], re.M)
            found.append((headings[-1] if headings else "top", m.group(2)))
    return found


PYTHON = blocks("python")
BASH = blocks("bash")


def block_id(i: int, heading: str) -> str:
    return f"{i + 1}-" + re.sub(r"\W+", "-", heading).strip("-").lower()


def test_the_readme_has_the_blocks_these_tests_read():
    assert not blocks(""), "a ``` block without a language: mark it python or bash"
    assert len(PYTHON) >= 2 and len(BASH) >= 2


@pytest.mark.parametrize("heading,code", PYTHON,
                         ids=[block_id(i, h) for i, (h, _) in enumerate(PYTHON)])
def test_python_block_runs_on_cpu(heading, code, tmp_path):
    """As a newcomer would run it: a fresh Python, no GPU, no TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    script = tmp_path / "block.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (f"the python block under '{heading}' failed:\n{code}\n"
                                  f"{proc.stderr[-4000:]}")


def commands(code: str) -> list[list[str]]:
    """The commands of a bash block: one per line, comments dropped, split as the shell would."""
    found = []
    for line in code.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            found.append(words)
    return found


def bench_options() -> set[str]:
    return set(bench.make_parser()._option_string_actions)


def check_command(words: list[str]) -> None:
    """Raise AssertionError if ``words`` names something that does not exist."""
    command, args = words[0], words[1:]
    line = " ".join(words)
    if command in SCRIPTS:
        installed = pathlib.Path(sys.executable).parent / command
        assert installed.exists(), f"{line}: {command} is not installed next to {sys.executable}"
        if command == "fused-dreamer-loss-bench":
            unknown = {a.split("=")[0] for a in args if a.startswith("-")} - bench_options()
            assert not unknown, f"{line}: the benchmark has no option {sorted(unknown)}"
        return
    assert command in {"bash", "python", "python3", "pip", "pytest", "cd", "git", "torchrun"} \
        or shutil.which(command), f"{line}: no command {command}"
    if command in ("python", "python3") and args[:1] == ["-m"]:
        module = args[1]
        assert importlib.util.find_spec(module) is not None, f"{line}: no module {module}"
        args = args[2:]
    if command == "pip":
        for a in args:
            extras = re.fullmatch(r"(?:\.|fused-dreamer-loss)\[([\w,-]+)\]", a)
            if extras:
                missing = set(extras.group(1).split(",")) - EXTRAS
                assert not missing, f"{line}: pyproject.toml has no extra {sorted(missing)}"
        return
    for a in args:  # the files a command names: examples/x.py, .ci/run, tests, bench/*.sh
        if a.startswith("-") or "://" in a:
            continue
        if "/" in a or a.endswith((".py", ".sh")) or (ROOT / a).is_dir():
            assert glob.glob(str(ROOT / a)), f"{line}: no {a} in the repository"


@pytest.mark.parametrize("heading,code", BASH,
                         ids=[block_id(i, h) for i, (h, _) in enumerate(BASH)])
def test_bash_block_names_things_that_exist(heading, code):
    for words in commands(code):
        check_command(words)


def test_the_bash_blocks_name_the_main_entry_points():
    named = {w for _, code in BASH for words in commands(code) for w in words}
    assert "fused-dreamer-loss-bench" in named
    assert "examples/train_world_model.py" in named
    assert ".ci/run" in named


@pytest.mark.parametrize("words,problem", [
    (["fused-dreamer-loss-bnech"], "no command"),
    (["fused-dreamer-loss-bench", "--frames", "3"], "no option"),
    (["python", "examples/train_world_modle.py"], "no examples/train_world_modle.py"),
    (["python", "-m", "fused_dreamer_loss.bnech"], "no module"),
    (["pip", "install", "-e", ".[tset]"], "no extra"),
    (["bash", ".ci/runn"], "no .ci/runn"),
])
def test_the_checks_catch_what_does_not_exist(words, problem):
    with pytest.raises(AssertionError, match=problem):
        check_command(words)
