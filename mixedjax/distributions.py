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
