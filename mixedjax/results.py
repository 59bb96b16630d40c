"""Fitted-model results with statsmodels' names (and lme4's where only lme4 has one): one class for every model.

:class:`MixedLMResults` reads a :class:`mixedjax.fit.FittedModel` (backend, data, θ̂, β̂,
σ̂²) and the model's term names; it never looks inside a backend, so every model kind
(one grouping factor, nested, crossed, structured residuals) gets every attribute.
"""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from . import plots
from .backends import conditional_jit, info_natural_jit, info_natural_sub_jit, natural_from_fit, natural_size
from .distributions import norm
from .fit import ConvergenceWarning, FittedModel, with_rows
from .inference import InferenceMixin
from .optimize import Result
from .residuals import describe as _residual_describe
from .sharding import gather_rows
from .terms import diagonal_theta, factors_np
from .tidy import fit_notes, result_dict, results_tables, tables_html, tables_latex, tidy_frame

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SINGULAR_TOL = 1e-4  # lme4's isSingular() tolerance on the diagonal of θ

__all__ = ["ConvergenceWarning", "MixedLMResults", "OptimSummary", "SINGULAR_TOL", "Summary"]


class OptimSummary(NamedTuple):
    """How the optimisation went (MixedModels.jl's OptSummary): restartable from ``theta``."""

    theta_start: np.ndarray
    theta: np.ndarray
    deviance_start: float
    deviance: float
    iterations: int
    em_iterations: int
    polish_iterations: int
    evaluations: int
    grad_norm: float
    converged: bool
    result: Result
    message: str


class Summary:
    """Printable summary in statsmodels' MixedLM layout; ``tables`` holds the model information and the
    coefficients as DataFrames (and, when given, ``variance``: lme4's ``VarCorr`` rows, a third table).

    ``as_text()`` (``str``), ``as_html()`` (also the notebook display) and ``as_latex()``, as
    statsmodels' ``Summary``.
    """

    def __init__(self, title: str, info: list[tuple[str, str]], table: pd.DataFrame, extra: str = "",
                 variance: pd.DataFrame | None = None) -> None:
        self.title = title
        self.info = info
        self.tables = [pd.DataFrame(info, columns=["", " "]), table]
        if variance is not None:
            self.tables.append(variance)
        self.extra = extra

    def _html_tables(self) -> list[tuple[str, pd.DataFrame]]:
        out = [("", self.tables[1])]
        if len(self.tables) > 2:
            out.append(("Random effects (variances, sd / correlations)", self.tables[2].set_index("group")))
        return out

    def as_html(self) -> str:
        """The summary as HTML tables (model information, coefficients, random effects), then the notes.

        Examples
        --------
        >>> import mixedjax
        >>> d = mixedjax.datasets.load("dyestuff")
        >>> s = mixedjax.lmer("Yield ~ 1 + (1 | Batch)", d).summary()
        >>> s.as_html().count("<table"), "REML" in s.as_html()
        (3, True)
        """
        return tables_html(self.title, self.info, self._html_tables(), self.extra)

    def as_latex(self) -> str:
        r"""The summary as a LaTeX ``table`` (``tabular`` blocks of the model information, coefficients and
        random effects; the notes below), as statsmodels' ``Summary.as_latex``.

        Examples
        --------
        >>> import mixedjax
        >>> d = mixedjax.datasets.load("dyestuff")
        >>> tex = mixedjax.lmer("Yield ~ 1 + (1 | Batch)", d).summary().as_latex()
        >>> tex.startswith("\\begin{table}"), tex.count("\\begin{tabular}")
        (True, 3)
        """
        return tables_latex(self.title, self.info, self._html_tables(), self.extra)

    def _repr_html_(self) -> str:
        return self.as_html()

    def as_text(self) -> str:
        table = self.tables[1]
        body = table.to_string(justify="right")
        half = (len(self.info) + 1) // 2
        left, right = self.info[:half], self.info[half:]
        kw1 = max(len(k) for k, _ in left) + 1
        vw1 = max(len(v) for _, v in left) + 1
        kw2 = max((len(k) for k, _ in right), default=0) + 1
        vw2 = max((len(v) for _, v in right), default=0)
        lines = []
        for i in range(half):
            k, v = left[i]
            k2, v2 = right[i] if i < len(right) else ("", "")
            lines.append(f"{k:<{kw1}}{v:<{vw1}}{k2:<{kw2}}{v2:<{vw2}}".rstrip())
        width = max(max(len(line) for line in body.splitlines()), max(len(s) for s in lines))
        out = [self.title.center(width).rstrip(), "=" * width, *lines, "-" * width]
        header, *rows = body.splitlines()
        out += [header, "-" * width, *rows, "=" * width]
        if self.extra:
            out.append(self.extra)
        return "\n".join(out)

    def __str__(self) -> str:
        return self.as_text()

    def __repr__(self) -> str:
        return self.as_text()


