"""Fitted-model results with statsmodels' names (and lme4's where only lme4 has one)."""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from scipy import stats

from .covariance import pack_params, theta_to_profile
from .inference import InferenceMixin
from .likelihood import blups, loglike_natural, profile
from .optimize import Result
from .residuals import describe as _residual_describe

if TYPE_CHECKING:
    from .model import MixedLM


class ConvergenceWarning(UserWarning):
    """A fit did not converge, or converged to a singular (boundary) estimate."""


SINGULAR_TOL = 1e-4  # lme4's isSingular() tolerance on the diagonal of θ


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


_profile_jit = jax.jit(profile, static_argnames=("structure",))
_blups_jit = jax.jit(blups, static_argnames=("structure",))
_info_jit = jax.jit(jax.hessian(loglike_natural), static_argnames=("structure",))


class Summary:
    """Printable summary in statsmodels' MixedLM layout; ``tables`` holds the two tables as DataFrames."""

    def __init__(self, title: str, info: list[tuple[str, str]], table: pd.DataFrame, extra: str = "") -> None:
        self.title = title
        self.info = info
        self.tables = [pd.DataFrame(info, columns=["", " "]), table]
        self.extra = extra

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


class MixedLMResults(InferenceMixin):
    """Results of :meth:`MixedLM.fit`, with statsmodels' attribute names.

    Attributes
    ----------
    fe_params : pandas.Series
        Fixed effects β̂.
    cov_re : pandas.DataFrame
        Covariance matrix of the correlated random effects (natural scale).
    vcomp : numpy.ndarray
        Variance-component variances (natural scale).
    scale : float
        Residual variance σ̂².
    params : pandas.Series
        statsmodels' packing: ``fe_params``, lower triangle of ``cov_re / scale``,
        ``vcomp / scale``.
    llf : float
        Log-likelihood (REML criterion for REML fits).
    aic, bic : float
        ``-2 llf + 2 k`` and ``-2 llf + k log(nobs)`` with lme4's count
        ``k = k_fe + (variance parameters) + 1`` (the residual variance), for ML and
        REML fits alike (lme4 reports both; statsmodels gives NaN for REML).
    bse_fe : pandas.Series
        Standard errors of the fixed effects, lme4's: ``sqrt(diag(scale (X'V⁻¹X)⁻¹))``.
    bse_re : pandas.Series
        Standard errors of ``cov_re`` (lower triangle) and ``vcomp`` on the natural
        scale, from the observed information of the (restricted) likelihood.
    optim : OptSummary
        How the optimisation went.

    Examples
    --------
    >>> import mixedjax
    >>> data = mixedjax.datasets.load("sleepstudy")
    >>> r = mixedjax.mixedlm("Reaction ~ Days", data, groups="Subject", re_formula="~Days").fit()
    >>> round(float(r.fe_params["Days"]), 4)
    10.4673
    """

    def __init__(self, model: MixedLM, theta: np.ndarray, sol: Any, reml: bool) -> None:
        self.model = model
        self.reml = reml
        self.method = "REML" if reml else "ML"
        st = model.structure
        theta = np.asarray(theta, dtype=float)
        # structured residuals (mixedjax.residuals): their parameters follow the random-effects θ
        bound = getattr(model, "residual", None)
        self.residual_params = theta[st.n_theta :]
        self.theta = theta[: st.n_theta]
        self._cp = model._cp if bound is None else model._cp_at(self.residual_params)
        self.residual_structure = {} if bound is None else _residual_describe(bound, self.residual_params)
        pr = jax.device_get(_profile_jit(jnp.asarray(self.theta), self._cp, st, reml))
        self._profiled = pr
        self.scale = float(pr.sigma2)
        self.llf = float(-0.5 * pr.deviance)
        self.nobs = model.nobs
        self.ngroups = model.n_groups
        self.k_fe, self.k_re, self.k_re2, self.k_vc = model.k_fe, model.k_re, model.k_re2, model.k_vc
        cov_re1, vcomp1 = theta_to_profile(self.theta, st)
        self.cov_re_unscaled = cov_re1
        self.fe_params = pd.Series(np.asarray(pr.beta, dtype=float), index=model.exog_names)
        self.cov_re = pd.DataFrame(cov_re1 * self.scale, index=model.exog_re_names, columns=model.exog_re_names)
        self.vcomp = np.asarray(vcomp1 * self.scale, dtype=float)
        self.params = pd.Series(pack_params(self.fe_params.to_numpy(), cov_re1, vcomp1, st),
                                index=model.param_names)
        a = np.asarray(pr.normal.a, dtype=float)
        self._cov_fe = self.scale * np.linalg.inv(a)
        self.df_modelwc = self.k_fe + st.n_cov_params + 1 + len(self.residual_params)
        self.aic = -2.0 * self.llf + 2.0 * self.df_modelwc
        self.bic = -2.0 * self.llf + np.log(self.nobs) * self.df_modelwc

        result = Result(int(sol.result))
        self.optim = OptimSummary(
            theta_start=np.asarray(sol.x_start), theta=theta, deviance_start=float(sol.value_start),
            deviance=float(sol.value), iterations=int(sol.iterations), em_iterations=int(sol.warm_iterations),
            polish_iterations=int(sol.polish_iterations), evaluations=int(sol.evaluations),
            grad_norm=float(sol.grad_norm), converged=bool(result <= Result.NO_PROGRESS), result=result,
            message=result.message,
        )
        self.converged = self.optim.converged
        self.mle_retvals = {"converged": self.converged, "iterations": self.optim.iterations,
                            "message": self.optim.message, "grad_norm": self.optim.grad_norm}
        diag = st.diagonal_theta()
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
            names = [n for n, d, t in zip(st.theta_names(), diag, self.theta, strict=True)
                     if d and abs(t) < SINGULAR_TOL]
            warnings.warn(f"the fit is singular: the estimate is on the boundary of the parameter space "
                          f"(a variance of 0 or a correlation of ±1; θ ≈ 0 for {names})",
                          ConvergenceWarning, stacklevel=3)

    # --------------------------------------------------------- uncertainty
    @functools.cached_property
    def _cov_var_natural(self) -> np.ndarray:
        """Covariance of the natural-scale variance parameters (cov_re tril, vcomp), inverse information."""
        st = self.model.structure
        r, c = st.re_tril
        v = np.concatenate([self.cov_re.to_numpy()[r, c], self.vcomp, [self.scale]])
        h = np.asarray(_info_jit(jnp.asarray(v), jnp.asarray(self.fe_params.to_numpy()), self._cp, st,
                                 self.reml))
        k = st.n_cov_params
        if not np.all(np.isfinite(h)):
            return np.full((k, k), np.nan)
        try:
            w = np.linalg.eigvalsh(-h)
            if w.min() <= 0:
                return np.full((k, k), np.nan)
            return np.linalg.inv(-h)[:k, :k]
        except np.linalg.LinAlgError:
            return np.full((k, k), np.nan)

    def cov_params(self) -> pd.DataFrame:
        """Covariance of ``params``, with statsmodels' scaling.

        Fixed-effects block: ``scale (X'V⁻¹X)⁻¹`` (lme4's).  Variance block: the
        inverse observed information of the natural-scale variances divided by
        ``scale`` (so ``bse_re = sqrt(scale * diag)``, as in statsmodels).
        """
        k = self.k_fe + self.model.structure.n_cov_params
        out = np.zeros((k, k))
        out[: self.k_fe, : self.k_fe] = self._cov_fe
        out[self.k_fe :, self.k_fe :] = self._cov_var_natural / self.scale
        return pd.DataFrame(out, index=self.params.index, columns=self.params.index)

    @property
    def bse_fe(self) -> pd.Series:
        return pd.Series(np.sqrt(np.diag(self._cov_fe)), index=self.fe_params.index)

    @property
    def bse_re(self) -> pd.Series:
        return pd.Series(np.sqrt(np.diag(self._cov_var_natural)), index=self.params.index[self.k_fe :])

    @property
    def bse(self) -> pd.Series:
        return pd.Series(np.sqrt(np.diag(self.cov_params().to_numpy())), index=self.params.index)

    @property
    def tvalues(self) -> pd.Series:
        return self.params / self.bse

    @property
    def pvalues(self) -> pd.Series:
        """Two-sided normal p-values of ``tvalues`` (statsmodels' convention)."""
        return pd.Series(2 * stats.norm.sf(np.abs(self.tvalues.to_numpy())), index=self.params.index)

    def conf_int(self, alpha: float = 0.05, method: str = "wald", **kwargs: Any) -> pd.DataFrame:
        """Wald confidence intervals ``params ± z_{1-alpha/2} bse`` for every row of ``params``.

        ``method="profile"`` (lme4's profile intervals) or ``"boot"`` (parametric
        bootstrap percentiles) give lme4's rows instead: see :meth:`conf_int_lme4`.
        """
        if method != "wald":
            return self.conf_int_lme4(method, alpha, **kwargs)
        z = stats.norm.ppf(1 - alpha / 2)
        lo = self.params - z * self.bse
        hi = self.params + z * self.bse
        return pd.DataFrame({0: lo, 1: hi})

    # ------------------------------------------------------ random effects
    @functools.cached_property
    def _blups(self) -> tuple[np.ndarray, np.ndarray]:
        b = jax.device_get(_blups_jit(jnp.asarray(self.theta), self._cp, self.model.structure, self.reml))
        return np.asarray(b.b), np.asarray(b.cov)

    def _re_names(self, g: int) -> tuple[list[str], np.ndarray]:
        """Names of group g's random effects and their positions in the padded q columns."""
        names = list(self.model.exog_re_names)
        pos = list(range(self.k_re))
        off = self.k_re
        for v in self.model._vcs:
            nm = v.names[g]
            names += nm
            pos += list(range(off, off + len(nm)))
            off += v.size
        return names, np.array(pos, dtype=int)

    @property
    def random_effects(self) -> dict[Any, pd.Series]:
        """Conditional modes (BLUPs) per group: ``{group label: Series}`` (statsmodels' layout)."""
        b, _ = self._blups
        out = {}
        for g, lab in enumerate(self.model.group_labels):
            names, pos = self._re_names(g)
            out[lab] = pd.Series(b[g, pos], index=names)
        return out

    @property
    def random_effects_cov(self) -> dict[Any, pd.DataFrame]:
        """Conditional covariance of each group's random effects, ``scale Λ M⁻¹ Λᵀ`` (lme4's condVar)."""
        _, cov = self._blups
        out = {}
        for g, lab in enumerate(self.model.group_labels):
            names, pos = self._re_names(g)
            out[lab] = pd.DataFrame(cov[g][np.ix_(pos, pos)], index=names, columns=names)
        return out

    @functools.cached_property
    def fittedvalues(self) -> np.ndarray:
        """``X β̂ + Z b̂`` per row (conditional fitted values), in the model's row order."""
        b, _ = self._blups
        m = self.model
        return m.exog @ self.fe_params.to_numpy() + np.einsum("nq,nq->n", m._z, b[m._gi.codes])

    @property
    def resid(self) -> np.ndarray:
        return self.model.endog - self.fittedvalues

    # ----------------------------------------------------------- reporting
    def varcorr(self) -> pd.DataFrame:
        """Variances and covariances as lme4's ``as.data.frame(VarCorr(fit))``.

        Columns ``group, var1, var2, vcov, sdcor``: per term, the variances, then
        the covariances (``sdcor`` is then the correlation); the residual last.
        """
        m = self.model
        rows = []
        gname = getattr(m, "group_name", "Group")
        names = ["(Intercept)" if n == "Group" else n for n in m.exog_re_names]
        cov = self.cov_re.to_numpy()
        sd = np.sqrt(np.clip(np.diag(cov), 0, None))
        for i, n in enumerate(names):
            rows.append((gname, n, None, cov[i, i], sd[i]))
        for j in range(len(names)):
            for i in range(j + 1, len(names)):
                corr = cov[i, j] / (sd[i] * sd[j]) if sd[i] * sd[j] > 0 else np.nan
                rows.append((gname, names[j], names[i], cov[i, j], corr))
        for name, v in zip(m.structure.vc_names, self.vcomp, strict=True):
            rows.append((name, "(Intercept)", None, v, np.sqrt(max(v, 0.0))))
        rows.append(("Residual", None, None, self.scale, np.sqrt(self.scale)))
        return pd.DataFrame(rows, columns=["group", "var1", "var2", "vcov", "sdcor"])

    def summary(self, alpha: float = 0.05, ddf: str | None = None) -> Summary:
        """Summary in statsmodels' MixedLM layout (fixed effects, then ``Group Var`` rows).

        ``ddf="satterthwaite"`` or ``"kenward-roger"``: t tests of the fixed effects with
        lmerTest's denominator df (a ``df`` column; see :meth:`fe_table`).
        """
        m = self.model
        sizes = m.group_sizes
        info = [
            ("Model:", "MixedLM"),
            ("No. Observations:", str(self.nobs)),
            ("No. Groups:", str(self.ngroups)),
            ("Min. group size:", f"{sizes.min():.0f}"),
            ("Max. group size:", f"{sizes.max():.0f}"),
            ("Mean group size:", f"{sizes.mean():.1f}"),
            ("Dependent Variable:", str(m.endog_names)),
            ("Method:", self.method),
            ("Scale:", f"{self.scale:.4f}"),
            ("Log-Likelihood:", f"{self.llf:.4f}"),
            ("Converged:", "Yes" if self.converged else "No"),
            ("", ""),
        ]
        z = stats.norm.ppf(1 - alpha / 2)
        fe, se = self.fe_params.to_numpy(), self.bse_fe.to_numpy()
        tab = np.full((len(self.params), 6), np.nan)
        tab[: self.k_fe, 0] = fe
        tab[: self.k_fe, 1] = se
        tab[: self.k_fe, 2] = fe / se
        tab[: self.k_fe, 3] = 2 * stats.norm.sf(np.abs(fe / se))
        tab[: self.k_fe, 4] = fe - z * se
        tab[: self.k_fe, 5] = fe + z * se
        r, c = m.structure.re_tril
        tab[self.k_fe :, 0] = np.concatenate([self.cov_re.to_numpy()[r, c], self.vcomp])
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
        notes = []
        for key, val in self.residual_structure.items():
            if key == "sd_ratio":
                notes.append("Residual sd ratio (VarIdent): "
                             + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
            elif key == "phi":
                notes.append(f"Residual AR(1) correlation Phi: {val:.4f}")
        if self.singular:
            notes.append("The fit is singular (boundary estimate); see result.optim.")
        if not self.converged:
            notes.append(f"Not converged: {self.optim.message}.")
        return Summary("Mixed Linear Model Regression Results", info, df, "\n".join(notes))

    def __repr__(self) -> str:
        return f"<MixedLMResults {self.method} llf={self.llf:.4f} converged={self.converged}>"


class LmerResults(MixedLMResults):
    """Results of :func:`mixedjax.lmer`: lme4's layout over every random-effects term.

    ``varcorr()`` has one row per variance and covariance of each term (lme4's
    ``as.data.frame(VarCorr())``), ``random_effects`` is ``{grouping factor:
    DataFrame(levels x columns)}`` (lme4's ``ranef``), ``cov_terms`` is ``{term label:
    covariance DataFrame}``, and ``summary()`` prints one block per term.  ``cov_re``
    and ``vcomp`` keep statsmodels' meaning: the correlated block of the outer
    grouping factor, and the variance of every other term (``model.structure.vc_names``).
    """

    def _term_covs(self) -> list[tuple[Any, np.ndarray]]:
        _, corr, vc_terms = self.model._lmer_plan
        out = {}
        if corr is not None:
            out[id(corr)] = self.cov_re.to_numpy()
        for t, v in zip(vc_terms, self.vcomp, strict=True):
            out[id(t)] = np.array([[v]])
        return [(t, out[id(t)]) for t in self.model.lmer_terms]

    def _term_blups(self) -> list[tuple[Any, pd.DataFrame]]:
        outer, corr, vc_terms = self.model._lmer_plan
        b, _ = self._blups
        g = len(self.model.group_labels)
        labels = [str(v) for v in outer.levels]
        out = {}
        if corr is not None:
            out[id(corr)] = pd.DataFrame(b[:g, : corr.q], index=labels, columns=corr.names)
        off = self.k_re
        for t, v in zip(vc_terms, self.model._vcs, strict=True):
            if t.factor == outer.factor:
                out[id(t)] = pd.DataFrame({t.names[0]: b[:g, off]}, index=labels)
            else:
                vals = {}
                for gi, names in enumerate(v.names):
                    for j, nm in enumerate(names):
                        vals[nm] = b[gi, off + j]
                idx = [str(lv) for lv in t.levels]
                out[id(t)] = pd.DataFrame({t.names[0]: [vals.get(i, np.nan) for i in idx]}, index=idx)
            off += v.size
        return [(t, out[id(t)]) for t in self.model.lmer_terms]

    @property
    def cov_terms(self) -> dict[str, pd.DataFrame]:
        """Covariance matrix of each term's random effects (natural scale), by term label."""
        return {t.label: pd.DataFrame(c, index=t.names, columns=t.names) for t, c in self._term_covs()}

    @property
    def random_effects(self) -> dict[str, pd.DataFrame]:
        """Conditional modes (BLUPs) per grouping factor: ``{factor: DataFrame(levels x columns)}`` (lme4's ranef)."""
        out: dict[str, pd.DataFrame] = {}
        for t, df in self._term_blups():
            out[t.factor] = df if t.factor not in out else out[t.factor].join(df, how="outer")
        return out

    def varcorr(self) -> pd.DataFrame:
        """lme4's ``as.data.frame(VarCorr(fit))``: per term its variances, then covariances; the residual last."""
        rows = []
        for t, cov in self._term_covs():
            sd = np.sqrt(np.clip(np.diag(cov), 0, None))
            for i, n in enumerate(t.names):
                rows.append((t.label, n, None, cov[i, i], sd[i]))
            for j in range(len(t.names)):
                for i in range(j + 1, len(t.names)):
                    corr = cov[i, j] / (sd[i] * sd[j]) if sd[i] * sd[j] > 0 else np.nan
                    rows.append((t.label, t.names[j], t.names[i], cov[i, j], corr))
        rows.append(("Residual", None, None, self.scale, np.sqrt(self.scale)))
        return pd.DataFrame(rows, columns=["group", "var1", "var2", "vcov", "sdcor"])

    def _terms_text(self) -> str:
        lines = ["Random effects (one block per term):"]
        for t, cov in self._term_covs():
            n_lev = t.n_levels
            lines.append(f"  {t.label}  {t.source}  ({n_lev} levels)")
            sd = np.sqrt(np.clip(np.diag(cov), 0, None))
            lines.append(f"    {'':<20}{'Variance':>12}{'Std.Dev.':>12}  Corr")
            for i, n in enumerate(t.names):
                corr = " ".join(f"{cov[i, j] / (sd[i] * sd[j]):6.3f}" if sd[i] * sd[j] > 0 else "   nan"
                                for j in range(i))
                lines.append(f"    {n:<20}{cov[i, i]:>12.4f}{sd[i]:>12.4f}  {corr}".rstrip())
        lines.append(f"  Residual{'':<16}{self.scale:>12.4f}{np.sqrt(self.scale):>12.4f}")
        return "\n".join(lines)

    def summary(self, alpha: float = 0.05, ddf: str | None = None) -> Summary:
        """statsmodels' layout, then one block per random-effects term (lme4's VarCorr)."""
        s = super().summary(alpha, ddf=ddf)
        s.extra = self._terms_text() + ("\n" + s.extra if s.extra else "")
        return s
