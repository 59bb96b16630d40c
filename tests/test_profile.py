"""Profile-likelihood intervals (lme4's ``confint(method = "profile")``) and ``profile_re``, on every backend.

* per-group models: the lme4 reference cases (``confint_profile`` in tests/reference/*.json);
* crossed models: Penicillin, partially crossed ScotsSec and subjects x items with correlated slopes in both
  factors (references from tests/reference/make_lme4_refs.R);
* structured residuals (VarIdent, AR(1)): nlme has no profile intervals, so each checked end is verified by
  brute force: the parameter held at the end, the ML deviance minimised over everything else by scipy on
  the backend's natural-scale likelihood (:func:`mixedjax.backends.loglike_natural`), and ζ = ±z there.

The module's docstring examples run in tests/test_inference.py.
"""

from __future__ import annotations

import json
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from conftest import CASES, REF, fit_case, load_case
from scipy import stats
from scipy.optimize import minimize as sp_minimize
from threadpoolctl import threadpool_limits

import mixedjax
import mixedjax.profile as prof
from mixedjax import backends
from mixedjax.fit import RefitWarning
from mixedjax.profile import lme4_parameters, profile_conf_int, profile_re

PROFILE_CASES = [c for c in CASES if "confint_profile" in load_case(c)["results"]["lme4"]]
Z = stats.norm.ppf(0.975)

_fits: dict = {}


def _fit(key: str, make=None):
    if key not in _fits:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mixedjax.ConvergenceWarning)
            _fits[key] = make() if make is not None else fit_case(load_case(key))
    return _fits[key]


def _check_against(ci: pd.DataFrame, est: pd.Series, ref: dict, by_position: int = 0) -> float:
    """1e-3 relative, or 1e-4 x the estimate absolute where lme4's bound is 0; returns the largest relative
    difference.  lme4 interpolates a spline through a grid of the profile; we find the roots of ζ(v) = ±z
    directly, so the differences measure lme4's interpolation (largest measured: 1.7e-4, Dyestuff).
    The last ``by_position`` rows (fixed effects whose R names differ: ``sexF``) are matched by position."""
    names = list(ref["parameters"])
    got_names = list(ci.index)
    k = len(names) - by_position
    assert got_names[:k] == names[:k]
    assert len(got_names) == len(names)
    worst = 0.0
    for row, (lo, hi) in enumerate(zip(ref["lower"], ref["upper"], strict=True)):
        for got, want in ((ci.iloc[row, 0], lo), (ci.iloc[row, 1], hi)):
            if want == 0:
                assert abs(got) <= 1e-4 * max(abs(est.iloc[row]), 1e-8), (names[row], got)
            else:
                worst = max(worst, abs(got - want) / abs(want))
                assert abs(got - want) <= 1e-3 * abs(want), (names[row], got, want)
    return worst


@pytest.mark.parametrize("case_id", PROFILE_CASES)
def test_profile_intervals_match_lme4(case_id):
    ref = load_case(case_id)["results"]["lme4"]["confint_profile"]
    res = _fit(case_id)
    pr = profile_conf_int(res)
    assert list(pr.conf_int.columns) == ["2.5 %", "97.5 %"]
    _check_against(pr.conf_int, pr.estimate, ref)


def test_penicillin_crossed_matches_lme4():
    ref = load_case("penicillin_reml")["results"]["lme4"]["confint_profile"]
    res = _fit("penicillin", lambda: mixedjax.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)",
                                                   mixedjax.datasets.load("penicillin")))
    assert res.fitted.backend.kind == "crossed" and res.reml
    pr = profile_conf_int(res)
    assert _check_against(pr.conf_int, pr.estimate, ref) < 1e-4


def _ref_profile(case: str) -> dict | None:
    """``confint_profile`` of ``tests/reference/<case>.json`` (tests/reference/make_lme4_refs.R), if it has one."""
    path = REF / f"{case}.json"
    if not path.exists():
        return None
    ref = json.loads(path.read_text())["results"]["lme4"].get("confint_profile", {})
    return ref if "parameters" in ref else None


def test_scotssec_partially_crossed_matches_lme4():
    """ScotsSec (148 primary x 19 secondary schools, partially crossed; sd of ``second`` reaches 0)."""
    ref = _ref_profile("scotssec_reml")
    if ref is None:
        pytest.skip("no lme4 profile reference for ScotsSec (tests/reference/make_lme4_refs.R)")
    res = _fit("scotssec", lambda: mixedjax.lmer("attain ~ verbal * sex + (1 | primary) + (1 | second)",
                                                 mixedjax.datasets.load("scotssec")))
    pr = profile_conf_int(res)
    _check_against(pr.conf_int, pr.estimate, ref, by_position=3)


