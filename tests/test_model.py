"""The statsmodels-shaped API: packing, likelihood methods, restart, vmap, results, formulas."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import mixedjax
from mixedjax.backends import fit_grouped as fit_theta
from mixedjax.backends import fit_grouped_single
from mixedjax.data import cross_products


@pytest.fixture(scope="module")
def rs_fit():
    data = mixedjax.datasets.load("dietox")
    model = mixedjax.mixedlm("Weight ~ Time", data, groups=data["Pig"], re_formula="~Time")
    return model, model.fit()


def test_params_packing_and_names(rs_fit):
    model, r = rs_fit
    assert list(r.params.index) == ["Intercept", "Time", "Group Var", "Group x Time Cov", "Time Var"]
    cov1 = r.cov_re.to_numpy() / r.scale
    np.testing.assert_allclose(r.params.to_numpy()[2:], cov1[np.tril_indices(2)], rtol=1e-12)
    np.testing.assert_allclose(r.params.to_numpy()[:2], r.fe_params.to_numpy())


@pytest.mark.parametrize("reml", [True, False])
def test_loglike_at_params_equals_llf(reml):
    data = mixedjax.datasets.load("sleepstudy")
    model = mixedjax.mixedlm("Reaction ~ Days", data, groups="Subject", re_formula="~Days")
    r = model.fit(reml=reml)
    assert model.loglike(r.params, reml=reml) == pytest.approx(r.llf, rel=1e-12)
    assert model.loglike(r.params, reml=reml, profile_fe=False) == pytest.approx(r.llf, rel=1e-12)
    # the score of the profiled likelihood vanishes at the optimum
    score = model.score(r.params, reml=reml)
    assert np.max(np.abs(score)) < 1e-5 * np.max(np.abs(r.params.to_numpy()[2:])) * 180
    h = model.hessian(r.params, reml=reml)
    assert h.shape == (5, 5)
    np.testing.assert_allclose(h, h.T, rtol=1e-8, atol=1e-10)
    assert np.all(np.linalg.eigvalsh(-h) > 0)


def test_restart_from_saved_params(rs_fit):
    model, r = rs_fit
    r2 = model.fit(start_params=r.params.to_numpy())
    assert r2.llf == pytest.approx(r.llf, abs=1e-9)
    assert r2.optim.iterations <= 2
    np.testing.assert_allclose(r2.optim.theta_start, r.theta, rtol=1e-10)


def test_optimisation_record(rs_fit):
    _, r = rs_fit
    o = r.optim
    assert o.converged and o.result == mixedjax.Result.CONVERGED
    assert o.deviance <= o.deviance_start
    assert o.iterations > 0 and o.evaluations >= o.iterations and o.grad_norm < 1e-6
    assert o.message.startswith("converged")


def test_fit_vmaps_over_responses():
    data = mixedjax.datasets.load("sleepstudy")
    model = mixedjax.mixedlm("Reaction ~ Days", data, groups="Subject", re_formula="~Days")
    rng = np.random.default_rng(3)
    y2 = model.endog + rng.normal(0, 20, model.nobs)
    ys = np.stack([model.endog, y2])
    gi = model.group_index
    data_ = model.rows_data()
    padded = np.zeros((2,) + data_.padded.y.shape)
    padded[:, gi.codes, gi.position] = ys

    def one(y):
        cp = cross_products(data_.padded._replace(y=y))
        return fit_theta(jnp.array([1.0, 0.0, 1.0]), cp, data_.zmask, model.structure, reml=True)

    sol = jax.jit(jax.vmap(one))(jnp.asarray(padded))
    single = [model.fit().llf,
              mixedjax.mixedlm("Reaction ~ Days", data.assign(Reaction=y2), groups="Subject",
                               re_formula="~Days").fit().llf]
    np.testing.assert_allclose(-0.5 * np.asarray(sol.value), single, rtol=0, atol=1e-8)
    assert np.all(np.asarray(sol.converged))


def test_singular_fit_warns_and_returns_boundary():
    data = mixedjax.datasets.load("dyestuff2")
    with pytest.warns(mixedjax.ConvergenceWarning, match="singular"):
        r = mixedjax.mixedlm("Yield ~ 1", data, groups="Batch").fit()
    assert r.converged and r.singular
    assert r.cov_re.iloc[0, 0] == pytest.approx(0.0, abs=1e-10)
    assert np.isfinite(r.llf) and np.all(np.isfinite(r.fe_params))
    assert "singular" in str(r.summary())


def test_nonconvergence_warns():
    data = mixedjax.datasets.load("sleepstudy")
    with pytest.warns(mixedjax.ConvergenceWarning, match="did not converge"):
        r = mixedjax.mixedlm("Reaction ~ Days", data, groups="Subject", re_formula="~Days").fit(
            maxiter=1, em_iter=0)
    assert not r.converged and r.optim.result == mixedjax.Result.MAX_ITER


def test_summary_layout(rs_fit):
    _, r = rs_fit
    text = str(r.summary())
    for row in ["Mixed Linear Model Regression Results", "Model:", "MixedLM", "Dependent Variable:", "Weight",
                "No. Groups:", "72", "Log-Likelihood:", "-2217.0475", "Group Var", "Group x Time Cov",
                "Time Var", "Coef.", "Std.Err.", "P>|z|", "[0.025", "0.975]"]:
        assert row in text
    table = r.summary().tables[1]
    assert list(table.index) == list(r.params.index)


def test_variance_component_names_and_varcorr():
    data = mixedjax.datasets.load("pastes")
    r = mixedjax.mixedlm("strength ~ 1", data, groups="batch", vc_formula={"cask": "0 + C(cask)"}).fit()
    assert list(r.params.index) == ["Intercept", "Group Var", "cask Var"]
    assert "cask Var" in str(r.summary())
    vc = r.varcorr()
    assert list(vc.columns) == ["group", "var1", "var2", "vcov", "sdcor"]
    assert vc.group.iloc[-1] == "Residual"
    np.testing.assert_allclose(vc.sdcor, np.sqrt(vc.vcov))
    assert list(r.random_effects["A"].index) == ["Group", "C(cask)[a]", "C(cask)[b]", "C(cask)[c]"]


def test_varcorr_correlation_row(rs_fit):
    _, r = rs_fit
    vc = r.varcorr()
    assert list(vc.group) == ["Pig", "Pig", "Pig", "Residual"]
    cov = r.cov_re.to_numpy()
    assert vc.sdcor.iloc[2] == pytest.approx(cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1]))


def test_results_attributes(rs_fit):
    model, r = rs_fit
    assert r.nobs == 861 and r.ngroups == 72
    np.testing.assert_allclose(r.fittedvalues + r.resid, model.endog)
    ci = r.conf_int(0.05)
    assert (ci[0] < r.params).all() and (ci[1] > r.params).all()
    assert r.tvalues.shape == r.params.shape and (r.pvalues >= 0).all()
    assert r.bse_re.shape == (3,) and np.all(np.isfinite(r.bse_re))
    cp = r.cov_params()
    np.testing.assert_allclose(np.sqrt(np.diag(cp))[:2], r.bse_fe)
    np.testing.assert_allclose(np.sqrt(r.scale * np.diag(cp)[2:]), r.bse_re)
    assert len(r.random_effects) == 72 and list(r.random_effects_cov["4601"].index) == ["Group", "Time"]
    assert r.aic < r.bic


def test_formula_features_and_category_order():
    data = mixedjax.datasets.load("dietox").dropna()
    m = mixedjax.mixedlm("Weight ~ Time * Evit + C(Cu) + np.log(Start)", data, groups="Pig")
    names = m.exog_names
    assert "Evit[T.Evit100]" in names and "Evit[T.Evit000]" not in names  # R's reference level
    assert "Time:Evit[T.Evit200]" in names and "C(Cu)[T.Cu175]" in names and "np.log(Start)" in names
    r = m.fit()
    assert r.converged


def test_array_api_equals_formula_api():
    data = mixedjax.datasets.load("sleepstudy")
    rf = mixedjax.mixedlm("Reaction ~ Days", data, groups="Subject", re_formula="~Days").fit()
    x = np.column_stack([np.ones(len(data)), data.Days])
    ra = mixedjax.MixedLM(data.Reaction, x, data.Subject, exog_re=x).fit()
    assert ra.llf == pytest.approx(rf.llf, abs=1e-9)
    np.testing.assert_allclose(ra.fe_params.to_numpy(), rf.fe_params.to_numpy(), rtol=1e-9)


def test_exog_vc_dict_equals_vc_formula():
    data = mixedjax.datasets.load("pastes")
    rf = mixedjax.mixedlm("strength ~ 1", data, groups="batch", vc_formula={"cask": "0 + C(cask)"}).fit()
    exog_vc = {"cask": {}}
    for b, d in data.groupby("batch", observed=True):
        exog_vc["cask"][b] = pd.get_dummies(d.cask).to_numpy(dtype=float)
    ra = mixedjax.MixedLM(data.strength, np.ones((len(data), 1)), data.batch, exog_vc=exog_vc).fit()
    assert ra.llf == pytest.approx(rf.llf, abs=1e-9)
    np.testing.assert_allclose(ra.vcomp, rf.vcomp, rtol=1e-7)


def test_repeat_fit_reuses_compiled_code():
    data = mixedjax.datasets.load("sleepstudy")
    mixedjax.mixedlm("Reaction ~ Days", data, groups="Subject", re_formula="~Days").fit()
    before = fit_grouped_single._cache_size()
    new = data.assign(Reaction=data.Reaction + np.random.default_rng(0).normal(0, 5, len(data)))
    mixedjax.mixedlm("Reaction ~ Days", new, groups="Subject", re_formula="~Days").fit()
    assert fit_grouped_single._cache_size() == before


def test_agrees_with_statsmodels_where_it_converges():
    sm = pytest.importorskip("statsmodels.formula.api")
    data = mixedjax.datasets.load("dietox")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sm.mixedlm("Weight ~ Time", data, groups=data["Pig"]).fit(reml=True)
    assert ref.converged
    r = mixedjax.mixedlm("Weight ~ Time", data, groups=data["Pig"]).fit()
    assert r.llf == pytest.approx(ref.llf, abs=1e-5)  # statsmodels stops at gtol ~1e-5
    np.testing.assert_allclose(r.fe_params.to_numpy(), ref.fe_params.to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(r.cov_re.to_numpy(), ref.cov_re.to_numpy(), rtol=1e-4)
    np.testing.assert_allclose(r.scale, ref.scale, rtol=1e-4)
