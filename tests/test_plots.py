"""Plots (mixedjax.plots): every figure renders to a non-empty PNG on every model kind, and draws the numbers
of the feature it shows (conditional modes and sds, profile interval ends, batch p-values).

Figures are built without pyplot: the tests also check that no plot imports ``matplotlib.pyplot`` or changes
matplotlib's settings, and that importing mixedjax does not import matplotlib at all.
"""

from __future__ import annotations

import doctest
import json
import pathlib
import subprocess
import sys
import warnings
from collections.abc import Callable
from io import BytesIO

import numpy as np
import pandas as pd
import pytest

import mixedjax
from mixedjax import plots

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import imread  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data"
REF = pathlib.Path(__file__).parent / "reference"


def _quiet(fn: Callable, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mixedjax.ConvergenceWarning)
        return fn(*args, **kwargs)


def _sleep() -> pd.DataFrame:
    d = mixedjax.datasets.load("sleepstudy")
    return d.assign(w=1.0 + (d["Days"] % 3))


# the model kinds that draw differently (as tests/test_matrix.py builds them): a per-group lmer model with two
# correlated columns and prior weights, statsmodels' variance components (nested factors), a structured residual
# (VarIdent: its ratios are divided out of the standardised residuals; AR(1) draws through the same code and is in
# tests/test_matrix.py), crossed factors with one column and with two
KINDS: dict[str, Callable[[], mixedjax.MixedLMResults]] = {
    "lmer_weights": lambda: mixedjax.lmer("Reaction ~ Days + (Days | Subject)", _sleep(), weights="w"),
    "mixedlm_variance_components": lambda: mixedjax.mixedlm("strength ~ 1", mixedjax.datasets.load("pastes"),
                                                            groups="batch", vc_formula={"cask": "0 + C(cask)"}).fit(),
    "varident": lambda: mixedjax.mixedlm("distance ~ age + Sex", mixedjax.datasets.load("orthodont"),
                                         groups="Subject", residual=mixedjax.VarIdent("Sex")).fit(),
    "crossed": lambda: mixedjax.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", mixedjax.datasets.load("penicillin")),
    "crossed_slopes": lambda: mixedjax.lmer("y ~ cond + (1 + cond | subj) + (1 + cond | item)",
                                            pd.read_csv(DATA / "subjects_items.csv", dtype={"subj": str, "item": str})),
}


@pytest.fixture(scope="module", params=list(KINDS))
def kind(request):
    return request.param, _quiet(KINDS[request.param])


@pytest.fixture(scope="module")
def dyestuff():
    return mixedjax.lmer("Yield ~ 1 + (1 | Batch)", mixedjax.datasets.load("dyestuff"))


def _render(fig: Figure) -> np.ndarray:
    """The figure as PNG, read back as an RGBA array; checks it is a PNG."""
    assert isinstance(fig, Figure)
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=40)
    data = buf.getvalue()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(BytesIO(data))


def _ink(img: np.ndarray) -> float:
    """Fraction of pixels that are not (nearly) white."""
    return float((img[..., :3] < 0.9).any(axis=-1).mean())


def _assert_untouched(had_pyplot: bool, before: dict) -> None:
    """A plot neither imported pyplot (which would pick a backend) nor changed a setting."""
    assert _settings() == before
    if not had_pyplot:
        assert "matplotlib.pyplot" not in sys.modules


def _visible_axes(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.get_visible()]


def _settings() -> dict:
    """matplotlib's settings, without reading ``backend`` (reading it resolves the backend, through pyplot)."""
    return {k: repr(matplotlib.rcParams[k]) for k in matplotlib.rcParams if k != "backend"}