def _unique_labels(labels: list[str]) -> list[str]:
    """lme4's term names: a repeated grouping label gets ``.1``, ``.2``, ..."""
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        k = seen.get(lab, 0)
        out.append(lab if k == 0 else f"{lab}.{k}")
        seen[lab] = k + 1
    return out


class MixedLMResults(InferenceMixin):
    """Results of a fit, with statsmodels' attribute names: the same class for every model kind.

    Attributes
    ----------
    fitted : mixedjax.fit.FittedModel
        What every feature reads: backend, data, θ̂, ρ̂, β̂, σ̂², Cov(β̂).
    fe_params : pandas.Series
        Fixed effects β̂.
    cov_re : pandas.DataFrame
        Covariance matrix of the first random-effects term (the correlated block of a
        ``mixedlm`` model; the factor with most levels of a crossed model), natural scale.
    vcomp : numpy.ndarray
        Variances of every other term's random effects (variance components), natural scale.
    scale : float
        Residual variance σ̂².
    params : pandas.Series
        statsmodels' packing: ``fe_params``, each term's covariance lower triangle divided
        by ``scale`` (``cov_re / scale``, ``vcomp / scale``), then the residual-structure
        parameters on their natural scale (VarIdent sd ratios, AR(1) φ).
    llf : float
        Log-likelihood (REML criterion for REML fits).
    aic, bic : float
        ``-2 llf + 2 k`` and ``-2 llf + k log(nobs)`` with lme4's count
        ``k = k_fe + (variance parameters) + 1`` (+ residual-structure parameters).
    bse_fe : pandas.Series
        Standard errors of the fixed effects, lme4's: ``sqrt(diag(scale (X'V⁻¹X)⁻¹))``.
    bse_re : pandas.Series
        Standard errors of the variance parameters on the natural scale (and of the
        residual-structure parameters), from the observed information of the
        (restricted) likelihood.  NaN only where the information is singular (a
        boundary estimate).
    optim : OptimSummary
        How the optimisation went.

    Examples
    --------
    >>> import mixedjax
    >>> data = mixedjax.datasets.load("sleepstudy")
    >>> r = mixedjax.mixedlm("Reaction ~ Days", data, groups="Subject", re_formula="~Days").fit()
    >>> round(float(r.fe_params["Days"]), 4)
    10.4673
    """

    def __init__(self, model: Any, fitted: FittedModel) -> None:
        self.model = model
        self.fitted = fitted
        self.reml = fitted.reml
        self.method = "REML" if self.reml else "ML"
        backend = fitted.backend
        self.theta = np.asarray(fitted.theta)
        self.residual_params = np.asarray(fitted.rho)
        bound = model.residual
        self.residual_structure = {} if bound is None else _residual_describe(bound, self.residual_params)
        self.scale = float(fitted.sigma2)
        self.llf = float(fitted.llf)
        self.nobs = model.nobs
        self.k_fe = model.k_fe
        self.fe_params = pd.Series(np.asarray(fitted.beta, float), index=model.exog_names)
        self.term_covs = [self.scale * f @ f.T for f in _factors(self.theta, backend)]
        infos = model.term_info
        self.term_labels = _unique_labels([t.label for t in infos])
        self.ngroups = model.n_groups if model.api == "statsmodels" else {t.label: t.n_levels for t in infos}
        first = 1 if getattr(model, "k_re", 0) else 0
        if first:
            names = list(model.exog_re_names) if model.api == "statsmodels" else list(infos[0].names)
            self.cov_re = pd.DataFrame(self.term_covs[0], index=names, columns=names)
        else:
            self.cov_re = pd.DataFrame(np.zeros((0, 0)))
        rest = self.term_covs[first:]
        self.vcomp = np.concatenate([np.diag(c) for c in rest]) if rest else np.zeros(0)
        self.k_re = self.cov_re.shape[0]
        self.k_re2 = self.k_re * (self.k_re + 1) // 2
        self.k_vc = len(self.vcomp)
        nat = natural_from_fit(backend, fitted.theta_full, self.scale)
        n_cov = model.n_cov_params
        vals = np.concatenate([self.fe_params.to_numpy(), nat[:n_cov] / self.scale, nat[n_cov:]])
        self.params = pd.Series(vals, index=model.param_names)
        self.df_modelwc = self.k_fe + n_cov + 1 + len(self.residual_params)
        self.aic = -2.0 * self.llf + 2.0 * self.df_modelwc
        self.bic = -2.0 * self.llf + np.log(self.nobs) * self.df_modelwc
        sol = fitted.solution
        result = Result(int(sol.result))
        message = result.message
        if backend.kind == "crossed" and result == Result.CONVERGED:
            message = "converged: the Newton step on the measured gradient and Hessian is below xtol (derivative-free)"
        self.optim = OptimSummary(
            theta_start=np.asarray(sol.x_start), theta=fitted.theta_full, deviance_start=float(sol.value_start),
            deviance=float(sol.value), iterations=int(sol.iterations), em_iterations=int(sol.warm_iterations),
            polish_iterations=int(sol.polish_iterations), evaluations=int(sol.evaluations),
            grad_norm=float(sol.grad_norm), converged=fitted.converged, result=result, message=message)
        self.converged = self.optim.converged
        self.mle_retvals = {"converged": self.converged, "iterations": self.optim.iterations,
                            "message": self.optim.message, "grad_norm": self.optim.grad_norm}
        diag = diagonal_theta(backend.terms)
        self.singular = bool(np.any(np.abs(self.theta[diag]) < SINGULAR_TOL))
        if not np.isfinite(self.llf):
            raise FloatingPointError(
                f"the log-likelihood is not finite at the estimate ({self.optim.message}); "
                "check the data for extreme values or a degenerate design")
        if not self.converged:
            warnings.warn(f"the fit did not converge: {self.optim.message} (max |gradient| "
                          f"{self.optim.grad_norm:.2e} after {self.optim.iterations} iterations); "
                          "see result.optim, or refit with start_params=result.params",
                          ConvergenceWarning, stacklevel=3)
        if self.singular:
            names = [n for n, d, t in zip(self.theta_names, diag, self.theta, strict=True)
                     if d and abs(t) < SINGULAR_TOL]
            warnings.warn(f"the fit is singular: the estimate is on the boundary of the parameter space "
                          f"(a variance of 0 or a correlation of ±1; θ ≈ 0 for {names})",
                          ConvergenceWarning, stacklevel=3)

    @property
    def theta_names(self) -> list[str]:
        """One name per θ entry: ``term column`` (diagonal) or ``term column1 x column2``."""
        out = []
        for t, info, lab in zip(self.fitted.backend.terms, self.model.term_info, self.term_labels, strict=True):
            r, c = t.positions()
            out += [f"{lab} {info.names[i]}" if i == j else f"{lab} {info.names[j]} x {info.names[i]}"
                    for i, j in zip(r, c, strict=True)]
        return out

    # --------------------------------------------------------- uncertainty
    @property
    def cov_fe(self) -> np.ndarray:
        """``Cov(β̂) = scale (X'V⁻¹X)⁻¹`` (lme4's ``vcov``)."""
        return self.fitted.cov_beta

    @functools.cached_property
    def cov_natural(self) -> np.ndarray:
        """Inverse observed information of the natural-scale variance parameters (each term's covariance
        entries, then the residual-structure parameters on their natural scale), σ² among them and β profiled
        (nlme's ``apVar``; statsmodels inverts the joint information, which gives the same block)."""
        k = natural_size(self.fitted.backend)
        return self.cov_natural_scale[:k, :k]

    @functools.cached_property
    def cov_natural_scale(self) -> np.ndarray:
        """:attr:`cov_natural` with σ² (``scale``) as a last row and column: ``(k + 1, k + 1)``, the inverse
        observed information of every variance parameter (the standard error of σ̂ in ``to_frame``)."""
        fm = self.fitted
        backend = fm.backend
        v = np.concatenate([natural_from_fit(backend, fm.theta_full, self.scale), [self.scale]])
        # β profiled (REML: integrated out, as the criterion itself): the v-block of the inverse joint information
        h = np.asarray(info_natural_jit(backend, jax.device_put(v), None, fm.data, self.reml))
        k = natural_size(backend)
        if np.all(np.isfinite(h)):
            try:
                if np.linalg.eigvalsh(-h).min() > 0:
                    return np.linalg.inv(-h)
            except np.linalg.LinAlgError:
                pass
        # a variance on the boundary (θ diagonal 0): its derivative does not exist there; the others' information
        # is taken with the boundary variances (and their covariances) held at 0, and their rows are NaN
        fixed = np.zeros(len(v), bool)
        diag = diagonal_theta(backend.terms)
        off = 0
        for t, f in zip(backend.terms, factors_np(fm.theta, backend.terms), strict=True):
            r, c = t.positions()
            zero = np.abs(np.diag(f)) < SINGULAR_TOL
            fixed[off : off + t.n_theta] = zero[r] | zero[c]
            off += t.n_theta
        del diag
        keep = np.flatnonzero(~fixed)
        out = np.full((k + 1, k + 1), np.nan)
        if not fixed.any():
            return out
        hs = np.asarray(info_natural_sub_jit(jnp.asarray(v[keep]), jnp.asarray(v), jnp.asarray(keep), backend,
                                             fm.data, self.reml))
        try:
            if not np.all(np.isfinite(hs)) or np.linalg.eigvalsh(-hs).min() <= 0:
                return out
            inv = np.linalg.inv(-hs)
        except np.linalg.LinAlgError:
            return out
        out[np.ix_(keep, keep)] = inv
        return out

    def cov_params(self) -> pd.DataFrame:
        """Covariance of ``params``, with statsmodels' scaling.

        Fixed-effects block: ``scale (X'V⁻¹X)⁻¹`` (lme4's).  Variance block: the inverse
        observed information of the natural-scale variances divided by ``scale`` (so
        ``bse_re = sqrt(scale * diag)``, as statsmodels); residual-structure block:
        natural scale.
        """
        n_cov = self.model.n_cov_params
        k = len(self.params)
        out = np.zeros((k, k))
        out[: self.k_fe, : self.k_fe] = self.cov_fe
        scl = np.concatenate([np.full(n_cov, 1.0 / self.scale), np.ones(len(self.residual_params))])
        out[self.k_fe :, self.k_fe :] = self.cov_natural * np.sqrt(np.outer(scl, scl))
        return pd.DataFrame(out, index=self.params.index, columns=self.params.index)

    @property
    def bse_fe(self) -> pd.Series:
        return pd.Series(np.sqrt(np.diag(self.cov_fe)), index=self.fe_params.index)

    @property
    def bse_re(self) -> pd.Series:
        return pd.Series(np.sqrt(np.diag(self.cov_natural)), index=self.params.index[self.k_fe :])

    @property
    def bse(self) -> pd.Series:
        return pd.Series(np.sqrt(np.diag(self.cov_params().to_numpy())), index=self.params.index)

    @property
    def tvalues(self) -> pd.Series:
        return self.params / self.bse

    @property
    def pvalues(self) -> pd.Series:
        """Two-sided normal p-values of ``tvalues`` (statsmodels' convention)."""
        return pd.Series(2 * norm.sf(np.abs(self.tvalues.to_numpy())), index=self.params.index)

    def conf_int(self, alpha: float = 0.05, method: str = "wald", **kwargs: Any) -> pd.DataFrame:
        """Wald confidence intervals ``params ± z_{1-alpha/2} bse`` for every row of ``params``.

        ``method="profile"`` (lme4's profile intervals) or ``"boot"`` (parametric
        bootstrap percentiles) give lme4's rows instead: see :meth:`conf_int_lme4`.
        """
        if method != "wald":
            return self.conf_int_lme4(method, alpha, **kwargs)
        z = norm.ppf(1 - alpha / 2)
        return pd.DataFrame({0: self.params - z * self.bse, 1: self.params + z * self.bse})

    # ------------------------------------------------------ random effects
    @functools.cached_property
    def conditional(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per term, conditional modes ``(l_k, q_k)`` and conditional covariances ``(l_k, q_k, q_k)``
        (natural scale: lme4's ``ranef(condVar = TRUE)``)."""
        fm = self.fitted
        modes, covs = conditional_jit(fm.backend, jnp.asarray(fm.theta_full), fm.backend.conditional_data(fm.data),
                                      jnp.asarray(fm.beta))
        # a group axis sharded over processes (distributed=True) is gathered on every process
        return [gather_rows(b) for b in modes], [self.scale * gather_rows(c) for c in covs]

    def _per_group(self, covariance: bool) -> dict:
        """statsmodels' layout: ``{group label: Series}`` (or DataFrame covariances), every term of the group."""
        m = self.model
        modes, covs = self.conditional
        out = {}
        infos = m.term_info
        first = 1 if m.k_re else 0
        vc_entries: list[list[tuple[int, str, float, float]]] = [[] for _ in m.group_labels]
        for k, v in enumerate(m.vc_designs):
            j = 0
            for g, names in enumerate(v.names):
                for nm in names:
                    vc_entries[g].append((k, nm, modes[first + k][j, 0], covs[first + k][j, 0, 0]))
                    j += 1
        for g, lab in enumerate(m.group_labels):
            names = list(m.exog_re_names) if first else []
            vals = list(modes[0][g]) if first else []
            diag_blocks = [covs[0][g]] if first else []
            for _, nm, b, c in vc_entries[g]:
                names.append(nm)
                vals.append(b)
                diag_blocks.append(np.array([[c]]))
            if covariance:
                q = len(names)
                mat = np.zeros((q, q))
                off = 0
                for blk in diag_blocks:
                    n = blk.shape[0]
                    mat[off : off + n, off : off + n] = blk
                    off += n
                out[lab] = pd.DataFrame(mat, index=names, columns=names)
            else:
                out[lab] = pd.Series(vals, index=names, dtype=float)
        del infos
        return out

    @property
    def random_effects(self) -> dict:
        """Conditional modes (BLUPs).

        ``mixedlm`` models: ``{group label: Series}`` (statsmodels' layout).  ``lmer``
        models: ``{grouping factor: DataFrame(levels x columns)}`` (lme4's ``ranef``).
        """
        if self.model.api == "statsmodels":
            return self._per_group(covariance=False)
        modes, _ = self.conditional
        out: dict[str, pd.DataFrame] = {}
        for k in self._display_order():
            info, b = self.model.term_info[k], modes[k]
            df = pd.DataFrame(b, index=list(info.levels), columns=list(info.names))
            out[info.factor] = df if info.factor not in out else out[info.factor].join(df, how="outer")
        return out

    def _display_order(self) -> list[int]:
        """Terms in lme4's order for lmer models (more levels first, stably); the model's order otherwise."""
        infos = self.model.term_info
        if self.model.api != "lme4":
            return list(range(len(infos)))
        return sorted(range(len(infos)), key=lambda k: -infos[k].n_levels)

    @property
    def random_effects_cov(self) -> dict:
        """Conditional covariances of the random effects (lme4's condVar), natural scale.

        ``mixedlm`` models: ``{group label: DataFrame}`` over the group's random effects
        (statsmodels' layout; one block per term).  ``lmer`` models: ``{term label: array
        (levels, q, q)}`` with the term's levels in ``model.term_info``.
        """
        if self.model.api == "statsmodels":
            return self._per_group(covariance=True)
        _, covs = self.conditional
        return dict(zip(self.term_labels, covs, strict=True))

    @functools.cached_property
    def fittedvalues(self) -> np.ndarray:
        """``X β̂ + Z b̂`` per row (conditional fitted values), in the model's row order."""
        fm = self.fitted
        modes, _ = self.conditional
        data = with_rows(fm)
        return np.asarray(fm.backend.fixed_part(jnp.asarray(fm.beta), data)
                          + fm.backend.row_effects([jnp.asarray(b) for b in modes], data))

    @property
    def resid(self) -> np.ndarray:
        return self.model.endog - self.fittedvalues

    # ----------------------------------------------------------- reporting
    def varcorr(self) -> pd.DataFrame:
        """Variances and covariances as lme4's ``as.data.frame(VarCorr(fit))``.

        Columns ``group, var1, var2, vcov, sdcor``: per term, the variances, then the
        covariances (``sdcor`` is then the correlation); the residual last.
        """
        rows = []
        for k in self._display_order():
            info, cov, lab = self.model.term_info[k], self.term_covs[k], self.term_labels[k]
            group = info.source if (self.model.api == "statsmodels" and info.source) else lab
            sd = np.sqrt(np.clip(np.diag(cov), 0, None))
            for i, n in enumerate(info.names):
                rows.append((group, n, None, cov[i, i], sd[i]))
            for j in range(len(info.names)):
                for i in range(j + 1, len(info.names)):
                    corr = cov[i, j] / (sd[i] * sd[j]) if sd[i] * sd[j] > 0 else np.nan
                    rows.append((group, info.names[j], info.names[i], cov[i, j], corr))
        rows.append(("Residual", None, None, self.scale, np.sqrt(self.scale)))
        return pd.DataFrame(rows, columns=["group", "var1", "var2", "vcov", "sdcor"])

    @property
    def cov_terms(self) -> dict[str, pd.DataFrame]:
        """Covariance matrix of each term's random effects (natural scale), by term label."""
        infos = self.model.term_info
        return {self.term_labels[k]: pd.DataFrame(self.term_covs[k], index=list(infos[k].names),
                                                  columns=list(infos[k].names)) for k in self._display_order()}

    def _terms_text(self) -> str:
        lines = ["Random effects (one block per term):"]
        for k in self._display_order():
            lab, t, cov = self.term_labels[k], self.model.term_info[k], self.term_covs[k]
            lines.append(f"  {lab}  {t.source}  ({t.n_levels} levels)".rstrip())
            sd = np.sqrt(np.clip(np.diag(cov), 0, None))
            lines.append(f"    {'':<20}{'Variance':>12}{'Std.Dev.':>12}  Corr")
            for i, n in enumerate(t.names):
                corr = " ".join(f"{cov[i, j] / (sd[i] * sd[j]):6.3f}" if sd[i] * sd[j] > 0 else "   nan"
                                for j in range(i))
                lines.append(f"    {n:<20}{cov[i, i]:>12.4f}{sd[i]:>12.4f}  {corr}".rstrip())
        lines.append(f"  Residual{'':<16}{self.scale:>12.4f}{np.sqrt(self.scale):>12.4f}")
        return "\n".join(lines)

    def summary(self, alpha: float = 0.05, ddf: str | None = None) -> Summary:
        """Summary in statsmodels' MixedLM layout (fixed effects, then the variance rows).

        ``ddf="satterthwaite"`` or ``"kenward-roger"``: t tests of the fixed effects with
        lmerTest's denominator df (a ``df`` column; see :meth:`fe_table`).  lmer models add
        one block per random-effects term (lme4's VarCorr).
        """
        m = self.model
        info = [("Model:", "MixedLM" if self.fitted.backend.kind == "grouped" else "MixedLM (crossed)"),
                ("No. Observations:", str(self.nobs))]
        if m.api == "statsmodels":
            sizes = m.group_sizes
            info += [("No. Groups:", str(self.ngroups)), ("Min. group size:", f"{sizes.min():.0f}"),
                     ("Max. group size:", f"{sizes.max():.0f}"), ("Mean group size:", f"{sizes.mean():.1f}")]
        else:
            info += [("Groups:", ", ".join(f"{k} {v}" for k, v in self.ngroups.items()))]
        info += [("Dependent Variable:", str(m.endog_names)), ("Method:", self.method),
                 ("Scale:", f"{self.scale:.4f}"), ("Log-Likelihood:", f"{self.llf:.4f}"),
                 ("Converged:", "Yes" if self.converged else "No")]
        if len(info) % 2:
            info.append(("", ""))
        z = norm.ppf(1 - alpha / 2)
        fe, se = self.fe_params.to_numpy(), self.bse_fe.to_numpy()
        tab = np.full((len(self.params), 6), np.nan)
        tab[: self.k_fe, 0] = fe
        tab[: self.k_fe, 1] = se
        tab[: self.k_fe, 2] = fe / se
        tab[: self.k_fe, 3] = 2 * norm.sf(np.abs(fe / se))
        tab[: self.k_fe, 4] = fe - z * se
        tab[: self.k_fe, 5] = fe + z * se
        n_cov = m.n_cov_params
        tab[self.k_fe :, 0] = np.concatenate([self.params.to_numpy()[self.k_fe : self.k_fe + n_cov] * self.scale,
                                              self.params.to_numpy()[self.k_fe + n_cov :]])
        tab[self.k_fe :, 1] = self.bse_re.to_numpy()
        cols = ["Coef.", "Std.Err.", "z", "P>|z|", f"[{alpha / 2:g}", f"{1 - alpha / 2:g}]"]
        if ddf is not None:  # small-sample t tests (inference.py)
            small = self.fe_table(ddf, alpha).to_numpy()
            tab[: self.k_fe, 1:6] = small[:, [1, 3, 4, 5, 6]]
            cols[2:4] = ["t", "P>|t|"]
        df = pd.DataFrame(tab, index=self.params.index, columns=cols)
        if ddf is not None:
            df.insert(2, "df", np.concatenate([small[:, 2], np.full(len(self.params) - self.k_fe, np.nan)]))
            cols.insert(2, "df")
        for col in cols:
            df[col] = [f"{v:.3f}" if np.isfinite(v) else "" for v in df[col]]
        notes = ([self._terms_text()] if m.api == "lme4" else []) + fit_notes(self)
        return Summary("Mixed Linear Model Regression Results", info, df, "\n".join(notes), variance=self.varcorr())

    # ------------------------------------------------------------------------------------- tidy output
    def to_frame(self, ddf: str | None = "satterthwaite", ran_pars_ci: str | None = None,
                 alpha: float = 0.05) -> pd.DataFrame:
        """One row per parameter with the columns of R's ``broom.mixed::tidy``.

        ``effect, group, term, estimate, std_error, statistic, df, p_value, conf_low,
        conf_high``: the fixed effects (t tests with ``ddf``: ``"satterthwaite"``,
        ``"kenward-roger"`` or None for Wald z tests), then per random-effects term the sds
        and correlations (``sd__(Intercept)``, ``cor__(Intercept).Days``), the residual sd
        (``sd__Observation``, group ``"Residual"``) and the residual-structure parameters
        (``sd_ratio__<level>``, ``phi__AR1``).  ``ran_pars_ci``: None (default: no standard
        errors or intervals for the variance rows, as broom.mixed), ``"wald"`` (delta method
        from the observed information, nlme's intervals) or ``"profile"`` (lme4's profile
        intervals).  See :func:`mixedjax.tidy.tidy_frame`.

        Examples
        --------
        >>> import mixedjax
        >>> d = mixedjax.datasets.load("sleepstudy")
        >>> r = mixedjax.lmer("Reaction ~ Days + (Days | Subject)", d)
        >>> t = r.to_frame()
        >>> t.loc[1, ["term", "df"]].tolist()[0], round(float(t.loc[1, "df"]), 3)  # lmerTest: 17
        ('Days', 17.0)
        """
        return tidy_frame(self, ddf=ddf, ran_pars_ci=ran_pars_ci, alpha=alpha)

    def to_dict(self, ddf: str | None = "satterthwaite", ran_pars_ci: str | None = None,
                alpha: float = 0.05) -> dict:
        """The fit as a JSON-serialisable dictionary (NaN and infinities as None): what ``mixedjax fit
        --output json`` prints.  ``llf, aic, bic, converged, fe_params, bse_fe, varcorr`` (lme4's
        ``as.data.frame(VarCorr())`` rows: ``grp, var1, var2, vcov, sdcor``), ``nobs``, ``method``, the
        model's description and ``tidy`` (the rows of :meth:`to_frame`); see :func:`mixedjax.tidy.result_dict`.

        Examples
        --------
        >>> import json, mixedjax
        >>> d = mixedjax.datasets.load("sleepstudy")
        >>> out = mixedjax.lmer("Reaction ~ Days + (Days | Subject)", d).to_dict(ddf=None)
        >>> out["method"], round(out["fe_params"]["Days"], 4), out["varcorr"][2]["var2"]
        ('REML', 10.4673, 'Days')
        >>> json.loads(json.dumps(out, allow_nan=False))["nobs"]
        180
        """
        return result_dict(self, ddf=ddf, ran_pars_ci=ran_pars_ci, alpha=alpha)

    def _repr_html_(self) -> str:
        """A brief HTML view in notebooks (lme4's ``print(fit)``: estimates, no extra computation); the full
        tables are ``summary()``."""
        return tables_html(*results_tables(self))

    # ------------------------------------------------------------ plots (mixedjax.plots, the plot extra)
    def plot_ranef(self, alpha: float = 0.05, figsize: tuple[float, float] | None = None) -> Figure:
        """Caterpillar plot of the conditional modes with ``1 − alpha`` intervals from the conditional sds,
        one panel per grouping factor and column (lme4's ``dotplot(ranef(fit, condVar = TRUE))``;
        :func:`mixedjax.plots.plot_ranef`).

        Examples
        --------
        >>> import mixedjax
        >>> r = mixedjax.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", mixedjax.datasets.load("penicillin"))
        >>> fig = r.plot_ranef()
        >>> fig.savefig("ranef.png")  # doctest: +SKIP
        >>> len(fig.axes)
        2
        """
        return plots.plot_ranef(self, alpha=alpha, figsize=figsize)

    def plot_profile(self, params: list[str] | None = None, alpha: float = 0.05,
                     figsize: tuple[float, float] | None = None) -> Figure:
        """The profile ζ of each parameter with its profile interval (lme4's ``xyplot(profile(fit))``;
        :func:`mixedjax.plots.plot_profile`).  ``params``: lme4's names of the parameters to draw
        (the rows of ``conf_int(method="profile")``), default all.

        Examples
        --------
        >>> import mixedjax
        >>> r = mixedjax.lmer("Yield ~ 1 + (1 | Batch)", mixedjax.datasets.load("dyestuff"))
        >>> [ax.get_title() for ax in r.plot_profile(params=["sigma"]).axes]
        ['sigma']
        """
        return plots.plot_profile(self, params=params, alpha=alpha, figsize=figsize)

    def plot_diagnostics(self, figsize: tuple[float, float] | None = None) -> Figure:
        """Standardised residuals against fitted values, and normal QQ plots of the residuals and of every
        random effect (:func:`mixedjax.plots.plot_diagnostics`).

        Examples
        --------
        >>> import mixedjax
        >>> d = mixedjax.datasets.load("sleepstudy")
        >>> r = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject").fit()
        >>> [ax.get_title() for ax in r.plot_diagnostics().axes]
        ['residuals vs fitted', 'residuals', 'Subject: (Intercept)']
        """
        return plots.plot_diagnostics(self, figsize=figsize)

    def __repr__(self) -> str:
        return f"<MixedLMResults {self.method} llf={self.llf:.4f} converged={self.converged}>"


LmerResults = MixedLMResults  # lmer fits return the same class (an alias kept for old imports)


def _factors(theta: np.ndarray, backend: Any) -> list[np.ndarray]:
    return factors_np(theta, backend.terms)
