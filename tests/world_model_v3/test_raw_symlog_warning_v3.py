"""A head that symlogs integer (uint8) targets symlogs the raw values 0...255, as torchrl does (the
``torchrl`` and ``torchrl-recipe`` conventions): a UserWarning says so, once a process."""

from __future__ import annotations

import warnings

import pytest
import torch
from tests.world_model_v3.helpers_v3 import make_v3_inputs

from fused_dreamer_loss import V3_CONVENTIONS, dreamer_v3_model_loss
from fused_dreamer_loss.world_model_v3 import validation


@pytest.fixture
def fresh(monkeypatch):
    """As in a new process: the warning not shown yet."""
    monkeypatch.setattr(validation, "_warned", set())


def raw_symlog_warnings(**options) -> list[str]:
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        dreamer_v3_model_loss(**make_v3_inputs(), backend="torch", **options)
    return [str(r.message) for r in records if "raw values (0...255)" in str(r.message)]


@pytest.mark.parametrize("convention", ["torchrl", "torchrl-recipe"])
def test_the_conventions_that_symlog_raw_frames_warn_once(fresh, convention):
    first = raw_symlog_warnings(**V3_CONVENTIONS[convention])
    assert len(first) == 1 and "pixels holds integer frames (torch.uint8)" in first[0]
    assert "use reco_symlog=False" in first[0] and first[0].endswith("Shown once.")
    assert raw_symlog_warnings(**V3_CONVENTIONS[convention]) == []


@pytest.mark.parametrize("options", [dict(reco_symlog="target"), dict(reco_symlog=[True])])
def test_every_symlog_mode_of_a_uint8_head_warns(fresh, options):
    assert len(raw_symlog_warnings(**options)) == 1


def test_no_warning_where_nothing_is_symlogged_raw(fresh):
    assert raw_symlog_warnings(**V3_CONVENTIONS["dreamerv3-2024"]) == []
    floats = make_v3_inputs(uint8=False)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        dreamer_v3_model_loss(**floats, reco_symlog=True, backend="torch")
    assert not [r for r in records if "raw values" in str(r.message)]


def test_no_warning_while_compiling(fresh):
    """torch.compile(fullgraph=True) cannot trace a warning: none is raised under it."""
    inputs = make_v3_inputs()
    compiled = torch.compile(lambda **kw: dreamer_v3_model_loss(**kw, backend="torch"),
                             fullgraph=True, backend="eager")
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        compiled(**inputs)
    assert not [r for r in records if "raw values" in str(r.message)]
