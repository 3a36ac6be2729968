"""The examples in the docstrings run and print what they say."""

import doctest

import pytest

import fused_dreamer_loss.functional
import fused_dreamer_loss.module
import fused_dreamer_loss.reference


@pytest.mark.parametrize("module", [fused_dreamer_loss.functional, fused_dreamer_loss.module,
                                    fused_dreamer_loss.reference], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
