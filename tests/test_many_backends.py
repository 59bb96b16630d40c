"""fit_many, simulate/bootstrap and the functional API on every backend: structured residuals and crossed factors.

Each batched or differentiable fit is checked against the one-model fit (``model.fit()`` / ``lmer()``, the host
optimiser: BFGS per group, derivative-free for crossed models), which minimises the same deviance:
logLik to 1e-6 (issue 10; both stop at a gradient norm below 1e-6, the deviance error is quadratic in it).
"""

from __future__ import annotations

import doctest
import importlib
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import mixedjax
from mixedjax import functional as F
from mixedjax.fit import refit

# vmapped fits and refits (batched linear algebra): a hang fails within minutes, not at the suite's 600 s
pytestmark = pytest.mark.timeout(300)


def _crossed_slopes_data(seed: int = 0, ns: int = 30, ni: int = 20) -> pd.DataFrame:
    """Subjects x items, every subject sees every item; correlated intercept and slope in both factors."""
    rng = np.random.default_rng(seed)
    s = np.repeat(np.arange(ns), ni)
    i = np.tile(np.arange(ni), ns)
    cond = np.where((s + i) % 2 == 0, 0.5, -0.5)
    bs = rng.multivariate_normal([0, 0], [[900, 150], [150, 400]], ns)
    bi = rng.multivariate_normal([0, 0], [[400, -100], [-100, 225]], ni)
    y = 400 + 30 * cond + bs[s, 0] + bs[s, 1] * cond + bi[i, 0] + bi[i, 1] * cond + rng.normal(0, 30, s.size)
    return pd.DataFrame({"subj": [f"S{k:02d}" for k in s], "item": [f"I{k:02d}" for k in i], "cond": cond, "y": y})


# kind -> (data loader, response column, single fit of a data frame (a results object))
KINDS = {
    "varident": (lambda: mixedjax.datasets.load("orthodont"), "distance",
                 lambda d: mixedjax.mixedlm("distance ~ age + Sex", d, groups="Subject",
                                            residual=mixedjax.VarIdent("Sex")).fit()),
    "ar1": (lambda: mixedjax.datasets.load("oxboys"), "height",
            lambda d: mixedjax.mixedlm("height ~ age", d, groups="Subject", residual=mixedjax.AR1(time="age")).fit()),
    "penicillin": (lambda: mixedjax.datasets.load("penicillin"), "diameter",
                   lambda d: mixedjax.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", d)),
    "crossed_slopes": (_crossed_slopes_data, "y",
                       lambda d: mixedjax.lmer("y ~ cond + (1 + cond | subj) + (1 + cond | item)", d)),
}

_cache: dict = {}


def _single(kind: str, d: pd.DataFrame):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mixedjax.ConvergenceWarning)
        return KINDS[kind][2](d)


def _case(kind: str):
    """The data, the fit of the observed response, and four responses: the observed one and three perturbed."""
    if kind not in _cache:
        load, yname, _ = KINDS[kind]
        d = load()
        res = _single(kind, d)
        y0 = d[yname].to_numpy(float)
        rng = np.random.default_rng(1)
        ys = np.column_stack([y0] + [y0 + rng.normal(0, 0.3 * y0.std(), y0.size) for _ in range(3)])
        _cache[kind] = (d, res, ys)
    return _cache[kind]


# ------------------------------------------------------------------------------------------------ fit_many
@pytest.mark.parametrize("kind", list(KINDS))
def test_fit_many_equals_single_fits(kind):
    d, res, ys = _case(kind)
    yname = KINDS[kind][1]
    many = res.model.fit_many(ys)
    assert many.converged.all()
    assert many.n_dropped.tolist() == [0] * ys.shape[1] and (many.nobs == res.nobs).all()
    for m in range(ys.shape[1]):
        one = _single(kind, d.assign(**{yname: ys[:, m]}))
        assert abs(many.llf[m] - one.llf) <= 1e-6, (kind, m, many.llf[m], one.llf)
        np.testing.assert_allclose(many.fe_params[m], one.fe_params.to_numpy(), rtol=1e-5)
        for cov, ref in zip(many.cov_terms, one.term_covs, strict=True):  # variances: floor 1e-5 of the total
            total = one.scale + sum(np.trace(c) for c in one.term_covs)
            assert np.abs(cov[m] - ref).max() <= 1e-5 * total
        np.testing.assert_allclose(many.residual_params[m], one.params.to_numpy()[len(one.params)
                                                                                   - len(one.residual_params):],
                                   rtol=1e-4, atol=1e-6)
    # the tidy frame names the variance rows as params does
    frame = many.to_frame()
    assert list(frame.columns[: len(res.params)]) == list(res.params.index)
    np.testing.assert_allclose(frame.llf, many.llf)


