"""Likelihood backends: one interface, two implementations.

Every model is fitted by one of two backends, and every feature (standard errors,
small-sample df, profile intervals, bootstrap, prediction, conditional variances, ...)
is written once against the interface below, never against a backend's internals.

* :class:`GroupedBackend`: per-group cross-products over padded, vmapped groups (one
  grouping factor, nested factors as variance components, structured residuals by
  whitening each group inside the objective): :mod:`mixedjax.likelihood`,
  :mod:`mixedjax.residuals`.
* :class:`CrossedBackend`: lme4's penalised least squares with a sparse blocked
  Cholesky (crossed factors): :mod:`mixedjax.crossed_data`,
  :mod:`mixedjax.crossed_likelihood`.

A backend is a frozen, hashable dataclass (static under ``jit``); its data are a
pytree.  The interface, every method pure JAX unless noted:

``terms``
    the θ layout (:class:`mixedjax.terms.TermSpec` per random-effects term);
``n_theta``, ``n_rho``
    random-effects parameters and residual-structure parameters (unconstrained ρ);
    the optimiser's vector is ``concat(θ, ρ)``;
``normal(fs, rho, data)``
    the summed GLS pieces :class:`mixedjax.likelihood.Normal` at the term factors
    ``fs`` (``T_k``, any square matrices) and ρ: everything the profiled deviance,
    β̂, σ̂², Cov(β̂) and the likelihood at given (β, σ²) need;
``nobs(data)``;
``conditional(fs, rho, data, beta)``
    per term, conditional modes ``(l_k, q_k)`` and relative conditional covariances
    ``(l_k, q_k, q_k)`` (times σ² for lme4's condVar), on ``conditional_data(data)`` (host side:
    what the conditional covariances read beyond the likelihood's data);
``row_effects(modes, data)``, ``fixed_part(beta, data)``, ``noise(key, rho, data)``
    ``Z b``, ``X β`` and one draw of the residual ``N(0, R/w)`` in the model's row order;
``with_response(data, y)``
    the data with a new response (row order), everything response-free reused;
``minimize(theta0, data, reml, ...)`` (host)
    the backend's optimiser over ``concat(θ, ρ)``: a :class:`mixedjax.optimize.Solution`, and the
    :class:`mixedjax.likelihood.Profiled` fit at its ``x`` when the optimiser evaluated it there (else ``None``);
``minimize_jax(theta0, data, reml, ...)``
    a pure-JAX (jittable, vmappable) fit, for refitting many responses in one call;
``rho_names``, ``rho_to_natural``, ``rho_from_natural``
    the residual parameters on their natural scale (sd ratios, AR(1) φ).

The generic functions of this module (:func:`profiled`, :func:`deviance_given`,
:func:`loglike_natural`, ...) are the only places where the profiled likelihood is
assembled from those pieces.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from jax import Array
from threadpoolctl import ThreadpoolController

from . import terms as tm
from .covariance import CovStructure
from .crossed_data import CrossedData, CrossedStructure, all_pairs_of_pairs, theta_scales
from .crossed_likelihood import conditional as crossed_conditional
from .crossed_likelihood import normal_ts, row_effects
from .crossprod import ROWS_NOT_KEPT
from .data import CrossProducts, GroupedData, cross_products
from .dfo import minimize_dfo
from .export_cache import cached_jit
from .likelihood import (
    Normal,
    Profiled,
    deviance_and_grad,
    deviance_given,
    em_update,
    normal_equations,
    profile,
    profile_normal,
    solve_groups,
    sum_fixed_parts,
)
from .linalg import solve_lower, solve_upper_t, spd_inverse
from .optimize import Result, Solution, minimize, minimize_many
from .residuals import ResidualSpec, whitened_cross_products

# XLA:CPU's newer fusion emitters compile these small-op programs more slowly than the classic
# elemental emitter, at the same run time (10,000-model batch: compile ~1.9 s -> ~1.4 s).
FAST_COMPILE = {"xla_cpu_use_fusion_emitters": False}
# One model at a time: with backend optimisation level 0 as well, the dietox fit compiles in ~0.7 s instead
# of ~1.2 s (2-core CPU) and runs in 1 ms instead of 0.5 ms.  Batched fits keep the default level.
SINGLE_FIT = {**FAST_COMPILE, "xla_backend_optimization_level": 0}
# The profiled fit at θ (the crossed fit's one program): LLVM's code split in as many parts as there are cores
# (at most XLA's 32).  InstEval on 2 cores: compiled in 0.28 s instead of 0.34 s (medians of 7 fresh processes),
# the same run time.
PROFILED_COMPILE = {**FAST_COMPILE, "xla_cpu_parallel_codegen_split_count": max(1, min(os.cpu_count() or 1, 32))}
SNAP_TOL = 1e-2  # try diagonal entries of Λ below this at exactly 0 after the fit


# ============================================================================== generic profiled likelihood
def split(backend: Any, theta: Array) -> tuple[list[Array], Array]:
    """``(term factors, ρ)`` of the optimiser's vector ``concat(θ, ρ)``."""
    return tm.factors(theta[: backend.n_theta], backend.terms), theta[backend.n_theta :]


