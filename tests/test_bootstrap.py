"""Parametric bootstrap and simulation: draws, refits (against one-at-a-time fits), percentile intervals."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import fit_case, load_case

import mixedjax
from mixedjax import bootstrap as bootstrap_mod

# vmapped refits (batched linear algebra): a hang fails within minutes, not at the suite's 600 s per test
pytestmark = pytest.mark.timeout(300)

N_BOOT = 32  # one compiled shape for every bootstrap test

_fits: dict = {}


def _fit(case_id):
    if case_id not in _fits:
        _fits[case_id] = fit_case(load_case(case_id))
    return _fits[case_id]


def test_simulate_moments_and_seed():
    res = _fit("sleepstudy_corr_reml")
    y = res.simulate(4000, seed=7)
    assert y.shape == (180, 4000)
    np.testing.assert_array_equal(y[:, :5], res.simulate(4000, seed=7)[:, :5])
    assert not np.allclose(y[:, 0], res.simulate(4000, seed=8)[:, 0])
    m = res.model
    mean = m.exog @ res.fe_params.to_numpy()
    # Var(y_ij) = z cov_re zᵀ + scale; Cov within a subject from the random effects only
    z = m.exog_re
    var = np.einsum("ni,ij,nj->n", z, res.cov_re.to_numpy(), z) + res.scale
    se_mean = np.sqrt(var / 4000)
    assert np.all(np.abs(y.mean(axis=1) - mean) <= 5 * se_mean)  # 5 sd: Monte Carlo error
    rel_var = y.var(axis=1) / var
    assert np.all(np.abs(rel_var - 1) <= 5 * np.sqrt(2 / 4000))
    c = np.cov(y[0], y[1])[0, 1]
    want = z[0] @ res.cov_re.to_numpy() @ z[1]
    assert abs(c - want) <= 5 * np.sqrt(var[0] * var[1] / 4000)
    other = np.cov(y[0], y[10])[0, 1]  # different subjects: independent
    assert abs(other) <= 5 * np.sqrt(var[0] * var[10] / 4000)


def test_bootstrap_refits_match_single_fits():
    res = _fit("sleepstudy_corr_reml")
    boot = res.bootstrap(n=N_BOOT, seed=3)
    reps = boot.replicates
    names = list(res.conf_int_lme4("wald").index)
    assert names == ["(Intercept)", "Days"]
    assert list(reps.columns) == ["sd_(Intercept)|Subject", "cor_Days.(Intercept)|Subject", "sd_Days|Subject",
                                  "sigma", *names, "llf", "converged"]
    assert len(reps) == N_BOOT and boot.n_failed == 0 and reps["converged"].all()
    ys = res.simulate(N_BOOT, seed=3)  # the same draws
    data = res.model.data
    for k in (0, 17):
        one = mixedjax.mixedlm("Reaction ~ Days", data.assign(Reaction=ys[:, k]), groups="Subject",
                               re_formula="~Days").fit()
        assert abs(one.llf - reps["llf"].iloc[k]) <= 1e-6
        np.testing.assert_allclose(reps[["(Intercept)", "Days"]].iloc[k], one.fe_params, rtol=1e-7)
        assert abs(reps["sigma"].iloc[k] - np.sqrt(one.scale)) <= 1e-5 * np.sqrt(one.scale)
        sd0 = np.sqrt(one.cov_re.iloc[0, 0])
        assert abs(reps["sd_(Intercept)|Subject"].iloc[k] - sd0) <= 1e-4 * sd0
    ci = boot.conf_int(0.1)
    vals = reps["sigma"].to_numpy()
    assert abs(ci.loc["sigma"].iloc[0] - np.quantile(vals, 0.05)) <= 1e-12
    assert list(ci.columns) == ["5 %", "95 %"]
    # the estimate in the same layout, and the lme4-rows interval through conf_int(method="boot")
    assert abs(boot.estimate["sigma"] - np.sqrt(res.scale)) <= 1e-12
    ci2 = res.conf_int(method="boot", n=N_BOOT, seed=3)
    np.testing.assert_allclose(ci2.to_numpy(), boot.conf_int().to_numpy())


def test_bootstrap_singular_fit_and_ml():
    """A boundary estimate (Dyestuff2: variance 0) still refits: starts are moved off θ = 0."""
    res = _fit("dyestuff2_ml")
    boot = res.bootstrap(n=N_BOOT, seed=0)
    assert boot.method == "ML" and boot.n_failed == 0
    sd = boot.replicates["sd_(Intercept)|Batch"]
    assert (sd >= 0).all() and (sd > 0.1).any()  # some replicates leave the boundary
    with pytest.raises(ValueError, match="method"):
        res.conf_int(method="nope")


def test_working_set_gives_the_same_replicates():
    """The per-group iid refits through a narrow working set (slots refilled) equal the plain vmapped ones."""
    res = _fit("sleepstudy_corr_reml")
    plain = bootstrap_mod.bootstrap(res, n=N_BOOT, seed=4, working=N_BOOT)
    narrow = bootstrap_mod.bootstrap(res, n=N_BOOT, seed=4, working=5)
    cols = plain.names + ["llf"]
    np.testing.assert_allclose(narrow.replicates[cols].to_numpy(), plain.replicates[cols].to_numpy(), rtol=1e-9,
                               atol=1e-9)
    assert bootstrap_mod.working_width(32) is None and bootstrap_mod.working_width(1000) == 250
