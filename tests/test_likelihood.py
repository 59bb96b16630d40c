"""The JAX likelihood against a dense, brute-force numpy one over all rows.

``dense_loglike`` below builds the full N x N marginal covariance
``σ² (W⁻¹ + Z Ψ Zᵀ)`` (block diagonal over groups), estimates β by GLS, profiles
σ² out and evaluates the Gaussian density with scipy: it shares no code with
mixedjax (no cross-products, no Woodbury, no padding).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from scipy import stats

import mixedjax
from mixedjax import backends
from mixedjax.likelihood import deviance

# Both sides in float64; the dense side's error is ~cond(V) ε ≈ 1e-14 relative on
# these O(1)-conditioned designs, so 1e-10 is loose for rounding yet far below any
# real discrepancy (a dropped constant or log-determinant term is ≥ 1e-3 relative).
RTOL = 1e-10


def dense_loglike(
    y: np.ndarray,
    x: np.ndarray,
    z: np.ndarray,
    groups: np.ndarray,
    w: np.ndarray,
    psi: np.ndarray,
    reml: bool,
) -> float:
    """Profiled ML or REML log-likelihood from the full covariance over all rows.

    ``Var(y) = σ² V`` with ``V = W⁻¹ + (Z Ψ Zᵀ) ∘ [same group]``; β̂ by GLS; σ² at
    its (restricted) maximum ``r²/n`` or ``r²/(n−p)``.  ML is the Gaussian density
    at (β̂, σ̂²); REML additionally integrates β out (Harville 1974):
    ``ℓ_R = log N(y; Xβ̂, σ²V) − ½ log|XᵀV⁻¹X / σ²| + (p/2) log 2π``.
    """
    n, p = x.shape
    same_group = groups[:, None] == groups[None, :]
    v = np.diag(1.0 / w) + same_group * (z @ psi @ z.T)
    a = x.T @ np.linalg.solve(v, x)
    beta = np.linalg.solve(a, x.T @ np.linalg.solve(v, y))
    resid = y - x @ beta
    r2 = resid @ np.linalg.solve(v, resid)
    sigma2 = r2 / (n - p if reml else n)
    ll = stats.multivariate_normal.logpdf(y, mean=x @ beta, cov=sigma2 * v)
    if reml:
        ll += -0.5 * np.linalg.slogdet(a / sigma2)[1] + 0.5 * p * np.log(2.0 * np.pi)
    return float(ll)


def _random_psi(rng: np.random.Generator, q: int) -> np.ndarray:
    """A positive definite ``cov_re / scale``: a random Cholesky factor with a positive diagonal."""
    chol = np.tril(rng.normal(0.0, 0.5, (q, q)), -1) + np.diag(rng.uniform(0.1, 2.0, q))
    return chol @ chol.T


def _simulate(sizes: list[int], slope: bool, weighted: bool, seed: int):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(len(sizes)), sizes)
    n = len(groups)
    t = rng.uniform(-2.0, 2.0, n)
    x = np.column_stack([np.ones(n), t])
    z = x if slope else x[:, :1]
    w = rng.uniform(0.1, 4.0, n) if weighted else np.ones(n)
    b = rng.normal(size=(len(sizes), z.shape[1]))
    y = x @ [1.0, -0.5] + np.sum(b[groups] * z, axis=1) + rng.normal(size=n) / np.sqrt(w)
    # shuffle the rows: the model must not rely on rows arriving sorted by group
    perm = rng.permutation(n)
    return y[perm], x[perm], z[perm], groups[perm], w[perm], _random_psi(rng, z.shape[1])


def _packed(k_fe: int, psi: np.ndarray) -> np.ndarray:
    r, c = np.tril_indices(psi.shape[0])
    # the fixed-effects entries are arbitrary: loglike profiles them out by default
    return np.concatenate([np.full(k_fe, 7.0), psi[r, c]])


@st.composite
def ragged_designs(draw):
    sizes = draw(st.lists(st.integers(1, 30), min_size=2, max_size=12))
    slope = draw(st.booleans())
    weighted = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    return sizes, slope, weighted, seed


# Each new padded shape costs a JAX compile (~1 s for ML and REML together), so
# the example count, not the dense algebra, sets this test's runtime.
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(ragged_designs())
@example(([1, 30, 1, 1, 4], True, True, 0))  # singleton groups next to a large one, weighted
@example(([1, 2], False, False, 1))          # the smallest identifiable model: 3 rows, 2 groups
def test_loglike_matches_dense(design):
    sizes, slope, weighted, seed = design
    # 2 fixed effects need 3 rows for ML and REML; a random slope needs a group with 2 rows
    assume(sum(sizes) >= 3 and (not slope or max(sizes) >= 2))
    y, x, z, groups, w, psi = _simulate(sizes, slope, weighted, seed)
    model = mixedjax.MixedLM(y, x, groups, exog_re=z, weights=w if weighted else None)
    params = _packed(x.shape[1], psi)
    for reml in (False, True):
        expected = dense_loglike(y, x, z, groups, w, psi, reml)
        np.testing.assert_allclose(model.loglike(params, reml=reml), expected, rtol=RTOL,
                                   err_msg=f"reml={reml}, sizes={sizes}")


def test_dense_reference_by_hand():
    """The dense reference itself, on a case worked by hand: one group of two rows, intercept only.

    ``V = I + ψ 11ᵀ`` has eigenvalues 1 + 2ψ (along 1) and 1; X = 1 absorbs the
    first, so r² is the residual along (1, −1)/√2 and |XᵀV⁻¹X| = 2/(1 + 2ψ).
    """
    y, psi = np.array([1.0, 3.0]), 0.7
    one = np.ones((2, 1))
    r2 = (y[0] - y[1]) ** 2 / 2.0
    logdet_v = np.log(1.0 + 2.0 * psi)
    ml = -0.5 * (logdet_v + 2.0 * (1.0 + np.log(2.0 * np.pi * r2 / 2.0)))
    reml = -0.5 * (logdet_v + np.log(2.0 / (1.0 + 2.0 * psi)) + 1.0 * (1.0 + np.log(2.0 * np.pi * r2)))
    g = np.zeros(2)
    np.testing.assert_allclose(dense_loglike(y, one, one, g, np.ones(2), np.array([[psi]]), False), ml, rtol=1e-14)
    np.testing.assert_allclose(dense_loglike(y, one, one, g, np.ones(2), np.array([[psi]]), True), reml, rtol=1e-14)


@pytest.mark.parametrize("reml", [False, True], ids=["ml", "reml"])
def test_unit_weights_equal_no_weights(reml):
    y, x, z, groups, _, psi = _simulate([3, 1, 7, 4, 6], True, False, seed=11)
    params = _packed(2, psi)
    unweighted = mixedjax.MixedLM(y, x, groups, exog_re=z)
    weighted = mixedjax.MixedLM(y, x, groups, exog_re=z, weights=np.ones(len(y)))
    # whitening by sqrt(1) and adding log(1) are exact in floating point
    assert weighted.loglike(params, reml=reml) == unweighted.loglike(params, reml=reml)


@pytest.mark.parametrize("reml", [False, True], ids=["ml", "reml"])
def test_weights_scale_invariance(reml):
    """Weights c·w with Ψ/c give V/c: log|V| moves by −n log c, r² by c, log|A| by p log c; ℓ is unchanged."""
    y, x, z, groups, w, psi = _simulate([3, 1, 7, 4, 6], True, True, seed=12)
    c = 3.5
    base = mixedjax.MixedLM(y, x, groups, exog_re=z, weights=w)
    scaled = mixedjax.MixedLM(y, x, groups, exog_re=z, weights=c * w)
    np.testing.assert_allclose(scaled.loglike(_packed(2, psi / c), reml=reml),
                               base.loglike(_packed(2, psi), reml=reml), rtol=1e-12)


def _sleepstudy_model(data):
    return mixedjax.mixedlm("Reaction ~ Days", data, groups="Subject", re_formula="~Days")


@pytest.mark.parametrize("reml", [False, True], ids=["ml", "reml"])
def test_loglike_at_fit_equals_llf(reml, sleepstudy):
    model = _sleepstudy_model(sleepstudy)
    result = model.fit(reml=reml)
    assert result.converged and not result.singular
    # llf comes from θ (the optimiser's parameterisation) and loglike from the packed
    # Ψ = ΛΛᵀ, re-factored: the two paths differ only by rounding
    np.testing.assert_allclose(model.loglike(result.params), result.llf, rtol=1e-12)
    np.testing.assert_allclose(model.loglike(result.params, reml=reml), result.llf, rtol=1e-12)
    # the same number from the brute-force likelihood over all 180 rows
    ys = model.endog
    psi = result.cov_re.to_numpy() / result.scale
    dense = dense_loglike(ys, model.exog, model.exog_re, model.groups, model.weights, psi, reml)
    np.testing.assert_allclose(result.llf, dense, rtol=RTOL)
    # statsmodels' fixed-effects-not-profiled path at β̂ gives the same value
    np.testing.assert_allclose(model.loglike(result.params, profile_fe=False), result.llf, rtol=1e-10)


def test_deviance_is_minus_twice_loglike(sleepstudy):
    """``likelihood.deviance`` (θ, the optimiser's objective) and ``loglike`` (packed Ψ) agree."""
    model = _sleepstudy_model(sleepstudy)
    theta = np.array([0.9, 0.1, 0.3])
    lam = np.array([[theta[0], 0.0], [theta[1], theta[2]]])
    params = _packed(2, lam @ lam.T)
    for reml in (False, True):
        dev = float(deviance(jnp.asarray(theta), model.backend_data.cp, model.structure, reml))
        np.testing.assert_allclose(-0.5 * dev, model.loglike(params, reml=reml), rtol=1e-12)
        # the backend-generic profiled deviance (what the fit driver minimises) is the same number
        generic = float(backends.deviance(model.backend, jnp.asarray(theta), model.backend_data, reml))
        np.testing.assert_allclose(generic, dev, rtol=1e-12)


def test_loglike_at_singular_psi():
    """A positive semidefinite Ψ (zero intercept variance, positive slope variance) is a valid point."""
    y, x, z, groups, w, _ = _simulate([3, 1, 7, 4, 6], True, False, seed=13)
    psi = np.array([[0.0, 0.0], [0.0, 0.8]])
    model = mixedjax.MixedLM(y, x, groups, exog_re=z)
    np.testing.assert_allclose(model.loglike(_packed(2, psi), reml=True),
                               dense_loglike(y, x, z, groups, w, psi, True), rtol=RTOL)