def normal_at(backend: Any, theta: Array, data: Any) -> Normal:
    fs, rho = split(backend, theta)
    return backend.normal(fs, rho, data)


def profiled(backend: Any, theta: Array, data: Any, reml: bool | Array) -> Profiled:
    """Profiled deviance (−2ℓ or the REML criterion), β̂ and σ̂² at ``concat(θ, ρ)``."""
    return profile_normal(normal_at(backend, theta, data), backend.nobs(data), reml)


def deviance(backend: Any, theta: Array, data: Any, reml: bool | Array) -> Array:
    """The profiled deviance at ``concat(θ, ρ)``: what every fit minimises."""
    return profiled(backend, theta, data, reml).deviance


def natural_size(backend: Any) -> int:
    """Natural-scale variance parameters: each term's covariance lower triangle, then ρ on its natural scale."""
    return sum(t.n_theta for t in backend.terms) + backend.n_rho


def natural_from_fit(backend: Any, theta: np.ndarray, sigma2: float) -> np.ndarray:
    """Natural parameters (each term's covariance entries, natural residual parameters) at a fit (host)."""
    fs = tm.factors_np(theta[: backend.n_theta], backend.terms)
    covs = [sigma2 * f @ f.T for f in fs]
    parts = [np.asarray(c)[t.positions()] for c, t in zip(covs, backend.terms, strict=True)]
    parts.append(np.asarray(backend.rho_to_natural(np.asarray(theta[backend.n_theta :], float))))
    return np.concatenate(parts)


def loglike_natural(backend: Any, v: Array, beta: Array, data: Any, reml: bool | Array) -> Array:
    """Log-likelihood at natural parameters ``v`` (:func:`natural_size` entries, then σ²) and given β.

    The function behind the standard errors of the variance parameters (its observed information).
    """
    scale = v[-1]
    fs, off = [], 0
    for t in backend.terms:
        cov = tm.cov_from_tril(v[off : off + t.n_theta], t) / scale
        fs.append(tm.factor_from_cov(cov, t))
        off += t.n_theta
    rho = backend.rho_from_natural(v[off:-1])
    ne = backend.normal(fs, rho, data)
    return -0.5 * deviance_given(ne, backend.nobs(data), beta, scale, reml)


def cov_beta_vp(backend: Any, vp: Array, data: Any) -> Array:
    """``Cov(β̂) = σ² (X'V⁻¹X)⁻¹`` at ``vp = concat(θ, ρ, σ)`` (a smooth function for Satterthwaite)."""
    ne = normal_at(backend, vp[:-1], data)
    return vp[-1] ** 2 * spd_inverse(ne.a)


def deviance_vp(backend: Any, vp: Array, data: Any, reml: bool | Array) -> Array:
    """The deviance at ``vp = concat(θ, ρ, σ)`` with β profiled (lmerTest's ``devfun_vp``)."""
    ne = normal_at(backend, vp[:-1], data)
    return deviance_given(ne, backend.nobs(data), None, vp[-1] ** 2, reml)


def conditional(backend: Any, theta: Array, data: Any, beta: Array) -> tuple[list[Array], list[Array]]:
    fs, rho = split(backend, theta)
    return backend.conditional(fs, rho, data, beta)


def simulate_one(backend: Any, key: Array, theta: Array, beta: Array, sigma2: Array, data: Any) -> Array:
    """One response from the fitted model: ``X β + Z b* + ε*``, ``b*_k = σ u T_kᵀ``, ``ε* ~ N(0, σ² R / w)``."""
    fs, rho = split(backend, theta)
    k_re, k_eps = jax.random.split(key)
    keys = jax.random.split(k_re, len(fs))
    sigma = jnp.sqrt(sigma2)
    modes = [sigma * jax.random.normal(k, (lv, f.shape[0]), dtype=beta.dtype) @ f.T
             for k, f, lv in zip(keys, fs, backend.levels(data), strict=True)]
    return backend.fixed_part(beta, data) + backend.row_effects(modes, data) + sigma * backend.noise(k_eps, rho, data)


profiled_jit = cached_jit(profiled, static_argnames=("backend",), compiler_options=PROFILED_COMPILE)
conditional_jit = cached_jit(conditional, static_argnames=("backend",))


def jacobian_transform(backend: Any) -> Any:
    """``jax.jacfwd`` where the backend's algebra has forward-mode rules, else ``jax.jacrev``.

    Second derivatives as forward over reverse trace and compile several times faster than
    reverse over reverse; the crossed backend's dense Cholesky has a custom VJP and no
    forward rule (``backend.forward_mode`` is False there).
    """
    return jax.jacfwd if backend.forward_mode else jax.jacrev


