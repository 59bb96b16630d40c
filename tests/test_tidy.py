"""Tidy output (``to_frame``, ``to_dict``), HTML and LaTeX tables: :mod:`mixedjax.tidy`.

Numbers are checked against lme4 / lmerTest (sleepstudy) and nlme's ``intervals()`` (Orthodont
with VarIdent); every model kind of ``tests/test_matrix.py`` gets the table's layout checked against
its own ``varcorr()``.
"""

from __future__ import annotations

import doctest
import json
import math
import pathlib
import warnings
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from test_matrix import KINDS

import mixedjax
from mixedjax import tidy
from mixedjax.many import BatchOut, BatchResults

REF = pathlib.Path(__file__).parent / "reference"
COLUMNS = ["effect", "group", "term", "estimate", "std_error", "statistic", "df", "p_value", "conf_low", "conf_high"]


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mixedjax.ConvergenceWarning)
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def sleep():
    return mixedjax.lmer("Reaction ~ Days + (Days | Subject)", mixedjax.datasets.load("sleepstudy"))


@pytest.fixture(scope="module")
def sleep_ref():
    return json.loads((REF / "sleepstudy_corr_reml.json").read_text())["results"]


@pytest.fixture(scope="module")
def sleep_frame(sleep):
    return sleep.to_frame()


@pytest.fixture(scope="module")
def varident():
    d = mixedjax.datasets.load("orthodont")
    return mixedjax.mixedlm("distance ~ age + Sex", d, groups="Subject", residual=mixedjax.VarIdent("Sex")).fit()


# ---------------------------------------------------------------------------------- sleepstudy vs lme4
def test_columns_and_rows_are_broom_mixed(sleep_frame):
    t = sleep_frame
    assert list(t.columns) == COLUMNS
    assert list(t.effect) == ["fixed"] * 2 + ["ran_pars"] * 4
    assert list(t.term) == ["(Intercept)", "Days", "sd__(Intercept)", "cor__(Intercept).Days", "sd__Days",
                            "sd__Observation"]
    assert t.group.iloc[:2].isna().all() and list(t.group.iloc[2:]) == ["Subject"] * 3 + ["Residual"]


def test_estimates_match_lme4(sleep_frame, sleep_ref):
    lme4 = sleep_ref["lme4"]
    t = sleep_frame.set_index("term")
    fe = lme4["fixed_effects"]
    # lme4 reference polished to 1e-9 in theta: fixed effects and their standard errors agree to ~1e-8 (README)
    np.testing.assert_allclose(t.loc[fe["names"], "estimate"], fe["estimate"], rtol=1e-6)
    np.testing.assert_allclose(t.loc[fe["names"], "std_error"], fe["std_error"], rtol=1e-5)
    re = lme4["random_effects"][0]
    want = [re["std_devs"][0], re["correlation"][0][1], re["std_devs"][1], lme4["residual_sd"]]
    # variances agree within 1e-4 relative (README, "Accuracy"): sds and the correlation within 1e-5 here
    np.testing.assert_allclose(t.estimate.iloc[2:], want, rtol=1e-5)


def test_fixed_inference_is_lmertest_satterthwaite(sleep_frame, sleep_ref):
    sat = sleep_ref["lmerTest"]["satterthwaite"]
    fixed = sleep_frame[sleep_frame.effect == "fixed"]
    # lmerTest differentiates numerically; our df agree to 1.1e-7 (README)
    np.testing.assert_allclose(fixed.df, sat["df"], rtol=1e-6)
    np.testing.assert_allclose(fixed.statistic, sat["t_value"], rtol=1e-6)
    np.testing.assert_allclose(fixed.p_value, sat["p_value"], rtol=1e-4)
    np.testing.assert_allclose(fixed.statistic, fixed.estimate / fixed.std_error, rtol=1e-12)
    q = stats.t.ppf(0.975, fixed.df)
    np.testing.assert_allclose(fixed.conf_low, fixed.estimate - q * fixed.std_error, rtol=1e-10)
    np.testing.assert_allclose(fixed.conf_high, fixed.estimate + q * fixed.std_error, rtol=1e-10)


