"""Closed-form score and Hessian of the profiled ML/REML log-likelihood (Lindstrom & Bates 1988).

An independent, dense, plain-numpy check on the JAX likelihood and its autodiff
derivatives; not on the hot path.  For group i,

    y_i = X_i β + Z_i b_i + ε_i,   b_i ~ N(0, σ² Ψ),   ε_i ~ N(0, σ² W_i⁻¹),

so ``Var(y_i) = σ² V_i`` with ``V_i = W_i⁻¹ + Z_i Ψ Z_iᵀ``.  ``Ψ`` (q x q) is block
diagonal: the full ``q_re x q_re`` block ``cov_re / scale``, then ``vcomp_j / scale``
times the identity over the columns of variance component j.  The parameters are
statsmodels' packing of the variance part of ``params``: the lower triangle of
the ``cov_re / scale`` block in row-major order (``np.tril_indices``), then each
``vcomp_j / scale``.  Ψ is *linear* in them,

    (1)  Ψ = Σ_k θ_k E_k,   so   ∂V_i/∂θ_k = Z_i E_k Z_iᵀ =: D_ik,   ∂²V_i/∂θ_k∂θ_l = 0,

with ``E_k`` the symmetric indicator of entry k (both (j, l) and (l, j) for a
covariance; the identity over a component's columns for a variance component).

With ``A = Σ X_iᵀV_i⁻¹X_i``, ``β̂ = A⁻¹ Σ X_iᵀV_i⁻¹y_i``, ``r_i = y_i − X_i β̂`` and
``r² = Σ r_iᵀV_i⁻¹r_i``, β and σ² profiled out (σ̂² = r²/m), the profiled
log-likelihoods of Lindstrom & Bates (1988) are

    (2)  ℓ_ML   = −½ [Σ log|V_i| + n (1 + log(2π r²/n))]                      (m = n)
    (3)  ℓ_REML = −½ [Σ log|V_i| + log|A| + (n−p)(1 + log(2π r²/(n−p)))]     (m = n − p)

Their derivatives follow from ∂log|V| = tr(V⁻¹ ∂V), ∂V⁻¹ = −V⁻¹ ∂V V⁻¹ and (1):

    (4)  ∂_k log|V_i|       = tr(V_i⁻¹ D_ik)
    (5)  ∂_k∂_l log|V_i|    = −tr(V_i⁻¹ D_il V_i⁻¹ D_ik)
    (6)  ∂_k r²             = −Σ r_iᵀ V_i⁻¹ D_ik V_i⁻¹ r_i
         (envelope: β̂ minimises r²(β), so β̂'s own dependence on θ drops out)
    (7)  ∂_k∂_l r²          = 2 Σ r_iᵀ V_i⁻¹ D_il V_i⁻¹ D_ik V_i⁻¹ r_i − 2 g_kᵀ A⁻¹ g_l,
         g_k = Σ X_iᵀ V_i⁻¹ D_ik V_i⁻¹ r_i
         (∂β̂/∂θ_l = −A⁻¹ g_l, from differentiating the normal equations X'V⁻¹(y − Xβ̂) = 0)
    (8)  ∂_k A  = −Σ X_iᵀ V_i⁻¹ D_ik V_i⁻¹ X_i
         ∂_k∂_l A = Σ X_iᵀ V_i⁻¹ (D_il V_i⁻¹ D_ik + D_ik V_i⁻¹ D_il) V_i⁻¹ X_i
    (9)  ∂_k log|A|         = tr(A⁻¹ ∂_k A)
         ∂_k∂_l log|A|      = tr(A⁻¹ ∂_k∂_l A) − tr(A⁻¹ ∂_l A A⁻¹ ∂_k A)
    (10) ∂_k m log r²       = m ∂_k r² / r²
         ∂_k∂_l m log r²    = m (∂_k∂_l r² / r² − ∂_k r² ∂_l r² / r⁴)

(the constants m(1 + log 2π − log m) of the profiled σ² have no derivative).
Everything is evaluated in the random-effects space: with ``M_i = Z_iᵀV_i⁻¹Z_i``,
``C_i = Z_iᵀV_i⁻¹X_i`` and ``u_i = Z_iᵀV_i⁻¹r_i``, ``tr(V_i⁻¹D_ik) = tr(E_k M_i)``,
``r_iᵀV_i⁻¹D_ikV_i⁻¹r_i = u_iᵀE_ku_i``, ``g_k = Σ C_iᵀE_ku_i`` and so on.

Reference: M. J. Lindstrom and D. M. Bates (1988), "Newton–Raphson and EM
algorithms for linear mixed-effects models for repeated-measures data",
JASA 83(404), 1014–1022 (the profiled likelihoods and the derivatives they use
for Newton–Raphson).  The equation numbers in the comments refer to the list
above.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from .covariance import CovStructure

if TYPE_CHECKING:
    from .model import MixedLM

__all__ = [
    "basis_matrices",
    "group_blocks",
    "hessian",
    "profiled_loglike",
    "psi_from_packed",
    "score",
]

LOG_2PI = float(np.log(2.0 * np.pi))

Blocks = list[np.ndarray]  # one array per group


def basis_matrices(structure: CovStructure) -> np.ndarray:
    """The symmetric indicators ``E_k (K, q, q)`` with ``Ψ = Σ_k θ_k E_k`` (eq. 1).

    ``K = structure.n_cov_params``: the lower triangle of the correlated block
    (row-major, statsmodels' order), then one identity block per variance
    component.  ``re_diagonal`` is ignored: the basis spans a full symmetric block.

    Examples
    --------
    >>> from mixedjax.covariance import CovStructure
    >>> e = basis_matrices(CovStructure(q_re=2, vc_sizes=(2,)))
    >>> e.shape
    (4, 4, 4)
    >>> e[1].astype(int).tolist()  # the covariance of the two correlated effects
    [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    >>> e[3].astype(int).tolist()  # the variance component
    [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    """
    q = structure.q
    rows, cols = structure.re_tril
    e = np.zeros((structure.n_cov_params, q, q))
    for k, (j, l) in enumerate(zip(rows, cols, strict=True)):
        e[k, j, l] = 1.0
        e[k, l, j] = 1.0
    off = structure.q_re
    for m, size in enumerate(structure.vc_sizes):
        idx = np.arange(off, off + size)
        e[len(rows) + m, idx, idx] = 1.0
        off += size
    return e


def psi_from_packed(psi_params: np.ndarray, structure: CovStructure) -> np.ndarray:
    """Relative covariance ``Ψ (q, q)`` of one group's random effects from the packed variance parameters.

    Examples
    --------
    >>> import numpy as np
    >>> from mixedjax.covariance import CovStructure
    >>> psi_from_packed(np.array([2.0, 0.5, 1.0, 3.0]), CovStructure(q_re=2, vc_sizes=(1,))).tolist()
    [[2.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 3.0]]
    """
    theta = _check_params(psi_params, structure)
    return np.einsum("k,kab->ab", theta, basis_matrices(structure))


def group_blocks(model: MixedLM) -> tuple[Blocks, Blocks, Blocks, Blocks]:
    """Dense per-group ``(ys, xs, zs, ws)`` of a :class:`mixedjax.MixedLM`, in the model's group order.

    ``zs[i]`` has the ``q = structure.q`` columns of the model's random-effects
    design (``exog_re`` then the variance components, zero where a group lacks a
    component's column), so it pairs with ``model.structure``.

    Examples
    --------
    >>> import numpy as np
    >>> import mixedjax
    >>> m = mixedjax.MixedLM(np.arange(5.0), np.ones((5, 1)), groups=[0, 0, 1, 1, 1])
    >>> ys, xs, zs, ws = group_blocks(m)
    >>> [y.tolist() for y in ys]
    [[0.0, 1.0], [2.0, 3.0, 4.0]]
    """
    codes = model.group_index.codes
    z = np.concatenate([model.exog_re, model.exog_vc_matrix], axis=1)
    ys, xs, zs, ws = [], [], [], []
    for g in range(model.n_groups):
        rows = np.flatnonzero(codes == g)
        ys.append(np.asarray(model.endog[rows], dtype=float))
        xs.append(np.asarray(model.exog[rows], dtype=float))
        zs.append(np.asarray(z[rows], dtype=float))
        ws.append(np.asarray(model.weights[rows], dtype=float))
    return ys, xs, zs, ws


class _Pieces(NamedTuple):
    """Sums over groups at one Ψ: everything eqs. (2)–(10) need."""

    nobs: int
    logdet_v: float       # Σ log|V_i|
    a: np.ndarray         # A = Σ X'V⁻¹X (p, p)
    r2: float             # Σ r'V⁻¹r at β̂
    m: list[np.ndarray]   # M_i = Z'V⁻¹Z (q, q), per group
    c: list[np.ndarray]   # C_i = Z'V⁻¹X (q, p), per group
    u: list[np.ndarray]   # u_i = Z'V⁻¹r (q,), per group


def _check_params(psi_params: np.ndarray, structure: CovStructure) -> np.ndarray:
    theta = np.asarray(psi_params, dtype=float).reshape(-1)
    if theta.size != structure.n_cov_params:
        raise ValueError(f"psi_params has {theta.size} entries; the structure packs {structure.n_cov_params} "
                         "(lower triangle of the correlated block, then one per variance component)")
    return theta


def _pieces(
    psi_params: np.ndarray,
    ys: Sequence[np.ndarray],
    xs: Sequence[np.ndarray],
    zs: Sequence[np.ndarray],
    ws: Sequence[np.ndarray] | None,
    structure: CovStructure,
) -> _Pieces:
    psi = psi_from_packed(psi_params, structure)
    if not (len(ys) == len(xs) == len(zs)) or (ws is not None and len(ws) != len(ys)):
        raise ValueError("ys, xs, zs (and ws) must hold one entry per group")
    q = structure.q
    x0 = np.asarray(xs[0])
    p = x0.shape[1] if x0.ndim == 2 else 1
    vinv_x, vinv_y, vinv_z = [], [], []
    nobs, logdet_v = 0, 0.0
    a = np.zeros((p, p))
    xty = np.zeros(p)
    blocks = []
    for i, (y, x, z) in enumerate(zip(ys, xs, zs, strict=True)):
        y = np.asarray(y, dtype=float).reshape(-1)
        n_i = y.shape[0]
        x = np.asarray(x, dtype=float).reshape(n_i, p)
        z = np.asarray(z, dtype=float).reshape(n_i, q)
        w = np.ones(n_i) if ws is None else np.asarray(ws[i], dtype=float).reshape(n_i)
        v = np.diag(1.0 / w) + z @ psi @ z.T
        chol = np.linalg.cholesky(v)
        logdet_v += 2.0 * float(np.sum(np.log(np.diag(chol))))
        vx, vy, vz = (_cho_solve(chol, b) for b in (x, y, z))
        a += x.T @ vx
        xty += x.T @ vy
        nobs += n_i
        blocks.append((y, x, z))
        vinv_x.append(vx)
        vinv_y.append(vy)
        vinv_z.append(vz)
    beta = np.linalg.solve(a, xty)
    r2 = 0.0
    ms, cs, us = [], [], []
    for (y, x, z), vx, vy, vz in zip(blocks, vinv_x, vinv_y, vinv_z, strict=True):
        vr = vy - vx @ beta          # V_i⁻¹ r_i
        r2 += float((y - x @ beta) @ vr)
        ms.append(z.T @ vz)
        cs.append(z.T @ vx)
        us.append(z.T @ vr)
    return _Pieces(nobs, logdet_v, a, r2, ms, cs, us)


def _cho_solve(chol: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.solve(chol.T, np.linalg.solve(chol, b))


def profiled_loglike(
    psi_params: np.ndarray,
    ys: Sequence[np.ndarray],
    xs: Sequence[np.ndarray],
    zs: Sequence[np.ndarray],
    ws: Sequence[np.ndarray] | None,
    structure: CovStructure,
    reml: bool = True,
) -> float:
    """Profiled ML (eq. 2) or REML (eq. 3) log-likelihood, β and σ² profiled out.

    Parameters
    ----------
    psi_params : (K,) array_like
        Packed variance parameters: lower triangle (row-major) of ``cov_re / scale``,
        then ``vcomp / scale`` (``params[k_fe:]`` of a statsmodels/mixedjax fit).
    ys, xs, zs : sequences of arrays, one per group
        ``ys[i] (n_i,)``, ``xs[i] (n_i, p)``, ``zs[i] (n_i, q)`` with the columns of
        ``structure`` (correlated block, then each variance component's columns).
    ws : sequence of ``(n_i,)`` arrays or None
        Prior weights (``Var(ε) = σ² W⁻¹``); ``None`` for unit weights.
    structure : CovStructure
        Layout of Ψ; ``re_diagonal`` is ignored (Ψ is built from the full triangle).
    reml : bool
        REML criterion (default) or maximum likelihood.

    Returns
    -------
    float

    Examples
    --------
    >>> import numpy as np
    >>> from mixedjax.covariance import CovStructure
    >>> rng = np.random.default_rng(0)
    >>> xs = [np.ones((4, 1)) for _ in range(3)]
    >>> ys = [rng.normal(size=4) for _ in range(3)]
    >>> ll = profiled_loglike(np.array([0.5]), ys, xs, xs, None, CovStructure(q_re=1), reml=False)
    >>> bool(np.isfinite(ll))
    True
    """
    pc = _pieces(psi_params, ys, xs, zs, ws, structure)
    p = pc.a.shape[0]
    df = pc.nobs - p if reml else pc.nobs
    # eqs. (2)/(3): σ̂² = r²/df substituted into the Gaussian log-likelihood
    dev = pc.logdet_v + df * (1.0 + LOG_2PI + np.log(pc.r2 / df))
    if reml:
        dev += np.linalg.slogdet(pc.a)[1]
    return float(-0.5 * dev)


def score(
    psi_params: np.ndarray,
    ys: Sequence[np.ndarray],
    xs: Sequence[np.ndarray],
    zs: Sequence[np.ndarray],
    ws: Sequence[np.ndarray] | None,
    structure: CovStructure,
    reml: bool = True,
) -> np.ndarray:
    """Gradient ``(K,)`` of :func:`profiled_loglike` with respect to the packed variance parameters.

    Closed form, eqs. (4), (6), (8)–(10); same arguments as :func:`profiled_loglike`.

    Examples
    --------
    >>> import numpy as np
    >>> from mixedjax.covariance import CovStructure
    >>> rng = np.random.default_rng(0)
    >>> xs = [np.column_stack([np.ones(5), np.arange(5.0)]) for _ in range(4)]
    >>> ys = [x @ [1.0, 0.5] + rng.normal(size=5) for x in xs]
    >>> st, theta = CovStructure(q_re=2), np.array([1.0, 0.2, 0.5])
    >>> g = score(theta, ys, xs, xs, None, st, reml=True)
    >>> def f(t):
    ...     return profiled_loglike(t, ys, xs, xs, None, st, reml=True)
    >>> fd = [(f(theta + h) - f(theta - h)) / 2e-6 for h in 1e-6 * np.eye(3)]
    >>> bool(np.allclose(g, fd, rtol=1e-6, atol=1e-8))
    True
    """
    pc = _pieces(psi_params, ys, xs, zs, ws, structure)
    e = basis_matrices(structure)
    p = pc.a.shape[0]
    df = pc.nobs - p if reml else pc.nobs
    # eq. (4): Σ_i tr(E_k M_i)
    d_logdet_v = np.einsum("kab,ab->k", e, sum(pc.m))
    # eq. (6): −Σ_i u_iᵀ E_k u_i
    d_r2 = -np.einsum("kab,ab->k", e, sum(np.outer(u, u) for u in pc.u))
    # eq. (10): the profiled σ² term
    dev = d_logdet_v + df * d_r2 / pc.r2
    if reml:
        # eqs. (8), (9): tr(A⁻¹ ∂_k A)
        d_a = _d_a(e, pc)
        dev = dev + np.einsum("pr,krp->k", np.linalg.inv(pc.a), d_a)
    return -0.5 * dev


def hessian(
    psi_params: np.ndarray,
    ys: Sequence[np.ndarray],
    xs: Sequence[np.ndarray],
    zs: Sequence[np.ndarray],
    ws: Sequence[np.ndarray] | None,
    structure: CovStructure,
    reml: bool = True,
) -> np.ndarray:
    """Hessian ``(K, K)`` of :func:`profiled_loglike` with respect to the packed variance parameters.

    Closed form, eqs. (5), (7)–(10); same arguments as :func:`profiled_loglike`.

    Examples
    --------
    >>> import numpy as np
    >>> from mixedjax.covariance import CovStructure
    >>> rng = np.random.default_rng(1)
    >>> xs = [np.column_stack([np.ones(6), np.arange(6.0)]) for _ in range(5)]
    >>> ys = [x @ [1.0, 0.5] + rng.normal() + rng.normal(size=6) for x in xs]
    >>> st, theta = CovStructure(q_re=2), np.array([1.0, 0.2, 0.5])
    >>> h = hessian(theta, ys, xs, xs, None, st, reml=False)
    >>> def s(t):
    ...     return score(t, ys, xs, xs, None, st, reml=False)
    >>> fd = np.array([(s(theta + d) - s(theta - d)) / 2e-6 for d in 1e-6 * np.eye(3)])
    >>> bool(np.allclose(h, fd, rtol=1e-6, atol=1e-6)), bool(np.allclose(h, h.T))
    (True, True)
    """
    pc = _pieces(psi_params, ys, xs, zs, ws, structure)
    e = basis_matrices(structure)
    p = pc.a.shape[0]
    df = pc.nobs - p if reml else pc.nobs
    a_inv = np.linalg.inv(pc.a)

    em = [np.einsum("kab,bc->kac", e, m) for m in pc.m]  # E_k M_i (K, q, q)
    # eq. (5): −Σ_i tr(E_l M_i E_k M_i)
    dd_logdet_v = -sum(np.einsum("kab,lba->kl", x, x) for x in em)
    # eq. (6) and eq. (7): g_k = Σ_i C_iᵀ E_k u_i, then 2 Σ_i u_iᵀ E_l M_i E_k u_i − 2 g_kᵀ A⁻¹ g_l
    d_r2 = -np.einsum("kab,ab->k", e, sum(np.outer(u, u) for u in pc.u))
    g = sum(np.einsum("ap,kab,b->kp", c, e, u) for c, u in zip(pc.c, pc.u, strict=True))
    eu = [np.einsum("kab,b->ka", e, u) for u in pc.u]  # E_k u_i (K, q)
    dd_r2 = 2.0 * sum(np.einsum("la,ab,kb->kl", x, m, x) for x, m in zip(eu, pc.m, strict=True))
    dd_r2 = dd_r2 - 2.0 * g @ a_inv @ g.T
    # eq. (10): the profiled σ² term, m log r²
    dd = dd_logdet_v + df * (dd_r2 / pc.r2 - np.outer(d_r2, d_r2) / pc.r2**2)
    if reml:
        # eqs. (8), (9)
        d_a = _d_a(e, pc)
        ec = [np.einsum("kab,bp->kap", e, c) for c in pc.c]  # E_k C_i (K, q, p)
        # ∂_k∂_l A = Σ_i (E_l C_i)ᵀ M_i (E_k C_i) + (E_k C_i)ᵀ M_i (E_l C_i)
        half = sum(np.einsum("lap,ab,kbr->klpr", x, m, x) for x, m in zip(ec, pc.m, strict=True))
        dd_a = half + np.swapaxes(half, 0, 1)
        ainv_da = np.einsum("pr,krs->kps", a_inv, d_a)  # A⁻¹ ∂_k A
        dd = dd + np.einsum("pr,klrp->kl", a_inv, dd_a) - np.einsum("lpr,krp->kl", ainv_da, ainv_da)
    return -0.5 * dd


def _d_a(e: np.ndarray, pc: _Pieces) -> np.ndarray:
    """Eq. (8): ∂_k A = −Σ_i C_iᵀ E_k C_i, ``(K, p, p)``."""
    return -sum(np.einsum("ap,kab,br->kpr", c, e, c) for c in pc.c)
