"""Profile likelihood: lme4's profile confidence intervals and statsmodels' ``profile_re``.

As lme4's ``profile``/``confint(method = "profile")``: the model is refitted by ML
(even a REML fit), and each parameter on lme4's scale — fixed effects,
``sd_<term>|<group>``, ``cor_<t1>.<t2>|<group>`` and ``sigma`` — is held at a value
``v`` while the ML deviance is minimised over all the others, giving the profile
``D(v)`` and the signed root ``ζ(v) = sign(v − v̂) sqrt(D(v) − D̂)``.  The interval ends
are the roots of ``ζ(v) = ±z_{1−α/2}``, found directly (secant steps on ζ, which is
close to linear, safeguarded by bisection) instead of by lme4's spline through a
grid.  A variance whose profile does not reach ``−z`` before 0 has lower bound 0;
a correlation, ±1.

Holding a parameter fixed is a reparameterisation of (θ, σ) — β and, where it
separates, σ are profiled in closed form — so every parameter of a model uses one
objective, with the parameter's kind, position and value as traced inputs: one
compiled, vmapped BFGS (:func:`mixedjax.minimize`) serves all parameters and both
ends of every interval at once.

* fixed effect ``β_j = v``: σ and the other β in closed form (constrained GLS:
  ``r²(v) = r² + (v − β̂_j)² / (A⁻¹)_jj``), θ free;
* ``sigma = v``: θ free, β in closed form;
* ``sd = v``: the term's variable is moved first in its block (a permutation ``P``,
  ``Λ = P L``), ``L_00 = v / σ``, the rest of ``L`` and ``log σ`` free;
* ``cor_{ab} = v``: ``a`` and ``b`` first, rows ``(|l_0|)`` and ``|s| (v, sqrt(1 − v²))``.
"""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from scipy import stats

from .covariance import CovStructure, lam_from_theta, psd_cholesky_np
from .data import CrossProducts
from .likelihood import LOG_2PI, normal_equations, solve_groups
from .linalg import cholesky, logdet_from_cholesky, solve_lower, solve_upper_t
from .optimize import minimize
from .predict import lme4_terms

if TYPE_CHECKING:
    from .results import MixedLMResults

FE, SIGMA, SD, COR, RELVAR = 0, 1, 2, 3, 4


# ------------------------------------------------------------------------------------------- lme4 scale
def lme4_params(model: Any, theta: np.ndarray, beta: np.ndarray, sigma2: np.ndarray) -> tuple[list[str], np.ndarray]:
    """lme4's parameter names and values (``sd_…``, ``cor_…``, ``sigma``, fixed effects) for M fits.

    ``theta (M, n_theta)``, ``beta (M, p)``, ``sigma2 (M,)``; returns ``names`` and ``(M, k)`` values,
    in the row order of lme4's ``confint``.
    """
    st = model.structure
    theta = np.atleast_2d(theta)
    m = theta.shape[0]
    lam = np.zeros((m, st.q, st.q))
    rows, cols, src = st.theta_positions()
    lam[:, rows, cols] = theta[:, src]
    cov = np.einsum("mij,mkj->mik", lam, lam) * np.asarray(sigma2).reshape(m, 1, 1)
    names, vals = [], []
    for t in lme4_terms(model):
        g = t["group"]
        if t["kind"] == "re":
            k = len(t["names"])
            sd = np.sqrt(np.clip(np.diagonal(cov[:, :k, :k], axis1=1, axis2=2), 0, None))
            for j in range(k):
                names.append(f"sd_{t['names'][j]}|{g}")
                vals.append(sd[:, j])
                for i in range(j + 1, k):
                    names.append(f"cor_{t['names'][i]}.{t['names'][j]}|{g}")
                    with np.errstate(invalid="ignore", divide="ignore"):
                        vals.append(np.where(sd[:, i] * sd[:, j] > 0, cov[:, i, j] / (sd[:, i] * sd[:, j]), np.nan))
        else:
            pos = t["index"] if t["kind"] == "re_diag" else st.q_re + sum(st.vc_sizes[: t["index"]])
            names.append(f"sd_{t['names'][0]}|{g}")
            vals.append(np.sqrt(np.clip(cov[:, pos, pos], 0, None)))
    names.append("sigma")
    vals.append(np.sqrt(np.asarray(sigma2).reshape(m)))
    for j, n in enumerate(model.exog_names):
        names.append("(Intercept)" if n == "Intercept" else n)
        vals.append(np.asarray(beta)[:, j])
    return names, np.column_stack(vals)