def test_fit_many_keeps_structured_residuals():
    """Orthodont VarIdent: the observed response gives nlme's −210.18 (an iid fit would give −218.76)."""
    _, res, ys = _case("varident")
    many = res.model.fit_many(ys[:, :1])
    assert many.llf[0] == pytest.approx(res.llf, abs=1e-6) and res.llf == pytest.approx(-210.178, abs=1e-3)
    assert many.residual_params.shape == (1, 1)
    assert many.residual_params[0, 0] == pytest.approx(res.params["sd ratio Female"], rel=1e-4)


def test_fit_many_refuses_nan_off_the_per_group_iid_path():
    _, res, ys = _case("penicillin")
    y = ys[:, :2].copy()
    y[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN.*per-group models with iid residuals"):
        res.model.fit_many(y)


@pytest.mark.parametrize("kind", ["ar1", "crossed_slopes"])
def test_result_for_generic_path(kind):
    _, res, ys = _case(kind)
    many = res.model.fit_many(ys[:, :2])
    one = many.result_for(1)
    assert isinstance(one, mixedjax.MixedLMResults)
    assert one.llf == pytest.approx(many.llf[1], abs=1e-6)
    np.testing.assert_array_equal(one.model.endog, ys[:, 1])
    np.testing.assert_allclose(one.resid + one.fittedvalues, ys[:, 1], rtol=1e-12)
    assert res.model.endog is not one.model.endog and np.array_equal(res.model.endog, ys[:, 0])  # untouched


SHARD_SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np, mixedjax
    assert len(jax.devices()) == 4, jax.devices()
    p = mixedjax.datasets.load("penicillin")
    md = mixedjax.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", p).model
    Y = p.diameter.to_numpy()[:, None] + np.random.default_rng(0).normal(0, 0.5, (144, 10))
    sharded = md.fit_many(Y, batch_size=6)  # chunks of 8 (a multiple of 4 devices), 2 chunks
    single = md.fit_many(Y, shard=False)
    assert sharded.n_devices == 4 and single.n_devices == 1
    assert sharded.converged.all() and single.converged.all()
    np.testing.assert_allclose(sharded.llf, single.llf, rtol=0, atol=1e-8)
    print("OK", sharded.n_devices)
    """
)


@pytest.mark.timeout(300)
def test_generic_path_sharded_equals_unsharded():
    """The generic path shards the response axis over 4 host devices, the backend data replicated."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SHARD_SCRIPT], env=env, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK 4" in out.stdout


# ------------------------------------------------------------------------------------------ simulate, bootstrap
N_BOOT = 8


@pytest.mark.parametrize("kind", list(KINDS))
def test_bootstrap_refits_equal_single_fits(kind):
    d, res, _ = _case(kind)
    boot = res.bootstrap(n=N_BOOT, seed=5)
    reps = boot.replicates
    assert len(reps) == N_BOOT and boot.n_failed == 0
    assert list(reps.columns[-2:]) == ["llf", "converged"]
    ysim = res.simulate(N_BOOT, seed=5)  # the same draws
    assert ysim.shape == (res.nobs, N_BOOT)
    yname = KINDS[kind][1]
    for k in (0, N_BOOT - 1):
        one = _single(kind, d.assign(**{yname: ysim[:, k]}))
        assert abs(reps["llf"].iloc[k] - one.llf) <= 1e-6, (kind, k)
        fe = [n if n != "Intercept" else "(Intercept)" for n in one.fe_params.index]
        np.testing.assert_allclose(reps[fe].iloc[k].to_numpy(float), one.fe_params.to_numpy(), rtol=1e-5)
        assert reps["sigma"].iloc[k] == pytest.approx(np.sqrt(one.scale), rel=1e-4)
        for name in res.model.residual_param_names:
            assert reps[name].iloc[k] == pytest.approx(one.params[name], rel=1e-3)
    # the estimate row in the same layout
    assert boot.estimate["sigma"] == pytest.approx(np.sqrt(res.scale), rel=1e-12)
    ci = boot.conf_int()
    assert list(ci.index) == boot.names and np.all(ci.iloc[:, 0] <= ci.iloc[:, 1])


def test_bootstrap_columns_on_lme4s_scale():
    _, res, _ = _case("crossed_slopes")
    names = res.bootstrap(n=N_BOOT, seed=0).names
    assert names == ["sd_(Intercept)|subj", "cor_cond.(Intercept)|subj", "sd_cond|subj",
                     "sd_(Intercept)|item", "cor_cond.(Intercept)|item", "sd_cond|item", "sigma", "(Intercept)", "cond"]
    _, res, _ = _case("ar1")
    assert res.bootstrap(n=N_BOOT, seed=0).names == ["sd_(Intercept)|Subject", "Phi", "sigma", "(Intercept)", "age"]
    p = mixedjax.datasets.load("pastes")  # nested: lme4 puts the factor with more levels first
    r = mixedjax.lmer("strength ~ 1 + (1 | batch/cask)", p)
    assert r.bootstrap(n=N_BOOT, seed=0).names == ["sd_(Intercept)|cask:batch", "sd_(Intercept)|batch", "sigma",
                                                   "(Intercept)"]


def test_simulate_moments_crossed():
    """Penicillin: mean Xβ̂, variance σ²_plate + σ²_sample + σ², covariance σ²_plate within a plate."""
    _, res, _ = _case("penicillin")
    n = 4000
    y = res.simulate(n, seed=11)
    v_plate, v_sample = (np.diag(c)[0] for c in res.term_covs)
    var = v_plate + v_sample + res.scale
    assert np.all(np.abs(y.mean(axis=1) - res.fe_params.iloc[0]) <= 5 * np.sqrt(var / n))
    assert np.all(np.abs(y.var(axis=1) / var - 1) <= 5 * np.sqrt(2 / n))
    d = mixedjax.datasets.load("penicillin")
    same_plate = np.flatnonzero((d.plate == d.plate.iloc[0]).to_numpy() & (d["sample"] != d["sample"].iloc[0]))[0]
    c = np.cov(y[0], y[same_plate])[0, 1]
    assert abs(c - v_plate) <= 5 * var / np.sqrt(n)


# ------------------------------------------------------------------------------------------- functional API
@pytest.mark.parametrize("kind", list(KINDS))
def test_functional_deviance_equals_model_fit(kind):
    _, res, _ = _case(kind)
    data, zmask, structure = F.model_data(res.model)
    for reml in (True, False) if kind == "varident" else (True,):  # one ML check: each criterion compiles anew
        out = F.fit(data, zmask, structure, reml=reml)
        ref = res if reml else refit(res.fitted, reml=False)
        assert bool(out.converged)
        assert float(out.deviance) == pytest.approx(-2 * ref.llf, abs=2e-6)
        np.testing.assert_allclose(np.asarray(out.beta), ref.beta if not reml else res.fe_params.to_numpy(),
                                   rtol=1e-5)
        assert float(F.objective(out.theta, data, structure, reml)) == pytest.approx(float(out.deviance), rel=1e-12)


def _fd_check(fun, x, idx, h, rtol=1e-5):
    grad = np.asarray(jax.jit(jax.grad(fun))(x))
    xs = np.asarray(x)
    for i in idx:
        e = np.zeros_like(xs)
        e[i] = h
        fd = (float(fun(jnp.asarray(xs + e))) - float(fun(jnp.asarray(xs - e)))) / (2 * h)
        assert abs(grad[i] - fd) <= rtol * max(abs(fd), 1e-3 * np.abs(grad).max()), (i, grad[i], fd)


@pytest.mark.parametrize("kind", ["varident", "penicillin"])
def test_functional_gradients_structured_and_crossed(kind):
    """Implicit-function-theorem derivatives in the response against central differences (ρ included)."""
    _, res, _ = _case(kind)
    data, zmask, backend = F.model_data(res.model)
    y0 = jnp.asarray(res.model.endog)
    k = len(res.fitted.theta_full)
    c = jnp.asarray(np.random.default_rng(0).normal(size=k + 2))

    def fun(y):
        r = F.fit(backend.with_response(data, y), zmask, backend)
        return jnp.dot(c[:k], r.theta) + c[k] * r.beta[0] + c[k + 1] * jnp.log(r.sigma2) + 1e-3 * r.deviance

    _fd_check(fun, y0, [0, 7, 31, 77], h=1e-3 * float(jnp.std(y0)))


# ------------------------------------------------------------------------------------------------- docstrings
@pytest.mark.parametrize("name", ["mixedjax.bootstrap", "mixedjax.many", "mixedjax.functional"])
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
