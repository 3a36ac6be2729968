"""What a fresh clone meets before any loss runs: the supported triton range stated once in
pyproject.toml and the same in the README, the installed triton within it, the GPU script's
pytest options installed by the test extra, and README paths that lie inside the repository."""

from __future__ import annotations

import glob
import pathlib
import re
import shlex
import subprocess
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirement(name: str, extra: str | None = None) -> Requirement:
    found = [Requirement(r) for r in (PROJECT["optional-dependencies"][extra] if extra
                                      else PROJECT["dependencies"])]
    (wanted,) = [r for r in found if r.name == name]
    return wanted


def test_the_readme_states_the_triton_range_of_pyproject():
    triton = requirement("triton")
    stated = {SpecifierSet(s) for s in re.findall(r"`triton([<>=!~][\d.,<>=!~]+)`", README)}
    assert stated == {triton.specifier}, f"pyproject: triton{triton.specifier}, README: {stated}"


def test_the_installed_triton_is_in_the_supported_range():
    triton = pytest.importorskip("triton")
    assert Version(triton.__version__) in requirement("triton").specifier, triton.__version__


def test_the_gpu_scripts_pytest_options_are_installed_by_the_test_extra():
    dry = subprocess.run(["bash", str(ROOT / "bench" / "run_gpu_all.sh"), "--dry-run"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    (pytest_line,) = [shlex.split(line) for line in dry.splitlines() if " pytest " in line]
    if "-n" in pytest_line:
        assert requirement("pytest-xdist", "test")


def readme_paths() -> list[str]:
    """Paths the README names outside its code blocks, in backticks (each word of a command
    too) or links: words with a slash ending in a file suffix or a slash, less those that
    .gitignore lists (made by a command, e.g. ``.whl/``)."""
    prose = re.sub(r"```.*?```", "", README, flags=re.S)
    words = [w for span in re.findall(r"`([^`]+)`", prose) for w in span.split()]
    words += re.findall(r"\]\(([^)#:]+)\)", prose)
    ignored = {line.strip("/") for line in (ROOT / ".gitignore").read_text().split()}
    return sorted({w for w in words if re.search(r"\w/", w) and re.search(r"(\.[a-z]+|/)$", w)
                   and "://" not in w and w.strip("/") not in ignored})


def test_the_readme_names_paths_inside_the_repository_that_exist():
    paths = readme_paths()
    assert "bench/NOTES.md" in paths and "bench/wheels.sh" in README
    outside = [p for p in paths if p.startswith("..") or p.startswith("/")]
    assert not outside, f"paths outside the repository: {outside}"
    missing = [p for p in paths if not glob.glob(str(ROOT / p))]
    assert not missing, f"the README names paths that do not exist: {missing}"
