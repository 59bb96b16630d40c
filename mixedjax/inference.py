"""Post-estimation inference on a fitted model (mixed into :class:`mixedjax.MixedLMResults`).

Wald tests (``t_test``, ``wald_test``, ``f_test``), likelihood-ratio tests
(:func:`compare_lr_test`, :func:`anova`), small-sample denominator degrees of
freedom (Satterthwaite, Kenward–Roger; :mod:`mixedjax.ddf`), profile likelihood
(:mod:`mixedjax.profile`), the parametric bootstrap (:mod:`mixedjax.bootstrap`)
and prediction (:mod:`mixedjax.predict`) live here, as methods of
:class:`InferenceMixin`; ``results.py`` keeps the estimates themselves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .bootstrap import bootstrap, simulate
from .ddf import kenward_roger, satterthwaite
from .distributions import stats
from .fit import refit
from .predict import condvar_frame, predict
from .profile import profile_conf_int, profile_re
from .term_tests import anova_terms, ranova

if TYPE_CHECKING:
    from .results import MixedLMResults

_DDF = {None: None, "none": None, "normal": None, "satterthwaite": "satterthwaite", "kr": "kenward-roger",
        "kenward-roger": "kenward-roger", "kenward_roger": "kenward-roger", "kenwardroger": "kenward-roger"}


def _ddf_method(ddf: str | None) -> str | None:
    key = ddf.lower() if isinstance(ddf, str) else ddf
    if key not in _DDF:
        raise ValueError(f"ddf must be None, 'satterthwaite' or 'kenward-roger', got {ddf!r}")
    return _DDF[key]


# ---------------------------------------------------------------------------------------------- contrasts
class _Lin:
    """A linear form ``coef · params + const`` used to evaluate constraint strings."""

    def __init__(self, coef: np.ndarray, const: float = 0.0) -> None:
        self.coef, self.const = coef, const

    @staticmethod
    def lift(o: Any, k: int) -> _Lin:
        return o if isinstance(o, _Lin) else _Lin(np.zeros(k), float(o))

    def __add__(self, o):
        o = self.lift(o, len(self.coef))
        return _Lin(self.coef + o.coef, self.const + o.const)

    __radd__ = __add__

    def __neg__(self):
        return _Lin(-self.coef, -self.const)

    def __pos__(self):
        return self

    def __sub__(self, o):
        return self + (-self.lift(o, len(self.coef)))

    def __rsub__(self, o):
        return self.lift(o, len(self.coef)) - self

    def __mul__(self, o):
        if isinstance(o, _Lin):
            if np.any(o.coef) and np.any(self.coef):
                raise ValueError("a constraint must be linear in the parameters")
            if np.any(o.coef):
                return o * self.const
            o = o.const
        return _Lin(self.coef * float(o), self.const * float(o))

    __rmul__ = __mul__

    def __truediv__(self, o):
        if isinstance(o, _Lin):
            if np.any(o.coef):
                raise ValueError("a constraint must be linear in the parameters")
            o = o.const
        return self * (1.0 / float(o))


def parse_constraints(spec: str, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(R, q)`` with ``R @ params = q`` from a string such as ``"Time = 0, Intercept = 2 * Time"``.

    As statsmodels' ``t_test("...")``: constraints separated by commas; each side a
    linear combination of parameter names and numbers; a side without ``=`` means
    ``= 0``.  lme4's ``(Intercept)`` is accepted for ``Intercept``.

    Examples
    --------
    >>> r, q = parse_constraints("Time = Intercept, 2 * Time = 1", ["Intercept", "Time"])
    >>> r.tolist(), q.tolist()
    ([[-1.0, 1.0], [0.0, 2.0]], [0.0, 1.0])
    """
    k = len(names)
    env = {}
    text = spec
    if "Intercept" in names:
        text = text.replace("(Intercept)", "Intercept")
    # longest names first, so that "Time" does not match inside "Time:Evit"
    for i in sorted(range(k), key=lambda j: -len(names[j])):
        token = f"__p{i}__"
        if names[i] in text:
            text = text.replace(names[i], token)
        env[token] = _Lin(np.eye(k)[i])
    rows, rhs = [], []
    for part in text.split(","):
        if not part.strip():
            continue
        sides = part.split("=")
        if len(sides) > 2:
            raise ValueError(f"cannot parse constraint {part!r}: more than one '='")
        try:
            vals = [eval(s, {"__builtins__": {}}, env) for s in sides]  # noqa: S307 - names replaced by tokens
        except Exception as e:
            raise ValueError(f"cannot parse constraint {part.strip()!r} in {spec!r}: unknown name or syntax "
                             f"({e}); parameters are {names}") from e
        lin = _Lin.lift(vals[0], k) - (_Lin.lift(vals[1], k) if len(vals) == 2 else 0.0)
        if not np.any(lin.coef):
            raise ValueError(f"constraint {part.strip()!r} involves no parameter; parameters are {names}")
        rows.append(lin.coef)
        rhs.append(0.0 - lin.const)
    if not rows:
        raise ValueError(f"no constraint in {spec!r}")
    return np.array(rows), np.array(rhs)


