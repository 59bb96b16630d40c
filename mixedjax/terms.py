"""The layout of θ over random-effects terms, shared by every likelihood backend.

Each random-effects term ``k`` has ``q_k`` columns per level and a relative
covariance factor ``T_k`` (``q_k x q_k``, lower triangular; diagonal for
independent columns), so that the covariance of one level's random effects is
``σ² T_k T_kᵀ``.  θ is the concatenation, term by term, of the row-major lower
triangles of the ``T_k`` (only the diagonal for a diagonal term): lme4's θ, up to
its column-major order.  Both backends (:mod:`mixedjax.backends`) read θ through
these functions, so sign normalisation, starting values and the boundary mask
exist once.

Examples
--------
>>> import numpy as np
>>> terms = (TermSpec(2), TermSpec(1))
>>> n_theta(terms), diagonal_theta(terms).tolist()
(4, [True, False, True, True])
>>> normalize_theta(np.array([-1.0, 0.5, 2.0, -3.0]), terms).tolist()
[1.0, -0.5, 2.0, 3.0]
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from .linalg import cholesky


class TermSpec(NamedTuple):
    """Static shape of one random-effects term: ``q`` columns, ``diagonal`` (independent columns)."""

    q: int
    diagonal: bool = False

    @property
    def n_theta(self) -> int:
        return self.q if self.diagonal else self.q * (self.q + 1) // 2

    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, cols)`` in ``T`` of this term's θ entries, in θ order."""
        if self.diagonal:
            return np.arange(self.q), np.arange(self.q)
        return np.tril_indices(self.q)


def n_theta(terms: tuple[TermSpec, ...]) -> int:
    return sum(t.n_theta for t in terms)


def theta_slices(terms: tuple[TermSpec, ...]) -> list[slice]:
    out, off = [], 0
    for t in terms:
        out.append(slice(off, off + t.n_theta))
        off += t.n_theta
    return out


def diagonal_theta(terms: tuple[TermSpec, ...]) -> np.ndarray:
    """Which entries of θ sit on a diagonal (a standard deviation; 0 on the boundary)."""
    return np.concatenate([t.positions()[0] == t.positions()[1] for t in terms]) if terms else np.zeros(0, bool)


def theta_start(terms: tuple[TermSpec, ...]) -> np.ndarray:
    """lme4's start: every ``T_k`` the identity."""
    return diagonal_theta(terms).astype(float)


def factors(theta: Array, terms: tuple[TermSpec, ...]) -> list[Array]:
    """The ``T_k`` of every term from θ (JAX, differentiable)."""
    out = []
    for t, sl in zip(terms, theta_slices(terms), strict=True):
        r, c = t.positions()
        out.append(jnp.zeros((t.q, t.q), theta.dtype).at[r, c].set(theta[sl]))
    return out


def factors_np(theta: np.ndarray, terms: tuple[TermSpec, ...]) -> list[np.ndarray]:
    """:func:`factors` on the host (numpy)."""
    theta = np.asarray(theta, float)
    out = []
    for t, sl in zip(terms, theta_slices(terms), strict=True):
        f = np.zeros((t.q, t.q))
        f[t.positions()] = theta[sl]
        out.append(f)
    return out


def theta_from_factors(fs: list[np.ndarray], terms: tuple[TermSpec, ...]) -> np.ndarray:
    """Inverse of :func:`factors_np` (reads the lower triangle, or the diagonal, of each factor)."""
    parts = [np.asarray(f, float)[t.positions()] for f, t in zip(fs, terms, strict=True)]
    return np.concatenate(parts) if parts else np.zeros(0)


def normalize_theta(theta: Any, terms: tuple[TermSpec, ...]) -> Any:
    """Flip column signs of each ``T_k`` so its diagonal is non-negative (lme4's convention); ``T Tᵀ`` unchanged.

    The one sign normalisation of mixedjax: the deviance is invariant to these flips,
    so an optimiser may end on either sign.  Numpy in, numpy out; a JAX array (traced
    too, e.g. inside :func:`mixedjax.functional.fit`) gives a JAX array.
    """
    if isinstance(theta, jax.Array):
        parts = []
        for f, t in zip(factors(theta, terms), terms, strict=True):
            parts.append((f * jnp.where(jnp.diagonal(f) < 0, -1.0, 1.0)[None, :])[t.positions()])
        return jnp.concatenate(parts) if parts else theta
    fs = factors_np(theta, terms)
    return theta_from_factors([f * np.where(np.diag(f) < 0, -1.0, 1.0)[None, :] for f in fs], terms)


def covariances(theta: np.ndarray, sigma2: float, terms: tuple[TermSpec, ...]) -> list[np.ndarray]:
    """Natural-scale covariance ``σ² T_k T_kᵀ`` of each term (host side)."""
    return [sigma2 * f @ f.T for f in factors_np(theta, terms)]


def factor_from_cov(cov: Array, term: TermSpec) -> Array:
    """``T`` with ``T Tᵀ = cov`` inside JAX (a semidefinite Cholesky; square roots for a diagonal term)."""
    if term.diagonal or term.q == 1:
        d = jnp.diagonal(cov)
        pos = d > 0
        # a variance of exactly 0 (a boundary estimate): factor 0, with finite derivatives in everything else
        return jnp.diag(jnp.where(pos, jnp.sqrt(jnp.where(pos, d, 1.0)), 0.0))
    return cholesky(cov, semidefinite=True)


def tril_of(cov: Array, term: TermSpec) -> Array:
    """This term's natural-scale parameters: the lower triangle (or diagonal) of its covariance."""
    r, c = term.positions()
    return cov[r, c]


def cov_from_tril(v: Array, term: TermSpec) -> Array:
    """Inverse of :func:`tril_of`: the symmetric covariance of a term from its parameters (JAX)."""
    r, c = term.positions()
    return jnp.zeros((term.q, term.q), v.dtype).at[r, c].set(v).at[c, r].set(v)