# ---------------------------------------------------------------------------------------- every kind
def test_ranef_every_kind(kind):
    name, res = kind
    cv = res.condvar()
    panels = list(dict.fromkeys(zip(cv["grpvar"], cv["term"], strict=True)))
    had_pyplot, before = "matplotlib.pyplot" in sys.modules, _settings()
    fig = res.plot_ranef()
    _assert_untouched(had_pyplot, before)
    axes = _visible_axes(fig)
    assert [ax.get_title() for ax in axes] == [f"{f}: {t}" for f, t in panels]
    assert _ink(_render(fig)) > 0.03
    z = 1.959963984540054
    for ax, (f, t) in zip(axes, panels, strict=True):
        rows = cv[(cv["grpvar"] == f) & (cv["term"] == t)]
        data_line, _, (xerr,) = ax.containers[0].lines
        x, y = np.asarray(data_line.get_xdata(), float), np.asarray(data_line.get_ydata(), float)
        np.testing.assert_allclose(np.sort(x), np.sort(rows["condval"]), rtol=0, atol=1e-12)
        half = np.array([abs(s[1][0] - s[0][0]) / 2 for s in xerr.get_segments()])
        np.testing.assert_allclose(np.sort(half), np.sort(z * rows["condsd"]), rtol=1e-9, atol=1e-12)
        if t == cv.loc[cv["grpvar"] == f, "term"].iloc[0]:  # the factor's first column: levels sorted by the mode
            assert np.all(np.diff(np.asarray(x)[np.argsort(y)]) >= 0), name


def test_diagnostics_every_kind(kind):
    name, res = kind
    cv = res.condvar()
    n_re = len(set(zip(cv["grpvar"], cv["term"], strict=True)))
    had_pyplot, before = "matplotlib.pyplot" in sys.modules, _settings()
    fig = res.plot_diagnostics()
    _assert_untouched(had_pyplot, before)
    axes = _visible_axes(fig)
    assert len(axes) == 2 + n_re, name
    assert [ax.get_title() for ax in axes[:2]] == ["residuals vs fitted", "residuals"]
    scatter = axes[0].collections[0].get_offsets()
    assert len(scatter) == res.nobs
    np.testing.assert_allclose(np.asarray(scatter)[:, 0], res.fittedvalues, rtol=1e-12)
    assert _ink(_render(fig)) > 0.03


def test_standardized_residuals_divide_out_weights_and_ratios(kind):
    """Pearson residuals: (y − ŷ) sqrt(w) / (σ̂ · ratio of the row's stratum)."""
    name, res = kind
    e = plots.standardized_residuals(res)
    w = getattr(res.model, "weights", None)
    w = np.ones(res.nobs) if w is None else w
    ratio = np.ones(res.nobs)
    if "sd_ratio" in res.residual_structure:
        labels = mixedjax.datasets.load("orthodont")["Sex"].astype(str).to_numpy()
        ratio = res.residual_structure["sd_ratio"].reindex(labels).to_numpy()
    np.testing.assert_allclose(e, res.resid * np.sqrt(w) / (np.sqrt(res.scale) * ratio), rtol=1e-12)
    assert 0.7 < np.std(e) < 1.2, name  # standardised: about unit spread (shrinkage makes it a little less)


# ------------------------------------------------------------------------------------------- profile
def test_profile_plot_marks_lme4_intervals(dyestuff):
    """Dyestuff: every parameter; the dashed ends are lme4's profile interval (12.20 84.06 / 38.23 67.66 /
    1486.45 1568.55), ζ increases through 0 at the estimate and crosses ±1.96 at the ends."""
    fig = dyestuff.plot_profile()
    axes = _visible_axes(fig)
    assert [ax.get_title() for ax in axes] == ["sd_(Intercept)|Batch", "sigma", "(Intercept)"]
    lme4 = {"sd_(Intercept)|Batch": (12.20, 84.06), "sigma": (38.23, 67.66), "(Intercept)": (1486.45, 1568.55)}
    for ax in axes:
        ends = sorted(line.get_xdata()[0] for line in ax.lines if line.get_color() == "C3"
                      and line.get_linestyle() == "--")
        np.testing.assert_allclose(ends, lme4[ax.get_title()], atol=0.006)  # lme4 printed to 2 decimals
        v, zeta = ax.lines[0].get_xdata(), ax.lines[0].get_ydata()
        assert np.all(np.diff(v) > 0) and np.all(np.diff(zeta) > 0)
        assert zeta.min() < -1.96 < 1.96 < zeta.max()
    assert _ink(_render(fig)) > 0.03