def _info_natural(backend: Any, v: Array, beta: Array, data: Any, reml: bool | Array) -> Array:
    return jacobian_transform(backend)(jax.grad(loglike_natural, argnums=1), argnums=1)(backend, v, beta, data, reml)


# evaluated once per fit: XLA at optimisation level 0 (SINGLE_FIT) compiles several times faster
info_natural_jit = cached_jit(_info_natural, static_argnames=("backend",), compiler_options=SINGLE_FIT)
info_natural_jit.__doc__ = "Hessian of :func:`loglike_natural` in the natural parameters ``v``."


def _loglike_natural_sub(v_sub: Array, v_full: Array, idx: Array, backend: Any, data: Any, reml: Any) -> Array:
    return loglike_natural(backend, v_full.at[idx].set(v_sub), None, data, reml)


def _info_natural_sub(v_sub: Array, v_full: Array, idx: Array, backend: Any, data: Any, reml: Any) -> Array:
    return jacobian_transform(backend)(jax.grad(_loglike_natural_sub))(v_sub, v_full, idx, backend, data, reml)


# the information of a subset of the natural parameters, the others held (a singular fit's boundary variances)
info_natural_sub_jit = cached_jit(_info_natural_sub, static_argnames=("backend",), compiler_options=SINGLE_FIT)


def loglike_given(backend: Any, theta: Array, data: Any, beta: Array, reml: bool | Array) -> Array:
    """Log-likelihood at ``concat(θ, ρ)`` and given β (σ² profiled)."""
    return -0.5 * deviance_given(normal_at(backend, theta, data), backend.nobs(data), beta, None, reml)


loglike_given_jit = cached_jit(loglike_given, static_argnames=("backend",))


# ============================================================================================ per-group
class GroupedModelData(NamedTuple):
    """Data of a per-group model: padded rows, their iid cross-products, and the row layout.

    ``padded`` (:class:`mixedjax.data.GroupedData`), ``cp`` its cross-products, ``zmask (G, q)``
    the real random-effects columns of each group, ``strata (G, n_max)`` residual strata,
    ``codes, position (n,)`` each row's group and place in it, ``vc_group, vc_col`` per
    variance-component term the (group, column) of each of its levels.
    """

    padded: GroupedData
    cp: CrossProducts
    zmask: Array
    strata: Array
    codes: Array
    position: Array
    vc_group: tuple
    vc_col: tuple


def _rows_kept(data: GroupedModelData, what: str) -> None:
    """``NotImplementedError`` for a model built from cross-products only (no padded rows kept)."""
    if data.padded is None:
        raise NotImplementedError(ROWS_NOT_KEPT.format(what=what))


def _fit_grouped(theta0: Array, cp: CrossProducts, zmask: Array, structure: CovStructure, reml: bool | Array = True,
                 maxiter: int = 200, gtol: float = 1e-6, em_iter: int = 30) -> Solution:
    """EM warm start, BFGS on the closed-form gradient, gradient polish, boundary snap (pure JAX)."""
    cp = sum_fixed_parts(cp)
    return minimize(lambda theta: profile(theta, cp, structure, reml).deviance, theta0,
                    warm_value_and_step=lambda theta: em_update(theta, cp, zmask, structure, reml), n_warm=em_iter,
                    maxiter=maxiter, gtol=gtol,
                    value_and_grad=lambda theta: deviance_and_grad(theta, cp, structure, reml),
                    snap=structure.diagonal_theta(), snap_tol=SNAP_TOL)


def fit_grouped_many(theta0: Array, cp: CrossProducts, zmask: Array, structure: CovStructure,
                     reml: bool | Array = True, maxiter: int = 200, gtol: float = 1e-6, em_iter: int = 30,
                     working: int | None = None) -> Solution:
    """:func:`_fit_grouped` for M models at once (``cp``, ``zmask`` with a leading model axis; working set)."""
    m = cp.nobs.shape[0]
    return minimize_many(lambda th, d: deviance_and_grad(th, d[0], structure, reml),
                         jnp.broadcast_to(theta0, (m,) + theta0.shape), (cp, zmask),
                         warm_value_and_step=lambda th, d: em_update(th, d[0], d[1], structure, reml),
                         n_warm=em_iter, maxiter=maxiter, gtol=gtol, snap=structure.diagonal_theta(),
                         snap_tol=SNAP_TOL, working=working)


def _fit_structured(theta0: Array, data: GroupedData, strata: Array, zmask: Array, structure: CovStructure,
                    spec: ResidualSpec, reml: bool | Array = True, maxiter: int = 200, gtol: float = 1e-6,
                    em_iter: int = 50) -> Solution:
    """:func:`_fit_grouped` with the residual parameters appended to θ; EM updates the θ part at fixed ρ."""
    n_re = structure.n_theta

    def objective(t):
        return profile(t[:n_re], whitened_cross_products(data, strata, t[n_re:], spec), structure, reml).deviance

    def warm(t):
        cp = whitened_cross_products(data, strata, t[n_re:], spec)
        dev, new = em_update(t[:n_re], cp, zmask, structure, reml)
        return dev, jnp.concatenate([new, t[n_re:]])

    snap = np.concatenate([structure.diagonal_theta(), np.zeros(spec.n_params, bool)])
    return minimize(objective, theta0, warm_value_and_step=warm, n_warm=em_iter, maxiter=maxiter, gtol=gtol,
                    snap=snap, snap_tol=SNAP_TOL)


