"""Structured residuals (:mod:`mixedjax.residuals`): nlme reference fits, the iid special case, and
whitening against a dense ``R^{-1/2}``.

nlme's REML log-likelihood uses the same constant as lme4's (checked: the orthodont fits agree to
1e-11), so the references compare directly.  Tolerances are the issue's.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from conftest import load_case

import mixedjax
from mixedjax import residuals
from mixedjax.data import cross_products
from mixedjax.likelihood import deviance


def _norm(name: str) -> str:
    return name.replace("(Intercept)", "Intercept").replace("[T.", "").replace("]", "")


@pytest.fixture(scope="module")
def orthodont():
    return mixedjax.datasets.load("orthodont")


@pytest.fixture(scope="module")
def oxboys():
    return mixedjax.datasets.load("oxboys")


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_varident_matches_nlme(orthodont, method):
    ref = load_case(f"orthodont_varident_{method}")["results"]["nlme"]
    res = mixedjax.mixedlm("distance ~ age + Sex", orthodont, groups="Subject",
                           residual=mixedjax.VarIdent("Sex")).fit(reml=method == "reml")
    assert res.converged
    assert abs(res.llf - ref["logLik"]) <= 1e-6
    assert [_norm(n) for n in res.fe_params.index] == [_norm(n) for n in ref["fixed_effects"]["names"]]
    np.testing.assert_allclose(res.fe_params.to_numpy(), ref["fixed_effects"]["estimate"], rtol=1e-4)
    ratio = res.residual_structure["sd_ratio"]
    assert list(ratio.index) == ref["variance_function"]["names"]
    np.testing.assert_allclose(ratio.to_numpy(), ref["variance_function"]["sd_ratio"], rtol=1e-4)
    np.testing.assert_allclose(res.cov_re.to_numpy().ravel(), ref["random_effects"][0]["variances"], rtol=1e-4)
    np.testing.assert_allclose(res.scale, ref["residual_variance"], rtol=1e-4)
    assert abs(res.aic - ref["AIC"]) <= 1e-5  # the ratio counts as a parameter, as in nlme
    assert f"Residual sd ratio (VarIdent): Male 1.0000, Female {ratio['Female']:.4f}" in str(res.summary())


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_ar1_matches_nlme(oxboys, method):
    ref = load_case(f"oxboys_ar1_{method}")["results"]["nlme"]
    with pytest.warns(mixedjax.ConvergenceWarning, match="singular"):  # the intercept variance is ~0
        res = mixedjax.lmer("height ~ age + (1 | Subject)", oxboys, reml=method == "reml",
                            residual=mixedjax.AR1(time="age"))
    assert res.converged
    assert abs(res.llf - ref["logLik"]) <= 1e-5
    np.testing.assert_allclose(res.fe_params.to_numpy(), ref["fixed_effects"]["estimate"], rtol=1e-4)
    phi = res.residual_structure["phi"]
    assert phi == pytest.approx(ref["correlation_structure"]["parameters"]["Phi"], rel=1e-4)
    assert res.cov_re.to_numpy()[0, 0] < 1e-3  # nlme: 1.9e-5; nearly unidentified against the AR(1)
    assert f"Residual AR(1) correlation Phi: {phi:.4f}" in str(res.summary())


def test_structured_path_equals_iid_when_r_is_identity(sleepstudy):
    """At zero residual parameters (ratios 1, φ = 0) whitening is the identity: same cross-products, same deviance."""
    md = mixedjax.mixedlm("Reaction ~ Days", sleepstudy, groups="Subject", re_formula="~Days")
    padded = md.rows_data().padded
    strata = jnp.asarray(np.arange(padded.y.size).reshape(padded.y.shape) % 3)
    spec = residuals.ResidualSpec(n_strata=3, ar1=True)
    cp = residuals.whitened_cross_products(padded, strata, jnp.zeros(3), spec)
    ref = cross_products(padded)
    for a, b in zip(cp, ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-9)
    theta = jnp.asarray([0.9, 0.1, 0.3])
    assert float(deviance(theta, cp, md.structure, True)) == pytest.approx(
        float(deviance(theta, ref, md.structure, True)), rel=1e-13)
    # and a fit with a VarIdent whose levels share one variance lands on the iid fit
    df = sleepstudy.assign(half=np.where(np.arange(len(sleepstudy)) % 2 == 0, "a", "b"))
    iid = mixedjax.lmer("Reaction ~ Days + (Days | Subject)", df)
    vi = mixedjax.lmer("Reaction ~ Days + (Days | Subject)", df, residual=mixedjax.VarIdent("half"))
    assert vi.llf >= iid.llf - 1e-9


def test_whitening_matches_dense_r():
    """Whitened cross-products equal Xᵀ R⁻¹ X etc. with R = D C D built densely (VarIdent × AR(1), weights)."""
    rng = np.random.default_rng(0)
    n_per = [5, 3, 6]
    groups = np.repeat(np.arange(3), n_per)
    n = len(groups)
    df = pd.DataFrame({"y": rng.normal(size=n), "x": rng.normal(size=n), "g": groups,
                       "s": rng.choice(["u", "v"], n), "t": rng.permutation(n).astype(float),
                       "w": rng.uniform(0.5, 2, n)})
    md = mixedjax.mixedlm("y ~ x", df, groups="g", re_formula="~x", weights="w",
                          residual=[mixedjax.VarIdent("s"), mixedjax.AR1(time="t")])
    rho = np.array([0.4, 0.8])
    cp = md.backend.cross_products(jnp.asarray(rho), md.backend_data)
    ratio = {"u": 1.0, "v": np.exp(0.4)}
    phi = np.tanh(0.8)
    logdet = 0.0
    for g in range(3):
        rows = np.flatnonzero(groups == g)
        rows = rows[np.argsort(df.t.to_numpy()[rows], kind="stable")]
        k = len(rows)
        c = phi ** np.abs(np.subtract.outer(np.arange(k), np.arange(k)))
        dsd = np.array([ratio[s] for s in df.s.to_numpy()[rows]]) / np.sqrt(df.w.to_numpy()[rows])
        r = dsd[:, None] * c * dsd[None, :]
        ri = np.linalg.inv(r)
        x = np.column_stack([np.ones(k), df.x.to_numpy()[rows]])
        y = df.y.to_numpy()[rows]
        np.testing.assert_allclose(np.asarray(cp.xtx[g]), x.T @ ri @ x, rtol=1e-10)
        np.testing.assert_allclose(np.asarray(cp.xty[g]), x.T @ ri @ y, rtol=1e-10)
        np.testing.assert_allclose(float(cp.yty[g]), y @ ri @ y, rtol=1e-10)
        np.testing.assert_allclose(np.asarray(cp.ztx[g]), x.T @ ri @ x, rtol=1e-10)
        logdet += np.linalg.slogdet(r)[1]
    assert -float(cp.sum_logw) == pytest.approx(logdet, rel=1e-12)


def test_bad_residual_arguments(orthodont, sleepstudy):
    with pytest.raises(ValueError, match="not in the data"):
        mixedjax.mixedlm("distance ~ age", orthodont, groups="Subject", residual=mixedjax.VarIdent("nope"))
    with pytest.raises(ValueError, match="at least two levels"):
        mixedjax.mixedlm("distance ~ age", orthodont.assign(one="a"), groups="Subject",
                         residual=mixedjax.VarIdent("one"))
    with pytest.raises(ValueError, match="residual must be"):
        mixedjax.mixedlm("distance ~ age", orthodont, groups="Subject", residual="AR1")
    with pytest.raises(NotImplementedError, match="crossed"):
        mixedjax.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", mixedjax.datasets.load("penicillin"),
                      residual=mixedjax.AR1(time="diameter"))
