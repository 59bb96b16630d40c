"""Crossed random effects: lme4's penalised least squares with a sparse blocked Cholesky.

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

import functools
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import pandas as pd
import scipy.sparse as sp
from jax import Array
from threadpoolctl import threadpool_limits

from .likelihood import Normal, Profiled, profile_normal
from .linalg import cholesky, logdet_from_cholesky, solve_lower, solve_upper_t
from .optimize import Result, Solution


class CrossedStructure(NamedTuple):
    """Static description: ``qs`` columns and ``levels`` per term (first term: most levels)."""

    qs: tuple[int, ...]
    levels: tuple[int, ...]

    @property
    def n_theta(self) -> int:
        return sum(q * (q + 1) // 2 for q in self.qs)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each term k ≥ 2 in the dense block (index 0 unused)."""
        out, off = [0], 0
        for q, lv in zip(self.qs[1:], self.levels[1:], strict=True):
            out.append(off)
            off += q * lv
        return tuple(out)

    @property
    def m(self) -> int:
        return sum(q * lv for q, lv in zip(self.qs[1:], self.levels[1:], strict=True))

    def theta_slices(self) -> list[slice]:
        out, off = [], 0
        for q in self.qs:
            n = q * (q + 1) // 2
            out.append(slice(off, off + n))
            off += n
        return out

    def theta_start(self) -> np.ndarray:
        """lme4's start: every ``T_k`` the identity."""
        parts = []
        for q in self.qs:
            r, c = np.tril_indices(q)
            parts.append((r == c).astype(float))
        return np.concatenate(parts)

    def diagonal_theta(self) -> np.ndarray:
        parts = []
        for q in self.qs:
            r, c = np.tril_indices(q)
            parts.append(r == c)
        return np.concatenate(parts)


class CrossedData(NamedTuple):
    """Data-only pieces of the crossed likelihood, formed once on the host (all whitened by ``sqrt(w)``).

    ``d1 (l₁, q₁, q₁)`` and ``r1 (l₁, q₁, p+1)``: per level of the first factor,
    ``Σ z₁z₁ᵀ`` and ``Σ z₁ [x y]ᵀ``; ``g22 (m, m)`` and ``r2 (m, p+1)``: ``Z₂ᵀZ₂`` and
    ``Z₂ᵀ[X y]`` of the other terms; per other term k, ``pair_i[k], pair_j[k]`` the
    (first-factor level, term-k level) pairs that share rows and ``pair_b[k]
    (n_k, q_k, q₁)`` their ``Σ z_k z₁ᵀ``; per ordered term pair ``(k, k')``,
    ``pp_a, pp_b`` the index pairs of their pairs that share a first-factor level
    (vector-valued terms only; empty when every term is scalar).

    When every term is scalar (``B = Z₁ᵀZ₂``, ``l₁ x m``), the lower triangle of ``S``
    is ``δ_ab + λ_a λ_b (G₂₂,ab − Σ_i w_i B_ia B_ib)`` with ``w_i = θ₁² / (1 + θ₁² d_i)``:
    ``nz_flat`` (row-major flat index into ``m x m``), ``nz_row, nz_col`` are the
    positions of its non-zeros (every diagonal entry included) and ``g22_nz`` the
    values of ``G₂₂`` there; each pair of pairs (a first-factor level ``i`` with two
    of its columns ``a ≥ b``) contributes ``pp_c = B_ia B_ib`` with weight ``w[pp_i]``
    to non-zero ``pp_seg``.  These are empty for vector-valued terms.
    ``xtx, xty, yty, nobs, sum_logw`` as :class:`mixedjax.data.CrossProducts`.
    """

    d1: Array
    r1: Array
    g22: Array
    r2: Array
    pair_i: tuple
    pair_j: tuple
    pair_b: tuple
    pp_a: tuple
    pp_b: tuple
    pp_i: Array
    pp_c: Array
    pp_seg: Array
    nz_flat: Array
    nz_row: Array
    nz_col: Array
    g22_nz: Array
    xtx: Array
    xty: Array
    yty: Array
    nobs: Array
    sum_logw: Array


def _term_matrix(codes: np.ndarray, z: np.ndarray, n_levels: int) -> sp.csr_matrix:
    """Sparse ``(nobs, n_levels * q)`` model matrix of one term (columns level-major)."""
    n, q = z.shape
    rows = np.repeat(np.arange(n), q)
    cols = (codes[:, None] * q + np.arange(q)[None, :]).ravel()
    return sp.csr_matrix((z.ravel(), (rows, cols)), shape=(n, n_levels * q))


def _pairs_of_pairs(ia: np.ndarray, ib: np.ndarray, n_levels: int) -> tuple[np.ndarray, np.ndarray]:
    """All ``(a, b)`` with ``ia[a] == ib[b]`` (pairs sorted by level; cartesian product per level)."""
    oa, ob = np.argsort(ia, kind="stable"), np.argsort(ib, kind="stable")
    cb = np.bincount(ib, minlength=n_levels)
    sb = np.concatenate([[0], np.cumsum(cb)[:-1]])
    rep = cb[ia[oa]]
    a = np.repeat(oa, rep)
    starts = np.concatenate([[0], np.cumsum(rep)[:-1]])
    within = np.arange(rep.sum()) - np.repeat(starts, rep)
    b = ob[np.repeat(sb[ia[oa]], rep) + within]
    return a.astype(np.int32), b.astype(np.int32)


