"""Per-term F tests and random-effects likelihood-ratio tests: lmerTest's ``anova`` and ``ranova``.

:func:`anova_terms` reproduces lmerTest's (3.1-3) ``anova(fit, type = 1/2/3, ddf = ...)``: one F test
per fixed-effects term, on lmerTest's contrast matrices,

* type 1 (sequential): rows of the unit upper-triangular Doolittle factor of ``X'X``
  (``get_contrasts_type1``);
* type 2: the term adjusted for every term that does not contain it (``get_contrasts_type2_unfolded``:
  marginal identity rows for terms no other term contains, Doolittle rows with the containing terms
  moved last otherwise);
* type 3: lmerTest's coding-independent construction (``get_contrasts_type3`` /
  ``extract_contrasts_type3``): the overparametrised cell design of every term projected on a
  treatment-coded design, each term's columns orthogonalised against the terms that contain it, then
  mapped onto the coding the model was fitted with.  For a covariate that interacts with a factor the
  main-effect hypothesis is the equally weighted average slope, not the slope at the reference level.

Each contrast matrix ``L`` is tested jointly with the fit's Wald F test
(``res.wald_test(L, use_f=True, ddf=ddf)``: lmerTest's ``contestMD``, Satterthwaite or Kenward–Roger
denominator df), and the table has lmerTest's columns: ``Mean Sq = F σ̂²``, ``Sum Sq = NumDF × Mean Sq``.

:func:`ranova` reproduces lmerTest's ``ranova(fit)``: each random-effects term is reduced by lmerTest's
rules (``(1 + x | g)`` → ``(1 | g)``, ``(1 | g)`` → dropped), the reduced model refitted with the same
criterion (REML or ML) and compared with the full model by a likelihood-ratio test.  A reduced model is
the fitted model with some entries of θ held at 0 (:func:`mixedjax.fit.fit_constrained`), so ranova works
on every backend and residual structure; with every term dropped it is the linear model (or ``gls``).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd

from .distributions import stats
from .fit import fit_constrained

__all__ = ["anova_terms", "ranova", "term_contrasts"]

_COLUMNS = ["Sum Sq", "Mean Sq", "NumDF", "DenDF", "F value", "Pr(>F)"]
_RANOVA_COLUMNS = ["npar", "logLik", "AIC", "LRT", "Df", "Pr(>Chisq)"]


# ------------------------------------------------------------------------------------------ helpers
def _zapsmall(x: np.ndarray, digits: int = 7) -> np.ndarray:
    """R's ``zapsmall``: round to ``digits`` significant digits relative to the largest entry."""
    x = np.asarray(x, dtype=float)
    if x.size == 0:
        return x
    mx = float(np.nanmax(np.abs(x)))
    d = max(0, digits - int(np.ceil(np.log10(mx)))) if mx > 0 else digits
    return np.round(x, d) + 0.0  # + 0.0: no negative zeros


