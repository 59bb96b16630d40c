"""Prediction (population level with SEs; conditional on every model kind, new levels, ``re_form``) and lme4's
condVar table, against lme4 and nlme.

References: ``tests/reference/<case>.json`` (lme4's first conditional modes of the shared cases; the crossed
cases' ``predictions`` blocks once they exist) and ``tests/reference/predict_crossed.json``, written by
``tests/reference/predict_crossed.R``: lme4 ``predict(newdata, allow.new.levels = TRUE)``, ``re.form`` with
one term and ``re.form = NA``, ``as.data.frame(ranef(fit, condVar = TRUE))`` for every level (lme4 evaluated
at the polished reference θ of ``tests/reference/<case>_reml.json``), and nlme ``predict(level = 0:1)`` for
VarIdent and AR(1) fits.
"""

from __future__ import annotations

import json
import pathlib
import pickle
import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import CASES, REF, fit_case, load_case

import mixedjax
from mixedjax.fit import estimates
from mixedjax.predict import lme4_terms, predict, term_masks
from mixedjax.results import MixedLMResults

_fits: dict = {}


def _fit(case_id):
    if case_id not in _fits:
        _fits[case_id] = fit_case(load_case(case_id))
    return _fits[case_id]


def _quiet(f, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mixedjax.ConvergenceWarning)
        return f(*args, **kwargs)


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


# ------------------------------------------------------------------------------------ lme4 / nlme references
PRED = json.loads((REF / "predict_crossed.json").read_text())
DATA = pathlib.Path(__file__).parent / "data"

MIXEDLM_EQUIVALENT = {  # the lme4 case as a mixedlm model (same likelihood)
    "sleepstudy_corr": ("Reaction ~ Days", {"groups": "Subject", "re_formula": "~Days"}),
    "sleepstudy_indep": ("Reaction ~ Days", {"groups": "Subject", "vc_formula": {"Days": "0 + Days"}}),
    "pastes": ("strength ~ 1", {"groups": "batch", "vc_formula": {"cask": "0 + C(cask)"}}),
}


def _data(case: str) -> pd.DataFrame:
    if case.startswith("subjects_items"):
        return pd.read_csv(DATA / "subjects_items.csv", dtype={"subj": str, "item": str})
    return mixedjax.datasets.load({"sleepstudy_corr": "sleepstudy", "sleepstudy_indep": "sleepstudy"}.get(case, case))


def _lme4_fit(case: str, api: str):
    key = (case, api)
    if key not in _fits:
        d = _data(case)
        if api == "lmer":
            _fits[key] = _quiet(mixedjax.lmer, PRED["lme4"][case]["formula"], d)
        else:
            formula, kw = MIXEDLM_EQUIVALENT[case]
            _fits[key] = _quiet(lambda: mixedjax.mixedlm(formula, d, **kw).fit())
    return _fits[key]


def _at_theta(res, theta):
    """The results of ``res``'s model evaluated at a given θ (the reference's): isolates prediction from fit."""
    fm = res.fitted
    return _quiet(MixedLMResults, res.model, estimates(fm.backend, fm.data, np.asarray(theta, float), fm.reml,
                                                       fm.solution, fm.rows))


def _rel(got, want, floor: float = 0.0) -> float:
    got, want = np.asarray(got, float), np.asarray(want, float)
    return float(np.max(np.abs(got - want) / np.maximum(np.abs(want), floor)))


def _condval_rel(cv: pd.DataFrame, ref: pd.DataFrame) -> float:
    """Largest relative difference of the conditional modes, each floored at 1e-3 of its column's largest
    |mode| (a mode near 0 has no relative precision)."""
    out = 0.0
    for (_, _), sub in ref.groupby(["grpvar", "term"], sort=False):
        got = cv.loc[list(zip(sub.grpvar, sub.term, sub.grp, strict=True)), "condval"].to_numpy()
        want = sub.condval.to_numpy()
        floor = 1e-3 * np.abs(want).max()
        out = max(out, float(np.max(np.abs(got - want) / np.maximum(np.abs(want), floor))))
    return out