_SCALAR_FIELDS = ("pp_i", "pp_c", "pp_seg", "nz_flat", "nz_row", "nz_col", "g22_nz")


def _scalar_schur_pattern(b: sp.csr_matrix, g22: np.ndarray) -> tuple[np.ndarray, ...]:
    """Pairs of pairs and non-zeros of the lower triangle of ``S`` for scalar terms (:class:`CrossedData`).

    ``b = Z₁ᵀZ₂`` (rows: first-factor levels).  Row ``i`` with sorted columns
    ``c₀ < c₁ < …`` contributes every ``(c_p, c_q)``, ``q ≤ p``: enumerated with
    ``repeat`` arithmetic, no sort (the non-zeros are found by marking a dense
    ``m x m`` mask).
    """
    m = g22.shape[0]
    b.sort_indices()
    start = b.indptr[:-1].astype(np.int32)
    row_of = np.repeat(np.arange(b.shape[0], dtype=np.int32), np.diff(b.indptr))  # level of each stored entry
    npair = np.arange(1, b.nnz + 1, dtype=np.int32) - start[row_of]  # entry p pairs with the p+1 entries q ≤ p
    ea = np.repeat(np.arange(b.nnz, dtype=np.int32), npair)
    eb = np.arange(len(ea), dtype=np.int32) + np.repeat(start[row_of] - (np.cumsum(npair) - npair), npair)
    ind = b.indices.astype(np.int32)
    flat = ind[ea] * np.int32(m) + ind[eb]
    mask = np.zeros(m * m, bool)
    mask[flat] = True
    mask[np.arange(m) * (m + 1)] = True
    nz = np.flatnonzero(mask).astype(np.int32)
    seg = (np.cumsum(mask, dtype=np.int32) - 1)[flat]
    rows, cols = np.divmod(nz, np.int32(m))
    return row_of[ea], b.data[ea] * b.data[eb], seg, nz, rows, cols, g22.ravel()[nz]


