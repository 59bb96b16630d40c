"""Host-side reference distributions (normal, t, F, χ²) for p-values and critical values.

``stats`` is :mod:`scipy.stats`, imported on first use: ``import scipy.stats`` takes about 0.7 s, a third of
``import mixedjax``, and a fit that prints no p-values never needs it.

Examples
--------
>>> from mixedjax.distributions import stats
>>> round(float(stats.norm.ppf(0.975)), 4)
1.96
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np
from scipy import special


class _LazyModule:
    """A module imported at its first attribute access."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


stats = _LazyModule("scipy.stats")


class StandardNormal:
    """``N(0, 1)``'s ``cdf``, ``sf``, ``ppf`` and ``isf`` through :mod:`scipy.special` (what ``scipy.stats.norm``
    computes, the same numbers), without importing :mod:`scipy.stats` (about 1 s): a summary's z-tests.

    >>> round(float(norm.ppf(0.975)), 4), float(norm.sf(0.0))
    (1.96, 0.5)
    """

    @staticmethod
    def cdf(x: Any) -> Any:
        return special.ndtr(x)

    @staticmethod
    def sf(x: Any) -> Any:
        return special.ndtr(-np.asarray(x))

    @staticmethod
    def ppf(q: Any) -> Any:
        return special.ndtri(q)

    @staticmethod
    def isf(q: Any) -> Any:
        return -special.ndtri(q)


norm = StandardNormal()
