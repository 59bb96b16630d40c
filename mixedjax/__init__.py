"""mixedjax: linear mixed effects models on a pure-JAX ML/REML likelihood.

Importing mixedjax enables JAX's float64 mode (``jax_enable_x64``), which is
process-global: statistical accuracy needs float64.  It also turns on JAX's persistent
compilation cache (:mod:`mixedjax.cache`; ``MIXEDJAX_CACHE=0`` leaves it off).  Set the environment
variable ``MIXEDJAX_ENABLE_X64=0`` before importing to leave JAX's setting alone
(float32 unless you enabled x64 yourself); see the README for float32 accuracy.
"""

from __future__ import annotations

import os
import sys

# jaxlib logs "Assume version compatibility ..." at WARNING for every program it loads from the persistent
# compilation cache (mixedjax.cache); its C++ log level is read once, when jaxlib loads.  Unless the user set
# it, show only errors (README, "Compiled programs are kept between processes").
_JAXLIB_PRELOADED = "jaxlib" in sys.modules
if not _JAXLIB_PRELOADED and os.environ.get("MIXEDJAX_CACHE", "1").strip().lower() not in ("0", "off", "false", "no"):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

if os.environ.get("MIXEDJAX_ENABLE_X64", "1") != "0":
    jax.config.update("jax_enable_x64", True)

from . import cache  # noqa: E402

cache.configure_from_environment(jaxlib_preloaded=_JAXLIB_PRELOADED)

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