_GROUPED_STATIC = ("structure", "maxiter", "gtol", "em_iter")
fit_grouped = cached_jit(_fit_grouped, static_argnames=_GROUPED_STATIC)
fit_grouped.__doc__ = _fit_grouped.__doc__
fit_grouped_single = cached_jit(_fit_grouped, static_argnames=_GROUPED_STATIC, compiler_options=SINGLE_FIT,
                                name="mixedjax.backends.fit_grouped_single")
fit_grouped_large = cached_jit(_fit_grouped, static_argnames=_GROUPED_STATIC, compiler_options=FAST_COMPILE,
                               name="mixedjax.backends.fit_grouped_large")
LARGE_GROUPS = 16384
"""Padded groups from which one fit is compiled at XLA's default optimisation level (:data:`FAST_COMPILE`)
instead of level 0 (:data:`SINGLE_FIT`): level 0 compiles ~0.5 s faster but its loops over the groups run
3-4x slower (100k groups: 1.9 s against 0.4 s a fit; 1M groups: 17 s against 5 s)."""
_fit_structured_jit = cached_jit(_fit_structured, static_argnames=_GROUPED_STATIC + ("spec",))


@dataclass(frozen=True)
class GroupedBackend:
    """Per-group cross-products (:mod:`mixedjax.likelihood`), optionally whitened by a residual structure.

    ``structure``: the per-group Λ layout (:class:`mixedjax.covariance.CovStructure`);
    ``residual``: the residual structure (:class:`mixedjax.residuals.ResidualSpec`) or ``None``.
    """

    structure: CovStructure
    residual: ResidualSpec | None = None

    @property
    def terms(self) -> tuple[tm.TermSpec, ...]:
        st = self.structure
        head = (tm.TermSpec(st.q_re, st.re_diagonal),) if st.q_re else ()
        return head + (tm.TermSpec(1),) * st.n_vc

    @property
    def n_theta(self) -> int:
        return self.structure.n_theta

    @property
    def n_rho(self) -> int:
        return 0 if self.residual is None else self.residual.n_params

    @property
    def kind(self) -> str:
        return "grouped"

    @property
    def forward_mode(self) -> bool:
        """Forward-mode autodiff works through the likelihood (:func:`jacobian_transform`)."""
        return True

    def lam(self, fs: list[Array]) -> Array:
        """The per-group ``Λ (q, q)``: the correlated block, then a scaled identity per variance component."""
        st = self.structure
        q = st.q
        dtype = fs[0].dtype if fs else jnp.float64
        lam = jnp.zeros((q, q), dtype)
        k = 0
        if st.q_re:
            lam = lam.at[: st.q_re, : st.q_re].set(fs[0])
            k = 1
        off = st.q_re
        for size in st.vc_sizes:
            idx = np.arange(off, off + size)
            lam = lam.at[idx, idx].set(fs[k][0, 0])
            k += 1
            off += size
        return lam

    def cross_products(self, rho: Array, data: GroupedModelData) -> CrossProducts:
        if self.residual is None:
            return data.cp
        return whitened_cross_products(data.padded, data.strata, rho, self.residual)

    def normal(self, fs: list[Array], rho: Array, data: GroupedModelData) -> Normal:
        cp = self.cross_products(rho, data)
        return normal_equations(solve_groups(self.lam(fs), cp), cp)

    def nobs(self, data: GroupedModelData) -> Array:
        return data.cp.nobs

    def levels(self, data: GroupedModelData) -> list[int]:
        g = data.zmask.shape[0]
        head = [g] if self.structure.q_re else []
        return head + [v.shape[0] for v in data.vc_group]

    def conditional_data(self, data: GroupedModelData) -> GroupedModelData:
        """``data`` itself: the conditional modes read only the cross-products."""
        return data

    def conditional(self, fs: list[Array], rho: Array, data: GroupedModelData,
                    beta: Array) -> tuple[list[Array], list[Array]]:
        """``b̂_i = Λ M_i⁻¹ Λᵀ Z_iᵀ(y_i − X_i β)``, ``Var(b_i | y)/σ² = Λ M_i⁻¹ Λᵀ`` per group, then per term."""
        lam = self.lam(fs)
        cp = self.cross_products(rho, data)
        gs = solve_groups(lam, cp)
        u = solve_upper_t(gs.chol, gs.d - jnp.sum(gs.c * beta, axis=-1))
        b = jnp.sum(lam * u[:, None, :], axis=-1)
        linv_lt = solve_lower(gs.chol, jnp.broadcast_to(lam.T, gs.chol.shape))
        cov = jnp.sum(linv_lt[:, :, :, None] * linv_lt[:, :, None, :], axis=1)
        st = self.structure
        modes, covs = [], []
        if st.q_re:
            modes.append(b[:, : st.q_re])
            covs.append(cov[:, : st.q_re, : st.q_re])
        for g, c in zip(data.vc_group, data.vc_col, strict=True):
            modes.append(b[g, c][:, None])
            covs.append(cov[g, c, c][:, None, None])
        return modes, covs

    def row_effects(self, modes: list[Array], data: GroupedModelData) -> Array:
        _rows_kept(data, "Z b (fitted values, residuals, predictions on the fitted rows)")
        st = self.structure
        z = data.padded.z[data.codes, data.position]  # (n, q)
        b = jnp.zeros((data.padded.y.shape[0], st.q), z.dtype)
        k = 0
        if st.q_re:
            b = b.at[:, : st.q_re].set(modes[0])
            k = 1
        for g, c in zip(data.vc_group, data.vc_col, strict=True):
            b = b.at[g, c].set(modes[k][:, 0])
            k += 1
        return jnp.sum(z * b[data.codes], axis=-1)

    def fixed_part(self, beta: Array, data: GroupedModelData) -> Array:
        _rows_kept(data, "X β (simulation, bootstrap, fitted values)")
        return data.padded.x[data.codes, data.position] @ beta

    def noise(self, key: Array, rho: Array, data: GroupedModelData) -> Array:
        """``N(0, R_i / w)`` per group (VarIdent sd ratios, AR(1) within group in time order), row order."""
        _rows_kept(data, "simulation")
        pad = data.padded
        e = jax.random.normal(key, pad.y.shape, dtype=pad.y.dtype)
        log_d = -0.5 * jnp.log(jnp.where(pad.mask > 0, pad.w, 1.0))
        spec = self.residual
        k = 0
        if spec is not None and spec.n_strata:
            log_ratio = jnp.concatenate([jnp.zeros(1, rho.dtype), rho[: spec.n_strata - 1]])
            log_d = log_d + log_ratio[data.strata]
            k = spec.n_strata - 1
        if spec is not None and spec.ar1:
            phi = jnp.tanh(rho[k])
            innov = jnp.sqrt(1.0 - phi**2)

            def step(prev, x):
                cur = phi * prev + innov * x
                return cur, cur

            first = e[:, 0]
            _, rest = jax.lax.scan(step, first, e[:, 1:].T)
            e = jnp.concatenate([first[:, None], rest.T], axis=1)
        e = e * jnp.exp(log_d)
        return e[data.codes, data.position]

    def with_response(self, data: GroupedModelData, y: Array) -> GroupedModelData:
        _rows_kept(data, "a new response (simulate, bootstrap, fit_many, refits to new data)")
        pad = data.padded
        yp = jnp.zeros_like(pad.y).at[data.codes, data.position].set(y)
        pad = pad._replace(y=yp)
        return data._replace(padded=pad, cp=cross_products(pad))

    def sparse_design(self, data: GroupedModelData) -> tuple[Any, np.ndarray, np.ndarray]:
        """Host-side ``(Z, X, √w)``: ``Z`` a scipy CSR matrix ``(n, Σ_k l_k q_k)`` with columns term by term,
        level-major (the order of :meth:`conditional`), ``X (n, p)``, ``√w (n,)`` (for dense checks and
        Kenward–Roger; rows in the model's order)."""
        _rows_kept(data, "the sparse design (Kenward-Roger)")
        codes, pos = np.asarray(data.codes), np.asarray(data.position)
        z = np.asarray(data.padded.z)[codes, pos]
        x = np.asarray(data.padded.x)[codes, pos]
        sw = np.sqrt(np.asarray(data.padded.w)[codes, pos])
        st = self.structure
        n = len(codes)
        blocks = []
        g = data.padded.y.shape[0]
        if st.q_re:
            rows = np.repeat(np.arange(n), st.q_re)
            cols = (codes[:, None] * st.q_re + np.arange(st.q_re)[None, :]).ravel()
            blocks.append(sp.csr_matrix((z[:, : st.q_re].ravel(), (rows, cols)), shape=(n, g * st.q_re)))
        for vg, vc in zip(data.vc_group, data.vc_col, strict=True):
            vg, vc = np.asarray(vg), np.asarray(vc)
            lookup = {(int(a), int(b)): i for i, (a, b) in enumerate(zip(vg, vc, strict=True))}
            rr, cc, vv = [], [], []
            for col in np.unique(vc):
                sel = np.flatnonzero(z[:, col] != 0)
                for r in sel:
                    key = (int(codes[r]), int(col))
                    if key in lookup:
                        rr.append(r)
                        cc.append(lookup[key])
                        vv.append(z[r, col])
            blocks.append(sp.csr_matrix((vv, (rr, cc)), shape=(n, len(vg))))
        return sp.hstack(blocks).tocsr(), x, sw

    # ---------------------------------------------------------------- residual parameters, natural scale
    def rho_names(self, strata_labels: list | None) -> list[str]:
        spec = self.residual
        if spec is None:
            return []
        out = [f"sd ratio {lab}" for lab in (strata_labels or [])[1:]] if spec.n_strata else []
        return out + (["Phi"] if spec.ar1 else [])

    def rho_to_natural(self, rho: Any) -> Any:
        """``(sd ratios of levels 2..K, φ)`` from ρ = ``(log ratios, atanh φ)``."""
        spec = self.residual
        if spec is None:
            return rho
        xp = jnp if isinstance(rho, jax.Array) else np
        k = spec.n_strata - 1 if spec.n_strata else 0
        return xp.concatenate([xp.exp(rho[:k]), xp.tanh(rho[k:])])

    def rho_from_natural(self, v: Any) -> Any:
        spec = self.residual
        if spec is None:
            return v
        xp = jnp if isinstance(v, jax.Array) else np
        k = spec.n_strata - 1 if spec.n_strata else 0
        return xp.concatenate([xp.log(v[:k]), xp.arctanh(v[k:])])

    # ---------------------------------------------------------------------------------- optimisers
    def minimize(self, theta0: np.ndarray, data: GroupedModelData, reml: bool, maxiter: int = 200,
                 gtol: float = 1e-6, em_iter: int = 30, **_: Any) -> tuple[Solution, None]:
        dtype = data.cp.xtx.dtype
        if self.residual is None:
            program = fit_grouped_large if data.cp.n.shape[0] >= LARGE_GROUPS else fit_grouped_single
            return jax.device_get(program(jnp.asarray(theta0, dtype), data.cp, data.zmask, self.structure,
                                          reml=bool(reml), maxiter=int(maxiter), gtol=float(gtol),
                                          em_iter=int(em_iter))), None
        return jax.device_get(_fit_structured_jit(jnp.asarray(theta0, dtype), data.padded, data.strata, data.zmask,
                                                  self.structure, self.residual, reml=bool(reml),
                                                  maxiter=int(maxiter), gtol=float(gtol),
                                                  em_iter=int(em_iter))), None

    def minimize_jax(self, theta0: Array, data: GroupedModelData, reml: bool | Array, maxiter: int = 200,
                     gtol: float = 1e-6, em_iter: int = 10) -> Solution:
        if self.residual is None:
            return _fit_grouped(theta0, data.cp, data.zmask, self.structure, reml, maxiter, gtol, em_iter)
        return _fit_structured(theta0, data.padded, data.strata, data.zmask, self.structure, self.residual, reml,
                               maxiter, gtol, em_iter)


