"""lme4's formula syntax: ``mixedjax.lmer("y ~ x + (1 + x | g) + (1 | h)", data)``.

Random-effects terms are parsed here (a small parser of top-level ``(expr | group)``
bars); the fixed part goes to formulaic.  A model whose grouping factors are all
nested in one of them (one factor, ``(1 | a/b)``, ``(x || g)``) takes the per-group
path of :class:`mixedjax.MixedLM` (the outer factor is the group, the terms on it
form the correlated block and variance components, nested factors are variance
components); any other model (crossed factors) takes the sparse blocked-Cholesky
path (:class:`CrossedLM`, :mod:`mixedjax.crossed_likelihood`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from . import formula as fml
from . import sources
from .backends import CrossedBackend, CrossedModelData, profiled_jit
from .crossed_data import CrossedData, CrossedStructure, array_spec, crossed_data, mivque_start, theta_scales
from .export_cache import writes_after
from .model import LinearMixedModel, MixedLM, TermInfo
from .residuals import bind


@dataclass
class BarTerm:
    """One parsed random-effects term ``(expr | group)`` (before expansion of ``/`` and ``||``)."""

    text: str
    expr: str
    group: str
    double: bool


@dataclass
class RETerm:
    """One random-effects term after expansion: a grouping factor and its model-matrix columns.

    ``codes (nobs,)`` level index of each row, ``levels`` the level labels,
    ``z (nobs, q)`` the term's columns, ``names`` their lme4 names, ``label`` the
    name of the term in ``varcorr()`` (the factor, with ``.1``, ``.2`` for repeats).
    """

    factor: str
    codes: np.ndarray
    levels: list
    z: np.ndarray
    names: list[str]
    source: str
    label: str = ""

    @property
    def q(self) -> int:
        return self.z.shape[1]

    @property
    def n_levels(self) -> int:
        return len(self.levels)


def split_formula(formula: str) -> tuple[str, str, list[BarTerm]]:
    """``(response, fixed right-hand side, bar terms)`` of an lme4 formula.

    Examples
    --------
    >>> y, fixed, bars = split_formula("y ~ x + (1 + x | g) + (1 | a/b)")
    >>> y, fixed, [(b.expr, b.group, b.double) for b in bars]
    ('y', 'x', [('1 + x', 'g', False), ('1', 'a/b', False)])
    """
    if "~" not in formula:
        raise ValueError(f"formula {formula!r} has no '~': write it as 'response ~ terms + (expr | group)'")
    lhs, rhs = formula.split("~", 1)
    depth, start, pieces, bars = 0, None, [], []
    last = 0
    for i, ch in enumerate(rhs):
        if ch == "(":
            if depth == 0:
                start = i
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ')' in formula {formula!r} at {rhs[: i + 1].strip()!r}")
            if depth == 0:
                inner = rhs[start + 1 : i]
                if _top_level_bar(inner):
                    pieces.append(rhs[last:start])
                    last = i + 1
                    bars.append(_parse_bar(inner, rhs[start : i + 1].strip()))
    if depth:
        raise ValueError(f"unbalanced '(' in formula {formula!r}: {rhs[start:].strip()!r} is not closed")
    pieces.append(rhs[last:])
    fixed = " ".join(pieces)
    # drop the '+' left around removed terms
    fixed = re.sub(r"\+\s*(\+\s*)+", "+ ", fixed)
    fixed = re.sub(r"^\s*\+|\+\s*$", "", fixed.strip()).strip()
    if "|" in fixed:
        raise ValueError(f"formula {formula!r}: a '|' outside parentheses; write random effects as (expr | group)")
    return lhs.strip(), fixed or "1", bars


def _top_level_bar(inner: str) -> bool:
    depth = 0
    for ch in inner:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "|" and depth == 0:
            return True
    return False


def _parse_bar(inner: str, text: str) -> BarTerm:
    double = "||" in inner
    parts = inner.split("||") if double else inner.split("|")
    if len(parts) != 2 or "|" in parts[0] or "|" in parts[1]:
        raise ValueError(f"random-effects term {text!r}: expected exactly one '|' or '||' as (expr | group)")
    expr, group = parts[0].strip(), parts[1].strip()
    if not expr:
        raise ValueError(f"random-effects term {text!r}: nothing before the bar (write (1 | g) for an intercept)")
    if not group:
        raise ValueError(f"random-effects term {text!r}: no grouping factor after the bar")
    if not re.fullmatch(r"[A-Za-z_.][\w.]*(\s*[:/]\s*[A-Za-z_.][\w.]*)*", group):
        raise ValueError(f"random-effects term {text!r}: grouping factor {group!r} must be a column, "
                         "an interaction a:b or a nesting a/b")
    return BarTerm(text, expr, group, double)


def _factor(data: pd.DataFrame, cols: list[str], text: str) -> tuple[str, np.ndarray, list]:
    """lme4's grouping factor for ``a:b`` (levels ``"a_level:b_level"``, only those present)."""
    for c in cols:
        if c not in data.columns:
            raise ValueError(f"random-effects term {text!r}: grouping column {c!r} is not in the data; "
                             f"available: {list(data.columns)}")
        if data[c].isna().any():
            raise ValueError(f"random-effects term {text!r}: grouping column {c!r} has missing values")
    name = ":".join(cols)
    if len(cols) == 1:
        s = data[cols[0]].reset_index(drop=True)
        if isinstance(s.dtype, pd.CategoricalDtype):
            s = s.cat.remove_unused_categories()
            return name, s.cat.codes.to_numpy().astype(np.int64), list(s.cat.categories)
        codes, uniq = pd.factorize(s, sort=True)
        return name, codes.astype(np.int64), list(uniq)
    key = data[cols[0]].astype(str).str.cat([data[c].astype(str) for c in cols[1:]], sep=":")
    codes, uniq = pd.factorize(key.reset_index(drop=True), sort=True)
    return name, codes.astype(np.int64), list(uniq)