def _crossed_brute_zeta(res, fixed: str, value: float, dev_hat: float, est: float, starts: int = 1) -> float:
    """ζ at ``fixed = value`` for the subjects x items model by brute force: scipy BFGS over the subject term's
    other natural parameters (log sds, atanh of the correlation), the item term's relative factor, log σ;
    β profiled (:func:`mixedjax.backends.deviance_given`)."""
    fm = res.fitted
    backend, data = fm.backend, fm.data
    which = ["sd0", "cor", "sd1"].index({"sd_(Intercept)|subj": "sd0", "cor_cond.(Intercept)|subj": "cor",
                                         "sd_cond|subj": "sd1"}[fixed])

    def dev(x):
        full = jnp.concatenate([x[:which], jnp.zeros(1), x[which:]])
        sd0, cor, sd1 = jnp.exp(full[0]), jnp.tanh(full[1]), jnp.exp(full[2])
        sd0, cor, sd1 = [jnp.asarray(value) if i == which else p for i, p in enumerate((sd0, cor, sd1))]
        sigma = jnp.exp(full[6])
        cov = jnp.array([[sd0**2, cor * sd0 * sd1], [cor * sd0 * sd1, sd1**2]]) / sigma**2
        t_item = jnp.array([[full[3], 0.0], [full[4], full[5]]])
        ne = backend.normal([jnp.linalg.cholesky(cov), t_item], jnp.zeros(0), data)
        return backends.deviance_given(ne, backend.nobs(data), None, sigma**2, False)

    vg = jax.jit(jax.value_and_grad(dev))
    c = res.term_covs[0]
    start = np.array([np.log(np.sqrt(c[0, 0])), np.arctanh(c[0, 1] / np.sqrt(c[0, 0] * c[1, 1])),
                      np.log(np.sqrt(c[1, 1])), *fm.theta[3:5], 0.05, 0.5 * np.log(fm.sigma2)])
    start = np.delete(start, which)
    rng = np.random.default_rng(1)
    best = np.inf
    with threadpool_limits(limits=1, user_api="blas"):
        for k in range(starts):
            x0 = start + (0 if k == 0 else rng.normal(scale=0.3, size=start.size))
            out = sp_minimize(lambda x: tuple(np.asarray(t, float) for t in vg(jnp.asarray(x))), x0, jac=True,
                              method="BFGS", options={"gtol": 1e-7, "maxiter": 3000})
            best = min(best, float(out.fun))
    return float(np.sign(value - est) * np.sqrt(max(best - dev_hat, 0.0)))


def test_subjects_items_correlated_slopes_matches_lme4():
    """Crossed subjects x items with correlated slopes in both factors (singular: item correlation −1).

    Against lme4's profile of the ML fit (subjects_items_ml.json; the profile of a REML fit is that of the ML
    fit).  lme4 warns "non-monotonic profile" / "bad spline fit" for the subject correlation, and its lower
    ends of ``cor_cond.(Intercept)|subj`` (−0.333) and ``sd_cond|subj`` (1.785) are not where ζ = −z (brute
    force: ζ = −2.20 and −1.90 there; the profile's optimum pushes the other parameter to its boundary):
    those two ends are checked by brute force instead.
    """
    ref = _ref_profile("subjects_items_ml")
    if ref is None:
        pytest.skip("no lme4 profile reference for subjects x items yet (tests/reference/make_lme4_refs.R)")
    data = pd.read_csv(pathlib.Path(__file__).parent / "data" / "subjects_items.csv")
    res = _fit("subjects_items", lambda: mixedjax.lmer("y ~ cond + (1 + cond | subj) + (1 + cond | item)", data))
    assert res.fitted.backend.kind == "crossed" and res.singular
    pr = profile_conf_int(res)
    ci, est = pr.conf_int, pr.estimate
    brute = {"cor_cond.(Intercept)|subj", "sd_cond|subj"}
    lower = [np.nan if n in brute else lo for n, lo in zip(ref["parameters"], ref["lower"], strict=True)]
    ref = {**ref, "lower": lower}
    # lme4's non-monotonic rows aside, every end as lme4 (its REML-case run refitted ML less closely)
    for row, name in enumerate(ref["parameters"][:-1]):
        for col, want in ((0, ref["lower"][row]), (1, ref["upper"][row])):
            got = ci.iloc[row, col]
            if np.isnan(want):
                continue
            if want == 0 or abs(want) == 1:
                assert got == want, (name, got, want)
            else:
                assert abs(got - want) <= 1e-3 * abs(want), (name, got, want)
    assert list(ci.index[:-1]) == ref["parameters"][:-1]
    assert abs(ci.iloc[-1, 0] - ref["lower"][-1]) <= 1e-3 * abs(ref["lower"][-1])  # cond (R: cond)
    for name in sorted(brute):
        value = float(ci.loc[name].iloc[0])
        zeta = _crossed_brute_zeta(res, name, value, pr.deviance, float(est[name]))
        assert abs(zeta + Z) <= 1e-3, (name, value, zeta)


