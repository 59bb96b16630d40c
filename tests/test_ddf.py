"""Small-sample df (mixedjax.ddf): Satterthwaite and Kenward–Roger on every backend.

Checked against lmerTest / pbkrtest (the reference JSON), against a dense ``n × n``
translation of pbkrtest's ``vcovAdj`` (independent of the Woodbury algebra of
:class:`mixedjax.ddf.KenwardRoger`), against the numbers of the former per-group
implementation, and, for structured residuals (no lmerTest counterpart), against finite
differences of the deviance and of Cov(β̂).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from conftest import REF, fit_case, load_case

import mixedjax
from mixedjax import backends, ddf
from mixedjax import terms as tm
from mixedjax.fit import with_rows

DATA = REF.parent / "data"
_fits: dict = {}


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mixedjax.ConvergenceWarning)
        return fn()


def _fit(key: str) -> mixedjax.MixedLMResults:
    """One fit per model kind, shared by the tests of this module."""
    if key not in _fits:
        _fits[key] = _quiet(MODELS[key]) if key in MODELS else fit_case(load_case(key))
    return _fits[key]


def _sleepstudy_weighted():
    d = mixedjax.datasets.load("sleepstudy")
    d["w"] = 1.0 + d.Days % 3
    return mixedjax.lmer("Reaction ~ Days + (Days | Subject)", d, weights="w")


def _zero_slope_levels():
    """Random slopes where the covariate is 0 on every row of some groups: a level's slope column is empty."""
    rng = np.random.default_rng(3)
    g = np.repeat(np.arange(12), 8)
    x = np.tile(np.linspace(-1, 1, 8), 12)
    x[g < 3] = 0.0
    y = 5 + 2 * x + rng.normal(0, 1, 12)[g] + rng.normal(0, 0.7, 12)[g] * x + rng.normal(0, 0.5, g.size)
    d = pd.DataFrame({"y": y, "x": x, "g": g.astype(str)})
    return mixedjax.mixedlm("y ~ x", d, groups="g", re_formula="~x").fit()


def _two_crossed_clusters():
    """Crossed factors whose levels split into two unconnected clusters of different sizes (two blocks)."""
    rng = np.random.default_rng(5)
    rows = [(f"a{i}", f"b{j}") for i in range(6) for j in range(4) for _ in range(2)]
    rows += [(f"a{6 + i}", f"b{4 + j}") for i in range(3) for j in range(5)]
    d = pd.DataFrame(rows, columns=["a", "b"])
    ua, ub = rng.normal(0, 1.0, 9), rng.normal(0, 0.7, 9)
    d["x"] = rng.normal(size=len(d))
    d["y"] = (2 + 0.5 * d.x + ua[d.a.str[1:].astype(int)] + ub[d.b.str[1:].astype(int)]
              + rng.normal(0, 0.5, len(d)))
    return mixedjax.lmer("y ~ x + (1 | a) + (1 | b)", d)


MODELS = {
    "penicillin": lambda: mixedjax.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)",
                                        mixedjax.datasets.load("penicillin")),
    "scotssec": lambda: mixedjax.lmer("attain ~ verbal * sex + (1 | primary) + (1 | second)",
                                      mixedjax.datasets.load("scotssec")),
    "subjects_items": lambda: mixedjax.lmer("y ~ cond + (1 + cond | subj) + (1 + cond | item)",
                                            pd.read_csv(DATA / "subjects_items.csv")),
    "pastes_vc": lambda: mixedjax.mixedlm("strength ~ 1", mixedjax.datasets.load("pastes"), groups="batch",
                                          vc_formula={"cask": "0 + C(cask)"}).fit(),
    "pastes_nested": lambda: mixedjax.lmer("strength ~ 1 + (1 | batch/cask)", mixedjax.datasets.load("pastes")),
    "sleepstudy_weighted": _sleepstudy_weighted,
    "zero_slope_levels": _zero_slope_levels,
    "two_crossed_clusters": _two_crossed_clusters,
    "orthodont_varident": lambda: mixedjax.mixedlm("distance ~ age + Sex", mixedjax.datasets.load("orthodont"),
                                                   groups="Subject", residual=mixedjax.VarIdent("Sex")).fit(),
    "oxboys_ar1": lambda: mixedjax.mixedlm("height ~ age", mixedjax.datasets.load("oxboys"), groups="Subject",
                                           residual=mixedjax.AR1(time="age")).fit(),
}