# ============================================================================================== crossed
class CrossedModelData(NamedTuple):
    """Data of a crossed model: :class:`mixedjax.crossed_data.CrossedData`, the pairs of pairs for the
    conditional variances (``None`` until :meth:`CrossedBackend.conditional_data`), and the rows
    (``x (n, p)``, ``sw (n,)`` = √w, per term ``codes (n,)`` and ``z (n, q_k)``)."""

    cd: CrossedData
    pp: tuple
    x: Array
    sw: Array
    codes: tuple
    zs: tuple


def single_threaded_blas() -> AbstractContextManager:
    """Run jaxlib's LAPACK calls (scipy's OpenBLAS) on one thread while XLA uses the cores.

    jaxlib calls LAPACK through scipy's bundled OpenBLAS, whose worker threads spin while
    waiting; next to XLA's own thread pool (and the fit's own evaluation threads) they
    oversubscribe the cores (InstEval, 2 cores: 62 s with OpenBLAS's default threads, 11 s
    with one, for the former gradient fit).  threadpoolctl restores the setting afterwards.
    The BLAS libraries are found once per process (:func:`blas_controller`).
    """
    return blas_controller().limit(limits=1, user_api="blas")


@functools.lru_cache(maxsize=1)
def blas_controller() -> ThreadpoolController:
    """threadpoolctl's view of the BLAS libraries loaded when first asked (the scan of every loaded library takes
    10-100 ms; once per process, not once per fit: numpy's and scipy's OpenBLAS are loaded at ``import mixedjax``)."""
    return ThreadpoolController()