LME4_RUNS = [(c, "lmer") for c in PRED["lme4"]] + [(c, "mixedlm") for c in MIXEDLM_EQUIVALENT]


@pytest.mark.parametrize(("case", "api"), LME4_RUNS)
def test_condvar_all_levels_in_lme4_order(case, api):
    """``condvar()`` is ``as.data.frame(ranef(fit, condVar = TRUE))``: the same rows in the same order, every
    level; condval and condsd 1e-4 relative (a mode floored at 1e-3 of its column's largest |mode|)."""
    res = _lme4_fit(case, api)
    ref = pd.DataFrame(PRED["lme4"][case]["condvar"])
    cv = res.condvar()
    assert list(cv.columns) == ["grpvar", "term", "grp", "condval", "condsd"]
    assert list(zip(cv.grpvar, cv.term, cv.grp, strict=True)) == list(zip(ref.grpvar, ref.term, ref.grp, strict=True))
    assert _condval_rel(cv.set_index(["grpvar", "term", "grp"]), ref) <= 1e-4
    assert _rel(cv.condsd, ref.condsd) <= 1e-4


@pytest.mark.parametrize(("case", "api"), LME4_RUNS)
def test_predictions_match_lme4(case, api):
    """lme4's ``predict(newdata, allow.new.levels = TRUE)`` (levels not in the fit: random effect 0),
    ``re.form`` with some terms, ``re.form = NA``, and the fitted values: 1e-6 relative (1e-5 singular).

    The reference is lme4 at the polished reference θ; what is left is the difference of the fits' θ (at
    lme4's θ the same predictions agree to 1e-10: :func:`test_crossed_at_lme4_theta`)."""
    res = _lme4_fit(case, api)
    ref = PRED["lme4"][case]
    new = pd.DataFrame(ref["newdata"])
    tol = 1e-5 if res.singular else 1e-6
    assert _rel(predict(res, new, conditional=True), ref["predict_all"]) <= tol
    assert _rel(res.predict(new, conditional=True), ref["predict_all"]) <= tol
    for rf in ref["predict_re_form"]:
        assert _rel(predict(res, new, re_form=rf["re_form"]), rf["values"]) <= tol, rf["re_form"]
    assert _rel(predict(res, new, re_form="~0"), ref["predict_fixed"]) <= tol
    assert _rel(predict(res, new, re_form=np.nan), ref["predict_fixed"]) <= tol
    assert _rel(res.predict(new), ref["predict_fixed"]) <= tol
    assert _rel(predict(res, conditional=True), ref["fitted"]) <= tol
    assert _rel(res.fittedvalues, ref["fitted"]) <= tol


@pytest.mark.parametrize("case", ["penicillin", "scotssec", "subjects_items"])
def test_crossed_at_lme4_theta(case):
    """At lme4's θ the crossed conditional modes, sds and predictions agree to rounding: what is left in the
    end-to-end comparisons above is the fit's θ, not the prediction."""
    ref = PRED["lme4"][case]
    res = _at_theta(_lme4_fit(case, "lmer"), ref["theta"])
    cv = res.condvar()
    rcv = pd.DataFrame(ref["condvar"])
    assert _rel(cv.condval, rcv.condval) <= 1e-7
    assert _rel(cv.condsd, rcv.condsd) <= 1e-9
    new = pd.DataFrame(ref["newdata"])
    assert _rel(predict(res, new, conditional=True), ref["predict_all"]) <= 1e-10
    for rf in ref["predict_re_form"]:
        assert _rel(predict(res, new, re_form=rf["re_form"]), rf["values"]) <= 1e-10


NLME = {"orthodont_varident": ("orthodont", "distance ~ age + Sex", mixedjax.VarIdent("Sex")),
        "oxboys_ar1": ("oxboys", "height ~ age", mixedjax.AR1(time="age"))}


