"""Many responses on one design: MixedLM.fit_many equals fitting each model alone."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import mixedjax

# vmapped fits (batched linear algebra): a hang fails within minutes, not at the suite's 600 s per test
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def batch():
    d = mixedjax.datasets.load("sleepstudy")
    rng = np.random.default_rng(7)
    g = d.Subject.cat.codes.to_numpy()
    ys = []
    for m in range(60):
        slope_sd = 0.0 if m % 3 == 0 else 6.0  # a third with no slope variance: often singular
        b0, b1 = rng.normal(0, 25, 18), rng.normal(0, slope_sd, 18)
        ys.append(250 + 10 * d.Days.to_numpy() + b0[g] + b1[g] * d.Days.to_numpy() + rng.normal(0, 25, 180))
    y = np.column_stack(ys)
    y[rng.random(y.shape) < 0.03] = np.nan  # per-model gaps
    model = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", re_formula="~Days")
    return d, y, model, model.fit_many(y)


def test_each_batched_fit_equals_single_fit(batch):
    d, y, _, res = batch
    n_singular = 0
    for m in range(y.shape[1]):
        keep = np.isfinite(y[:, m])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mixedjax.ConvergenceWarning)
            r = mixedjax.mixedlm("y ~ Days", d.assign(y=y[:, m])[keep], groups="Subject", re_formula="~Days").fit()
        n_singular += r.singular
        assert res.n_dropped[m] == int((~keep).sum())
        if not (r.converged and res.converged[m]):
            continue
        assert abs(res.llf[m] - r.llf) <= 1e-8
        np.testing.assert_allclose(res.fe_params[m], r.fe_params.to_numpy(), rtol=1e-6)
        total = r.scale + np.trace(r.cov_re.to_numpy())
        assert np.max(np.abs(res.cov_re[m] - r.cov_re.to_numpy())) <= 1e-6 * total + 1e-6 * np.abs(
            r.cov_re.to_numpy()).max()
        assert abs(res.scale[m] - r.scale) <= 1e-6 * r.scale
    assert n_singular >= 3  # the batch really contains boundary fits
    assert res.converged.mean() == 1.0


def test_tidy_frame_and_single_result(batch):
    _, y, model, res = batch
    df = res.to_frame()
    assert list(df.columns[:5]) == ["Intercept", "Days", "Group Var", "Group x Days Cov", "Days Var"]
    assert len(df) == y.shape[1] and df.converged.all()
    r5 = res.result_for(5)
    assert r5.llf == pytest.approx(res.llf[5], abs=1e-8)
    assert "Group x Days Cov" in str(r5.summary())


def test_column_names_and_bad_shape(sleepstudy):
    d = sleepstudy.assign(R2=sleepstudy.Reaction * 1.5)
    model = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject")
    res = model.fit_many(["Reaction", "R2"])
    assert res.names == ["Reaction", "R2"]
    assert res.fe_params[1, 0] == pytest.approx(1.5 * res.fe_params[0, 0], rel=1e-8)
    with pytest.raises(ValueError, match="expected \\(180, M\\)"):
        model.fit_many(np.ones((10, 2)))
    with pytest.raises(ValueError, match="not in the data"):
        model.fit_many(["nope"])


def test_fit_batch_many_datasets_equals_single_fits():
    d = mixedjax.datasets.load("sleepstudy")
    rng = np.random.default_rng(11)
    sets = []
    for k in range(12):  # ragged: different subsets of subjects and days
        keep = rng.random(len(d)) < 0.6 + 0.03 * k
        sets.append(d[keep].assign(Reaction=d.Reaction[keep] + rng.normal(0, 15, keep.sum())))
    res = mixedjax.fit_batch("Reaction ~ Days", sets, groups="Subject", re_formula="~Days")
    assert res.fe_params.shape == (12, 2)
    for k, df in enumerate(sets):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mixedjax.ConvergenceWarning)
            r = mixedjax.mixedlm("Reaction ~ Days", df, groups="Subject", re_formula="~Days").fit()
        assert res.nobs[k] == len(df)
        if r.converged and res.converged[k]:
            assert abs(res.llf[k] - r.llf) <= 1e-8
            np.testing.assert_allclose(res.fe_params[k], r.fe_params.to_numpy(), rtol=1e-6)
    assert res.result_for(3).llf == pytest.approx(res.llf[3], abs=1e-8)
    narrow = mixedjax.fit_batch("Reaction ~ Days", sets, groups="Subject", re_formula="~Days", working=5)
    np.testing.assert_allclose(narrow.llf, res.llf, rtol=0, atol=1e-9)  # per-model designs in a working set


def test_fit_batch_variance_components_of_different_widths():
    p = mixedjax.datasets.load("pastes")
    sets = [p, p[p.cask != "c"]]  # the second has 2 casks per batch
    res = mixedjax.fit_batch("strength ~ 1", sets, groups="batch", vc_formula={"cask": "0 + C(cask)"})
    for k, df in enumerate(sets):
        r = mixedjax.mixedlm("strength ~ 1", df, groups="batch", vc_formula={"cask": "0 + C(cask)"}).fit()
        assert abs(res.llf[k] - r.llf) <= 1e-8


def test_fit_batch_refuses_mismatched_columns():
    d = mixedjax.datasets.load("dietox")
    a = d[d.Evit != "Evit200"].assign(Evit=lambda x: x.Evit.cat.remove_unused_categories())
    with pytest.raises(ValueError, match="data set 1 has fixed-effects columns"):
        mixedjax.fit_batch("Weight ~ Time + Evit", [d, a], groups="Pig")


def test_failing_model_does_not_poison_the_others():
    d = mixedjax.datasets.load("sleepstudy")
    rng = np.random.default_rng(5)
    y = d.Reaction.to_numpy()[:, None] + rng.normal(0, 20, (180, 6))
    y[:, 2] = 300.0  # a constant response: the residual variance is 0, the likelihood is not finite
    g = d.Subject.cat.codes.to_numpy()
    b0 = rng.normal(0, 100, 18)  # a hard one: slopes perfectly correlated with intercepts, tiny residual sd
    y[:, 4] = 10 + b0[g] + 0.03 * b0[g] * d.Days.to_numpy() + rng.normal(0, 1, 180)
    model = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", re_formula="~Days")
    res = model.fit_many(y)
    assert not res.converged[2]
    good = [0, 1, 3, 4, 5]
    assert res.converged[good].all()
    for m in good:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mixedjax.ConvergenceWarning)
            r = mixedjax.mixedlm("y ~ Days", d.assign(y=y[:, m]), groups="Subject", re_formula="~Days").fit()
        assert abs(res.llf[m] - r.llf) <= 1e-8


def test_working_set_gives_the_same_fits(batch):
    """A narrow working set (slots refilled as models finish) reproduces the all-lanes fit."""
    _, y, model, res = batch
    narrow = model.fit_many(y, working=7)
    np.testing.assert_allclose(narrow.llf, res.llf, rtol=0, atol=1e-9)
    np.testing.assert_allclose(narrow.fe_params, res.fe_params, rtol=1e-9)
    np.testing.assert_allclose(narrow.cov_re, res.cov_re, rtol=1e-7, atol=1e-9)
    np.testing.assert_array_equal(narrow.converged, res.converged)
