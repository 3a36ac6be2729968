"""The package's layout is its architecture: a loss family imports the shared core, never another
family; the core imports no family; the public names and the flat layout's module paths stay."""

from __future__ import annotations

import ast
import doctest
import importlib
import pathlib
import pickle
import sys

import pytest

import fused_dreamer_loss
from fused_dreamer_loss.core import math as core_math

PACKAGE = pathlib.Path(fused_dreamer_loss.__file__).parent
FAMILIES = sorted(p.name for p in PACKAGE.iterdir()
                  if p.is_dir() and p.name not in ("core", "bench", "__pycache__")
                  and (p / "__init__.py").exists())


def imported_subpackages(path: pathlib.Path) -> set[str]:
    """The first-level subpackages of fused_dreamer_loss that a module imports."""
    depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for a top-level module
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] == "fused_dreamer_loss" and len(parts) > 1:
                    found.add(parts[1])
            elif node.level > depth:  # relative: climbs to the top package
                parts = (node.module or "").split(".")
                if parts[0]:
                    found.add(parts[0])
                else:
                    found.update(alias.name for alias in node.names)
            elif depth:
                found.add(path.relative_to(PACKAGE).parts[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "fused_dreamer_loss" and len(parts) > 1:
                    found.add(parts[1])
    return found


def test_there_are_families():
    assert {"world_model_v1", "world_model_v3", "behavior_v3"} <= set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_imports_the_core_and_never_another_family(family):
    for path in sorted((PACKAGE / family).rglob("*.py")):
        others = imported_subpackages(path) & (set(FAMILIES) - {family})
        assert not others, f"{path.relative_to(PACKAGE)} imports the family {sorted(others)}"


def test_the_core_imports_no_family():
    for path in sorted((PACKAGE / "core").rglob("*.py")):
        families = imported_subpackages(path) & set(FAMILIES)
        assert not families, f"{path.relative_to(PACKAGE)} imports {sorted(families)}"


def test_the_import_check_sees_a_cross_family_import(tmp_path, monkeypatch):
    """The check above can fail: a module of one family importing another is found."""
    family = tmp_path / "world_model_v3"
    family.mkdir()
    (family / "bad.py").write_text("from ..world_model_v1 import reference\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    assert imported_subpackages(family / "bad.py") == {"world_model_v1"}


@pytest.mark.parametrize("name", ["V3_CONVENTIONS", "FusedDreamerModelLoss",
                                  "FusedDreamerV3ModelLoss", "dreamer_model_loss",
                                  "dreamer_v3_model_loss", "BEHAVIOR_CONVENTIONS",
                                  "lambda_returns", "return_scale", "dreamer_v3_actor_loss",
                                  "dreamer_v3_value_loss", "replay_value_loss",
                                  "dreamer_v3_behavior_loss", "FusedDreamerV3ActorLoss",
                                  "FusedDreamerV3ValueLoss"])
def test_public_names(name):
    assert name in fused_dreamer_loss.__all__ and getattr(fused_dreamer_loss, name) is not None


@pytest.mark.parametrize("old, new", sorted(fused_dreamer_loss._FORMER_MODULES.items()))
def test_the_flat_layout_module_paths_still_import(old, new):
    """``import fused_dreamer_loss.reference_v3`` and friends give the family's module."""
    module = importlib.import_module(f"fused_dreamer_loss.{old}")
    assert module is importlib.import_module(f"fused_dreamer_loss.{new}")
    assert getattr(fused_dreamer_loss, old) is module


def test_a_pickle_naming_a_former_path_loads():
    """A pickle written with the flat layout names ``fused_dreamer_loss.module_v3``: it loads."""
    for old, name in (("module_v3", "FusedDreamerV3ModelLoss"), ("module", "FusedDreamerModelLoss"),
                      ("reference_v3", "dreamer_v3_model_loss")):
        loaded = pickle.loads(f"cfused_dreamer_loss.{old}\n{name}\n.".encode())
        assert loaded is getattr(importlib.import_module(f"fused_dreamer_loss.{old}"), name)


def test_core_math_docstrings():
    result = doctest.testmod(core_math, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