def _check_table(res, ref: dict, rtol_df: float, rtol_se: float = 1e-6) -> dict:
    """``fe_table(ddf)`` against lmerTest's coefficient tables; returns the largest relative differences."""
    worst = {}
    for ddf_name, key in [("satterthwaite", "satterthwaite"), ("kenward-roger", "kenward_roger")]:
        tab = res.fe_table(ddf=ddf_name)
        want = ref[key]
        np.testing.assert_allclose(tab["df"], want["df"], rtol=rtol_df)
        np.testing.assert_allclose(tab["Std. Error"], want["std_error"], rtol=rtol_se)
        np.testing.assert_allclose(tab["t value"], want["t_value"], rtol=rtol_se)
        p = np.array(want["p_value"])
        ok = p > 1e-300  # lmerTest prints 0 for p below double precision
        # far tails (p ~ 1e-74) amplify the t statistic's last digits: 1e-3 relative, as issue 6 had it
        np.testing.assert_allclose(tab["Pr(>|t|)"][ok], p[ok], rtol=max(rtol_df, 1e-3))
        worst[key] = float(np.max(np.abs(tab["df"].to_numpy() / np.asarray(want["df"]) - 1)))
    return worst


def _check_summary(res, kind: str) -> None:
    """``summary(ddf=kind)`` prints the df of ``fe_table(kind)`` (3 decimals)."""
    s = res.summary(ddf=kind).tables[1]
    assert "df" in s.columns and "P>|t|" in s.columns
    shown = s["df"].iloc[: res.k_fe].astype(float).to_numpy()
    np.testing.assert_allclose(shown, res.fe_table(kind)["df"].to_numpy(), rtol=0, atol=5e-4)


# ------------------------------------------------------------------------------ lmerTest, one grouping factor
LMERTEST = ["sleepstudy_corr_reml", "sleepstudy_indep_reml", "dietox_ri_reml", "dietox_rs_reml"]


@pytest.mark.parametrize("case_id", LMERTEST)
def test_satterthwaite_and_kenward_roger_match_lmertest(case_id):
    res = _fit(case_id)
    # measured: Satterthwaite df <= 1.1e-7 (lmerTest differentiates numerically), Kenward-Roger <= 3e-9,
    # Kenward-Roger standard errors <= 4e-8
    _check_table(res, load_case(case_id)["results"]["lmerTest"], rtol_df=1e-6)
    _check_summary(res, "satterthwaite")


def test_satterthwaite_contrast_and_f():
    res = _fit("dietox_ri_reml")
    t = res.t_test("Time = 7", ddf="satterthwaite")
    assert abs(t.df_denom[0] - res.fe_table()["df"].iloc[1]) <= 1e-9
    # a single-row F test is the square of the t test, with the same df
    f = res.f_test("Time = 7", ddf="satterthwaite")
    assert abs(f.fvalue - t.tvalue[0] ** 2) <= 1e-8 * f.fvalue and abs(f.df_denom - t.df_denom[0]) < 1e-8
    with pytest.raises(ValueError, match="ddf"):
        res.t_test("Time = 7", ddf="wrong")


def test_multi_df_rule_and_wald_test():
    res = _fit("dietox_rs_reml")
    s = ddf.satterthwaite(res)
    lmat = np.eye(2)
    w, v = np.linalg.eigh(lmat @ res.cov_fe @ lmat.T)
    nu = np.array([s.ddf(v[:, m] @ lmat) for m in range(2)])
    wt = res.wald_test(lmat, ddf="satterthwaite")
    assert abs(wt.df_denom - ddf._fstat_ddf(nu)) <= 1e-10 * wt.df_denom
    kr = ddf.kenward_roger(res)
    wk = res.wald_test(lmat, ddf="kenward-roger")
    assert abs(wk.df_denom - kr.ddf(lmat)) <= 1e-10 * wk.df_denom
    d = res.fe_params.to_numpy()
    assert abs(wk.statistic - d @ np.linalg.solve(kr.cov_adjusted, d) / 2) <= 1e-9 * wk.statistic


# ---------------------------------------------------------------------------------------- crossed models
CROSSED = {"penicillin": False, "scotssec": False, "subjects_items": True}  # singular fit?


def _crossed_ref(name: str) -> dict:
    """lmerTest's tables at the tight lme4 reference fit (tests/reference/make_lme4_refs.R)."""
    return load_case(f"{name}_reml")["results"]["lmerTest"]


@pytest.mark.parametrize("name", sorted(CROSSED))
def test_crossed_models_match_lmertest(name):
    res = _fit(name)
    singular = CROSSED[name]
    # issue 10 asks 1e-4 relative (1e-2 on singular fits); measured: df <= 5e-8 (singular subjects x items:
    # 1.3e-8), standard errors <= 2e-8.  Margins for the crossed fit's own precision.
    worst = _check_table(res, _crossed_ref(name), rtol_df=1e-3 if singular else 1e-5,
                         rtol_se=1e-5 if singular else 1e-6)
    assert all(np.isfinite(v) for v in worst.values())
    for kind in ("satterthwaite", "kenward-roger"):
        _check_summary(res, kind)