class ContrastResults:
    """Result of a Wald test of ``R β = q`` (statsmodels' ``ContrastResults`` attributes).

    Attributes
    ----------
    effect : (k,) ``R β̂``;  sd : (k,) its standard errors;  tvalue / fvalue / statistic;
    pvalue; df_denom (array for t tests with small-sample df, a scalar for F tests, ``inf``
    for normal / chi-square tests); df_num; distribution (``"t"``, ``"norm"``, ``"F"``, ``"chi2"``).
    """

    def __init__(self, distribution: str, effect=None, sd=None, statistic=None, pvalue=None, df_denom=None,
                 df_num=None, q=None, names=None, ddf=None) -> None:
        self.distribution = distribution
        self.effect, self.sd, self.statistic, self.pvalue = effect, sd, statistic, pvalue
        self.df_denom, self.df_num, self.q, self.names, self.ddf = df_denom, df_num, q, names, ddf
        if distribution in ("t", "norm"):
            self.tvalue = statistic
        else:
            self.fvalue = statistic

    def conf_int(self, alpha: float = 0.05) -> np.ndarray:
        """``(k, 2)`` intervals for each row of a t / normal test."""
        if self.distribution not in ("t", "norm"):
            raise ValueError("confidence intervals are only available for t tests")
        crit = stats.norm.ppf(1 - alpha / 2) if self.distribution == "norm" else stats.t.ppf(1 - alpha / 2,
                                                                                            self.df_denom)
        return np.column_stack([self.effect - crit * self.sd, self.effect + crit * self.sd])

    def summary_frame(self, alpha: float = 0.05) -> pd.DataFrame:
        """One row per contrast: coef, std err, t (or z), P>|t|, df (when small-sample), interval."""
        if self.distribution not in ("t", "norm"):
            return pd.DataFrame({"statistic": [self.statistic], "df_num": [self.df_num],
                                 "df_denom": [self.df_denom], "pvalue": [self.pvalue]}, index=[self.distribution])
        ci = self.conf_int(alpha)
        stat = "t" if self.distribution == "t" else "z"
        out = pd.DataFrame({"coef": self.effect, "std err": self.sd, stat: self.statistic,
                            f"P>|{stat}|": self.pvalue}, index=self.names)
        if self.distribution == "t":
            out.insert(2, "df", self.df_denom)
        out[f"Conf. Int. Low ({alpha / 2:g})"] = ci[:, 0]
        out[f"Conf. Int. Upp. ({1 - alpha / 2:g})"] = ci[:, 1]
        return out

    def __repr__(self) -> str:
        if self.distribution in ("t", "norm"):
            return f"<{self.distribution} test>\n{self.summary_frame().to_string()}"
        return (f"<{self.distribution} test: statistic={float(self.statistic):.6g}, p-value={float(self.pvalue):.6g}, "
                f"df_num={self.df_num}, df_denom={self.df_denom}>")


