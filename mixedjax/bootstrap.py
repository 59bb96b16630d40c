"""Parametric bootstrap: simulate from the fitted model and refit every replicate in one jitted, vmapped call.

Written once against the backend interface (:mod:`mixedjax.backends`), so it serves
every model kind: one grouping factor, nested factors, structured residuals
(VarIdent, AR(1): ρ is refitted with θ) and crossed factors.

``y* = X β̂ + Z b* + ε*`` with ``b*_k = σ̂ u T̂_kᵀ`` per term, ``u ~ N(0, I)``, and
``ε* ~ N(0, σ̂² R̂ / w)`` (:func:`mixedjax.backends.simulate_one`; JAX's
counter-based PRNG, so a seed gives the same draws on any device and batch size).
Each replicate's response enters the backend's data through ``with_response``
(everything response-free is reused) and is refitted by the backend's pure-JAX
optimiser (``minimize_jax``) inside one ``vmap``: no Python loop over replicates.
Per-group models with iid residuals take the same fits through
:func:`mixedjax.backends.fit_grouped_many`, whose working set keeps a few slow
replicates from making every lane iterate as long (:func:`working_width`).
lme4's ``bootMer`` with ``use.u = FALSE``; percentile intervals.

Examples
--------
>>> import mixedjax
>>> d = mixedjax.datasets.load("penicillin")
>>> r = mixedjax.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", d)
>>> b = bootstrap(r, n=8, seed=1)
>>> list(b.replicates.columns[:4]), b.n_failed
(['sd_(Intercept)|plate', 'sd_(Intercept)|sample', 'sigma', '(Intercept)'], 0)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from . import terms as tm
from .backends import FAST_COMPILE, SINGLE_FIT, GroupedBackend, fit_grouped_many, profiled, simulate_one
from .fit import with_rows
from .optimize import Result

if TYPE_CHECKING:
    from .results import MixedLMResults


def _key(seed: Any) -> jax.Array:
    """A PRNG key from an int seed (or a key passed through)."""
    if isinstance(seed, jax.Array) and seed.dtype == jnp.uint32:
        return seed
    return jax.random.PRNGKey(0 if seed is None else int(seed))


def _simulate_impl(key: jax.Array, theta: jax.Array, beta: jax.Array, sigma2: jax.Array, data: Any, backend: Any,
                   n: int) -> jax.Array:
    keys = jax.random.split(key, n)
    return jax.vmap(lambda k: simulate_one(backend, k, theta, beta, sigma2, data))(keys)


_simulate = jax.jit(_simulate_impl, static_argnames=("backend", "n"), compiler_options=FAST_COMPILE)


class BootOut(NamedTuple):
    """Per replicate: ``theta`` (``concat(θ, ρ)``), ``beta``, ``sigma2``, ``deviance``, optimiser ``result``."""

    theta: jax.Array
    beta: jax.Array
    sigma2: jax.Array
    deviance: jax.Array
    result: jax.Array


def _bootstrap_impl(key: jax.Array, theta: jax.Array, beta: jax.Array, sigma2: jax.Array, theta0: jax.Array,
                    data: Any, backend: Any, reml: jax.Array, n: int, maxiter: int, gtol: float,
                    em_iter: int, working: int | None) -> BootOut:
    """Simulate ``n`` responses and refit each (one program)."""
    # the same keys as simulate(): replicate k refits the k-th simulated response
    keys = jax.random.split(key, n)

    def response_data(k):
        return backend.with_response(data, simulate_one(backend, k, theta, beta, sigma2, data))

    if isinstance(backend, GroupedBackend) and backend.n_rho == 0:
        # per-group iid: the same fits as backend.minimize_jax (minimize_many follows each problem's own
        # iterations), with a working set of lanes so that a few slow replicates (150 iterations where the
        # median is 13) do not make all n lanes iterate as long
        cps = jax.vmap(lambda k: response_data(k).cp)(keys)
        zmask = jnp.broadcast_to(data.zmask, (n,) + data.zmask.shape)
        sol = fit_grouped_many(theta0, cps, zmask, backend.structure, reml, maxiter, gtol, em_iter, working)
        pr = jax.vmap(lambda th, cp: profiled(backend, th, data._replace(cp=cp), reml))(sol.x, cps)
        return BootOut(sol.x, pr.beta, pr.sigma2, pr.deviance, sol.result)

    def one(k):
        d = response_data(k)
        sol = backend.minimize_jax(theta0, d, reml, maxiter, gtol, em_iter)
        pr = profiled(backend, sol.x, d, reml)
        return BootOut(sol.x, pr.beta, pr.sigma2, pr.deviance, sol.result)

    return jax.vmap(one)(keys)


def working_width(n: int) -> int | None:
    """Working-set width of the per-group iid refits: a quarter of the replicates, at least 64 (plain lanes
    below 256 replicates).  1000 sleepstudy refits, CPU time over 12 seeds (2 cores): plain lanes mean 0.79 s,
    worst 2.4 s; a working set of 250 mean 0.49 s, worst 0.77 s (XLA optimisation level 0; full optimisation:
    0.11 s / 0.27 s against 0.08 s / 0.12 s)."""
    return None if n < 256 else max(64, n // 4)


_STATIC = ("backend", "n", "maxiter", "gtol", "em_iter", "working")
_bootstrap = jax.jit(_bootstrap_impl, static_argnames=_STATIC, compiler_options=FAST_COMPILE)
# XLA's backend optimisation level 0: on 2 CPU cores the vmapped sleepstudy fit compiles in ~2 s instead of ~5 s
# and then runs ~3x slower (1000 refits: 0.4 s instead of 0.12 s); a bootstrap is usually run once
_bootstrap_fast_compile = jax.jit(_bootstrap_impl, static_argnames=_STATIC, compiler_options=SINGLE_FIT)


def simulate(res: MixedLMResults, n: int = 1, seed: Any = 0) -> np.ndarray:
    """``n`` responses simulated from a fit, ``(nobs, n)`` in the model's row order.

    See :meth:`mixedjax.MixedLMResults.simulate`.  Column ``k`` is the response that
    :func:`bootstrap` with the same ``seed`` refits as replicate ``k``.

    Examples
    --------
    >>> import mixedjax
    >>> d = mixedjax.datasets.load("orthodont")
    >>> r = mixedjax.mixedlm("distance ~ age + Sex", d, groups="Subject", residual=mixedjax.VarIdent("Sex")).fit()
    >>> simulate(r, 5, seed=2).shape
    (108, 5)
    """
    if int(n) < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    fm = res.fitted
    ys = _simulate(_key(seed), jnp.asarray(fm.theta_full), jnp.asarray(fm.beta), jnp.asarray(fm.sigma2), with_rows(fm),
                   fm.backend, int(n))
    return np.asarray(ys).T


def _group_names(res: MixedLMResults) -> list[str]:
    """lme4's grouping name of each term (``Subject``, ``cask:batch``), made unique only where two terms would
    produce the same column name (lme4 keeps ``sd_(Intercept)|g`` and ``sd_x|g`` for ``(1 + x || g)``)."""
    infos = res.model.term_info
    seen: set[str] = set()
    out = []
    for info, unique in zip(infos, res.term_labels, strict=True):
        cols = {f"sd_{nm}|{info.label}" for nm in info.names}
        label = info.label if not (cols & seen) else unique
        seen |= {f"sd_{nm}|{label}" for nm in info.names}
        out.append(label)
    return out


def lme4_scale(res: MixedLMResults, theta: np.ndarray, beta: np.ndarray,
               sigma2: np.ndarray) -> tuple[list[str], np.ndarray]:
    """lme4's parameter names and values for M fits of ``res``'s model, in the row order of lme4's ``confint``.

    Per random-effects term, in lme4's term order (more levels first): ``sd_<col>|<group>``
    and ``cor_<col_i>.<col_j>|<group>``; then the residual-structure parameters on their
    natural scale (``model.residual_param_names``: VarIdent sd ratios, AR(1) ``Phi``),
    ``sigma`` and the fixed effects (``(Intercept)``).

    Parameters
    ----------
    theta : (M, n_theta + n_rho)
        ``concat(θ, ρ)`` of each fit (any column signs).
    beta : (M, p)
    sigma2 : (M,)

    Returns
    -------
    names : list of str
    values : (M, len(names))

    Examples
    --------
    >>> import mixedjax, numpy as np
    >>> d = mixedjax.datasets.load("sleepstudy")
    >>> r = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", re_formula="~Days").fit()
    >>> names, vals = lme4_scale(r, r.fitted.theta_full[None], r.fitted.beta[None], np.array([r.scale]))
    >>> names[:3], round(float(vals[0, 3]), 3)
    (['sd_(Intercept)|Subject', 'cor_Days.(Intercept)|Subject', 'sd_Days|Subject'], 25.592)
    """
    fm = res.fitted
    backend = fm.backend
    theta = np.atleast_2d(np.asarray(theta, float))
    m = theta.shape[0]
    beta = np.asarray(beta, float).reshape(m, -1)
    sigma2 = np.asarray(sigma2, float).reshape(m)
    infos = res.model.term_info
    groups = _group_names(res)
    slices = tm.theta_slices(backend.terms)
    order = sorted(range(len(infos)), key=lambda k: -infos[k].n_levels)  # stable: lme4 sorts terms by levels
    names, vals = [], []
    for k in order:
        t, info, sl = backend.terms[k], infos[k], slices[k]
        r, c = t.positions()
        lam = np.zeros((m, t.q, t.q))
        lam[:, r, c] = theta[:, sl]
        cov = lam @ lam.transpose(0, 2, 1) * sigma2[:, None, None]
        sd = np.sqrt(np.clip(np.diagonal(cov, axis1=1, axis2=2), 0, None))
        for j in range(t.q):
            names.append(f"sd_{info.names[j]}|{groups[k]}")
            vals.append(sd[:, j])
            if t.diagonal:
                continue
            for i in range(j + 1, t.q):
                names.append(f"cor_{info.names[i]}.{info.names[j]}|{groups[k]}")
                with np.errstate(invalid="ignore", divide="ignore"):
                    vals.append(np.where(sd[:, i] * sd[:, j] > 0, cov[:, i, j] / (sd[:, i] * sd[:, j]), np.nan))
    if backend.n_rho:
        names += list(res.model.residual_param_names)
        rho = theta[:, backend.n_theta :]
        nat = np.stack([np.asarray(backend.rho_to_natural(row)) for row in rho])
        vals += list(nat.T)
    names.append("sigma")
    vals.append(np.sqrt(sigma2))
    names += ["(Intercept)" if n == "Intercept" else str(n) for n in res.model.exog_names]
    vals += list(beta.T)
    return names, np.column_stack(vals)


class BootstrapResults:
    """Replicates of a parametric bootstrap (:meth:`mixedjax.MixedLMResults.bootstrap`).

    Attributes
    ----------
    replicates : pandas.DataFrame
        One row per replicate: lme4's ``sd_…|group`` / ``cor_…|group`` columns, the
        residual-structure parameters (natural scale), ``sigma``, the fixed effects,
        ``llf`` and ``converged`` (:func:`lme4_scale`).
    estimate : pandas.Series
        The original fit's values of the same parameters.
    n, n_failed : replicates drawn, and those whose refit did not converge (left out
        of the intervals).
    """

    def __init__(self, res: MixedLMResults, out: BootOut, seed: Any) -> None:
        fm = res.fitted
        names, values = lme4_scale(res, np.asarray(out.theta), np.asarray(out.beta), np.asarray(out.sigma2))
        df = pd.DataFrame(values, columns=names)
        llf = -0.5 * np.asarray(out.deviance, float)
        df["llf"] = llf
        df["converged"] = (np.asarray(out.result) <= Result.NO_PROGRESS) & np.isfinite(llf)
        self.replicates = df
        self.names = names
        _, est = lme4_scale(res, fm.theta_full[None, :], np.asarray(fm.beta)[None, :], np.array([fm.sigma2]))
        self.estimate = pd.Series(est[0], index=names)
        self.n = len(df)
        self.n_failed = int((~df["converged"]).sum())
        self.seed = seed
        self.method = res.method

    def conf_int(self, alpha: float = 0.05) -> pd.DataFrame:
        """Percentile intervals (lme4's ``confint(method = "boot", boot.type = "perc")``), lme4's rows."""
        ok = self.replicates[self.replicates["converged"]]
        vals = ok[self.names].to_numpy()
        lo = np.nanquantile(vals, alpha / 2, axis=0)
        hi = np.nanquantile(vals, 1 - alpha / 2, axis=0)
        return pd.DataFrame({f"{100 * alpha / 2:g} %": lo, f"{100 * (1 - alpha / 2):g} %": hi}, index=self.names)

    def bias(self) -> pd.Series:
        """Mean of the (converged) replicates minus the estimate."""
        ok = self.replicates[self.replicates["converged"]]
        return ok[self.names].mean() - self.estimate

    def __repr__(self) -> str:
        return (f"<BootstrapResults: {self.n} replicates ({self.method}), {self.n_failed} not converged>\n"
                f"{self.conf_int().to_string()}")


def bootstrap(res: MixedLMResults, n: int = 1000, seed: Any = 0, maxiter: int = 200, gtol: float = 1e-6,
              em_iter: int = 10, fast_compile: bool = True, working: int | None = None) -> BootstrapResults:
    """Parametric bootstrap of a fit: ``n`` simulated responses, all refitted in one jitted, vmapped call.

    See :meth:`mixedjax.MixedLMResults.bootstrap`.  Every replicate is refitted by the
    fit's criterion with the backend's pure-JAX optimiser (per-group models: EM warm
    start, at most ``em_iter`` steps, then BFGS; crossed models: BFGS on the autodiff
    gradient), starting at the estimate, to ``gtol`` on the largest gradient entry.
    ``fast_compile`` compiles at XLA's optimisation level 0 (less compile time, slower
    refits).  ``working``: the number of lanes the per-group iid refits advance at once
    (default :func:`working_width`; speed only, the fits are the same).

    Examples
    --------
    >>> import mixedjax
    >>> d = mixedjax.datasets.load("orthodont")
    >>> r = mixedjax.mixedlm("distance ~ age + Sex", d, groups="Subject", residual=mixedjax.VarIdent("Sex")).fit()
    >>> b = bootstrap(r, n=8, seed=0)
    >>> list(b.replicates.columns[:3]), b.n_failed
    (['sd_(Intercept)|Subject', 'sd ratio Female', 'sigma'], 0)
    """
    if int(n) < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    fm = res.fitted
    backend = fm.backend
    theta = np.asarray(fm.theta_full, float)
    # start each refit at the estimate; a diagonal entry on the boundary (0) is a stationary point of the
    # deviance in θ (it is even in that entry), so it would never move: start it away from 0
    theta0 = theta.copy()
    diag = np.concatenate([tm.diagonal_theta(backend.terms), np.zeros(backend.n_rho, bool)])
    theta0[diag] = np.maximum(np.abs(theta0[diag]), 0.1)
    run = _bootstrap_fast_compile if fast_compile else _bootstrap
    out = run(_key(seed), jnp.asarray(theta), jnp.asarray(fm.beta), jnp.asarray(fm.sigma2), jnp.asarray(theta0),
              with_rows(fm), backend, jnp.asarray(bool(fm.reml)), int(n), int(maxiter), float(gtol), int(em_iter),
              working_width(int(n)) if working is None else (None if working >= n else max(1, int(working))))
    return BootstrapResults(res, jax.device_get(out), seed)
