"""mixedjax: linear mixed effects models on a pure-JAX ML/REML likelihood.

Importing mixedjax enables JAX's float64 mode (``jax_enable_x64``), which is
process-global: statistical accuracy needs float64.  It also turns on JAX's persistent
compilation cache (:mod:`mixedjax.cache`; ``MIXEDJAX_CACHE=0`` leaves it off).  Set the environment
variable ``MIXEDJAX_ENABLE_X64=0`` before importing to leave JAX's setting alone
(float32 unless you enabled x64 yourself); see the README for float32 accuracy.

The import also moves every object alive at its end into the cyclic garbage collector's permanent
generation (:func:`gc.freeze`) and pauses the collector while JAX, pandas and SciPy import: those
hundreds of thousands of long-lived objects are then never scanned again, which saves ~0.3 s of
collections at import and ~0.3 s at interpreter exit.  ``MIXEDJAX_GC_FREEZE=0`` before importing
leaves the collector alone (README, "Global state").
"""

from __future__ import annotations

import gc
import os
import sys

_OFF = ("0", "off", "false", "no")
_GC_FREEZE = os.environ.get("MIXEDJAX_GC_FREEZE", "1").strip().lower() not in _OFF
_GC_WAS_ENABLED = gc.isenabled()
if _GC_FREEZE:
    gc.disable()  # enabled again below, whatever happens

try:
    # jaxlib logs "Assume version compatibility ..." at WARNING for every program it loads from the persistent
    # compilation cache (mixedjax.cache); its C++ log level is read once, when jaxlib loads.  Unless the user set
    # it, show only errors (README, "Compiled programs are kept between processes").
    _JAXLIB_PRELOADED = "jaxlib" in sys.modules
    if not _JAXLIB_PRELOADED and os.environ.get("MIXEDJAX_CACHE", "1").strip().lower() not in _OFF:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import jax

    if os.environ.get("MIXEDJAX_ENABLE_X64", "1") != "0":
        jax.config.update("jax_enable_x64", True)

    from . import cache

    cache.configure_from_environment(jaxlib_preloaded=_JAXLIB_PRELOADED)

    from . import backends, datasets
    from .batch import fit_batch
    from .fit import ConvergenceWarning, FittedModel, RefitWarning
    from .inference import anova, compare_lr_test
    from .lmer import lmer
    from .many import BatchResults
    from .model import MixedLM, fit_theta, mixedlm
    from .optimize import Result, Solution, minimize
    from .residuals import AR1, VarIdent
    from .results import LmerResults, MixedLMResults, OptimSummary

    # threadpoolctl's scan of the loaded libraries (for one BLAS thread during fits) reads /proc/self/maps: ~10 ms
    # now, up to 0.2 s in the middle of a first fit, once the process has mapped much more memory
    backends.blas_controller()
finally:
    if _GC_FREEZE:
        gc.freeze()  # what exists now lives as long as the process: never scanned again
        if _GC_WAS_ENABLED:
            gc.enable()

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
