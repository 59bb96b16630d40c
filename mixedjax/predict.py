"""Prediction from a fitted model, and lme4's tidy conditional modes (``ranef(condVar = TRUE)``), for every model.

Population-level predictions are ``x β̂`` with standard errors ``sqrt(x Cov(β̂) xᵀ)``.
Conditional predictions add, for every random-effects term ``k``, ``z_k b̂_k[level]``:
the term's columns on the new rows (``model.term_rows``, rebuilt with the formula specs
stored at fit time, so codings match the fit) times the conditional mode of the row's
level.  A level the fit has not seen has no conditional mode and gets a random effect of
0 (lme4's ``allow.new.levels = TRUE``), so a row whose levels are all new falls back to
the population level.  ``re_form`` (lme4's ``re.form``) picks the terms.  With structured
residuals (VarIdent, AR(1)) the conditional prediction is nlme's ``predict(level = 1)``,
``x β̂ + z b̂``: the residual correlation is not used to krige the new rows.

Everything reads the fitted-model interface (``res.conditional``, ``res.model.term_info``,
``model.term_rows``, the backend's ``fixed_part`` / ``row_effects``), never a backend's
internals, so per-group, nested and crossed models share one code path.
"""

from __future__ import annotations

import re
import warnings
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np
import pandas as pd
from formulaic.errors import DataMismatchWarning

from . import formula as fml
from .crossprod import ROWS_NOT_KEPT
from .distributions import stats
from .fit import with_rows

if TYPE_CHECKING:
    from .results import MixedLMResults


# ------------------------------------------------------------------------------------------ lme4's order
def lme4_order(model: Any) -> list[int]:
    """Indices of ``model.term_info`` in lme4's term order: by number of levels, most first (stable).

    lmer-built models keep the order of ``model.lmer_terms`` (lme4's own sort of the
    formula's terms); ``mixedlm`` models sort their terms (the correlated block, then
    the variance components) the same way.

    Examples
    --------
    >>> import mixedjax
    >>> p = mixedjax.datasets.load("pastes")
    >>> r = mixedjax.mixedlm("strength ~ 1", p, groups="batch", vc_formula={"cask": "0 + C(cask)"}).fit()
    >>> [r.model.term_info[k].label for k in lme4_order(r.model)]
    ['cask:batch', 'batch']
    """
    infos = model.term_info
    lmer_terms = getattr(model, "lmer_terms", None)
    if lmer_terms:
        pos = {t.label: i for i, t in enumerate(lmer_terms)}
        if all(info.label in pos for info in infos):
            return sorted(range(len(infos)), key=lambda k: pos[infos[k].label])
    return sorted(range(len(infos)), key=lambda k: -infos[k].n_levels)


def _level_order(model: Any, k: int) -> np.ndarray:
    """Permutation of term ``k``'s levels into lme4's level order.

    lmer-built models: the order of the grouping factor's levels in ``model.lmer_terms``
    (a per-group model stores a nested factor's levels group by group).  A ``mixedlm``
    factor variance component ``cask:batch``: R's ``cask:batch`` factor, the component's
    levels varying slowest, then the groups.  Otherwise the fit's order.
    """
    info = model.term_info[k]
    n = info.n_levels
    lmer_terms = getattr(model, "lmer_terms", None)
    if lmer_terms:
        term = next((t for t in lmer_terms if t.label == info.label), None)
        if term is not None:
            rank = {str(v): i for i, v in enumerate(term.levels)}
            if all(lev in rank for lev in info.levels):
                return np.argsort([rank[lev] for lev in info.levels], kind="stable")
        return np.arange(n)
    designs = model.designs or {}
    first = 1 if getattr(model, "k_re", 0) else 0
    vcs = getattr(model, "vc_designs", [])
    if k >= first and k - first < len(vcs) and info.factor != getattr(model, "group_name", None):
        v = vcs[k - first]
        spec = designs.get("vc", {}).get(v.name)
        if spec is not None:
            col = {c: i for i, c in enumerate(spec.columns)}
            keys = [(col.get(nm, len(col)), g) for g, names in enumerate(v.names) for nm in names]
            if len(keys) == n:
                return np.array(sorted(range(n), key=lambda i: keys[i]))
    return np.arange(n)


