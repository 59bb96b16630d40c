"""mixedjax.term_tests against lmerTest 3.1-3: per-term F tests (anova types 1-3) and ranova.

Reference values: tests/reference/lmertest_anova.json, written by tests/reference/lmertest_anova.R
(lmerTest 3.1-3, pbkrtest 0.5.2, lme4 1.1-31, R 4.2.2).
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mixedjax
from mixedjax.term_tests import anova_terms, ranova, term_contrasts

HERE = Path(__file__).parent
REF = json.loads((HERE / "reference" / "lmertest_anova.json").read_text())["models"]

RTOL = 1e-4  # F, DenDF, p, sums of squares, log-likelihoods
RTOL_SINGULAR = 1e-2  # fits on the boundary (variance 0)


@functools.cache
def load(name: str) -> pd.DataFrame:
    """Bundled data set (R's level order, so treatment codings match lme4's)."""
    return mixedjax.datasets.load(name.lower())


@functools.cache
def fit(key: str):
    ref = REF[key]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mixedjax.lmer(ref["formula"], load(ref["data"]), reml=ref["reml"])


def _rtol(key: str) -> float:
    return RTOL_SINGULAR if REF[key]["singular"] else RTOL


ANOVA_CASES = [pytest.param(key, t, ddf, id=f"{key}-type{t}-{ddf}")
               for key in REF if REF[key]["anova"]
               for t in (1, 2, 3) for ddf in ("satterthwaite", "kenward-roger")]


def _assert_close(actual: np.ndarray, desired: np.ndarray, rtol: float, what: str) -> None:
    actual, desired = np.asarray(actual, dtype=float), np.asarray(desired, dtype=float)
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=0, err_msg=what)


# --------------------------------------------------------------------------------------- anova
@pytest.mark.parametrize(("key", "type_", "ddf"), ANOVA_CASES)
def test_anova_matches_lmertest(key: str, type_: int, ddf: str) -> None:
    ref = REF[key]["anova"][f"type{type_}_{ddf}"]
    table = anova_terms(fit(key), ddf=ddf, type=type_)
    assert list(table.columns) == ["Sum Sq", "Mean Sq", "NumDF", "DenDF", "F value", "Pr(>F)"]
    assert list(table.index) == list(np.atleast_1d(ref["rows"]))
    rtol = _rtol(key)
    np.testing.assert_array_equal(table["NumDF"].to_numpy(), np.asarray(ref["NumDF"], dtype=float))
    for col in ("F value", "DenDF", "Pr(>F)", "Mean Sq", "Sum Sq"):
        _assert_close(table[col].to_numpy(), ref[col], rtol, f"{key} type {type_} {ddf}: {col}")


@pytest.mark.parametrize(("key", "type_"), [(k, t) for k in REF if REF[k]["anova"] for t in (1, 2, 3)])
def test_contrasts_match_lmertest(key: str, type_: int) -> None:
    """The hypothesis matrices themselves (lmerTest's attr(anova(fit), "hypotheses"))."""
    hyp = REF[key]["hypotheses"][f"type{type_}"]
    mine = term_contrasts(fit(key), type=type_)
    assert list(mine) == list(hyp)
    for term, h in hyp.items():
        want = np.asarray(h["matrix"], dtype=float).reshape(-1, len(h["columns"]))
        np.testing.assert_allclose(mine[term].to_numpy(), want, rtol=0, atol=1e-6, err_msg=f"{key} {term}")


def test_type3_is_coding_independent() -> None:
    """Type III tests do not depend on the factor coding; the covariate's F is not a treatment t²."""
    d = load("cake")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r_sum = mixedjax.lmer("angle ~ C(recipe, contr.sum) * temp + (1 | recipe:replicate)", d)
    ref = REF["cake"]["anova"]["type3_satterthwaite"]
    t_sum = anova_terms(r_sum, type=3)
    _assert_close(t_sum["F value"].to_numpy(), ref["F value"], RTOL, "sum coding F")
    _assert_close(t_sum["DenDF"].to_numpy(), ref["DenDF"], RTOL, "sum coding DenDF")
    t_treat = fit("cake").t_test(np.eye(6)[3], ddf="satterthwaite")  # slope at the reference recipe
    f_temp = float(anova_terms(fit("cake"), type=3).loc["temp", "F value"])
    assert abs(float(np.squeeze(t_treat.tvalue)) ** 2 - f_temp) > 1.0


def test_heading_and_hypotheses_attrs() -> None:
    table = anova_terms(fit("cake"), ddf="kenward-roger", type="II")
    assert table.attrs["heading"] == "Type II Analysis of Variance Table with Kenward-Roger's method"
    assert set(table.attrs["hypotheses"]) == {"recipe", "temp", "recipe:temp"}


def test_intercept_only_model_gives_empty_table() -> None:
    d = load("penicillin")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = mixedjax.lmer("diameter ~ 1 + (1 | sample)", d)
    table = anova_terms(r)
    assert table.shape == (0, 6)


def test_bad_arguments() -> None:
    r = fit("sleepstudy")
    with pytest.raises(ValueError, match="type"):
        anova_terms(r, type=4)
    with pytest.raises(ValueError, match="ddf"):
        anova_terms(r, ddf="lme4")


def test_array_model_needs_a_formula() -> None:
    d = load("sleepstudy")
    x = np.column_stack([np.ones(len(d)), d["Days"].to_numpy(dtype=float)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = mixedjax.MixedLM(d["Reaction"].to_numpy(dtype=float), x, d["Subject"]).fit()
    with pytest.raises(ValueError, match="formula"):
        anova_terms(r)


# --------------------------------------------------------------------------------------- ranova
RANOVA_CASES = [pytest.param(key, id=key) for key in REF]


@pytest.mark.parametrize("key", RANOVA_CASES)
def test_ranova_matches_lmertest(key: str) -> None:
    ref = REF[key]["ranova"]
    data = load(REF[key]["data"])

    del data
    table = ranova(fit(key))
    assert list(table.columns) == ["npar", "logLik", "AIC", "LRT", "Df", "Pr(>Chisq)"]
    assert list(table.index) == list(np.atleast_1d(ref["rows"]))
    np.testing.assert_array_equal(table["npar"].to_numpy(), np.asarray(ref["npar"], dtype=float))
    np.testing.assert_array_equal(table["Df"].to_numpy()[1:], np.asarray(ref["Df"][1:], dtype=float))
    rtol = _rtol(key)
    for col in ("logLik", "AIC"):
        _assert_close(table[col].to_numpy(), ref[col], 1e-6, f"{key}: {col}")
    # LRT and p are differences of log-likelihoods: compare absolutely on the log-likelihood scale too
    lrt, want = table["LRT"].to_numpy()[1:], np.asarray(ref["LRT"][1:], dtype=float)
    np.testing.assert_allclose(lrt, want, rtol=rtol, atol=1e-5, err_msg=f"{key}: LRT")
    pv, want_p = table["Pr(>Chisq)"].to_numpy()[1:], np.asarray(ref["Pr(>Chisq)"][1:], dtype=float)
    np.testing.assert_allclose(pv, want_p, rtol=rtol, atol=1e-12, err_msg=f"{key}: p")


def test_ranova_on_a_mixedlm_model_equals_the_lmer_fit() -> None:
    """The same model through the statsmodels API gives lmerTest's table (the reductions need no formula)."""
    d = load("sleepstudy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", re_formula="~Days").fit()
        ref = ranova(mixedjax.lmer("Reaction ~ Days + (Days | Subject)", d))
    got = ranova(r)
    np.testing.assert_allclose(got["LRT"].to_numpy()[1:], ref["LRT"].to_numpy()[1:], rtol=1e-6)
    assert list(got.index) == list(ref.index)


def test_docstring_examples() -> None:
    import doctest

    import mixedjax.term_tests as mod

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