def _doolittle(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Unit lower-triangular ``L`` of lmerTest's ``doolittle(x)`` (``x = L U``, no pivoting).

    As lmerTest: a column of ``L`` is zero when its pivot ``|U[i, i]| < eps`` and entries of ``L``
    under ``eps`` in absolute value are set to zero.
    """
    n = x.shape[0]
    lo = np.eye(n)
    up = np.zeros((n, n))
    for i in range(n):
        up[i, :] = x[i, :] - lo[i, :i] @ up[:i, :]
        if i + 1 < n:
            col = x[i + 1 :, i] - lo[i + 1 :, :i] @ up[:i, i]
            lo[i + 1 :, i] = 0.0 if abs(up[i, i]) < eps else col / up[i, i]
    lo[np.abs(lo) < eps] = 0.0
    return lo


def _full_rank_columns(x: np.ndarray, tol: float = 1e-7) -> list[int]:
    """Columns kept by lmerTest's ``ensure_full_rank`` (R's ``qr``: dependent columns go last, dropped)."""
    keep: list[int] = []
    q = np.zeros((x.shape[0], 0))
    for j in range(x.shape[1]):
        v = x[:, j]
        nv = np.linalg.norm(v)
        if nv == 0:
            continue
        r = v - q @ (q.T @ v)
        r = r - q @ (q.T @ r)
        nr = np.linalg.norm(r)
        if nr > tol * nv:
            keep.append(j)
            q = np.column_stack([q, r / nr])
    return keep


class _TermInfo:
    """Fixed-effects term structure of a fit: names, factors, column slices (formulaic's ModelSpec)."""

    def __init__(self, res: Any) -> None:
        designs = getattr(res.model, "designs", None) or {}
        x = designs.get("fe")
        spec = None
        if x is not None:
            spec = getattr(x, "model_spec", None)
            if spec is None:
                spec = getattr(x, "attrs", {}).get("model_spec")
        if x is None or spec is None:
            raise ValueError("per-term tests need a model fitted from a formula (mixedjax.lmer or "
                             "mixedjax.mixedlm with a formula): this model was built from arrays and has no "
                             "fixed-effects term structure")
        self.res = res
        self.spec = spec
        self.x = np.asarray(x, dtype=float)
        self.colnames = list(x.columns)
        fe_names = list(res.fe_params.index)
        if self.x.shape[1] != len(fe_names):
            raise ValueError(f"the fixed-effects design has {self.x.shape[1]} columns but the fit has "
                             f"{len(fe_names)} fixed effects")
        self.fe_names = fe_names
        self.intercept = False
        self.terms: list[str] = []  # term labels, intercept excluded (R's term.labels)
        self.factors: list[tuple[str, ...]] = []  # factor (variable) expressions of each term
        self.cols: list[np.ndarray] = []  # design columns of each term
        self.intercept_cols = np.zeros(0, dtype=int)
        self.lookup: dict[str, bool] = {}  # factor is a plain column (formulaic's LOOKUP evaluation)
        slices = spec.term_slices
        for term in spec.terms:
            sl = slices[term]
            idx = np.arange(self.x.shape[1])[sl]
            facs = tuple(str(f.expr) for f in term.factors if getattr(f.eval_method, "value", "") != "literal")
            for f in term.factors:
                self.lookup[str(f.expr)] = getattr(f.eval_method, "value", "") == "lookup"
            if not facs:
                if len(idx):
                    self.intercept = True
                    self.intercept_cols = idx
                continue
            self.terms.append(str(term))
            self.factors.append(facs)
            self.cols.append(idx)
        self.kinds = {}
        for expr, state in spec.encoder_state.items():
            kind = state[0]
            self.kinds[expr] = str(getattr(kind, "value", kind))

    # R's term.labels / containment ---------------------------------------------------------------
    def is_numeric(self, expr: str) -> bool:
        return self.kinds.get(expr, "numerical") != "categorical"

    def containment(self) -> list[list[int]]:
        """lmerTest's ``containment``: for each term, the terms that contain it.

        ``F2`` contains ``F1`` when the variables of ``F1`` are a proper subset of those of ``F2`` and both
        have the same numeric variables.
        """
        out = []
        for f1 in self.factors:
            s1, n1 = set(f1), {v for v in f1 if self.is_numeric(v)}
            out.append([j for j, f2 in enumerate(self.factors)
                        if s1 < set(f2) and n1 == {v for v in f2 if self.is_numeric(v)}])
        return out

    def col_terms(self) -> np.ndarray:
        """Term index of each design column (-1 for the intercept)."""
        ct = np.full(self.x.shape[1], -2)
        ct[self.intercept_cols] = -1
        for t, idx in enumerate(self.cols):
            ct[idx] = t
        return ct

    # factor values for the type III construction ----------------------------------------------------
    def factor_values(self) -> dict[str, tuple[str, np.ndarray]]:
        """``{expr: ("categorical", level codes) or ("numerical", (n, k) values)}`` on the model data."""
        data = getattr(self.res.model, "data", None)
        if data is None:
            raise ValueError("type III contrasts need the data the model was fitted on (res.model.data)")
        out: dict[str, tuple[str, np.ndarray]] = {}
        n = self.x.shape[0]
        for facs in self.factors:
            for expr in facs:
                if expr in out:
                    continue
                quoted = f"`{expr}`" if self.lookup.get(expr) and not expr.isidentifier() else expr
                # the fit's own encoder and transform states: same levels, same stateful transforms
                mm = self.spec.update(formula="0 + " + quoted, structure=None).get_model_matrix(
                    data, na_action="ignore")
                v = np.asarray(mm, dtype=float)
                if v.shape[0] != n:
                    raise ValueError(f"cannot rebuild the term variable {expr!r}: {v.shape[0]} rows for a "
                                     f"design of {n}")
                if not self.is_numeric(expr):
                    onehot = np.all((v == 0) | (v == 1)) and np.all(v.sum(axis=1) == 1)
                    codes = v.argmax(axis=1) if onehot else np.unique(v, axis=0, return_inverse=True)[1]
                    out[expr] = ("categorical", (np.asarray(codes).reshape(-1), v.shape[1] if onehot
                                                 else int(np.max(codes)) + 1))
                else:
                    out[expr] = ("numerical", v)
        return out


def _term_block(facs: tuple[str, ...], full: set[str], values: dict, n: int) -> tuple[np.ndarray, list[tuple]]:
    """Columns of one term: numeric factors' columns times indicator codings of the categorical ones.

    Categorical factors in ``full`` get every level, the others treatment contrasts (first level
    dropped).  Each column is keyed by its per-factor level / sub-column index.
    """
    cols = [np.ones(n)]
    keys: list[tuple] = [()]
    for expr in facs:
        kind, val = values[expr]
        if kind == "categorical":
            codes, nlev = val
            levels = range(nlev) if expr in full else range(1, nlev)
            parts = [(codes == lev).astype(float) for lev in levels]
            labels = list(levels)
        else:
            parts = [val[:, k] for k in range(val.shape[1])]
            labels = list(range(val.shape[1]))
        # R's column order: the first factor varies fastest
        cols = [c * p for p, _ in zip(parts, labels, strict=True) for c in cols]
        keys = [k + (lab,) for lab in labels for k in keys]
    return np.column_stack(cols), keys


# ------------------------------------------------------------------------------------------ contrasts
def _contrasts_type1(info: _TermInfo) -> dict[str, np.ndarray]:
    p = info.x.shape[1]
    if p == 0 or (p == 1 and info.intercept):
        return {}
    lmat = np.eye(1) if p == 1 else _doolittle(info.x.T @ info.x).T
    return {t: lmat[idx, :] for t, idx in zip(info.terms, info.cols, strict=True)}


def _contrasts_type2(info: _TermInfo) -> dict[str, np.ndarray]:
    p = info.x.shape[1]
    if p <= 1 or len(info.terms) <= 1:
        return _contrasts_type1(info)
    contained = info.containment()
    ct = info.col_terms()
    out: dict[str, np.ndarray] = {}
    for t, idx in enumerate(info.cols):
        if not contained[t]:
            out[info.terms[t]] = np.eye(p)[idx, :]
            continue
        cols_term = np.concatenate([info.cols[u] for u in [t, *contained[t]]])
        rest = np.setdiff1d(np.arange(p), cols_term)  # R keeps the original order of the others
        order = np.concatenate([rest, cols_term])
        xn = info.x[:, order]
        lc = _doolittle(xn.T @ xn).T
        rows = ct[order] == t
        back = np.empty(p, dtype=int)
        back[order] = np.arange(p)
        out[info.terms[t]] = lc[rows][:, back]
    return out


def _contrasts_type3(info: _TermInfo) -> dict[str, np.ndarray]:
    p = info.x.shape[1]
    if p <= 1 or len(info.terms) <= 1:
        return _contrasts_type1(info)
    values = info.factor_values()
    present = {frozenset(f) for f in info.factors}
    if info.intercept:
        present.add(frozenset())
    # treatment-coded design (R's model.matrix with contr.treatment) and the cell ("rdX") design
    n = info.x.shape[0]
    xt_blocks, xt_keys, xt_term = [], [], []
    rd_blocks, rd_keys = [], []
    if info.intercept:
        xt_blocks.append(np.ones((n, 1)))
        xt_keys.append((-1, ()))
        xt_term.append(-1)
        rd_blocks.append(np.ones((n, 1)))
        rd_keys.append((-1, ()))
    for t, facs in enumerate(info.factors):
        full = {f for f in facs if not info.is_numeric(f) and frozenset(set(facs) - {f}) not in present}
        b, k = _term_block(facs, full, values, n)
        xt_blocks.append(b)
        xt_keys += [(t, kk) for kk in k]
        xt_term += [t] * b.shape[1]
        cat = {f for f in facs if not info.is_numeric(f)}
        b, k = _term_block(facs, cat, values, n)
        rd_blocks.append(b)
        rd_keys += [(t, kk) for kk in k]
    xt = np.column_stack(xt_blocks)
    keep = _full_rank_columns(xt)
    xt, xt_keys = xt[:, keep], [xt_keys[j] for j in keep]
    xt_term_a = np.asarray(xt_term)[keep]
    rdx = np.column_stack(rd_blocks)
    pinv = np.linalg.pinv(xt)
    lmat = _zapsmall((pinv @ rdx).T)  # rows: cells (rdX columns), columns: X (treatment) columns
    contained = info.containment()
    order = [len(f) for f in info.factors]
    for t in sorted(range(len(info.terms)), key=lambda u: -order[u]):  # stable: R's order(decreasing)
        if not contained[t]:
            continue
        cols_t = np.flatnonzero(xt_term_a == t)
        cols_c = np.flatnonzero(np.isin(xt_term_a, contained[t]))
        if not len(cols_t):
            continue
        a, y = lmat[:, cols_c], lmat[:, cols_t]
        coef = np.linalg.lstsq(a, y, rcond=None)[0]
        lmat[:, cols_t] = _zapsmall(y - a @ coef)
    rd_index = {k: i for i, k in enumerate(rd_keys)}
    lmat = lmat[[rd_index[k] for k in xt_keys], :]  # square: rows as X's columns
    # map the treatment parametrisation onto the fitted one (lmerTest: ginv(X) %*% Xorig)
    cmap = _zapsmall(pinv @ info.x)
    out: dict[str, np.ndarray] = {}
    for t, name in enumerate(info.terms):
        lt = lmat[:, xt_term_a == t].T
        lt = lt[np.abs(lt).sum(axis=1) > 1e-8]
        out[name] = lt @ cmap
    return out


def _type_code(type: int | str) -> int:
    codes = {"1": 1, "2": 2, "3": 3, "I": 1, "II": 2, "III": 3}
    key = str(type).strip().upper()
    if key not in codes:
        raise ValueError(f"type must be 1, 2 or 3 (or 'I', 'II', 'III'), got {type!r}")
    return codes[key]


def term_contrasts(res: Any, type: int | str = 3) -> dict[str, pd.DataFrame]:
    """lmerTest's contrast matrices of the per-term F tests (``attr(anova(fit), "hypotheses")``).

    Parameters
    ----------
    res : MixedLMResults
        A fit from a formula (:func:`mixedjax.lmer` or :func:`mixedjax.mixedlm`).
    type : {3, 2, 1}
        Type III (default), II or I hypotheses.

    Returns
    -------
    dict of str to pandas.DataFrame
        One ``(rows, fixed effects)`` matrix per term, keyed by the term's label.

    Examples
    --------
    >>> import mixedjax
    >>> from mixedjax.term_tests import term_contrasts
    >>> d = mixedjax.datasets.load("sleepstudy")
    >>> r = mixedjax.lmer("Reaction ~ Days + (Days | Subject)", d)
    >>> term_contrasts(r)["Days"].to_numpy().tolist()
    [[0.0, 1.0]]
    """
    info = _TermInfo(res)
    code = _type_code(type)
    fn = {1: _contrasts_type1, 2: _contrasts_type2, 3: _contrasts_type3}[code]
    return {k: pd.DataFrame(v, columns=info.fe_names) for k, v in fn(info).items()}


# ------------------------------------------------------------------------------------------ F tests
def _ddf_name(ddf: str) -> str:
    key = str(ddf).strip().lower().replace("_", "-").replace(" ", "-")
    if key in ("satterthwaite", "satt"):
        return "satterthwaite"
    if key in ("kenward-roger", "kenwardroger", "kr"):
        return "kenward-roger"
    raise ValueError(f"ddf must be 'satterthwaite' or 'kenward-roger', got {ddf!r}")


def _f_row(res: Any, lmat: np.ndarray, ddf: str) -> list[float]:
    if lmat.shape[0] == 0:
        return [np.nan] * 6
    rank = np.linalg.matrix_rank(lmat)
    if rank < lmat.shape[0]:  # a basis of the row space (lmerTest drops the null directions)
        lmat = np.linalg.svd(lmat)[2][:rank]
    t = res.wald_test(lmat, use_f=True, ddf=ddf)
    f = float(np.squeeze(t.statistic))
    ndf = float(np.squeeze(t.df_num))
    den = float(np.squeeze(t.df_denom))
    pv = float(np.squeeze(t.pvalue))
    ms = f * float(res.scale)
    return [ms * ndf, ms, ndf, den, f, pv]


def anova_terms(res: Any, ddf: str = "satterthwaite", type: int | str = 3) -> pd.DataFrame:
    """lmerTest's ``anova(fit, type = ..., ddf = ...)``: one F test per fixed-effects term.

    Parameters
    ----------
    res : MixedLMResults
        A fit from a formula (:func:`mixedjax.lmer` or :func:`mixedjax.mixedlm` with a formula); the
        term structure comes from ``res.model.designs["fe"]``.
    ddf : {"satterthwaite", "kenward-roger"}
        Denominator degrees of freedom (Kenward–Roger needs a REML fit, as in lmerTest).
    type : {3, 2, 1}
        Type III (default, lmerTest's coding-independent contrasts), II or I (sequential) hypotheses;
        ``"III"``, ``"II"`` and ``"I"`` are accepted too.

    Returns
    -------
    pandas.DataFrame
        Indexed by term label, with lmerTest's columns ``Sum Sq, Mean Sq, NumDF, DenDF, F value,
        Pr(>F)`` (``Mean Sq = F σ̂²``, ``Sum Sq = NumDF × Mean Sq``).  ``attrs["heading"]`` is lmerTest's
        title and ``attrs["hypotheses"]`` the contrast matrices (see :func:`term_contrasts`).  A model
        whose only fixed effect is the intercept gives an empty table, as lmerTest.

    Raises
    ------
    ValueError
        For models built from arrays (no formula, so no terms), or an unknown ``type`` / ``ddf``.

    Notes
    -----
    With Kenward–Roger, lmerTest reports pbkrtest's scaled F statistic; the statistic here is
    ``res.wald_test``'s (Wald F with the adjusted covariance), which is the same whenever pbkrtest's
    F scaling factor is 1 (every one-df test, and balanced designs).

    Examples
    --------
    >>> import mixedjax
    >>> from mixedjax.term_tests import anova_terms
    >>> d = mixedjax.datasets.load("sleepstudy")
    >>> r = mixedjax.lmer("Reaction ~ Days + (Days | Subject)", d)
    >>> t = anova_terms(r)
    >>> list(t.columns)
    ['Sum Sq', 'Mean Sq', 'NumDF', 'DenDF', 'F value', 'Pr(>F)']
    >>> round(float(t.loc["Days", "F value"]), 2), round(float(t.loc["Days", "DenDF"]), 1)
    (45.85, 17.0)
    """
    method = _ddf_name(ddf)
    code = _type_code(type)
    if method == "kenward-roger" and not res.reml:
        raise ValueError("Kenward-Roger's method is only available for REML model fits (as lmerTest)")
    info = _TermInfo(res)
    fn = {1: _contrasts_type1, 2: _contrasts_type2, 3: _contrasts_type3}[code]
    lmats = fn(info)
    rows = [_f_row(res, lmats[t], method) for t in lmats]
    table = pd.DataFrame(rows, index=pd.Index(list(lmats), dtype=object), columns=_COLUMNS)
    table[["NumDF"]] = table[["NumDF"]].astype(float)
    roman = {1: "I", 2: "II", 3: "III"}[code]
    how = "Satterthwaite's" if method == "satterthwaite" else "Kenward-Roger's"
    table.attrs["heading"] = f"Type {roman} Analysis of Variance Table with {how} method"
    table.attrs["hypotheses"] = {k: pd.DataFrame(v, columns=info.fe_names) for k, v in lmats.items()}
    return table


# ------------------------------------------------------------------------------------------ ranova
def _split_top(text: str, sep: str) -> list[str]:
    """Split ``text`` at the single-character ``sep`` outside parentheses."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def _deparse(text: str) -> str:
    """Approximately R's ``deparse`` spacing of a formula fragment: ``a + b | g``, ``a:b``, ``f(x, 2)``."""
    s = re.sub(r"\s+", "", text)
    s = re.sub(r"\|\|", " || ", s)
    s = re.sub(r"(?<![| ])\|(?![|])", " | ", s)
    s = re.sub(r"([+*~])", r" \1 ", s)
    s = re.sub(r"(?<=[\w).])-", " - ", s)
    s = re.sub(r",", ", ", s)
    return re.sub(r"\s+", " ", s).strip()


def _drop_scope(labels: list[str]) -> list[str]:
    """R's ``drop.scope``: terms not contained in (marginal to) any other term."""
    sets = [set(lab.split(":")) for lab in labels]
    return [lab for lab, s in zip(labels, sets, strict=True) if not any(s < o for o in sets)]


def _npar(res: Any) -> float:
    return float(res.df_modelwc)


def _term_lhs(names: tuple[str, ...]) -> tuple[bool, list[str], str]:
    """``(intercept?, covariate labels, lme4 left-hand side)`` of a term's columns."""
    icpt = "(Intercept)" in names
    labels = [n for n in names if n != "(Intercept)"]
    if not labels:
        return icpt, labels, "1"
    return icpt, labels, " + ".join(labels) if icpt else "0 + " + " + ".join(labels)


def ranova(res: Any) -> pd.DataFrame:
    """lmerTest's ``ranova(fit)``: likelihood-ratio tests of reduced random-effects terms, for every model.

    Each random-effects term is reduced as lmerTest does (``reduce.terms = TRUE``): a term with
    covariates, ``(1 + x | g)``, loses one droppable covariate at a time (R's ``drop.scope``: one that no
    other column of the term contains; row ``x in (1 + x | g)``), a term without, ``(1 | g)``, is removed
    (a term with a single covariate and no intercept, ``(0 + x | g)``, is removed too).  The reduced model
    is the same model with the entries of θ for the removed columns held at 0
    (:func:`mixedjax.fit.fit_constrained`), refitted by the criterion of the fit (REML stays REML) on the
    same data, fixed effects and residual structure, so it works for every backend (one grouping factor,
    nested, crossed, VarIdent/AR(1) residuals); with every term removed it is the linear model (or
    ``gls``).  ``LRT = 2 (logLik_full − logLik_reduced)`` on ``Df = npar_full − npar_reduced``.

    Returns
    -------
    pandas.DataFrame
        Rows ``<none>`` (the full model) and one per reduction (lmerTest's names: ``Days in (1 + Days |
        Subject)``, ``(1 | plate)``), columns ``npar, logLik, AIC, LRT, Df, Pr(>Chisq)``.

    Examples
    --------
    >>> import mixedjax
    >>> from mixedjax.term_tests import ranova
    >>> d = mixedjax.datasets.load("sleepstudy")
    >>> r = mixedjax.lmer("Reaction ~ Days + (Days | Subject)", d)
    >>> t = ranova(r)
    >>> list(t.index)
    ['<none>', 'Days in (Days | Subject)']
    >>> round(float(t["LRT"].iloc[1]), 2), int(t["Df"].iloc[1])
    (42.84, 2)
    """
    fm = res.fitted
    backend = fm.backend
    reml = bool(res.reml)
    rows = {"<none>": (_npar(res), float(res.llf))}
    offsets = np.cumsum([0] + [t.n_theta for t in backend.terms])
    n_full = backend.n_theta + backend.n_rho
    for k, (spec, info) in enumerate(zip(backend.terms, res.model.term_info, strict=True)):
        icpt, labels, lhs = _term_lhs(info.names)
        grp = info.factor
        form = _deparse(f"{lhs} | {grp}")
        r_idx, c_idx = spec.positions()
        if not labels or (not icpt and len(labels) == 1):
            drops = {f"({form})": list(range(spec.q))}
        else:
            drops = {f"{_deparse(lab)} in ({form})": [info.names.index(lab)] for lab in _drop_scope(labels)}
        for name, cols in drops.items():
            free = np.ones(n_full, bool)
            for e, (a, b) in enumerate(zip(r_idx, c_idx, strict=True)):
                if a in cols or b in cols:
                    free[offsets[k] + e] = False
            reduced = fit_constrained(fm, free, what=f"ranova refit without {name}")
            rows[name] = (_npar(res) - float(np.sum(~free)), float(reduced.llf))
    npar = np.array([v[0] for v in rows.values()])
    ll = np.array([v[1] for v in rows.values()])
    lrt = 2 * (ll[0] - ll)
    df = npar[0] - npar
    with np.errstate(invalid="ignore"):
        pv = np.where(df > 0, stats.chi2.sf(np.maximum(lrt, 0.0), np.where(df > 0, df, 1)), np.nan)
    lrt[0] = df[0] = pv[0] = np.nan
    table = pd.DataFrame({"npar": npar, "logLik": ll, "AIC": -2 * ll + 2 * npar, "LRT": lrt, "Df": df,
                          "Pr(>Chisq)": pv}, index=pd.Index(list(rows), dtype=object))
    table.attrs["heading"] = "ANOVA-like table for random-effects: Single term deletions"
    table.attrs["criterion"] = "REML" if reml else "ML"
    return table