def expand_terms(bars: list[BarTerm], data: pd.DataFrame) -> list[RETerm]:
    """Expand ``a/b`` to ``a`` and ``b:a`` (lme4's naming) and ``(x || g)`` to one term per column."""
    terms: list[RETerm] = []
    for bar in bars:
        if "/" in bar.group:
            parts = [p.strip() for p in bar.group.split("/")]
            groups = [list(reversed(parts[: k + 1])) for k in range(len(parts))]
        else:
            groups = [[p.strip() for p in bar.group.split(":")]]
        try:
            zdf = fml.design(bar.expr, data)
        except Exception as e:  # formulaic's parser errors
            raise ValueError(f"random-effects term {bar.text!r}: cannot build {bar.expr!r}: {e}") from e
        if zdf.shape[1] == 0:
            raise ValueError(f"random-effects term {bar.text!r} has no columns")
        z = zdf.to_numpy(dtype=float)
        names = ["(Intercept)" if c == "Intercept" else c for c in zdf.columns]
        if not np.all(np.isfinite(z)):
            raise ValueError(f"random-effects term {bar.text!r}: its columns have missing or infinite values")
        for cols in groups:
            name, codes, levels = _factor(data, cols, bar.text)
            blocks = [[j] for j in range(z.shape[1])] if bar.double else [list(range(z.shape[1]))]
            for js in blocks:
                terms.append(RETerm(name, codes, levels, z[:, js], [names[j] for j in js], bar.text))
    # lme4 orders terms by decreasing number of levels (stable), and labels repeats g, g.1, g.2
    terms.sort(key=lambda t: -t.n_levels)
    seen: dict[str, int] = {}
    for t in terms:
        k = seen.get(t.factor, 0)
        t.label = t.factor if k == 0 else f"{t.factor}.{k}"
        seen[t.factor] = k + 1
    return terms