# --------------------------------------------------------------------------- dense brute force (pbkrtest)
def _pbkrtest_dense(res) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """pbkrtest's ``vcovAdj`` verbatim with dense ``n × n`` matrices (``∂Σ/∂σ² = diag(1/w)``)."""
    fm = res.fitted
    b = fm.backend
    z, x, sw = b.sparse_design(with_rows(fm))
    z = z.toarray()
    n, nq = z.shape
    g_mats, cov_b, off = [], np.zeros((nq, nq)), 0
    for t, lv, cov in zip(b.terms, b.levels(fm.data), tm.covariances(fm.theta, fm.sigma2, b.terms), strict=True):
        sl = slice(off, off + lv * t.q)
        for i, j in zip(*t.positions(), strict=True):
            e = np.zeros((t.q, t.q))
            e[i, j] = e[j, i] = 1.0
            d = np.zeros((nq, nq))
            d[sl, sl] = np.kron(np.eye(lv), e)
            g_mats.append(z @ d @ z.T)
        cov_b[sl, sl] = np.kron(np.eye(lv), cov)
        off += lv * t.q
    g_mats.append(np.diag(1.0 / sw**2))
    sigma = z @ cov_b @ z.T + fm.sigma2 * g_mats[-1]
    sinv = np.linalg.inv(sigma)
    phi = res.cov_fe
    tt = sinv @ x
    hh = [g @ sinv for g in g_mats]
    oo = [h @ x for h in hh]
    m = len(g_mats)
    pp = [-(o.T @ tt) for o in oo]
    qq = {(r, s): oo[r].T @ sinv @ oo[s] for r in range(m) for s in range(r, m)}
    kt = np.array([[np.sum(hh[r].T * hh[s]) for s in range(m)] for r in range(m)])
    ie2 = np.array([[kt[i, j] - 2 * np.sum(phi * qq[min(i, j), max(i, j)]) + np.sum((phi @ pp[i]) * (pp[j] @ phi))
                     for j in range(m)] for i in range(m)])
    ww = 2 * np.linalg.inv(ie2)
    uu = sum(ww[i, j] * (qq[i, j] - pp[i] @ phi @ pp[j]) for i in range(m - 1) for j in range(i + 1, m))
    uu = uu + uu.T if m > 1 else np.zeros_like(phi)
    uu = uu + sum(ww[i, i] * (qq[i, i] - pp[i] @ phi @ pp[i]) for i in range(m))
    return phi + 2 * phi @ uu @ phi, pp, ww


@pytest.mark.parametrize("name", ["penicillin", "subjects_items", "pastes_vc", "pastes_nested",
                                  "sleepstudy_weighted", "zero_slope_levels", "two_crossed_clusters",
                                  "dietox_rs_reml"])
def test_kenward_roger_matches_dense_pbkrtest(name):
    res = _fit(name)
    kr = ddf.kenward_roger(res)
    cov_a, pp, ww = _pbkrtest_dense(res)
    # the same algebra by another route: agreement to rounding (measured <= 1e-10)
    np.testing.assert_allclose(kr.cov_adjusted, cov_a, rtol=1e-8, atol=1e-12 * np.abs(cov_a).max())
    np.testing.assert_allclose(kr.w_mat, ww, rtol=1e-7, atol=1e-9 * np.abs(ww).max())
    for a, b in zip(kr.p_mats, pp, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10 * np.abs(b).max())


# The former per-group implementation (git 77cf047, mixedjax/ddf.py: dense n_i x n_i blocks per group),
# run on the same fits: unit-contrast df, adjusted standard errors and the joint F df.  (On the weighted
# model pbkrtest itself gives df 22.7 / 20.3: it ignores prior weights in Σ; see mixedjax.ddf.)
OLD_PER_GROUP = {
    "sleepstudy_weighted": ([17.000000000000046, 16.999999999999936], [7.068435731942367, 1.6706127115693956],
                            15.999999999999995),
    "sleepstudy_weighted_reml": ([17.000000000000046, 16.999999999999936], [7.068435731942367, 1.6706127115693956],
                                 15.999999999999995),
    "pastes_vc": ([9.000000000000078], [0.6768700661296526], None),
    "pastes_nested": ([9.000000000000078], [0.6768700661296526], None),
    "dietox_indep_reml": ([72.05622946356348, 72.05446441409745], [0.5544500787963605, 0.08045432879473088],
                          94.1436306161702),
    "sleepstudy_indep_reml": ([18.18747641401838, 18.187476414018484], [6.885381294869891, 1.5595659443000458],
                              22.12812372876938),
    "dyestuff_reml": ([5.0000000000000036], [19.383412152320926], None),
}


