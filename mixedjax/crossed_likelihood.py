"""Crossed random effects, the likelihood layer: lme4's penalised least squares with a sparse blocked Cholesky.

The random effects of all terms stack into ``u`` (``b = Λ u``), and the profiled
deviance needs the Cholesky factor of ``M = Λᵀ Zᵀ Z Λ + I`` (Bates et al. 2015).
Terms are ordered by number of levels, largest first (lme4's order).  The first
term's block ``A₁₁`` is block diagonal (one ``q₁ x q₁`` block per level: vmapped small
Choleskys); the rest of ``M`` is dense (``m = Σ_{k≥2} l_k q_k`` columns) and is
reached through the Schur complement

    S = A₂₂ − A₂₁ A₁₁⁻¹ A₁₂ = A₂₂ − Σ_i V_iᵀ V_i,    V_i = L₁₁,ᵢ⁻¹ A₁₂[i, :],

formed from sparse per-level sums: ``A₂₁`` is stored as its non-zero blocks (one
per pair (level i of the first factor, level j of another) that share a row), and
``S`` accumulates the products of the pairs that share a level ``i`` over index
pairs precomputed once on the host (when every term is scalar: one segment sum
onto the non-zeros of ``S``'s lower triangle, :func:`_scalar_schur`).  No dense
product with the first block is ever formed: for InstEval (2,972 students, 1,156
other columns) an evaluation costs a few million multiply-adds plus a dense
1,156 x 1,156 Cholesky (about 21 ms on one core, 13 ms of it the Cholesky).

With ``L = [[L₁₁, 0], [L₂₁, L₂₂]]``, ``c = L⁻¹ Λᵀ Zᵀ [X y]`` gives the same
Woodbury pieces as the per-group path (``X'V⁻¹X = X'X − c_Xᵀ c_X`` ...,
``log|V| = log|M|``) and the same profiled ML/REML deviance
(:func:`mixedjax.likelihood.profile_normal`).  The objective is a pure,
differentiable JAX function of θ (one lower-triangular ``T_k`` per term, packed
row-major).

The fit (:func:`fit_crossed`) does not use that derivative: with a handful of θ,
a derivative-free trust-region Newton method (:func:`_minimize_dfo`, difference
gradients and an interpolated Hessian) needs ~20 evaluations of the deviance
alone, each far cheaper than a value and gradient (whose reverse pass needs the
whole ``S⁻¹``), and only the deviance is compiled.  It starts from MIVQUE(0)
estimates (:func:`mivque_start`) when every term is scalar.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
from jax import Array

from .crossed_data import CrossedData, CrossedStructure
from .likelihood import Normal, Profiled, profile_normal
from .linalg import (
    cholesky,
    cholesky_loop,
    diagonal,
    logdet_from_cholesky,
    solve_lower,
    solve_lower_loop,
    solve_upper_t,
    solve_upper_t_loop,
    unbatched_lapack,
)
from .terms import theta_slices


def term_factors(theta: Array, st: CrossedStructure) -> list[Array]:
    """Lower-triangular ``T_k (q_k, q_k)`` of each term from θ (row-major lower triangles)."""
    out = []
    for q, sl in zip(st.qs, theta_slices(st.terms), strict=True):
        r, c = np.tril_indices(q)
        out.append(jnp.zeros((q, q), theta.dtype).at[r, c].set(theta[sl]))
    return out


def _lam_t_dense(a: Array, ts: list[Array], st: CrossedStructure) -> Array:
    """``Λ₂ᵀ a`` for the dense part (rows of ``a`` level-major per term k ≥ 2)."""
    parts = []
    for k in range(1, len(st.qs)):
        q, lv, off = st.qs[k], st.levels[k], st.offsets[k]
        blk = a[off : off + q * lv].reshape((lv, q) + a.shape[1:])
        parts.append(jnp.einsum("ba,jb...->ja...", ts[k], blk).reshape((lv * q,) + a.shape[1:]))
    return jnp.concatenate(parts, axis=0)


class CrossedFactor(NamedTuple):
    """The first block of the Cholesky factor of ``M``, the Schur complement, and the forward solves."""

    chol1: Array      # (l₁, q₁, q₁)
    v: tuple          # per term k ≥ 2: (n_k, q₁, q_k) = L₁₁,ᵢ⁻¹ A₁₂ block
    schur: Array      # (m, m) S = A₂₂ − A₂₁ A₁₁⁻¹ A₁₂ (only the lower triangle is read; scalar terms: upper zero)
    c1: Array         # (l₁, q₁, p+1) = L₁₁⁻¹ Λ₁ᵀ Z₁ᵀ [X y]
    r2: Array         # (m, p+1) = Λ₂ᵀ Z₂ᵀ [X y] − L₂₁ c₁ (so c₂ = L₂₂⁻¹ r₂)


def _take(x: Array, idx: Array) -> Array:
    """``x[idx]`` for indices formed on the host and known to be in range: a plain gather, without ``x[idx]``'s
    wrapping of negative indices (three passes over the index array, millions long here, in every evaluation)."""
    return x.at[idx].get(mode="promise_in_bounds", wrap_negative_indices=False)


def _scalar_lam(theta: Array, st: CrossedStructure) -> Array:
    """``λ (m,)``: the θ of each dense-block column (every term scalar).  Broadcasts, not ``jnp.repeat``: its
    cumulative sums made a third of the crossed program's compile time."""
    return jnp.concatenate([jnp.broadcast_to(theta[k], (lv,)) for k, lv in enumerate(st.levels[1:], start=1)])