def condvar_frame(res: MixedLMResults) -> pd.DataFrame:
    """lme4's ``as.data.frame(ranef(fit, condVar = TRUE))``: columns ``grpvar, term, grp, condval, condsd``.

    One row per level and column of every random-effects term, in lme4's order: grouping
    factors in the order of their first term (terms sorted by number of levels, most
    first), within a factor the columns of its terms in term order, within a column the
    levels in lme4's order.  ``grpvar`` is the grouping factor (``Subject``, ``cask:batch``:
    terms on the same factor share it, as ``ranef`` merges them), ``condval`` the
    conditional mode, ``condsd`` the square root of the diagonal of its conditional
    covariance (natural scale, ``res.conditional``).

    Examples
    --------
    >>> import mixedjax
    >>> r = mixedjax.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", mixedjax.datasets.load("penicillin"))
    >>> cv = condvar_frame(r)
    >>> list(cv.columns), len(cv), cv.grpvar.unique().tolist()
    (['grpvar', 'term', 'grp', 'condval', 'condsd'], 30, ['plate', 'sample'])
    """
    m = res.model
    modes, covs = res.conditional
    infos = m.term_info
    order = lme4_order(m)
    frames = []
    for factor in dict.fromkeys(infos[k].factor for k in order):
        for k in (k for k in order if infos[k].factor == factor):
            info = infos[k]
            n = info.n_levels
            perm = _level_order(m, k)
            b = np.asarray(modes[k])[:n][perm]
            sd = np.sqrt(np.clip(np.diagonal(np.asarray(covs[k])[:n], axis1=1, axis2=2), 0.0, None))[perm]
            levels = np.asarray(info.levels, dtype=object)[perm]
            for j, name in enumerate(info.names):
                frames.append(pd.DataFrame({"grpvar": factor, "term": name, "grp": levels, "condval": b[:, j],
                                            "condsd": sd[:, j]}))
    if not frames:
        return pd.DataFrame(columns=["grpvar", "term", "grp", "condval", "condsd"])
    return pd.concat(frames, ignore_index=True)


def lme4_terms(model: Any) -> list[dict]:
    """The random-effects terms of a per-group model in lme4's order, as dicts (kept for older callers).

    Each: ``group`` (lme4's grouping name), ``names`` (lme4's column names), ``kind``
    (``"re"`` the correlated block, ``"re_diag"`` one column of a diagonal block, ``"vc"``
    a variance component), ``index`` (its position among the variance components, or the
    column of a diagonal block), ``n_levels``, and ``factor`` for variance components.
    New code reads ``model.term_info`` (with :func:`lme4_order`).
    """
    st = model.structure
    gname = getattr(model, "group_name", "Group")
    terms = []
    if st.q_re:
        names = ["(Intercept)" if n in ("Group", "Intercept") else n for n in model.exog_re_names]
        if st.re_diagonal:
            for i, n in enumerate(names):
                terms.append({"group": gname, "names": [n], "kind": "re_diag", "index": i,
                              "n_levels": model.n_groups})
        else:
            terms.append({"group": gname, "names": names, "kind": "re", "index": 0, "n_levels": model.n_groups})
    first = 1 if st.q_re else 0
    for k in range(len(model.vc_designs)):
        info = model.term_info[first + k]
        factor = info.factor != gname
        terms.append({"group": info.factor, "names": list(info.names), "kind": "vc", "index": k,
                      "n_levels": info.n_levels, "factor": factor})
    order = sorted(range(len(terms)), key=lambda i: -terms[i]["n_levels"])
    return [terms[i] for i in order]


# ---------------------------------------------------------------------------------------------- re.form
def _bars(rhs: str) -> list[tuple[str, str]]:
    """``(expr, group)`` of every top-level ``(expr | group)`` (or ``||``) in a right-hand side."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(rhs):
        if ch == "(":
            start = i if depth == 0 else start
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                inner = rhs[start + 1 : i]
                if "|" in inner:
                    expr, group = re.split(r"\|\|?", inner, maxsplit=1)
                    out.append((expr.strip(), group.strip()))
    return out


def _factors_of(group: str) -> list[str]:
    """lme4's grouping factors of a bar: ``a/b`` -> ``a``, ``b:a``; ``a:b`` -> ``a:b``."""
    if "/" in group:
        parts = [p.strip() for p in group.split("/")]
        return [":".join(reversed(parts[: k + 1])) for k in range(len(parts))]
    return [":".join(p.strip() for p in group.split(":"))]


def _column_names(expr: str, data: pd.DataFrame | None) -> list[str]:
    """lme4's column names of a bar's left-hand side (``1 + Days`` -> ``(Intercept)``, ``Days``)."""
    if data is not None:
        try:
            cols = list(fml.design(expr, data).columns)
            return ["(Intercept)" if c == "Intercept" else c for c in cols]
        except Exception:  # noqa: BLE001  (formulaic's parser errors: fall back to the plain reading below)
            pass
    tokens = [t.strip() for t in expr.replace("-1", "+0").split("+") if t.strip()]
    names = [] if "0" in tokens else ["(Intercept)"]
    return names + [t for t in tokens if t not in ("0", "1")]


def _is_na(x: Any) -> bool:
    if isinstance(x, str):
        return False
    try:
        return bool(np.ndim(x) == 0 and pd.isna(x))
    except (TypeError, ValueError):
        return False


