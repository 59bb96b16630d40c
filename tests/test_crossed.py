"""Crossed random effects (:mod:`mixedjax.crossed`): lme4 reference fits, a dense brute-force likelihood,
and jax.grad against finite differences.

Tolerances: logLik 1e-6 absolute and variances 1e-4 relative against lme4 fits polished to ~1e-9
(the issue's bar); 1e-9 relative against the dense brute force (same arithmetic, float64).
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from conftest import load_case, rel

import mixedjax
from mixedjax import crossed
from mixedjax import formula as fml

lmer_mod = sys.modules["mixedjax.lmer"]


def _norm(name: str) -> str:
    return name.replace("(Intercept)", "Intercept").replace("[T.", "").replace("]", "")


def _check_lme4(res, case_id, cond_modes=True):
    ref = load_case(case_id)["results"]["lme4"]
    assert res.converged
    assert abs(res.llf - ref["logLik"]) <= 1e-6
    assert [_norm(n) for n in res.fe_params.index] == [_norm(n) for n in ref["fixed_effects"]["names"]]
    fe = np.array(ref["fixed_effects"]["estimate"])
    np.testing.assert_allclose(res.fe_params.to_numpy(), fe, rtol=1e-6, atol=1e-6 * np.abs(fe).max())
    np.testing.assert_allclose(res.bse_fe.to_numpy(), ref["fixed_effects"]["std_error"], rtol=1e-4)
    vc = res.varcorr()
    for term in ref["random_effects"]:
        got = vc.loc[vc.group == term["group"], "vcov"].to_numpy()
        np.testing.assert_allclose(got, term["variances"], rtol=1e-4)
    assert rel(res.scale, ref["residual_variance"], 1e-12) <= 1e-4
    assert abs(res.aic - ref["AIC"]) <= 1e-5 and abs(res.bic - ref["BIC"]) <= 1e-5
    if cond_modes:
        re = res.random_effects
        for cm in ref["conditional_modes"]:
            got = re[cm["group"]].loc[cm["levels"]].to_numpy().ravel()
            np.testing.assert_allclose(got, np.ravel(cm["conditional_mode"]), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_penicillin_matches_lme4(method):
    case = load_case(f"penicillin_{method}")
    d = mixedjax.datasets.load("penicillin")
    res = mixedjax.lmer(case["model"]["lme4"], d, reml=method == "reml")
    assert isinstance(res, mixedjax.LmerResults)
    _check_lme4(res, f"penicillin_{method}")
    assert list(res.varcorr().group) == ["plate", "sample", "Residual"]
    assert res.ngroups == {"plate": 24, "sample": 6}
    text = str(res.summary())
    assert "plate  (1 | plate)  (24 levels)" in text and "sample  (1 | sample)  (6 levels)" in text
    np.testing.assert_allclose(res.fittedvalues + res.resid, d["diameter"].to_numpy())


@pytest.mark.timeout(900)
def test_insteval_matches_lme4():
    """73,421 rows, 2,972 + 1,128 + 28 levels: the sparse Schur complement at full size."""
    case = load_case("insteval_reml")
    d = mixedjax.datasets.load("insteval")
    res = mixedjax.lmer(case["model"]["lme4"], d)
    _check_lme4(res, "insteval_reml", cond_modes=False)
    # ML at lme4's ML optimum: the same likelihood, without a second fit
    ml = load_case("insteval_ml")["results"]["lme4"]
    m = res.model
    theta = jnp.asarray(ml["theta"]["values"])
    assert -0.5 * m.deviance(theta, reml=False) == pytest.approx(ml["logLik"], abs=1e-6)


# ------------------------------------------------------------ brute force
def _sim(seed: int, n: int = 90) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = rng.integers(0, 9, n)
    h = rng.integers(0, 5, n)
    x = rng.normal(size=n)
    y = 1 + 0.5 * x + rng.normal(0, 1, 9)[g] + rng.normal(0, 0.7, 9)[g] * x + rng.normal(0, 1.5, 5)[h] \
        + rng.normal(size=n)
    return pd.DataFrame({"y": y, "x": x, "g": [f"g{v}" for v in g], "h": [f"h{v}" for v in h],
                         "w": rng.uniform(0.5, 2.0, n)})


def _model(formula: str, df: pd.DataFrame, weights=None) -> crossed.CrossedLM:
    yname, fixed, bars = lmer_mod.split_formula(formula)
    terms = lmer_mod.expand_terms(bars, df)
    x = fml.design(fixed, df)
    return crossed.CrossedLM(df[yname].to_numpy(float), x.to_numpy(), terms, weights=weights)


def _brute_deviance(model: crossed.CrossedLM, theta: np.ndarray, reml: bool) -> float:
    """Dense −2ℓ: V = W⁻¹ + Z Λ Λᵀ Zᵀ (relative to σ²), β and σ² profiled."""
    st = model.structure
    zs, lams = [], []
    for t, tk in zip(model.lmer_terms, crossed.term_factors(jnp.asarray(theta), st), strict=True):
        zk = np.zeros((model.nobs, t.n_levels * t.q))
        for a in range(t.q):
            zk[np.arange(model.nobs), t.codes * t.q + a] = t.z[:, a]
        zs.append(zk)
        lams.append(np.kron(np.eye(t.n_levels), np.asarray(tk)))
    z = np.hstack(zs)
    lam = np.zeros((z.shape[1], z.shape[1]))
    off = 0
    for blk in lams:
        lam[off : off + blk.shape[0], off : off + blk.shape[0]] = blk
        off += blk.shape[0]
    w = np.ones(model.nobs) if model.weights is None else model.weights
    v = np.diag(1 / w) + z @ lam @ lam.T @ z.T
    vi = np.linalg.inv(v)
    x, y = model.exog, model.endog
    a = x.T @ vi @ x
    beta = np.linalg.solve(a, x.T @ vi @ y)
    r = y - x @ beta
    r2 = r @ vi @ r
    n, p = x.shape
    df = n - p if reml else n
    dev = np.linalg.slogdet(v)[1] + df * (1 + np.log(2 * np.pi * r2 / df))
    return dev + (np.linalg.slogdet(a)[1] if reml else 0.0)


@pytest.mark.parametrize("formula, weighted", [
    ("y ~ x + (1 | g) + (1 | h)", True),                  # scalar terms: the sorted-scatter path
    ("y ~ x + (1 + x | g) + (1 | h)", False),             # a random slope on the first factor
    ("y ~ x + (1 | h) + (1 + x | g) + (0 + x | h)", False),  # vector terms in the dense block
])
def test_deviance_equals_dense_brute_force(formula, weighted):
    df = _sim(1)
    model = _model(formula, df, df["w"].to_numpy() if weighted else None)
    rng = np.random.default_rng(3)
    for _ in range(2):
        theta = rng.uniform(0.2, 1.5, model.structure.n_theta) * np.where(model.structure.diagonal_theta(), 1, 0.3)
        for reml in (True, False):
            got = model.deviance(theta, reml=reml)
            assert got == pytest.approx(_brute_deviance(model, theta, reml), rel=1e-9)


@pytest.mark.parametrize("formula", ["y ~ x + (1 | g) + (1 | h)", "y ~ x + (1 + x | g) + (1 | h)"])
def test_grad_matches_finite_differences(formula):
    model = _model(formula, _sim(2))
    st = model.structure
    theta = np.random.default_rng(4).uniform(0.3, 1.2, st.n_theta)
    grad = jax.grad(crossed.deviance_crossed)(jnp.asarray(theta), model._data, st, True)
    eps = 1e-6
    for k in range(st.n_theta):
        e = np.zeros(st.n_theta)
        e[k] = eps
        fd = (model.deviance(theta + e, reml=True) - model.deviance(theta - e, reml=True)) / (2 * eps)
        assert float(grad[k]) == pytest.approx(fd, rel=1e-6, abs=1e-6)  # central differences: O(eps²) ~ 1e-12


def test_random_slope_crossed_blups_and_layout():
    df = _sim(5)
    res = mixedjax.lmer("y ~ x + (1 + x | g) + (1 | h)", df)
    assert res.converged
    vc = res.varcorr()
    assert list(vc.group) == ["g", "g", "g", "h", "Residual"]
    assert list(vc.var2.fillna("-")) == ["-", "-", "x", "-", "-"]
    assert set(res.random_effects) == {"g", "h"} and res.random_effects["g"].shape == (9, 2)
    # BLUPs satisfy the penalised least-squares normal equations: Λᵀ Zᵀ (y − Xβ − Z b) = u
    resid = res.resid
    for t, b in zip(res.model.lmer_terms, res._modes, strict=True):
        cov = res.cov_terms[t.label].to_numpy()
        for lev in range(t.n_levels):
            rows = t.codes == lev
            lhs = t.z[rows].T @ resid[rows] / res.scale
            np.testing.assert_allclose(lhs, np.linalg.solve(cov, b[lev]), rtol=1e-6, atol=1e-8)


def test_nested_model_through_crossed_path_equals_per_group_path():
    """Pastes (1 | batch/cask) forced through the blocked Cholesky: same fit, BLUPs and variance SEs as per group."""
    d = mixedjax.datasets.load("pastes")
    per_group = mixedjax.lmer("strength ~ 1 + (1 | batch/cask)", d)
    res = _model("strength ~ 1 + (1 | batch/cask)", d).fit()
    assert res.llf == pytest.approx(per_group.llf, abs=1e-8)
    np.testing.assert_allclose(res.varcorr().vcov, per_group.varcorr().vcov, rtol=1e-6)
    for name, df in per_group.random_effects.items():
        np.testing.assert_allclose(res.random_effects[name].loc[df.index].to_numpy(), df.to_numpy(), atol=1e-6)
    # observed-information standard errors of (cask:batch, batch) variances, both paths
    got = res.bse_re.to_numpy()
    want = per_group.bse_re.to_numpy()[::-1]  # per group: batch (the group) first, then cask:batch
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_derivative_free_minimiser_on_a_smooth_non_quadratic():
    """_minimize_dfo: Σ (e^u − u) + 0.3 (u₀ − u₁)², u = x − a (minimum 3 at a), from 0.8 away."""
    a = np.array([0.4, -1.2, 2.0])

    def f(x):
        u = x - a
        return float(np.sum(np.exp(u) - u) + 0.3 * (u[0] - u[1]) ** 2)

    evaluated = []
    r = crossed._minimize_dfo(lambda pts: evaluated.extend(pts) or [f(p) for p in pts], a + [0.8, -0.5, 0.3],
                              0.1, 1e-10, 500)
    assert r.converged and r.evaluations == len(evaluated) < 100
    np.testing.assert_allclose(r.x, a, atol=1e-4)  # |x − a| ~ √(2 ftol / H)
    assert r.value - 3.0 < 1e-9 and np.abs(r.grad).max() < 1e-3


def test_mivque_start_is_close_to_the_reml_estimate():
    """The MIVQUE(0) start of a crossed scalar model lands within a few per cent of θ̂ (Penicillin)."""
    d = mixedjax.datasets.load("penicillin")
    res = mixedjax.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", d)
    m = res.model
    start = crossed.mivque_start(m.endog, m.exog, m.lmer_terms, None)
    np.testing.assert_allclose(start, res.theta, rtol=0.02)
    np.testing.assert_allclose(res.optim.theta_start, start)
    t = m.lmer_terms[0]
    assert crossed.mivque_start(m.endog, m.exog, [dataclasses.replace(t, z=np.hstack([t.z, t.z]))], None) is None
