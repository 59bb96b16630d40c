"""Plots of a fit and of a batch of fits, as lme4 draws them: caterpillar, profile ζ, diagnostics, volcano.

Each function returns a :class:`matplotlib.figure.Figure` built directly (``Figure(...)``),
never through :mod:`matplotlib.pyplot`: no global figure list, no backend chosen, nothing in
matplotlib's state changed, on import or on a call.  matplotlib is imported on the first plot
(the ``plot`` extra: ``pip install "mixedjax[plot]"``).  Save a figure with
``fig.savefig("ranef.png")``; in Jupyter a figure that ends a cell is shown (where no figure
formatter is registered yet, as before the first use of ``pyplot``, the first plot registers
IPython's PNG formatter for figures, which is what matplotlib's inline backend does).

Every plot reads feature functions of the fitted model, so every model kind (per-group,
nested, crossed, structured residuals) is drawn by the same code:

* :func:`plot_ranef`: conditional modes with ``± z`` conditional sds
  (:func:`mixedjax.predict.condvar_frame`; lme4's ``dotplot(ranef(fit, condVar = TRUE))``);
* :func:`plot_profile`: ζ against each parameter (:func:`mixedjax.profile.profile_trace`;
  lme4's ``xyplot(profile(fit))``);
* :func:`plot_diagnostics`: standardised residuals against fitted values, normal QQ plots of
  the residuals and of every random effect (lme4's ``plot(fit)``, ``qqmath``);
* :func:`plot_batch`: one estimate across the models of a
  :class:`mixedjax.many.BatchResults` (histogram), or a volcano plot of a fixed effect.

Examples
--------
>>> import mixedjax
>>> r = mixedjax.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", mixedjax.datasets.load("penicillin"))
>>> fig = plot_ranef(r)
>>> [ax.get_title() for ax in fig.axes]
['plate: (Intercept)', 'sample: (Intercept)']
"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .distributions import stats
from .predict import condvar_frame
from .profile import profile_trace

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .many import BatchResults
    from .results import MixedLMResults

__all__ = ["plot_batch", "plot_diagnostics", "plot_profile", "plot_ranef"]

MAX_LEVEL_LABELS = 60  # more levels than this: no level names on the caterpillar's axis
RASTER_POINTS = 5000  # scatter plots with more points are rasterised (small files)


# ----------------------------------------------------------------------------------------- matplotlib
def _figure(**kwargs: Any) -> Figure:
    """A new ``Figure`` with constrained layout (matplotlib imported here, never at module import)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError('mixedjax\'s plots need matplotlib: pip install "mixedjax[plot]"') from e
    _ipython_png(Figure)
    return Figure(layout="constrained", **kwargs)


def _ipython_png(figure_class: type) -> None:
    """In IPython, display figures as PNG where nothing displays them yet (matplotlib's inline backend
    registers the same formatter once ``pyplot`` is used); outside IPython nothing happens."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    formatters = getattr(getattr(shell, "display_formatter", None), "formatters", None)
    if not formatters or "image/png" not in formatters:
        return
    png = formatters["image/png"]
    try:
        png.lookup_by_type(figure_class)
    except KeyError:
        from IPython.core.pylabtools import print_figure

        png.for_type(figure_class, functools.partial(print_figure, fmt="png", bbox_inches="tight"))


def _norm() -> Any:
    return stats.norm


def _grid(n: int) -> tuple[int, int]:
    """Rows and columns for ``n`` panels: at most three columns, two for 2 and 4."""
    ncols = 2 if n == 4 else max(1, min(n, 3))
    return -(-n // ncols), ncols


def _ppoints(n: int) -> np.ndarray:
    """R's ``ppoints``: ``(i − a) / (n + 1 − 2a)``, ``a = 3/8`` for ``n ≤ 10``, else ``1/2``."""
    a = 0.375 if n <= 10 else 0.5
    return (np.arange(1, n + 1) - a) / (n + 1 - 2 * a)