# ------------------------------------------------------------------------------ structured residuals
def _orthodont_ml():
    return _fit("orthodont_ml", lambda: mixedjax.mixedlm(
        "distance ~ age + Sex", mixedjax.datasets.load("orthodont"), groups="Subject",
        residual=mixedjax.VarIdent("Sex")).fit(reml=False))


def _oxboys_ml():
    return _fit("oxboys_ml", lambda: mixedjax.mixedlm(
        "height ~ age", mixedjax.datasets.load("oxboys"), groups="Subject",
        residual=mixedjax.AR1(time="age")).fit(reml=False))


def _brute_zeta(res, name: str, value: float, dev_hat: float, est: float) -> float:
    """ζ at ``name = value`` by brute force: scipy BFGS over everything else on −2 × the backend's natural-scale
    log-likelihood (ML; free: the random-intercept variance as a², log ratios / atanh φ, log σ², β)."""
    fm = res.fitted
    backend, data = fm.backend, fm.data
    assert [t.q for t in backend.terms] == [1]
    nat = backends.natural_from_fit(backend, fm.theta_full, fm.sigma2)  # (var, residual natural...)
    k = backend.n_rho
    names = ["sd_(Intercept)|Subject", *res.model.residual_param_names, "sigma"]
    pos = names.index(name)

    def unpack(x):
        full = jnp.concatenate([x[:pos], jnp.zeros(1), x[pos:]])  # placeholder at the fixed slot
        a, rho, log_s2, beta = full[0], full[1 : 1 + k], full[1 + k], full[2 + k :]
        var, rnat, s2 = a**2, backend.rho_to_natural(rho), jnp.exp(log_s2)
        if pos == 0:
            var = jnp.asarray(value**2)
        elif pos <= k:
            rnat = rnat.at[pos - 1].set(value)
        else:
            s2 = jnp.asarray(value**2)
        return jnp.concatenate([jnp.atleast_1d(var), rnat, jnp.atleast_1d(s2)]), beta

    def dev(x):
        v, beta = unpack(x)
        return -2.0 * backends.loglike_natural(backend, v, beta, data, False)

    vg = jax.jit(jax.value_and_grad(dev))
    start = np.concatenate([[np.sqrt(nat[0])], np.asarray(fm.rho), [np.log(fm.sigma2)], fm.beta])
    start = np.delete(start, pos)
    if pos != 0:
        start[0] = max(start[0], 0.5)  # off the a = 0 stationary point (Oxboys: the ML variance is 0)
    out = sp_minimize(lambda x: tuple(np.asarray(t, float) for t in vg(jnp.asarray(x))), start, jac=True,
                      method="BFGS", options={"gtol": 1e-9, "maxiter": 2000})
    return float(np.sign(value - est) * np.sqrt(max(float(out.fun) - dev_hat, 0.0)))


@pytest.mark.parametrize(("model", "checks"), [
    ("orthodont", [("sd ratio Female", 1), ("sd_(Intercept)|Subject", 0)]),
    ("oxboys", [("Phi", 0), ("sigma", 1)]),
])
def test_structured_residuals_brute_force(model, checks):
    """VarIdent (Orthodont) and AR(1) (Oxboys), ML fits: residual parameters get rows named as in ``params``;
    at the checked ends a brute-force minimisation of the ML deviance gives ζ = ±z to 1e-3."""
    res = _orthodont_ml() if model == "orthodont" else _oxboys_ml()
    pr = profile_conf_int(res)
    ci = pr.conf_int
    rho_names = list(res.model.residual_param_names)
    assert rho_names and all(n in res.params.index for n in rho_names)
    assert list(ci.index) == [p.name for p in lme4_parameters(res)]
    assert list(ci.index[1 : 1 + len(rho_names)]) == rho_names
    assert np.all(np.isfinite(ci.to_numpy())) and np.all(ci.iloc[:, 0] <= pr.estimate) and np.all(
        pr.estimate <= ci.iloc[:, 1])
    assert pr.deviance == -2.0 * res.llf
    for name, col in checks:
        value = float(ci.loc[name].iloc[col])
        zeta = _brute_zeta(res, name, value, pr.deviance, float(pr.estimate[name]))
        assert abs(zeta - (Z if col else -Z)) <= 1e-3, (name, value, zeta)


