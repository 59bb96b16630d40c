"""Profile likelihood: lme4's profile confidence intervals and statsmodels' ``profile_re``, on every backend.

As lme4's ``profile``/``confint(method = "profile")``: the model is refitted by ML
(even a REML fit: :func:`mixedjax.fit.refit`, which reports a failed refit), and each
parameter on lme4's scale — ``sd_<column>|<group>``, ``cor_<column2>.<column1>|<group>``,
``sigma`` and the fixed effects, plus the residual-structure parameters on their
natural scale (VarIdent sd ratios, AR(1) ``Phi``, named as in ``params``) — is held at a
value ``v`` while the ML deviance is minimised over all the others, giving the profile
``D(v)`` and the signed root ``ζ(v) = sign(v − v̂) sqrt(D(v) − D̂)``.  The interval ends
are the roots of ``ζ(v) = ±z_{1−α/2}``, found directly (secant steps on ζ, which is
close to linear, safeguarded by bisection) instead of by lme4's spline through a
grid.  An sd whose profile does not reach ``−z`` before 0 has lower bound 0; a
correlation, ±1; a residual parameter, the edge of its range.

Holding a parameter fixed is a reparameterisation of the term factors ``T_k``
(:mod:`mixedjax.terms`), the residual parameters ρ and σ; the deviance comes from the
backend's GLS pieces (``backend.normal(fs, rho, data)``) and
:func:`mixedjax.backends.deviance_given`, so every backend (per-group, crossed,
structured residuals) is profiled by the same code.  The parameter's kind, term,
column order and value are traced inputs: one compiled, vmapped BFGS
(:func:`mixedjax.optimize.minimize`, reverse-mode gradients) serves all parameters
and both ends of every interval at once.  The free parameters of a lane are
``u = (θ of the factors L_k, ρ, log σ)``:

* fixed effect ``β_j = v``: σ and the other β in closed form (constrained GLS:
  ``r²(v) = r² + (v − β̂_j)² / (A⁻¹)_jj``);
* ``sigma = v``: β in closed form, the rest free;
* ``sd = v``: the column is moved first within its term's factor (``T_k = P L``),
  ``L_00 = v / σ``, the rest of ``L``, ρ and ``log σ`` free;
* ``cor_{ab} = v``: ``a`` and ``b`` first, ``L_00 = l_0²`` and row 1 ``l_1² (v, sqrt(1 − v²))``;
* a residual parameter ``= v`` (natural scale): that entry of ρ fixed, the others free.

Examples
--------
>>> import mixedjax
>>> d = mixedjax.datasets.load("dyestuff")
>>> r = mixedjax.lmer("Yield ~ 1 + (1 | Batch)", d)
>>> pr = profile_conf_int(r)
>>> pr.conf_int.round(2)  # lme4: 12.20 84.06 / 38.23 67.66 / 1486.45 1568.55
                        2.5 %   97.5 %
sd_(Intercept)|Batch    12.20    84.06
sigma                   38.23    67.66
(Intercept)           1486.45  1568.55
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax import Array

from . import terms as tm
from .backends import FAST_COMPILE, SINGLE_FIT, deviance_given, single_threaded_blas
from .distributions import stats
from .fit import FittedModel, refit
from .likelihood import profile_normal
from .linalg import solve_lower
from .optimize import Result, minimize_many

if TYPE_CHECKING:
    from .results import MixedLMResults

FE, SIGMA, SD, COR, RELVAR, RHO = range(6)
RHO_RANGE = 12.0  # residual parameters are searched within |ρ| <= RHO_RANGE (unconstrained scale)
SINGULAR_START = 1e-2  # diagonal entries of L below this start here (θ = 0 is a stationary point)
# BFGS per lane.  With |gradient| <= sqrt(GTOL) a failed decrease counts as convergence (the deviance's rounding
# floor: about 1e-3 for dietox's random slopes, where GTOL = 1e-7 cost 2,000 evaluations a lane); what is left to
# gain there, |g|² / (2 curvature) <= 5e-6, moves ζ by less than 2e-6
MAXITER, GTOL = 100, 1e-5
CROSSED_WORKING = 2  # crossed models: lanes advanced at a time
LANE_BUCKET = 16  # lanes per program: a multiple of this
NEW_OPTIMUM_TOL = 1e-4  # a profile deviance this far below the ML fit's: the fit was not at the optimum


# ---------------------------------------------------------------------------------------- the parameters
class Parameter(NamedTuple):
    """One row of lme4's ``confint``: its name, what is held fixed, and its range.

    ``kind``: :data:`FE`, :data:`SIGMA`, :data:`SD`, :data:`COR` or :data:`RHO`;
    ``index``: the term (``SD``, ``COR``), the fixed effect (``FE``) or the residual
    parameter (``RHO``); ``columns``: the term's columns moved first (``(j,)`` for an sd,
    ``(j, i)`` for ``cor_i.j``); ``lower``, ``upper``: the parameter's range.
    """

    name: str
    kind: int
    index: int
    columns: tuple[int, ...]
    lower: float
    upper: float


def _group_names(infos: list[Any], unique: list[str]) -> list[str]:
    """lme4's grouping name per term, made unique (``term_labels``) only where two terms would give one name
    (lme4 keeps ``sd_(Intercept)|g`` and ``sd_x|g`` for ``(1 + x || g)``)."""
    seen: set[str] = set()
    out = []
    for info, uniq in zip(infos, unique, strict=True):
        label = info.label if not ({f"sd_{n}|{info.label}" for n in info.names} & seen) else uniq
        seen |= {f"sd_{n}|{label}" for n in info.names}
        out.append(label)
    return out


def lme4_parameters(res: MixedLMResults) -> list[Parameter]:
    """lme4's profiled parameters of ``res``'s model, in the row order of ``confint(fit, method = "profile")``.

    Per random-effects term, in lme4's term order (more levels first, stable):
    ``sd_<col>|<group>`` and ``cor_<col_i>.<col_j>|<group>`` (column-major, as lme4);
    then the residual-structure parameters (``model.residual_param_names``), ``sigma``
    and the fixed effects (``(Intercept)`` for the intercept).

    Examples
    --------
    >>> import mixedjax
    >>> d = mixedjax.datasets.load("sleepstudy")
    >>> r = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", re_formula="~Days").fit()
    >>> [p.name for p in lme4_parameters(r)]
    ['sd_(Intercept)|Subject', 'cor_Days.(Intercept)|Subject', 'sd_Days|Subject', 'sigma', '(Intercept)', 'Days']
    """
    model = res.model
    backend = res.fitted.backend
    infos = list(model.term_info)
    groups = _group_names(infos, list(res.term_labels))
    order = sorted(range(len(infos)), key=lambda k: -infos[k].n_levels)  # lme4 sorts terms by levels
    out = []
    for k in order:
        t, info = backend.terms[k], infos[k]
        for j in range(t.q):
            out.append(Parameter(f"sd_{info.names[j]}|{groups[k]}", SD, k, (j,), 0.0, np.inf))
            if not t.diagonal:
                out += [Parameter(f"cor_{info.names[i]}.{info.names[j]}|{groups[k]}", COR, k, (j, i), -1.0, 1.0)
                        for i in range(j + 1, t.q)]
    if backend.n_rho:
        lo, hi = _rho_range(backend)
        out += [Parameter(str(n), RHO, i, (), float(lo[i]), float(hi[i]))
                for i, n in enumerate(model.residual_param_names)]
    out.append(Parameter("sigma", SIGMA, 0, (), 0.0, np.inf))
    out += [Parameter("(Intercept)" if n == "Intercept" else str(n), FE, j, (), -np.inf, np.inf)
            for j, n in enumerate(model.exog_names)]
    return out


def _rho_range(backend: Any) -> tuple[np.ndarray, np.ndarray]:
    """The natural-scale range searched for each residual parameter (ρ within ±RHO_RANGE)."""
    n = backend.n_rho
    return (np.asarray(backend.rho_to_natural(np.full(n, -RHO_RANGE)), float),
            np.asarray(backend.rho_to_natural(np.full(n, RHO_RANGE)), float))


def lme4_estimates(params: list[Parameter], fm: FittedModel) -> np.ndarray:
    """The values of ``params`` (:func:`lme4_parameters`) at the fit ``fm``.

    A correlation with a column of sd 0 is NaN (as lme4's ``VarCorr``).
    """
    covs = tm.covariances(np.asarray(fm.theta, float), float(fm.sigma2), fm.backend.terms)
    nat = np.asarray(fm.backend.rho_to_natural(np.asarray(fm.rho, float)), float) if fm.backend.n_rho else None
    out = np.empty(len(params))
    for i, p in enumerate(params):
        if p.kind == SD:
            out[i] = np.sqrt(max(covs[p.index][p.columns[0], p.columns[0]], 0.0))
        elif p.kind == COR:
            c = covs[p.index]
            a, b = p.columns
            den = np.sqrt(max(c[a, a], 0.0) * max(c[b, b], 0.0))
            out[i] = np.clip(c[a, b] / den, -1.0, 1.0) if den > 0 else np.nan
        elif p.kind == RHO:
            out[i] = nat[p.index]
        elif p.kind == SIGMA:
            out[i] = np.sqrt(fm.sigma2)
        else:
            out[i] = fm.beta[p.index]
    return out


# ------------------------------------------------------------------------------------------ the objective
class Lanes(NamedTuple):
    """What each lane holds fixed: ``kind (L,)``, ``index (L,)``, value ``v (L,)``, and per term ``perms``
    ``(L, q_k, q_k)`` (``T_k = P_k L_k``; the identity for the terms a lane does not fix)."""

    kind: Array
    index: Array
    v: Array
    perms: tuple


def _perm(q: int, first: tuple[int, ...]) -> np.ndarray:
    """``P`` with ``P[π(k), k] = 1``, where ``π`` lists ``first`` and then the other columns."""
    order = list(first) + [i for i in range(q) if i not in first]
    p = np.zeros((q, q))
    p[order, np.arange(q)] = 1.0
    return p


def _lane_factors(u: Array, lane: Lanes, backend: Any) -> tuple[list[Array], Array, Array]:
    """Term factors ``T_k``, ρ and σ of a lane at its free parameters ``u = (θ of L, ρ, log σ)``."""
    nth, nrho = backend.n_theta, backend.n_rho
    sigma = jnp.exp(u[nth + nrho])
    kind, idx, v = lane.kind, lane.index, lane.v
    fs = []
    for k, (t, lk, pk) in enumerate(zip(backend.terms, tm.factors(u[:nth], backend.terms), lane.perms,
                                         strict=True)):
        on = idx == k
        lk = jnp.where(on & (kind == SD), lk.at[0, 0].set(v / sigma), lk)
        lk = jnp.where(on & (kind == RELVAR), lk.at[0, 0].set(jnp.sqrt(jnp.maximum(v, 0.0))), lk)
        if t.q >= 2 and not t.diagonal:
            # squares, not |.|: the optimum is often at s = 0 (the column's sd shrinks to 0 rather than take the
            # correlation), where |.| has a kink that stalls BFGS's line search
            c, s = jnp.clip(v, -1.0, 1.0), lk[1, 1] ** 2
            l_cor = lk.at[0, 0].set(lk[0, 0] ** 2).at[1, 0].set(c * s).at[1, 1].set(jnp.sqrt(1.0 - c * c) * s)
            lk = jnp.where(on & (kind == COR), l_cor, lk)
        fs.append(pk @ lk)
    rho = u[nth : nth + nrho]
    if nrho:
        sel = (kind == RHO) & (jnp.arange(nrho) == idx)
        nat = jax.lax.stop_gradient(backend.rho_to_natural(rho))
        rho = jnp.where(sel, backend.rho_from_natural(jnp.where(sel, v, nat)), rho)
    return fs, rho, sigma


def _lane(u: Array, lane: Lanes, backend: Any, data: Any, reml: Array) -> tuple[Array, Array]:
    """``(deviance, σ²)`` of one lane: its parameter held at ``lane.v``, the free ones at ``u``."""
    fs, rho, sigma = _lane_factors(u, lane, backend)
    ne = backend.normal(fs, rho, data)
    nobs = backend.nobs(data)
    kind, idx, v = lane.kind, lane.index, lane.v
    pr = profile_normal(ne, nobs, reml)
    # β_j = v: the constrained GLS residual r²(v) = r² + (v − β̂_j)² / (A⁻¹)_jj, through yy
    p = ne.a.shape[0]
    is_fe = kind == FE
    e = jnp.where(is_fe & (jnp.arange(p) == idx), 1.0, 0.0).astype(ne.yy.dtype)
    ainv_jj = jnp.sum(solve_lower(pr.chol_a, e) ** 2)
    extra = jnp.where(is_fe, (v - e @ pr.beta) ** 2 / jnp.where(is_fe, ainv_jj, 1.0), 0.0)  # both branches finite
    ne = ne._replace(yy=ne.yy + extra)
    # σ given (sigma, sd lanes) or at its closed-form optimum r²/df (the profiled deviance)
    s2_hat = pr.sigma2 + extra / (nobs - p * jnp.asarray(reml, ne.yy.dtype))
    s2 = jnp.where(kind == SIGMA, v * v, jnp.where(kind == SD, sigma * sigma, s2_hat))
    return deviance_given(ne, nobs, None, s2, reml), s2


def _solve_lanes(u0: Array, lanes: Lanes, data: Any, reml: Array, backend: Any, working: int | None
                 ) -> tuple[Array, Array, Array]:
    """Minimise every lane's deviance over its free parameters (BFGS on reverse-mode gradients, all lanes in one
    program: :func:`mixedjax.optimize.minimize_many`): ``(u, deviance, result code)`` per lane."""

    def value_and_grad(x: Array, lane: Lanes) -> tuple[Array, Array]:
        return jax.value_and_grad(lambda y: _lane(y, lane, backend, data, reml)[0])(x)

    sol = minimize_many(value_and_grad, u0, lanes, maxiter=MAXITER, gtol=GTOL, working=working)
    return sol.x, sol.value, sol.result


def _lanes_sigma2(u: Array, lanes: Lanes, data: Any, reml: Array, backend: Any) -> Array:
    """σ² of every lane at its free parameters ``u`` (profiled where the lane does not fix it)."""
    return jax.vmap(lambda x, lane: _lane(x, lane, backend, data, reml)[1])(u, lanes)


_LANES_STATIC = ("backend", "working")
# per-group models: small programs, compile time dominates (optimisation level 0); crossed models: each
# evaluation costs more than the compile saves
_solve_lanes_small = jax.jit(_solve_lanes, static_argnames=_LANES_STATIC, compiler_options=SINGLE_FIT)
_solve_lanes_large = jax.jit(_solve_lanes, static_argnames=_LANES_STATIC, compiler_options=FAST_COMPILE)
_lanes_sigma2_jit = jax.jit(_lanes_sigma2, static_argnames=("backend",), compiler_options=SINGLE_FIT)


def _profile_lanes(u0: np.ndarray, specs: list[tuple[int, int, tuple[int, ...]]], v: np.ndarray,
                   fm: FittedModel, reml: bool, with_sigma2: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_solve_lanes` on the host: ``(u, deviance, σ² (NaN without ``with_sigma2``), result code)``.

    Per-group models advance every lane together (``vmap``); crossed models a working set of
    :data:`CROSSED_WORKING` lanes at a time, so that a slow lane does not hold the others
    (:func:`mixedjax.optimize.minimize_many`).  The lanes are padded to a multiple of
    :data:`LANE_BUCKET` (``sigma`` held at its estimate: converged at the start) so that intervals and
    ``profile_re`` grids of one model share one compiled program.
    """
    backend = fm.backend
    n = len(u0)
    pad = -n % LANE_BUCKET
    if pad:
        at_fit = np.concatenate([fm.theta, fm.rho, [0.5 * np.log(fm.sigma2)]])  # the optimum: no perturbation
        u0 = np.concatenate([u0, np.tile(at_fit, (pad, 1))])
        specs = list(specs) + [(SIGMA, 0, ())] * pad
        v = np.concatenate([v, np.full(pad, np.sqrt(fm.sigma2))])
    lanes = _lanes(backend, specs, v)
    crossed = backend.kind == "crossed"
    run = _solve_lanes_large if crossed else _solve_lanes_small
    working = CROSSED_WORKING if crossed else None
    reml_arr = np.asarray(bool(reml))
    # jaxlib's LAPACK calls (the crossed dense Cholesky and its reverse pass) go through scipy's OpenBLAS,
    # whose spinning worker threads next to XLA's cost 100x on small matrices (64 x 64: 14 ms vs 0.2 ms);
    # the limit must hold until the asynchronous computation is done (device_get inside)
    with single_threaded_blas():
        x, dev, code = jax.device_get(run(jnp.asarray(u0), lanes, fm.data, reml_arr, backend, working))
        s2 = (jax.device_get(_lanes_sigma2_jit(x, lanes, fm.data, reml_arr, backend)) if with_sigma2
              else np.full(len(u0), np.nan))
    return np.asarray(x)[:n], np.asarray(dev)[:n], np.asarray(s2)[:n], np.asarray(code)[:n]