class _Param(NamedTuple):
    name: str
    kind: int
    t: int          # θ entry (SD, RELVAR) or fixed effect (FE)
    perm: np.ndarray  # (q, q): Λ = perm @ L
    lower: float    # domain
    upper: float


def _block_perm(q: int, q_re: int, first: list[int]) -> np.ndarray:
    """``P`` with ``P[π(k), k] = 1`` where ``π`` puts ``first`` at the front of the correlated block."""
    order = first + [i for i in range(q_re) if i not in first] + list(range(q_re, q))
    p = np.zeros((q, q))
    p[order, np.arange(q)] = 1.0
    return p


def _params(model: Any) -> list[_Param]:
    st = model.structure
    q, eye = st.q, np.eye(st.q)
    out = []
    for t in lme4_terms(model):
        g = t["group"]
        if t["kind"] == "re":
            k = len(t["names"])
            for j in range(k):
                out.append(_Param(f"sd_{t['names'][j]}|{g}", SD, 0, _block_perm(q, st.q_re, [j]), 0.0, np.inf))
                for i in range(j + 1, k):
                    out.append(_Param(f"cor_{t['names'][i]}.{t['names'][j]}|{g}", COR, 0,
                                      _block_perm(q, st.q_re, [j, i]), -1.0, 1.0))
        elif t["kind"] == "re_diag":
            out.append(_Param(f"sd_{t['names'][0]}|{g}", SD, t["index"], eye, 0.0, np.inf))
        else:
            out.append(_Param(f"sd_{t['names'][0]}|{g}", SD, st.n_re_theta + t["index"], eye, 0.0, np.inf))
    out.append(_Param("sigma", SIGMA, 0, eye, 0.0, np.inf))
    for j, n in enumerate(model.exog_names):
        out.append(_Param("(Intercept)" if n == "Intercept" else n, FE, j, eye, -np.inf, np.inf))
    return out


# ------------------------------------------------------------------------------------------ the objective
class Spec(NamedTuple):
    kind: jax.Array
    t: jax.Array
    v: jax.Array
    perm: jax.Array


def _lane(u: jax.Array, spec: Spec, cp: CrossProducts, structure: CovStructure, reml) -> tuple[jax.Array, jax.Array]:
    """``(deviance, σ²)`` with the parameter of ``spec`` held at ``spec.v``; ``u = (θ-like, log σ)``."""
    nth = structure.n_theta
    th = u[:nth]
    sigma_free = jnp.exp(u[nth])
    idx = jnp.arange(nth)
    kind, v = spec.kind, spec.v
    th = jnp.where((kind == SD) & (idx == spec.t), v / sigma_free, th)
    th = jnp.where((kind == RELVAR) & (idx == spec.t), jnp.sqrt(jnp.maximum(v, 0.0)), th)
    if structure.q_re >= 2 and not structure.re_diagonal:
        s = jnp.abs(th[2])
        vc = jnp.clip(v, -1.0, 1.0)
        th_cor = th.at[0].set(jnp.abs(th[0])).at[1].set(vc * s).at[2].set(jnp.sqrt(1.0 - vc * vc) * s)
        th = jnp.where(kind == COR, th_cor, th)
    lam = spec.perm @ lam_from_theta(th, structure)
    gs = solve_groups(lam, cp)
    ne = normal_equations(gs, cp)
    p = ne.a.shape[0]
    chol_a = cholesky(ne.a)
    w = solve_lower(chol_a, ne.b)
    beta = solve_upper_t(chol_a, w)
    r2 = ne.yy - jnp.dot(w, w)
    is_fe = kind == FE
    e_j = (jnp.arange(p) == jnp.where(is_fe, spec.t, 0)).astype(r2.dtype)
    ainv_jj = jnp.sum(solve_lower(chol_a, e_j) ** 2)  # (A⁻¹)_jj
    # both branches are differentiated: keep the unused one finite
    r2 = r2 + jnp.where(is_fe, (v - jnp.dot(e_j, beta)) ** 2 / jnp.where(is_fe, ainv_jj, 1.0), 0.0)
    is_reml = jnp.where(kind == RELVAR, jnp.asarray(reml, dtype=r2.dtype), 0.0)
    df = cp.nobs - p * is_reml
    s2 = jnp.where((kind == FE) | (kind == RELVAR), r2 / df,
                   jnp.where(kind == SIGMA, v * v, sigma_free * sigma_free))
    dev = ne.logdet_v + df * (LOG_2PI + jnp.log(s2)) + r2 / s2 + is_reml * logdet_from_cholesky(chol_a)
    return dev, s2


