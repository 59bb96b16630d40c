"""The profiled ML/REML log-likelihood of a linear mixed model, as pure JAX functions.

For group i, ``y_i = X_i β + Z_i b_i + ε_i`` with ``b_i ~ N(0, σ² Λ Λᵀ)`` and
``ε_i ~ N(0, σ² W_i⁻¹)`` (W: prior weights).  With ``L_i = chol(I + Λᵀ Z_iᵀ Z_i Λ)``
(Z, X, y whitened by the weights), Woodbury gives, from cross-products only,

    X_iᵀ V_i⁻¹ X_i = X_iᵀX_i − c_iᵀ c_i,   c_i = L_i⁻¹ Λᵀ Z_iᵀ X_i
    X_iᵀ V_i⁻¹ y_i = X_iᵀy_i − c_iᵀ d_i,   d_i = L_i⁻¹ Λᵀ Z_iᵀ y_i
    y_iᵀ V_i⁻¹ y_i = y_iᵀy_i − d_iᵀ d_i,   log|V_i/σ²| = 2 Σ log diag L_i − Σ log w

(V relative to σ²).  Summing over groups gives the GLS normal equations
``A β̂ = b``, the penalised residual sum of squares ``r² = y'V⁻¹y − b'β̂`` and,
with σ² profiled out (Bates et al. 2015, eqs. 34 and 41),

    −2 ℓ_ML   = log|V| + n (1 + log(2π r²/n))
    −2 ℓ_REML = log|V| + log|A| + (n−p) (1 + log(2π r²/(n−p)))

One evaluation costs O(G q³ + G q² p), independent of the number of rows.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
from jax import Array

from .covariance import CovStructure, lam_from_profile_jax, lam_from_theta, profile_from_packed_jax
from .data import CrossProducts
from .linalg import SCALAR_UNROLL_MAX, cholesky, logdet_from_cholesky, solve_lower, solve_upper_t

LOG_2PI = math.log(2.0 * math.pi)

GROUP_DOT_MIN = 512
"""Groups from which a sum over the group axis is a matrix product (:func:`group_einsum`)."""


def _broadcast_einsum(spec: str, *ops: Array) -> Array:
    """``jnp.einsum(spec, *ops)`` as one broadcast product and a sum (no ``dot_general``)."""
    ins, out = spec.split("->")
    ins = ins.split(",")
    letters = sorted(set("".join(ins)), key=lambda c: (c not in out, out.find(c), c))
    prod = None
    for sub, op in zip(ins, ops, strict=True):
        view = jnp.transpose(op, [sub.index(c) for c in letters if c in sub])
        view = jnp.expand_dims(view, [i for i, c in enumerate(letters) if c not in sub]) if len(sub) < len(letters) \
            else view
        prod = view if prod is None else prod * view
    return jnp.sum(prod, axis=tuple(range(len(out), len(letters))))


def group_einsum(spec: str, *ops: Array) -> Array:
    """``jnp.einsum(spec, *ops)`` whose first index (every operand's leading axis) is the group axis.

    With many groups (at least :data:`GROUP_DOT_MIN`) a matrix product: XLA's CPU reduction of a broadcast
    product over a long leading axis runs about 3x slower (1M groups).  With few groups, as in the
    batched fits under ``vmap``, a broadcast product and a sum: there the matrix product would be M tiny
    ones, slower still on a CPU.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> c = jnp.arange(24.0).reshape(3, 2, 4)
    >>> bool(jnp.allclose(group_einsum("gip,giq->pq", c, c), jnp.einsum("gip,giq->pq", c, c)))
    True
    """
    if ops[0].shape[0] >= GROUP_DOT_MIN:
        return jnp.einsum(spec, *ops)
    return _broadcast_einsum(spec, *ops)


class GroupSolve(NamedTuple):
    """Per-group Woodbury pieces: ``chol (G, q, q)``, ``c (G, q, p)``, ``d (G, q)``."""

    chol: Array
    c: Array
    d: Array


class Normal(NamedTuple):
    """Summed GLS pieces: ``a = X'V⁻¹X (p, p)``, ``b = X'V⁻¹y (p,)``, ``yy = y'V⁻¹y``, ``logdet_v``."""

    a: Array
    b: Array
    yy: Array
    logdet_v: Array


class Profiled(NamedTuple):
    """The profiled fit at one θ: deviance (−2 log-likelihood), β̂, σ̂², and the pieces behind them."""

    deviance: Array
    beta: Array
    sigma2: Array
    r2: Array
    chol_a: Array
    normal: Normal
    groups: GroupSolve


def _entries_solve(lam: Array, cp: CrossProducts) -> GroupSolve:
    """:func:`solve_groups` for small ``q``, one (G,) array per matrix entry.

    Written as elementwise products and sums over the (static) entries of the
    q x q matrices, so that both the evaluation and its reverse-mode derivative
    are fused elementwise loops over groups (and over models under ``vmap``);
    ``einsum`` on 2 x 2 blocks becomes many tiny matrix products on CPU.
    """
    q = lam.shape[0]
    ztz = [[cp.ztz[..., j, k] for k in range(q)] for j in range(q)]
    lt = [[lam[j, i] for j in range(q)] for i in range(q)]  # Λᵀ entries
    # M = Λᵀ ZᵀZ Λ + I, lower triangle; t = Λᵀ ZᵀZ
    t = [[sum(lt[i][j] * ztz[j][k] for j in range(q)) for k in range(q)] for i in range(q)]
    ent: list[list[Array]] = [[None] * q for _ in range(q)]  # type: ignore[list-item]
    for i in range(q):
        for j in range(i + 1):
            s = sum(t[i][k] * lam[k, j] for k in range(q)) + (1.0 if i == j else 0.0)
            for m in range(j):
                s = s - ent[i][m] * ent[j][m]
            ent[i][j] = jnp.sqrt(s) if i == j else s / ent[j][j]
    c: list[Array] = []
    d: list[Array] = []
    for i in range(q):
        ci = sum(lt[i][j] * cp.ztx[..., j, :] for j in range(q))
        di = sum(lt[i][j] * cp.zty[..., j] for j in range(q))
        for m in range(i):
            ci = ci - ent[i][m][..., None] * c[m]
            di = di - ent[i][m] * d[m]
        c.append(ci / ent[i][i][..., None])
        d.append(di / ent[i][i])
    zero = jnp.zeros_like(ent[0][0])
    chol = jnp.stack([jnp.stack([ent[i][j] if j <= i else zero for j in range(q)], axis=-1) for i in range(q)],
                     axis=-2)
    return GroupSolve(chol, jnp.stack(c, axis=-2), jnp.stack(d, axis=-1))


def solve_groups(lam: Array, cp: CrossProducts) -> GroupSolve:
    """Per-group Cholesky of ``I + Λᵀ Z_iᵀ Z_i Λ`` and the triangular solves of Woodbury."""
    q = lam.shape[0]
    if q <= SCALAR_UNROLL_MAX:
        return _entries_solve(lam, cp)
    lzzl = jnp.einsum("ji,gjk,kl->gil", lam, cp.ztz, lam)
    chol = cholesky(lzzl + jnp.eye(q, dtype=lam.dtype))
    c = solve_lower(chol, jnp.einsum("ji,gjp->gip", lam, cp.ztx))
    d = solve_lower(chol, jnp.einsum("ji,gj->gi", lam, cp.zty))
    return GroupSolve(chol, c, d)


def sum_fixed_parts(cp: CrossProducts) -> CrossProducts:
    """``cp`` with ``XᵀX``, ``Xᵀy`` and ``yᵀy`` summed over the groups (a group axis of length 1).

    Only their sums enter the likelihood, its gradient and the EM step (:func:`normal_equations`);
    summed once before a fit, an evaluation reads 14 numbers per group instead of 35 (q = 2, p = 4),
    which is what it costs with a million groups.
    """
    return cp._replace(xtx=jnp.sum(cp.xtx, axis=0, keepdims=True), xty=jnp.sum(cp.xty, axis=0, keepdims=True),
                       yty=jnp.sum(cp.yty, axis=0, keepdims=True))


def normal_equations(gs: GroupSolve, cp: CrossProducts) -> Normal:
    """Sum the per-group Woodbury pieces into the GLS normal equations (broadcast sums, no tiny matmuls)."""
    a = jnp.sum(cp.xtx, axis=0) - group_einsum("gip,giq->pq", gs.c, gs.c)
    b = jnp.sum(cp.xty, axis=0) - group_einsum("gip,gi->p", gs.c, gs.d)
    yy = jnp.sum(cp.yty) - jnp.sum(gs.d * gs.d)
    logdet_v = jnp.sum(logdet_from_cholesky(gs.chol)) - cp.sum_logw
    return Normal(a, b, yy, logdet_v)


def profile_lam(lam: Array, cp: CrossProducts, reml: bool | Array) -> Profiled:
    """Profile β and σ² out at relative factor Λ; return the deviance and what it is made of.

    ``reml`` may be a traced boolean, so one compiled program serves ML and REML.
    """
    gs = solve_groups(lam, cp)
    return profile_normal(normal_equations(gs, cp), cp.nobs, reml)._replace(groups=gs)


def profile_normal(ne: Normal, nobs: Array, reml: bool | Array) -> Profiled:
    """Profile β and σ² out of summed GLS pieces (any random-effects layout; ``groups`` is None).

    The same formulas as :func:`profile_lam`, for likelihoods that form ``Normal``
    another way (crossed random effects, :mod:`mixedjax.crossed`).
    """
    p = ne.a.shape[0]
    chol_a = cholesky(ne.a)
    u = solve_lower(chol_a, ne.b)
    beta = solve_upper_t(chol_a, u)
    r2 = ne.yy - jnp.dot(u, u)
    is_reml = jnp.asarray(reml, dtype=r2.dtype)
    df = nobs - p * is_reml
    sigma2 = r2 / df
    deviance = ne.logdet_v + df * (1.0 + LOG_2PI + jnp.log(sigma2)) + is_reml * logdet_from_cholesky(chol_a)
    return Profiled(deviance, beta, sigma2, r2, chol_a, ne, None)


def profile(theta: Array, cp: CrossProducts, structure: CovStructure, reml: bool | Array) -> Profiled:
    """:func:`profile_lam` at ``theta``."""
    return profile_lam(lam_from_theta(theta, structure), cp, reml)


def deviance(theta: Array, cp: CrossProducts, structure: CovStructure, reml: bool | Array) -> Array:
    """Profiled deviance −2ℓ(θ) (ML) or REML criterion; the function the optimiser minimises.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from mixedjax.data import GroupedData, cross_products
    >>> from mixedjax.covariance import CovStructure
    >>> y = jnp.array([[1.0, 2.0], [3.0, 5.0]])
    >>> d = GroupedData(y, jnp.ones((2, 2, 1)), jnp.ones((2, 2, 1)), jnp.ones((2, 2)), jnp.ones((2, 2)))
    >>> float(deviance(jnp.array([0.5]), cross_products(d), CovStructure(q_re=1), reml=True)) > 0
    True
    """
    return profile(theta, cp, structure, reml).deviance


def deviance_and_grad(
    theta: Array, cp: CrossProducts, structure: CovStructure, reml: bool | Array
) -> tuple[Array, Array]:
    """Profiled deviance and its gradient in θ, the gradient in closed form (no reverse-mode pass).

    With ``V_i = I + Z_i Λ Λᵀ Z_iᵀ`` (relative to σ²), residuals ``r_i = y_i − X_i β̂`` and
    ``df = n − p·reml``, differentiating ``log|V| + reml·log|A| + df·log r²`` (β̂ is optimal,
    so it does not move the first order) gives ``∂D/∂Λ = 2 H Λ`` with

        H = Σ_i Z_iᵀ Q_i Z_i,  Q_i = V_i⁻¹ − reml·V_i⁻¹X_i A⁻¹X_iᵀV_i⁻¹ − (df/r²)·V_i⁻¹r_i r_iᵀV_i⁻¹

    (Lindstrom & Bates 1988, in the relative-factor parameterisation), and every
    piece of ``Z_iᵀ Q_i Z_i`` comes from q x q cross-products through Woodbury:
    with ``E_i = L_i⁻¹ Λᵀ Z_iᵀZ_i``, ``Z_iᵀV_i⁻¹Z_i = Z_iᵀZ_i − E_iᵀE_i``,
    ``Z_iᵀV_i⁻¹X_i = Z_iᵀX_i − E_iᵀc_i`` and ``Z_iᵀV_i⁻¹r_i = Z_iᵀy_i − E_iᵀd_i − (Z_iᵀV_i⁻¹X_i) β̂``.
    One pass over the groups after the value: the optimiser's gradient costs about
    twice an evaluation, where reverse-mode autodiff of the unrolled algebra costs
    ten times (and compiles far more slowly).  Agrees with ``jax.grad(deviance)``
    (``tests/test_likelihood.py``).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from mixedjax.data import GroupedData, cross_products
    >>> from mixedjax.covariance import CovStructure
    >>> y = jnp.array([[1.0, 2.0], [3.0, 5.0], [0.5, 0.0]])
    >>> d = GroupedData(y, jnp.ones((3, 2, 1)), jnp.ones((3, 2, 1)), jnp.ones((3, 2)), jnp.ones((3, 2)))
    >>> cp, st, th = cross_products(d), CovStructure(q_re=1), jnp.array([0.7])
    >>> f, g = deviance_and_grad(th, cp, st, reml=True)
    >>> bool(jnp.allclose(g, jax.grad(deviance)(th, cp, st, True)))
    True
    """
    lam = lam_from_theta(theta, structure)
    gs = solve_groups(lam, cp)
    pr = profile_normal(normal_equations(gs, cp), cp.nobs, reml)
    p = pr.beta.shape[0]
    is_reml = jnp.asarray(reml, dtype=theta.dtype)
    df = cp.nobs - p * is_reml
    ztz = cp.ztz
    k = jnp.sum(lam.T[None, :, :, None] * ztz[:, None, :, :], axis=2)               # Λᵀ ZᵀZ   (G, q, q)
    e = solve_lower(gs.chol, k)                                                       # L⁻¹ Λᵀ ZᵀZ
    rz = cp.ztx - jnp.sum(e[:, :, :, None] * gs.c[:, :, None, :], axis=1)             # Zᵀ V⁻¹ X (G, q, p)
    sz = cp.zty - jnp.sum(e * gs.d[:, :, None], axis=1) - jnp.sum(rz * pr.beta, axis=-1)  # Zᵀ V⁻¹ r
    ainv = solve_upper_t(pr.chol_a, solve_lower(pr.chol_a, jnp.eye(p, dtype=theta.dtype)))
    # H summed over groups: Σ ZᵀZ − Σ EᵀE − reml Σ (ZᵀV⁻¹X) A⁻¹ (ZᵀV⁻¹X)ᵀ − (df/r²) Σ (ZᵀV⁻¹r)(ZᵀV⁻¹r)ᵀ
    ra = jnp.sum(rz[:, :, :, None] * ainv[None, None, :, :], axis=2)                  # Zᵀ V⁻¹ X A⁻¹
    h = (jnp.sum(ztz, axis=0) - group_einsum("gij,gik->jk", e, e)
         - is_reml * group_einsum("gjp,gkp->jk", ra, rz) - (df / pr.r2) * group_einsum("gj,gk->jk", sz, sz))
    grad_lam = 2.0 * jnp.sum(h[:, :, None] * lam[None, :, :], axis=1)                 # 2 H Λ
    rows, cols, src = structure.theta_positions()
    grad = jnp.zeros_like(theta).at[src].add(grad_lam[rows, cols])
    return pr.deviance, grad


def deviance_given(ne: Normal, nobs: Array, beta: Array | None, sigma2: Array | None,
                   reml: bool | Array) -> Array:
    """−2ℓ from summed GLS pieces with β and/or σ² given instead of profiled (``None``: profiled).

    ML: ``log|V| + n log(2πσ²) + r²(β)/σ²``.  REML (β integrated out; a given β enters
    through ``r²(β)`` only, as statsmodels' non-profiled REML):
    ``log|V| + log|A| + (n−p) log(2πσ²) + r²(β)/σ²``.  With both profiled it is
    :func:`profile_normal`'s deviance: the one copy of this algebra for every backend.
    """
    p = ne.a.shape[0]
    chol_a = cholesky(ne.a)
    if beta is None:
        u = solve_lower(chol_a, ne.b)
        r2 = ne.yy - jnp.dot(u, u)
    else:
        r2 = ne.yy - 2.0 * jnp.dot(ne.b, beta) + beta @ ne.a @ beta
    is_reml = jnp.asarray(reml, dtype=r2.dtype)
    df = nobs - p * is_reml
    s2 = r2 / df if sigma2 is None else sigma2
    return ne.logdet_v + df * (LOG_2PI + jnp.log(s2)) + r2 / s2 + is_reml * logdet_from_cholesky(chol_a)


def deviance_at(
    lam: Array, beta: Array | None, sigma2: Array | None, cp: CrossProducts, reml: bool | Array
) -> Array:
    """:func:`deviance_given` at the per-group relative factor Λ."""
    return deviance_given(normal_equations(solve_groups(lam, cp), cp), cp.nobs, beta, sigma2, reml)


def loglike_packed(
    params: Array, cp: CrossProducts, structure: CovStructure, reml: bool, profile_fe: bool
) -> Array:
    """Log-likelihood at statsmodels-packed ``params`` (fe, cov_re/scale tril, vcomp/scale); σ² profiled.

    With ``profile_fe`` the fixed effects in ``params`` are ignored and replaced by
    their GLS estimate at the given covariance.
    """
    p = cp.xtx.shape[-1]
    cov_re1, vcomp1 = profile_from_packed_jax(params[p:], structure)
    lam = lam_from_profile_jax(cov_re1, vcomp1, structure)
    beta = None if profile_fe else params[:p]
    return -0.5 * deviance_at(lam, beta, None, cp, reml)


def loglike_natural(
    vparams: Array, beta: Array, cp: CrossProducts, structure: CovStructure, reml: bool | Array
) -> Array:
    """Log-likelihood in the natural parameterisation: ``vparams = (cov_re tril, vcomp, scale)``.

    Used for the standard errors of the variance parameters (observed information).
    """
    scale = vparams[-1]
    cov_re, vcomp = profile_from_packed_jax(vparams[:-1] / scale, structure)
    lam = lam_from_profile_jax(cov_re, vcomp, structure)
    return -0.5 * deviance_at(lam, beta, scale, cp, reml)


class Blups(NamedTuple):
    """Conditional modes ``b (G, q)`` and conditional covariances ``cov (G, q, q)`` (lme4's condVar)."""

    b: Array
    cov: Array


def _posterior(lam: Array, pr: Profiled) -> Blups:
    """``b̂_i = Λ M_i⁻¹ Λᵀ Z_iᵀ(y_i − X_i β̂)`` and ``Var(b_i | y) = σ² Λ M_i⁻¹ Λᵀ`` from a profiled fit."""
    gs = pr.groups
    # broadcast products and sums rather than einsum: q x q blocks are too small for matrix products
    u = solve_upper_t(gs.chol, gs.d - jnp.sum(gs.c * pr.beta, axis=-1))
    b = jnp.sum(lam * u[:, None, :], axis=-1)
    linv_lt = solve_lower(gs.chol, jnp.broadcast_to(lam.T, gs.chol.shape))  # L⁻¹ Λᵀ
    return Blups(b, pr.sigma2 * jnp.sum(linv_lt[:, :, :, None] * linv_lt[:, :, None, :], axis=1))


def blups(theta: Array, cp: CrossProducts, structure: CovStructure, reml: bool | Array) -> Blups:
    """BLUPs (conditional modes) and conditional covariances (lme4's condVar) at θ, β̂ held fixed."""
    lam = lam_from_theta(theta, structure)
    return _posterior(lam, profile_lam(lam, cp, reml))


def em_step(
    theta: Array, cp: CrossProducts, zmask: Array, structure: CovStructure, reml: bool | Array
) -> Array:
    """One EM update of θ (Laird & Ware 1982); see :func:`em_update`."""
    return em_update(theta, cp, zmask, structure, reml)[1]


def em_update(
    theta: Array, cp: CrossProducts, zmask: Array, structure: CovStructure, reml: bool | Array
) -> tuple[Array, Array]:
    """One EM update of θ (Laird & Ware 1982), β and σ² profiled at the current θ.

    E-step: ``E[b_i b_iᵀ | y] = b̂_i b̂_iᵀ + σ² Λ M_i⁻¹ Λᵀ``; M-step: the covariance
    of the correlated block is their mean over groups, each variance component
    the mean over the columns it has in each group (``zmask (G, q)`` marks them).
    A warm start only: monotone for ML, close to it for REML.  Returns the deviance
    at ``theta`` (computed on the way) and the updated θ.
    """
    lam = lam_from_theta(theta, structure)
    pr = profile_lam(lam, cp, reml)
    post = _posterior(lam, pr)
    second = post.b[:, :, None] * post.b[:, None, :] + post.cov
    real = (cp.n > 0).astype(theta.dtype)
    parts = []
    qr = structure.q_re
    if qr:
        psi = group_einsum("g,gij->ij", real, second[:, :qr, :qr]) / cp.ngroups / pr.sigma2
        if structure.re_diagonal:
            parts.append(jnp.sqrt(jnp.diag(psi)))
        else:
            r, c = structure.re_tril
            psi = psi + 1e-12 * jnp.eye(qr, dtype=psi.dtype)
            parts.append(cholesky(psi)[r, c])
    off = qr
    diag2 = jnp.diagonal(second, axis1=1, axis2=2)
    for size in structure.vc_sizes:
        m = zmask[:, off : off + size] * real[:, None]
        v = jnp.sum(diag2[:, off : off + size] * m) / jnp.maximum(jnp.sum(m), 1.0) / pr.sigma2
        parts.append(jnp.sqrt(v)[None])
        off += size
    return pr.deviance, jnp.concatenate(parts)
