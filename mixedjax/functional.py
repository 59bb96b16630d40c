"""Functional API: a mixed-model fit as a pure, differentiable JAX function.

Everything here works inside ``jax.jit``, ``jax.vmap`` and ``jax.grad``:

* :func:`objective` — the profiled ML/REML deviance ``−2ℓ(θ)`` of padded data;
* :func:`fit` — θ̂ (EM warm start, BFGS, polish) and the quantities that follow
  from it (β̂, σ̂², the deviance), differentiable in the data (``y``, ``X``, ``Z``,
  the weights, or anything that produced them).

Derivatives of the fit use the implicit function theorem at the optimum, not
back-propagation through optimiser iterations: with ``g(θ, x) = ∇_θ f(θ, x) = 0``
at θ̂, ``dθ̂/dx = −H⁻¹ ∂g/∂x`` (``H`` the Hessian of the deviance in θ), applied as
a vector–Jacobian product (``jax.custom_vjp``).  At a singular (boundary) fit,
parameters on the boundary (a zero diagonal entry of Λ, i.e. a variance of 0 or
a correlation of ±1) are held fixed: their derivative is 0, and the others are
differentiated with them fixed — the derivative of the fit restricted to the
boundary face, which is what small perturbations of the data keep.

Examples
--------
>>> import jax, jax.numpy as jnp, mixedjax
>>> from mixedjax import functional as F
>>> d = mixedjax.datasets.load("sleepstudy")
>>> data, zmask, structure = F.model_data(mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject"))
>>> res = F.fit(data, zmask, structure)
>>> round(float(res.beta[1]), 4)
10.4673
>>> dbeta_dy = jax.grad(lambda y: F.fit(data._replace(y=y), zmask, structure).beta[1])(data.y)
>>> dbeta_dy.shape == data.y.shape
True
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from .covariance import CovStructure
from .data import GroupedData, cross_products
from .likelihood import profile
from .model import fit_theta

if TYPE_CHECKING:
    from .model import MixedLM

BOUNDARY_TOL = 1e-4  # lme4's isSingular() tolerance on the diagonal of θ


class FitResult(NamedTuple):
    """A fitted model as arrays: θ̂ (lme4's relative Cholesky factor), β̂, σ̂², the deviance, and how it ended."""

    theta: Array
    beta: Array
    sigma2: Array
    deviance: Array
    grad_norm: Array
    result: Array
    on_boundary: Array

    @property
    def converged(self) -> Array:
        return self.result <= 1


def model_data(model: MixedLM) -> tuple[GroupedData, Array, CovStructure]:
    """The padded data pytree, random-effects column mask and static structure of a :class:`MixedLM`."""
    return model._padded, model._zmask, model.structure


def objective(theta: Array, data: GroupedData, structure: CovStructure, reml: bool | Array = True) -> Array:
    """Profiled deviance ``−2ℓ(θ)`` (ML) or REML criterion of padded ``data``; pure and differentiable."""
    return profile(theta, cross_products(data), structure, reml).deviance


def _normalize(theta: Array, structure: CovStructure) -> Array:
    """Flip column signs of Λ so its diagonal is non-negative (Λ Λᵀ unchanged), inside JAX."""
    if structure.re_diagonal or structure.q_re == 0:
        return jnp.abs(theta)
    r, c = structure.re_tril
    ntri = len(r)
    sign_col = jnp.where(theta[:ntri][r == c] < 0, -1.0, 1.0)  # one sign per column, in column order
    re = theta[:ntri] * sign_col[c]
    return jnp.concatenate([re, jnp.abs(theta[ntri:])])


def _boundary(theta: Array, structure: CovStructure) -> Array:
    diag = jnp.asarray(structure.diagonal_theta())
    return diag & (jnp.abs(theta) < BOUNDARY_TOL)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _theta_hat(data, zmask, theta0, structure, reml, maxiter, gtol, em_iter):
    sol = fit_theta(theta0, cross_products(data), zmask, structure, reml=reml, maxiter=maxiter, gtol=gtol,
                    em_iter=em_iter)
    return _normalize(sol.x, structure), sol.grad_norm, sol.result


def _theta_hat_fwd(data, zmask, theta0, structure, reml, maxiter, gtol, em_iter):
    out = _theta_hat(data, zmask, theta0, structure, reml, maxiter, gtol, em_iter)
    return out, (out[0], data, zmask, theta0)


def _theta_hat_bwd(structure, reml, maxiter, gtol, em_iter, res, cot):
    theta, data, zmask, theta0 = res
    v = cot[0]

    def grad_theta(th, d):
        return jax.grad(objective)(th, d, structure, reml)

    hess = jax.jacfwd(grad_theta)(theta, data)
    fixed = _boundary(theta, structure)
    free = ~fixed
    # restrict to the free parameters: boundary ones are held at the boundary (derivative 0)
    h = jnp.where(free[:, None] & free[None, :], hess, jnp.eye(theta.shape[0], dtype=theta.dtype))
    w = jnp.linalg.solve(h, jnp.where(free, v, 0.0))
    w = jnp.where(free, w, 0.0)
    _, vjp = jax.vjp(lambda d: grad_theta(theta, d), data)
    (d_data,) = vjp(-w)
    zeros = jax.tree.map(jnp.zeros_like, (zmask, theta0))
    return (d_data, *zeros)


_theta_hat.defvjp(_theta_hat_fwd, _theta_hat_bwd)


def fit(
    data: GroupedData,
    zmask: Array,
    structure: CovStructure,
    reml: bool = True,
    theta0: Array | None = None,
    maxiter: int = 200,
    gtol: float = 1e-6,
    em_iter: int = 30,
) -> FitResult:
    """Fit a linear mixed model to padded ``data``; differentiable in ``data`` by the implicit function theorem.

    Parameters
    ----------
    data : GroupedData
        Padded blocks ``y (G, n)``, ``x (G, n, p)``, ``z (G, n, q)``, ``w (G, n)``, ``mask (G, n)``
        (:func:`model_data` gives them for a :class:`MixedLM`; any JAX computation may produce them).
    zmask : (G, q) array
        Which random-effects columns each group really has (variance components).
    structure : CovStructure
        Static description of θ (hashable).
    reml : bool
        REML (default) or ML; static here, since it selects the derivative's objective.

    Returns
    -------
    FitResult
        ``theta`` (normalised: non-negative diagonal of Λ), ``beta``, ``sigma2``, ``deviance``,
        ``grad_norm``, ``result`` (a :class:`mixedjax.Result` code), ``on_boundary`` (per θ entry).
        Gradients with respect to ``data`` flow through θ̂ by the implicit function theorem and through
        β̂(θ), σ̂²(θ) explicitly; boundary entries of θ̂ are held fixed (see the module docstring).
    """
    if theta0 is None:
        theta0 = jnp.asarray(structure.theta_start(), dtype=data.y.dtype)
    theta, gnorm, code = _theta_hat(data, zmask, theta0, structure, bool(reml), int(maxiter), float(gtol),
                                    int(em_iter))
    pr = profile(theta, cross_products(data), structure, reml)
    return FitResult(theta, pr.beta, pr.sigma2, pr.deviance, gnorm, code, _boundary(theta, structure))