def term_masks(res: MixedLMResults, re_form: Any = None) -> list[np.ndarray]:
    """Which columns of each term (``(q_k,)`` booleans per ``model.term_info`` entry) ``re_form`` includes.

    ``re_form`` as lme4's ``re.form``: ``None`` every term; ``"~0"``, ``"0"``, ``"NA"``, ``NaN``
    or ``[]`` none (population level); a formula of bars, ``"~(1 | plate)"``, the columns it
    names on the grouping factors it names (``(1 | batch/cask)`` means ``batch`` and
    ``cask:batch``; ``(1 | Subject)`` on a model with ``(1 + Days | Subject)`` keeps the
    intercepts only, as lme4); or a list of term labels / grouping factors (every column).

    Examples
    --------
    >>> import mixedjax
    >>> r = mixedjax.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", mixedjax.datasets.load("penicillin"))
    >>> [m.tolist() for m in term_masks(r, "~(1 | plate)")], [m.tolist() for m in term_masks(r, "~0")]
    ([[True], [False]], [[False], [False]])
    """
    m = res.model
    infos = m.term_info
    if re_form is None:
        return [np.ones(info.q, bool) for info in infos]
    none = [np.zeros(info.q, bool) for info in infos]
    if _is_na(re_form):
        return none
    labels = list(getattr(res, "term_labels", [info.label for info in infos]))
    if isinstance(re_form, list | tuple | set):
        out = []
        known = set(labels) | {info.factor for info in infos} | {info.label for info in infos}
        unknown = [str(x) for x in re_form if str(x) not in known]
        if unknown:
            raise ValueError(f"re_form names terms {unknown} that the model does not have; its terms: {labels}")
        wanted = {str(x) for x in re_form}
        for info, lab in zip(infos, labels, strict=True):
            on = lab in wanted or info.label in wanted or info.factor in wanted
            out.append(np.full(info.q, on))
        return out
    if not isinstance(re_form, str):
        raise ValueError(f"re_form must be None, a formula string such as '~(1 | g)', '~0' / NaN, or a list of "
                         f"term labels; got {type(re_form).__name__}")
    rhs = re_form.strip()
    rhs = rhs[1:].strip() if rhs.startswith("~") else rhs
    if rhs in ("", "0", "-1", "NA", "+0"):
        return none
    bars = _bars(rhs)
    if not bars:
        raise ValueError(f"re_form {re_form!r} has no random-effects term (expr | group); write '~0' for none")
    factors = {info.factor for info in infos}
    wanted: set[tuple[str, str]] = set()
    for expr, group in bars:
        names = _column_names(expr, m.data)
        for f in _factors_of(group):
            if f not in factors:
                raise ValueError(f"re_form {re_form!r}: grouping factor {f!r} is not in the model; its grouping "
                                 f"factors: {sorted(factors)}")
            have = {n for info in infos if info.factor == f for n in info.names}
            missing = [n for n in names if n not in have]
            if missing:
                raise ValueError(f"re_form {re_form!r}: random effects {missing} on {f!r} are not in the model "
                                 f"(it has {sorted(have)})")
            wanted |= {(f, n) for n in names}
    return [np.array([(info.factor, n) in wanted for n in info.names]) for info in infos]


