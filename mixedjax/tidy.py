"""Tidy output of a fit: broom.mixed's ``tidy`` table, a JSON-ready dictionary, HTML and LaTeX tables.

:func:`tidy_frame` is :meth:`mixedjax.MixedLMResults.to_frame`: one row per parameter with the
columns of R's ``broom.mixed::tidy`` (``effect, group, term, estimate, std_error, statistic, df,
p_value, conf_low, conf_high``) and its term names (``(Intercept)``, ``sd__(Intercept)``,
``cor__(Intercept).Days``, ``sd__Observation``).  :func:`result_dict` is
:meth:`~mixedjax.MixedLMResults.to_dict` (what ``mixedjax fit --output json`` prints);
:func:`json_ready` turns NaN and infinities into ``None`` so that ``json.dumps(...,
allow_nan=False)`` accepts it.  :func:`tables_html` and :func:`tables_latex` render the
summary tables (``summary().as_html()``, ``as_latex()``, the notebook ``_repr_html_``).

The functions read only public attributes of the results object, so every model kind (one
grouping factor, nested, crossed, structured residuals) gets the same table.

Examples
--------
>>> import mixedjax
>>> d = mixedjax.datasets.load("sleepstudy")
>>> r = mixedjax.lmer("Reaction ~ Days + (Days | Subject)", d)
>>> t = tidy_frame(r, ddf=None)
>>> list(t.term)
['(Intercept)', 'Days', 'sd__(Intercept)', 'cor__(Intercept).Days', 'sd__Days', 'sd__Observation']
>>> list(t.group.fillna("NA"))
['NA', 'NA', 'Subject', 'Subject', 'Subject', 'Residual']
>>> round(float(t.estimate.iloc[2]), 4), round(float(t.estimate.iloc[5]), 4)  # lme4: 24.7405, 25.5918
(24.7405, 25.5918)
"""

from __future__ import annotations

import html
import math
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .profile import COR, FE, RHO, SD, SIGMA, Parameter, lme4_estimates, lme4_parameters

if TYPE_CHECKING:
    from .results import MixedLMResults

__all__ = ["TIDY_COLUMNS", "RAN_PARS_CI", "json_ready", "result_dict", "tables_html", "tables_latex",
           "term_name", "tidy_frame"]

TIDY_COLUMNS = ["effect", "group", "term", "estimate", "std_error", "statistic", "df", "p_value", "conf_low",
                "conf_high"]
RAN_PARS_CI = (None, "wald", "profile")


# ------------------------------------------------------------------------------------------- the tidy table
def _groups(res: MixedLMResults) -> list[str]:
    """The ``group`` of each term's rows, as in ``res.varcorr()``: lme4's term label (``Subject``,
    ``cask:batch``, ``g.1``), or for a ``mixedlm`` variance component the name given in ``vc_formula``."""
    m = res.model
    return [info.source if (m.api == "statsmodels" and info.source) else lab
            for info, lab in zip(m.term_info, res.term_labels, strict=True)]


def term_name(res: MixedLMResults, p: Parameter) -> str:
    """broom.mixed's name of one parameter of :func:`mixedjax.profile.lme4_parameters`.

    ``sd__<column>``, ``cor__<column1>.<column2>``, ``sd__Observation`` (the residual sd),
    ``(Intercept)`` and the other fixed effects; a residual-structure parameter is
    ``sd_ratio__<level>`` (VarIdent: the level's residual sd over the first level's) or
    ``phi__AR1`` (the AR(1) correlation of neighbours).

    Examples
    --------
    >>> import mixedjax
    >>> d = mixedjax.datasets.load("sleepstudy")
    >>> r = mixedjax.lmer("Reaction ~ Days + (Days | Subject)", d)
    >>> [term_name(r, p) for p in lme4_parameters(r)]
    ['sd__(Intercept)', 'cor__(Intercept).Days', 'sd__Days', 'sd__Observation', '(Intercept)', 'Days']
    """
    if p.kind == FE:
        return p.name
    if p.kind == SIGMA:
        return "sd__Observation"
    if p.kind == RHO:
        name = res.model.residual_param_names[p.index]
        if name.startswith("sd ratio "):
            return "sd_ratio__" + name[len("sd ratio "):]
        return "phi__AR1" if name == "Phi" else name.replace(" ", "_")
    names = res.model.term_info[p.index].names
    if p.kind == SD:
        return f"sd__{names[p.columns[0]]}"
    j, i = p.columns
    return f"cor__{names[j]}.{names[i]}"