@pytest.mark.parametrize("name", sorted(OLD_PER_GROUP))
def test_kenward_roger_reproduces_former_per_group_numbers(name):
    res = _fit(name)
    df, se, f_df = OLD_PER_GROUP[name]
    kr = ddf.kenward_roger(res)
    p = res.k_fe
    np.testing.assert_allclose([kr.ddf(np.eye(p)[i : i + 1]) for i in range(p)], df, rtol=1e-4)
    np.testing.assert_allclose(np.sqrt(np.diag(kr.cov_adjusted)), se, rtol=1e-6)
    if f_df is not None:
        assert abs(kr.ddf(np.eye(p)) - f_df) <= 1e-4 * f_df
    tab = res.fe_table(ddf="kenward-roger")
    np.testing.assert_allclose(tab["df"], df, rtol=1e-4)


def test_kenward_roger_blocks_and_size_limit(monkeypatch):
    res = _fit("penicillin")
    kr = ddf.kenward_roger(res)
    assert (kr.n_blocks, kr.max_block) == (1, 30)  # plates and samples are crossed: one block
    assert ddf.kenward_roger(_fit("pastes_vc")).n_blocks >= 10  # one block per batch (and per padding group)
    assert ddf.kenward_roger(_fit("two_crossed_clusters")).n_blocks == 2
    assert ddf.kenward_roger(_fit("subjects_items")).max_block == 160 > ddf.SMALL_BLOCK  # the one-by-one path
    monkeypatch.setattr(ddf, "KR_MAX_BLOCK", 20)
    with pytest.raises(NotImplementedError, match="KR_MAX_BLOCK"):
        ddf.KenwardRoger(res)


# ---------------------------------------------------------------------------------- structured residuals
def _satterthwaite_by_differences(res, step: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Hessian of the deviance and Jacobian of Cov(β̂) in ``(θ, ρ, σ)`` by central differences."""
    fm = res.fitted
    vp0 = np.concatenate([fm.theta, fm.rho, [np.sqrt(fm.sigma2)]])
    dev = jax.jit(backends.deviance_vp, static_argnames="backend")
    cov = jax.jit(backends.cov_beta_vp, static_argnames="backend")
    k = vp0.size
    h = step * np.maximum(1.0, np.abs(vp0))

    def f(v):
        return float(dev(fm.backend, jnp.asarray(v), fm.data, bool(fm.reml)))

    hess = np.zeros((k, k))
    for i in range(k):
        for j in range(i, k):
            ei, ej = np.eye(k)[i] * h[i], np.eye(k)[j] * h[j]
            hess[i, j] = hess[j, i] = (f(vp0 + ei + ej) - f(vp0 + ei - ej) - f(vp0 - ei + ej)
                                       + f(vp0 - ei - ej)) / (4 * h[i] * h[j])
    jac = np.stack([(np.asarray(cov(fm.backend, jnp.asarray(vp0 + np.eye(k)[i] * h[i]), fm.data))
                     - np.asarray(cov(fm.backend, jnp.asarray(vp0 - np.eye(k)[i] * h[i]), fm.data))) / (2 * h[i])
                    for i in range(k)])
    return hess, jac


@pytest.mark.parametrize("name", ["orthodont_varident", "oxboys_ar1"])
def test_structured_residuals_satterthwaite_and_kr(name):
    res = _fit(name)
    assert res.fitted.rho.size > 0
    tab = res.fe_table(ddf="satterthwaite")
    assert np.all(np.isfinite(tab["df"])) and np.all(tab["df"] > 1)
    s = ddf.satterthwaite(res)
    assert s.hessian.shape[0] == res.fitted.theta.size + res.fitted.rho.size + 1  # ρ enters the df
    hess, jac = _satterthwaite_by_differences(res)
    # second differences at step 1e-3: about 1e-6 relative error
    np.testing.assert_allclose(s.hessian, hess, rtol=1e-4, atol=1e-5 * np.abs(hess).max())
    np.testing.assert_allclose(s.jacobian, jac, rtol=1e-4, atol=1e-7 * np.abs(jac).max())
    a = 2 * np.linalg.inv(hess)
    p = res.k_fe
    for i in range(p):
        c = np.eye(p)[i]
        g = np.einsum("i,kij,j->k", c, jac, c)
        want = 2 * (c @ res.cov_fe @ c) ** 2 / (g @ a @ g)
        assert abs(tab["df"].iloc[i] - want) <= 1e-4 * want
    _check_summary(res, "satterthwaite")
    msg = "Kenward-Roger with structured residuals"
    with pytest.raises(NotImplementedError, match=msg):
        res.fe_table(ddf="kenward-roger")
    with pytest.raises(NotImplementedError, match=msg):
        res.summary(ddf="kenward-roger")
    with pytest.raises(NotImplementedError, match=msg):
        res.wald_test(np.eye(p), ddf="kenward-roger")


def test_docstring_examples():
    import doctest

    result = doctest.testmod(ddf, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 5