def _nested_in(inner: RETerm, outer: RETerm) -> bool:
    """Every level of ``inner`` occurs within a single level of ``outer``."""
    if inner.factor == outer.factor:
        return True
    outer_of = np.empty(inner.n_levels, dtype=outer.codes.dtype)
    outer_of[inner.codes] = outer.codes  # one outer level per inner level (the last written) ...
    return bool(np.all(outer_of[inner.codes] == outer.codes))  # ... that every row agrees with


def per_group_plan(terms: list[RETerm]) -> tuple[RETerm, RETerm | None, list[RETerm]] | None:
    """``(outer, correlated term on it or None, variance-component terms)`` if the per-group path fits.

    The outer factor is one every other factor is nested in; on it at most one
    term with several columns (the correlated block); every other term a single
    column (one variance component each).  ``None``: use the crossed path.
    """
    for outer in sorted(terms, key=lambda t: t.n_levels):
        if not all(_nested_in(t, outer) for t in terms):
            continue
        on_outer = [t for t in terms if t.factor == outer.factor]
        multi = [t for t in on_outer if t.q > 1]
        others = [t for t in terms if t not in multi]
        if len(multi) > 1 or any(t.q > 1 for t in others):
            return None
        corr = multi[0] if multi else None
        if corr is None:  # the first scalar term on the outer factor becomes the random intercept-like block
            corr = on_outer[0] if on_outer else None
            others = [t for t in terms if t is not corr]
        return outer, corr, others
    return None


def _vc_design(term: RETerm, outer: RETerm) -> fml.VCDesign:
    """A nested (or same-factor) scalar term as a variance component of the outer groups."""
    n = len(term.codes)
    ngroups = outer.n_levels
    if term.factor == outer.factor:
        return fml.VCDesign(term.label, term.z.copy(), [[term.names[0]] for _ in range(ngroups)])
    # column of each row within its outer group: rank of its inner level among those of the group
    pairs = pd.DataFrame({"g": outer.codes, "f": term.codes}).drop_duplicates().sort_values(["g", "f"])
    pairs["col"] = pairs.groupby("g").cumcount()
    col = pd.DataFrame({"g": outer.codes, "f": term.codes}).merge(pairs, on=["g", "f"], how="left")["col"]
    col = col.to_numpy()
    k = int(col.max()) + 1
    values = np.zeros((n, k))
    values[np.arange(n), col] = term.z[:, 0]
    names: list[list[str]] = [[] for _ in range(ngroups)]
    for g, f in zip(pairs["g"], pairs["f"], strict=True):
        names[g].append(str(term.levels[f]))
    return fml.VCDesign(term.label, values, names)