# -------------------------------------------------------------------------------------------- predict
def _fixed_design(m: Any, data: pd.DataFrame) -> np.ndarray:
    """The fixed-effects design of new data; a factor level the fit did not see is an error (as lme4)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataMismatchWarning)
        try:
            return fml.design_like(m.designs["fe"], data).to_numpy()
        except DataMismatchWarning as e:
            raise ValueError(f"the new data have a level of a fixed-effects factor that the fit did not see: "
                             f"{e}") from None


def random_part(res: MixedLMResults, data: pd.DataFrame, masks: list[np.ndarray] | None = None) -> np.ndarray:
    """``Σ_k z_k b̂_k[level]`` per row of new data (the columns in ``masks``, default all); 0 for unseen levels.

    Examples
    --------
    >>> import mixedjax, pandas as pd
    >>> r = mixedjax.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", mixedjax.datasets.load("penicillin"))
    >>> new = pd.DataFrame({"plate": ["a", "new"], "sample": ["new", "new"]})
    >>> zb = random_part(r, new)
    >>> bool(abs(zb[0] - r.random_effects["plate"].loc["a"].iloc[0]) < 1e-12), float(zb[1])
    (True, 0.0)
    """
    m = res.model
    modes, _ = res.conditional
    masks = term_masks(res, None) if masks is None else masks
    which = [k for k, mk in enumerate(masks) if mk.any()]
    out = np.zeros(len(data))
    if not which:
        return out
    with warnings.catch_warnings():  # a new level of a factor inside a term: its column is 0 (no effect)
        warnings.simplefilter("ignore", DataMismatchWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # pandas' notice on that same path in formulaic
        rows = m.term_rows(data, which=which)
    for k in which:
        z, labels = rows[k]
        info = m.term_info[k]
        lookup = {lab: i for i, lab in enumerate(info.levels)}
        idx = np.array([lookup.get(lab, -1) for lab in labels], dtype=np.int64)
        known = idx >= 0
        b = np.asarray(modes[k])[: info.n_levels] * masks[k][None, :]
        out[known] += np.sum(np.asarray(z, float)[known] * b[idx[known]], axis=1)
    return out


def predict(res: MixedLMResults, exog: Any = None, conditional: bool = False, se: bool = False,
            alpha: float = 0.05, re_form: Any = None) -> pd.Series | pd.DataFrame:
    """Predictions for the model's rows or new data: population level ``x β̂`` or conditional ``x β̂ + Σ_k z_k b̂_k``.

    Parameters
    ----------
    res : MixedLMResults
    exog : pandas.DataFrame or array_like, optional
        New data with the formula's columns (and, for conditional predictions, those
        of the random-effects terms and their grouping factors), or a fixed-effects
        design matrix (population level only).  Default: the rows of the fit.
    conditional : bool
        Add the random effects of each row's levels (lme4's default ``re.form = NULL``);
        a level the fit did not see gets 0 (lme4's ``allow.new.levels = TRUE``).
    se : bool
        Population level only: a DataFrame ``mean, mean_se, mean_ci_lower,
        mean_ci_upper`` with ``mean_se = sqrt(x Cov(β̂) xᵀ)``.
    alpha : float
        Level of the confidence intervals with ``se``.
    re_form : optional
        lme4's ``re.form``: which random-effects terms to add (:func:`term_masks`);
        given, it implies ``conditional`` (``"~0"`` / NaN: population level).

    Examples
    --------
    >>> import mixedjax, pandas as pd
    >>> r = mixedjax.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", mixedjax.datasets.load("penicillin"))
    >>> new = pd.DataFrame({"plate": ["a", "a", "new"], "sample": ["A", "new", "new"]})
    >>> mu = float(r.fe_params.iloc[0])
    >>> p = predict(r, new, conditional=True)
    >>> b_a, b_A = r.random_effects["plate"].loc["a"].iloc[0], r.random_effects["sample"].loc["A"].iloc[0]
    >>> [bool(abs(v - w) < 1e-9) for v, w in zip(p, [mu + b_a + b_A, mu + b_a, mu])]
    [True, True, True]
    >>> bool(abs(predict(r, new, re_form="~(1 | sample)").iloc[0] - (mu + b_A)) < 1e-9)
    True
    """
    m = res.model
    beta = res.fe_params.to_numpy()
    masks = term_masks(res, re_form) if re_form is not None else term_masks(res, None if conditional else "~0")
    conditional = any(mk.any() for mk in masks)
    index = None
    zb = None
    if exog is None:
        if m.exog is None:
            raise NotImplementedError(ROWS_NOT_KEPT.format(what="predict() on the fitted rows (without new data)"))
        x = np.asarray(m.exog, float)
        data = getattr(m, "data", None)
        index = data.index if data is not None and len(data) == m.nobs else None
        if conditional:
            fm = res.fitted
            modes, _ = res.conditional
            masked = [jnp.asarray(np.asarray(b) * mk[None, :]) for b, mk in zip(modes, masks, strict=True)]
            zb = np.asarray(fm.backend.row_effects(masked, with_rows(fm)))
    elif isinstance(exog, pd.DataFrame) and getattr(m, "designs", None):
        index = exog.index
        x = _fixed_design(m, exog)
        zb = random_part(res, exog, masks) if conditional else None
    else:
        if conditional:
            raise ValueError("conditional predictions need new data as a DataFrame (with the grouping columns) "
                             "and a model built from a formula")
        x = np.atleast_2d(np.asarray(exog, dtype=float))
        if x.shape[1] != len(beta):
            raise ValueError(f"exog has {x.shape[1]} columns; the model has {len(beta)} fixed effects "
                             f"{list(res.fe_params.index)}")
    if x.shape[1] != len(beta):
        raise ValueError(f"the new data give {x.shape[1]} fixed-effects columns; the model has {len(beta)}")
    mean = x @ beta
    if zb is not None:
        mean = mean + zb
    if not se:
        return pd.Series(mean, index=index, name="predicted")
    if conditional:
        raise ValueError("standard errors are available for population-level predictions only "
                         "(conditional=False, or re_form='~0')")
    sd = np.sqrt(np.einsum("ij,jk,ik->i", x, np.asarray(res.cov_fe), x))
    z = stats.norm.ppf(1 - alpha / 2)
    return pd.DataFrame({"mean": mean, "mean_se": sd, "mean_ci_lower": mean - z * sd,
                         "mean_ci_upper": mean + z * sd}, index=index)