def _scalar_schur(theta: Array, data: CrossedData, st: CrossedStructure) -> Array:
    """``S`` (lower triangle; upper zero) when every term is scalar: one segment sum over the pairs of pairs.

    ``S_ab = δ_ab + λ_a λ_b (G₂₂,ab − Σ_i w_i B_ia B_ib)``, ``w_i = θ₁² / (1 + θ₁² d_i)``
    (:class:`CrossedData`), evaluated at the non-zeros only.
    """
    m, t1 = st.m, theta[0]
    lam = _scalar_lam(theta, st)
    w1 = t1**2 / (1.0 + t1**2 * data.d1[:, 0, 0])
    t = jax.ops.segment_sum(_take(w1, data.pp_i) * data.pp_c, data.pp_seg, num_segments=data.nz_flat.shape[0])
    vals = _take(lam, data.nz_row) * _take(lam, data.nz_col) * (data.g22_nz - t) + (data.nz_row == data.nz_col)
    return jnp.zeros(m * m, theta.dtype).at[data.nz_flat].set(vals, indices_are_sorted=True, unique_indices=True,
                                                             wrap_negative_indices=False).reshape(m, m)


def _scalar_normal_equations(theta: Array, data: CrossedData, st: CrossedStructure) -> Normal:
    """:func:`normal_equations` when every term is scalar, without the per-pair factor blocks.

    ``A₁₁ = diag(a)``, ``a_i = 1 + θ₁² d_i``: ``c₁ᵀc₁ = Σ_i w_i r₁ᵢ r₁ᵢᵀ`` (``w_i = θ₁²/a_i``),
    ``log|A₁₁| = Σ log a_i``, and ``r₂ = λ ⊙ (Z₂ᵀ[X y] − Bᵀ (w ⊙ r₁))`` (``L₂₁ c₁`` summed per
    column by a sorted segment sum over the pairs); then the dense block as before.
    The compiled program is about half the general one (compile time counts in a fit).
    """
    p = data.xtx.shape[0]
    t1 = theta[0]
    a1 = 1.0 + t1**2 * data.d1[:, 0, 0]
    wr1 = (t1**2 / a1)[:, None] * data.r1[:, 0, :]
    quad = wr1.T @ data.r1[:, 0, :]
    sums = [jax.ops.segment_sum(data.pair_b[k][:, 0, :] * _take(wr1, data.pair_i[k]), data.pair_j[k],
                                num_segments=st.levels[k + 1], indices_are_sorted=True) for k in range(len(st.qs) - 1)]
    r2 = _scalar_lam(theta, st)[:, None] * (data.r2 - jnp.concatenate(sums))
    logdet2, quad2 = dense_logdet_quad(_scalar_schur(theta, data, st), r2)
    quad = quad + quad2
    return Normal(data.xtx - quad[:p, :p], data.xty - quad[:p, p], data.yty - quad[p, p],
                  jnp.sum(jnp.log(a1)) + logdet2 - data.sum_logw)


def factor(theta: Array, data: CrossedData, st: CrossedStructure) -> CrossedFactor:
    """:func:`factor_ts` at θ."""
    return factor_ts(term_factors(theta, st), data, st)