def lmer_term_rows(model: Any, data: pd.DataFrame, which: Any = None) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """The random-effects terms of an lmer-built model on new data: per term of ``model.term_info``,
    ``(z_k (n, q_k), level label of each row (n,))``.

    The columns are rebuilt from ``model.bars`` with the formula specs of the fit's data
    (so factor codings match the fit), the labels as :func:`_factor` writes them (``"a:A"``
    for the factor ``cask:batch``).  ``which``: indices of the terms to build (default
    all); the others are ``None``.  :meth:`CrossedLM.term_rows` and, for lmer-built
    per-group models, :meth:`mixedjax.MixedLM.term_rows` use it.

    Examples
    --------
    >>> import mixedjax, pandas as pd
    >>> r = mixedjax.lmer("strength ~ 1 + (1 | batch/cask)", mixedjax.datasets.load("pastes"))
    >>> [(z.ravel().tolist(), list(lab)) for z, lab in r.model.term_rows(pd.DataFrame({"batch": ["A"], "cask": ["b"]}))]
    [([1.0], ['A']), ([1.0], ['b:A'])]
    """
    if not isinstance(data, pd.DataFrame):
        raise ValueError(f"the random-effects design needs new data as a DataFrame, got {type(data).__name__}")
    bars = getattr(model, "bars", None)
    stored = dict((model.designs or {}).get("bars", {}))  # models without rows keep each bar's design spec
    if bars is None or model.lmer_terms is None or (model.data is None and not stored):
        raise NotImplementedError("the random-effects terms of a model built without mixedjax.lmer(formula, data) "
                                  "cannot be rebuilt for new data")
    wanted = set(range(len(model.term_info))) if which is None else {int(k) for k in which}
    by_label = {t.label: t for t in model.lmer_terms}
    specs: dict[str, pd.DataFrame] = stored
    out: list[tuple[np.ndarray, np.ndarray] | None] = []
    for k, info in enumerate(model.term_info):
        if k not in wanted:
            out.append(None)
            continue
        term = by_label[info.label]
        bar = next(b for b in bars if b.text == term.source)
        cols = [c.strip() for c in term.factor.split(":")]
        missing = [c for c in cols if c not in data.columns]
        if missing:
            raise ValueError(f"random-effects term {bar.text!r}: grouping column(s) {missing} are not in the new "
                             f"data; available: {list(data.columns)}")
        if bar.text not in specs:
            fml.required_columns("~" + bar.expr, data, f"random-effects term {bar.text!r}")
            specs[bar.text] = fml.design(bar.expr, model.data)
        zdf = fml.design_like(specs[bar.text], data)
        names = ["(Intercept)" if c == "Intercept" else c for c in zdf.columns]
        z = zdf.to_numpy(dtype=float)[:, [names.index(nm) for nm in term.names]]
        if len(cols) == 1:
            labels = np.array([str(v) for v in data[cols[0]].to_numpy()], dtype=object)
        else:
            key = data[cols[0]].astype(str).str.cat([data[c].astype(str) for c in cols[1:]], sep=":")
            labels = key.to_numpy(dtype=object)
        out.append((z, labels))
    return out


