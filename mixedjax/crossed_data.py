"""Crossed random effects, the data layer: host-side precomputation for :mod:`mixedjax.crossed_likelihood`.

The pieces of lme4's penalised least squares that depend only on the data (per-level
cross-products of the first term, the dense block of the others, the index pairs of the
sparse Schur complement), formed once with numpy/scipy; and the data-only starting values
(MIVQUE(0)) and θ scales of the crossed fit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from jax import Array

from .terms import TermSpec, n_theta


class CrossedStructure(NamedTuple):
    """Static description: ``qs`` columns and ``levels`` per term (first term: most levels)."""

    qs: tuple[int, ...]
    levels: tuple[int, ...]

    @property
    def n_theta(self) -> int:
        return n_theta(self.terms)

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

    @property
    def terms(self) -> tuple[TermSpec, ...]:
        """The θ layout (:mod:`mixedjax.terms`): one full lower-triangular factor per term."""
        return tuple(TermSpec(q) for q in self.qs)


class CrossedData(NamedTuple):
    """Data-only pieces of the crossed likelihood, formed once on the host (all whitened by ``sqrt(w)``).

    ``d1 (l₁, q₁, q₁)`` and ``r1 (l₁, q₁, p+1)``: per level of the first factor,
    ``Σ z₁z₁ᵀ`` and ``Σ z₁ [x y]ᵀ``; ``g22 (m, m)`` and ``r2 (m, p+1)``: ``Z₂ᵀZ₂`` and
    ``Z₂ᵀ[X y]`` of the other terms (``g22`` is ``(0, 0)`` when every term is scalar: only
    ``g22_nz`` below is read); per other term k, ``pair_i[k], pair_j[k]`` the
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


def pairs_of_pairs(ia: np.ndarray, ib: np.ndarray, n_levels: int) -> tuple[np.ndarray, np.ndarray]:
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


def _chunks(n: int, size: int = 1 << 16) -> list[tuple[int, int]]:
    """``[lo, hi)`` slices of ``range(n)``: element-wise work in slices reuses one small temporary."""
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _scalar_schur_pattern(b: sp.csr_matrix, g22: sp.spmatrix,
                          on_sizes: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, ...]:
    """Pairs of pairs and non-zeros of the lower triangle of ``S`` for scalar terms (:class:`CrossedData`).

    ``b = Z₁ᵀZ₂`` (rows: first-factor levels), ``g22 = Z₂ᵀZ₂`` (sparse).  Row ``i`` with
    sorted columns ``c₀ < c₁ < …`` contributes every ``(c_p, c_q)``, ``q ≤ p``: enumerated
    with ``repeat`` arithmetic, no sort (the non-zeros are found by marking a dense
    ``m x m`` mask).  The pair arrays (millions of entries for InstEval) are formed in
    place where they can be: fresh memory costs page faults, which were most of this
    function's time in a new process.  ``on_sizes(pairs, non-zeros)`` is called as soon as the two sizes
    are known, before the values are formed.
    """
    m = g22.shape[0]
    b.sort_indices()
    start = b.indptr[:-1].astype(np.int32)
    row_of = np.repeat(np.arange(b.shape[0], dtype=np.int32), np.diff(b.indptr))  # level of each stored entry
    npair = np.arange(1, b.nnz + 1, dtype=np.int32) - start[row_of]  # entry p pairs with the p+1 entries q ≤ p
    ea = np.repeat(np.arange(b.nnz, dtype=np.int32), npair)
    eb = np.repeat((start[row_of] - (np.cumsum(npair) - npair)).astype(np.int32), npair)
    ind = b.indices.astype(np.int32)
    flat = np.take(ind, ea)
    flat *= np.int32(m)
    for lo, hi in _chunks(len(ea)):
        eb[lo:hi] += np.arange(lo, hi, dtype=np.int32)
        flat[lo:hi] += np.take(ind, eb[lo:hi], mode="clip")
    mask = np.zeros(m * m, bool)
    mask[flat] = True
    mask[:: m + 1] = True
    nz = np.flatnonzero(mask).astype(np.int32)
    if on_sizes is not None:
        on_sizes(len(ea), len(nz))
    rank = np.cumsum(mask, dtype=np.int32)
    rank -= 1
    seg = np.take(rank, flat, out=flat, mode="clip")  # unbuffered: each index is read before its slot is written
    coef = np.take(b.data, ea, mode="clip")
    for lo, hi in _chunks(len(ea)):
        coef[lo:hi] *= np.take(b.data, eb[lo:hi], mode="clip")
    level = np.take(row_of, ea, out=ea, mode="clip")
    rows, cols = np.divmod(nz, np.int32(m))
    g = g22.tocoo()
    keys = g.row.astype(np.int64) * m + g.col
    order = np.argsort(keys)
    keys, vals = keys[order], g.data[order]
    pos = np.minimum(np.searchsorted(keys, nz), max(len(keys) - 1, 0))
    g22_nz = np.where(keys[pos] == nz, vals[pos], 0.0) if len(keys) else np.zeros(nz.shape)
    return level, coef, seg, nz, rows, cols, g22_nz


