"""Prediction (population level with SEs, conditional with BLUPs) and lme4's condVar."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import CASES, fit_case, load_case

import mixedjax

_fits: dict = {}


def _fit(case_id):
    if case_id not in _fits:
        _fits[case_id] = fit_case(load_case(case_id))
    return _fits[case_id]


CONDVAR_CASES = [c for c in CASES if "conditional_modes" in load_case(c)["results"]["lme4"]]


@pytest.mark.parametrize("case_id", CONDVAR_CASES)
def test_condvar_matches_lme4(case_id):
    """Conditional modes and conditional sds (lme4 condVar) of the first 5 levels of every grouping factor.

    Tolerance of issue 6: 1e-4 relative, 1e-8 absolute where the reference is 0 (Dyestuff2).
    """
    res = _fit(case_id)
    cv = res.condvar().set_index(["grpvar", "term", "grp"])
    for block in load_case(case_id)["results"]["lme4"]["conditional_modes"]:
        for lev, modes, sds in zip(block["levels"], block["conditional_mode"], block["conditional_sd"], strict=True):
            for term, mode, sd in zip(block["terms"], np.atleast_1d(modes), np.atleast_1d(sds), strict=True):
                got = cv.loc[(block["group"], term, lev)]
                assert abs(got["condval"] - mode) <= 1e-4 * abs(mode) + 1e-8, (term, lev)
                assert abs(got["condsd"] - sd) <= 1e-4 * abs(sd) + 1e-8, (term, lev)


def test_population_predictions_and_standard_errors(sleepstudy):
    res = _fit("sleepstudy_corr_reml")
    x = np.column_stack([np.ones(len(sleepstudy)), sleepstudy.Days])
    np.testing.assert_allclose(res.predict(), x @ res.fe_params.to_numpy(), rtol=1e-12)
    new = pd.DataFrame({"Days": [0.0, 4.5, 12.0]}, index=["a", "b", "c"])
    p = res.predict(new, se=True)
    assert list(p.index) == ["a", "b", "c"]
    xn = np.column_stack([np.ones(3), new.Days])
    cov = res.cov_params().to_numpy()[:2, :2]
    np.testing.assert_allclose(p["mean"], xn @ res.fe_params.to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(p["mean_se"], np.sqrt(np.einsum("ij,jk,ik->i", xn, cov, xn)), rtol=1e-10)
    # at Days = 0 the SE is the intercept's (lme4's vcov)
    assert abs(p["mean_se"].iloc[0] - 6.8245565312359) <= 1e-6 * 6.82
    np.testing.assert_allclose(res.predict(xn), p["mean"], rtol=1e-12)
    with pytest.raises(ValueError, match="standard errors"):
        res.predict(new.assign(Subject="308"), conditional=True, se=True)
    with pytest.raises(ValueError, match="columns"):
        res.predict(np.ones((2, 3)))


def test_conditional_predictions_and_new_levels(sleepstudy):
    res = _fit("sleepstudy_corr_reml")
    np.testing.assert_allclose(res.predict(sleepstudy, conditional=True), res.fittedvalues, rtol=1e-12)
    np.testing.assert_allclose(res.predict(conditional=True), res.fittedvalues, rtol=1e-12)
    new = pd.DataFrame({"Days": [3.0, 3.0], "Subject": ["309", "a new subject"]})
    got = res.predict(new, conditional=True).to_numpy()
    b = res.random_effects["309"].to_numpy()
    beta = res.fe_params.to_numpy()
    assert abs(got[0] - (beta[0] + b[0] + 3 * (beta[1] + b[1]))) <= 1e-9
    assert abs(got[1] - (beta[0] + 3 * beta[1])) <= 1e-9  # unseen group: population level
    with pytest.raises(ValueError, match="Subject"):
        res.predict(new[["Days"]], conditional=True)


def test_conditional_predictions_nested_variance_component():
    res = _fit("pastes_reml")
    data = res.model.data
    np.testing.assert_allclose(res.predict(data, conditional=True), res.fittedvalues, rtol=1e-12)
    new = pd.DataFrame({"batch": ["A", "A", "Z"], "cask": ["a", "b", "a"]})
    got = res.predict(new, conditional=True).to_numpy()
    re_a = res.random_effects["A"]
    mu = res.fe_params.iloc[0]
    assert abs(got[0] - (mu + re_a["Group"] + re_a["C(cask)[a]"])) <= 1e-9
    assert abs(got[1] - (mu + re_a["Group"] + re_a["C(cask)[b]"])) <= 1e-9
    assert abs(got[2] - mu) <= 1e-9


def test_predict_array_model_population_only():
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(10), 5)
    x = np.column_stack([np.ones(50), rng.normal(size=50)])
    y = x @ [1.0, 2.0] + rng.normal(size=10)[g] + rng.normal(size=50)
    res = mixedjax.MixedLM(y, x, g).fit()
    np.testing.assert_allclose(res.predict(x[:3]), x[:3] @ res.fe_params.to_numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="DataFrame"):
        res.predict(x[:3], conditional=True)