def _entry(t: Any, i: int, j: int) -> int:
    """Position of covariance entry ``(i, j)`` among a term's natural parameters (its lower triangle)."""
    r, c = t.positions()
    return int(np.flatnonzero((r == max(i, j)) & (c == min(i, j)))[0])


def _natural_index(res: MixedLMResults) -> list[int]:
    """Offset of each term's entries in the natural-scale parameter vector (``cov_natural``'s order)."""
    offsets, off = [], 0
    for t in res.fitted.backend.terms:
        offsets.append(off)
        off += t.n_theta
    return offsets


def _wald_ran_pars(res: MixedLMResults, pars: list[Parameter], est: np.ndarray, z: float
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Delta-method standard errors of the sds, correlations, σ and residual parameters from the inverse
    observed information of the natural-scale variances (``cov_natural_scale``), and Wald intervals on the
    scale nlme's ``intervals()`` uses: log for sds and sd ratios, atanh (Fisher's z) for correlations and φ."""
    cov = res.cov_natural_scale
    backend = res.fitted.backend
    terms = backend.terms
    offsets = _natural_index(res)
    n_cov = sum(t.n_theta for t in terms)
    k = cov.shape[0] - 1
    covs = res.term_covs
    se, lo, hi = np.full(len(pars), np.nan), np.full(len(pars), np.nan), np.full(len(pars), np.nan)
    for n, p in enumerate(pars):
        grad = np.zeros(k + 1)
        if p.kind == SD:
            j = p.columns[0]
            grad[offsets[p.index] + _entry(terms[p.index], j, j)] = 0.5 / est[n] if est[n] > 0 else np.nan
        elif p.kind == COR:
            (a, b), cv, off = p.columns, covs[p.index], offsets[p.index]
            if not (cv[a, a] > 0 and cv[b, b] > 0):
                continue
            grad[off + _entry(terms[p.index], a, b)] = 1.0 / math.sqrt(cv[a, a] * cv[b, b])
            grad[off + _entry(terms[p.index], a, a)] = -est[n] / (2.0 * cv[a, a])
            grad[off + _entry(terms[p.index], b, b)] = -est[n] / (2.0 * cv[b, b])
        elif p.kind == RHO:
            grad[n_cov + p.index] = 1.0
        elif p.kind == SIGMA:
            grad[k] = 0.5 / est[n]
        else:
            continue
        if not np.all(np.isfinite(grad)):
            continue
        use = np.flatnonzero(grad)
        var = float(grad[use] @ cov[np.ix_(use, use)] @ grad[use])
        if not (np.isfinite(var) and var >= 0):
            continue
        se[n] = math.sqrt(var)
        log_scale = p.kind in (SD, SIGMA) or (p.kind == RHO and term_name(res, p).startswith("sd_ratio__"))
        if log_scale and est[n] > 0:
            half = z * se[n] / est[n]
            lo[n], hi[n] = est[n] * math.exp(-half), est[n] * math.exp(half)
        elif not log_scale and abs(est[n]) < 1:
            centre, half = math.atanh(est[n]), z * se[n] / (1.0 - est[n] ** 2)
            lo[n], hi[n] = math.tanh(centre - half), math.tanh(centre + half)
    return se, lo, hi


def tidy_frame(res: MixedLMResults, ddf: str | None = "satterthwaite", ran_pars_ci: str | None = None,
               alpha: float = 0.05) -> pd.DataFrame:
    """One row per parameter, with the columns of R's ``broom.mixed::tidy`` (:data:`TIDY_COLUMNS`).

    Rows: the fixed effects (``effect = "fixed"``, ``group`` NaN), then for every
    random-effects term in lme4's order (``effect = "ran_pars"``, ``group`` the grouping
    factor as in ``varcorr()``) the sd of each column followed by its correlations with the
    later columns (``sd__(Intercept)``, ``cor__(Intercept).Days``, ``sd__Days``), then the
    residual sd (``group = "Residual"``, ``sd__Observation``) and the residual-structure
    parameters (``sd_ratio__<level>``, ``phi__AR1``; group ``"Residual"``).

    Parameters
    ----------
    res : MixedLMResults
        Any fit.
    ddf : {"satterthwaite", "kenward-roger", None}
        The fixed effects' t tests: lmerTest's Satterthwaite (default) or Kenward–Roger
        denominator df (``fe_table``), or None for Wald z tests (``df`` is then NaN).
    ran_pars_ci : {None, "wald", "profile"}
        Uncertainty of the ``ran_pars`` rows.  None (default, as broom.mixed): ``std_error``
        and the interval are NaN (nothing beyond the fit is computed).  ``"wald"``:
        delta-method standard errors from the observed information of the variances
        (``cov_natural_scale``) and Wald intervals on the log scale of each sd / sd ratio
        and the atanh scale of each correlation / φ (nlme's ``intervals()``).  ``"profile"``:
        lme4's profile-likelihood intervals (``conf_int(method="profile")``: an ML refit
        and a profile per parameter; ``std_error`` stays NaN).  ``statistic``, ``df`` and
        ``p_value`` are NaN on ``ran_pars`` rows.
    alpha : float
        ``conf_low``/``conf_high`` are ``1 - alpha`` intervals.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`TIDY_COLUMNS`; ``statistic = estimate / std_error`` on fixed rows.

    Examples
    --------
    >>> import mixedjax
    >>> d = mixedjax.datasets.load("sleepstudy")
    >>> r = mixedjax.lmer("Reaction ~ Days + (Days | Subject)", d)
    >>> t = tidy_frame(r)
    >>> t.round(3).iloc[:, 2:7]  # lmerTest: df 17, t 36.838 and 6.771
                        term  estimate  std_error  statistic    df
    0            (Intercept)   251.405      6.825     36.838  17.0
    1                   Days    10.467      1.546      6.771  17.0
    2        sd__(Intercept)    24.740        NaN        NaN   NaN
    3  cor__(Intercept).Days     0.066        NaN        NaN   NaN
    4               sd__Days     5.922        NaN        NaN   NaN
    5        sd__Observation    25.592        NaN        NaN   NaN
    """
    if ran_pars_ci not in RAN_PARS_CI:
        raise ValueError(f"ran_pars_ci must be None, 'wald' or 'profile', got {ran_pars_ci!r}")
    fe = res.fe_table(ddf, alpha)
    lo_col, hi_col = fe.columns[-2], fe.columns[-1]
    fixed = pd.DataFrame({
        "effect": "fixed",
        "group": np.nan,
        "term": ["(Intercept)" if n == "Intercept" else str(n) for n in fe.index],
        "estimate": fe["Estimate"].to_numpy(float),
        "std_error": fe["Std. Error"].to_numpy(float),
        "statistic": fe["t value"].to_numpy(float),
        "df": np.where(np.isfinite(fe["df"].to_numpy(float)), fe["df"].to_numpy(float), np.nan),
        "p_value": fe["Pr(>|t|)"].to_numpy(float),
        "conf_low": fe[lo_col].to_numpy(float),
        "conf_high": fe[hi_col].to_numpy(float),
    })
    pars = lme4_parameters(res)
    est = lme4_estimates(pars, res.fitted)
    keep = [n for n, p in enumerate(pars) if p.kind != FE]
    # lme4_parameters: terms, residual parameters, σ; broom.mixed: terms, then the Residual rows (σ first)
    order = ([n for n in keep if pars[n].kind in (SD, COR)] + [n for n in keep if pars[n].kind == SIGMA]
             + [n for n in keep if pars[n].kind == RHO])
    se, lo, hi = np.full(len(pars), np.nan), np.full(len(pars), np.nan), np.full(len(pars), np.nan)
    if ran_pars_ci == "wald":
        z = NormalDist().inv_cdf(1 - alpha / 2)
        se, lo, hi = _wald_ran_pars(res, pars, est, z)
    elif ran_pars_ci == "profile":
        ci = res.conf_int(method="profile", alpha=alpha)  # rows in lme4_parameters order
        lo, hi = ci.iloc[:, 0].to_numpy(float), ci.iloc[:, 1].to_numpy(float)
    groups = _groups(res)
    ran = pd.DataFrame({
        "effect": "ran_pars",
        "group": [groups[pars[n].index] if pars[n].kind in (SD, COR) else "Residual" for n in order],
        "term": [term_name(res, pars[n]) for n in order],
        "estimate": est[order],
        "std_error": se[order],
        "statistic": np.nan,
        "df": np.nan,
        "p_value": np.nan,
        "conf_low": lo[order],
        "conf_high": hi[order],
    })
    out = pd.concat([fixed, ran], ignore_index=True)
    out["group"] = out["group"].astype(object).where(out["group"].notna(), np.nan)
    return out[TIDY_COLUMNS]


# --------------------------------------------------------------------------------------------- JSON
def json_ready(obj: Any) -> Any:
    """``obj`` with numpy scalars and arrays as Python objects and NaN / ±inf as ``None`` (JSON's null).

    Examples
    --------
    >>> import json, numpy as np
    >>> json.dumps(json_ready({"a": np.float64("nan"), "b": [np.int64(2), np.inf], "c": np.bool_(True)}),
    ...            allow_nan=False)
    '{"a": null, "b": [2, null], "c": true}'
    """
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [json_ready(v) for v in obj.tolist()]
    if isinstance(obj, pd.Series):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if obj is None or obj is pd.NA or obj is pd.NaT:
        return None
    return obj if isinstance(obj, str) else str(obj)


def _records(df: pd.DataFrame) -> list[dict]:
    """Rows of ``df`` as dictionaries, missing values as None."""
    return [{c: (None if (not isinstance(v, str) and pd.isna(v)) else v) for c, v in row.items()}
            for row in df.to_dict(orient="records")]


def result_dict(res: MixedLMResults, ddf: str | None = "satterthwaite", ran_pars_ci: str | None = None,
                alpha: float = 0.05) -> dict:
    """The fit as one JSON-serialisable dictionary (what ``mixedjax fit --output json`` prints).

    Keys: ``model`` (``api``, ``formula``, ``response``, ``groups``, ``re_formula``,
    ``vc_formula``, ``backend``), ``method`` (``"REML"``/``"ML"``), ``nobs``, ``ngroups``
    (levels of each term's grouping factor), ``llf``, ``deviance`` (``-2 llf``), ``aic``,
    ``bic``, ``df_modelwc``, ``converged``, ``singular``, ``message``, ``scale``,
    ``fe_params`` and ``bse_fe`` (name → value), ``varcorr`` (rows of lme4's
    ``as.data.frame(VarCorr())``: ``grp, var1, var2, vcov, sdcor``), ``residual_structure``,
    ``ddf`` and ``tidy`` (the rows of :func:`tidy_frame`).  NaN and infinities are ``None``.

    Examples
    --------
    >>> import json, mixedjax
    >>> d = mixedjax.datasets.load("sleepstudy")
    >>> out = result_dict(mixedjax.lmer("Reaction ~ Days + (Days | Subject)", d), ddf=None)
    >>> out["method"], out["nobs"], round(out["llf"], 4), out["varcorr"][3]["grp"]
    ('REML', 180, -871.8141, 'Residual')
    >>> len(json.dumps(out, allow_nan=False)) > 0
    True
    """
    m = res.model
    vc = res.varcorr().rename(columns={"group": "grp"})
    order = res.model.term_info
    out = {
        "model": {
            "api": m.api,
            "formula": getattr(m, "formula", None),
            "response": getattr(m, "endog_names", None),
            "groups": getattr(m, "group_name", None) if m.api == "statsmodels" else None,
            "re_formula": getattr(m, "re_formula", None) if m.api == "statsmodels" else None,
            "vc_formula": (getattr(m, "vc_formula", None) or None) if m.api == "statsmodels" else None,
            "backend": res.fitted.backend.kind,
        },
        "method": res.method,
        "nobs": int(res.nobs),
        "ngroups": {lab: int(info.n_levels) for lab, info in zip(res.term_labels, order, strict=True)},
        "llf": res.llf,
        "deviance": -2.0 * res.llf,
        "aic": res.aic,
        "bic": res.bic,
        "df_modelwc": int(res.df_modelwc),
        "converged": bool(res.converged),
        "singular": bool(res.singular),
        "message": res.optim.message,
        "scale": res.scale,
        "fe_params": {str(k): float(v) for k, v in res.fe_params.items()},
        "bse_fe": {str(k): float(v) for k, v in res.bse_fe.items()},
        "varcorr": _records(vc),
        "residual_structure": {k: (v.to_dict() if isinstance(v, pd.Series) else v)
                               for k, v in res.residual_structure.items()},
        "ddf": ddf,
        "tidy": _records(tidy_frame(res, ddf=ddf, ran_pars_ci=ran_pars_ci, alpha=alpha)),
    }
    return json_ready(out)


# ------------------------------------------------------------------------------------------ HTML, LaTeX
def _info_rows(info: list[tuple[str, str]]) -> list[tuple[str, str, str, str]]:
    """statsmodels' two-column model information: the first half of ``info`` left, the rest right."""
    half = (len(info) + 1) // 2
    left, right = info[:half], info[half:]
    return [(*left[i], *(right[i] if i < len(right) else ("", ""))) for i in range(half)]


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, float | np.floating):
        return f"{v:.4f}"
    return str(v)


def tables_html(title: str, info: list[tuple[str, str]], tables: list[tuple[str, pd.DataFrame]],
                notes: str = "") -> str:
    """HTML of a summary: a captioned model-information table, then each ``(caption, table)`` (index as
    the first column), then ``notes`` as preformatted text.  Cells are escaped.

    Examples
    --------
    >>> import pandas as pd
    >>> s = tables_html("T", [("Method:", "REML")], [("Fixed", pd.DataFrame({"Coef.": ["1.0"]}, index=["a<b"]))])
    >>> "<caption>T</caption>" in s, "a&lt;b" in s
    (True, True)
    """
    e = html.escape
    out = ['<table class="simpletable">', f"<caption>{e(title)}</caption>"]
    for row in _info_rows(info):
        out.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>")
    out.append("</table>")
    for caption, df in tables:
        out.append('<table class="simpletable">')
        if caption:
            out.append(f"<caption>{e(caption)}</caption>")
        out.append("<tr><th></th>" + "".join(f"<th>{e(str(c))}</th>" for c in df.columns) + "</tr>")
        for idx, row in zip(df.index, df.itertuples(index=False), strict=True):
            out.append(f"<tr><th>{e(str(idx))}</th>" + "".join(f"<td>{e(_cell(v))}</td>" for v in row) + "</tr>")
        out.append("</table>")
    if notes:
        out.append(f"<pre>{e(notes)}</pre>")
    return "\n".join(out)


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}"}


