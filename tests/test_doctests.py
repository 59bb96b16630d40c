"""Every docstring example in the package runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib

import pytest

# the feature modules are doctested beside their tests (test_inference, test_ddf, test_many_backends,
# test_term_tests), lmer / residuals / the crossed modules in test_lmer
MODULES = ["mixedjax.linalg", "mixedjax.covariance", "mixedjax.terms", "mixedjax.data", "mixedjax.likelihood",
           "mixedjax.optimize", "mixedjax.backends", "mixedjax.fit", "mixedjax.model", "mixedjax.results",
           "mixedjax.lindstrom_bates", "mixedjax.batch", "mixedjax.cache", "mixedjax.distributions",
           "mixedjax.export_cache"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
