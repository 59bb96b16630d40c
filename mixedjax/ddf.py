"""Small-sample denominator degrees of freedom for tests of fixed effects: Satterthwaite and Kenward–Roger.

Both are written once against the fitted-model interface (:class:`mixedjax.fit.FittedModel`
and its backend), so they work on every model: one grouping factor, nested factors,
crossed factors, weights; Satterthwaite also with structured residuals.

**Satterthwaite** (lmerTest's construction, Kuznetsova et al. 2017): with variance
parameters ``φ = (θ, ρ, σ)`` (lme4's θ, the residual-structure parameters, the residual
sd), ``Φ(φ) = σ² (X'V(θ, ρ)⁻¹X)⁻¹`` the covariance of β̂, ``A = 2 H⁺`` the asymptotic
covariance of φ̂ (``H`` the Hessian of the REML (or ML) deviance in φ with β profiled,
:func:`mixedjax.backends.deviance_vp`; ``H⁺`` lmerTest's pseudo-inverse over the
eigenvalues above 1e-8) and a contrast ``c``,

    df = 2 (cᵀΦc)² / (gᵀ A g),   g = ∂(cᵀΦ(φ)c)/∂φ,

where the Hessian and the Jacobian are exact (JAX reverse-over-reverse autodiff), not
finite differences as in lmerTest.  Multi-row contrasts use lmerTest's
eigen-decomposition rule (``get_Fstat_ddf``, :func:`_fstat_ddf`).

**Kenward–Roger** (Kenward & Roger 1997, as pbkrtest's ``vcovAdj`` and ``Lb_ddf``): the
covariance parameters ``γ`` are the natural, linear ones — each term's covariance
entries (lower triangle; the diagonal of an independent term) and the residual
variance.  On the rows whitened by the weights (``Z̃ = diag(√w) Z``, ``X̃ = diag(√w) X``)
``Σ = σ² (I + Z̃ΛΛᵀZ̃ᵀ)`` with ``Λ`` block-diagonal (each term's ``T_k`` repeated over its
levels), ``∂Σ/∂γ_r = Z̃ D_r Z̃ᵀ`` (``D_r`` the term's indicator blocks over its levels)
and ``∂Σ/∂σ² = I``.  By Woodbury, ``Σ⁻¹ = σ⁻² (I − Z̃Λ M⁻¹ ΛᵀZ̃ᵀ)``,
``M = I + ΛᵀZ̃ᵀZ̃Λ``, every product and trace pbkrtest needs,

    P_r = −X̃ᵀΣ⁻¹G_rΣ⁻¹X̃,   Q_rs = X̃ᵀΣ⁻¹G_rΣ⁻¹G_sΣ⁻¹X̃,   K_rs = tr(Σ⁻¹G_rΣ⁻¹G_s),

reduces to the ``Q × Q`` matrices ``Z̃ᵀΣ⁻¹Z̃`` and ``Z̃ᵀΣ⁻²Z̃`` (``Q = Σ_k l_k q_k``
random-effects columns), ``Q × p`` and ``n × p`` products, and
``tr(Σ⁻²) = σ⁻⁴ (n − Q + tr M⁻²)``: no ``n × n`` matrix is formed.  The ``Q × Q``
matrices are block-diagonal over the connected components of the random-effects
columns (columns that share a row or a level are connected): one block per group for
a single grouping factor (factored side by side, batched), usually one block for
crossed factors (one dense inverse of ``M``, ``O(Q³)``: InstEval's 4,128 columns take
seconds and about 1.4 GB).  A block above :data:`KR_MAX_BLOCK` columns raises
:class:`NotImplementedError`; the number of rows is not limited.  The adjusted
covariance ``Φ_A = Φ + 2 Φ U Φ`` and the df follow pbkrtest term by term.  With
structured residuals (VarIdent, AR(1)) Kenward–Roger is not implemented
(:class:`NotImplementedError`).

Prior weights enter ``Σ`` as ``σ² diag(1/w)`` (the residual's derivative is
``diag(1/w)``).  pbkrtest 0.5.2 builds ``Σ`` with ``σ² I`` whatever the weights while
taking ``Cov(β̂)`` from the weighted fit, so on weighted models its numbers differ from
these (sleepstudy, ``w = 1 + Days % 3``: pbkrtest df 22.7 / 20.3, here 17.0 / 17.0 as
without weights); unweighted, they agree.

Examples
--------
>>> import mixedjax
>>> d = mixedjax.datasets.load("penicillin")
>>> r = mixedjax.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", d)
>>> round(satterthwaite(r).ddf([1.0]), 3), round(kenward_roger(r).ddf([[1.0]]), 3)
(5.487, 5.487)
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from . import terms as tm
from .backends import SINGLE_FIT, cov_beta_vp, deviance_vp, jacobian_transform
from .export_cache import cached_jit
from .fit import FittedModel, with_rows

KR_MAX_BLOCK = 6000
"""Largest connected block of random-effects columns Kenward–Roger factors densely (about 0.3 GB a matrix)."""

SMALL_BLOCK = 64  # blocks up to this size are factored side by side (batched numpy), larger ones one by one
EIGEN_TOL = 1e-8  # lmerTest's as_lmerModLT(tol = 1e-8): Hessian eigenvalues at or below it are dropped


class FittedResults(Protocol):
    """What this module reads from a results object: the fitted model and Cov(β̂)."""

    fitted: FittedModel
    cov_fe: np.ndarray
    __dict__: dict


# ------------------------------------------------------------------------------------------ Satterthwaite
# Forward over reverse where the backend allows it, reverse over reverse on crossed models (their dense
# Cholesky has a custom VJP, no forward rule): backends.jacobian_transform.  Compiled at XLA optimisation
# level 0 like a single fit (sleepstudy random slope: ~4 s instead of ~19 s, same run time).
def _hessian_vp_fun(backend: Any, vp: Any, data: Any, reml: Any) -> Any:
    return jacobian_transform(backend)(jax.grad(deviance_vp, argnums=1), argnums=1)(backend, vp, data, reml)


def _jacobian_cov_vp_fun(backend: Any, vp: Any, data: Any) -> Any:
    return jacobian_transform(backend)(cov_beta_vp, argnums=1)(backend, vp, data)


_hessian_vp = cached_jit(_hessian_vp_fun, static_argnames=("backend",), compiler_options=SINGLE_FIT)
_hessian_vp.__doc__ = "Hessian of :func:`mixedjax.backends.deviance_vp` in ``vp = concat(θ, ρ, σ)``."
_jacobian_cov_vp = cached_jit(_jacobian_cov_vp_fun, static_argnames=("backend",), compiler_options=SINGLE_FIT)
_jacobian_cov_vp.__doc__ = "Jacobian ``(p, p, k)`` of :func:`mixedjax.backends.cov_beta_vp` in ``vp``."


def _fstat_ddf(nu: np.ndarray, tol: float = 1e-8) -> float:
    """lmerTest's ``get_Fstat_ddf``: denominator df of a multi-df F from the per-eigenvector df.

    Examples
    --------
    >>> _fstat_ddf(np.array([10.0])), _fstat_ddf(np.array([10.0, 10.0])), _fstat_ddf(np.array([1.5, 30.0]))
    (10.0, 10.0, 2.0)
    >>> round(_fstat_ddf(np.array([10.0, 30.0])), 4)
    14.4444
    """
    nu = np.asarray(nu, dtype=float)
    if nu.size == 1:
        return float(nu[0])
    if np.all(np.abs(nu - nu[0]) < tol):
        return float(nu[0])
    if np.any(nu <= 2):
        return 2.0
    e = np.sum(nu / (nu - 2))
    return float(2 * e / (e - nu.size))


def _pseudo_inverse(h: np.ndarray, tol: float = EIGEN_TOL) -> np.ndarray:
    """lmerTest's inverse of the deviance Hessian: over its eigenvalues above ``tol`` only."""
    w, v = np.linalg.eigh(0.5 * (h + h.T))
    keep = w > tol
    return (v[:, keep] / w[keep]) @ v[:, keep].T