def test_default_leaves_ran_pars_uncertainty_empty(sleep_frame):
    ran = sleep_frame[sleep_frame.effect == "ran_pars"]
    assert ran[["std_error", "statistic", "df", "p_value", "conf_low", "conf_high"]].isna().all().all()


def test_wald_ddf_none_is_normal(sleep):
    t = sleep.to_frame(ddf=None)
    fixed = t[t.effect == "fixed"]
    assert fixed.df.isna().all()
    z = fixed.estimate / fixed.std_error
    np.testing.assert_allclose(fixed.p_value, 2 * stats.norm.sf(np.abs(z)), rtol=1e-10)
    np.testing.assert_allclose(fixed.conf_high - fixed.estimate, 1.959963984540054 * fixed.std_error, rtol=1e-10)


def test_profile_intervals_match_lme4(sleep, sleep_ref):
    t = sleep.to_frame(ddf=None, ran_pars_ci="profile")
    ran = t[t.effect == "ran_pars"]
    prof = sleep_ref["lme4"]["confint_profile"]  # rows sd, cor, sd, sigma, fixed effects
    # lme4 interpolates a spline where we solve for the root: 1.7e-4 relative at worst (README)
    np.testing.assert_allclose(ran.conf_low, prof["lower"][:4], rtol=5e-4)
    np.testing.assert_allclose(ran.conf_high, prof["upper"][:4], rtol=5e-4)
    assert ran.std_error.isna().all()


def test_wald_standard_errors_are_the_delta_method(sleep):
    """Delta method through a finite-difference Jacobian of (sd0, cor, sd1, sigma) in the natural parameters."""
    t = sleep.to_frame(ddf=None, ran_pars_ci="wald")
    ran = t[t.effect == "ran_pars"]
    v = np.array([*np.asarray(sleep.params)[2:] * sleep.scale, sleep.scale])  # v00, v10, v11, sigma2

    def f(v):
        return np.array([math.sqrt(v[0]), v[1] / math.sqrt(v[0] * v[2]), math.sqrt(v[2]), math.sqrt(v[3])])

    h = 1e-6 * np.abs(v)
    jac = np.column_stack([(f(v + h[i] * np.eye(4)[i]) - f(v - h[i] * np.eye(4)[i])) / (2 * h[i]) for i in range(4)])
    se = np.sqrt(np.diag(jac @ sleep.cov_natural_scale @ jac.T))
    np.testing.assert_allclose(ran.std_error, se, rtol=1e-6)  # central differences: ~1e-9 error
    np.testing.assert_allclose(ran.estimate, f(v), rtol=1e-10)
    # the sd rows of std_error follow bse_re: se(sd) = se(var) / (2 sd)
    np.testing.assert_allclose(ran.std_error.iloc[0], sleep.bse_re.iloc[0] / (2 * ran.estimate.iloc[0]), rtol=1e-10)
    z = NormalDist().inv_cdf(0.975)
    sd = ran.iloc[0]
    np.testing.assert_allclose([sd.conf_low, sd.conf_high],
                               sd.estimate * np.exp(np.array([-z, z]) * sd.std_error / sd.estimate), rtol=1e-12)
    cor = ran.iloc[1]
    want = np.tanh(np.arctanh(cor.estimate) + np.array([-z, z]) * cor.std_error / (1 - cor.estimate ** 2))
    np.testing.assert_allclose([cor.conf_low, cor.conf_high], want, rtol=1e-12)


def test_varident_wald_intervals_match_nlme(varident):
    """VarIdent rows (group Residual) and nlme's intervals(): sd of the intercept, sd ratio, sigma."""
    iv = json.loads((REF / "nlme_intervals.json").read_text())["cases"]["orthodont_varident_reml"]["intervals"]
    t = varident.to_frame(ddf=None, ran_pars_ci="wald").set_index("term")
    assert list(t.index[3:]) == ["sd__(Intercept)", "sd__Observation", "sd_ratio__Female"]
    assert list(t.group.iloc[3:]) == ["Subject", "Residual", "Residual"]
    sub = iv["reStruct"]["Subject"]
    rows = {"sd__(Intercept)": (sub["lower"][0], sub["estimate"][0], sub["upper"][0]),
            "sd_ratio__Female": (iv["varStruct"]["lower"][0], iv["varStruct"]["estimate"][0],
                                 iv["varStruct"]["upper"][0]),
            "sd__Observation": (iv["sigma"]["lower"], iv["sigma"]["estimate"], iv["sigma"]["upper"])}
    for term, (lo, est, hi) in rows.items():
        # nlme's apVar is a finite-difference Hessian: agreement measured 4e-5 (tests/test_residual_inference.py)
        np.testing.assert_allclose(t.loc[term, ["conf_low", "estimate", "conf_high"]].to_numpy(float), [lo, est, hi],
                                   rtol=5e-4, err_msg=term)