# ---------------------------------------------------------------------------------------------- API
def test_reml_fit_is_refitted_by_ml_and_refit_failures_are_reported(monkeypatch):
    res = _fit("dyestuff_reml")
    ml = _fit("dyestuff_ml")
    a, b = profile_conf_int(res), profile_conf_int(ml)
    assert abs(a.deviance - b.deviance) <= 1e-8 and np.allclose(a.conf_int, b.conf_int, rtol=1e-5)
    pd.testing.assert_frame_equal(res.conf_int(method="profile"), a.conf_int)  # the results API
    # a refit that stops early warns (never silently)
    real = prof.refit

    def short(fm, **kw):
        return real(fm, maxiter=1, **kw)

    monkeypatch.setattr(prof, "refit", short)
    with pytest.warns(RefitWarning, match="ML refit for the profile"):
        prof.ml_fit(_fit("sleepstudy_corr_reml"))


def test_profile_re_random_intercept_is_the_likelihood_at_that_variance():
    """With one variance parameter nothing is re-estimated but the (closed-form) scale and β."""
    res = _fit("dietox_ri_reml")
    pr = res.profile_re(0, "re", dist_low=5.0, dist_high=5.0)  # 11 points, as the docstring example
    assert pr.shape == (11, 2)
    assert abs(pr[5, 1] - res.llf) <= 1e-8 and abs(pr[5, 0] - res.cov_re.iloc[0, 0]) <= 1e-6
    assert np.all(pr[:, 1] <= res.llf + 1e-9)
    # statsmodels' grid: relative variances from (var - 5) / scale to (var + 5) / scale
    var0 = res.cov_re.iloc[0, 0]
    grid = np.concatenate([np.linspace((var0 - 5) / res.scale, var0 / res.scale, 6),
                           np.linspace(var0 / res.scale, (var0 + 5) / res.scale, 6)[1:]])
    fm = res.fitted
    for x, (var, llf) in zip(grid, pr, strict=True):
        ll = res.model.loglike(np.concatenate([res.fe_params.to_numpy(), [x]]), reml=True)
        assert abs(ll - llf) <= 1e-8
        s2 = float(backends.profiled_jit(fm.backend, jnp.sqrt(jnp.array([x])), fm.data, True).sigma2)
        assert abs(var - x * s2) <= 1e-9 * var


def test_profile_re_random_slope_against_brute_force():
    res = _fit("sleepstudy_corr_reml")
    fm = res.fitted
    pr = res.profile_re(1, "re", num_low=1, dist_low=10.0, num_high=1, dist_high=10.0)
    # at the grid point below the estimate: relative slope variance x fixed, maximise over the rest
    x = (res.cov_re.iloc[1, 1] - 10.0) / res.scale

    @jax.jit
    def dev_jit(free):
        # T with the slope's row fixed: T Tᵀ has (1, 1) entry x; the intercept row free
        t = jnp.array([[free[0], free[1]], [0.0, np.sqrt(x)]])
        ne = fm.backend.normal([t], jnp.zeros(0), fm.data)
        return backends.deviance_given(ne, fm.backend.nobs(fm.data), None, None, True)

    def dev(free):
        return float(dev_jit(jnp.asarray(free)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        best = min((sp_minimize(dev, s, method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12,
                                                                       "maxiter": 5000})
                    for s in ([0.9, 0.0], [0.5, 0.2], [1.2, -0.2])), key=lambda o: o.fun)
    assert abs(pr[0, 1] - (-0.5 * best.fun)) <= 1e-6
    assert abs(pr[1, 1] - res.llf) <= 1e-8
    with pytest.raises(ValueError, match="negative variance"):
        res.profile_re(1, "re", dist_low=1e6)
    with pytest.raises(ValueError, match="vtype"):
        res.profile_re(0, "xx")


def test_profile_re_variance_component_and_crossed():
    """``vtype="vc"`` by statsmodels' name or position; a crossed model's second term (generic backends)."""
    res = _fit("pastes_reml")
    a = profile_re(res, "cask", "vc", num_low=1, dist_low=1.0, num_high=1, dist_high=1.0)
    b = profile_re(res, 0, "vc", num_low=1, dist_low=1.0, num_high=1, dist_high=1.0)
    assert np.allclose(a, b) and abs(a[1, 1] - res.llf) <= 1e-8 and abs(a[1, 0] - res.vcomp[0]) <= 1e-8
    assert a[0, 1] < res.llf and a[2, 1] < res.llf
    with pytest.raises(ValueError, match="unknown variance component"):
        profile_re(res, "nope", "vc")
    pen = _fit("penicillin", lambda: mixedjax.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)",
                                                   mixedjax.datasets.load("penicillin")))
    c = profile_re(pen, "sample", "vc", num_low=1, dist_low=1.0, num_high=1, dist_high=1.0)
    assert abs(c[1, 1] - pen.llf) <= 1e-7 and abs(c[1, 0] - pen.term_covs[1][0, 0]) <= 1e-6
    assert c[0, 1] < pen.llf and c[2, 1] < pen.llf