def lmer(
    formula: str,
    data: pd.DataFrame,
    reml: bool = True,
    weights: Any = None,
    residual: Any = None,
    missing: str = "raise",
    *,
    batch_size: int | None = None,
    distributed: bool = False,
    **fit_kwargs: Any,
) -> Any:
    """Fit a linear mixed model written in lme4's formula syntax; returns the fitted results.

    Parameters
    ----------
    formula : str
        ``response ~ fixed + (expr | group) + ...``.  Random-effects terms:
        ``(1 + x | g)`` correlated intercept and slope, ``(1 + x || g)`` uncorrelated
        (one term per column), ``(0 + x | g)`` slope only, ``(1 | a/b)`` nested
        (``(1 | a) + (1 | a:b)``, named ``b:a`` as lme4 does), ``(1 | a:b)`` the
        interaction factor, and any number of terms.  Crossed factors are fitted
        with lme4's penalised least squares (sparse blocked Cholesky,
        :mod:`mixedjax.crossed`).
    data : pandas.DataFrame, Parquet path or Dask DataFrame
        A Parquet file or directory (or a list of them) is read in row batches with
        pyarrow, a Dask DataFrame reduced by Dask, keeping only per-group cross-products
        (as :func:`mixedjax.mixedlm`): for random-effects terms on one grouping factor
        (``(1 + x | g)``, ``(x || g)``, ``(1 | g) + (0 + x | g)``), without ``residual``;
        ``weights`` is then a column name.  Crossed or nested factors need a pandas
        DataFrame (``NotImplementedError`` says so).
    reml : bool
        REML (default) or ML.
    weights : str or array_like, optional
        Prior weights, as lme4: row i has residual variance ``scale / w_i``.
    residual : VarIdent, AR1 or list, optional
        Structured residuals (models with one grouping factor, or nested ones).
    missing : {"raise", "drop"}
    batch_size : int, optional
        Rows per Parquet batch (default 524,288).
    distributed : bool
        ``data`` are this process's rows of a model spread over processes started with
        ``jax.distributed`` (see :func:`mixedjax.mixedlm`).
    **fit_kwargs
        Passed to the fit (``maxiter``, ``gtol``, ``em_iter``, ``start_params``).

    Returns
    -------
    LmerResults
        A :class:`mixedjax.MixedLMResults` whose ``varcorr()`` lists every term
        (lme4's ``VarCorr`` layout, one row per parameter), ``random_effects`` is
        ``{grouping factor: DataFrame(levels x columns)}`` (lme4's ``ranef``),
        ``cov_terms`` is ``{term label: covariance DataFrame}`` and ``summary()``
        has one block per term.  ``cov_re`` and ``vcomp`` keep statsmodels'
        meaning on the per-group path (the outer factor's correlated block, and
        every other term's variance, in ``model.structure.vc_names`` order); on the
        crossed path ``cov_re`` is the covariance of the first term (the factor
        with most levels) and ``vcomp`` the variances of the diagonal of every other
        term, in ``varcorr()`` order.

    Examples
    --------
    >>> import mixedjax
    >>> d = mixedjax.datasets.load("penicillin")
    >>> r = mixedjax.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", d)
    >>> round(r.llf, 4)
    -165.4303
    >>> list(r.varcorr().group)
    ['plate', 'sample', 'Residual']
    """
    if distributed or sources.is_source(data):
        return lmer_from_source(formula, data, reml=reml, weights=weights, residual=residual, missing=missing,
                                batch_size=batch_size, distributed=distributed, **fit_kwargs)
    if not isinstance(data, pd.DataFrame):
        raise ValueError(f"data must be a pandas DataFrame, got {type(data).__name__}")
    yname, fixed, bars = split_formula(formula)
    if not bars:
        raise ValueError(f"formula {formula!r} has no random-effects term (expr | group)")
    if yname not in data.columns:
        raise ValueError(f"response column {yname!r} is not in the data; available: {list(data.columns)}")
    used = [yname] + fml.required_columns("~" + fixed, data, "formula")
    for b in bars:
        used += fml.required_columns("~" + b.expr, data, f"random-effects term {b.text!r}") if b.expr not in (
            "1", "0", "-1") else []
        used += [c.strip() for c in re.split(r"[:/]", b.group) if c.strip() in data.columns]
    frame = data
    if weights is not None and not isinstance(weights, str):
        wv = np.asarray(weights, dtype=float).reshape(-1)
        if len(wv) != len(data):
            raise ValueError(f"weights has length {len(wv)}; the data have {len(data)} rows")
        frame = data.assign(__weights__=wv)
        weights = "__weights__"
    if weights is not None:
        if weights not in frame.columns:
            raise ValueError(f"weights column {weights!r} is not in the data")
        used.append(weights)
    for r in residual if isinstance(residual, list | tuple) else [residual]:
        col = getattr(r, "by", getattr(r, "time", None))
        if isinstance(col, str):
            used.append(col)
    frame, _ = fml.check_finite(frame, [c for c in dict.fromkeys(used) if c in frame.columns], missing)
    frame = frame.reset_index(drop=True)
    x = fml.design(fixed, frame)
    if x.shape[1] == 0:
        raise ValueError(f"formula {formula!r} has no fixed effects; mixedjax needs at least one")
    terms = expand_terms(bars, frame)
    y = frame[yname].to_numpy(dtype=float)
    w = None if weights is None else frame[weights].to_numpy(dtype=float)

    plan = per_group_plan(terms)
    if plan is None:
        if residual is not None:
            raise NotImplementedError("structured residuals (VarIdent, AR1) with crossed random effects are not "
                                      "implemented: they need one grouping factor or nested ones")
        with writes_after():  # the program compiled ahead is written once the fit is done
            model = CrossedLM(y, x.to_numpy(), terms, weights=w, exog_names=list(x.columns), endog_name=yname)
            model.formula, model.data, model.designs = formula, frame, {"fe": x}
            model.bars = bars
            model.refit_formula = functools.partial(_refit_formula, data=frame, weights=w)
            return model.fit(reml=reml, **fit_kwargs)

    outer, corr, vc_terms = plan
    groups = pd.Series(pd.Categorical.from_codes(outer.codes, categories=[str(v) for v in outer.levels]))
    z_re = corr.z if corr is not None else np.zeros((len(frame), 0))
    re_names = list(corr.names) if corr is not None else []
    vcs = [_vc_design(t, outer) for t in vc_terms]
    model = MixedLM(y, x.to_numpy(), groups, exog_re=z_re, weights=w, missing="raise",
                    residual=bind(residual, frame, len(frame)), _vc_designs=vcs,
                    _names={"endog_names": yname, "exog_names": list(x.columns), "exog_re_names": re_names,
                            "formula": formula})
    model.data, model.designs = frame, {"fe": x}
    model.group_name = outer.factor
    model.lmer_terms = terms
    model.bars = bars
    model.term_rows_builder = lmer_term_rows
    model.api = "lme4"
    model.refit_formula = functools.partial(_refit_formula, data=frame, weights=w, residual=residual)
    info = []
    if corr is not None:
        info.append(TermInfo(corr.label, corr.factor, tuple(corr.names), tuple(str(v) for v in outer.levels),
                             corr.source))
    for t, v in zip(vc_terms, vcs, strict=True):
        if t.factor == outer.factor:
            levels = tuple(str(lv) for lv in outer.levels)
        else:
            levels = tuple(nm for names in v.names for nm in names)
        info.append(TermInfo(t.label, t.factor, tuple(t.names), levels, t.source))
    model.term_info = info
    return model.fit(reml=reml, **fit_kwargs)