def factor_ts(ts: list[Array], data: CrossedData, st: CrossedStructure) -> CrossedFactor:
    """First block of the blocked Cholesky of ``Λᵀ Zᵀ Z Λ + I``, the Schur complement, ``c₁`` and ``r₂``.

    ``ts``: each term's relative factor ``T_k`` (any square matrix with ``T_k T_kᵀ`` the term's
    relative covariance; lower triangular from θ).
    """
    theta = jnp.concatenate([t.ravel() for t in ts])  # dtype carrier
    t1 = ts[0]
    q1 = st.qs[0]
    a11 = jnp.einsum("ba,ibc,cd->iad", t1, data.d1, t1) + jnp.eye(q1, dtype=theta.dtype)
    chol1 = cholesky(a11)
    c1 = solve_lower(chol1, jnp.einsum("ba,ibp->iap", t1, data.r1))
    if len(st.qs) == 1:
        return CrossedFactor(chol1, (), jnp.zeros((0, 0), theta.dtype), c1, jnp.zeros((0, c1.shape[-1])))
    vs = []
    for k in range(1, len(st.qs)):
        a12 = jnp.einsum("ba,nbc,cd->nda", ts[k], data.pair_b[k - 1], t1)  # (n_k, q₁, q_k): A₁₂ blocks
        vs.append(solve_lower(chol1[data.pair_i[k - 1]], a12))
    m, nk = st.m, len(st.qs) - 1
    if data.nz_flat.shape[0]:  # every term scalar
        s = _scalar_schur(jnp.stack([t[0, 0] for t in ts]), data, st)
    else:  # Λ₂ᵀ G₂₂ Λ₂ + I less the products of the pairs of pairs that share a first-factor level
        g = _lam_t_dense(data.g22, ts, st)
        s = _lam_t_dense(g.T, ts, st).T + jnp.eye(m, dtype=theta.dtype)
        for k in range(nk):
            qk, offk = st.qs[k + 1], st.offsets[k + 1]
            rows = offk + data.pair_j[k][:, None] * qk + jnp.arange(qk)[None, :]  # (n_k, q_k)
            for k2 in range(nk):
                q2, off2 = st.qs[k2 + 1], st.offsets[k2 + 1]
                cols = off2 + data.pair_j[k2][:, None] * q2 + jnp.arange(q2)[None, :]
                pa, pb = data.pp_a[k * nk + k2], data.pp_b[k * nk + k2]
                vals = jnp.einsum("nca,ncb->nab", vs[k][pa], vs[k2][pb])
                s = s.at[rows[pa][:, :, None], cols[pb][:, None, :]].add(-vals)
    r2 = _lam_t_dense(data.r2, ts, st)
    for k in range(nk):
        qk, offk = st.qs[k + 1], st.offsets[k + 1]
        rows = offk + data.pair_j[k][:, None] * qk + jnp.arange(qk)[None, :]
        contrib = jnp.einsum("nck,ncp->nkp", vs[k], c1[data.pair_i[k]])  # L₂₁ c₁ per pair
        r2 = r2.at[rows].add(-contrib)
    return CrossedFactor(chol1, tuple(vs), s, c1, r2)


@jax.custom_vjp
def dense_logdet_quad(s: Array, r: Array) -> tuple[Array, Array]:
    """``(log|S|, Rᵀ S⁻¹ R)`` for symmetric positive definite ``S (m, m)`` by one dense Cholesky.

    Only the lower triangle of ``s`` is read (LAPACK's ``potrf``), so the function of
    ``s`` is ``f(tril(s) + tril(s, -1)ᵀ)`` and its cotangent is ``tril(Ḡ + Ḡᵀ) − diag(Ḡ)``
    with the symmetric-matrix gradient ``Ḡ = ḡ S⁻¹ − Y Q̄ Yᵀ`` (``Y = S⁻¹R``); ``R̄ = Y (Q̄ + Q̄ᵀ)``.
    The reverse rule costs one ``cho_solve`` with the identity instead of
    differentiating the Cholesky factorisation itself.  Under ``vmap`` (many responses) no
    batched LAPACK call is made on CPU (:func:`mixedjax.linalg.unbatched_lapack`).  Undifferentiated, the
    lower triangle goes to the factorisation as it is (the symmetrised copy only matters to derivatives).
    """
    chol, c, _ = _chol_solves(s, r)
    return logdet_from_cholesky(chol), c.T @ c