# ------------------------------------------------------------------------------------------ LRT / anova
class AnovaTable(pd.DataFrame):
    """A DataFrame (lme4's ``anova`` table) that prints its ``note`` (e.g. models refitted by ML) above it."""

    _metadata = ["note"]

    @property
    def _constructor(self):
        return AnovaTable

    def __repr__(self) -> str:
        note = getattr(self, "note", "")
        return (note + "\n" if note else "") + super().__repr__()

    def _repr_html_(self) -> str:
        note = getattr(self, "note", "")
        return (f"<p>{note}</p>" if note else "") + (super()._repr_html_() or "")


def _refit_ml(res: MixedLMResults) -> MixedLMResults:
    """The ML fit of a REML result, started at its estimate; a refit that does not converge warns
    (:class:`mixedjax.RefitWarning`), one that fails raises."""
    fm = refit(res.fitted, reml=False, what="ML refit for the likelihood-ratio test")
    return type(res)(res.model, fm)


def _same_data(results: list) -> None:
    n = [r.nobs for r in results]
    if len(set(n)) > 1:
        raise ValueError(f"the models were fitted to different data: nobs = {n}. Likelihood-ratio tests need "
                         "every model fitted to the same rows (check missing-value handling)")
    if any(getattr(r.model, "endog", None) is None for r in results):  # models built from cross-products only
        ss = np.array([r.model.response_ss for r in results])
        if not np.allclose(ss, ss[0], rtol=1e-10, atol=0):
            raise ValueError("the models were fitted to different responses (same nobs, different sum of squares); "
                             "likelihood-ratio tests need the same data")
        return
    y0 = np.sort(np.asarray(results[0].model.endog))
    for r in results[1:]:
        if not np.allclose(np.sort(np.asarray(r.model.endog)), y0, rtol=1e-12, atol=0):
            raise ValueError("the models were fitted to different responses (same nobs, different endog); "
                             "likelihood-ratio tests need the same data")


def _same_fixed(results: list) -> bool:
    x0 = results[0].model.exog
    if any(getattr(r.model, "exog", None) is None for r in results):  # no rows: names and X'WX
        g0 = results[0].model.fixed_gram
        return all(list(r.model.exog_names) == list(results[0].model.exog_names) and
                   np.allclose(r.model.fixed_gram, g0, rtol=1e-10) for r in results[1:])
    for r in results[1:]:
        x = r.model.exog
        if x.shape != x0.shape or list(r.model.exog_names) != list(results[0].model.exog_names):
            return False
        if not np.allclose(x, x0):
            return False
    return True