def _qq(ax: Any, values: np.ndarray, title: str) -> None:
    """A normal QQ plot with R's ``qqline`` (through the quartiles)."""
    x = np.sort(np.asarray(values, float)[np.isfinite(values)])
    if x.size == 0:
        ax.set_title(title)
        return
    norm = _norm()
    q = norm.ppf(_ppoints(x.size))
    ax.scatter(q, x, s=10, color="C0", alpha=0.7, linewidths=0, rasterized=x.size > RASTER_POINTS)
    y1, y3 = np.quantile(x, [0.25, 0.75])
    z1, z3 = norm.ppf([0.25, 0.75])
    slope = (y3 - y1) / (z3 - z1)
    ax.axline((z1, y1), slope=slope if np.isfinite(slope) else 0.0, color="0.35", lw=1, ls="--")
    ax.set_title(title)
    ax.set_xlabel("normal quantile")


# --------------------------------------------------------------------------------------------- ranef
def plot_ranef(res: MixedLMResults, alpha: float = 0.05, figsize: tuple[float, float] | None = None) -> Figure:
    """Caterpillar plot of the conditional modes: lme4's ``dotplot(ranef(fit, condVar = TRUE))``.

    One panel per grouping factor and random-effects column (a row of panels per factor);
    each level's conditional mode with the interval ``± z_{1−alpha/2}`` conditional sds
    (:func:`mixedjax.predict.condvar_frame`).  Within a factor the levels are sorted by the
    mode of its first column, in every panel of the factor (lme4's order), so that the
    panels of one factor line up.  Level names are written for up to 60 levels.

    Parameters
    ----------
    res : MixedLMResults
        Any fit.
    alpha : float
        The intervals are ``1 − alpha`` normal intervals (default 95 %).
    figsize : (float, float), optional
        Default: wide enough for the columns, tall enough for the levels.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import mixedjax
    >>> d = mixedjax.datasets.load("sleepstudy")
    >>> r = mixedjax.lmer("Reaction ~ Days + (Days | Subject)", d)
    >>> fig = plot_ranef(r)
    >>> [ax.get_title() for ax in fig.axes]
    ['Subject: (Intercept)', 'Subject: Days']
    """
    cv = condvar_frame(res)
    z = float(_norm().ppf(1 - alpha / 2))
    factors = list(dict.fromkeys(cv["grpvar"]))
    terms = {f: list(dict.fromkeys(cv.loc[cv["grpvar"] == f, "term"])) for f in factors}
    n_levels = {f: int(((cv["grpvar"] == f) & (cv["term"] == terms[f][0])).sum()) for f in factors}
    heights = [float(np.clip(0.17 * n_levels[f] + 1.0, 1.8, 9.0)) for f in factors]
    ncols = max((len(t) for t in terms.values()), default=1)
    fig = _figure(figsize=figsize or (max(3.4 * ncols, 5.0), sum(heights) + 0.4))
    if not factors:
        fig.suptitle("no random effects")
        return fig
    subfigs = np.atleast_1d(fig.subfigures(len(factors), 1, height_ratios=heights))
    for sf, f in zip(subfigs, factors, strict=True):
        rows = cv[cv["grpvar"] == f]
        first = rows[rows["term"] == terms[f][0]]
        order = list(first.sort_values("condval", kind="stable")["grp"])
        pos = {g: i for i, g in enumerate(order)}
        axes = np.atleast_1d(sf.subplots(1, len(terms[f]), sharey=True, squeeze=False)[0])
        for ax, term in zip(axes, terms[f], strict=True):
            d = rows[rows["term"] == term]
            y = d["grp"].map(pos).to_numpy(dtype=float)
            ax.errorbar(d["condval"], y, xerr=z * d["condsd"].to_numpy(), fmt="o", ms=3.5, color="C0",
                        ecolor="0.6", elinewidth=1.2, capsize=0)
            ax.axvline(0.0, color="0.3", lw=0.8, ls=":")
            ax.set_title(f"{f}: {term}")
            ax.set_xlabel("conditional mode")
            ax.set_ylim(-0.8, len(order) - 0.2)
        if len(order) <= MAX_LEVEL_LABELS:
            axes[0].set_yticks(np.arange(len(order)), labels=[str(g) for g in order],
                               fontsize=8 if len(order) > 25 else 9)
        else:
            axes[0].set_yticks([])
            axes[0].set_ylabel(f"{len(order)} levels, sorted")
    fig.suptitle(f"conditional modes with {100 * (1 - alpha):g}% intervals (± {z:.2f} conditional sd)",
                 fontsize=10)
    return fig