class Satterthwaite:
    """Satterthwaite's approximation at a fit (see the module docstring).  Build with :func:`satterthwaite`.

    Attributes
    ----------
    varpar : (k,) the variance parameters ``concat(θ̂, ρ̂, σ̂)``
    hessian : (k, k) Hessian of the deviance in ``varpar``
    cov_varpar : (k, k) ``2 H⁺``, their asymptotic covariance
    jacobian : (k, p, p) ``∂Cov(β̂)/∂varpar``
    cov_beta : (p, p) Cov(β̂)

    Examples
    --------
    >>> import mixedjax
    >>> d = mixedjax.datasets.load("sleepstudy")
    >>> r = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", re_formula="~Days").fit()
    >>> s = satterthwaite(r)
    >>> round(s.ddf([0.0, 1.0]), 4), round(s.ddf_multi(np.eye(2)), 4)
    (17.0, 17.0)
    """

    def __init__(self, res: FittedResults) -> None:
        fm = res.fitted
        self.varpar = np.concatenate([fm.theta, fm.rho, [np.sqrt(fm.sigma2)]])
        vp = jnp.asarray(self.varpar)
        reml = np.asarray(bool(fm.reml))
        self.hessian = np.asarray(_hessian_vp(fm.backend, vp, fm.data, reml))
        self.cov_varpar = 2.0 * _pseudo_inverse(self.hessian)
        jac = np.asarray(_jacobian_cov_vp(fm.backend, vp, fm.data))  # (p, p, k)
        self.jacobian = np.moveaxis(jac, -1, 0)
        self.cov_beta = np.asarray(res.cov_fe, float)

    def ddf(self, c: Any) -> float:
        """Denominator df of the single contrast ``c (p,)``: ``2 (cᵀΦc)² / (gᵀAg)``."""
        c = np.asarray(c, dtype=float).reshape(-1)
        var = c @ self.cov_beta @ c
        g = np.einsum("i,kij,j->k", c, self.jacobian, c)
        return float(2.0 * var**2 / (g @ self.cov_varpar @ g))

    def ddf_multi(self, lmat: Any) -> float:
        """Denominator df of the F test of the rows of ``lmat (m, p)`` (lmerTest's ``contestMD``)."""
        lmat = np.atleast_2d(np.asarray(lmat, dtype=float))
        _, v = np.linalg.eigh(lmat @ self.cov_beta @ lmat.T)
        nu = [self.ddf(v[:, m] @ lmat) for m in range(v.shape[1])]
        return _fstat_ddf(np.array(nu))


