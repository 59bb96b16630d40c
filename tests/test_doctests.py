"""Every docstring example in the package runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["mixedjax.linalg", "mixedjax.covariance", "mixedjax.data", "mixedjax.likelihood", "mixedjax.optimize",
           "mixedjax.model", "mixedjax.results", "mixedjax.lindstrom_bates"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