def latex_escape(text: str) -> str:
    r"""``text`` with LaTeX's special characters escaped.

    Examples
    --------
    >>> latex_escape("P>|z| & 5%")
    'P\\textgreater{}\\textbar{}z\\textbar{} \\& 5\\%'
    """
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def tables_latex(title: str, info: list[tuple[str, str]], tables: list[tuple[str, pd.DataFrame]],
                 notes: str = "") -> str:
    r"""LaTeX of a summary, as statsmodels' ``Summary.as_latex``: one ``table`` environment with the
    model information and each ``(caption, table)`` as ``tabular`` blocks, then ``notes`` (verbatim).

    Examples
    --------
    >>> import pandas as pd
    >>> s = tables_latex("T", [("Method:", "REML")], [("", pd.DataFrame({"Coef.": ["1.0"]}, index=["x_1"]))])
    >>> s.splitlines()[:2], "x\\_1 & 1.0 \\\\" in s
    (['\\begin{table}', '\\caption{T}'], True)
    """
    x = latex_escape
    out = [r"\begin{table}", rf"\caption{{{x(title)}}}", r"\begin{center}", r"\begin{tabular}{llll}", r"\hline"]
    out += [" & ".join(x(str(c)) for c in row) + r" \\" for row in _info_rows(info)]
    out += [r"\hline", r"\end{tabular}"]
    for caption, df in tables:
        out.append(r"\par\medskip")
        if caption:
            out.append(rf"\textbf{{{x(caption)}}}\par")
        out += [rf"\begin{{tabular}}{{l{'r' * len(df.columns)}}}", r"\hline",
                " & ".join(["", *(x(str(c)) for c in df.columns)]) + r" \\", r"\hline"]
        for idx, row in zip(df.index, df.itertuples(index=False), strict=True):
            out.append(" & ".join([x(str(idx)), *(x(_cell(v)) for v in row)]) + r" \\")
        out += [r"\hline", r"\end{tabular}"]
    out.append(r"\end{center}")
    if notes:
        out += [r"\begin{verbatim}", notes, r"\end{verbatim}"]
    out.append(r"\end{table}")
    return "\n".join(out)