def _lanes(backend: Any, specs: list[tuple[int, int, tuple[int, ...]]], v: np.ndarray) -> Lanes:
    """:class:`Lanes` for ``(kind, index, columns)`` per lane at values ``v``."""
    perms = []
    for k, t in enumerate(backend.terms):
        perms.append(np.stack([_perm(t.q, cols) if kind in (SD, COR, RELVAR) and idx == k else np.eye(t.q)
                               for kind, idx, cols in specs]))
    return Lanes(np.array([s[0] for s in specs], np.int32), np.array([s[1] for s in specs], np.int32),
                 np.asarray(v, float), tuple(perms))


def _start(fm: FittedModel, kind: int, idx: int, cols: tuple[int, ...]) -> np.ndarray:
    """Free parameters ``(θ of L, ρ, log σ)`` at the estimate for a lane fixing ``(kind, idx, cols)``."""
    backend = fm.backend
    fs = tm.factors_np(np.asarray(fm.theta, float), backend.terms)
    ls = []
    for k, (t, f) in enumerate(zip(backend.terms, fs, strict=True)):
        if kind in (SD, COR, RELVAR) and idx == k and t.q > 1:
            p = _perm(t.q, cols)
            cov = p.T @ f @ f.T @ p
            if t.diagonal:
                f = np.diag(np.sqrt(np.diag(cov)))
            else:
                w, vec = np.linalg.eigh(cov)  # semidefinite Cholesky through a full-rank square root
                f = np.linalg.qr((vec * np.sqrt(np.clip(w, 0.0, None))) @ vec.T, mode="r").T
                f = f * np.where(np.diag(f) < 0, -1.0, 1.0)[None, :]
            if kind == COR:  # the free entries are square roots (see _lane_factors)
                f[0, 0], f[1, 1] = np.sqrt(abs(f[0, 0])), np.sqrt(np.hypot(f[1, 0], f[1, 1]))
        ls.append(f)
    th = tm.theta_from_factors(ls, backend.terms)
    diag = tm.diagonal_theta(backend.terms)
    th[diag] = np.where(np.abs(th[diag]) < SINGULAR_START, SINGULAR_START, th[diag])
    return np.concatenate([th, np.asarray(fm.rho, float), [0.5 * np.log(fm.sigma2)]])


