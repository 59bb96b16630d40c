"""Differentiable fits: implicit-function-theorem gradients against central finite differences.

Tolerance 1e-5 relative (issue 4): fits are polished to a gradient norm below 1e-10, so each fitted value
carries an error far below the finite-difference truncation error at the steps used here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixedjax
from mixedjax import functional as F


@pytest.fixture(scope="module")
def sleep():
    d = mixedjax.datasets.load("sleepstudy")
    return F.model_data(mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", re_formula="~Days"))


def _summary(res, c):
    """A scalar mixing every fitted quantity, so one gradient checks them all."""
    return (jnp.dot(c[:3], res.theta) + jnp.dot(c[3:5], res.beta) + c[5] * jnp.log(res.sigma2)
            + 1e-3 * c[6] * res.deviance)


def _check_fd(fun, x, idx, h, rtol=1e-5):
    grad = np.asarray(jax.grad(fun)(x))
    xs = np.asarray(x)
    for i in idx:
        e = np.zeros_like(xs)
        e[i] = h
        fd = (float(fun(jnp.asarray(xs + e))) - float(fun(jnp.asarray(xs - e)))) / (2 * h)
        assert abs(grad[i] - fd) <= rtol * max(abs(fd), 1e-3 * np.abs(grad).max()), (i, grad[i], fd)


@pytest.mark.parametrize("reml", [True, False])
def test_gradient_wrt_response(sleep, reml):
    data, zmask, st = sleep
    c = jnp.asarray(np.random.default_rng(0).normal(size=7))
    res = F.fit(data, zmask, st, reml=reml)
    assert float(res.grad_norm) < 1e-10 and bool(res.converged)
    fun = jax.jit(lambda y: _summary(F.fit(data._replace(y=y), zmask, st, reml=reml), c))
    rows = np.array([0, 3, 7, 11, 16])
    _check_fd(fun, data.y, [(r, k) for r, k in zip(rows, [0, 4, 9, 2, 5], strict=True)], h=1e-2)


def test_gradient_wrt_covariate_transform(sleep):
    """Parameters of a transform that produces X (and Z): x = a * Days + b."""
    data, zmask, st = sleep
    days = data.x[..., 1]
    c = jnp.asarray(np.random.default_rng(1).normal(size=7))

    def fun(ab):
        x = ab[0] * days + ab[1]
        design = jnp.stack([jnp.ones_like(x), x], axis=-1) * data.mask[..., None]
        return _summary(F.fit(data._replace(x=design, z=design), zmask, st), c)

    _check_fd(jax.jit(fun), jnp.array([1.3, 0.4]), [0, 1], h=1e-4)


def test_gradient_wrt_weights(sleep):
    data, zmask, st = sleep
    c = jnp.asarray(np.random.default_rng(2).normal(size=7))
    w0 = 1.0 + (jnp.arange(data.w.size).reshape(data.w.shape) % 3) * data.mask
    fun = jax.jit(lambda w: _summary(F.fit(data._replace(w=w), zmask, st), c))
    _check_fd(fun, w0, [(0, 0), (5, 3), (12, 8)], h=1e-4)


def test_grad_under_vmap_and_jit(sleep):
    data, zmask, st = sleep
    ys = data.y[None] + jnp.asarray(np.random.default_rng(3).normal(0, 10, (3,) + data.y.shape)) * data.mask

    def loss(y):
        return F.fit(data._replace(y=y), zmask, st).beta[1]

    grad = jax.jit(jax.grad(loss))
    grads = jax.jit(jax.vmap(grad))(ys)
    for k in range(3):
        np.testing.assert_allclose(grads[k], grad(ys[k]), rtol=1e-8, atol=1e-12)


def test_boundary_parameters_held_fixed():
    """Dyestuff2 is singular (θ̂ = 0): θ̂ stays 0 under small perturbations, so its derivative is 0."""
    d = mixedjax.datasets.load("dyestuff2")
    data, zmask, st = F.model_data(mixedjax.mixedlm("Yield ~ 1", d, groups="Batch"))
    res = F.fit(data, zmask, st)
    assert bool(res.on_boundary[0])
    def fun(y):
        r = F.fit(data._replace(y=y), zmask, st)
        return r.beta[0] + jnp.log(r.sigma2) + 10.0 * r.theta[0]

    g = jax.jit(jax.grad(lambda y: F.fit(data._replace(y=y), zmask, st).theta[0]))(data.y)
    assert np.all(np.asarray(g) == 0.0)
    _check_fd(jax.jit(fun), data.y, [(0, 0), (3, 2), (5, 4)], h=1e-4)


def test_objective_matches_model_loglike(sleep):
    data, zmask, st = sleep
    d = mixedjax.datasets.load("sleepstudy")
    r = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", re_formula="~Days").fit()
    assert float(F.objective(jnp.asarray(r.theta), data, st)) == pytest.approx(-2 * r.llf, rel=1e-12)