@functools.partial(jax.jit, static_argnames=("structure",))
def _profile_lanes(u0: jax.Array, spec: Spec, cp: CrossProducts, structure: CovStructure, reml):
    """Minimise every lane's deviance over its free parameters (vmapped BFGS)."""
    def one(u, sp):
        sol = minimize(lambda x: _lane(x, sp, cp, structure, reml)[0], u, maxiter=200, gtol=1e-7)
        dev, s2 = _lane(sol.x, sp, cp, structure, reml)
        return sol.x, dev, s2, sol.result

    return jax.vmap(one)(u0, spec)


def _start_u(theta: np.ndarray, sigma: float, par: _Param, st: CovStructure) -> np.ndarray:
    """Free parameters at the estimate for lane ``par`` (θ of the permuted factor, log σ)."""
    th = np.array(theta, dtype=float)
    if par.kind in (SD, COR, RELVAR) and st.q_re >= 2 and not st.re_diagonal and not np.allclose(par.perm,
                                                                                                   np.eye(st.q)):
        r, c = st.re_tril
        lam = np.zeros((st.q_re, st.q_re))
        lam[r, c] = th[: len(r)]
        cov = lam @ lam.T
        pb = par.perm[: st.q_re, : st.q_re]
        cov_perm = pb.T @ cov @ pb
        lp = psd_cholesky_np(cov_perm + 1e-12 * np.eye(st.q_re))
        th[: len(r)] = lp[r, c]
    if par.kind == COR:
        th[2] = np.hypot(th[1], th[2])
        th[0] = abs(th[0])
    # a diagonal entry at 0 (singular fit) is a stationary point of the deviance, which is even in it:
    # start the free entries slightly away from 0 so that the optimiser can leave the boundary
    diag = st.diagonal_theta()
    th[diag] = np.where(np.abs(th[diag]) < 1e-2, 1e-2, th[diag])
    return np.concatenate([th, [np.log(sigma)]])


# ------------------------------------------------------------------------------------------ root finding
class ProfileResult(NamedTuple):
    """Profile intervals: ``conf_int`` (lme4's rows and columns), the estimates, and how each end was found."""

    conf_int: pd.DataFrame
    estimate: pd.Series
    deviance: float
    evaluations: int


def _ml_fit(res: MixedLMResults) -> MixedLMResults:
    if not res.reml:
        return res
    from .inference import _refit_ml

    return _refit_ml(res)