def test_profile_trace_crosses_z_at_the_interval_ends(dyestuff):
    pt = mixedjax.profile.profile_trace(dyestuff, params=["sigma", "Intercept"], alpha=0.1)
    assert list(dict.fromkeys(pt.trace["parameter"])) == ["sigma", "(Intercept)"]
    z = 1.6448536269514722
    for name, d in pt.trace.groupby("parameter", sort=False):
        lo, hi = pt.conf_int.loc[name]
        at = dict(zip(d["value"], d["zeta"], strict=True))
        assert at[lo] == pytest.approx(-z) and at[hi] == pytest.approx(z)
        assert at[pt.estimate[name]] == 0.0
        assert np.all(np.diff(d["zeta"]) > 0)
    with pytest.raises(ValueError, match="unknown profile parameter"):
        mixedjax.profile.profile_trace(dyestuff, params=["sd_Days|Subject"])


def test_profile_plot_crossed_subset():
    """Penicillin (crossed): a subset of the parameters, one panel each, the ends lme4's profile interval."""
    res = mixedjax.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", mixedjax.datasets.load("penicillin"))
    ref = json.loads((REF / "penicillin_reml.json").read_text())["results"]["lme4"]["confint_profile"]
    lme4 = {n: (lo, hi) for n, lo, hi in zip(ref["parameters"], ref["lower"], ref["upper"], strict=True)}
    names = ["sd_(Intercept)|sample", "sigma"]
    fig = res.plot_profile(params=names)
    axes = _visible_axes(fig)
    assert [ax.get_title() for ax in axes] == names
    for ax in axes:
        ends = sorted(line.get_xdata()[0] for line in ax.lines if line.get_color() == "C3"
                      and line.get_linestyle() == "--")
        np.testing.assert_allclose(ends, lme4[ax.get_title()], rtol=2e-4)  # lme4 interpolates a spline
    assert _ink(_render(fig)) > 0.03


# ------------------------------------------------------------------------------------------- batches
@pytest.fixture(scope="module")
def batch():
    """20 sleepstudy-shaped responses with a Days effect from 0 to 16 (the shape of the plots doctest)."""
    d = mixedjax.datasets.load("sleepstudy")
    md = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject")
    y = d["Reaction"].to_numpy()[:, None] + np.random.default_rng(0).normal(0, 20, (180, 20))
    y = y - np.outer(d["Days"], np.linspace(-6, 10, 20))
    return md.fit_many(y)


def test_batch_hist(batch):
    fig = batch.plot("Group Var")
    (ax,) = _visible_axes(fig)
    assert sum(p.get_height() for p in ax.patches) == batch.converged.sum()
    assert ax.get_xlabel() == "Group Var"
    assert _ink(_render(fig)) > 0.02
    for name in ("Intercept", "(Intercept)", "scale", "llf"):
        assert isinstance(batch.plot(name), Figure)


def test_batch_volcano(batch):
    """The red points are the models whose Wald p-value of Days is below alpha (scipy, independently)."""
    from scipy import stats

    fig = batch.plot("Days", kind="volcano", alpha=0.01)
    (ax,) = _visible_axes(fig)
    grey, red = (c.get_offsets() for c in ax.collections[:2])
    est, se = batch.fe_params[:, 1], batch.bse_fe[:, 1]
    p = 2 * stats.norm.sf(np.abs(est / se))
    sig = batch.converged & (p < 0.01)
    assert 0 < sig.sum() < len(p)
    np.testing.assert_allclose(np.sort(np.asarray(red)[:, 0]), np.sort(est[sig]), rtol=1e-12)
    np.testing.assert_allclose(np.sort(np.asarray(red)[:, 1]), np.sort(-np.log10(p[sig])), rtol=1e-9)
    assert len(grey) + len(red) == batch.converged.sum()
    assert _ink(_render(fig)) > 0.02


def test_batch_plot_errors(batch):
    with pytest.raises(ValueError, match="unknown parameter 'Nights'"):
        batch.plot("Nights")
    with pytest.raises(ValueError, match="is not one of"):
        batch.plot("scale", kind="volcano")
    with pytest.raises(ValueError, match="kind must be"):
        batch.plot("Days", kind="pie")


# ------------------------------------------------------------------------------------- matplotlib state
def test_import_does_not_import_matplotlib():
    code = ("import sys, mixedjax, mixedjax.plots; "
            "print('matplotlib' in sys.modules, 'matplotlib.pyplot' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_missing_matplotlib_names_the_extra(dyestuff, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r'pip install "mixedjax\[plot\]"'):
        dyestuff.plot_ranef()


def test_docstring_examples():
    result = doctest.testmod(plots, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
