"""lme4 formula syntax (:func:`mixedjax.lmer`): the parser, and single-factor / nested models on the per-group path.

Reference numbers are lme4 1.1-31 fits polished to ~1e-9 (tests/reference); tolerances as in
test_reference.py: logLik 1e-6 absolute, fixed effects 1e-6 and variances 1e-4 relative.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
from conftest import case_data, load_case, rel

import mixedjax

lmer_mod = sys.modules["mixedjax.lmer"]


# ------------------------------------------------------------------ parser
def test_split_formula_terms():
    y, fixed, bars = lmer_mod.split_formula("y ~ x + (1 + x | g) + z + (0 + x || h) + (1 | a/b) + (1 | a:b)")
    assert y == "y"
    assert fixed.replace(" ", "") == "x+z"
    assert [(b.expr, b.group, b.double) for b in bars] == [
        ("1 + x", "g", False), ("0 + x", "h", True), ("1", "a/b", False), ("1", "a:b", False)]
    assert lmer_mod.split_formula("d ~ 1 + (1|p) + (1|s)")[1] == "1"
    assert lmer_mod.split_formula("d ~ (1|p)")[1] == "1"
    # parentheses that are not bars stay in the fixed part
    assert "np.log(x)" in lmer_mod.split_formula("y ~ np.log(x) + (1 | g)")[1]


@pytest.mark.parametrize("formula, fragment", [
    ("y ~ x + (1 + x | )", "(1 + x | )"),
    ("y ~ x + ( | g)", "( | g)"),
    ("y ~ x + (1 | g | h)", "(1 | g | h)"),
    ("y ~ x + (1 | g + h)", "(1 | g + h)"),
    ("y ~ x + (1 | g", "(1 | g"),
    ("y ~ x + 1 | g", "'|' outside parentheses"),
])
def test_malformed_bars_name_the_term(formula, fragment):
    with pytest.raises(ValueError) as e:
        lmer_mod.split_formula(formula)
    assert fragment in str(e.value)


def test_unknown_columns_name_the_term(sleepstudy):
    with pytest.raises(ValueError, match=r"\(1 \| nope\).*'nope'"):
        mixedjax.lmer("Reaction ~ Days + (1 | nope)", sleepstudy)
    with pytest.raises(ValueError, match="Dayz"):
        mixedjax.lmer("Reaction ~ Days + (Dayz | Subject)", sleepstudy)
    with pytest.raises(ValueError, match="no random-effects term"):
        mixedjax.lmer("Reaction ~ Days", sleepstudy)


def test_expansion_names_like_lme4():
    d = mixedjax.datasets.load("pastes")
    _, _, bars = lmer_mod.split_formula("strength ~ 1 + (1 | batch/cask)")
    terms = lmer_mod.expand_terms(bars, d)
    assert [(t.factor, t.n_levels) for t in terms] == [("cask:batch", 30), ("batch", 10)]
    assert terms[0].levels[0] == "a:A"
    s = mixedjax.datasets.load("sleepstudy")
    _, _, bars = lmer_mod.split_formula("Reaction ~ Days + (Days || Subject)")
    terms = lmer_mod.expand_terms(bars, s)
    assert [(t.label, t.names) for t in terms] == [("Subject", ["(Intercept)"]), ("Subject.1", ["Days"])]


# ------------------------------------------------------- per-group models
def _check(res, case_id):
    ref = load_case(case_id)["results"]["lme4"]
    assert res.converged
    assert abs(res.llf - ref["logLik"]) <= 1e-6
    fe = np.array(ref["fixed_effects"]["estimate"])
    np.testing.assert_allclose(res.fe_params.to_numpy(), fe, rtol=1e-6, atol=1e-6 * np.abs(fe).max())
    np.testing.assert_allclose(res.bse_fe.to_numpy(), ref["fixed_effects"]["std_error"], rtol=1e-4)
    total = ref["residual_variance"] + sum(np.trace(np.atleast_2d(t["covariance"])) for t in ref["random_effects"])
    want = sorted(v for t in ref["random_effects"]
                  for v in np.atleast_2d(t["covariance"])[np.tril_indices(len(t["terms"]))])
    vc = res.varcorr()
    got = sorted(vc.loc[vc.group != "Residual", "vcov"])
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert rel(g, w, 1e-6 * total) <= 1e-4
    assert rel(res.scale, ref["residual_variance"], 1e-6 * total) <= 1e-4


@pytest.mark.parametrize("case_id", ["sleepstudy_corr_reml", "sleepstudy_indep_ml"])
def test_single_factor_matches_lme4(case_id):
    case = load_case(case_id)
    res = mixedjax.lmer(case["model"]["lme4"], case_data(case), reml=case["method"] == "REML")
    _check(res, case_id)


def test_uncorrelated_bars_equal_expanded_terms(sleepstudy):
    a = mixedjax.lmer("Reaction ~ Days + (Days || Subject)", sleepstudy, reml=False)
    _check(a, "sleepstudy_indep_ml")
    vc = a.varcorr()
    assert list(vc.group) == ["Subject", "Subject.1", "Residual"]
    assert list(vc.var1[:2]) == ["(Intercept)", "Days"]
    re = a.random_effects
    assert list(re) == ["Subject"] and list(re["Subject"].columns) == ["(Intercept)", "Days"]


def test_weights_match_lme4():
    case = load_case("sleepstudy_weighted_reml")
    df = case_data(case)
    res = mixedjax.lmer(case["model"]["lme4"], df, weights=df[case["model"]["weights"]["column"]])
    _check(res, "sleepstudy_weighted_reml")
    res2 = mixedjax.lmer(case["model"]["lme4"], df, weights="w")
    assert res2.llf == pytest.approx(res.llf, abs=1e-9)


def test_correlated_layout_and_summary(sleepstudy):
    res = mixedjax.lmer("Reaction ~ Days + (Days | Subject)", sleepstudy)
    vc = res.varcorr()
    assert list(vc.group) == ["Subject"] * 3 + ["Residual"]
    assert (vc.var1[2], vc.var2[2]) == ("(Intercept)", "Days")
    assert vc.sdcor[2] == pytest.approx(0.0655, abs=1e-3)  # lme4: Corr 0.07
    # the same fit as statsmodels-style mixedlm
    ref = mixedjax.mixedlm("Reaction ~ Days", sleepstudy, groups="Subject", re_formula="~Days").fit()
    assert res.llf == pytest.approx(ref.llf, abs=1e-8)
    re = res.random_effects["Subject"]
    np.testing.assert_allclose(re.loc["308"].to_numpy(), ref.random_effects["308"].to_numpy(), atol=1e-6)
    text = str(res.summary())
    assert "Random effects (one block per term)" in text and "(Days | Subject)" in text
    assert isinstance(res, mixedjax.MixedLMResults)


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_nested_equals_vc_formula(method):
    """Pastes: (1 | batch/cask) through lmer equals the statsmodels-style variance-component fit, and lme4."""
    d = mixedjax.datasets.load("pastes")
    reml = method == "REML"
    a = mixedjax.lmer("strength ~ 1 + (1 | batch/cask)", d, reml=reml)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mixedjax.ConvergenceWarning)
        b = mixedjax.mixedlm("strength ~ 1", d, groups="batch", vc_formula={"cask": "0 + C(cask)"}).fit(reml=reml)
    assert a.llf == pytest.approx(b.llf, abs=1e-8)
    np.testing.assert_allclose(a.vcomp, b.vcomp, rtol=1e-6)
    np.testing.assert_allclose(a.cov_re.to_numpy(), b.cov_re.to_numpy(), rtol=1e-6)
    _check(a, f"pastes_{method.lower()}")
    vc = a.varcorr()
    assert list(vc.group) == ["cask:batch", "batch", "Residual"]
    re = a.random_effects
    assert set(re) == {"cask:batch", "batch"} and re["cask:batch"].shape == (30, 1)
    # conditional modes of lme4 for the first levels of each factor
    for cm in load_case(f"pastes_{method.lower()}")["results"]["lme4"]["conditional_modes"]:
        got = re[cm["group"]].loc[cm["levels"]].to_numpy().ravel()
        np.testing.assert_allclose(got, np.ravel(cm["conditional_mode"]), rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("name", ["mixedjax.lmer", "mixedjax.crossed_data", "mixedjax.crossed_likelihood",
                                  "mixedjax.dfo", "mixedjax.residuals"])
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_lmer_summary_with_small_sample_df():
    d = mixedjax.datasets.load("sleepstudy")
    r = mixedjax.lmer("Reaction ~ Days + (Days | Subject)", d)
    text = str(r.summary(ddf="satterthwaite"))
    assert "Random effects (one block per term)" in text and "17.000" in text