@dataclass(frozen=True)
class CrossedBackend:
    """lme4's penalised least squares with a sparse blocked Cholesky (:mod:`mixedjax.crossed_likelihood`)."""

    structure: CrossedStructure

    @property
    def terms(self) -> tuple[tm.TermSpec, ...]:
        return self.structure.terms

    @property
    def n_theta(self) -> int:
        return self.structure.n_theta

    @property
    def n_rho(self) -> int:
        return 0

    @property
    def kind(self) -> str:
        return "crossed"

    @property
    def forward_mode(self) -> bool:
        """No: the dense Cholesky of the Schur complement has a custom VJP only."""
        return False

    def normal(self, fs: list[Array], rho: Array, data: CrossedModelData) -> Normal:
        return normal_ts(fs, data.cd, self.structure)

    def nobs(self, data: CrossedModelData) -> Array:
        return data.cd.nobs

    def levels(self, data: CrossedModelData) -> list[int]:
        return list(self.structure.levels)

    def conditional_data(self, data: CrossedModelData) -> CrossedModelData:
        """``data`` with the pairs of pairs the conditional variances read (host side; made here, on first use,
        not with the model: the fit never needs them, and for InstEval they are 2.5 million pairs)."""
        return data if data.pp is not None else data._replace(pp=all_pairs_of_pairs(data.cd, self.structure))

    def conditional(self, fs: list[Array], rho: Array, data: CrossedModelData,
                    beta: Array) -> tuple[list[Array], list[Array]]:
        if data.pp is None:
            raise ValueError("the conditional modes of a crossed model need its pairs of pairs: pass "
                             "backend.conditional_data(data)")
        return crossed_conditional(fs, data.cd, self.structure, beta, data.pp)

    def row_effects(self, modes: list[Array], data: CrossedModelData) -> Array:
        return row_effects(modes, data.codes, data.zs)

    def fixed_part(self, beta: Array, data: CrossedModelData) -> Array:
        return data.x @ beta

    def noise(self, key: Array, rho: Array, data: CrossedModelData) -> Array:
        return jax.random.normal(key, data.sw.shape, dtype=data.sw.dtype) / data.sw

    def with_response(self, data: CrossedModelData, y: Array) -> CrossedModelData:
        """The response-dependent columns of the cross-products (``Zᵀy``, ``Xᵀy``, ``yᵀy``) for a new ``y``."""
        st = self.structure
        cd = data.cd
        yw = y * data.sw
        r1y = jax.ops.segment_sum(data.zs[0] * data.sw[:, None] * yw[:, None], data.codes[0],
                                  num_segments=st.levels[0])
        r1 = cd.r1.at[:, :, -1].set(r1y)
        r2 = cd.r2
        if len(st.qs) > 1:
            parts = [jax.ops.segment_sum(z * data.sw[:, None] * yw[:, None], c, num_segments=lv).reshape(-1)
                     for z, c, lv in zip(data.zs[1:], data.codes[1:], st.levels[1:], strict=True)]
            r2 = r2.at[:, -1].set(jnp.concatenate(parts))
        xw = data.x * data.sw[:, None]
        cd = cd._replace(r1=r1, r2=r2, xty=xw.T @ yw, yty=yw @ yw)
        return data._replace(cd=cd)

    def sparse_design(self, data: CrossedModelData) -> tuple[Any, np.ndarray, np.ndarray]:
        """Host-side ``(Z, X, √w)`` as :meth:`GroupedBackend.sparse_design` (columns term by term, level-major)."""
        blocks = []
        for c, z, lv in zip(data.codes, data.zs, self.structure.levels, strict=True):
            c, z = np.asarray(c), np.asarray(z)
            n, q = z.shape
            rows = np.repeat(np.arange(n), q)
            cols = (c[:, None] * q + np.arange(q)[None, :]).ravel()
            blocks.append(sp.csr_matrix((z.ravel(), (rows, cols)), shape=(n, lv * q)))
        return sp.hstack(blocks).tocsr(), np.asarray(data.x), np.asarray(data.sw)

    def rho_names(self, strata_labels: list | None) -> list[str]:
        return []

    def rho_to_natural(self, rho: Any) -> Any:
        return rho

    def rho_from_natural(self, v: Any) -> Any:
        return v

    def minimize(self, theta0: np.ndarray, data: CrossedModelData, reml: bool, maxiter: int = 1000,
                 ftol: float = 1e-3, xtol: float = 1e-4, scales: np.ndarray | None = None,
                 **_: Any) -> tuple[Solution, Profiled | None]:
        """Derivative-free trust-region Newton (:func:`mixedjax.dfo.minimize_dfo`) on ``θ = c sinh φ``.

        The host loop calls one small jitted program (the profiled deviance), so compilation
        stays cheap and an evaluation is one segment sum and one dense Cholesky.  Diagonal
        entries of θ are searched as ``θ = c sinh φ``: linear below the scale ``c`` (about
        ``1/√(rows per level)``, where a term's log-determinant turns from quadratic to
        logarithmic in θ) and logarithmic above, so the deviance is close to quadratic in φ
        from the boundary to large variances, and a step in φ is a relative change of a
        variance; it is even in each term's last diagonal entry, so φ is unconstrained.
        ``maxiter`` caps the evaluations; ``ftol`` is the predicted decrease at which the
        search hands over to the Newton polish, ``xtol`` the Newton step (in φ) below which
        the polish takes its last step.  Diagonal entries below ``SNAP_TOL`` are then tried at
        exactly 0 (a singular fit), kept unless the deviance gets worse.
        """
        theta0 = np.asarray(theta0, float)
        diag = tm.diagonal_theta(self.terms)
        c = np.where(diag, self._theta_scales(data) if scales is None else scales, 1.0)

        def to_theta(phi):
            return np.where(diag, c * np.sinh(phi), phi)

        reml_arr = np.asarray(bool(reml))
        # compiled ahead, so that the optimiser's first batch runs concurrently (and calls skip jit's dispatch)
        program = profiled_jit.compiled(self, theta0, data, reml_arr)

        at = {}  # every point evaluated: the profiled fit at the solution is one of them

        def fun(phi):
            theta = to_theta(phi)
            pr = program(theta, data, reml_arr)
            at[theta.tobytes()] = pr
            return float(pr.deviance)

        with single_threaded_blas(), \
                ThreadPoolExecutor(max_workers=max(1, min(os.cpu_count() or 1, 2 * theta0.size))) as pool:
            sol = minimize_dfo(lambda pts: list(pool.map(fun, pts)), np.where(diag, np.arcsinh(theta0 / c), theta0),
                               0.1, float(ftol), int(maxiter), xtol=float(xtol), snap=diag,
                               snap_tol=np.arcsinh(SNAP_TOL / c))
        grad = sol.grad / np.where(diag, c * np.cosh(sol.x), 1.0)  # chain rule back to θ
        x = to_theta(sol.x)
        return (sol._replace(x=x, grad=grad, x_start=theta0, grad_norm=float(np.abs(grad).max())),
                at.get(x.tobytes()))

    def compile_ahead(self, data: CrossedModelData) -> None:
        """Start compiling :meth:`minimize`'s program for data of these shapes (arrays or
        :class:`jax.ShapeDtypeStruct`) in a background thread; :meth:`minimize` then waits for it instead of
        compiling (:meth:`mixedjax.export_cache.CachedJit.compile_ahead`)."""
        profiled_jit.compile_ahead(self, jax.ShapeDtypeStruct((self.n_theta,), np.float64), data,
                                   jax.ShapeDtypeStruct((), np.bool_))

    def _theta_scales(self, data: CrossedModelData) -> np.ndarray:
        """:func:`mixedjax.crossed_data.theta_scales` from the backend's data (refits pass no ``scales``):
        ``√(levels / Σ w z²)`` of each diagonal entry's column, 1 elsewhere."""
        w = np.asarray(data.sw) ** 2
        out = []
        for z, lv in zip(data.zs, self.structure.levels, strict=True):
            z = np.asarray(z)
            ssq = (z**2 * w[:, None]).sum(axis=0)
            r, c = np.tril_indices(z.shape[1])
            out.append(np.where(r == c, np.sqrt(lv / np.maximum(ssq[r], 1e-300)), 1.0))
        return np.concatenate(out)

    def minimize_jax(self, theta0: Array, data: CrossedModelData, reml: bool | Array, maxiter: int = 200,
                     gtol: float = 1e-6, em_iter: int = 0) -> Solution:
        """BFGS on ``jax.grad`` of the crossed deviance (pure JAX, vmappable: many responses in one call)."""
        return minimize(lambda th: deviance(self, th, data, reml), theta0, maxiter=maxiter, gtol=gtol,
                        snap=tm.diagonal_theta(self.terms), snap_tol=SNAP_TOL)

    def scales(self, lmer_terms: list, w: np.ndarray | None) -> np.ndarray:
        return theta_scales(lmer_terms, w)


