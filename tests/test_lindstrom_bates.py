"""The closed-form Lindstrom–Bates derivatives against JAX autodiff of the likelihood.

``mixedjax.lindstrom_bates`` is dense numpy, written from the formulas; the JAX
side is ``jax.grad`` / ``jax.hessian`` of ``mixedjax.likelihood.loglike_packed``
(Woodbury on cross-products, an unrolled Cholesky of Ψ).  The two share nothing
but the model, so agreement at many random Ψ checks both.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import mixedjax
from mixedjax import lindstrom_bates as lb
from mixedjax.covariance import CovStructure, unpack_params
from mixedjax.likelihood import loglike_packed

N_POINTS = 20
# Both sides are float64 with O(1)-conditioned V_i and Ψ; the observed
# discrepancies are <= 1e-12 relative (most ~1e-14), so 1e-8 leaves a wide margin while still
# catching any missing or mis-signed term (those are O(1) relative errors).
RTOL = 1e-8


@functools.partial(jax.jit, static_argnames=("structure",))
def _jax_derivatives(points, cp, structure):
    """Value, gradient and Hessian of the ML and the REML objective at each row of ``points (N, k_fe + K)``.

    One jitted function for both criteria: XLA compilation of the Hessian is
    the bulk of this module's runtime, and one compile per model halves it.
    """

    def at(params):
        out = {}
        for reml in (False, True):
            # profile_fe=True: the fixed-effects entries are ignored (β̂ is GLS at Ψ)
            def loglike(p, reml=reml):
                return loglike_packed(p, cp, structure, reml, True)

            out[reml] = (loglike(params), jax.grad(loglike)(params), jax.hessian(loglike)(params))
        return out

    return jax.vmap(at)(points)


# ----------------------------------------------------------------- models
def _groups(rng, n_groups, lo, hi):
    sizes = rng.integers(lo, hi + 1, n_groups)
    return np.repeat(np.arange(n_groups), sizes)


def _random_intercept():
    rng = np.random.default_rng(101)
    g = _groups(rng, 9, 2, 8)
    n = len(g)
    x = np.column_stack([np.ones(n), rng.normal(size=n)])
    y = x @ [1.0, 0.5] + rng.normal(size=9)[g] + rng.normal(size=n)
    return mixedjax.MixedLM(y, x, g)


def _intercept_slope(weights=False):
    rng = np.random.default_rng(202 if not weights else 505)
    g = _groups(rng, 10, 1, 9)
    n = len(g)
    t = rng.uniform(0, 3, n)
    x = np.column_stack([np.ones(n), t])
    b = rng.normal(size=(10, 2)) @ np.array([[1.0, 0.3], [0.0, 0.5]])
    w = rng.uniform(0.2, 3.0, n) if weights else None
    e = rng.normal(size=n) / (np.sqrt(w) if weights else 1.0)
    y = x @ [2.0, -1.0] + b[g, 0] + b[g, 1] * t + e
    return mixedjax.MixedLM(y, x, g, exog_re=x, weights=w)


def _three_correlated():
    rng = np.random.default_rng(303)
    g = _groups(rng, 12, 3, 10)
    n = len(g)
    t = rng.uniform(-1, 1, n)
    s = rng.normal(size=n)
    x = np.column_stack([np.ones(n), t, s])
    z = np.column_stack([np.ones(n), t, t**2])
    y = x @ [1.0, 0.2, -0.4] + np.sum(rng.normal(size=(12, 3))[g] * z, axis=1) + rng.normal(size=n)
    return mixedjax.MixedLM(y, x, g, exog_re=z)


def _variance_components():
    # Pastes-like: batches (groups), three casks within each, two samples per cask;
    # one batch lacks cask "c", so its padded column of the component is empty.
    rng = np.random.default_rng(404)
    rows = [(b, c) for b in range(8) for c in "abc" for _ in range(2) if not (b == 3 and c == "c")]
    df = pd.DataFrame(rows, columns=["batch", "cask"])
    df["x"] = rng.normal(size=len(df))
    cask_effect = {(b, c): rng.normal(0, 0.8) for b in range(8) for c in "abc"}
    df["y"] = (1.0 + 0.3 * df["x"] + rng.normal(size=8)[df["batch"]]
               + [cask_effect[bc] for bc in zip(df["batch"], df["cask"], strict=True)]
               + rng.normal(0, 0.5, len(df)))
    return mixedjax.mixedlm("y ~ x", df, groups="batch", vc_formula={"cask": "0 + C(cask)"})


CASES = {
    "random_intercept": _random_intercept,
    "intercept_slope": _intercept_slope,
    "three_correlated": _three_correlated,
    "variance_components": _variance_components,
    "weighted": functools.partial(_intercept_slope, weights=True),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """``(name, model, per-group blocks, points (N, K), autodiff results by reml)``, built once per case."""
    name = request.param
    model = CASES[name]()
    points = _random_psi_points(model.structure, N_POINTS, seed=zlib.crc32(name.encode()))
    full = np.concatenate([np.zeros((N_POINTS, model.k_fe)), points], axis=1)
    autodiff = jax.device_get(_jax_derivatives(jnp.asarray(full), model.backend_data.cp, model.structure))
    return name, model, lb.group_blocks(model), points, autodiff


def _random_psi_points(structure, n, seed):
    """``n`` packed variance vectors with a positive definite Ψ: random Cholesky factors, positive vcomps."""
    rng = np.random.default_rng(seed)
    q = structure.q_re
    r, c = structure.re_tril
    out = []
    for _ in range(n):
        chol = np.tril(rng.normal(0.0, 0.6, (q, q)), -1) + np.diag(rng.uniform(0.3, 1.5, q))
        vc = rng.uniform(0.05, 2.0, structure.n_vc)
        out.append(np.concatenate([(chol @ chol.T)[r, c], vc]))
    return np.array(out)


# ------------------------------------------------------------------ tests
def test_structures(case):
    """The cases cover what they claim (guards against a fixture silently changing)."""
    name, model, *_ = case
    st = model.structure
    expected = {
        "random_intercept": (1, ()),
        "intercept_slope": (2, ()),
        "three_correlated": (3, ()),
        "variance_components": (1, (3,)),
        "weighted": (2, ()),
    }[name]
    assert (st.q_re, st.vc_sizes) == expected
    if name == "weighted":
        assert np.ptp(model.weights) > 1.0
    if name == "variance_components":
        _, _, zs, _ = lb.group_blocks(model)
        assert any(np.all(z[:, -1] == 0) for z in zs)  # the batch without cask "c"


@pytest.mark.parametrize("reml", [False, True], ids=["ml", "reml"])
def test_closed_form_matches_autodiff(case, reml):
    name, model, (ys, xs, zs, ws), points, autodiff = case
    st = model.structure
    k_fe = model.k_fe
    values, grads, hessians = autodiff[reml]

    assert np.all(grads[:, :k_fe] == 0.0)  # fe entries are ignored when profile_fe=True
    for i, theta in enumerate(points):
        ll = lb.profiled_loglike(theta, ys, xs, zs, ws, st, reml)
        g = lb.score(theta, ys, xs, zs, ws, st, reml)
        h = lb.hessian(theta, ys, xs, zs, ws, st, reml)
        np.testing.assert_allclose(ll, values[i], rtol=1e-11, err_msg=f"loglike at point {i}")
        g_jax = grads[i, k_fe:]
        h_jax = hessians[i, k_fe:, k_fe:]
        assert np.max(np.abs(g - g_jax)) <= RTOL * np.max(np.abs(g_jax)), (i, g, g_jax)
        assert np.max(np.abs(h - h_jax)) <= RTOL * np.max(np.abs(h_jax)), (i, h, h_jax)
        np.testing.assert_allclose(h, h.T, rtol=0, atol=1e-12 * np.max(np.abs(h)))


def test_score_zero_at_the_fit():
    """At an interior REML optimum the closed-form score vanishes (to the optimiser's tolerance)."""
    model = _intercept_slope()
    res = model.fit(reml=True, gtol=1e-9)
    assert res.converged and not res.singular
    ys, xs, zs, ws = lb.group_blocks(model)
    theta = res.params.to_numpy()[model.k_fe:]
    g = lb.score(theta, ys, xs, zs, ws, model.structure, reml=True)
    h = lb.hessian(theta, ys, xs, zs, ws, model.structure, reml=True)
    assert np.max(np.abs(g)) < 1e-5 * np.max(np.abs(h))
    assert np.all(np.linalg.eigvalsh(h) < 0)  # a maximum


def test_basis_reconstructs_psi():
    st = CovStructure(q_re=3, vc_sizes=(2, 1))
    rng = np.random.default_rng(7)
    theta = rng.normal(size=st.n_cov_params)
    psi = lb.psi_from_packed(theta, st)
    _, cov, vc = unpack_params(theta, 0, st)
    np.testing.assert_array_equal(psi[:3, :3], cov)
    np.testing.assert_array_equal(np.diag(psi)[3:], [vc[0], vc[0], vc[1]])
    assert np.count_nonzero(psi[3:, :3]) == 0
    assert np.count_nonzero(psi[3:, 3:] - np.diag(np.diag(psi)[3:])) == 0


def test_bad_params_raise():
    st = CovStructure(q_re=2)
    with pytest.raises(ValueError, match="packs 3"):
        lb.psi_from_packed(np.ones(2), st)



def _wide_components():
    # q = 1 + 7 > linalg.SCALAR_UNROLL_MAX: the matrix (not entry-wise) Cholesky path
    rng = np.random.default_rng(606)
    rows = [(b, c) for b in range(6) for c in "abcdefg" for _ in range(2)]
    df = pd.DataFrame(rows, columns=["batch", "cask"])
    df["y"] = rng.normal(size=6)[df["batch"]] + rng.normal(size=len(df))
    return mixedjax.mixedlm("y ~ 1", df, groups="batch", vc_formula={"cask": "0 + C(cask)"})


@pytest.mark.parametrize("name", [*CASES, "wide_components"])
def test_optimizer_gradient_matches_autodiff(name):
    """The optimiser's closed-form θ-gradient (``deviance_and_grad``) equals ``jax.grad`` of the deviance.

    At random θ, and at θ with a diagonal entry of Λ exactly 0 (the boundary, where fits end up).
    """
    from mixedjax.likelihood import deviance, deviance_and_grad

    model = _wide_components() if name == "wide_components" else CASES[name]()
    st, cp = model.structure, model.backend_data.cp
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    thetas = rng.normal(0.0, 0.8, (8, st.n_theta))
    thetas[-1, np.flatnonzero(st.diagonal_theta())[-1]] = 0.0
    for reml in (False, True):
        vg = jax.jit(jax.vmap(lambda t, reml=reml: deviance_and_grad(t, cp, st, reml)))
        ad = jax.jit(jax.vmap(jax.value_and_grad(lambda t, reml=reml: deviance(t, cp, st, reml))))
        (f1, g1), (f2, g2) = vg(jnp.asarray(thetas)), ad(jnp.asarray(thetas))
        np.testing.assert_allclose(f1, f2, rtol=1e-13)
        scale = np.max(np.abs(np.asarray(g2)), axis=1, keepdims=True)
        assert np.all(np.abs(np.asarray(g1) - np.asarray(g2)) <= 1e-9 * scale), (reml, g1, g2)