# ------------------------------------------------------------------------------------------ root finding
class ProfileResult(NamedTuple):
    """Profile intervals: ``conf_int`` (lme4's rows and columns), the estimates (lme4's scale, ML fit), the ML
    deviance and the number of (vmapped) profile evaluations."""

    conf_int: pd.DataFrame
    estimate: pd.Series
    deviance: float
    evaluations: int


def ml_fit(res: MixedLMResults) -> FittedModel:
    """The ML fit behind the profile: ``res.fitted``, or its ML refit (warns :class:`mixedjax.fit.RefitWarning`
    when that refit does not converge)."""
    if not res.fitted.reml:
        return res.fitted
    return refit(res.fitted, reml=False, what="ML refit for the profile")


def profile_conf_int(res: MixedLMResults, alpha: float = 0.05, tol: float = 1e-5, max_iter: int = 40,
                     params: list[str] | None = None) -> ProfileResult:
    """lme4's profile confidence intervals, ``confint(fit, method = "profile")`` (see the module docstring).

    Parameters
    ----------
    res : MixedLMResults
        Any fit (REML fits are refitted by ML first, as lme4).
    alpha : float
        ``1 − alpha`` intervals.
    tol : float
        An end is found when ``||ζ(v)| − z|`` is below ``tol`` (the lanes' deviances are accurate to
        about 1e-6, so ζ to about 1e-6 at an end), or its bracket is narrower than 1e-9 of the estimate.
    max_iter : int
        Secant steps (each one vmapped evaluation of every unfinished end).
    params : list of str, optional
        Profile only these rows (lme4's names, :func:`lme4_parameters`; ``"Intercept"`` is
        accepted for ``"(Intercept)"``); default all.

    Returns
    -------
    ProfileResult
        ``conf_int``: a DataFrame with lme4's row names (:func:`lme4_parameters`) and
        columns ``"2.5 %"``, ``"97.5 %"``; an end the profile does not reach is the
        parameter's boundary (sd 0, correlation ±1); one not found is NaN (with a
        ``RuntimeWarning``).

    Examples
    --------
    >>> import mixedjax
    >>> d = mixedjax.datasets.load("sleepstudy")
    >>> r = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", re_formula="~Days").fit()
    >>> profile_conf_int(r).conf_int.round(3)  # lme4: 14.381 37.716 / -0.482 0.685 / 3.801 8.753 / ...
                                    2.5 %   97.5 %
    sd_(Intercept)|Subject         14.381   37.716
    cor_Days.(Intercept)|Subject   -0.481    0.685
    sd_Days|Subject                 3.801    8.753
    sigma                          22.898   28.858
    (Intercept)                   237.681  265.130
    Days                            7.359   13.576
    """
    return profile_intervals(ml_fit(res), select_parameters(lme4_parameters(res), params), alpha, tol, max_iter)