def test_kenward_roger_and_bad_options(sleep):
    kr = sleep.to_frame(ddf="kenward-roger")
    assert np.all(kr.df.iloc[:2] > 0)
    with pytest.raises(ValueError, match="ran_pars_ci"):
        sleep.to_frame(ran_pars_ci="bootstrap")
    with pytest.raises(ValueError, match="ddf"):
        sleep.to_frame(ddf="containment")


# ------------------------------------------------------------------------------------------- to_dict
def test_to_dict_is_strict_json(sleep, sleep_frame):
    out = sleep.to_dict()
    back = json.loads(json.dumps(out, allow_nan=False))
    assert back == out
    for key in ("llf", "aic", "bic", "converged", "fe_params", "bse_fe", "varcorr", "nobs", "method"):
        assert key in out
    assert out["method"] == "REML" and out["nobs"] == 180 and out["converged"] is True
    assert out["fe_params"] == pytest.approx(sleep.fe_params.to_dict(), rel=1e-14)
    assert out["bse_fe"] == pytest.approx(sleep.bse_fe.to_dict(), rel=1e-14)
    assert [set(r) for r in out["varcorr"]] == [{"grp", "var1", "var2", "vcov", "sdcor"}] * 4
    assert out["varcorr"][2] == pytest.approx({"grp": "Subject", "var1": "(Intercept)", "var2": "Days",
                                               "vcov": sleep.cov_re.iloc[0, 1],
                                               "sdcor": float(sleep_frame.estimate.iloc[3])})
    assert out["varcorr"][3]["var1"] is None and out["varcorr"][3]["grp"] == "Residual"
    assert [list(r) for r in out["tidy"]] == [COLUMNS] * 6
    assert out["tidy"][0]["group"] is None and out["tidy"][2]["std_error"] is None  # NaN -> null
    assert out["tidy"][1]["df"] == pytest.approx(float(sleep_frame.df.iloc[1]), rel=1e-14)


def test_json_ready():
    out = tidy.json_ready({"a": [np.nan, np.inf, -np.inf, 1.5], "b": np.array([1, 2]), "c": np.bool_(False),
                           "d": pd.Series({"x": 1.0}), "e": (np.int32(3), None)})
    assert json.dumps(out, allow_nan=False) == ('{"a": [null, null, null, 1.5], "b": [1, 2], "c": false, '
                                                '"d": {"x": 1.0}, "e": [3, null]}')


# -------------------------------------------------------------------------------- every model kind
@pytest.fixture(scope="module", params=["random_slope", "lmer_weights", "variance_components", "varident", "ar1",
                                        "crossed"])
def kind_result(request):
    load, fit, _, _ = KINDS[request.param]
    return request.param, _quiet(fit, load())