def lmer_from_source(formula: str, data: Any, reml: bool = True, weights: str | None = None, residual: Any = None,
                     missing: str = "raise", batch_size: int | None = None, distributed: bool = False,
                     **fit_kwargs: Any) -> Any:
    """:func:`lmer` on data not held in memory (a Parquet path, a Dask DataFrame, or with ``distributed`` this
    process's rows): terms on one grouping factor, per-group cross-products only (:mod:`mixedjax.sources`)."""
    if residual is not None:
        raise NotImplementedError("structured residuals (VarIdent, AR1) need the rows in memory (their "
                                  "cross-products change with the residual parameters): fit a pandas DataFrame")
    if weights is not None and not isinstance(weights, str):
        raise ValueError("with data out of memory, weights must be a column name")
    yname, fixed, bars = split_formula(formula)
    if not bars:
        raise ValueError(f"formula {formula!r} has no random-effects term (expr | group)")
    factors = sorted({b.group.replace(" ", "") for b in bars})
    if len(factors) > 1 or re.search(r"[:/]", factors[0]):
        raise NotImplementedError(f"with data out of memory, lmer takes random-effects terms on one grouping factor "
                                  f"((1 + x | g), (x || g), (1 | g) + (0 + x | g)); the grouping factors {factors} "
                                  "are crossed or nested, and those models need the data in memory (a pandas "
                                  "DataFrame)")
    group = factors[0]
    src = sources.prepare(data, yname, fixed, [b.expr for b in bars], group, weights=weights, missing=missing,
                          batch_size=batch_size, distributed=distributed)
    if src.fixed_design.shape[1] == 0:
        raise ValueError(f"formula {formula!r} has no fixed effects; mixedjax needs at least one")
    # lme4's terms: one per bar, or one per column for (x || g); all on one factor, so lme4's order is the bars'
    terms: list[tuple[int, list[int], list[str], BarTerm]] = []
    for k, (bar, zdf) in enumerate(zip(bars, src.random_designs, strict=True)):
        if zdf.shape[1] == 0:
            raise ValueError(f"random-effects term {bar.text!r} has no columns")
        names = ["(Intercept)" if c == "Intercept" else c for c in zdf.columns]
        blocks = [[j] for j in range(len(names))] if bar.double else [list(range(len(names)))]
        terms += [(k, js, [names[j] for j in js], bar) for js in blocks]
    labels = [group if i == 0 else f"{group}.{i}" for i in range(len(terms))]
    multi = [i for i, t in enumerate(terms) if len(t[1]) > 1]
    if len(multi) > 1:
        raise NotImplementedError("two correlated random-effects terms on one factor take lme4's crossed path, "
                                  "which needs the data in memory (a pandas DataFrame)")
    first = multi[0] if multi else 0
    rest = [i for i in range(len(terms)) if i != first]
    z_columns = [(terms[first][0], j) for j in terms[first][1]] + [(terms[i][0], terms[i][1][0]) for i in rest]
    acc = src.accumulate(z_columns)
    model = MixedLM.from_sums(acc, endog_name=yname, exog_names=list(src.fixed_design.columns),
                              exog_re_names=list(terms[first][2]), k_re=len(terms[first][1]),
                              vc_names=tuple(labels[i] for i in rest), group_name=group, formula=formula)
    level_names = [str(v) for v in acc.labels]
    model.designs = {"fe": src.fixed_design, "bars": {b.text: z for b, z in zip(bars, src.random_designs,
                                                                               strict=True)}}
    model.lmer_terms = [RETerm(group, np.zeros(0, dtype=np.int64), list(acc.labels), np.zeros((0, len(t[1]))),
                               list(t[2]), t[3].text, lab) for t, lab in zip(terms, labels, strict=True)]
    model.bars = bars
    model.term_rows_builder = lmer_term_rows
    model.api = "lme4"
    model.refit_formula = functools.partial(_refit_source, data=data, weights=weights, missing=missing,
                                            batch_size=batch_size, distributed=distributed)
    model.term_info = [TermInfo(labels[i], group, tuple(terms[i][2]), tuple(level_names), terms[i][3].text)
                       for i in [first, *rest]]
    model.source = src.description
    return model.fit(reml=reml, **fit_kwargs)