def _chol_solves_batched(s: Array, r: Array) -> tuple[Array, Array, Array]:
    chol = cholesky_loop(s)
    c = solve_lower_loop(chol, r)
    return chol, c, solve_upper_t_loop(chol, c)


@unbatched_lapack(small=_chol_solves_batched)
def _chol_solves(s: Array, r: Array) -> tuple[Array, Array, Array]:
    """``L = chol(S)``, ``c = L⁻¹R``, ``y = L⁻ᵀc``."""
    chol = jax.lax.linalg.cholesky(s, symmetrize_input=False)
    c = jsl.solve_triangular(chol, r, lower=True)
    return chol, c, jsl.solve_triangular(chol, c, lower=True, trans="T")


def _inverse_batched(chol: Array) -> Array:
    eye = jnp.broadcast_to(jnp.eye(chol.shape[-1], dtype=chol.dtype), chol.shape)
    return solve_upper_t_loop(chol, solve_lower_loop(chol, eye))


@unbatched_lapack(small=_inverse_batched)
def _inverse_from_cholesky(chol: Array) -> Array:
    return jsl.cho_solve((chol, True), jnp.eye(chol.shape[-1], dtype=chol.dtype))


def _dense_fwd(s: Array, r: Array):
    # the factorisation reads the lower triangle; symmetrising it first keeps the residuals' own derivative
    # (reverse over reverse, for observed information) that of the function actually computed
    s = jnp.tril(s) + jnp.tril(s, -1).T
    chol, c, y = _chol_solves(s, r)
    return (logdet_from_cholesky(chol), c.T @ c), (chol, y)


def _dense_bwd(res, g):
    chol, y = res
    g_logdet, g_quad = g
    sinv = _inverse_from_cholesky(chol)
    gs = g_logdet * sinv - y @ g_quad @ y.T
    return jnp.tril(gs + gs.T) - jnp.diag(diagonal(gs)), y @ (g_quad + g_quad.T)


dense_logdet_quad.defvjp(_dense_fwd, _dense_bwd)


def normal_equations(f: CrossedFactor, data: CrossedData) -> Normal:
    p = data.xtx.shape[0]
    c1 = f.c1.reshape(-1, p + 1)
    quad = c1.T @ c1
    logdet = jnp.sum(logdet_from_cholesky(f.chol1))
    if f.schur.shape[0]:
        logdet2, quad2 = dense_logdet_quad(f.schur, f.r2)
        logdet, quad = logdet + logdet2, quad + quad2
    a = data.xtx - quad[:p, :p]
    b = data.xty - quad[:p, p]
    yy = data.yty - quad[p, p]
    return Normal(a, b, yy, logdet - data.sum_logw)


def profile_crossed(theta: Array, data: CrossedData, st: CrossedStructure, reml: bool | Array):
    """Profiled deviance and β̂, σ̂² at θ (:func:`mixedjax.likelihood.profile_normal`)."""
    f = factor(theta, data, st)
    return profile_normal(normal_equations(f, data), data.nobs, reml), f


def profiled(theta: Array, data: CrossedData, st: CrossedStructure, reml: bool | Array) -> Profiled:
    """The profiled fit at θ (deviance, β̂, σ̂²): the one program compiled for a crossed fit."""
    if data.nz_flat.shape[0]:
        return profile_normal(_scalar_normal_equations(theta, data, st), data.nobs, reml)
    return profile_crossed(theta, data, st, reml)[0]


def deviance_crossed(theta: Array, data: CrossedData, st: CrossedStructure, reml: bool | Array) -> Array:
    """−2ℓ (ML) or the REML criterion at θ; pure and differentiable (the optimiser's objective)."""
    return profiled(theta, data, st, reml).deviance


def normal_ts(ts: list[Array], data: CrossedData, st: CrossedStructure) -> Normal:
    """Summed GLS pieces (:class:`mixedjax.likelihood.Normal`) at the term factors ``ts``."""
    if data.nz_flat.shape[0]:
        return _scalar_normal_equations(jnp.stack([t[0, 0] for t in ts]), data, st)
    return normal_equations(factor_ts(ts, data, st), data)