__all__ = ["CrossedBackend", "CrossedModelData", "GroupedBackend", "GroupedModelData", "Result", "cov_beta_vp",
           "deviance", "deviance_given", "deviance_vp", "loglike_natural", "natural_from_fit", "profiled"]


def loglike_params(backend: Any, params: Array, data: Any, reml: bool | Array, profile_fe: bool, k_fe: int) -> Array:
    """Log-likelihood at statsmodels-packed ``params``: fixed effects, each term's relative covariance entries
    (``cov / scale``: the lower triangle, row-major), then the residual parameters on their natural scale; σ²
    profiled.  With ``profile_fe`` the fixed effects in ``params`` are replaced by their GLS estimate."""
    fs, off = [], k_fe
    for t in backend.terms:
        cov = tm.cov_from_tril(params[off : off + t.n_theta], t)
        fs.append(tm.factor_from_cov(cov, t))
        off += t.n_theta
    rho = backend.rho_from_natural(params[off:])
    ne = backend.normal(fs, rho, data)
    return -0.5 * deviance_given(ne, backend.nobs(data), None if profile_fe else params[:k_fe], None, reml)


_LL_STATIC = ("backend", "profile_fe", "k_fe")
loglike_params_jit = cached_jit(loglike_params, static_argnames=_LL_STATIC)
score_params_jit = jax.jit(jax.grad(loglike_params, argnums=1), static_argnames=_LL_STATIC)
hessian_params_jit = jax.jit(jax.jacfwd(jax.grad(loglike_params, argnums=1), argnums=1), static_argnames=_LL_STATIC)
