"""Structured residuals, as nlme's variance functions and correlation structures.

``ε_i ~ N(0, σ² R_i)`` with ``R_i = D_i C_i D_i``: ``D_i`` diagonal (prior weights and
:class:`VarIdent`'s per-stratum standard-deviation ratios) and ``C_i`` an AR(1)
correlation matrix (:class:`AR1`) or the identity.  The likelihood whitens each
padded group by ``R_i^{-1/2} = C_i^{-1/2} D_i^{-1}`` inside the objective and
then takes the iid cross-product path of :mod:`mixedjax.likelihood`, with
``log|R_i|`` entering through ``CrossProducts.sum_logw``.  AR(1) has a bidiagonal
inverse Cholesky factor, so whitening is O(n_i):

    ẽ_0 = e_0,   ẽ_t = (e_t − φ e_{t−1}) / sqrt(1 − φ²),   log|C_i| = (n_i − 1) log(1 − φ²).

The residual parameters join θ after the random-effects entries, unconstrained:
``log`` of each sd ratio (levels 2..K; the first level's ratio is 1), and
``atanh φ``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax import Array

from .covariance import CovStructure
from .data import CrossProducts, GroupedData, cross_products
from .likelihood import em_step, profile
from .optimize import Solution, minimize


@dataclass(frozen=True)
class VarIdent:
    """A residual variance per level of a factor (nlme ``varIdent(form = ~1 | by)``).

    The residual sd of a row in level k is ``sigma * ratio[k]``, with the first
    level's ratio 1 (levels in pandas category order, else sorted).

    Parameters
    ----------
    by : str or array_like
        Column name (formula APIs) or one label per row.

    Examples
    --------
    >>> import mixedjax
    >>> d = mixedjax.datasets.load("orthodont")
    >>> r = mixedjax.mixedlm("distance ~ age + Sex", d, groups="Subject",
    ...                      residual=mixedjax.VarIdent("Sex")).fit()
    >>> round(float(r.residual_structure["sd_ratio"]["Female"]), 4)
    0.4541
    """

    by: Any


@dataclass(frozen=True)
class AR1:
    """AR(1) correlation of the residuals within each group (nlme ``corAR1``).

    Rows of a group are sorted by ``time`` and the correlation of two rows is
    ``phi ** |lag|`` with lag the difference of their positions in that order:
    nlme's ``corAR1(form = ~1 | g)`` on rows in that order, which equals
    ``corAR1(form = ~time | g)`` for consecutive integer times.  Unequal spacing of
    ``time`` is ignored (only the order counts).

    Parameters
    ----------
    time : str or array_like
        Column name (formula APIs) or one value per row, ordering rows within a group.

    Examples
    --------
    >>> import mixedjax
    >>> d = mixedjax.datasets.load("oxboys")
    >>> r = mixedjax.mixedlm("height ~ age", d, groups="Subject", residual=mixedjax.AR1(time="age")).fit()
    >>> round(float(r.residual_structure["phi"]), 3)
    0.995
    """

    time: Any


class ResidualSpec(NamedTuple):
    """Static (hashable) description: ``n_strata`` VarIdent levels (0: none), ``ar1`` on/off."""

    n_strata: int = 0
    ar1: bool = False

    @property
    def n_params(self) -> int:
        return max(self.n_strata - 1, 0) + int(self.ar1)


class BoundResidual(NamedTuple):
    """A residual structure bound to a model's rows (host side)."""

    spec: ResidualSpec
    strata: np.ndarray | None        # (nobs,) stratum code per row
    strata_labels: list | None
    time: np.ndarray | None          # (nobs,) ordering variable
    varident: Any
    ar1: Any


def bind(residual: Any, frame: pd.DataFrame | None, nobs: int) -> BoundResidual | None:
    """Resolve column names / arrays of a residual structure (``VarIdent``, ``AR1`` or a list of both)."""
    if residual is None:
        return None
    items = list(residual) if isinstance(residual, list | tuple) else [residual]
    vi = [r for r in items if isinstance(r, VarIdent)]
    ar = [r for r in items if isinstance(r, AR1)]
    if len(vi) + len(ar) != len(items) or len(vi) > 1 or len(ar) > 1:
        raise ValueError(f"residual must be mixedjax.VarIdent(...), mixedjax.AR1(...) or a list of one of each; "
                         f"got {residual!r}")

    def column(v: Any, what: str) -> pd.Series:
        if isinstance(v, str):
            if frame is None or v not in frame.columns:
                raise ValueError(f"{what} column {v!r} is not in the data")
            return frame[v].reset_index(drop=True)
        s = pd.Series(np.asarray(v) if not isinstance(v, pd.Series) else v.to_numpy())
        if len(s) != nobs:
            raise ValueError(f"{what} has length {len(s)}; the data have {nobs} rows")
        return s

    strata = labels = time = None
    n_strata = 0
    if vi:
        s = column(vi[0].by, "VarIdent")
        if isinstance(s.dtype, pd.CategoricalDtype):
            s = s.cat.remove_unused_categories()
            codes, labels = s.cat.codes.to_numpy(), list(s.cat.categories)
        else:
            codes, uniq = pd.factorize(s, sort=True)
            labels = list(uniq)
        if np.any(codes < 0):
            raise ValueError("VarIdent: the stratum variable has missing values")
        strata, n_strata = np.asarray(codes, np.int64), len(labels)
        if n_strata < 2:
            raise ValueError(f"VarIdent({vi[0].by!r}) needs at least two levels; found {labels}")
    if ar:
        t = column(ar[0].time, "AR1 time")
        time = t.to_numpy(dtype=float)
        if not np.all(np.isfinite(time)):
            raise ValueError("AR1: the time variable has missing or infinite values")
    return BoundResidual(ResidualSpec(n_strata, bool(ar)), strata, labels, time, vi[0] if vi else None,
                         ar[0] if ar else None)