def select_parameters(pars: list[Parameter], names: list[str] | None) -> list[Parameter]:
    """The entries of ``pars`` named in ``names`` (in ``pars``' order; all for ``None``).

    ``"Intercept"`` names ``"(Intercept)"``; an unknown name raises :class:`ValueError` listing the known ones.

    Examples
    --------
    >>> import mixedjax
    >>> r = mixedjax.lmer("Yield ~ 1 + (1 | Batch)", mixedjax.datasets.load("dyestuff"))
    >>> [p.name for p in select_parameters(lme4_parameters(r), ["Intercept", "sigma"])]
    ['sigma', '(Intercept)']
    """
    if names is None:
        return list(pars)
    names = [names] if isinstance(names, str) else list(names)
    known = [p.name for p in pars]
    wanted = {"(Intercept)" if n == "Intercept" else str(n) for n in names}
    unknown = sorted(wanted - set(known))
    if unknown:
        raise ValueError(f"unknown profile parameter(s) {unknown}; this model has {known}")
    return [p for p in pars if p.name in wanted]


def profile_intervals(fm: FittedModel, pars: list[Parameter], alpha: float = 0.05, tol: float = 1e-5,
                      max_iter: int = 40) -> ProfileResult:
    """:func:`profile_conf_int`'s intervals of ``pars`` (:func:`lme4_parameters`) at the ML fit ``fm``."""
    backend = fm.backend
    est = lme4_estimates(pars, fm)
    dev_hat = float(fm.deviance)
    z = float(stats.norm.ppf(1 - alpha / 2))

    lanes = [(i, s) for i in range(len(pars)) for s in (-1.0, 1.0)]  # (parameter, side)
    specs = [(pars[i].kind, pars[i].index, pars[i].columns) for i, _ in lanes]
    u = np.stack([_start(fm, *sp) for sp in specs])
    lo_dom = np.array([pars[i].lower for i, _ in lanes])
    hi_dom = np.array([pars[i].upper for i, _ in lanes])
    kind = np.array([pars[i].kind for i, _ in lanes])
    side = np.array([s for _, s in lanes])
    vhat = np.array([est[i] for i, _ in lanes])
    step = np.array([s for s in _initial_steps(fm, pars, est, z) for _ in (0, 1)])
    diag = np.flatnonzero(tm.diagonal_theta(backend.terms))

    last_code = np.zeros(len(lanes), int)
    min_dev = np.full(len(lanes), np.inf)

    def evaluate(v: np.ndarray, u: np.ndarray, active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u = u.copy()  # warm start, off the θ = 0 stationary point (see _start); finished lanes as they are
        u[np.ix_(active, diag)] = np.where(np.abs(u[np.ix_(active, diag)]) < SINGULAR_START, SINGULAR_START,
                                           u[np.ix_(active, diag)])
        x, dev, _, code = _profile_lanes(u, specs, v, fm, False)
        last_code[active] = code[active]
        np.fmin(min_dev, dev, out=min_dev)
        return x, np.sqrt(np.maximum(dev - dev_hat, 0.0))

    # the ends already on the boundary: an sd estimated at 0, a correlation at ±1; NaN estimates stay NaN
    bound = np.full(len(lanes), np.nan)
    done = ~np.isfinite(vhat)
    scale = max(1.0, float(np.nanmax(np.abs(est))))
    edge0 = (kind == SD) & (side < 0) & (vhat <= 1e-8 * scale)
    edge1 = (kind == COR) & (np.abs(vhat) >= 1.0 - 1e-8) & (np.sign(vhat) == side)
    bound[edge0], bound[edge1] = 0.0, side[edge1]
    done |= edge0 | edge1
    # secant on g(v) = |ζ(v)| − z from (v̂, −z), keeping a bracket [inside point a, outside point b]
    a_v, a_g = vhat.copy(), np.full(len(lanes), -z)
    b_v = np.full(len(lanes), np.nan)
    v = np.where(done, vhat, np.clip(vhat + side * step, lo_dom, hi_dom))
    v = np.where(np.isfinite(v), v, 0.0)
    prev_v, prev_g = a_v.copy(), a_g.copy()
    evals = 0
    for _ in range(max_iter):
        upd = ~done
        u_new, zeta = evaluate(v, u, upd)
        evals += 1
        g = zeta - z
        u = np.where(np.isfinite(u_new).all(axis=1)[:, None], u_new, u)
        conv = upd & (np.abs(g) < tol)
        # a range edge where the profile stays below z: the bound is the edge
        at_edge = upd & ~conv & (g < 0) & ((v <= lo_dom) | (v >= hi_dom))
        width = np.abs(b_v - a_v)
        tight = upd & ~conv & ~at_edge & np.isfinite(width) & (width <= 1e-9 * np.maximum(np.abs(vhat), step))
        for m in (conv, at_edge, tight):
            bound[m], done[m] = v[m], True
        inside = upd & (g < 0)
        outside = upd & ~(g < 0)  # a non-finite deviance counts as beyond the root
        a_v[inside], a_g[inside] = v[inside], g[inside]
        b_v[outside] = v[outside]
        if done.all():
            break
        # secant from the last two points, kept inside the bracket (bisection otherwise)
        with np.errstate(invalid="ignore", divide="ignore"):
            sec = v - g * (v - prev_v) / (g - prev_g)
        has_b = np.isfinite(b_v)
        lo_b = np.where(has_b, np.minimum(a_v, b_v), -np.inf)
        hi_b = np.where(has_b, np.maximum(a_v, b_v), np.inf)
        ok = np.isfinite(sec) & np.isfinite(g) & np.isfinite(prev_g) & (sec > lo_b) & (sec < hi_b) & (
            (sec - vhat) * side > 0)
        # without an outside point yet: extrapolate, at most 4x further from the estimate
        far = vhat + side * 4.0 * np.abs(v - vhat)
        ext = np.where(ok, vhat + side * np.minimum(np.abs(sec - vhat), np.abs(far - vhat)), far)
        nxt = np.where(has_b, np.where(ok, sec, 0.5 * (a_v + b_v)), ext)
        prev_v, prev_g = v.copy(), g.copy()
        v = np.where(done, v, np.clip(nxt, lo_dom, hi_dom))
    if not done.all():
        bad = sorted({pars[i].name for (i, _), d in zip(lanes, done, strict=True) if not d})
        warnings.warn(f"profile: {int((~done).sum())} interval end(s) did not converge ({', '.join(bad)}); "
                      "reported as NaN", RuntimeWarning, stacklevel=2)
    lower = float(min_dev[np.isfinite(min_dev)].min(initial=dev_hat))
    if lower < dev_hat - NEW_OPTIMUM_TOL:
        warnings.warn(f"profile: a profile found a deviance {dev_hat - lower:.3g} below the ML fit's; the fit is not "
                      "at the ML optimum, and the intervals are not reliable (refit from result.params)",
                      RuntimeWarning, stacklevel=2)
    slow = sorted({pars[i].name for (i, _), c in zip(lanes, last_code, strict=True) if c == Result.MAX_ITER})
    if slow:
        warnings.warn(f"profile: the minimisation at an interval end of {', '.join(slow)} reached the maximum "
                      f"number of iterations ({MAXITER}); that end may be too close to the estimate",
                      RuntimeWarning, stacklevel=2)
    bound = np.where(done, bound, np.nan)
    for i in np.flatnonzero(done & (kind == RHO)):  # the edge of the searched range is the parameter's edge
        if bound[i] in (lo_dom[i], hi_dom[i]):
            edge_nat = _rho_edges(backend)
            bound[i] = edge_nat[0 if bound[i] == lo_dom[i] else 1][pars[lanes[i][0]].index]
    names = [p.name for p in pars]
    ci = pd.DataFrame({f"{100 * alpha / 2:g} %": bound[0::2], f"{100 * (1 - alpha / 2):g} %": bound[1::2]},
                      index=names)
    return ProfileResult(ci, pd.Series(est, index=names), dev_hat, evals)


def _rho_edges(backend: Any) -> tuple[np.ndarray, np.ndarray]:
    """The natural-scale edges of the residual parameters (ρ = ∓∞: a ratio of 0 or ∞, φ = ∓1)."""
    n = backend.n_rho
    with np.errstate(over="ignore"):
        return (np.asarray(backend.rho_to_natural(np.full(n, -np.inf)), float),
                np.asarray(backend.rho_to_natural(np.full(n, np.inf)), float))


def _initial_steps(fm: FittedModel, pars: list[Parameter], est: np.ndarray, z: float) -> np.ndarray:
    """A first step for each parameter: the Wald interval's half-width for a fixed effect and σ, rough scales
    otherwise."""
    out = np.empty(len(pars))
    sigma = float(np.sqrt(fm.sigma2))
    n = float(fm.backend.nobs(fm.data))
    rho = np.asarray(fm.rho, float)
    for i, p in enumerate(pars):
        if p.kind == FE:
            out[i] = z * np.sqrt(max(fm.cov_beta[p.index, p.index], 0.0)) or 1e-3 * (abs(est[i]) + 1.0)
        elif p.kind == SIGMA:
            out[i] = z * sigma / np.sqrt(2.0 * n)
        elif p.kind == COR:
            out[i] = 0.25 * max(1.0 - abs(est[i]), 0.05) if np.isfinite(est[i]) else 0.1
        elif p.kind == RHO:  # a step of 0.2 in ρ, on the natural scale
            hi, lo = rho.copy(), rho.copy()
            hi[p.index] += 0.1
            lo[p.index] -= 0.1
            d = np.asarray(fm.backend.rho_to_natural(hi)) - np.asarray(fm.backend.rho_to_natural(lo))
            out[i] = abs(float(d[p.index]))
        else:
            out[i] = max(0.3 * est[i], 1e-3 * sigma)
    return out


# ------------------------------------------------------------------------------------------ the profile itself
class ProfileTrace(NamedTuple):
    """lme4's ``profile(fit)`` as a table: ζ at values of each profiled parameter, and the intervals.

    ``trace``: a DataFrame with columns ``parameter``, ``value``, ``zeta`` (the parameters in
    lme4's row order, each one's values increasing; the estimate has ζ = 0 and an interval end
    that the profile reaches has ζ = ±z); ``conf_int``, ``estimate`` and ``deviance`` as in
    :class:`ProfileResult`; ``alpha``: the level of the intervals (``1 − alpha``).
    """

    trace: pd.DataFrame
    conf_int: pd.DataFrame
    estimate: pd.Series
    deviance: float
    alpha: float


def profile_trace(res: MixedLMResults, params: list[str] | None = None, alpha: float = 0.05, points: int = 3,
                  reach: float = 1.3) -> ProfileTrace:
    """The profile ζ of each parameter on a grid spanning its interval (lme4's ``as.data.frame(profile(fit))``).

    The intervals come from :func:`profile_conf_int` (the same ML fit and roots).  On each
    side of the estimate ζ is evaluated at ``points`` values evenly spaced between the
    estimate and the interval end, and at ``reach`` times the end's distance (``|ζ|`` about
    ``reach z``; within the parameter's range).  An end on the boundary of the range (an sd
    of 0, a correlation of ±1) is evaluated too, since ζ there is not ±z.  All values are
    profiled in vmapped calls of the program that found the intervals.

    Parameters
    ----------
    res : MixedLMResults
        Any fit (REML fits are refitted by ML first, as lme4).
    params : list of str, optional
        lme4's names of the rows to profile (:func:`lme4_parameters`); default all.
    alpha : float
        ``1 − alpha`` intervals; ``z = z_{1−alpha/2}``.
    points : int
        Values strictly between the estimate and each interval end.
    reach : float
        How far past an end the last value lies, as a multiple of the end's distance from the estimate.

    Returns
    -------
    ProfileTrace

    Examples
    --------
    >>> import mixedjax
    >>> d = mixedjax.datasets.load("dyestuff")
    >>> r = mixedjax.lmer("Yield ~ 1 + (1 | Batch)", d)
    >>> pt = profile_trace(r, params=["sigma"])
    >>> tr = pt.trace
    >>> list(tr.columns), len(tr), bool(tr.zeta.is_monotonic_increasing)
    (['parameter', 'value', 'zeta'], 11, True)
    """
    fm = ml_fit(res)
    pars = select_parameters(lme4_parameters(res), params)
    pr = profile_intervals(fm, pars, alpha)
    z = float(stats.norm.ppf(1 - alpha / 2))
    ci, est = pr.conf_int.to_numpy(), pr.estimate.to_numpy()
    known: list[tuple[int, float, float]] = []  # (parameter, value, ζ) without a profile evaluation
    todo: list[tuple[int, float]] = []
    inner = np.linspace(0.0, 1.0, points + 2)[1:-1]
    for i, p in enumerate(pars):
        if not np.isfinite(est[i]):
            continue
        known.append((i, est[i], 0.0))
        for side, end in ((-1.0, ci[i, 0]), (1.0, ci[i, 1])):
            if not np.isfinite(end) or end == est[i]:
                continue
            edge = not p.lower < end < p.upper
            end = float(np.clip(end, p.lower, p.upper))
            todo += [(i, est[i] + t * (end - est[i])) for t in inner]
            if edge:
                todo.append((i, end))
            else:
                known.append((i, end, side * z))
                far = float(np.clip(est[i] + reach * (end - est[i]), p.lower, p.upper))
                if far != end:
                    todo.append((i, far))
    zeta = np.empty(len(todo))
    width = len(pars) * 2 + (-len(pars) * 2) % LANE_BUCKET  # the intervals' program: compiled already
    for lo in range(0, len(todo), width):
        chunk = todo[lo : lo + width]
        specs = [(pars[i].kind, pars[i].index, pars[i].columns) for i, _ in chunk]
        u0 = np.stack([_start(fm, *sp) for sp in specs])
        v = np.array([val for _, val in chunk])
        _, dev, _, _ = _profile_lanes(u0, specs, v, fm, False)
        sign = np.sign(v - np.array([est[i] for i, _ in chunk]))
        zeta[lo : lo + width] = sign * np.sqrt(np.maximum(dev - pr.deviance, 0.0))
    rows = known + [(i, val, zt) for (i, val), zt in zip(todo, zeta, strict=True) if np.isfinite(zt)]
    trace = pd.DataFrame({"parameter": [pars[i].name for i, _, _ in rows], "value": [v for _, v, _ in rows],
                          "zeta": [zt for _, _, zt in rows], "order": [i for i, _, _ in rows]})
    trace = trace.sort_values(["order", "value"], kind="stable").drop(columns="order").reset_index(drop=True)
    return ProfileTrace(trace, pr.conf_int, pr.estimate, pr.deviance, float(alpha))


# ---------------------------------------------------------------------------------- statsmodels' profile_re
def profile_re(res: MixedLMResults, re_ix: Any, vtype: str, num_low: int = 5, dist_low: float = 1.0,
               num_high: int = 5, dist_high: float = 1.0) -> np.ndarray:
    """statsmodels' ``profile_re``: ``(n, 2)`` array of (variance, profile log-likelihood).

    The variance of one random effect is held at each value of a grid from
    ``var − dist_low`` to ``var + dist_high`` (natural scale; ``num_low`` and
    ``num_high`` points each side), as statsmodels: on the relative scale
    ``var / scale`` with the scale re-estimated, by the fit's criterion (REML or ML),
    every other parameter (ρ included) re-estimated.  The first column is the held
    relative variance times that fit's scale.

    Parameters
    ----------
    re_ix : int or str
        ``vtype="re"``: a column of ``cov_re`` (the first term).  ``vtype="vc"``: a
        variance component, by name (statsmodels' ``vc_formula`` key, or the term's
        grouping label) or by position in ``vcomp``.
    vtype : {"re", "vc"}

    Examples
    --------
    >>> import mixedjax
    >>> d = mixedjax.datasets.load("sleepstudy")
    >>> r = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", re_formula="~Days").fit()
    >>> pr = profile_re(r, 1, "re", num_low=2, dist_low=20.0, num_high=2, dist_high=20.0)
    >>> pr.shape, bool(abs(pr[2, 1] - r.llf) < 1e-8), bool((pr[[0, 1, 3, 4], 1] < r.llf).all())
    ((5, 2), True, True)
    """
    fm = res.fitted
    backend = fm.backend
    infos = res.model.term_info
    k_re = int(res.cov_re.shape[0])
    if vtype == "re":
        if k_re == 0 or not 0 <= int(re_ix) < k_re:
            raise ValueError(f"re_ix must index the {k_re} columns of cov_re {list(res.cov_re.index)}")
        k, j = 0, int(re_ix)
    elif vtype == "vc":
        first = 1 if k_re else 0
        slots = [(kk, jj) for kk in range(first, len(infos)) for jj in range(backend.terms[kk].q)]
        names = {}
        for kk in range(first, len(infos)):
            if backend.terms[kk].q == 1:
                for nm in (infos[kk].source, infos[kk].label, res.term_labels[kk]):
                    if nm:
                        names.setdefault(str(nm), (kk, 0))
        if isinstance(re_ix, (int, np.integer)) and 0 <= int(re_ix) < len(slots):
            k, j = slots[int(re_ix)]
        elif str(re_ix) in names:
            k, j = names[str(re_ix)]
        else:
            raise ValueError(f"unknown variance component {re_ix!r}; the model has {sorted(names)} "
                             f"(or a position in vcomp, 0 to {len(slots) - 1})")
    else:
        raise ValueError(f"vtype must be 're' or 'vc', got {vtype!r}")
    var0 = float(res.term_covs[k][j, j])
    scale = float(fm.sigma2)
    low = (var0 - dist_low) / scale
    high = (var0 + dist_high) / scale
    if low <= 0:
        raise ValueError("dist_low is too large and would result in a negative variance. Try a smaller value.")
    r0 = var0 / scale
    grid = np.concatenate([np.linspace(low, r0, num_low + 1), np.linspace(r0, high, num_high + 1)[1:]])
    specs = [(RELVAR, k, (j,))] * len(grid)
    u0 = np.tile(_start(fm, RELVAR, k, (j,)), (len(grid), 1))
    _, dev, s2, _ = _profile_lanes(u0, specs, grid, fm, fm.reml, with_sigma2=True)
    return np.column_stack([grid * s2, -0.5 * dev])


__all__ = ["COR", "FE", "Lanes", "Parameter", "ProfileResult", "ProfileTrace", "RHO", "SD", "SIGMA",
           "lme4_estimates", "lme4_parameters", "ml_fit", "profile_conf_int", "profile_intervals", "profile_re",
           "profile_trace", "select_parameters"]