def _nlme_fit(case: str):
    if ("nlme", case) not in _fits:
        name, formula, residual = NLME[case]
        _fits[("nlme", case)] = _quiet(lambda: mixedjax.mixedlm(formula, mixedjax.datasets.load(name),
                                                                groups="Subject", residual=residual).fit())
    return _fits[("nlme", case)]


@pytest.mark.parametrize("case", list(NLME))
def test_structured_residuals_match_nlme_levels(case):
    """Conditional prediction with VarIdent / AR(1) residuals is nlme's ``predict(level = 1)``, ``x β̂ + z b̂``
    (no kriging of the residual); ``level = 0`` is the population level.  1e-6 relative (nlme fitted with
    tight tolerances; its REML logLik agrees with ours to 1e-7)."""
    ref = PRED["nlme"][case]
    res = _nlme_fit(case)
    assert abs(res.llf - ref["logLik"]) <= 1e-6
    new = pd.DataFrame(ref["newdata"])
    assert _rel(res.predict(new), ref["predict_level0"]) <= 1e-6
    assert _rel(res.predict(new, conditional=True), ref["predict_level1"]) <= 1e-6
    assert _rel(res.predict(conditional=True), ref["fitted_level1"]) <= 1e-6
    assert _rel(res.fittedvalues, ref["fitted_level1"]) <= 1e-6


def _shared_predictions(case):
    path = REF / f"{case}_reml.json"
    if not path.exists():
        return None
    out = json.loads(path.read_text())
    return out if "predictions" in out["results"] else None


@pytest.mark.parametrize("case", ["penicillin", "scotssec", "subjects_items"])
def test_crossed_reference_predictions_block(case):
    """The ``predictions`` block and the every-level conditional modes of the crossed reference fits
    (``tests/reference/make_lme4_refs.R``), where they exist."""
    ref = _shared_predictions(case)
    if ref is None:
        pytest.skip(f"tests/reference/{case}_reml.json has no predictions block yet")
    res = _quiet(mixedjax.lmer, ref["model"]["lme4"], _data(case))
    tol = 1e-5 if res.singular else 1e-6
    pr = ref["results"]["predictions"]
    new = pd.DataFrame(pr["newdata"])
    assert _rel(predict(res, new, conditional=True), pr["all_terms"]["values"]) <= tol
    assert _rel(predict(res, new, re_form=pr["first_term"]["re_form"]), pr["first_term"]["values"]) <= tol
    assert _rel(predict(res, new, re_form="~0"), pr["fixed_only"]["values"]) <= tol
    cv = res.condvar().set_index(["grpvar", "term", "grp"])
    for block in ref["results"]["lme4"]["conditional_modes"]:
        modes = np.atleast_2d(np.asarray(block["conditional_mode"], float))
        sds = np.atleast_2d(np.asarray(block["conditional_sd"], float))
        for j, term in enumerate(block["terms"]):
            rows = [(block["group"], term, lev) for lev in block["levels"]]
            got = cv.loc[rows]
            want = modes[:, j]
            assert _rel(got.condval, want, 1e-3 * np.abs(want).max()) <= 1e-4, (block["group"], term)
            assert _rel(got.condsd, sds[:, j]) <= 1e-4, (block["group"], term)


# ------------------------------------------------------------------------------------ every model kind
def _kinds():
    sleep = mixedjax.datasets.load("sleepstudy")
    w = sleep.assign(w=1.0 + sleep.Days % 3)
    return {
        "intercept": lambda: mixedjax.mixedlm("Reaction ~ Days", sleep, groups="Subject").fit(),
        "slope": lambda: _lme4_fit("sleepstudy_corr", "mixedlm"),
        "lmer_weights": lambda: mixedjax.lmer("Reaction ~ Days + (Days | Subject)", w, weights="w"),
        "vc": lambda: _lme4_fit("pastes", "mixedlm"),
        "lmer_nested": lambda: _lme4_fit("pastes", "lmer"),
        "varident": lambda: _nlme_fit("orthodont_varident"),
        "ar1": lambda: _nlme_fit("oxboys_ar1"),
        "penicillin": lambda: _lme4_fit("penicillin", "lmer"),
        "scotssec": lambda: _lme4_fit("scotssec", "lmer"),
        "subjects_items": lambda: _lme4_fit("subjects_items", "lmer"),
    }