def profile_conf_int(res: MixedLMResults, alpha: float = 0.05, tol: float = 1e-7, max_iter: int = 40
                     ) -> ProfileResult:
    """lme4's profile confidence intervals (see the module docstring)."""
    if getattr(res, "residual_params", np.zeros(0)).size:
        raise NotImplementedError("profile intervals are implemented for iid (optionally weighted) residuals")
    ml = _ml_fit(res)
    m = ml.model
    st = m.structure
    cp = getattr(ml, "_cp", None) or m._cp
    pars = _params(m)
    names, est = lme4_params(m, ml.theta[None, :], ml.fe_params.to_numpy()[None, :], np.array([ml.scale]))
    est = est[0]
    assert names == [p.name for p in pars]
    dev_hat = -2.0 * ml.llf
    z = stats.norm.ppf(1 - alpha / 2)
    sigma = np.sqrt(ml.scale)

    # lanes: (parameter, side)
    lanes = [(i, s) for i in range(len(pars)) for s in (-1.0, 1.0)]
    n_l = len(lanes)
    kind = np.array([pars[i].kind for i, _ in lanes])
    tpos = np.array([pars[i].t for i, _ in lanes])
    perm = np.stack([pars[i].perm for i, _ in lanes])
    u = np.stack([_start_u(ml.theta, sigma, pars[i], st) for i, _ in lanes])
    lo_dom = np.array([pars[i].lower for i, _ in lanes])
    hi_dom = np.array([pars[i].upper for i, _ in lanes])
    side = np.array([s for _, s in lanes])
    vhat = np.array([est[i] for i, _ in lanes])
    # first step from Wald-type scales
    se = _initial_scales(ml, pars, est)
    step = np.array([se[i] for i, _ in lanes])

    diag = np.flatnonzero(st.diagonal_theta())

    def evaluate(v, u):
        u = u.copy()  # warm start, off the θ = 0 stationary point (see _start_u)
        u[:, diag] = np.where(np.abs(u[:, diag]) < 1e-2, 1e-2, u[:, diag])
        spec = Spec(jnp.asarray(kind), jnp.asarray(tpos), jnp.asarray(v), jnp.asarray(perm))
        x, dev, _, _ = _profile_lanes(jnp.asarray(u), spec, cp, st, False)
        x, dev = np.asarray(x), np.asarray(dev)
        zeta = np.sqrt(np.maximum(dev - dev_hat, 0.0))
        return x, zeta

    # secant on g(v) = |ζ(v)| - z from (v̂, -z), keeping a bracket
    a_v, a_g = vhat.copy(), np.full(n_l, -z)   # inside point (g < 0)
    b_v, b_g = np.full(n_l, np.nan), np.full(n_l, np.nan)  # outside point (g > 0), once found
    bound = np.full(n_l, np.nan)
    done = np.zeros(n_l, bool)
    at_zero = (kind == SD) & (side < 0) & (vhat <= 1e-8 * np.maximum(1.0, np.abs(est).max()))
    bound[at_zero], done[at_zero] = 0.0, True
    v = np.clip(vhat + side * step, lo_dom, hi_dom)
    evals = 0
    prev_v, prev_g = a_v.copy(), a_g.copy()
    for _ in range(max_iter):
        v = np.where(done, vhat, v)
        u_new, zeta = evaluate(v, u)
        evals += 1
        g = zeta - z
        upd = ~done
        u = np.where(upd[:, None] & np.isfinite(u_new).all(axis=1)[:, None], u_new, u)
        conv = upd & (np.abs(g) < tol)
        bound[conv], done[conv] = v[conv], True
        # domain edge not reaching the target: the bound is the edge
        edge = upd & ~conv & (g < 0) & ((v <= lo_dom) | (v >= hi_dom))
        bound[edge], done[edge] = v[edge], True
        inside = upd & (g < 0)
        outside = upd & (g > 0)
        a_v[inside], a_g[inside] = v[inside], g[inside]
        b_v[outside], b_g[outside] = v[outside], g[outside]
        if done.all():
            break
        # secant from the last two points, kept inside the bracket (bisection otherwise)
        with np.errstate(invalid="ignore", divide="ignore"):
            sec = v - g * (v - prev_v) / (g - prev_g)
        has_b = np.isfinite(b_v)
        lo_b = np.where(has_b, np.minimum(a_v, b_v), -np.inf)
        hi_b = np.where(has_b, np.maximum(a_v, b_v), np.inf)
        ok = np.isfinite(sec) & (sec > lo_b) & (sec < hi_b) & ((sec - vhat) * side > 0)
        # without an outside point yet: extrapolate, at most 4x further from the estimate
        far = vhat + side * 4.0 * np.abs(v - vhat)
        sec = np.where(has_b, sec, np.where(ok, np.minimum(np.abs(sec - vhat), np.abs(far - vhat)) * side + vhat,
                                            far))
        nxt = np.where(ok | ~has_b, sec, 0.5 * (a_v + b_v))
        nxt = np.clip(nxt, lo_dom, hi_dom)
        prev_v, prev_g = v.copy(), g.copy()
        v = nxt
    if not done.all():
        warnings.warn(f"profile: {int((~done).sum())} interval end(s) did not converge; reported as NaN",
                      RuntimeWarning, stacklevel=3)
    lo = np.array([bound[2 * i] for i in range(len(pars))])
    hi = np.array([bound[2 * i + 1] for i in range(len(pars))])
    ci = pd.DataFrame({f"{100 * alpha / 2:g} %": lo, f"{100 * (1 - alpha / 2):g} %": hi}, index=names)
    return ProfileResult(ci, pd.Series(est, index=names), dev_hat, evals)