def time_positions(codes: np.ndarray, time: np.ndarray) -> np.ndarray:
    """Position of each row within its group after sorting the group's rows by ``time`` (stable)."""
    order = np.lexsort((np.arange(len(codes)), time, codes))
    sizes = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    position = np.empty(len(codes), dtype=np.int64)
    position[order] = np.arange(len(codes)) - starts[codes[order]]
    return position


def whitened_cross_products(data: GroupedData, strata: Array, rho: Array, spec: ResidualSpec) -> CrossProducts:
    """Cross-products of ``R_i^{-1/2}``-whitened padded blocks; ``sum_logw = −Σ log|R_i|``.

    ``strata (G, n_max)`` stratum codes (0 on padding); ``rho`` the unconstrained
    residual parameters (log sd ratios of levels 2..K, then atanh φ).
    """
    mask = data.mask
    real = mask > 0
    w = jnp.where(real, data.w, 1.0)
    log_d = -0.5 * jnp.log(w)  # log sd multiplier of each row (prior weights)
    k = 0
    if spec.n_strata:
        log_ratio = jnp.concatenate([jnp.zeros(1, rho.dtype), rho[: spec.n_strata - 1]])
        log_d = log_d + log_ratio[strata]
        k = spec.n_strata - 1
    log_d = jnp.where(real, log_d, 0.0)
    s = jnp.exp(-log_d) * mask
    y, x, z = data.y * s, data.x * s[..., None], data.z * s[..., None]
    logdet_r = 2.0 * jnp.sum(log_d)
    if spec.ar1:
        r = rho[k]
        phi = jnp.tanh(r)
        log_cosh = jnp.logaddexp(r, -r) - jnp.log(2.0)  # 1 − φ² = 1 / cosh² r
        inv_s = jnp.exp(log_cosh)

        def filt(a: Array) -> Array:
            prev = jnp.concatenate([jnp.zeros_like(a[:, :1]), a[:, :-1]], axis=1)
            out = (a - phi * prev) * inv_s
            first = (jnp.arange(a.shape[1]) == 0).reshape((1, -1) + (1,) * (a.ndim - 2))
            return jnp.where(first, a, out)

        y = filt(y) * mask
        x = filt(x) * mask[..., None]
        z = filt(z) * mask[..., None]
        n = jnp.sum(mask, axis=1)
        logdet_r = logdet_r - 2.0 * log_cosh * jnp.sum(jnp.maximum(n - 1.0, 0.0))
    cp = cross_products(GroupedData(y, x, z, mask, mask))
    return cp._replace(sum_logw=-logdet_r)


def residual_start(spec: ResidualSpec) -> np.ndarray:
    """Start: equal variances, no correlation."""
    return np.zeros(spec.n_params)


@functools.partial(jax.jit, static_argnames=("structure", "spec", "maxiter", "gtol", "em_iter"))
def fit_theta_structured(
    theta0: Array,
    data: GroupedData,
    strata: Array,
    zmask: Array,
    structure: CovStructure,
    spec: ResidualSpec,
    reml: bool = True,
    maxiter: int = 200,
    gtol: float = 1e-6,
    em_iter: int = 50,
) -> Solution:
    """:func:`mixedjax.fit_theta` with the residual parameters appended to θ (pure JAX, jitted).

    The EM warm start updates the random-effects part at fixed residual parameters.
    """
    n_re = structure.n_theta

    def objective(t):
        cp = whitened_cross_products(data, strata, t[n_re:], spec)
        return profile(t[:n_re], cp, structure, reml).deviance

    def warm(t):
        cp = whitened_cross_products(data, strata, t[n_re:], spec)
        return jnp.concatenate([em_step(t[:n_re], cp, zmask, structure, reml), t[n_re:]])

    return minimize(objective, theta0, warm_step=warm, n_warm=em_iter, maxiter=maxiter, gtol=gtol)


whitened_cross_products_jit = jax.jit(whitened_cross_products, static_argnames=("spec",))


def describe(bound: BoundResidual, rho: np.ndarray) -> dict:
    """Natural-scale residual parameters: ``sd_ratio`` (Series by level) and/or ``phi``."""
    out: dict = {}
    k = 0
    if bound.spec.n_strata:
        ratios = np.exp(np.concatenate([[0.0], rho[: bound.spec.n_strata - 1]]))
        out["sd_ratio"] = pd.Series(ratios, index=bound.strata_labels, name="sd_ratio")
        k = bound.spec.n_strata - 1
    if bound.spec.ar1:
        out["phi"] = float(np.tanh(rho[k]))
    return out