def _refit_source(formula: str, reml: bool, data: Any, weights: str | None, missing: str, batch_size: int | None,
                  distributed: bool) -> Any:
    """Fit another lme4 formula to the same data out of memory (lmerTest's ``ranova`` reduced models)."""
    return lmer(formula, data, reml=reml, weights=weights, missing=missing, batch_size=batch_size,
                distributed=distributed)


def _refit_formula(formula: str, reml: bool, data: pd.DataFrame, weights: np.ndarray | None = None,
                   residual: Any = None) -> Any:
    """Fit another lme4 formula to a model's data and weights (lmerTest's ``ranova`` reduced models)."""
    return lmer(formula, data, reml=reml, weights=weights, residual=residual)


class CrossedLM(LinearMixedModel):
    """A linear mixed model with crossed random-effects terms (built by :func:`lmer`), on the crossed backend.

    Parameters
    ----------
    endog : (nobs,) array
    exog : (nobs, p) array
    terms : list of :class:`RETerm`
        Ordered here by number of levels, largest first (lme4's order).
    weights : (nobs,) array, optional
        Prior weights (row i has residual variance ``scale / w_i``).
    """

    api = "lme4"

    def __init__(self, endog: np.ndarray, exog: np.ndarray, terms: list, weights: np.ndarray | None = None,
                 exog_names: list[str] | None = None, endog_name: str = "y") -> None:
        self.endog = np.asarray(endog, float)
        self.exog = np.asarray(exog, float)
        self.nobs, self.k_fe = self.exog.shape
        self.exog_names = exog_names or [f"x{i + 1}" for i in range(self.k_fe)]
        self.endog_names = endog_name
        aliased = fml.aliased_columns(self.exog, self.exog_names)
        if aliased:
            raise ValueError(f"the fixed-effects design is rank deficient: column(s) {aliased} are "
                             "linear combinations of the others (aliased); drop them or recode")
        if weights is not None and np.any(np.asarray(weights) <= 0):
            raise ValueError("weights must be positive")
        self.weights = None if weights is None else np.asarray(weights, float)
        self.lmer_terms = sorted(terms, key=lambda t: -t.n_levels)
        sw = np.ones(self.nobs) if self.weights is None else np.sqrt(self.weights)
        rows = (self.exog, sw, tuple(t.codes.astype(np.int32) for t in self.lmer_terms),
                tuple(t.z for t in self.lmer_terms))

        def compile_ahead(spec: CrossedData, st: CrossedStructure) -> None:
            # the fit's program compiles while the data are formed
            CrossedBackend(st).compile_ahead(CrossedModelData(spec, None, *jax.tree.map(array_spec, rows)))

        cd, st = crossed_data(self.endog, self.exog, self.lmer_terms, self.weights, on_shapes=compile_ahead)
        self.structure = st
        self.backend = CrossedBackend(st)
        self.backend_data = CrossedModelData(cd, None, *jax.device_put(rows))  # no program per shape (jax 0.10)
        self.term_info = [TermInfo(t.label, t.factor, tuple(t.names), tuple(str(v) for v in t.levels), t.source)
                          for t in self.lmer_terms]
        self.k_re = self.lmer_terms[0].q
        self.n_groups = {t.label: t.n_levels for t in self.lmer_terms}
        self.residual = None
        self.formula = None
        self.data = None
        self.designs = None
        self.reml = True

    def default_start(self) -> np.ndarray | None:
        """MIVQUE(0) variances (:func:`mixedjax.crossed_data.mivque_start`): of every term when all are scalar,
        else of every column of every term taken as its own scalar term, on the diagonal of each ``T_k`` (no
        correlation to start from); lme4's θ = 1 when MIVQUE fails (``None``)."""
        terms = self.lmer_terms
        if all(t.q == 1 for t in terms):
            return mivque_start(self.endog, self.exog, terms, self.weights)
        columns = [RETerm(t.factor, t.codes, t.levels, t.z[:, [j]], [t.names[j]], t.source, t.label)
                   for t in terms for j in range(t.q)]
        sd = mivque_start(self.endog, self.exog, columns, self.weights)
        if sd is None:
            return None
        out, k = [], 0
        for t in terms:
            out.append(np.diag(sd[k : k + t.q])[np.tril_indices(t.q)])
            k += t.q
        return np.concatenate(out)

    def default_options(self) -> dict:
        return {"maxiter": 1000, "ftol": 1e-3, "xtol": 1e-4, "scales": theta_scales(self.lmer_terms, self.weights)}

    def fit_options(self, maxiter: int | None, gtol: float | None, em_iter: int | None) -> dict:
        """``maxiter`` caps the deviance evaluations; ``gtol`` and ``em_iter`` belong to the per-group fit."""
        return {} if maxiter is None else {"maxiter": int(maxiter)}

    def deviance(self, theta: Any, reml: bool | None = None) -> float:
        """Profiled deviance (−2ℓ, or the REML criterion) at θ."""
        return float(profiled_jit(self.backend, jnp.asarray(theta, float), self.backend_data,
                                  np.asarray(self._reml(reml))).deviance)

    def term_rows(self, data: pd.DataFrame, which: Any = None) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Each random-effects term on new data, aligned with :attr:`term_info`: ``(z_k (n, q_k), level label of
        each row (n,))`` (:func:`lmer_term_rows`); ``which``: the terms to build (default all, others ``None``).

        Examples
        --------
        >>> import mixedjax, pandas as pd
        >>> r = mixedjax.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", mixedjax.datasets.load("penicillin"))
        >>> [list(lab) for _, lab in r.model.term_rows(pd.DataFrame({"plate": ["a", "new"], "sample": ["F", "A"]}))]
        [['a', 'new'], ['F', 'A']]
        """
        return lmer_term_rows(self, data, which)