def satterthwaite(res: FittedResults) -> Satterthwaite:
    """The (cached) :class:`Satterthwaite` of a fitted model (any backend, structured residuals included).

    Examples
    --------
    >>> import mixedjax
    >>> d = mixedjax.datasets.load("dietox")
    >>> r = mixedjax.mixedlm("Weight ~ Time", d, groups="Pig").fit()
    >>> satterthwaite(r) is satterthwaite(r)
    True
    """
    cached = res.__dict__.get("_satterthwaite")
    if cached is None:
        cached = Satterthwaite(res)
        res.__dict__["_satterthwaite"] = cached
    return cached


# ------------------------------------------------------------------------------------------ Kenward–Roger
class _Layout(NamedTuple):
    """Random-effects columns reordered term by term, column by column, level by level.

    ``perm[j]`` is the original (level-major) column at reordered position ``j``;
    ``block[(k, a)]`` the slice of term ``k``'s column ``a`` over all its levels;
    ``params`` per covariance parameter ``(k, [(a, b), ...])``: ``D_r = Σ_t S_a S_bᵀ``.
    """

    perm: np.ndarray
    block: dict
    params: list
    owner: np.ndarray  # (Q,) term of each reordered column
    level: np.ndarray  # (Q,) level of each reordered column


def _layout(terms: tuple[tm.TermSpec, ...], levels: list[int]) -> _Layout:
    perm, block, params, owner, level = [], {}, [], [], []
    off = pos = 0
    for k, (t, lv) in enumerate(zip(terms, levels, strict=True)):
        for a in range(t.q):
            perm.append(off + np.arange(lv) * t.q + a)
            block[k, a] = slice(pos, pos + lv)
            owner.append(np.full(lv, k))
            level.append(np.arange(lv))
            pos += lv
        for a, b in zip(*t.positions(), strict=True):
            params.append((k, [(int(a), int(b))] if a == b else [(int(a), int(b)), (int(b), int(a))]))
        off += lv * t.q
    cat = (lambda xs: np.concatenate(xs).astype(int)) if perm else (lambda xs: np.zeros(0, int))
    return _Layout(cat(perm), block, params, cat(owner), cat(level))