KINDS = ["intercept", "slope", "lmer_weights", "vc", "lmer_nested", "varident", "ar1", "penicillin", "scotssec",
         "subjects_items"]


def _kind(name):
    if ("kind", name) not in _fits:
        _fits[("kind", name)] = _quiet(_kinds()[name])
    return _fits[("kind", name)]


@pytest.mark.parametrize("kind", KINDS)
def test_every_model_kind(kind):
    """On every model kind: conditional prediction on the fit's own rows is ``fittedvalues`` (Xβ̂ + Zb̂); rows
    whose levels are all new are at the population level; ``re_form="~0"`` is the population level; condvar
    has one row per level and column of every term, with finite sds."""
    res = _kind(kind)
    m = res.model
    data = m.data
    fitted = np.asarray(res.fittedvalues)
    np.testing.assert_allclose(predict(res, data, conditional=True), fitted, rtol=1e-10)
    np.testing.assert_allclose(res.predict(conditional=True), fitted, rtol=1e-10)
    np.testing.assert_allclose(predict(res, data, re_form="~0"), m.exog @ res.fe_params.to_numpy(), rtol=1e-12)
    new = data.head(3).copy()
    for info in m.term_info:
        for col in info.factor.split(":"):
            new[col] = new[col].astype(str) + "_unseen"
    np.testing.assert_allclose(predict(res, new, conditional=True), predict(res, new), rtol=1e-12)
    cv = res.condvar()
    assert len(cv) == sum(t.n_levels * t.q for t in m.term_info)
    assert np.all(np.isfinite(cv.condsd)) and np.all(cv.condsd >= 0)


def test_pickled_results_predict():
    """The lmer machinery a per-group model keeps for new data survives pickling."""
    res = _kind("lmer_nested")
    new = pd.DataFrame({"batch": ["A", "Z"], "cask": ["b", "a"]})
    back = pickle.loads(pickle.dumps(res))
    np.testing.assert_allclose(back.predict(new, conditional=True), res.predict(new, conditional=True), rtol=1e-14)


# ------------------------------------------------------------------------------------ re_form
def test_re_form_selects_columns_as_lme4():
    """``re_form`` names terms by their bars: ``(1 | Subject)`` on a ``(1 + Days | Subject)`` model keeps the
    intercepts only (lme4 matches the columns); ``(1 | batch/cask)`` means ``batch`` and ``cask:batch``; a list
    of term labels keeps whole terms; unknown factors or columns are errors."""
    slope = _kind("slope")
    assert [mk.tolist() for mk in term_masks(slope, "~(1 | Subject)")] == [[True, False]]
    assert [mk.tolist() for mk in term_masks(slope, "~ (0 + Days | Subject)")] == [[False, True]]
    assert [mk.tolist() for mk in term_masks(slope, ["Subject"])] == [[True, True]]
    assert [mk.tolist() for mk in term_masks(slope, [])] == [[False, False]]
    nested = _kind("lmer_nested")
    assert [mk.tolist() for mk in term_masks(nested, "~(1 | batch/cask)")] == [[True], [True]]
    assert [mk.tolist() for mk in term_masks(nested, "~(1 | cask:batch)")] == [[False], [True]]
    assert [mk.tolist() for mk in term_masks(nested, "NA")] == [[False], [False]]
    new = pd.DataFrame({"Days": [3.0], "Subject": ["309"]})
    b = slope.random_effects["309"]
    beta = slope.fe_params.to_numpy()
    got = predict(slope, new, re_form="~(1 | Subject)").iloc[0]
    assert abs(got - (beta[0] + b["Group"] + 3 * beta[1])) <= 1e-9
    with pytest.raises(ValueError, match="grouping factor 'plate'"):
        term_masks(slope, "~(1 | plate)")
    with pytest.raises(ValueError, match="not in the model"):
        term_masks(slope, "~(0 + Reaction | Subject)")
    with pytest.raises(ValueError, match="no random-effects term"):
        term_masks(slope, "~Days")
    with pytest.raises(ValueError, match="does not have"):
        term_masks(slope, ["plate"])
    with pytest.raises(ValueError, match="standard errors"):
        predict(slope, new, re_form="~(1 | Subject)", se=True)
    p = predict(slope, new, re_form="~0", se=True)  # the population level has standard errors
    assert abs(p["mean"].iloc[0] - (beta[0] + 3 * beta[1])) <= 1e-9


