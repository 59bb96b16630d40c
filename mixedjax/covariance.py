"""Covariance parameterisations of the random effects.

Three parameterisations of the seed (statsmodels MixedLM) coexist:

* natural: ``cov_re`` (q_re x q_re) and ``vcomp`` (one variance per variance
  component), in the units of the data;
* profile: ``cov_re / scale`` and ``vcomp / scale``, the ones statsmodels packs
  into ``params`` after the fixed effects;
* square root: ``theta``, the packed lower triangle of the relative covariance
  factor ``lam`` (Λ, with ``Λ Λᵀ = cov_re / scale``) and, per variance component,
  its relative standard deviation.  The optimiser works on ``theta`` (lme4's
  parameterisation), which is unconstrained: flipping the sign of a column of Λ
  leaves Λ Λᵀ unchanged, so a boundary (singular) optimum is an interior point
  with a zero diagonal entry.

A :class:`CovStructure` is static (hashable) metadata: where each entry of
``theta`` goes in the per-group Λ (q x q, block diagonal: the correlated block
first, then one scaled identity block per variance component).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
from jax import Array

from .linalg import cholesky


@dataclass(frozen=True)
class CovStructure:
    """Where each entry of ``theta`` goes in the per-group relative factor Λ.

    Parameters
    ----------
    q_re : int
        Size of the correlated random-effects block (``exog_re`` columns).
    re_diagonal : bool
        If true the block is diagonal (independent random effects, lme4's ``||``).
    vc_sizes : tuple of int
        Number of (padded) columns per group of each variance component.
    re_names, vc_names : tuple of str
        Names of the ``exog_re`` columns and of the variance components.

    Examples
    --------
    >>> s = CovStructure(q_re=2, vc_sizes=(3,), re_names=("Group", "Time"), vc_names=("cask",))
    >>> s.q, s.n_theta
    (5, 4)
    """

    q_re: int
    re_diagonal: bool = False
    vc_sizes: tuple[int, ...] = ()
    re_names: tuple[str, ...] = ()
    vc_names: tuple[str, ...] = ()

    @property
    def q(self) -> int:
        """Columns of the per-group random-effects design."""
        return self.q_re + sum(self.vc_sizes)

    @property
    def n_vc(self) -> int:
        return len(self.vc_sizes)

    @property
    def re_tril(self) -> tuple[np.ndarray, np.ndarray]:
        """Row-major lower-triangle indices of the correlated block (statsmodels' order)."""
        return np.tril_indices(self.q_re)

    @property
    def n_re_theta(self) -> int:
        return self.q_re if self.re_diagonal else self.q_re * (self.q_re + 1) // 2

    @property
    def n_theta(self) -> int:
        return self.n_re_theta + self.n_vc

    @property
    def n_cov_params(self) -> int:
        """Variance parameters in statsmodels' packing (full lower triangle + components)."""
        return self.q_re * (self.q_re + 1) // 2 + self.n_vc

    def theta_positions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(rows, cols, src)``: Λ[rows[k], cols[k]] = theta[src[k]]."""
        rows, cols, src = [], [], []
        if self.re_diagonal:
            for j in range(self.q_re):
                rows.append(j)
                cols.append(j)
                src.append(j)
        else:
            r, c = self.re_tril
            rows += list(r)
            cols += list(c)
            src += list(range(len(r)))
        off = self.q_re
        for k, size in enumerate(self.vc_sizes):
            for j in range(size):
                rows.append(off + j)
                cols.append(off + j)
                src.append(self.n_re_theta + k)
            off += size
        return np.array(rows, int), np.array(cols, int), np.array(src, int)

    def diagonal_theta(self) -> np.ndarray:
        """Boolean mask: which entries of ``theta`` sit on the diagonal of Λ."""
        mask = np.ones(self.n_theta, bool)
        if not self.re_diagonal:
            r, c = self.re_tril
            mask[: len(r)] = r == c
        return mask

    def theta_start(self) -> np.ndarray:
        """lme4's starting value: identity Λ."""
        return self.diagonal_theta().astype(float)

    def theta_names(self) -> list[str]:
        names = []
        if self.re_diagonal:
            names += [f"{n}" for n in self.re_names]
        else:
            r, c = self.re_tril
            names += [
                self.re_names[i] if i == j else f"{self.re_names[j]} x {self.re_names[i]}"
                for i, j in zip(r, c, strict=True)
            ]
        return names + list(self.vc_names)

    def cov_param_names(self) -> list[str]:
        """statsmodels' names for the variance rows: ``Group Var``, ``Group x Time Cov``, ``cask Var``."""
        r, c = self.re_tril
        names = [
            f"{self.re_names[i]} Var" if i == j else f"{self.re_names[j]} x {self.re_names[i]} Cov"
            for i, j in zip(r, c, strict=True)
        ]
        return names + [f"{n} Var" for n in self.vc_names]


def lam_from_theta(theta: Array, structure: CovStructure) -> Array:
    """Relative covariance factor Λ (q x q) from ``theta`` (n_theta,)."""
    rows, cols, src = structure.theta_positions()
    lam = jnp.zeros((structure.q, structure.q), dtype=theta.dtype)
    return lam.at[rows, cols].set(theta[src])


def theta_to_profile(theta: np.ndarray, structure: CovStructure) -> tuple[np.ndarray, np.ndarray]:
    """``(cov_re / scale, vcomp / scale)`` from ``theta`` (numpy, host side)."""
    theta = np.asarray(theta, dtype=float)
    q = structure.q_re
    lam = np.zeros((q, q))
    if structure.re_diagonal:
        lam[np.arange(q), np.arange(q)] = theta[:q]
    else:
        r, c = structure.re_tril
        lam[r, c] = theta[: len(r)]
    vc = theta[structure.n_re_theta :] ** 2
    return lam @ lam.T, vc


def psd_cholesky_np(a: np.ndarray) -> np.ndarray:
    """Lower factor ``l`` with ``l lᵀ = a`` for symmetric positive semidefinite ``a`` (host side).

    Raises ``ValueError`` when ``a`` is not positive semidefinite.
    """
    a = np.asarray(a, dtype=float)
    if a.size == 0:
        return a.copy()
    if not np.allclose(a, a.T, rtol=1e-10, atol=1e-12 * max(1.0, np.abs(a).max())):
        raise ValueError("covariance matrix is not symmetric")
    w = np.linalg.eigvalsh(a)
    if w.min() < -1e-10 * max(1.0, w.max()):
        raise ValueError(f"covariance matrix is not positive semidefinite (smallest eigenvalue {w.min():.3g})")
    try:
        return np.linalg.cholesky(a)
    except np.linalg.LinAlgError:
        # semidefinite: the unrolled factor gives zero columns for dependent directions
        return np.asarray(cholesky(jnp.asarray(a), semidefinite=True))


def profile_to_theta(cov_re1: np.ndarray, vcomp1: np.ndarray, structure: CovStructure) -> np.ndarray:
    """``theta`` from the profile parameterisation (host side; inverse of :func:`theta_to_profile`)."""
    cov_re1 = np.atleast_2d(np.asarray(cov_re1, dtype=float)).reshape(structure.q_re, structure.q_re)
    vcomp1 = np.asarray(vcomp1, dtype=float).reshape(-1)
    if np.any(vcomp1 < 0):
        raise ValueError(f"variance components must be non-negative, got {vcomp1}")
    if structure.re_diagonal:
        if np.any(np.abs(cov_re1 - np.diag(np.diag(cov_re1))) > 0):
            raise ValueError("this model has independent random effects: cov_re must be diagonal")
        re = np.sqrt(np.clip(np.diag(cov_re1), 0, None))
    else:
        lam = psd_cholesky_np(cov_re1)
        r, c = structure.re_tril
        re = lam[r, c]
    return np.concatenate([re, np.sqrt(vcomp1)])


def pack_params(fe: np.ndarray, cov_re1: np.ndarray, vcomp1: np.ndarray, structure: CovStructure) -> np.ndarray:
    """statsmodels' packing: fe_params, lower triangle (row-major) of cov_re/scale, vcomp/scale."""
    r, c = structure.re_tril
    cov_re1 = np.atleast_2d(np.asarray(cov_re1, dtype=float)).reshape(structure.q_re, structure.q_re)
    return np.concatenate([np.asarray(fe, float).ravel(), cov_re1[r, c], np.asarray(vcomp1, float).ravel()])


def unpack_params(params: np.ndarray, k_fe: int, structure: CovStructure) -> tuple[np.ndarray, ...]:
    """Inverse of :func:`pack_params`: ``(fe, cov_re1, vcomp1)``."""
    params = np.asarray(params, dtype=float).ravel()
    expected = k_fe + structure.n_cov_params
    if params.size != expected:
        raise ValueError(f"params has {params.size} entries; this model packs {expected} "
                         f"({k_fe} fixed effects, {structure.n_cov_params} variance parameters)")
    fe = params[:k_fe]
    r, c = structure.re_tril
    ntri = len(r)
    cov = np.zeros((structure.q_re, structure.q_re))
    cov[r, c] = params[k_fe : k_fe + ntri]
    cov[c, r] = params[k_fe : k_fe + ntri]
    vc = params[k_fe + ntri :]
    return fe, cov, vc


def profile_from_packed_jax(vparams: Array, structure: CovStructure) -> tuple[Array, Array]:
    """JAX version of the variance part of :func:`unpack_params` (differentiable)."""
    r, c = structure.re_tril
    ntri = len(r)
    cov = jnp.zeros((structure.q_re, structure.q_re), dtype=vparams.dtype)
    cov = cov.at[r, c].set(vparams[:ntri]).at[c, r].set(vparams[:ntri])
    return cov, vparams[ntri:]


def lam_from_profile_jax(cov_re1: Array, vcomp1: Array, structure: CovStructure) -> Array:
    """Λ from the profile parameterisation inside JAX (differentiable where cov_re1 is positive definite)."""
    q = structure.q
    lam = jnp.zeros((q, q), dtype=cov_re1.dtype)
    if structure.q_re:
        if structure.re_diagonal:
            block = jnp.diag(jnp.sqrt(jnp.diag(cov_re1)))
        else:
            block = cholesky(cov_re1, semidefinite=True)
        lam = lam.at[: structure.q_re, : structure.q_re].set(block)
    off = structure.q_re
    for k, size in enumerate(structure.vc_sizes):
        idx = jnp.arange(off, off + size)
        lam = lam.at[idx, idx].set(jnp.sqrt(vcomp1[k]))
        off += size
    return lam