def _hadamard_sum(x: Any, y: Any) -> float:
    """``Σ_ij x_ij y_ij`` of two dense or sparse matrices of one shape."""
    if sp.issparse(x):
        return float(x.multiply(y).sum())
    return float(np.sum(x * y))


def _dense_blocks(mat: Any, idx: np.ndarray, where: np.ndarray, batch: np.ndarray) -> np.ndarray:
    """``(B, s, s)``: the blocks ``mat[idx[i]][:, idx[i]]`` of a sparse matrix without entries between blocks."""
    coo = mat.tocoo()
    sel = np.isin(coo.row, idx.ravel())
    out = np.zeros((idx.shape[0], idx.shape[1], idx.shape[1]))
    r, c = coo.row[sel], coo.col[sel]
    np.add.at(out, (batch[r], where[r], where[c]), coo.data[sel])
    return out


def _level_entries(out: np.ndarray, idx: np.ndarray, h: np.ndarray, w2: np.ndarray, partner: np.ndarray,
                   where: np.ndarray) -> None:
    """``out[j, b] = (H − W2ᵀW2)[j, partner[j, b]]`` for the columns ``j`` of the blocks ``idx (B, s)``."""
    bb = np.arange(idx.shape[0])[:, None]
    for b in range(partner.shape[1]):
        pj = partner[idx, b]  # (B, s)
        ok = pj >= 0
        loc = np.where(ok, where[np.maximum(pj, 0)], 0)
        # (W2ᵀW2)[i, loc_i] = Σ_j W2[j, i] W2[j, loc_i]
        cross = np.einsum("bji,bji->bi", w2, w2[bb, :, loc].transpose(0, 2, 1))
        out[idx[ok], b] = (h[bb, np.arange(idx.shape[1])[None, :], loc] - cross)[ok]


def _assemble(blocks: list, size: int) -> Any:
    """The ``size × size`` block-diagonal ``H`` from its blocks (a dense array when one block covers all)."""
    if len(blocks) == 1 and blocks[0][0].shape[0] == 1 and np.array_equal(blocks[0][0][0], np.arange(size)):
        return blocks[0][2][0]
    rows = np.concatenate([np.broadcast_to(idx[:, :, None], h.shape).ravel() for idx, _, h in blocks])
    cols = np.concatenate([np.broadcast_to(idx[:, None, :], h.shape).ravel() for idx, _, h in blocks])
    vals = np.concatenate([h.ravel() for _, _, h in blocks])
    return sp.csr_matrix((vals, (rows, cols)), shape=(size, size))