def test_every_model_kind(kind_result):
    name, r = kind_result
    t = r.to_frame(ddf=None)
    assert list(t.columns) == COLUMNS
    fixed, ran = t[t.effect == "fixed"], t[t.effect == "ran_pars"]
    assert len(fixed) == r.k_fe and list(t.effect) == ["fixed"] * r.k_fe + ["ran_pars"] * len(ran)
    np.testing.assert_allclose(fixed.estimate, r.fe_params, rtol=1e-12)
    np.testing.assert_allclose(fixed.statistic, fixed.estimate / fixed.std_error, rtol=1e-12)
    # each sd / correlation row is a varcorr() row: same groups, sd^2 = vcov, cor = sdcor
    vc = r.varcorr()
    terms = ran[ran.group != "Residual"]
    assert set(terms.group) == set(vc.group[vc.group != "Residual"])
    for row in terms.itertuples():
        stat, cols = row.term.split("__", 1)
        if stat == "sd":
            hit = vc[(vc.group == row.group) & (vc.var1 == cols) & vc.var2.isna()]
            np.testing.assert_allclose(row.estimate ** 2, hit.vcov.iloc[0], rtol=1e-10, atol=1e-12)
        else:
            a, b = cols.split(".", 1) if not cols.startswith("(") else ("(Intercept)", cols[len("(Intercept)."):])
            hit = vc[(vc.group == row.group) & (vc.var1 == a) & (vc.var2 == b)]
            assert len(hit) == 1 and (np.isnan(row.estimate) or abs(row.estimate - hit.sdcor.iloc[0]) < 1e-10)
    n_sd_cor = sum(t.n_theta for t in r.fitted.backend.terms)
    assert len(terms) == n_sd_cor
    resid = ran[ran.group == "Residual"]
    assert resid.term.iloc[0] == "sd__Observation" and abs(resid.estimate.iloc[0] - math.sqrt(r.scale)) < 1e-12
    n_rho = len(r.residual_params)  # natural scale (sd ratios, phi): the last entries of params
    np.testing.assert_allclose(resid.estimate.iloc[1:], r.params.iloc[len(r.params) - n_rho:], rtol=1e-12)
    want_rho = {"varident": ["sd_ratio__Female"], "ar1": ["phi__AR1"]}.get(name, [])
    assert list(resid.term.iloc[1:]) == want_rho
    out = r.to_dict(ddf=None)
    assert json.loads(json.dumps(out, allow_nan=False))["method"] == r.method
    assert len(out["varcorr"]) == len(vc) and len(out["tidy"]) == len(t)
    page = r._repr_html_()
    assert page.count("<table") == 3 and "Log-Likelihood" in page


def test_group_names(kind_result):
    name, r = kind_result
    groups = list(dict.fromkeys(r.to_frame(ddf=None).group.dropna()))
    want = {"variance_components": ["cask", "batch", "Residual"], "crossed": ["plate", "sample", "Residual"]}
    assert groups == want.get(name, ["Subject", "Residual"])


# ------------------------------------------------------------------------------- HTML, LaTeX, repr
def test_summary_html_and_latex(sleep):
    s = sleep.summary()
    page = s.as_html()
    assert page == s._repr_html_()
    assert page.count("<table") == 3 and "REML" in page and "Days Var" in page and "sd / correlations" in page
    assert "<caption>Mixed Linear Model Regression Results</caption>" in page
    tex = s.as_latex()
    assert tex.startswith("\\begin{table}") and tex.rstrip().endswith("\\end{table}")
    assert tex.count("\\begin{tabular}") == tex.count("\\end{tabular}") == 3
    assert "P\\textgreater{}\\textbar{}z\\textbar{}" in tex  # escaped column header
    assert "\\begin{verbatim}" in tex  # the notes (lme4's blocks per term)
    assert str(s).count("\n") > 10  # the text is unchanged by the extra table
    assert len(s.tables) == 3 and list(s.tables[2].columns) == ["group", "var1", "var2", "vcov", "sdcor"]


def test_batch_results_repr(sleep):
    """A BatchResults of three copies of one fit (built from its numbers: the display needs no batched fit)."""
    fm, m = sleep.fitted, 3
    out = BatchOut(theta=np.tile(fm.theta_full, (m, 1)), deviance=np.full(m, -2 * sleep.llf),
                   beta=np.tile(fm.beta, (m, 1)), sigma2=np.full(m, sleep.scale),
                   a=np.tile(sleep.scale * np.linalg.inv(fm.cov_beta), (m, 1, 1)), grad_norm=np.zeros(m),
                   iterations=np.ones(m, int), result=np.zeros(m, int), nobs=np.full(m, sleep.nobs))
    y = np.tile(sleep.model.endog[:, None], (1, m))
    batch = BatchResults(sleep.model, y, out, True, ["y0", "y1", "y2"])
    np.testing.assert_allclose(batch.bse_fe[0], sleep.bse_fe, rtol=1e-10)
    page = batch._repr_html_()
    assert "3 models fitted by REML" in page and "<table" in page and "Intercept" in page
    assert repr(batch).startswith("<BatchResults 3 models REML")


def test_docstring_examples():
    result = doctest.testmod(tidy, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 5