def _initial_scales(ml: MixedLMResults, pars: list[_Param], est: np.ndarray) -> np.ndarray:
    """A first step for each parameter: its Wald standard error where available, else a fraction of it."""
    out = np.empty(len(pars))
    n = ml.nobs
    for i, p in enumerate(pars):
        if p.kind == FE:
            out[i] = ml.bse_fe.iloc[p.t]
        elif p.kind == SIGMA:
            out[i] = est[i] / np.sqrt(2.0 * n)
        elif p.kind == COR:
            out[i] = 0.25 * max(1.0 - abs(est[i]), 0.05)
        else:
            out[i] = max(0.3 * est[i], 1e-3 * est[[j for j, q in enumerate(pars) if q.kind == SIGMA][0]])
    return out


# ---------------------------------------------------------------------------------- statsmodels' profile_re
def profile_re(res: MixedLMResults, re_ix: Any, vtype: str, num_low: int = 5, dist_low: float = 1.0,
               num_high: int = 5, dist_high: float = 1.0) -> np.ndarray:
    """statsmodels' ``profile_re``: ``(n, 2)`` array of (variance, profile log-likelihood).

    The variance of random effect ``re_ix`` (an ``exog_re`` column index for
    ``vtype="re"``, a variance-component name for ``"vc"``) is held at each value of
    a grid from ``var − dist_low`` to ``var + dist_high`` (natural scale; ``num_low``
    and ``num_high`` points each side), as statsmodels: on the relative scale
    ``var / scale`` with the scale re-estimated, by the fit's criterion (REML or ML).
    The first column is the held relative variance times that fit's scale.
    """
    m = res.model
    st = m.structure
    cp = getattr(res, "_cp", None) or m._cp
    if vtype == "re":
        if not 0 <= int(re_ix) < st.q_re:
            raise ValueError(f"re_ix must index the {st.q_re} random effects {m.exog_re_names}")
        j = int(re_ix)
        var0 = float(res.cov_re.to_numpy()[j, j])
        if st.re_diagonal or st.q_re == 1:
            t, perm = j, np.eye(st.q)
        else:
            t, perm = 0, _block_perm(st.q, st.q_re, [j])
    elif vtype == "vc":
        names = list(st.vc_names)
        if re_ix not in names:
            raise ValueError(f"unknown variance component {re_ix!r}; the model has {names}")
        k = names.index(re_ix)
        var0 = float(res.vcomp[k])
        t, perm = st.n_re_theta + k, np.eye(st.q)
    else:
        raise ValueError(f"vtype must be 're' or 'vc', got {vtype!r}")
    low = (var0 - dist_low) / res.scale
    high = (var0 + dist_high) / res.scale
    if low <= 0:
        raise ValueError("dist_low is too large and would result in a negative variance. Try a smaller value.")
    r0 = var0 / res.scale
    grid = np.concatenate([np.linspace(low, r0, num_low + 1), np.linspace(r0, high, num_high + 1)[1:]])
    par = _Param("relvar", RELVAR, t, perm, 0.0, np.inf)
    u0 = np.tile(_start_u(res.theta, np.sqrt(res.scale), par, st), (len(grid), 1))
    spec = Spec(jnp.full(len(grid), RELVAR), jnp.full(len(grid), t), jnp.asarray(grid),
                jnp.asarray(np.broadcast_to(perm, (len(grid),) + perm.shape)))
    _, dev, s2, _ = _profile_lanes(jnp.asarray(u0), spec, cp, st, res.reml)
    return np.column_stack([grid * np.asarray(s2), -0.5 * np.asarray(dev)])