def array_spec(a: Any) -> jax.ShapeDtypeStruct:
    """The shape and dtype ``jax.device_put(a)`` will have (a numpy array or scalar): the stand-in for an array
    not formed yet when a program is compiled ahead (``crossed_data(on_shapes=...)``).

    Examples
    --------
    >>> s = array_spec(np.zeros((2, 3), np.int32))
    >>> s.shape, str(s.dtype)
    ((2, 3), 'int32')
    """
    a = np.asarray(a)
    return jax.ShapeDtypeStruct(a.shape, jax.dtypes.canonicalize_dtype(a.dtype))


def crossed_data(y: np.ndarray, x: np.ndarray, terms: list, w: np.ndarray | None,
                 on_shapes: Callable[[CrossedData, CrossedStructure], None] | None = None
                 ) -> tuple[CrossedData, CrossedStructure]:
    """Host-side precomputation for :func:`profile_crossed` (terms ordered by levels, largest first).

    ``on_shapes``: called with a :class:`CrossedData` of :class:`jax.ShapeDtypeStruct`, and the structure,
    as soon as every shape is known (every term scalar: before the values of the pairs of pairs are
    formed, most of the time here), so that the program can compile meanwhile.
    """
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
    scalar_terms = all(q == 1 for q in st.qs) and len(terms) > 1  # S from one segment sum: no dense G₂₂
    if len(terms) > 1:
        z2 = sp.hstack(zs[1:]).tocsr()
        g22_sparse = (z2.T @ z2).tocsr()
        g22 = np.zeros((0, 0)) if scalar_terms else g22_sparse.toarray()
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

    def sizes_known(npp: int, nnz: int) -> None:
        f64, i32 = jax.dtypes.canonicalize_dtype(np.float64), np.dtype(np.int32)
        sizes = dict(zip(_SCALAR_FIELDS, [(npp, i32), (npp, f64), (npp, i32), (nnz, i32), (nnz, i32), (nnz, i32),
                                          (nnz, f64)], strict=True))
        on_shapes(CrossedData(
            d1=array_spec(d1), r1=array_spec(r1), g22=array_spec(g22), r2=array_spec(r2),
            pair_i=tuple(map(array_spec, pair_i)), pair_j=tuple(map(array_spec, pair_j)),
            pair_b=tuple(map(array_spec, pair_b)), pp_a=(), pp_b=(),
            **{k: jax.ShapeDtypeStruct((n,), d) for k, (n, d) in sizes.items()},
            xtx=jax.ShapeDtypeStruct((p, p), f64), xty=jax.ShapeDtypeStruct((p,), f64),
            yty=jax.ShapeDtypeStruct((), f64), nobs=jax.ShapeDtypeStruct((), f64),
            sum_logw=jax.ShapeDtypeStruct((), f64)), st)

    if scalar_terms:
        scalar = _scalar_schur_pattern((z1.T @ z2).tocsr(), g22_sparse, None if on_shapes is None else sizes_known)
    else:
        for k in range(nk):
            for k2 in range(nk):
                a, b = pairs_of_pairs(pair_i[k], pair_i[k2], l1)
                pp_a.append(a)
                pp_b.append(b)
    # jax.device_put, not jnp.asarray: on jax 0.10 the latter compiles a program for each new shape (~20 ms each)
    data = jax.device_put(CrossedData(
        d1=d1, r1=r1, g22=g22, r2=r2, pair_i=tuple(pair_i), pair_j=tuple(pair_j), pair_b=tuple(pair_b),
        pp_a=tuple(pp_a), pp_b=tuple(pp_b), **dict(zip(_SCALAR_FIELDS, scalar, strict=True)),
        xtx=xy[:, :p].T @ xy[:, :p], xty=xy[:, :p].T @ xy[:, p], yty=np.float64(xy[:, p] @ xy[:, p]),
        nobs=np.float64(n), sum_logw=np.float64(np.log(w).sum())))
    return data, st


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



def all_pairs_of_pairs(data: CrossedData, st: CrossedStructure) -> tuple:
    """Per ordered pair of dense terms ``(k, k')``, the index pairs of their (level, level) pairs that share a
    first-factor level (:func:`pairs_of_pairs`); those of the data when already formed (vector-valued terms)."""
    nk = len(st.qs) - 1
    if len(data.pp_a) == nk * nk:
        return tuple(zip(data.pp_a, data.pp_b, strict=True))
    pi = [np.asarray(v) for v in data.pair_i]
    out = []
    for k in range(nk):
        for k2 in range(nk):
            a, b = pairs_of_pairs(pi[k], pi[k2], st.levels[0])
            out.append((jnp.asarray(a), jnp.asarray(b)))
    return tuple(out)