def conditional(ts: list[Array], data: CrossedData, st: CrossedStructure, beta: Array,
                pp: tuple) -> tuple[list[Array], list[Array]]:
    """Conditional modes ``b_k (l_k, q_k)`` and relative conditional covariances ``(l_k, q_k, q_k)`` of every term.

    ``u = L⁻ᵀ (c_y − c_X β)``, ``b_k = u_k T_kᵀ``.  The conditional covariance of ``u`` is
    ``σ² M⁻¹``; only its diagonal blocks are formed, from the blocked factor as lme4 does
    (never a dense inverse of the whole random-effects block): for the dense terms the
    blocks of ``S⁻¹``; for the first term, per level ``i``,
    ``M⁻¹_{ii} = L₁₁ᵢ⁻ᵀ (I + V_i S⁻¹ V_iᵀ) L₁₁ᵢ⁻¹`` with ``V_i = L₁₁ᵢ⁻¹ A₁₂[i, :]``, summed over
    the pairs of pairs that share level ``i`` (``pp``: per ordered term pair ``(k, k')``, the
    index pairs from :func:`mixedjax.crossed_data.pairs_of_pairs`).  Multiply the covariances
    by σ².
    """
    f = factor_ts(ts, data, st)
    p = data.xtx.shape[0]
    q1, l1 = st.qs[0], st.levels[0]
    dtype = f.c1.dtype
    e1 = f.c1[..., p] - f.c1[..., :p] @ beta  # (l₁, q₁)
    inner = jnp.broadcast_to(jnp.eye(q1, dtype=dtype), (l1, q1, q1))
    modes, covs = [], []
    nk = len(st.qs) - 1
    if nk:
        chol2 = jax.lax.linalg.cholesky(f.schur, symmetrize_input=False)
        c2 = jsl.solve_triangular(chol2, f.r2, lower=True)
        e2 = c2[:, p] - c2[:, :p] @ beta
        u2 = jsl.solve_triangular(chol2, e2, lower=True, trans="T")
        sinv = jsl.cho_solve((chol2, True), jnp.eye(st.m, dtype=dtype))
        for k in range(nk):
            qk, offk, lk = st.qs[k + 1], st.offsets[k + 1], st.levels[k + 1]
            uk = u2[offk : offk + qk * lk].reshape(-1, qk)
            # L₂₁ᵀ u₂ for each first-factor level
            e1 = e1.at[data.pair_i[k]].add(-jnp.einsum("nck,nk->nc", f.v[k], uk[data.pair_j[k]]))
            modes.append(uk @ ts[k + 1].T)
            idx = offk + np.arange(lk)[:, None] * qk + np.arange(qk)[None, :]
            blk = sinv[idx[:, :, None], idx[:, None, :]]
            covs.append(jnp.einsum("ab,lbc,dc->lad", ts[k + 1], blk, ts[k + 1]))
        for k in range(nk):
            qk, offk = st.qs[k + 1], st.offsets[k + 1]
            for k2 in range(nk):
                q2, off2 = st.qs[k2 + 1], st.offsets[k2 + 1]
                pa, pb = pp[k * nk + k2]
                rows = offk + data.pair_j[k][pa][:, None] * qk + jnp.arange(qk)[None, :]
                cols = off2 + data.pair_j[k2][pb][:, None] * q2 + jnp.arange(q2)[None, :]
                w = sinv[rows[:, :, None], cols[:, None, :]]
                vals = jnp.einsum("nck,nkl,ndl->ncd", f.v[k][pa], w, f.v[k2][pb])
                inner = inner.at[data.pair_i[k][pa]].add(vals)
    u1 = solve_upper_t(f.chol1, e1)
    linv = solve_lower(f.chol1, jnp.broadcast_to(jnp.eye(q1, dtype=dtype), (l1, q1, q1)))
    m11 = jnp.einsum("lba,lbc,lcd->lad", linv, inner, linv)
    cov1 = jnp.einsum("ab,lbc,dc->lad", ts[0], m11, ts[0])
    return [u1 @ ts[0].T] + modes, [cov1] + covs


def row_effects(modes: list[Array], codes: tuple, zs: tuple) -> Array:
    """``Σ_k z_k · b_k[level of the row]`` per row (the random part of the linear predictor)."""
    out = 0.0
    for b, c, z in zip(modes, codes, zs, strict=True):
        out = out + jnp.sum(z * b[c], axis=-1)
    return out