# ------------------------------------------------------------------------------------------- profile
def plot_profile(res: MixedLMResults, params: list[str] | None = None, alpha: float = 0.05,
                 figsize: tuple[float, float] | None = None) -> Figure:
    """The profile ζ of each parameter with its interval: lme4's ``xyplot(profile(fit))``.

    ``ζ(v) = sign(v − v̂) sqrt(D(v) − D̂)`` from the ML profile
    (:func:`mixedjax.profile.profile_trace`: the same fit and interval ends as
    ``conf_int(method="profile")``), one panel per parameter on lme4's scale (``sd_...``,
    ``cor_...``, ``sigma``, fixed effects, residual-structure parameters); the lines
    ``ζ = ±z`` and the interval ends are marked.  A straight line means a quadratic
    log-likelihood (Wald intervals would do); curvature is what the profile interval adds.

    Parameters
    ----------
    res : MixedLMResults
        Any fit (REML fits are refitted by ML first, as lme4).
    params : list of str, optional
        lme4's names of the parameters to draw (``res.conf_int(method="profile").index``);
        default all.  Each parameter costs its own profile: pass a few for speed.
    alpha : float
        ``1 − alpha`` intervals.
    figsize : (float, float), optional

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import mixedjax
    >>> r = mixedjax.lmer("Yield ~ 1 + (1 | Batch)", mixedjax.datasets.load("dyestuff"))
    >>> fig = plot_profile(r, params=["sd_(Intercept)|Batch", "sigma"])
    >>> [ax.get_title() for ax in fig.axes]
    ['sd_(Intercept)|Batch', 'sigma']
    """
    pt = profile_trace(res, params=params, alpha=alpha)
    z = float(_norm().ppf(1 - alpha / 2))
    names = list(dict.fromkeys(pt.trace["parameter"]))
    nrows, ncols = _grid(max(len(names), 1))
    fig = _figure(figsize=figsize or (3.2 * ncols + 0.4, 2.7 * nrows + 0.5))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, name in zip(axes, names, strict=False):
        d = pt.trace[pt.trace["parameter"] == name]
        ax.plot(d["value"], d["zeta"], "-o", ms=3, color="C0")
        ax.axhline(0.0, color="0.3", lw=0.8, ls=":")
        for s in (-z, z):
            ax.axhline(s, color="0.5", lw=0.8, ls="--")
        for end in pt.conf_int.loc[name]:
            if np.isfinite(end):
                ax.axvline(end, color="C3", lw=1.0, ls="--")
        ax.plot([pt.estimate[name]], [0.0], "D", color="C3", ms=4)
        ax.set_title(name)
        ax.set_ylabel("ζ")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle(f"profile ζ (ML), {100 * (1 - alpha):g}% intervals dashed", fontsize=10)
    return fig


# ------------------------------------------------------------------------------------------ diagnostics
def standardized_residuals(res: MixedLMResults) -> np.ndarray:
    """Pearson residuals ``(y − ŷ) sqrt(w) / (σ̂ r)`` per row (model order), ``ŷ = x β̂ + z b̂``.

    ``w`` are the prior weights and ``r`` the row's VarIdent sd ratio (1 without one): the
    residuals nlme's ``resid(fit, type = "pearson")`` gives; AR(1) correlation is not
    removed from them.

    Examples
    --------
    >>> import mixedjax
    >>> d = mixedjax.datasets.load("orthodont")
    >>> r = mixedjax.mixedlm("distance ~ age + Sex", d, groups="Subject", residual=mixedjax.VarIdent("Sex")).fit()
    >>> e = standardized_residuals(r)
    >>> [round(float(v), 2) for v in pd.Series(e).groupby(d["Sex"].to_numpy()).std()]
    [0.87, 0.9]
    """
    m = res.model
    e = np.asarray(res.resid, float)
    w = getattr(m, "weights", None)
    w = np.ones_like(e) if w is None else np.asarray(w, float)
    ratio = np.ones_like(e)
    bound = getattr(m, "residual", None)
    sd_ratio = res.residual_structure.get("sd_ratio")
    if bound is not None and bound.strata is not None and sd_ratio is not None:
        ratio = np.asarray(sd_ratio, float)[np.asarray(bound.strata)]
    return e * np.sqrt(w) / (np.sqrt(res.scale) * ratio)


