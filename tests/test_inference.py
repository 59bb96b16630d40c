"""Wald tests, likelihood-ratio tests (lme4 / nlme ``anova``) and small-sample df (lmerTest, pbkrtest)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from conftest import REF, fit_case, load_case
from scipy import stats

import mixedjax
from mixedjax.inference import parse_constraints

_fits: dict = {}


def _fit(case_id):
    if case_id not in _fits:
        _fits[case_id] = fit_case(load_case(case_id))
    return _fits[case_id]


def _lrt(name):
    return json.loads((REF / f"{name}.json").read_text())


# ------------------------------------------------------------------------------------------ Wald tests
def test_constraint_strings_match_matrices():
    res = _fit("sleepstudy_corr_reml")
    names = list(res.fe_params.index)
    r, q = parse_constraints("Days = 0", names)
    assert r.tolist() == [[0.0, 1.0]] and q.tolist() == [0.0]
    r, q = parse_constraints("Days = Intercept, 2*Days - (Intercept) = 3", names)
    assert r.tolist() == [[-1.0, 1.0], [-1.0, 2.0]] and q.tolist() == [0.0, 3.0]
    a = res.t_test("Days = Intercept")
    b = res.t_test(np.array([[-1.0, 1.0]]))
    np.testing.assert_allclose(a.tvalue, b.tvalue, rtol=1e-12)
    # a matrix over all params (statsmodels' width) with zero variance columns is accepted
    c = res.t_test(np.array([[-1.0, 1.0, 0, 0, 0]]))
    np.testing.assert_allclose(a.tvalue, c.tvalue, rtol=1e-12)
    with pytest.raises(ValueError, match="Tme"):
        res.t_test("Tme = 0")
    with pytest.raises(ValueError, match="linear"):
        res.t_test("Days * Intercept = 0")
    with pytest.raises(ValueError, match="columns"):
        res.t_test(np.ones((1, 3)))


def test_wald_tests_against_direct_formulas():
    res = _fit("sleepstudy_corr_reml")
    beta, cov = res.fe_params.to_numpy(), res.cov_params().to_numpy()[:2, :2]
    t = res.t_test("Days = 10")
    want = (beta[1] - 10) / np.sqrt(cov[1, 1])
    assert abs(t.tvalue[0] - want) <= 1e-10 * abs(want)
    assert abs(t.pvalue[0] - 2 * stats.norm.sf(abs(want))) <= 1e-12
    # statsmodels' MixedLM t_test has normal p-values; the unit contrasts reproduce tvalues / pvalues
    tt = res.t_test(np.eye(2))
    np.testing.assert_allclose(tt.tvalue, res.tvalues.to_numpy()[:2], rtol=1e-10)
    np.testing.assert_allclose(tt.conf_int(), res.conf_int().to_numpy()[:2], rtol=1e-10)
    r = np.array([[1.0, 0.0], [0.0, 1.0]])
    q = np.array([250.0, 10.0])
    d = r @ beta - q
    w = d @ np.linalg.solve(r @ cov @ r.T, d)
    wt = res.wald_test((r, q))
    assert abs(wt.statistic - w) <= 1e-9 * w and wt.df_num == 2
    assert abs(wt.pvalue - stats.chi2.sf(w, 2)) <= 1e-12
    f = res.f_test("Intercept = 250, Days = 10")
    assert abs(f.fvalue - w / 2) <= 1e-9 * w and f.df_denom == res.nobs - 2
    sf = res.f_test("Intercept = 250, Days = 10", ddf="satterthwaite")
    assert 2 < sf.df_denom < 180


# ----------------------------------------------------------------------------------- likelihood ratio
LME4_LRT = ["lrt_dietox_indep_vs_rs", "lrt_dietox_ri_vs_rs", "lrt_sleepstudy_indep_vs_corr"]


def _check_table(t, ref):
    # tolerances of issue 6: logLik/AIC/BIC 1e-6 abs, chisq 1e-5 abs, p 1e-4 rel
    assert t["npar"].tolist() == ref["npar"]
    np.testing.assert_allclose(t["logLik"], ref["logLik"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(t["AIC"], ref["AIC"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(t["BIC"], ref["BIC"], rtol=0, atol=1e-6)
    assert abs(t["Chisq"].iloc[1] - ref["chisq"]) <= 1e-5
    assert int(t["Df"].iloc[1]) == ref["df"]
    assert abs(t["Pr(>Chisq)"].iloc[1] - ref["p_value"]) <= 1e-4 * ref["p_value"]


@pytest.mark.parametrize("name", LME4_LRT)
def test_lrt_matches_lme4_anova(name):
    lrt = _lrt(name)
    ref = lrt["results"]["lme4"]
    small, large = _fit(lrt["null_case"]), _fit(lrt["alternative_case"])
    t = mixedjax.anova(large, small)  # sorted by npar, as lme4
    assert list(t.index) == ["model2", "model1"]
    _check_table(t, ref)
    # REML fits are refitted by ML (refit=True), with a note
    t2 = mixedjax.compare_lr_test(_fit(lrt["null_case"].replace("_ml", "_reml")), large)
    assert "refitting" in t2.note and "refitting" in repr(t2)
    _check_table(t2, ref)
    stat, p, dfd = large.compare_lr_test(small)
    assert abs(stat - ref["chisq"]) <= 1e-5 and dfd == ref["df"]


def test_lrt_refuses_different_data(sleepstudy):
    a = _fit("sleepstudy_corr_ml")
    sub = sleepstudy.iloc[:170]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = mixedjax.mixedlm("Reaction ~ Days", sub, groups="Subject").fit(reml=False)
    with pytest.raises(ValueError, match="different data: nobs"):
        mixedjax.compare_lr_test(b, a)
    other = sleepstudy.assign(Reaction=sleepstudy.Reaction + 1.0)
    c = mixedjax.mixedlm("Reaction ~ Days", other, groups="Subject").fit(reml=False)
    with pytest.raises(ValueError, match="different responses"):
        mixedjax.compare_lr_test(c, a)
    with pytest.raises(ValueError, match="at least two"):
        mixedjax.anova(a)


def test_refit_false_needs_identical_fixed_effects(sleepstudy):
    a = _fit("sleepstudy_corr_reml")
    b = mixedjax.mixedlm("Reaction ~ 1", sleepstudy, groups="Subject", re_formula="~Days").fit()
    with pytest.raises(ValueError, match="different fixed effects"):
        mixedjax.compare_lr_test(b, a, refit=False)
    c = _fit("sleepstudy_indep_reml")
    t = mixedjax.compare_lr_test(c, a, refit=False)
    assert abs(t["Chisq"].iloc[1] - 2 * (a.llf - c.llf)) <= 1e-9
    # nlme's REML BIC uses log(n - p)
    assert abs(t["BIC"].iloc[0] - (-2 * c.llf + np.log(180 - 2) * 5)) <= 1e-9


NLME_LRT = {
    "lrt_orthodont_varident": ("orthodont", "distance ~ age + Sex", lambda: mixedjax.VarIdent("Sex")),
    # nlme's corAR1(form = ~1 | Subject) on rows in data order = Occasion order
    "lrt_oxboys_ar1": ("oxboys", "height ~ age", lambda: mixedjax.AR1(time="Occasion")),
}


@pytest.mark.skipif(not hasattr(mixedjax, "VarIdent"), reason="structured residuals (issue 5) not available")
@pytest.mark.parametrize("name", sorted(NLME_LRT))
def test_lrt_matches_nlme_reml_anova(name):
    ds, formula, residual = NLME_LRT[name]
    ref = _lrt(name)["results"]["nlme"]
    data = mixedjax.datasets.load(ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mixedjax.ConvergenceWarning)
        m0 = mixedjax.mixedlm(formula, data, groups="Subject").fit()
        m1 = mixedjax.mixedlm(formula, data, groups="Subject", residual=residual()).fit()
    _check_table(mixedjax.anova(m0, m1, refit=False), ref)


# Satterthwaite / Kenward-Roger (fe_table, summary(ddf=...)): tests/test_ddf.py


def test_crossed_models_get_lrt_wald_and_every_feature():
    d = mixedjax.datasets.load("penicillin")
    big = mixedjax.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", d)  # the same program as test_crossed
    small = mixedjax.lmer("diameter ~ 1 + (1 | plate)", d)
    t = mixedjax.anova(small, big)
    assert int(t["Df"].iloc[1]) == 1 and t["Chisq"].iloc[1] > 0
    assert abs(big.t_test("Intercept = 23").tvalue[0] - (big.fe_params.iloc[0] - 23) / big.bse_fe.iloc[0]) < 1e-9
    # once NotImplementedError on the crossed path; every feature now reads the one fitted-model interface
    # (their numbers against lme4 are in test_profile / test_bootstrap / test_predict)
    est = {"sd_(Intercept)|plate": np.sqrt(big.varcorr().vcov.iloc[0]),
           "sd_(Intercept)|sample": np.sqrt(big.varcorr().vcov.iloc[1]),
           "sigma": np.sqrt(big.scale), "(Intercept)": big.fe_params.iloc[0]}
    ci = big.conf_int(method="profile")
    assert list(ci.index) == list(est)
    for name, value in est.items():
        assert ci.loc[name].iloc[0] < value < ci.loc[name].iloc[1]
    boot = big.bootstrap(n=32)
    assert boot.n == 32 and boot.n_failed == 0
    assert boot.estimate.loc[list(est)].to_numpy() == pytest.approx(list(est.values()), rel=1e-10)
    # conditional prediction on the fitted rows is the fitted values; marginal prediction is X beta
    np.testing.assert_allclose(np.asarray(big.predict(d, conditional=True)), big.fittedvalues, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(big.predict(d)), big.fe_params.iloc[0], rtol=1e-12)


@pytest.mark.parametrize("name", ["mixedjax.inference", "mixedjax.ddf", "mixedjax.predict", "mixedjax.profile",
                                  "mixedjax.bootstrap"])
def test_docstring_examples(name):
    """The docstring examples of the inference modules (tests/test_doctests.py covers the others)."""
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