def test_condvar_groups_terms_of_one_factor():
    """Terms on the same factor share ``grpvar`` (lme4's ranef merges them); lme4's term order (more levels
    first) decides the order of the factors."""
    cv = _lme4_fit("sleepstudy_indep", "lmer").condvar()
    assert cv.grpvar.unique().tolist() == ["Subject"]
    assert cv.term.unique().tolist() == ["(Intercept)", "Days"]
    cv = _kind("vc").condvar()
    assert cv.grpvar.unique().tolist() == ["cask:batch", "batch"]
    assert cv.grp.head(3).tolist() == ["a:A", "a:B", "a:C"]  # R's cask:batch level order


def test_lme4_terms_compat():
    """``lme4_terms`` (older per-group callers) lists the terms in lme4's order."""
    terms = lme4_terms(_kind("vc").model)
    assert [(t["group"], t["kind"], t["n_levels"]) for t in terms] == [("cask:batch", "vc", 30), ("batch", "re", 10)]


# ------------------------------------------------------------------------------------ population level, errors
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
    new = pd.DataFrame({"batch": ["A", "A", "Z", "A"], "cask": ["a", "b", "a", "new cask"]})
    got = res.predict(new, conditional=True).to_numpy()
    re_a = res.random_effects["A"]
    mu = res.fe_params.iloc[0]
    assert abs(got[0] - (mu + re_a["Group"] + re_a["C(cask)[a]"])) <= 1e-9
    assert abs(got[1] - (mu + re_a["Group"] + re_a["C(cask)[b]"])) <= 1e-9
    assert abs(got[2] - mu) <= 1e-9
    assert abs(got[3] - (mu + re_a["Group"])) <= 1e-9  # a cask the fit did not see: its effect is 0


def test_crossed_missing_columns_and_unseen_fixed_levels():
    res = _lme4_fit("scotssec", "lmer")
    new = pd.DataFrame({"verbal": [1.0], "sex": ["F"], "primary": ["1"], "second": ["9"]})
    with pytest.raises(ValueError, match="second"):
        predict(res, new.drop(columns="second"), conditional=True)
    # a term left out by re_form needs no columns
    got = predict(res, new.drop(columns="second"), re_form="~(1 | primary)").iloc[0]
    want = predict(res, new, re_form="~0").iloc[0] + res.random_effects["primary"].loc["1"].iloc[0]
    assert abs(got - want) <= 1e-9
    with pytest.raises(ValueError, match="fixed-effects factor"):
        predict(res, new.assign(sex="X"))


def test_predict_array_model_population_only():
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(10), 5)
    x = np.column_stack([np.ones(50), rng.normal(size=50)])
    y = x @ [1.0, 2.0] + rng.normal(size=10)[g] + rng.normal(size=50)
    res = mixedjax.MixedLM(y, x, g).fit()
    np.testing.assert_allclose(res.predict(x[:3]), x[:3] @ res.fe_params.to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(res.predict(conditional=True), res.fittedvalues, rtol=1e-12)
    with pytest.raises(ValueError, match="DataFrame"):
        res.predict(x[:3], conditional=True)
    assert len(res.condvar()) == 10