def plot_diagnostics(res: MixedLMResults, figsize: tuple[float, float] | None = None) -> Figure:
    """Residuals against fitted values, and normal QQ plots of the residuals and of every random effect.

    The residuals are standardised (:func:`standardized_residuals`: Pearson, prior weights
    and VarIdent ratios divided out) and plotted against the conditional fitted values
    ``x β̂ + z b̂`` (lme4's ``plot(fit)``), with their means in 20 bins of fitted values (a
    trend shows a misspecified mean).  Then a normal QQ plot of the residuals and one of the
    conditional modes of each grouping factor and column (lme4's ``qqmath(ranef(fit))``),
    each with R's ``qqline``.

    Parameters
    ----------
    res : MixedLMResults
        Any fit.
    figsize : (float, float), optional

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import mixedjax
    >>> d = mixedjax.datasets.load("sleepstudy")
    >>> r = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", re_formula="~Days").fit()
    >>> [ax.get_title() for ax in plot_diagnostics(r).axes]
    ['residuals vs fitted', 'residuals', 'Subject: (Intercept)', 'Subject: Days']
    """
    fitted = np.asarray(res.fittedvalues, float)
    e = standardized_residuals(res)
    cv = condvar_frame(res)
    panels = list(dict.fromkeys(zip(cv["grpvar"], cv["term"], strict=True)))
    nrows, ncols = _grid(2 + len(panels))
    fig = _figure(figsize=figsize or (3.4 * ncols + 0.3, 2.9 * nrows + 0.4))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    ax = axes[0]
    ax.scatter(fitted, e, s=8, color="C0", alpha=0.5, linewidths=0, rasterized=e.size > RASTER_POINTS)
    ax.axhline(0.0, color="0.3", lw=0.8, ls=":")
    ok = np.isfinite(fitted) & np.isfinite(e)
    if ok.sum() >= 40:
        edges = np.unique(np.quantile(fitted[ok], np.linspace(0, 1, 21)))
        which = np.clip(np.searchsorted(edges, fitted[ok], side="right") - 1, 0, len(edges) - 2)
        centre = pd.Series(fitted[ok]).groupby(which).mean()
        mean = pd.Series(e[ok]).groupby(which).mean()
        ax.plot(centre.to_numpy(), mean.to_numpy(), color="C3", lw=1.5)
    ax.set_title("residuals vs fitted")
    ax.set_xlabel("fitted value")
    ax.set_ylabel("standardised residual")
    _qq(axes[1], e, "residuals")
    for ax, (f, term) in zip(axes[2:], panels, strict=False):
        sel = (cv["grpvar"] == f) & (cv["term"] == term)
        _qq(ax, cv.loc[sel, "condval"].to_numpy(dtype=float), f"{f}: {term}")
    for ax in axes[2 + len(panels):]:
        ax.set_visible(False)
    fig.suptitle("diagnostics: standardised residuals and conditional modes", fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------- batches
def _batch_columns(batch: BatchResults) -> dict[str, np.ndarray]:
    """Every per-model estimate of a batch by name: fixed effects, variance parameters (``params``' names),
    residual-structure parameters, ``scale`` and ``llf``."""
    m = batch.model
    out = {str(n): np.asarray(batch.fe_params)[:, j] for j, n in enumerate(m.exog_names)}
    out.update({str(n): c for n, c in zip(m.cov_param_names(), np.asarray(batch.variance_params()).T, strict=True)})
    out.update({str(n): c for n, c in zip(m.residual_param_names, np.asarray(batch.residual_params).T,
                                          strict=True)})
    out["scale"], out["llf"] = np.asarray(batch.scale, float), np.asarray(batch.llf, float)
    return out


def plot_batch(batch: BatchResults, param: str, kind: str = "hist", alpha: float = 0.05, bins: int = 30,
               figsize: tuple[float, float] | None = None) -> Figure:
    """One estimate across the models of a batch: its histogram, or a volcano plot of a fixed effect.

    ``kind="hist"``: the distribution of ``param`` over the converged models (a fixed
    effect, a variance parameter by its ``params`` name, a residual-structure parameter,
    ``"scale"`` or ``"llf"``), its median marked.  ``kind="volcano"``: for a fixed effect,
    the estimate against ``−log10 p`` of its two-sided Wald z test (``β̂ / bse_fe``, the
    normal reference of statsmodels' ``pvalues``), models with ``p < alpha`` highlighted,
    with lines at ``alpha`` and at Bonferroni's ``alpha / M``.  Models that did not converge
    are left out, and the title says how many.

    Parameters
    ----------
    batch : BatchResults
        From :meth:`fit_many <mixedjax.model.LinearMixedModel.fit_many>` or :func:`mixedjax.fit_batch`.
    param : str
        The estimate (``"Intercept"`` and ``"(Intercept)"`` both name the intercept).
    kind : {"hist", "volcano"}
    alpha : float
        Significance level of the volcano plot.
    bins : int
        Histogram bins.
    figsize : (float, float), optional

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import mixedjax, numpy as np
    >>> d = mixedjax.datasets.load("sleepstudy")
    >>> md = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject")
    >>> y = d["Reaction"].to_numpy()[:, None] + np.random.default_rng(0).normal(0, 20, (180, 20))
    >>> fig = plot_batch(md.fit_many(y), "Days", kind="volcano")
    >>> fig.axes[0].get_xlabel()
    'Days estimate'
    """
    if kind not in ("hist", "volcano"):
        raise ValueError(f"kind must be 'hist' or 'volcano', got {kind!r}")
    cols = _batch_columns(batch)
    fe_names = [str(n) for n in batch.model.exog_names]
    key = param
    if key not in cols:
        alias = {"(Intercept)": "Intercept", "Intercept": "(Intercept)"}.get(key)
        key = alias if alias in cols else key
    if key not in cols:
        raise ValueError(f"unknown parameter {param!r}; this batch has {list(cols)}")
    conv = np.asarray(batch.converged, bool)
    m_count = len(conv)
    fig = _figure(figsize=figsize or (5.5, 4.0))
    ax = fig.subplots()
    if kind == "hist":
        x = cols[key]
        use = conv & np.isfinite(x)
        ax.hist(x[use], bins=bins, color="C0", alpha=0.8)
        if use.any():
            med = float(np.median(x[use]))
            ax.axvline(med, color="C3", lw=1.2, label=f"median {med:.4g}")
            ax.legend(frameon=False, fontsize=8)
        ax.set_xlabel(key)
        ax.set_ylabel("models")
        left = m_count - int(use.sum())
        ax.set_title(f"{key} across {m_count} models" + (f" ({left} not converged, left out)" if left else ""),
                     fontsize=10)
        return fig
    if key not in fe_names:
        raise ValueError(f"a volcano plot is of a fixed effect; {param!r} is not one of {fe_names}")
    j = fe_names.index(key)
    est = np.asarray(batch.fe_params, float)[:, j]
    se = np.asarray(batch.bse_fe, float)[:, j]
    with np.errstate(divide="ignore", invalid="ignore"):
        p = 2.0 * _norm().sf(np.abs(est / se))
        y = -np.log10(p)
    use = conv & np.isfinite(est) & np.isfinite(y)
    sig = use & (p < alpha)
    ax.scatter(est[use & ~sig], y[use & ~sig], s=10, color="0.55", alpha=0.7, linewidths=0,
               rasterized=use.sum() > RASTER_POINTS, label=f"p ≥ {alpha:g}")
    ax.scatter(est[sig], y[sig], s=12, color="C3", alpha=0.8, linewidths=0,
               rasterized=use.sum() > RASTER_POINTS, label=f"p < {alpha:g}")
    ax.axhline(-np.log10(alpha), color="0.4", lw=0.8, ls="--")
    ax.axhline(-np.log10(alpha / max(m_count, 1)), color="0.4", lw=0.8, ls=":")
    ax.axvline(0.0, color="0.3", lw=0.8, ls=":")
    ax.set_xlabel(f"{key} estimate")
    ax.set_ylabel("−log10 p (Wald z)")
    ax.legend(frameon=False, fontsize=8)
    left = m_count - int(use.sum())
    ax.set_title(f"{key}: {int(sig.sum())} of {m_count} models with p < {alpha:g}"
                 + (f" ({left} not converged, left out)" if left else "") + "; dotted: Bonferroni", fontsize=10)
    return fig