def _vcov_adjusted(phi: np.ndarray, pp: list[np.ndarray], qq: dict,
                   ktrace: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pbkrtest's ``vcovAdj16_internal`` from its pieces: ``(Φ_A, W)``.

    ``phi (p, p)`` Cov(β̂); ``pp`` the ``P_r``; ``qq[r, s]`` (``r <= s``) the ``Q_rs``;
    ``ktrace (r, r)`` the ``K_rs``.  ``W = 2 I_E⁻¹`` (a pseudo-inverse when ``I_E`` is
    near singular, as pbkrtest), ``Φ_A = Φ + 2 Φ U Φ``.
    """
    n_g = len(pp)
    ie2 = np.zeros((n_g, n_g))
    for i in range(n_g):
        for j in range(i, n_g):
            ie2[i, j] = ie2[j, i] = (ktrace[i, j] - 2 * np.sum(phi * qq[i, j])
                                     + np.sum((phi @ pp[i]) * (pp[j] @ phi)))
    condi = np.min(np.abs(np.linalg.eigvalsh(ie2)))
    ww = 2 * np.linalg.inv(ie2) if condi > 1e-10 else 2 * np.linalg.pinv(ie2)
    uu = np.zeros_like(phi)
    for i in range(n_g - 1):
        for j in range(i + 1, n_g):
            uu += ww[i, j] * (qq[i, j] - pp[i] @ phi @ pp[j])
    uu = uu + uu.T
    for i in range(n_g):
        uu += ww[i, i] * (qq[i, i] - pp[i] @ phi @ pp[i])
    return phi + 2 * phi @ uu @ phi, ww


class KenwardRoger:
    """pbkrtest's ``vcovAdj`` and ``Lb_ddf`` at a fit (see the module docstring).  Build with :func:`kenward_roger`.

    Attributes
    ----------
    cov_adjusted : (p, p) Kenward–Roger's adjusted covariance of β̂ (its standard errors are pbkrtest's)
    cov_beta : (p, p) Cov(β̂)
    p_mats : list of (p, p) ``P_r``;  w_mat : (r, r) ``W = 2 I_E⁻¹``, the covariance of the γ̂
    n_blocks, max_block : the connected blocks of random-effects columns and the largest one's size

    Examples
    --------
    >>> import mixedjax
    >>> d = mixedjax.datasets.load("sleepstudy")
    >>> r = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", re_formula="~Days").fit()
    >>> kr = kenward_roger(r)
    >>> round(kr.ddf(np.array([[0.0, 1.0]])), 4), kr.n_blocks, kr.max_block
    (17.0, 18, 2)
    """

    def __init__(self, res: FittedResults) -> None:
        fm = res.fitted
        backend = fm.backend
        if np.asarray(fm.rho).size:
            raise NotImplementedError("Kenward-Roger with structured residuals (VarIdent/AR1) is not implemented")
        lay = _layout(tuple(backend.terms), [int(v) for v in backend.levels(fm.data)])
        z, x, sw = backend.sparse_design(with_rows(fm))
        sw = np.asarray(sw, float)
        z = (sp.diags(sw) @ sp.csr_matrix(z, dtype=float)).tocsc()[:, lay.perm].tocsr()  # Z̃, reordered columns
        x = np.asarray(x, float) * sw[:, None]
        n, nq = z.shape
        sigma2 = float(fm.sigma2)
        fs = tm.factors_np(fm.theta, backend.terms)

        # Λ in the reordered columns: entry (k, a, l), (k, b, l) is T_k[a, b]
        lam_rows, lam_cols, lam_vals = [], [], []
        for k, f in enumerate(fs):
            q = f.shape[0]
            for a in range(q):
                for b in range(q):
                    if f[a, b] != 0.0:
                        lam_rows.append(np.arange(lay.block[k, a].start, lay.block[k, a].stop))
                        lam_cols.append(np.arange(lay.block[k, b].start, lay.block[k, b].stop))
                        lam_vals.append(np.full(lay.block[k, a].stop - lay.block[k, a].start, f[a, b]))
        cat = (lambda xs: np.concatenate(xs)) if lam_rows else (lambda xs: np.zeros(0))
        lam = sp.csr_matrix((cat(lam_vals), (cat(lam_rows).astype(int), cat(lam_cols).astype(int))), shape=(nq, nq))

        # connected blocks: columns sharing a row, or a level of one term
        ztz = (z.T @ z).tocsr()
        same_level = sp.csr_matrix((np.ones(nq), (np.arange(nq), lay.owner * (nq + 1) + lay.level)),
                                   shape=(nq, (len(fs) + 1) * (nq + 1)))
        n_blocks, label = connected_components((abs(ztz) + same_level @ same_level.T).tocsr(), directed=False)
        sizes = np.bincount(label, minlength=n_blocks)
        self.n_blocks, self.max_block = int(n_blocks), int(sizes.max(initial=0))
        if self.max_block > KR_MAX_BLOCK:
            raise NotImplementedError(
                f"Kenward-Roger is implemented up to {KR_MAX_BLOCK} connected random-effects columns "
                f"(mixedjax.ddf.KR_MAX_BLOCK); this model has a block of {self.max_block} (it factors a dense "
                "block of that size)")
        # blocks of one size side by side: idx (B, s) columns; where[j] = position of column j in its block
        order = np.argsort(label, kind="stable")
        comps = np.split(order, np.cumsum(sizes)[:-1]) if nq else []
        where = np.zeros(nq, int)
        batch = np.zeros(nq, int)  # index of a column's block among the blocks of its size
        by_size: dict[int, np.ndarray] = {}
        for size in np.unique(sizes):
            idx = np.stack([c for c in comps if c.size == size])
            where[idx] = np.arange(size)[None, :]
            batch[idx] = np.arange(idx.shape[0])[:, None]
            by_size[int(size)] = idx
        q_max = max((t.q for t in backend.terms), default=1)
        partner = np.full((nq, q_max), -1)  # partner[(k, a, l), b]: the reordered column (k, b, l)
        for (k, b), sl in lay.block.items():
            own = np.flatnonzero(lay.owner == k)
            partner[own, b] = sl.start + lay.level[own]

        # per block: M = I + ΛᵀAΛ, W2 = M⁻¹ΛᵀA, H = Z̃ᵀV⁻¹Z̃ = A − AΛ W2, Z̃ᵀV⁻²Z̃ = H − W2ᵀW2
        blocks = []  # (idx (B, s), M⁻¹ (B, s, s), H (B, s, s))
        h2_levels = np.zeros((nq, q_max))  # (Z̃ᵀV⁻²Z̃)[(k, a, l), (k, b, l)]
        tr_minv2 = 0.0
        for size, idx in by_size.items():
            if size <= SMALL_BLOCK:  # many small blocks (groups): batched dense algebra
                a_b = _dense_blocks(ztz, idx, where, batch)
                l_b = _dense_blocks(lam, idx, where, batch)
                lta = np.swapaxes(l_b, 1, 2) @ a_b
                m_b = lta @ l_b + np.eye(size)
                minv = np.linalg.inv(m_b)
                w2_b = minv @ lta
                h_b = a_b - np.swapaxes(lta, 1, 2) @ w2_b
                tr_minv2 += float(np.sum(minv * minv))
                _level_entries(h2_levels, idx, h_b, w2_b, partner, where)
                blocks.append((idx, minv, h_b))
                continue
            for one in idx:  # a large block (crossed factors): sparse products, one dense inverse
                a_s, lam_s = ztz[one][:, one], lam[one][:, one]
                lta_s = (lam_s.T @ a_s).tocsr()  # ΛᵀA, sparse like A
                alam = lta_s.T.tocsr()  # AΛ
                m_c = (lta_s @ lam_s).toarray()
                m_c[np.diag_indices_from(m_c)] += 1.0
                chol = sla.cholesky(m_c, lower=True, overwrite_a=True, check_finite=False)
                minv = sla.lapack.dpotri(chol, lower=1, overwrite_c=1)[0]  # M⁻¹ (lower; upper 0): the O(Q³) step
                minv = minv + minv.T
                minv[np.diag_indices_from(minv)] *= 0.5
                tr_minv2 += float(np.sum(minv * minv))
                w2_c = np.asarray(alam @ minv).T  # M⁻¹ΛᵀA (sparse times dense)
                h_c = a_s.toarray() - np.asarray(alam @ w2_c)  # A − AΛM⁻¹ΛᵀA
                _level_entries(h2_levels, one[None, :], h_c[None], w2_c[None], partner, where)
                del w2_c
                blocks.append((one[None, :], minv[None], h_c[None]))
        h = _assemble(blocks, nq)

        def vinv(y: np.ndarray) -> np.ndarray:
            """``V⁻¹ y = y − Z̃Λ M⁻¹ ΛᵀZ̃ᵀ y`` for ``y (n, m)``."""
            u = lam.T @ (z.T @ y)
            for idx, minv, _ in blocks:
                u[idx] = minv @ u[idx]
            return y - z @ (lam @ u)

        f1 = vinv(x)  # σ² Σ⁻¹X̃
        f2 = vinv(f1)  # σ⁴ Σ⁻²X̃
        bmat = (z.T @ f1) / sigma2  # Z̃ᵀΣ⁻¹X̃ (Q, p)
        b2mat = (z.T @ f2) / sigma2**2  # Z̃ᵀΣ⁻²X̃
        cmat = h / sigma2 if not sp.issparse(h) else h.multiply(1.0 / sigma2).tocsr()  # Z̃ᵀΣ⁻¹Z̃

        n_re = len(lay.params)
        n_g = n_re + 1
        pp: list[np.ndarray] = []
        for k, pairs in lay.params:
            pp.append(-sum(bmat[lay.block[k, a]].T @ bmat[lay.block[k, b]] for a, b in pairs))
        pp.append(-(f1.T @ f1) / sigma2**2)  # −X̃ᵀΣ⁻²X̃
        qq: dict[tuple[int, int], np.ndarray] = {}
        ktrace = np.zeros((n_g, n_g))
        for r, (k, pairs_r) in enumerate(lay.params):
            for s in range(r, n_re):
                k2, pairs_s = lay.params[s]
                q_rs = 0.0
                k_rs = 0.0
                for a, b in pairs_r:
                    for c, d in pairs_s:
                        c_bc = cmat[lay.block[k, b], lay.block[k2, c]]
                        q_rs = q_rs + bmat[lay.block[k, a]].T @ (c_bc @ bmat[lay.block[k2, d]])
                        k_rs += _hadamard_sum(c_bc, cmat[lay.block[k, a], lay.block[k2, d]])
                qq[r, s] = np.asarray(q_rs)
                ktrace[r, s] = ktrace[s, r] = k_rs
            # with the residual variance (∂Σ/∂σ² = I): X̃ᵀΣ⁻¹G_rΣ⁻²X̃ and tr(Σ⁻¹G_rΣ⁻¹)
            qq[r, n_re] = sum(bmat[lay.block[k, a]].T @ b2mat[lay.block[k, b]] for a, b in pairs_r)
            ktrace[r, n_re] = ktrace[n_re, r] = sum(float(np.sum(h2_levels[lay.block[k, a], b]))
                                                    for a, b in pairs_r) / sigma2**2
        qq[n_re, n_re] = (f1.T @ f2) / sigma2**3  # X̃ᵀΣ⁻³X̃
        ktrace[n_re, n_re] = (n - nq + tr_minv2) / sigma2**2  # tr(Σ⁻²)

        phi = np.asarray(res.cov_fe, float)
        self.cov_adjusted, ww = _vcov_adjusted(phi, pp, qq, ktrace)
        self.cov_beta = phi
        self.p_mats, self.w_mat = pp, ww

    def ddf(self, lmat: Any) -> float:
        """Kenward–Roger denominator df for the contrast(s) ``lmat (m, p)`` (pbkrtest's ``Lb_ddf``, q = rank)."""
        lmat = np.atleast_2d(np.asarray(lmat, dtype=float))
        v0 = self.cov_beta
        theta = lmat.T @ np.linalg.solve(lmat @ v0 @ lmat.T, lmat)
        tv = theta @ v0
        a1 = a2 = 0.0
        n_g = len(self.p_mats)
        for i in range(n_g):
            ui = tv @ self.p_mats[i] @ v0
            for j in range(i, n_g):
                e = 1.0 if i == j else 2.0
                uj = tv @ self.p_mats[j] @ v0
                a1 += e * self.w_mat[i, j] * np.trace(ui) * np.trace(uj)
                a2 += e * self.w_mat[i, j] * np.sum(ui * uj.T)
        q = np.linalg.matrix_rank(lmat)
        b = (a1 + 6 * a2) / (2 * q)
        g = ((q + 1) * a1 - (q + 4) * a2) / ((q + 2) * a2)
        den = 3 * q + 2 * (1 - g)
        c1, c2, c3 = g / den, (q - g) / den, (q + 2 - g) / den
        v0_ = 1 + c1 * b
        v0_ = 0.0 if abs(v0_) < 1e-10 else v0_
        v1, v2 = 1 - c2 * b, 1 - c3 * b
        ratio = (1 - a2 / q) / v1 if v1 != 0 else 0.0
        rho = ratio**2 * v0_ / v2 / q  # V*/(2 E*^2), Kenward & Roger (1997)
        return float(4 + (q + 2) / (q * rho - 1))


def kenward_roger(res: FittedResults) -> KenwardRoger:
    """The (cached) :class:`KenwardRoger` of a fitted model (iid or weighted residuals; any grouping).

    Examples
    --------
    >>> import mixedjax
    >>> d = mixedjax.datasets.load("dietox")
    >>> r = mixedjax.mixedlm("Weight ~ Time", d, groups="Pig").fit()
    >>> kenward_roger(r) is kenward_roger(r)
    True
    """
    cached = res.__dict__.get("_kenward_roger")
    if cached is None:
        cached = KenwardRoger(res)
        res.__dict__["_kenward_roger"] = cached
    return cached
