"""mixedjax: linear mixed effects models on a pure-JAX ML/REML likelihood.

Importing mixedjax enables JAX's float64 mode (``jax_enable_x64``), which is
process-global: statistical accuracy needs float64.  Set the environment
variable ``MIXEDJAX_ENABLE_X64=0`` before importing to leave JAX's setting alone
(float32 unless you enabled x64 yourself); see the README for float32 accuracy.
"""

from __future__ import annotations

import os

import jax

if os.environ.get("MIXEDJAX_ENABLE_X64", "1") != "0":
    jax.config.update("jax_enable_x64", True)

from . import datasets  # noqa: E402
from .batch import fit_batch  # noqa: E402
from .fit import ConvergenceWarning, FittedModel, RefitWarning  # noqa: E402
from .inference import anova, compare_lr_test  # noqa: E402
from .lmer import lmer  # noqa: E402
from .many import BatchResults  # noqa: E402
from .model import MixedLM, fit_theta, mixedlm  # noqa: E402
from .optimize import Result, Solution, minimize  # noqa: E402
from .residuals import AR1, VarIdent  # noqa: E402
from .results import LmerResults, MixedLMResults, OptimSummary  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BatchResults",
    "fit_batch",
    "AR1",
    "VarIdent",
    "ConvergenceWarning",
    "FittedModel",
    "RefitWarning",
    "anova",
    "compare_lr_test",
    "LmerResults",
    "MixedLM",
    "MixedLMResults",
    "OptimSummary",
    "Result",
    "Solution",
    "datasets",
    "fit_theta",
    "lmer",
    "minimize",
    "mixedlm",
]
