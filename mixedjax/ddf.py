"""Small-sample denominator degrees of freedom for tests of fixed effects: Satterthwaite and Kenward–Roger.

Satterthwaite (lmerTest's construction, Kuznetsova et al. 2017): with variance
parameters ``φ = (θ, σ)`` (lme4's θ and the residual sd), ``Φ(φ) = σ² (X'V(θ)⁻¹X)⁻¹``
the covariance of β̂, ``A = 2 H⁻¹`` the asymptotic covariance of φ̂ (``H`` the Hessian
of the REML (or ML) deviance in φ, β profiled) and a contrast ``c``,

    df = 2 (cᵀΦc)² / (gᵀ A g),   g = ∂(cᵀΦ(φ)c)/∂φ,

where both the Hessian and the gradient are exact (JAX autodiff), not finite
differences as in lmerTest.  Multi-row contrasts use lmerTest's eigen-decomposition
rule (``get_Fstat_ddf``).

Kenward–Roger (Kenward & Roger 1997, as pbkrtest's ``vcovAdj`` and ``Lb_ddf``):
the covariance parameters are the natural, linear ones (``cov_re`` entries,
``vcomp``, the residual variance), with ``∂Σ/∂γ_r = Z D_r Zᵀ`` or ``diag(1/w)``; the
adjusted covariance ``Φ_A = Φ + 2 Φ U Φ`` and the df follow pbkrtest term by term.
Computed per group from the dense ``n_i × n_i`` blocks on the host (numpy), which is
fine for groups of up to a few hundred rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from .covariance import CovStructure, lam_from_theta
from .data import CrossProducts
from .likelihood import deviance_at, normal_equations, solve_groups
from .linalg import spd_inverse

if TYPE_CHECKING:
    from .results import MixedLMResults


def _vp_deviance(vp: jax.Array, cp: CrossProducts, structure: CovStructure, reml) -> jax.Array:
    """Deviance at ``vp = (θ, σ)`` with β profiled (lmerTest's ``devfun_vp``)."""
    lam = lam_from_theta(vp[:-1], structure)
    return deviance_at(lam, None, vp[-1] ** 2, cp, reml)


def _cov_beta(vp: jax.Array, cp: CrossProducts, structure: CovStructure) -> jax.Array:
    """``Φ(θ, σ) = σ² (X'V⁻¹X)⁻¹`` (V relative to σ²)."""
    lam = lam_from_theta(vp[:-1], structure)
    ne = normal_equations(solve_groups(lam, cp), cp)
    return vp[-1] ** 2 * spd_inverse(ne.a)


_hess_jit = jax.jit(jax.hessian(_vp_deviance), static_argnames=("structure",))
_jac_jit = jax.jit(jax.jacfwd(_cov_beta), static_argnames=("structure",))


def _cp_of(res: Any) -> CrossProducts:
    return getattr(res, "_cp", None) or res.model._cp


def _fstat_ddf(nu: np.ndarray, tol: float = 1e-8) -> float:
    """lmerTest's ``get_Fstat_ddf``: denominator df of a multi-df F from the per-eigenvector df."""
    nu = np.asarray(nu, dtype=float)
    if nu.size == 1:
        return float(nu[0])
    if np.all(np.abs(nu - nu[0]) < tol):
        return float(nu[0])
    if np.any(nu <= 2):
        return 2.0
    e = np.sum(nu / (nu - 2))
    return float(2 * e / (e - nu.size))


class Satterthwaite:
    """Satterthwaite's approximation at a fit; see the module docstring.  Build with :func:`satterthwaite`."""

    def __init__(self, res: MixedLMResults) -> None:
        if getattr(res, "residual_params", np.zeros(0)).size:
            raise NotImplementedError("Satterthwaite df are implemented for iid (optionally weighted) residuals only")
        st = res.model.structure
        cp = _cp_of(res)
        vp = jnp.asarray(np.concatenate([res.theta, [np.sqrt(res.scale)]]))
        h = np.asarray(_hess_jit(vp, cp, st, res.reml))
        try:
            self.cov_varpar = 2.0 * np.linalg.inv(h)
        except np.linalg.LinAlgError:
            self.cov_varpar = 2.0 * np.linalg.pinv(h)
        self.hessian = h
        jac = np.asarray(_jac_jit(vp, cp, st))  # (p, p, k)
        self.jacobian = np.moveaxis(jac, -1, 0)  # (k, p, p)
        self.cov_beta = res.cov_fe

    def ddf(self, c: np.ndarray) -> float:
        """Denominator df of the single contrast ``c`` (p,)."""
        c = np.asarray(c, dtype=float).reshape(-1)
        var = c @ self.cov_beta @ c
        g = np.einsum("i,kij,j->k", c, self.jacobian, c)
        return float(2.0 * var**2 / (g @ self.cov_varpar @ g))

    def ddf_multi(self, lmat: np.ndarray) -> float:
        """Denominator df of the F test of the rows of ``lmat`` (lmerTest's ``contestMD``)."""
        lmat = np.atleast_2d(lmat)
        w, v = np.linalg.eigh(lmat @ self.cov_beta @ lmat.T)
        nu = [self.ddf(v[:, m] @ lmat) for m in range(len(w))]
        return _fstat_ddf(np.array(nu))


def satterthwaite(res: MixedLMResults) -> Satterthwaite:
    """The (cached) :class:`Satterthwaite` of a fitted model."""
    cached = res.__dict__.get("_satterthwaite")
    if cached is None:
        cached = Satterthwaite(res)
        res.__dict__["_satterthwaite"] = cached
    return cached


# ------------------------------------------------------------------------------------------ Kenward–Roger
class KenwardRoger:
    """pbkrtest's ``vcovAdj`` and ``Lb_ddf`` at a fit.  Build with :func:`kenward_roger`.

    Attributes
    ----------
    cov_adjusted : (p, p) Kenward–Roger's adjusted covariance of β̂.
    """

    def __init__(self, res: MixedLMResults) -> None:
        m = res.model
        pad = m._padded
        x = np.asarray(pad.x, dtype=float)
        z = np.asarray(pad.z, dtype=float)
        mask = np.asarray(pad.mask, dtype=float)
        w = np.asarray(pad.w, dtype=float)
        if getattr(res, "residual_params", np.zeros(0)).size:
            raise NotImplementedError("Kenward-Roger is implemented for iid (optionally weighted) residuals only")
        x = x * mask[..., None]
        z = z * mask[..., None]
        st = m.structure
        cov_full = np.zeros((st.q, st.q))
        qr = st.q_re
        cov_full[:qr, :qr] = res.cov_re.to_numpy()
        # derivative matrices D_r of Cov(b) in the natural (linear) parameters
        d_mats = []
        r_idx, c_idx = st.re_tril
        for i, j in zip(r_idx, c_idx, strict=True):
            if st.re_diagonal and i != j:
                continue
            d = np.zeros((st.q, st.q))
            d[i, j] = d[j, i] = 1.0
            d_mats.append(d)
        off = qr
        for k, size in enumerate(st.vc_sizes):
            d = np.zeros((st.q, st.q))
            d[off: off + size, off: off + size] = np.eye(size)
            cov_full[off: off + size, off: off + size] = res.vcomp[k] * np.eye(size)
            d_mats.append(d)
            off += size
        resid = np.where(mask > 0, 1.0 / np.where(mask > 0, w, 1.0), 0.0)
        g_mats = [np.einsum("gni,ij,gmj->gnm", z, d, z) for d in d_mats]
        g_mats.append(np.einsum("gn,nm->gnm", resid, np.eye(resid.shape[1])))
        sigma = np.einsum("gni,ij,gmj->gnm", z, cov_full, z) + res.scale * g_mats[-1]
        sigma += np.einsum("gn,nm->gnm", 1.0 - mask, np.eye(mask.shape[1]))  # padding: identity, decoupled
        sinv = np.linalg.inv(sigma)
        sinv_x = sinv @ x
        sinv_g = [sinv @ g for g in g_mats]
        phi = res.cov_fe
        n_g = len(g_mats)
        pp = [-np.einsum("gni,gnj->ij", g @ sinv_x, sinv_x) for g in g_mats]
        qq = {}
        ktrace = np.zeros((n_g, n_g))
        for r in range(n_g):
            for s in range(r, n_g):
                qq[r, s] = np.einsum("gni,gnj->ij", g_mats[r] @ sinv_x, sinv_g[s] @ sinv_x)
                ktrace[r, s] = ktrace[s, r] = np.einsum("gnm,gmn->", sinv_g[r], sinv_g[s])
        ie2 = np.zeros((n_g, n_g))
        for i in range(n_g):
            for j in range(i, n_g):
                ie2[i, j] = ie2[j, i] = (ktrace[i, j] - 2 * np.sum(phi * qq[i, j])
                                         + np.sum((phi @ pp[i]) * (pp[j] @ phi)))
        ww = 2 * np.linalg.inv(ie2) if np.min(np.abs(np.linalg.eigvalsh(ie2))) > 1e-10 else 2 * np.linalg.pinv(ie2)
        uu = np.zeros_like(phi)
        for i in range(n_g - 1):
            for j in range(i + 1, n_g):
                uu += ww[i, j] * (qq[i, j] - pp[i] @ phi @ pp[j])
        uu = uu + uu.T
        for i in range(n_g):
            uu += ww[i, i] * (qq[i, i] - pp[i] @ phi @ pp[i])
        self.cov_adjusted = phi + 2 * phi @ uu @ phi
        self.cov_beta = phi
        self.p_mats, self.w_mat = pp, ww

    def ddf(self, lmat: np.ndarray) -> float:
        """Kenward–Roger denominator df for the contrast(s) ``lmat`` (pbkrtest's ``Lb_ddf``, q = rank)."""
        lmat = np.atleast_2d(lmat)
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
        df2 = 4 + (q + 2) / (q * rho - 1)
        return float(df2)


def kenward_roger(res: MixedLMResults) -> KenwardRoger:
    """The (cached) :class:`KenwardRoger` of a fitted model."""
    cached = res.__dict__.get("_kenward_roger")
    if cached is None:
        cached = KenwardRoger(res)
        res.__dict__["_kenward_roger"] = cached
    return cached
