"""The fit driver, once for every backend: start, optimise, sign normalisation, profiled estimates.

:func:`fit` returns a :class:`FittedModel`, the one object every feature reads
(:mod:`mixedjax.ddf`, :mod:`mixedjax.profile`, :mod:`mixedjax.bootstrap`,
:mod:`mixedjax.predict`, ...): the backend and its data, θ̂, ρ̂, β̂, σ̂², Cov(β̂), the
deviance and how the optimisation went.  :func:`refit` fits it again to a new response
or by the other criterion, and reports its own failures (:class:`RefitWarning`).

Examples
--------
>>> import mixedjax
>>> d = mixedjax.datasets.load("sleepstudy")
>>> md = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", re_formula="~Days")
>>> fm = fit(md.backend, md.backend_data, reml=True)
>>> round(-0.5 * fm.deviance, 4), refit(fm, reml=False).reml
(-871.8141, False)
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import terms as tm
from .backends import SNAP_TOL, deviance, profiled_jit, single_threaded_blas
from .export_cache import cached_jit, writes_after
from .optimize import Result, Solution, minimize


class ConvergenceWarning(UserWarning):
    """A fit did not converge, or converged to a singular (boundary) estimate."""


class RefitWarning(ConvergenceWarning):
    """A refit made by a feature (an ML refit for a likelihood-ratio test or a profile) did not converge."""


class FittedModel(NamedTuple):
    """A fitted model as every feature sees it (a pytree of host arrays plus the static backend).

    Attributes
    ----------
    backend : GroupedBackend or CrossedBackend
    data : the backend's data pytree
    theta : (n_theta,) θ̂ (sign-normalised), ``rho`` : (n_rho,) residual parameters (unconstrained)
    beta : (p,) β̂;  sigma2 : σ̂²;  cov_beta : (p, p) ``σ̂² (X'V⁻¹X)⁻¹``
    deviance : the minimised profiled deviance;  reml : the criterion
    solution : :class:`mixedjax.optimize.Solution` of the optimiser
    rows : ``None``, or a function returning ``data`` with the rows laid out, for the features that
        need rows when ``data`` has only what the likelihood needs (:func:`with_rows`)
    """

    backend: Any
    data: Any
    theta: np.ndarray
    rho: np.ndarray
    beta: np.ndarray
    sigma2: float
    cov_beta: np.ndarray
    deviance: float
    reml: bool
    solution: Solution
    rows: Any = None

    @property
    def theta_full(self) -> np.ndarray:
        """The optimiser's vector ``concat(θ, ρ)``."""
        return np.concatenate([self.theta, self.rho])

    @property
    def converged(self) -> bool:
        return bool(Result(int(self.solution.result)) <= Result.NO_PROGRESS)

    @property
    def result(self) -> Result:
        return Result(int(self.solution.result))

    @property
    def llf(self) -> float:
        return -0.5 * self.deviance


def with_rows(fm: FittedModel) -> Any:
    """``fm``'s data with the rows laid out (what ``fittedvalues``, simulation, the bootstrap, Kenward–Roger
    and refits to a new response read): ``fm.data`` itself unless it was fitted from cross-products alone."""
    return fm.data if fm.rows is None else fm.rows()


def estimates(backend: Any, data: Any, theta_full: np.ndarray, reml: bool, solution: Solution,
              rows: Any = None, profiled: Any = None) -> FittedModel:
    """The :class:`FittedModel` at a given ``concat(θ, ρ)`` (sign-normalised here, the one place).

    ``profiled``: the :class:`mixedjax.likelihood.Profiled` fit at ``theta_full`` when the optimiser has
    it (the sign of a term's columns changes nothing in it), else it is computed here.
    """
    theta_full = np.asarray(theta_full, float)
    theta = tm.normalize_theta(theta_full[: backend.n_theta], backend.terms)
    rho = theta_full[backend.n_theta :]
    if profiled is not None:
        pr = jax.device_get(profiled)
    else:
        with single_threaded_blas():  # OpenBLAS's spinning threads beside XLA's pool: 0.6 s instead of 0.03 s
            pr = jax.device_get(profiled_jit(backend, jax.device_put(np.concatenate([theta, rho])), data,
                                             np.asarray(bool(reml))))
    sigma2 = float(pr.sigma2)
    a = np.asarray(pr.normal.a, float)
    try:
        cov_beta = sigma2 * np.linalg.inv(a)
    except np.linalg.LinAlgError:
        cov_beta = np.full_like(a, np.nan)
    return FittedModel(backend, data, theta, rho, np.asarray(pr.beta, float), sigma2, cov_beta,
                       float(pr.deviance), bool(reml), solution, rows)


def start_theta(backend: Any, start: Any = None) -> np.ndarray:
    """``concat(θ, ρ)`` to start from: lme4's ``T_k = I`` and ρ = 0 (equal variances, no correlation)."""
    if start is None:
        return np.concatenate([tm.theta_start(backend.terms), np.zeros(backend.n_rho)])
    start = np.asarray(start, float)
    if start.size == backend.n_theta:
        return np.concatenate([start, np.zeros(backend.n_rho)])
    if start.size != backend.n_theta + backend.n_rho:
        raise ValueError(f"start has {start.size} entries; this model has {backend.n_theta} random-effects "
                         f"parameters and {backend.n_rho} residual parameters")
    return start


def fit(backend: Any, data: Any, reml: bool = True, start: Any = None, *, rows: Any = None,
        **options: Any) -> FittedModel:
    """Fit by REML or ML: the backend's optimiser from ``start`` (``concat(θ, ρ)`` or θ), then the estimates.

    ``options`` go to the backend's optimiser (``maxiter``, ``gtol``, ``em_iter`` for the
    per-group BFGS; ``maxiter``, ``ftol``, ``scales`` for the crossed derivative-free fit);
    ``rows`` to the :class:`FittedModel` (a model's ``rows_data``).
    """
    theta0 = start_theta(backend, start)
    with writes_after():  # the programs' exports wait for the fit: its evaluations may use every core
        sol, at_end = backend.minimize(theta0, data, bool(reml), **options)
        return estimates(backend, data, np.asarray(sol.x, float), reml, sol, rows, at_end)


def refit(fm: FittedModel, y: Any = None, reml: bool | None = None, start: Any = None, *,
          what: str = "refit", **options: Any) -> FittedModel:
    """Fit ``fm``'s model again: to a new response ``y`` (row order) and/or by another criterion.

    Starts at ``fm``'s estimate unless ``start`` is given.  A refit that does not converge
    warns with :class:`RefitWarning` naming ``what`` it was for (never silently); one that
    fails raises :class:`FloatingPointError`.
    """
    data = fm.data if y is None else fm.backend.with_response(with_rows(fm), jnp.asarray(np.asarray(y, float)))
    reml = fm.reml if reml is None else bool(reml)
    out = fit(fm.backend, data, reml, fm.theta_full if start is None else start, rows=fm.rows if y is None else None,
              **options)
    if not np.isfinite(out.deviance):
        raise FloatingPointError(f"the {what} failed: the deviance is not finite at its end ({out.result.message})")
    if not out.converged:
        warnings.warn(f"the {what} did not converge: {out.result.message} (max |gradient| "
                      f"{float(out.solution.grad_norm):.2e})", RefitWarning, stacklevel=2)
    return out


def _constrained_deviance(x: jax.Array, base: jax.Array, free_idx: jax.Array, backend: Any, data: Any,
                          reml: Any) -> jax.Array:
    return deviance(backend, base.at[free_idx].set(x), data, reml)


@cached_jit(static_argnames=("snap", "backend"))
def _minimize_constrained(x0: jax.Array, base: jax.Array, free_idx: jax.Array, snap: tuple, backend: Any,
                          data: Any, reml: Any) -> Solution:
    return minimize(lambda x: _constrained_deviance(x, base, free_idx, backend, data, reml), x0, maxiter=500,
                    gtol=1e-7, snap=np.array(snap, bool), snap_tol=SNAP_TOL)


@cached_jit(static_argnames=("backend",))
def _deviance_at(theta: jax.Array, backend: Any, data: Any, reml: Any) -> jax.Array:
    return deviance(backend, theta, data, reml)


def fit_constrained(fm: FittedModel, free: np.ndarray, *, what: str = "constrained refit") -> FittedModel:
    """Refit ``fm``'s model with the entries of ``concat(θ, ρ)`` outside the boolean mask ``free`` held at 0.

    A random-effects term dropped (its ``T_k = 0``) or reduced (e.g. ``(1 + x | g)`` to ``(1 | g)``: only
    ``T_k[0, 0]`` free) is this refit, on the same data and fixed effects, for every backend (lmerTest's
    ``ranova``).  BFGS on ``jax.grad`` of the deviance from ``fm``'s estimate; with nothing free the
    deviance is evaluated at the constraint (a linear model when every term is dropped).  Warns with
    :class:`RefitWarning` when the refit does not converge.
    """
    free = np.asarray(free, bool)
    base = np.where(free, fm.theta_full, 0.0)
    idx = np.flatnonzero(free)
    if idx.size == 0:
        dev = float(_deviance_at(jnp.asarray(base), fm.backend, fm.data, np.asarray(fm.reml)))
        sol = Solution(x=base, value=dev, grad=np.zeros(0), x_start=base, value_start=dev, iterations=0,
                       warm_iterations=0, polish_iterations=0, evaluations=1, grad_norm=0.0,
                       result=int(Result.CONVERGED))
        return estimates(fm.backend, fm.data, base, fm.reml, sol, fm.rows)
    diag = np.concatenate([tm.diagonal_theta(fm.backend.terms), np.zeros(fm.backend.n_rho, bool)])
    sol = jax.device_get(_minimize_constrained(jnp.asarray(base[idx]), jnp.asarray(base), jnp.asarray(idx),
                                               tuple(bool(v) for v in diag[idx]), fm.backend, fm.data,
                                               np.asarray(fm.reml)))
    full = base.copy()
    full[idx] = np.asarray(sol.x)
    out = estimates(fm.backend, fm.data, full, fm.reml, sol, fm.rows)
    if not out.converged:
        warnings.warn(f"the {what} did not converge: {out.result.message}", RefitWarning, stacklevel=2)
    return out