def crossed_data(y: np.ndarray, x: np.ndarray, terms: list,
                 w: np.ndarray | None) -> tuple[CrossedData, CrossedStructure]:
    """Host-side precomputation for :func:`profile_crossed` (terms ordered by levels, largest first)."""
    n, p = x.shape
    w = np.ones(n) if w is None else np.asarray(w, float)
    sw = np.sqrt(w)
    xy = np.column_stack([x, y]) * sw[:, None]
    zs = [sp.diags(sw) @ _term_matrix(t.codes, t.z, t.n_levels) for t in terms]
    st = CrossedStructure(tuple(t.q for t in terms), tuple(t.n_levels for t in terms))
    q1, l1 = st.qs[0], st.levels[0]
    z1 = zs[0]
    t0 = terms[0]
    z1w = t0.z * sw[:, None]
    d1 = np.zeros((l1, q1, q1))
    np.add.at(d1, t0.codes, np.einsum("ni,nj->nij", z1w, z1w))
    r1 = np.asarray(z1.T @ xy).reshape(l1, q1, p + 1)
    if len(terms) > 1:
        z2 = sp.hstack(zs[1:]).tocsr()
        g22 = (z2.T @ z2).toarray()
        r2 = np.asarray(z2.T @ xy)
    else:
        g22, r2 = np.zeros((0, 0)), np.zeros((0, p + 1))
    pair_i, pair_j, pair_b = [], [], []
    for k in range(1, len(terms)):
        t = terms[k]
        b = (zs[k].T @ z1).tocoo()  # (l_k q_k, l₁ q₁)
        jk, a = np.divmod(b.row, t.q)
        i1, c = np.divmod(b.col, q1)
        key = jk.astype(np.int64) * l1 + i1
        uniq, inv = np.unique(key, return_inverse=True)
        blocks = np.zeros((len(uniq), t.q, q1))
        np.add.at(blocks, (inv, a, c), b.data)
        pair_j.append((uniq // l1).astype(np.int32))
        pair_i.append((uniq % l1).astype(np.int32))
        pair_b.append(blocks)
    nk = len(terms) - 1
    pp_a, pp_b = [], []
    scalar = (np.zeros(0, np.int32), np.zeros(0), np.zeros(0, np.int32), np.zeros(0, np.int32),
              np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0))
    if all(q == 1 for q in st.qs) and nk:
        scalar = _scalar_schur_pattern((z1.T @ z2).tocsr(), g22)
    else:
        for k in range(nk):
            for k2 in range(nk):
                a, b = _pairs_of_pairs(pair_i[k], pair_i[k2], l1)
                pp_a.append(a)
                pp_b.append(b)
    data = CrossedData(
        d1=jnp.asarray(d1), r1=jnp.asarray(r1), g22=jnp.asarray(g22), r2=jnp.asarray(r2),
        pair_i=tuple(jnp.asarray(v) for v in pair_i), pair_j=tuple(jnp.asarray(v) for v in pair_j),
        pair_b=tuple(jnp.asarray(v) for v in pair_b), pp_a=tuple(jnp.asarray(v) for v in pp_a),
        pp_b=tuple(jnp.asarray(v) for v in pp_b), **dict(zip(_SCALAR_FIELDS, map(jnp.asarray, scalar), strict=True)),
        xtx=jnp.asarray(xy[:, :p].T @ xy[:, :p]), xty=jnp.asarray(xy[:, :p].T @ xy[:, p]),
        yty=jnp.asarray(xy[:, p] @ xy[:, p]), nobs=jnp.asarray(np.float64(n)), sum_logw=jnp.asarray(np.log(w).sum()),
    )
    return data, st


def term_factors(theta: Array, st: CrossedStructure) -> list[Array]:
    """Lower-triangular ``T_k (q_k, q_k)`` of each term from θ (row-major lower triangles)."""
    out = []
    for q, sl in zip(st.qs, st.theta_slices(), strict=True):
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


def _scalar_lam(theta: Array, st: CrossedStructure) -> Array:
    """``λ (m,)``: the θ of each dense-block column (every term scalar)."""
    return jnp.repeat(theta[1:], np.array(st.levels[1:]), total_repeat_length=st.m)


def _scalar_schur(theta: Array, data: CrossedData, st: CrossedStructure) -> Array:
    """``S`` (lower triangle; upper zero) when every term is scalar: one segment sum over the pairs of pairs.

    ``S_ab = δ_ab + λ_a λ_b (G₂₂,ab − Σ_i w_i B_ia B_ib)``, ``w_i = θ₁² / (1 + θ₁² d_i)``
    (:class:`CrossedData`), evaluated at the non-zeros only.
    """
    m, t1 = st.m, theta[0]
    lam = _scalar_lam(theta, st)
    w1 = t1**2 / (1.0 + t1**2 * data.d1[:, 0, 0])
    t = jax.ops.segment_sum(w1[data.pp_i] * data.pp_c, data.pp_seg, num_segments=data.nz_flat.shape[0])
    vals = lam[data.nz_row] * lam[data.nz_col] * (data.g22_nz - t) + (data.nz_row == data.nz_col)
    return jnp.zeros(m * m, theta.dtype).at[data.nz_flat].set(vals, indices_are_sorted=True,
                                                             unique_indices=True).reshape(m, m)


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
    sums = [jax.ops.segment_sum(data.pair_b[k][:, 0, :] * wr1[data.pair_i[k]], data.pair_j[k],
                                num_segments=st.levels[k + 1], indices_are_sorted=True) for k in range(len(st.qs) - 1)]
    r2 = _scalar_lam(theta, st)[:, None] * (data.r2 - jnp.concatenate(sums))
    logdet2, quad2 = dense_logdet_quad(_scalar_schur(theta, data, st), r2)
    quad = quad + quad2
    return Normal(data.xtx - quad[:p, :p], data.xty - quad[:p, p], data.yty - quad[p, p],
                  jnp.sum(jnp.log(a1)) + logdet2 - data.sum_logw)


def factor(theta: Array, data: CrossedData, st: CrossedStructure) -> CrossedFactor:
    """First block of the blocked Cholesky of ``Λᵀ Zᵀ Z Λ + I``, the Schur complement, ``c₁`` and ``r₂``."""
    ts = term_factors(theta, st)
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
        s = _scalar_schur(theta, data, st)
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
    differentiating the Cholesky factorisation itself.
    """
    return _dense_fwd(s, r)[0]


def _dense_fwd(s: Array, r: Array):
    chol = jax.lax.linalg.cholesky(s, symmetrize_input=False)
    c = jsl.solve_triangular(chol, r, lower=True)
    y = jsl.solve_triangular(chol, c, lower=True, trans="T")
    return (2.0 * jnp.sum(jnp.log(jnp.diagonal(chol))), c.T @ c), (chol, y)


def _dense_bwd(res, g):
    chol, y = res
    g_logdet, g_quad = g
    sinv = jsl.cho_solve((chol, True), jnp.eye(chol.shape[0], dtype=chol.dtype))
    gs = g_logdet * sinv - y @ g_quad @ y.T
    return jnp.tril(gs + gs.T) - jnp.diag(jnp.diagonal(gs)), y @ (g_quad + g_quad.T)


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


def conditional_modes(theta: Array, data: CrossedData, st: CrossedStructure, reml: bool | Array) -> list[Array]:
    """BLUPs ``b_k (l_k, q_k)`` of every term: ``u = L⁻ᵀ (c_y − c_X β̂)``, ``b = Λ u``."""
    pr, f = profile_crossed(theta, data, st, reml)
    ts = term_factors(theta, st)
    p = data.xtx.shape[0]
    e1 = f.c1[..., p] - f.c1[..., :p] @ pr.beta  # (l₁, q₁)
    out = []
    if len(st.qs) > 1:
        chol2 = jax.lax.linalg.cholesky(f.schur, symmetrize_input=False)
        c2 = jsl.solve_triangular(chol2, f.r2, lower=True)
        e2 = c2[:, p] - c2[:, :p] @ pr.beta
        u2 = jsl.solve_triangular(chol2, e2, lower=True, trans="T")
        for k in range(len(st.qs) - 1):
            qk, offk = st.qs[k + 1], st.offsets[k + 1]
            uk = u2[offk : offk + qk * st.levels[k + 1]].reshape(-1, qk)
            # L₂₁ᵀ u₂ for each first-factor level
            e1 = e1.at[data.pair_i[k]].add(-jnp.einsum("nck,nk->nc", f.v[k], uk[data.pair_j[k]]))
            out.append(uk @ ts[k + 1].T)
    u1 = solve_upper_t(f.chol1, e1)
    return [u1 @ ts[0].T] + out


def loglike_natural(vparams: Array, beta: Array, data: CrossedData, st: CrossedStructure,
                    reml: bool | Array) -> Array:
    """Log-likelihood at natural-scale ``vparams`` (each term's covariance lower triangle, row-major, then
    the residual variance) and given β (not profiled): the function behind the standard errors of the variances.
    """
    scale = vparams[-1]
    thetas, off = [], 0
    for q in st.qs:
        n = q * (q + 1) // 2
        r, c = np.tril_indices(q)
        cov = jnp.zeros((q, q), vparams.dtype).at[r, c].set(vparams[off : off + n]).at[c, r].set(
            vparams[off : off + n]) / scale
        t = jnp.sqrt(cov) if q == 1 else cholesky(cov, semidefinite=True)
        thetas.append(t[r, c])
        off += n
    ne = normal_equations(factor(jnp.concatenate(thetas), data, st), data)
    p = ne.a.shape[0]
    r2 = ne.yy - 2.0 * jnp.dot(ne.b, beta) + beta @ ne.a @ beta
    is_reml = jnp.asarray(reml, dtype=r2.dtype)
    df = data.nobs - p * is_reml
    dev = ne.logdet_v + df * (jnp.log(2.0 * jnp.pi) + jnp.log(scale)) + r2 / scale
    return -0.5 * (dev + is_reml * logdet_from_cholesky(cholesky(ne.a)))


# reverse over reverse: the dense block's custom reverse rule has no forward-mode rule
_info_jit = jax.jit(jax.jacrev(jax.grad(loglike_natural)), static_argnames=("st",))
# XLA:CPU's newer fusion emitters spend about twice as long compiling this program's ~40 small
# loop fusions (InstEval: 0.63 s -> 0.37 s without them) for no measurable gain per evaluation;
# compilation is a third of a fit.  Older/newer jaxlibs without the option get the default.
_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


def _profiled_call(theta: Any, data: CrossedData, st: CrossedStructure, reml: Any) -> Profiled:
    """:func:`profiled`, jitted with :data:`_COMPILER_OPTIONS` where this jaxlib knows them."""
    global _profiled_jit
    try:
        return _profiled_jit(theta, data, st, reml)
    except jax.errors.JaxRuntimeError as err:
        if "No such compile option" not in str(err):
            raise
        _profiled_jit = jax.jit(profiled, static_argnames=("st",))
        return _profiled_jit(theta, data, st, reml)


_profiled_jit = jax.jit(profiled, static_argnames=("st",), compiler_options=_COMPILER_OPTIONS)
_modes_jit = jax.jit(conditional_modes, static_argnames=("st",))
deviance_crossed_jit = jax.jit(deviance_crossed, static_argnames=("st",))


def _trust_step(g: np.ndarray, h: np.ndarray, delta: float) -> np.ndarray:
    """Minimiser of ``gᵀs + ½ sᵀHs`` over ``‖s‖ ≤ δ`` (Moré–Sorensen by bisection on the shift μ).

    ``s(μ) = −(H + μI)⁻¹ g`` in the eigenbasis of ``H``; ``‖s(μ)‖`` decreases in ``μ``.  In the
    "hard case" (``g`` orthogonal to the lowest eigenvector) the step is completed to the
    boundary along that eigenvector.
    """
    lam, q = np.linalg.eigh(h)
    gq = q.T @ g
    lo = max(0.0, -lam[0])
    if lam[0] > 0:
        s = -q @ (gq / lam)
        if np.linalg.norm(s) <= delta:
            return s
    norm_at = lambda mu: np.linalg.norm(gq / (lam + mu))  # noqa: E731
    tiny = 1e-12 * max(1.0, np.abs(lam).max())
    if norm_at(lo + tiny) <= delta:  # hard case
        keep = lam + lo > tiny
        s = -q[:, keep] @ (gq[keep] / (lam[keep] + lo))
        return s + np.sqrt(max(delta**2 - s @ s, 0.0)) * q[:, 0]
    a, b = lo, lo + np.linalg.norm(g) / delta + np.abs(lam).max()
    for _ in range(100):
        mu = 0.5 * (a + b)
        a, b = (mu, b) if norm_at(mu) > delta else (a, mu)
    return -q @ (gq / (lam + b))


class _DFOResult(NamedTuple):
    x: np.ndarray
    value: float
    grad: np.ndarray
    value_start: float
    iterations: int
    evaluations: int
    converged: bool


def _minimize_dfo(fmap: Any, x0: np.ndarray, step0: float, ftol: float, maxfev: int,
                  fd_step: float = 1e-4) -> _DFOResult:
    """Derivative-free trust-region Newton: the Hessian of one quadratic interpolant, gradients by differences.

    ``fmap(points)`` returns ``f`` at a list of points (it may evaluate them concurrently:
    every batch below is independent).

    1. Central differences at ``x₀ ± h eᵢ`` (``h = step0``, one batch of ``2n``) give the
       gradient and the diagonal of the Hessian ``H`` at ``x₀``; the off-diagonal curvature
       is learnt by the updates below (a full quadratic stencil, ``(n+1)(n+2)/2`` points,
       measured no better on InstEval and costs ``n(n−1)/2`` more evaluations).
    2. Each iteration minimises ``gᵀs + ½ sᵀHs`` over ``‖s‖ ≤ Δ`` and evaluates, in one batch,
       ``f(x + s)`` and ``f(x + s + δeᵢ)``.  If ``f`` decreased, the step is taken and the
       gradient there comes from forward differences with the curvature removed,
       ``gᵢ = (f(x + s + δeᵢ) − f(x + s))/δ − ½ Hᵢᵢ δ`` (exact for a quadratic whatever the
       error of ``H``; ``δ = fd_step``); ``H`` then gets a symmetric rank-one update from the
       change of gradient along the step.  ``Δ`` grows or shrinks with the ratio of actual
       to predicted decrease.
    3. It stops when the model, with a difference gradient, predicts a decrease below ``ftol``.

    Near the minimum ``H`` is the Hessian up to the interpolation error and the updates,
    so each step gains a factor of the Hessian's relative error or better; ``n + 1``
    evaluations (one batch) an iteration.  ``grad`` is the last difference gradient.
    """
    n = x0.size
    eye = np.eye(n)
    f0 = float(fmap([x0])[0])  # alone first: it compiles the objective
    fp, fm = np.split(np.asarray(fmap(list(x0 + step0 * eye) + list(x0 - step0 * eye))), 2)
    nf, it, f_start = 2 * n + 1, 0, f0
    g, h = (fp - fm) / (2.0 * step0), np.diag((fp + fm - 2.0 * f0) / step0**2)
    x, f, exact, converged, delta = x0, f0, False, False, 1.0

    def with_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        """``f(x)`` and its difference gradient (one batch of ``n + 1`` evaluations)."""
        vals = np.asarray(fmap([x] + [x + fd_step * e for e in eye]))
        return float(vals[0]), (vals[1:] - vals[0]) / fd_step - 0.5 * np.diag(h) * fd_step

    while nf + n < maxfev:
        s = _trust_step(g, h, delta)
        pred = -(g @ s + 0.5 * s @ h @ s)
        if pred <= ftol:
            if exact:
                converged = True
                break
            f, g = with_grad(x)
            exact, nf = True, nf + n + 1
            continue
        fn, gn = with_grad(x + s)
        nf, it = nf + n + 1, it + 1
        ratio = (f - fn) / pred
        ns = np.linalg.norm(s)
        if fn < f:
            # symmetric rank-one update, skipped when ill-defined or when the step is so short that the
            # change of gradient is mostly the differences' own error (which would corrupt H)
            if exact and ns > 100.0 * fd_step:
                r = gn - g - h @ s
                if abs(r @ s) > 1e-8 * np.linalg.norm(r) * ns:
                    h = h + np.outer(r, r) / (r @ s)
            x, f, g, exact = x + s, fn, gn, True
        elif not exact:
            f, g = with_grad(x)
            exact, nf = True, nf + n + 1
        delta = 0.5 * ns if ratio < 0.1 else (delta if ratio < 0.7 else max(delta, 2.0 * ns))
        if delta < 1e-10:
            break
    return _DFOResult(x.copy(), f, g, f_start, it, nf, converged)


def fit_crossed(theta0: np.ndarray, data: CrossedData, st: CrossedStructure, reml: bool = True,
                scales: np.ndarray | None = None, maxiter: int = 1000, ftol: float = 1e-9) -> Solution:
    """Minimise the crossed profiled deviance over θ (:func:`_minimize_dfo`; derivative-free, as lme4).

    The host loop calls one small jitted function (:func:`profiled`, the deviance and
    the profiled β̂, σ̂²: the only program compiled for a fit), so compilation stays
    cheap and an evaluation is one segment sum and one dense Cholesky; no gradient is
    formed.  Diagonal entries of θ are searched as ``θ = c sinh φ``: linear below the
    scale ``c`` (``scales``: about ``1/√(rows per level)``, where the term's log-determinant
    turns from quadratic to logarithmic in θ) and logarithmic above, which makes the
    deviance close to quadratic in φ from the boundary to large variances.  The deviance
    is even in each diagonal entry, so φ is unconstrained (:func:`_normalize` flips signs
    afterwards).  ``maxiter`` caps the deviance evaluations; ``ftol`` is the predicted
    decrease of the deviance below which the search stops.
    """
    theta0 = np.asarray(theta0, float)
    diag = st.diagonal_theta()
    c = np.where(diag, np.ones_like(theta0) if scales is None else scales, 1.0)
    to_theta = lambda phi: np.where(diag, c * np.sinh(phi), phi)  # noqa: E731
    reml_arr = np.asarray(bool(reml))  # numpy arguments: no eager conversion to compile
    fun = lambda phi: float(_profiled_call(to_theta(phi), data, st, reml_arr).deviance)  # noqa: E731
    # independent evaluations run on threads: XLA releases the GIL and each Cholesky is single-threaded
    with ThreadPoolExecutor(max_workers=max(1, min(os.cpu_count() or 1, 2 * theta0.size))) as pool:
        r = _minimize_dfo(lambda pts: list(pool.map(fun, pts)), np.where(diag, np.arcsinh(theta0 / c), theta0),
                          0.1, ftol, int(maxiter))
    grad = r.grad / np.where(diag, c * np.cosh(r.x), 1.0)  # chain rule back to θ
    result = Result.CONVERGED if r.converged else Result.MAX_ITER
    return Solution(x=to_theta(r.x), value=r.value, grad=grad, x_start=theta0, value_start=r.value_start,
                    iterations=r.iterations, warm_iterations=0, polish_iterations=0, evaluations=r.evaluations,
                    grad_norm=float(np.abs(grad).max()), result=int(result))


def theta_scales(terms: list, w: np.ndarray | None) -> np.ndarray:
    """Per θ entry, ``√(levels / Σ w z²)`` of its column (diagonal entries; 1 elsewhere): see :func:`fit_crossed`."""
    out = []
    for t in terms:
        ssq = (t.z**2 * (1.0 if w is None else w[:, None])).sum(axis=0)
        r, c = np.tril_indices(t.q)
        out.append(np.where(r == c, np.sqrt(t.n_levels / np.maximum(ssq[r], 1e-300)), 1.0))
    return np.concatenate(out)


def mivque_start(y: np.ndarray, x: np.ndarray, terms: list, w: np.ndarray | None) -> np.ndarray | None:
    """Starting θ of scalar terms from MIVQUE(0) (Rao 1971): unbiased quadratic variance estimates.

    With every prior variance ratio 0 (``V = W⁻¹``, whitened to ``I``), ``Q = I − X(XᵀX)⁻¹Xᵀ``,
    ``V_k = Z_k Z_kᵀ`` (``V₀ = I``), the estimates solve ``Σ_l tr(Q V_k Q V_l) σ_l² = yᵀQ V_k Q y``:
    ``tr(Q V_k Q V_l) = ‖Z_kᵀ Q Z_l‖²_F`` from the sparse ``Z_kᵀZ_l`` and ``Z_kᵀ X̃`` (``X̃``
    orthonormal), a few sparse products.  ``θ_k = √(max(σ_k², 0) / σ₀²)``.  InstEval: within
    a few per cent of the REML estimate, so the search starts next to the optimum instead
    of lme4's ``θ = 1``.  ``None`` when some term is not scalar or ``σ₀² ≤ 0``.
    """
    if any(t.q != 1 for t in terms):
        return None
    n, p = x.shape
    sw = np.ones(n) if w is None else np.sqrt(w)
    q, _ = np.linalg.qr(x * sw[:, None])
    yw = y * sw
    res = yw - q @ (q.T @ yw)
    zs = [sp.csr_matrix((t.z[:, 0] * sw, (np.arange(n), t.codes)), shape=(n, t.n_levels)) for t in terms]
    zq = [np.asarray(z.T @ q) for z in zs]
    k = len(zs)
    a, b = np.zeros((k + 1, k + 1)), np.zeros(k + 1)
    a[0, 0], b[0] = n - p, res @ res
    for i in range(k):
        a[0, i + 1] = a[i + 1, 0] = zs[i].multiply(zs[i]).sum() - (zq[i] ** 2).sum()
        b[i + 1] = np.sum(np.asarray(zs[i].T @ res) ** 2)
        for j in range(i, k):
            g = zs[i].T @ zs[j]
            a[i + 1, j + 1] = a[j + 1, i + 1] = (g.multiply(g).sum() - 2.0 * np.sum(zq[i] * (g @ zq[j]))
                                                 + np.sum((zq[i].T @ zq[i]) * (zq[j].T @ zq[j])))
    sig = np.linalg.lstsq(a, b, rcond=None)[0]
    return np.sqrt(np.maximum(sig[1:], 0.0) / sig[0]) if sig[0] > 0 else None


def _single_threaded_lapack() -> threadpool_limits:
    """Run jaxlib's LAPACK calls (scipy's OpenBLAS) on one thread while XLA uses the cores.

    jaxlib calls LAPACK through scipy's bundled OpenBLAS, whose worker threads spin while
    waiting; next to XLA's own thread pool (and the fit's own evaluation threads) they
    oversubscribe the cores.  Measured on InstEval (2 cores): the former BFGS fit took 62 s
    with OpenBLAS's default threads, 11 s with one; the current fit with two BLAS threads
    was slower in the median and once took 14 s instead of 0.7 s.  threadpoolctl restores
    the previous setting when the block ends.
    """
    return threadpool_limits(limits=1, user_api="blas")


class CrossedLM:
    """A linear mixed model with crossed random-effects terms (built by :func:`mixedjax.lmer`).

    Parameters
    ----------
    endog : (nobs,) array
    exog : (nobs, p) array
    terms : list of :class:`mixedjax.lmer.RETerm`
    weights : (nobs,) array, optional
        Prior weights (row i has residual variance ``scale / w_i``).
    """

    def __init__(self, endog: np.ndarray, exog: np.ndarray, terms: list, weights: np.ndarray | None = None,
                 exog_names: list[str] | None = None, endog_name: str = "y") -> None:
        from . import formula as fml

        self.endog = np.asarray(endog, float)
        self.exog = np.asarray(exog, float)
        self.nobs, self.k_fe = self.exog.shape
        self.exog_names = exog_names or [f"x{i + 1}" for i in range(self.k_fe)]
        self.endog_names = endog_name
        aliased = fml.aliased_columns(self.exog, self.exog_names)
        if aliased:
            raise ValueError(f"the fixed-effects design is rank deficient: column(s) {aliased} are "
                             "linear combinations of the others (aliased); drop them or recode")
        if weights is not None and np.any(np.asarray(weights) <= 0):
            raise ValueError("weights must be positive")
        self.weights = None if weights is None else np.asarray(weights, float)
        self.lmer_terms = list(terms)
        self._data, self.structure = crossed_data(self.endog, self.exog, self.lmer_terms, self.weights)
        self.reml = True
        self.formula: str | None = None
        self.data: pd.DataFrame | None = None
        self.designs: dict | None = None
        self.residual = None

    def deviance(self, theta: Any, reml: bool | None = None) -> float:
        """Profiled deviance (−2ℓ, or the REML criterion) at θ."""
        reml = self.reml if reml is None else bool(reml)
        return float(deviance_crossed_jit(jnp.asarray(theta, float), self._data, self.structure, reml))

    def fit(self, reml: bool = True, start_params: Any = None, maxiter: int = 1000, ftol: float = 1e-9,
            gtol: float | None = None, em_iter: int = 0) -> CrossedResults:
        """Fit by REML (default) or ML: derivative-free trust-region Newton steps on θ (:func:`fit_crossed`).

        Starts from MIVQUE(0) (:func:`mivque_start`) when every term is scalar, else from
        lme4's ``θ = 1``.  ``maxiter`` caps the deviance evaluations, ``ftol`` is the
        predicted decrease of the deviance at which the search stops; ``gtol`` and
        ``em_iter`` belong to the gradient-based per-group fit and are ignored here.
        """
        self.reml = bool(reml)
        if start_params is None:
            theta0 = mivque_start(self.endog, self.exog, self.lmer_terms, self.weights)
            theta0 = self.structure.theta_start() if theta0 is None else theta0
        else:
            theta0 = np.asarray(getattr(start_params, "theta", start_params), float)
        with _single_threaded_lapack():
            sol = fit_crossed(theta0, self._data, self.structure, self.reml,
                              theta_scales(self.lmer_terms, self.weights), maxiter=int(maxiter), ftol=float(ftol))
            return CrossedResults(self, np.asarray(sol.x), sol, self.reml)


def _normalize(theta: np.ndarray, st: CrossedStructure) -> np.ndarray:
    """Flip column signs of each ``T_k`` so its diagonal is non-negative (``T Tᵀ`` unchanged)."""
    theta = np.array(theta, float)
    for q, sl in zip(st.qs, st.theta_slices(), strict=True):
        t = np.zeros((q, q))
        r, c = np.tril_indices(q)
        t[r, c] = theta[sl]
        t = t * np.where(np.diag(t) < 0, -1.0, 1.0)[None, :]
        theta[sl] = t[r, c]
    return theta


from .results import SINGULAR_TOL, ConvergenceWarning, LmerResults, OptimSummary, Summary  # noqa: E402


class CrossedResults(LmerResults):
    """Results of a crossed :func:`mixedjax.lmer` fit (an :class:`mixedjax.LmerResults`).

    ``cov_re`` is the covariance of the first term (the factor with most levels),
    ``vcomp`` the variances on the diagonal of every other term (``varcorr()``
    order); ``cov_terms`` and ``varcorr()`` give every term.  Standard errors of the
    variances (``bse_re``) come from the observed information of the (restricted)
    likelihood, as on the per-group path; conditional variances of the random
    effects are not computed for crossed models.
    """

    def __init__(self, model: CrossedLM, theta: np.ndarray, sol: Any, reml: bool) -> None:
        st = model.structure
        self.model = model
        self.reml = reml
        self.method = "REML" if reml else "ML"
        self.theta = _normalize(theta, st)
        self.residual_params = np.zeros(0)
        self.residual_structure: dict = {}
        pr = jax.device_get(_profiled_call(self.theta, model._data, st, np.asarray(bool(reml))))
        self._profiled = pr
        self.scale = float(pr.sigma2)
        self.llf = float(-0.5 * pr.deviance)
        self.nobs = model.nobs
        self.ngroups = {t.factor: t.n_levels for t in model.lmer_terms}
        self.k_fe = model.k_fe
        self.fe_params = pd.Series(np.asarray(pr.beta, float), index=model.exog_names)
        self._cov_fe = self.scale * np.linalg.inv(np.asarray(pr.normal.a, float))
        covs = []
        for q, sl in zip(st.qs, st.theta_slices(), strict=True):
            tk = np.zeros((q, q))
            tk[np.tril_indices(q)] = self.theta[sl]
            covs.append(self.scale * tk @ tk.T)
        self._covs = covs
        first = model.lmer_terms[0]
        self.cov_re = pd.DataFrame(covs[0], index=first.names, columns=first.names)
        self.vcomp = np.concatenate([np.diag(c) for c in covs[1:]]) if len(covs) > 1 else np.zeros(0)
        names, vals = list(self.fe_params.index), list(self.fe_params.to_numpy())
        for t, c in zip(model.lmer_terms, covs, strict=True):
            r, cc = np.tril_indices(t.q)
            for i, j in zip(r, cc, strict=True):
                names.append(f"{t.label} {t.names[i]} Var" if i == j else f"{t.label} {t.names[j]} x {t.names[i]} Cov")
                vals.append(c[i, j] / self.scale)
        self.params = pd.Series(vals, index=names)
        self.k_re = first.q
        self.k_re2 = first.q * (first.q + 1) // 2
        self.k_vc = len(covs) - 1
        self.df_modelwc = self.k_fe + st.n_theta + 1
        self.aic = -2.0 * self.llf + 2.0 * self.df_modelwc
        self.bic = -2.0 * self.llf + np.log(self.nobs) * self.df_modelwc
        result = Result(int(sol.result))
        self.optim = OptimSummary(
            theta_start=np.asarray(sol.x_start), theta=self.theta, deviance_start=float(sol.value_start),
            deviance=float(sol.value), iterations=int(sol.iterations), em_iterations=int(sol.warm_iterations),
            polish_iterations=int(sol.polish_iterations), evaluations=int(sol.evaluations),
            grad_norm=float(sol.grad_norm), converged=bool(result <= Result.NO_PROGRESS), result=result,
            message=("converged: predicted decrease of the deviance below ftol (derivative-free)"
                     if result == Result.CONVERGED else "stopped: evaluation limit reached or no decrease possible"))
        self.converged = self.optim.converged
        self.mle_retvals = {"converged": self.converged, "iterations": self.optim.iterations,
                            "message": self.optim.message, "grad_norm": self.optim.grad_norm}
        diag = st.diagonal_theta()
        self.singular = bool(np.any(np.abs(self.theta[diag]) < SINGULAR_TOL))
        if not np.isfinite(self.llf):
            raise FloatingPointError(f"the log-likelihood is not finite at the estimate ({self.optim.message})")
        if not self.converged:
            warnings.warn(f"the fit did not converge: {self.optim.message} (max |gradient| "
                          f"{self.optim.grad_norm:.2e} after {self.optim.iterations} iterations)",
                          ConvergenceWarning, stacklevel=3)
        if self.singular:
            warnings.warn("the fit is singular: the estimate is on the boundary of the parameter space "
                          "(a variance of 0 or a correlation of ±1)", ConvergenceWarning, stacklevel=3)

    def _term_covs(self) -> list[tuple[Any, np.ndarray]]:
        return list(zip(self.model.lmer_terms, self._covs, strict=True))

    def _term_blups(self) -> list[tuple[Any, pd.DataFrame]]:
        return [(t, pd.DataFrame(b, index=[str(v) for v in t.levels], columns=t.names))
                for t, b in zip(self.model.lmer_terms, self._modes, strict=True)]

    @functools.cached_property
    def _modes(self) -> list[np.ndarray]:
        m = self.model
        return [np.asarray(b) for b in jax.device_get(_modes_jit(jnp.asarray(self.theta), m._data, m.structure,
                                                                 self.reml))]

    @functools.cached_property
    def _cov_var_natural(self) -> np.ndarray:
        """Inverse observed information of the natural-scale variances (every term's covariance, then scale)."""
        m = self.model
        v = np.concatenate([c[np.tril_indices(c.shape[0])] for c in self._covs] + [[self.scale]])
        with _single_threaded_lapack():
            h = np.asarray(_info_jit(jnp.asarray(v), jnp.asarray(self.fe_params.to_numpy()), m._data, m.structure,
                                     self.reml))
        k = len(v) - 1
        if not np.all(np.isfinite(h)) or np.linalg.eigvalsh(-h).min() <= 0:
            return np.full((k, k), np.nan)
        return np.linalg.inv(-h)[:k, :k]

    @property
    def random_effects_cov(self) -> dict:
        raise NotImplementedError("conditional variances are not computed for crossed models")

    @functools.cached_property
    def fittedvalues(self) -> np.ndarray:
        """``X β̂ + Σ_k Z_k b̂_k`` per row."""
        m = self.model
        out = m.exog @ self.fe_params.to_numpy()
        for t, b in zip(m.lmer_terms, self._modes, strict=True):
            out = out + np.einsum("nq,nq->n", t.z, b[t.codes])
        return out

    def summary(self, alpha: float = 0.05) -> Summary:
        """Fixed effects (statsmodels' columns), then one block per random-effects term."""
        from scipy import stats

        m = self.model
        info = [
            ("Model:", "MixedLM (crossed)"), ("No. Observations:", str(self.nobs)),
            ("Groups:", ", ".join(f"{k} {v}" for k, v in self.ngroups.items())),
            ("Dependent Variable:", str(m.endog_names)), ("Method:", self.method),
            ("Scale:", f"{self.scale:.4f}"), ("Log-Likelihood:", f"{self.llf:.4f}"),
            ("Converged:", "Yes" if self.converged else "No"),
        ]
        z = stats.norm.ppf(1 - alpha / 2)
        fe, se = self.fe_params.to_numpy(), self.bse_fe.to_numpy()
        tab = pd.DataFrame({"Coef.": fe, "Std.Err.": se, "z": fe / se, "P>|z|": 2 * stats.norm.sf(np.abs(fe / se)),
                            f"[{alpha / 2:g}": fe - z * se, f"{1 - alpha / 2:g}]": fe + z * se},
                           index=self.fe_params.index)
        for col in tab.columns:
            tab[col] = [f"{v:.3f}" for v in tab[col]]
        notes = [self._terms_text()]
        if self.singular:
            notes.append("The fit is singular (boundary estimate); see result.optim.")
        if not self.converged:
            notes.append(f"Not converged: {self.optim.message}.")
        return Summary("Mixed Linear Model Regression Results", info, tab, "\n".join(notes))

    def __repr__(self) -> str:
        return f"<CrossedResults {self.method} llf={self.llf:.4f} converged={self.converged}>"