def results_tables(res: MixedLMResults) -> tuple[str, list[tuple[str, str]], list[tuple[str, pd.DataFrame]], str]:
    """A brief view of a fit, without anything beyond the estimates (lme4's ``print(fit)``): ``(title, model
    information, [fixed effects (estimate, std. error, z), random effects (``varcorr``)], notes)``."""
    m = res.model
    groups = ", ".join(f"{lab} {info.n_levels}" for lab, info in zip(res.term_labels, m.term_info, strict=True))
    info = [("Model:", "MixedLM" if res.fitted.backend.kind == "grouped" else "MixedLM (crossed)"),
            ("Dependent Variable:", str(getattr(m, "endog_names", ""))), ("No. Observations:", str(res.nobs)),
            ("Groups:", groups), ("Method:", res.method), ("Log-Likelihood:", f"{res.llf:.4f}"),
            ("AIC:", f"{res.aic:.4f}"), ("BIC:", f"{res.bic:.4f}"),
            ("Converged:", "Yes" if res.converged else "No"), ("Formula:", str(getattr(m, "formula", "") or ""))]
    fe = pd.DataFrame({"Coef.": res.fe_params, "Std.Err.": res.bse_fe, "z": res.fe_params / res.bse_fe})
    vc = res.varcorr().set_index("group")
    return ("Mixed Linear Model", info, [("Fixed effects", fe), ("Random effects (variances, sd / correlations)", vc)],
            "\n".join(fit_notes(res)))


def fit_notes(res: MixedLMResults) -> list[str]:
    """The notes under a fit's tables, one a line: the residual structure's estimates (VarIdent sd ratios,
    AR(1) Phi), a singular fit, a fit that did not converge."""
    notes = []
    for key, val in res.residual_structure.items():
        if key == "sd_ratio":
            notes.append("Residual sd ratio (VarIdent): " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
        elif key == "phi":
            notes.append(f"Residual AR(1) correlation Phi: {val:.4f}")
    if res.singular:
        notes.append("The fit is singular (boundary estimate); see result.optim.")
    if not res.converged:
        notes.append(f"Not converged: {res.optim.message}.")
    return notes