def anova(*results: MixedLMResults, refit: bool = True, names: list[str] | None = None) -> AnovaTable:
    """Likelihood-ratio tests of a sequence of nested models (lme4's ``anova(m0, m1, ...)``).

    Models are sorted by their number of parameters (``df_modelwc``, lme4's ``npar``)
    and each is tested against the one before it: ``Chisq = 2 (logLik_i − logLik_{i−1})``
    on ``Df = npar_i − npar_{i−1}`` degrees of freedom.

    Parameters
    ----------
    *results : MixedLMResults
        Fitted models on the same data.
    refit : bool
        As lme4: REML fits are refitted by ML before the comparison (the note of
        the table says so).  ``refit=False`` compares REML fits as they are, which is
        only valid for identical fixed effects (nlme's ``anova.lme``); the BIC of a
        REML fit then uses ``log(n − p)``, as nlme does.
    names : list of str, optional
        Row labels (default ``model1``, ``model2``, ... in the order given).

    Returns
    -------
    AnovaTable
        A DataFrame with columns ``npar, AIC, BIC, logLik, deviance, Chisq, Df, Pr(>Chisq)``.

    Examples
    --------
    >>> import mixedjax
    >>> d = mixedjax.datasets.load("sleepstudy")
    >>> m0 = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject").fit(reml=False)
    >>> m1 = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", re_formula="~Days").fit(reml=False)
    >>> round(float(mixedjax.anova(m0, m1)["Chisq"].iloc[1]), 3)
    42.139
    """
    results = list(results)
    if len(results) < 2:
        raise ValueError("anova needs at least two fitted models")
    names = list(names) if names is not None else [f"model{i + 1}" for i in range(len(results))]
    if len(names) != len(results):
        raise ValueError(f"{len(names)} names for {len(results)} models")
    _same_data(results)
    note = ""
    any_reml = any(r.reml for r in results)
    reml_rows = False
    if any_reml and refit:
        results = [_refit_ml(r) if r.reml else r for r in results]
        note = "refitting model(s) with ML (instead of REML)"
    elif any_reml:
        if not all(r.reml for r in results):
            raise ValueError("refit=False needs all models fitted the same way (all REML or all ML)")
        if not _same_fixed(results):
            raise ValueError("REML fits with different fixed effects cannot be compared by their likelihoods "
                             "(the REML criterion depends on the fixed-effects design); use refit=True")
        reml_rows = True
        note = "REML fits compared as fitted (identical fixed effects; nlme's anova.lme)"
    npar = np.array([r.df_modelwc for r in results], dtype=int)
    order = np.argsort(npar, kind="stable")
    rows = []
    prev = None
    for i in order:
        r = results[i]
        ll = float(r.llf)
        n_bic = r.nobs - r.k_fe if reml_rows else r.nobs
        row = {"npar": int(npar[i]), "AIC": -2 * ll + 2 * npar[i], "BIC": -2 * ll + np.log(n_bic) * npar[i],
               "logLik": ll, "deviance": -2 * ll, "Chisq": np.nan, "Df": np.nan, "Pr(>Chisq)": np.nan}
        if prev is not None:
            chisq = 2.0 * (ll - prev[0])
            dfd = int(npar[i] - prev[1])
            row["Chisq"] = chisq
            row["Df"] = dfd
            row["Pr(>Chisq)"] = float(stats.chi2.sf(chisq, dfd)) if dfd > 0 else np.nan
        prev = (ll, npar[i])
        rows.append(row)
    out = AnovaTable(rows, index=[names[i] for i in order])
    out["Df"] = out["Df"].astype("Int64")
    out.note = note
    return out


def compare_lr_test(small: MixedLMResults, large: MixedLMResults, refit: bool = True) -> AnovaTable:
    """Likelihood-ratio test of a smaller model against a larger one (see :func:`anova`).

    Returns lme4's two-row table (``npar, AIC, BIC, logLik, deviance, Chisq, Df,
    Pr(>Chisq)``); REML fits are refitted by ML unless ``refit=False`` (then both
    must be REML fits with identical fixed effects, nlme's ``anova.lme``).

    Examples
    --------
    >>> import mixedjax
    >>> d = mixedjax.datasets.load("sleepstudy")
    >>> m0 = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject").fit()
    >>> m1 = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", re_formula="~Days").fit()
    >>> t = mixedjax.compare_lr_test(m0, m1)
    >>> t.note, int(t["Df"].iloc[1])
    ('refitting model(s) with ML (instead of REML)', 2)
    """
    return anova(small, large, refit=refit, names=["small", "large"])


