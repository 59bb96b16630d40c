"""Functional API: a mixed-model fit as a pure, differentiable JAX function.

Everything here works inside ``jax.jit``, ``jax.vmap`` and ``jax.grad``:

* :func:`objective` — the profiled ML/REML deviance ``−2ℓ(θ)``;
* :func:`fit` — θ̂ (the backend's pure-JAX optimiser) and the quantities that follow
  from it (β̂, σ̂², the deviance), differentiable in the data (``y``, ``X``, ``Z``,
  the weights, or anything that produced them).

Both take ``(data, zmask, structure)`` as :func:`model_data` returns them, written once
against the likelihood backends (:mod:`mixedjax.backends`):

* per-group models with iid residuals: padded :class:`mixedjax.data.GroupedData`, the
  ``(G, q)`` random-effects column mask and the static
  :class:`mixedjax.covariance.CovStructure` (any JAX computation may build these three);
* every other model: the model's backend data, ``zmask`` (``None`` for crossed models)
  and the backend itself (:class:`mixedjax.backends.GroupedBackend` carrying the
  residual structure, or :class:`mixedjax.backends.CrossedBackend`).  θ is then the
  optimiser's vector ``concat(θ, ρ)``: structured residuals (VarIdent, AR(1)) are part
  of the likelihood, exactly as ``model.fit()`` fits them.  A new response enters
  through ``structure.with_response(data, y)`` (row order; differentiable in ``y``).

Derivatives of the fit use the implicit function theorem at the optimum, not
back-propagation through optimiser iterations: with ``g(θ, x) = ∇_θ f(θ, x) = 0``
at θ̂, ``dθ̂/dx = −H⁻¹ ∂g/∂x`` (``H`` the Hessian of the deviance in θ), applied as
a vector–Jacobian product (``jax.custom_vjp``).  At a singular (boundary) fit,
parameters on the boundary (a zero diagonal entry of a term's factor, i.e. a variance
of 0 or a correlation of ±1) are held fixed: their derivative is 0, and the others are
differentiated with them fixed — the derivative of the fit restricted to the
boundary face, which is what small perturbations of the data keep.  Integer leaves
of the data (level codes, row positions) get no derivative.

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

Structured residuals: the same call fits ρ with θ.

>>> o = mixedjax.datasets.load("orthodont")
>>> md = mixedjax.mixedlm("distance ~ age + Sex", o, groups="Subject", residual=mixedjax.VarIdent("Sex"))
>>> data, zmask, backend = F.model_data(md)
>>> round(-0.5 * float(F.fit(data, zmask, backend).deviance), 2)
-210.18
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from . import terms as tm
from .backends import GroupedBackend, GroupedModelData, deviance, profiled
from .covariance import CovStructure
from .data import GroupedData, cross_products
from .fit import start_theta
from .linalg import unbatched_lapack

if TYPE_CHECKING:
    from .model import LinearMixedModel

BOUNDARY_TOL = 1e-4  # lme4's isSingular() tolerance on the diagonal of θ


class FitResult(NamedTuple):
    """A fitted model as arrays: θ̂ (``concat(θ, ρ)``: lme4's relative factors, then any residual-structure
    parameters), β̂, σ̂², the deviance, and how it ended."""

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


def model_data(model: LinearMixedModel) -> tuple[Any, Array | None, Any]:
    """``(data, zmask, structure)`` of a model, the arguments of :func:`fit` and :func:`objective`.

    Per-group models with iid residuals: the padded :class:`mixedjax.data.GroupedData`,
    the ``(G, q)`` random-effects column mask and the :class:`CovStructure` (so
    ``data._replace(y=...)`` and friends work on the padded blocks).  Every other model:
    ``model.backend_data``, its column mask (``None`` for crossed models) and
    ``model.backend`` (which carries the residual structure).

    Examples
    --------
    >>> import mixedjax
    >>> d = mixedjax.datasets.load("penicillin")
    >>> r = mixedjax.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", d)
    >>> data, zmask, backend = model_data(r.model)
    >>> zmask is None, backend.kind, round(-0.5 * float(fit(data, zmask, backend).deviance), 4)
    (True, 'crossed', -165.4303)
    """
    backend, data = model.backend, model.rows_data()
    if isinstance(backend, GroupedBackend):
        if backend.residual is None:
            return data.padded, data.zmask, backend.structure
        return data, data.zmask, backend
    return data, None, backend


def _backend_and_data(data: Any, zmask: Array | None, structure: Any) -> tuple[Any, Any]:
    """The backend and its data for :func:`fit`'s arguments; per-group cross-products are formed here from the
    padded blocks, so derivatives reach the rows (and a replaced ``padded`` is never stale)."""
    if isinstance(structure, CovStructure):
        g, n = data.mask.shape
        empty = jnp.zeros(0, jnp.int32)
        return GroupedBackend(structure), GroupedModelData(data, cross_products(data), zmask,
                                                           jnp.zeros((g, n), jnp.int32), empty, empty, (), ())
    if isinstance(data, GroupedModelData):
        data = data._replace(cp=cross_products(data.padded), zmask=data.zmask if zmask is None else zmask)
    return structure, data


def _backend_of(structure: Any) -> Any:
    return GroupedBackend(structure) if isinstance(structure, CovStructure) else structure


def objective(theta: Array, data: GroupedData | Any, structure: Any, reml: bool | Array = True) -> Array:
    """Profiled deviance ``−2ℓ(θ)`` (ML) or REML criterion at ``theta`` (``concat(θ, ρ)``); pure and differentiable.

    Examples
    --------
    >>> import jax.numpy as jnp, mixedjax
    >>> d = mixedjax.datasets.load("sleepstudy")
    >>> data, zmask, st = model_data(mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject"))
    >>> round(float(objective(jnp.array([1.0]), data, st)), 3)
    1787.399
    """
    backend, bd = _backend_and_data(data, None, structure)
    return deviance(backend, theta, bd, reml)


def _normalize(theta: Array, backend: Any) -> Array:
    """:func:`mixedjax.terms.normalize_theta` of the random-effects part (traced); ρ unchanged."""
    n = backend.n_theta
    return jnp.concatenate([tm.normalize_theta(theta[:n], backend.terms), theta[n:]])


def _boundary(theta: Array, backend: Any) -> Array:
    diag = jnp.asarray(np.concatenate([tm.diagonal_theta(backend.terms), np.zeros(backend.n_rho, bool)]))
    return diag & (jnp.abs(theta) < BOUNDARY_TOL)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _theta_hat(data, zmask, theta0, structure, reml, maxiter, gtol, em_iter):
    backend, bd = _backend_and_data(data, zmask, structure)
    sol = backend.minimize_jax(theta0, bd, reml, maxiter, gtol, em_iter)
    return _normalize(sol.x, backend), sol.grad_norm, sol.result


def _theta_hat_fwd(data, zmask, theta0, structure, reml, maxiter, gtol, em_iter):
    out = _theta_hat(data, zmask, theta0, structure, reml, maxiter, gtol, em_iter)
    return out, (out[0], data, zmask, theta0)


def _float_leaves(tree: Any) -> tuple[list, Any, list[int]]:
    leaves, treedef = jax.tree.flatten(tree)
    idx = [i for i, a in enumerate(leaves) if jnp.issubdtype(jnp.result_type(a), jnp.inexact)]
    return leaves, treedef, idx


_solve = unbatched_lapack()(jnp.linalg.solve)  # no batched LAPACK under vmap on CPU


def _theta_hat_bwd(structure, reml, maxiter, gtol, em_iter, res, cot):
    theta, data, zmask, theta0 = res
    backend = _backend_of(structure)
    v = cot[0]
    leaves, treedef, idx = _float_leaves(data)

    def grad_theta(th, floats):
        full = list(leaves)
        for i, a in zip(idx, floats, strict=True):
            full[i] = a
        b, bd = _backend_and_data(jax.tree.unflatten(treedef, full), zmask, structure)
        return jax.grad(lambda t: deviance(b, t, bd, reml))(th)

    floats = [leaves[i] for i in idx]
    hess = jax.jacfwd(grad_theta)(theta, floats)
    free = ~_boundary(theta, backend)
    # restrict to the free parameters: boundary ones are held at the boundary (derivative 0)
    h = jnp.where(free[:, None] & free[None, :], hess, jnp.eye(theta.shape[0], dtype=theta.dtype))
    w = _solve(h, jnp.where(free, v, 0.0))
    w = jnp.where(free, w, 0.0)
    _, vjp = jax.vjp(lambda fl: grad_theta(theta, fl), floats)
    (d_floats,) = vjp(-w)
    d_leaves = [np.zeros(np.shape(a), dtype=jax.dtypes.float0) for a in leaves]
    for i, g in zip(idx, d_floats, strict=True):
        d_leaves[i] = g
    zeros = jax.tree.map(jnp.zeros_like, (zmask, theta0))
    return (jax.tree.unflatten(treedef, d_leaves), *zeros)


_theta_hat.defvjp(_theta_hat_fwd, _theta_hat_bwd)


def fit(
    data: GroupedData | Any,
    zmask: Array | None,
    structure: Any,
    reml: bool = True,
    theta0: Array | None = None,
    maxiter: int = 200,
    gtol: float = 1e-6,
    em_iter: int = 30,
) -> FitResult:
    """Fit a linear mixed model; differentiable in ``data`` by the implicit function theorem.

    Parameters
    ----------
    data : GroupedData or a backend's data
        Padded blocks ``y (G, n)``, ``x (G, n, p)``, ``z (G, n, q)``, ``w (G, n)``, ``mask (G, n)``
        with a :class:`CovStructure`, or the backend data of a model (:func:`model_data` gives
        either for a model; any JAX computation may produce them).
    zmask : (G, q) array or None
        Which random-effects columns each group really has (variance components);
        ``None`` for crossed models (or to keep the backend data's own mask).
    structure : CovStructure or backend
        Static description (hashable): a :class:`CovStructure` (per-group, iid residuals),
        or a likelihood backend (:class:`mixedjax.backends.GroupedBackend` with its residual
        structure, :class:`mixedjax.backends.CrossedBackend`).
    reml : bool
        REML (default) or ML; static here, since it selects the derivative's objective.
    theta0 : array, optional
        Start (``concat(θ, ρ)``); default lme4's θ (identity factors) and ρ = 0.
    maxiter, gtol, em_iter
        The backend's pure-JAX optimiser: BFGS iterations, tolerance on the largest
        gradient entry, EM warm-start steps (per-group models).

    Returns
    -------
    FitResult
        ``theta`` (``concat(θ, ρ)``, θ normalised: non-negative diagonal of each factor), ``beta``,
        ``sigma2``, ``deviance``, ``grad_norm``, ``result`` (a :class:`mixedjax.Result` code),
        ``on_boundary`` (per entry).  Gradients with respect to ``data`` flow through θ̂ by the implicit
        function theorem and through β̂(θ), σ̂²(θ) explicitly; boundary entries of θ̂ are held fixed
        (see the module docstring).

    Examples
    --------
    >>> import mixedjax
    >>> ox = mixedjax.datasets.load("oxboys")
    >>> md = mixedjax.mixedlm("height ~ age", ox, groups="Subject", residual=mixedjax.AR1(time="age"))
    >>> data, zmask, backend = model_data(md)
    >>> res = fit(data, zmask, backend)
    >>> round(-0.5 * float(res.deviance), 2), res.theta.shape
    (-340.32, (2,))

    Derivatives in the response: ``jax.grad(lambda y: fit(backend.with_response(data, y), zmask,
    backend).beta[1])(md.endog)``.
    """
    if theta0 is None:
        theta0 = jnp.asarray(start_theta(_backend_of(structure)))
    return _fit(data, zmask, jnp.asarray(theta0), structure, bool(reml), int(maxiter), float(gtol), int(em_iter))


@functools.partial(jax.jit, static_argnames=("structure", "reml", "maxiter", "gtol", "em_iter"))
def _fit(data: Any, zmask: Array | None, theta0: Array, structure: Any, reml: bool, maxiter: int, gtol: float,
         em_iter: int) -> FitResult:
    """:func:`fit` as one compiled program (its derivative too: the implicit-function VJP compiles with it)."""
    theta, gnorm, code = _theta_hat(data, zmask, theta0, structure, reml, maxiter, gtol, em_iter)
    b, bd = _backend_and_data(data, zmask, structure)
    pr = profiled(b, theta, bd, reml)
    return FitResult(theta, pr.beta, pr.sigma2, pr.deviance, gnorm, code, _boundary(theta, b))