# ------------------------------------------------------------------------------------------------ mixin
class InferenceMixin:
    """Inference methods of :class:`mixedjax.MixedLMResults`."""

    # ---------------------------------------------------------------------------------- Wald tests
    def _contrast_matrix(self, r_matrix: Any, q_matrix: Any = None) -> tuple[np.ndarray, np.ndarray]:
        names = list(self.fe_params.index)
        k = len(names)
        if isinstance(r_matrix, str):
            r, q = parse_constraints(r_matrix, names)
            if q_matrix is not None:
                raise ValueError("give q_matrix only with a contrast matrix, not with a string")
            return r, q
        if isinstance(r_matrix, tuple):
            r_matrix, q_matrix = r_matrix
        r = np.atleast_2d(np.asarray(r_matrix, dtype=float))
        npar = len(self.params)
        if r.shape[1] == npar and npar != k:
            if np.any(r[:, k:] != 0):
                raise ValueError("Wald tests here are on the fixed effects only: the variance columns of "
                                 "r_matrix must be 0")
            r = r[:, :k]
        if r.shape[1] != k:
            raise ValueError(f"r_matrix has {r.shape[1]} columns; expected {k} (the fixed effects {names})")
        q = np.zeros(r.shape[0]) if q_matrix is None else np.asarray(q_matrix, dtype=float).reshape(-1)
        if q.shape[0] != r.shape[0]:
            raise ValueError(f"q_matrix has {q.shape[0]} entries for {r.shape[0]} constraints")
        return r, q

    def t_test(self, r_matrix: Any, q_matrix: Any = None, ddf: str | None = None) -> ContrastResults:
        """Wald test of each row of ``R β = q`` separately (statsmodels' ``t_test``).

        Parameters
        ----------
        r_matrix : array_like, str or tuple
            ``(k, p)`` contrast matrix on the fixed effects (a matrix with a column
            per ``params`` entry is accepted with zeros in the variance columns), a
            string such as ``"Time = 0"`` or ``"Time = Intercept"``, or ``(R, q)``.
        ddf : {None, "satterthwaite", "kenward-roger"}
            Default: normal reference distribution (statsmodels MixedLM).  With
            ``"satterthwaite"`` or ``"kenward-roger"`` a t distribution with lmerTest's
            denominator df per contrast (Kenward–Roger also uses its adjusted
            covariance of β̂).  These need a REML fit, as lmerTest.

        Examples
        --------
        >>> import mixedjax
        >>> d = mixedjax.datasets.load("sleepstudy")
        >>> r = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", re_formula="~Days").fit()
        >>> t = r.t_test("Days = 10", ddf="satterthwaite")
        >>> round(float(t.df_denom[0]), 3)
        17.0
        """
        r, q = self._contrast_matrix(r_matrix, q_matrix)
        method = _ddf_method(ddf)
        beta = self.fe_params.to_numpy()
        effect = r @ beta
        if method == "kenward-roger":
            cov = kenward_roger(self).cov_adjusted
        else:
            cov = self.cov_fe
        sd = np.sqrt(np.einsum("ij,jk,ik->i", r, cov, r))
        stat = (effect - q) / sd
        names = [self._contrast_name(row) for row in r] if not isinstance(r_matrix, str) else [
            s.strip() for s in r_matrix.split(",") if s.strip()]
        if method is None:
            pv = 2 * stats.norm.sf(np.abs(stat))
            return ContrastResults("norm", effect, sd, stat, pv, np.inf, 1, q, names, None)
        df = self._ddf_rows(r, method)
        pv = 2 * stats.t.sf(np.abs(stat), df)
        return ContrastResults("t", effect, sd, stat, pv, df, 1, q, names, method)

    def _contrast_name(self, row: np.ndarray) -> str:
        terms = [f"{c:g}*{n}" if c != 1 else n for c, n in zip(row, self.fe_params.index, strict=True) if c != 0]
        return " + ".join(terms) or "0"

    def _ddf_rows(self, r: np.ndarray, method: str) -> np.ndarray:
        if method == "satterthwaite":
            return np.array([satterthwaite(self).ddf(row) for row in r])
        kr = kenward_roger(self)
        return np.array([kr.ddf(row[None, :]) for row in r])

    def wald_test(self, r_matrix: Any, q_matrix: Any = None, use_f: bool = False,
                  ddf: str | None = None) -> ContrastResults:
        """Joint Wald test of ``R β = q`` (statsmodels' ``wald_test``).

        ``W = (Rβ̂ − q)ᵀ (R Cov(β̂) Rᵀ)⁻¹ (Rβ̂ − q)``; chi-square on ``k`` df by default
        (statsmodels MixedLM), ``W / k`` against F with ``use_f`` (see :meth:`f_test`).
        """
        r, q = self._contrast_matrix(r_matrix, q_matrix)
        method = _ddf_method(ddf)
        if method is not None and not use_f:
            use_f = True
        if method == "kenward-roger":
            kr = kenward_roger(self)
            cov = kr.cov_adjusted
        else:
            cov = self.cov_fe
        rank = np.linalg.matrix_rank(r)
        if rank < r.shape[0]:
            raise ValueError(f"the {r.shape[0]} constraints are linearly dependent (rank {rank})")
        d = r @ self.fe_params.to_numpy() - q
        w = float(d @ np.linalg.solve(r @ cov @ r.T, d))
        k = r.shape[0]
        if not use_f:
            return ContrastResults("chi2", statistic=w, pvalue=float(stats.chi2.sf(w, k)), df_denom=np.inf,
                                   df_num=k, q=q, ddf=None)
        f = w / k
        if method is None:
            df2 = float(self.nobs - self.k_fe)
        elif method == "satterthwaite":
            df2 = satterthwaite(self).ddf_multi(r)
        else:  # lmerTest's KR F: adjusted covariance, pbkrtest's df, no F scaling
            df2 = kr.ddf(r)
        return ContrastResults("F", statistic=f, pvalue=float(stats.f.sf(f, k, df2)), df_denom=df2, df_num=k,
                               q=q, ddf=method)

    def f_test(self, r_matrix: Any, q_matrix: Any = None, ddf: str | None = None) -> ContrastResults:
        """Joint F test of ``R β = q`` (statsmodels' ``f_test``).

        Denominator df: ``nobs − k_fe`` by default (statsmodels), lmerTest's
        Satterthwaite F df with ``ddf="satterthwaite"`` or Kenward–Roger's scaled F
        (lmerTest: Kenward–Roger's adjusted covariance of β̂ and pbkrtest's df, the F
        statistic not rescaled) with ``ddf="kenward-roger"``.

        Examples
        --------
        >>> import mixedjax
        >>> d = mixedjax.datasets.load("sleepstudy")
        >>> r = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", re_formula="~Days").fit()
        >>> round(float(r.f_test("Days = 0").fvalue), 3)
        45.853
        """
        return self.wald_test(r_matrix, q_matrix, use_f=True, ddf=ddf)

    def compare_lr_test(self, restricted: MixedLMResults, refit: bool = True) -> tuple[float, float, int]:
        """statsmodels' form: ``(lr_stat, p_value, df_diff)`` of this (larger) model against ``restricted``.

        REML fits are refitted by ML first (``refit=True``, as lme4); see :func:`mixedjax.compare_lr_test`.
        """
        t = compare_lr_test(restricted, self, refit=refit)
        return float(t["Chisq"].iloc[1]), float(t["Pr(>Chisq)"].iloc[1]), int(t["Df"].iloc[1])

    # ------------------------------------------------------------------------ small-sample df table
    def fe_table(self, ddf: str | None = "satterthwaite", alpha: float = 0.05) -> pd.DataFrame:
        """Fixed-effects table with denominator df (lmerTest's ``summary(fit, ddf=...)`` coefficients).

        Columns ``Estimate, Std. Error, df, t value, Pr(>|t|)`` and the interval;
        Kenward–Roger uses its adjusted standard errors, as lmerTest does.
        """
        t = self.t_test(np.eye(self.k_fe), ddf=ddf)
        ci = t.conf_int(alpha)
        out = pd.DataFrame({"Estimate": t.effect, "Std. Error": t.sd,
                            "df": t.df_denom if t.distribution == "t" else np.inf, "t value": t.statistic,
                            "Pr(>|t|)": t.pvalue, f"[{alpha / 2:g}": ci[:, 0], f"{1 - alpha / 2:g}]": ci[:, 1]},
                           index=self.fe_params.index)
        return out



    # ---------------------------------------------------------------------------------- prediction
    def predict(self, exog: Any = None, conditional: bool = False, se: bool = False,
                alpha: float = 0.05, re_form: Any = None) -> pd.Series | pd.DataFrame:
        """Predictions for the model's rows or for new data (:mod:`mixedjax.predict`).

        Parameters
        ----------
        exog : pandas.DataFrame or array_like, optional
            New data (a DataFrame with the formula's columns, coded as at fit
            time; the group column too for conditional predictions), or a
            fixed-effects design matrix.  Default: the rows the model was fitted on.
        conditional : bool
            ``False`` (statsmodels' default): population level, ``x β̂``.  ``True``:
            ``x β̂ + z b̂_g`` with the BLUPs of the row's group; rows of groups (or
            nested levels) not seen in the fit fall back to the population level.
        se : bool
            Return a DataFrame ``mean, mean_se, mean_ci_lower, mean_ci_upper`` with
            standard errors ``sqrt(x Cov(β̂) xᵀ)`` (population level only).
        re_form : str, optional
            lme4's ``re.form``: which random-effects terms a conditional prediction
            includes (``"~(1 | plate)"``: that term only; ``"~0"``: none; default all).

        Examples
        --------
        >>> import mixedjax, pandas as pd
        >>> d = mixedjax.datasets.load("sleepstudy")
        >>> r = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", re_formula="~Days").fit()
        >>> new = pd.DataFrame({"Days": [0.0, 5.0], "Subject": ["308", "new subject"]})
        >>> [round(v, 2) for v in r.predict(new, conditional=True)]
        [253.66, 303.74]
        """
        return predict(self, exog, conditional=conditional, se=se, alpha=alpha, re_form=re_form)

    def condvar(self) -> pd.DataFrame:
        """Conditional modes and conditional sds of every random effect, lme4's
        ``as.data.frame(ranef(fit, condVar = TRUE))``: ``grpvar, term, grp, condval, condsd``."""
        return condvar_frame(self)

    # ------------------------------------------------------------------- profile likelihood, bootstrap
    def conf_int_lme4(self, method: str = "profile", alpha: float = 0.05, **kwargs: Any) -> pd.DataFrame:
        """Confidence intervals on lme4's scale and rows: ``sd_<term>|<group>``, ``cor_<t1>.<t2>|<group>``,
        ``sigma``, then the fixed effects (lme4's ``confint``); columns ``2.5 %`` and ``97.5 %``.

        ``method="profile"``: profile likelihood of the ML fit (a REML fit is refitted
        by ML first, as lme4), :mod:`mixedjax.profile`.  ``method="boot"``: percentile
        intervals of a parametric bootstrap (``n``, ``seed`` passed on to :meth:`bootstrap`).
        ``method="wald"``: Wald intervals of the fixed effects only (lme4 gives NA for the rest).

        Examples
        --------
        >>> import mixedjax
        >>> d = mixedjax.datasets.load("sleepstudy")
        >>> r = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", re_formula="~Days").fit()
        >>> ci = r.conf_int(method="profile")
        >>> [round(v, 3) for v in ci.loc["sigma"]]
        [22.898, 28.858]
        """
        if method == "profile":
            return profile_conf_int(self, alpha=alpha, **kwargs).conf_int
        if method in ("boot", "bootstrap"):
            return self.bootstrap(**kwargs).conf_int(alpha)
        if method == "wald":
            z = stats.norm.ppf(1 - alpha / 2)
            fe, se = self.fe_params.to_numpy(), self.bse_fe.to_numpy()
            names = ["(Intercept)" if n == "Intercept" else n for n in self.fe_params.index]
            return pd.DataFrame({f"{100 * alpha / 2:g} %": fe - z * se, f"{100 * (1 - alpha / 2):g} %": fe + z * se},
                                index=names)
        raise ValueError(f"method must be 'wald', 'profile' or 'boot', got {method!r}")

    def profile_re(self, re_ix: Any, vtype: str, num_low: int = 5, dist_low: float = 1.0, num_high: int = 5,
                   dist_high: float = 1.0) -> np.ndarray:
        """statsmodels' ``profile_re``: the profile log-likelihood of one random-effects variance on a grid.

        Returns an ``(num_low + num_high + 1, 2)`` array: the variance (natural scale)
        and the profile log-likelihood (this fit's criterion, REML or ML) with every
        other parameter re-estimated.  ``re_ix`` indexes ``exog_re`` (``vtype="re"``) or
        names a variance component (``vtype="vc"``); the grid runs from
        ``var − dist_low`` to ``var + dist_high``.  All grid points are fitted in one
        vmapped call (:func:`mixedjax.profile.profile_re`).

        Examples
        --------
        >>> import mixedjax
        >>> d = mixedjax.datasets.load("dietox")
        >>> r = mixedjax.mixedlm("Weight ~ Time", d, groups="Pig").fit()
        >>> pr = r.profile_re(0, "re", dist_low=10.0, dist_high=10.0)
        >>> pr.shape, bool(abs(pr[5, 1] - r.llf) < 1e-6)
        ((11, 2), True)
        """
        return profile_re(self, re_ix, vtype, num_low, dist_low, num_high, dist_high)

    def simulate(self, n: int = 1, seed: Any = 0) -> np.ndarray:
        """``n`` responses simulated from the fitted model, ``(nobs, n)`` in the model's row order.

        ``y* = X β̂ + Z b* + ε*`` with new random effects ``b* ~ N(0, cov_re)`` and
        residuals ``ε* ~ N(0, scale / w)`` (lme4's ``simulate(use.u = FALSE)``);
        JAX's PRNG, so a seed (an int or a ``jax.random`` key) reproduces the draws.

        Examples
        --------
        >>> import mixedjax
        >>> d = mixedjax.datasets.load("sleepstudy")
        >>> r = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject").fit()
        >>> r.simulate(3, seed=1).shape
        (180, 3)
        """
        return simulate(self, n, seed)

    def bootstrap(self, n: int = 1000, seed: Any = 0, maxiter: int = 200, gtol: float = 1e-6,
                  em_iter: int = 10, fast_compile: bool = True) -> Any:
        """Parametric bootstrap: simulate ``n`` responses and refit them all in one jitted, vmapped call.

        Each replicate is refitted by this fit's criterion (REML or ML), starting at
        the estimate.  ``fast_compile`` (default) compiles with XLA's backend
        optimisation level 0: about 2.5x less compile time, about 3x slower refits
        (measured on 2 CPU cores); pass ``False`` when bootstrapping many models of the
        same shape in one process.  Returns a :class:`mixedjax.bootstrap.BootstrapResults` with
        ``replicates`` (a tidy DataFrame: one row per replicate, lme4-scale columns),
        ``conf_int(alpha)`` (percentile intervals, lme4's rows), ``bias()``, ``n_failed``.

        Examples
        --------
        >>> import mixedjax
        >>> d = mixedjax.datasets.load("sleepstudy")
        >>> r = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", re_formula="~Days").fit()
        >>> b = r.bootstrap(n=32, seed=1)
        >>> b.replicates.shape, b.n_failed
        ((32, 8), 0)
        """
        return bootstrap(self, n=n, seed=seed, maxiter=maxiter, gtol=gtol, em_iter=em_iter,
                         fast_compile=fast_compile)

    # --------------------------------------------------------------------- per-term tests, ranova
    def anova(self, ddf: str = "satterthwaite", type: int = 3) -> pd.DataFrame:  # noqa: A002 - lmerTest's name
        """F tests of every fixed-effects term (lmerTest's ``anova(fit, type=, ddf=)``).

        Type III by default (contrasts that do not depend on the factor coding), types I
        and II too; denominator df by ``"satterthwaite"`` or ``"kenward-roger"``.  For
        likelihood-ratio tests between models use :func:`mixedjax.anova`.

        Examples
        --------
        >>> import mixedjax
        >>> d = mixedjax.datasets.load("sleepstudy")
        >>> r = mixedjax.lmer("Reaction ~ Days + (Days | Subject)", d)
        >>> round(float(r.anova()["F value"].iloc[0]), 3)
        45.853
        """
        return anova_terms(self, ddf=ddf, type=type)

    def ranova(self) -> pd.DataFrame:
        """Likelihood-ratio tests for dropping (or reducing) each random-effects term (lmerTest's ``ranova``).

        Reduced models are this model with the removed columns' covariance parameters held at 0,
        refitted by the same criterion (REML or ML): every model kind, see
        :func:`mixedjax.term_tests.ranova`.
        """
        return ranova(self)
