"""The statsmodels-shaped model objects: :class:`LinearMixedModel` (shared by every backend), :class:`MixedLM`
and :func:`mixedlm`.

A model holds the data, a likelihood backend (:mod:`mixedjax.backends`) with its data
pytree, and the names of its terms; :meth:`LinearMixedModel.fit` runs the one fit
driver (:mod:`mixedjax.fit`) and returns the one results class
(:class:`mixedjax.results.MixedLMResults`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from . import formula as fml
from . import residuals, sharding, sources
from .backends import (
    GroupedBackend,
    GroupedModelData,
    fit_grouped,
    hessian_params_jit,
    loglike_params_jit,
    score_params_jit,
)
from .covariance import CovStructure, psd_cholesky_np
from .crossprod import ROWS_NOT_KEPT, aliased_from_gram
from .data import CrossProducts, GroupIndex, bucket, cross_products_jit, group_index, pad_groups, row_cross_products
from .fit import fit as fit_driver
from .many import fit_many
from .results import MixedLMResults

fit_theta = fit_grouped  # the jitted per-group fit of θ (public since 0.1: vmappable, differentiable)


@dataclass(frozen=True)
class TermInfo:
    """Names of one random-effects term, aligned with the backend's θ layout.

    ``label``: lme4's grouping name (``Subject``, ``cask:batch``); ``factor``: the grouping
    column(s); ``names``: lme4's column names (``(Intercept)``, ``Days``); ``levels``: the
    level labels (strings) in the backend's level order; ``source``: how it was written.
    """

    label: str
    factor: str
    names: tuple[str, ...]
    levels: tuple[str, ...]
    source: str = ""

    @property
    def q(self) -> int:
        return len(self.names)

    @property
    def n_levels(self) -> int:
        return len(self.levels)


def _is_factor_vc(values: np.ndarray) -> bool:
    """A variance component built from a factor's indicators (``0 + C(cask)``): one 1 per row."""
    nz = values != 0
    return bool(np.all((values == 0) | (values == 1)) and np.all(nz.sum(axis=1) <= 1))


def _level_of(column: str) -> str:
    """``C(cask)[a]`` or ``cask[T.a]`` -> ``a``."""
    m = re.search(r"\[(?:T\.)?([^\]]*)\]$", column)
    return m.group(1) if m else column


class LinearMixedModel:
    """What every model offers, whatever its backend: fit, likelihood at given parameters, many responses.

    Subclasses (:class:`MixedLM`, :class:`mixedjax.lmer.CrossedLM`) set ``backend``,
    ``backend_data``, ``term_info``, ``endog``, ``exog``, ``exog_names``, ``weights``,
    ``nobs``, ``k_fe`` and the naming conventions (``api``: ``"statsmodels"`` or ``"lme4"``).
    """

    api = "statsmodels"
    residual: Any = None
    formula: str | None = None
    data: pd.DataFrame | None = None
    designs: dict | None = None
    reml = True
    refit_formula: Any = None  # lmer models: (formula, reml) -> results on the same data (ranova)

    # ------------------------------------------------------------------ names and packing
    @property
    def n_cov_params(self) -> int:
        return sum(t.n_theta for t in self.backend.terms)

    @property
    def residual_param_names(self) -> list[str]:
        return self.backend.rho_names(None if self.residual is None else self.residual.strata_labels)

    def cov_param_names(self) -> list[str]:
        """Names of the variance rows of ``params``: statsmodels' (``Group Var``, ``Group x Time Cov``)."""
        out = []
        for t, info in zip(self.backend.terms, self.term_info, strict=True):
            r, c = t.positions()
            for i, j in zip(r, c, strict=True):
                out.append(f"{info.label} {info.names[i]} Var" if i == j else
                           f"{info.label} {info.names[j]} x {info.names[i]} Cov")
        return out

    @property
    def param_names(self) -> list[str]:
        """Names of ``params``: fixed effects, variance parameters, residual-structure parameters."""
        return list(self.exog_names) + self.cov_param_names() + self.residual_param_names

    def _reml(self, reml: bool | None) -> bool:
        return self.reml if reml is None else bool(reml)

    def _check_params(self, params: Any) -> jnp.ndarray:
        pv = np.asarray(params, dtype=float).ravel()
        expected = self.k_fe + self.n_cov_params + self.backend.n_rho
        if pv.size != expected:
            raise ValueError(f"params has {pv.size} entries; this model packs {expected} ({self.k_fe} fixed effects, "
                             f"{self.n_cov_params} variance parameters, {self.backend.n_rho} residual parameters)")
        return jnp.asarray(pv)

    # ------------------------------------------------------------------------ likelihood
    def loglike(self, params: Any, reml: bool | None = None, profile_fe: bool = True) -> float:
        """Log-likelihood at statsmodels-packed ``params``, the scale profiled out.

        ``params`` = fixed effects, each term's ``cov / scale`` lower triangle (row-major;
        statsmodels' ``cov_re / scale`` then ``vcomp / scale``), then residual-structure
        parameters on their natural scale (sd ratios, AR(1) φ).  With ``profile_fe``
        (statsmodels' default) the fixed effects are replaced by their GLS estimate.
        ``reml`` defaults to the criterion of the model's last fit (REML before any fit).
        """
        return float(loglike_params_jit(self.backend, self._check_params(params), self.backend_data,
                                        self._reml(reml), profile_fe, self.k_fe))

    def score(self, params: Any, reml: bool | None = None, profile_fe: bool = True) -> np.ndarray:
        """Gradient of :meth:`loglike` with respect to the packed ``params`` (autodiff).

        Differentiates through the square-root factor of ``cov / scale``, so it is NaN
        where a variance in ``params`` is exactly 0 (the factor is not differentiable
        there); :mod:`mixedjax.lindstrom_bates` has closed forms.
        """
        return np.asarray(score_params_jit(self.backend, self._check_params(params), self.backend_data,
                                           self._reml(reml), profile_fe, self.k_fe))

    def hessian(self, params: Any, reml: bool | None = None, profile_fe: bool = False) -> np.ndarray:
        """Hessian of :meth:`loglike` with respect to the packed ``params`` (autodiff).

        By default the fixed effects are not profiled, so the matrix has the
        fixed-effects block statsmodels' ``hessian`` has.
        """
        return np.asarray(hessian_params_jit(self.backend, self._check_params(params), self.backend_data,
                                             self._reml(reml), profile_fe, self.k_fe))

    # ------------------------------------------------------------------------------- fit
    def start_from_params(self, params: Any) -> np.ndarray:
        """``concat(θ, ρ)`` from statsmodels-packed ``params`` (or an earlier result)."""
        pv = np.asarray(self._check_params(getattr(params, "params", params)))
        parts, off = [], self.k_fe
        for t in self.backend.terms:
            cov = np.zeros((t.q, t.q))
            r, c = t.positions()
            cov[r, c] = pv[off : off + t.n_theta]
            cov[c, r] = pv[off : off + t.n_theta]
            lam = np.diag(np.sqrt(np.clip(np.diag(cov), 0, None))) if t.diagonal else _psd_factor(cov)
            parts.append(lam[r, c])
            off += t.n_theta
        parts.append(np.asarray(self.backend.rho_from_natural(pv[off:])))
        return np.concatenate(parts)

    def fit_options(self, maxiter: int | None, gtol: float | None, em_iter: int | None) -> dict:
        out = {}
        if maxiter is not None:
            out["maxiter"] = int(maxiter)
        if gtol is not None:
            out["gtol"] = float(gtol)
        if em_iter is not None:
            out["em_iter"] = int(em_iter)
        return out

    def fit(self, reml: bool = True, start_params: Any = None, maxiter: int | None = None,
            gtol: float | None = None, em_iter: int | None = None, **options: Any) -> MixedLMResults:
        """Fit by REML (default) or ML with the backend's optimiser (:func:`mixedjax.fit.fit`).

        Parameters
        ----------
        reml : bool
            Restricted maximum likelihood (default) or maximum likelihood.
        start_params : array_like or MixedLMResults, optional
            Starting values in statsmodels' packing (``result.params`` of an earlier
            fit restarts from it), or an earlier result.  Default: lme4's start, Λ = I.
        maxiter : int
            Maximum BFGS iterations (per-group models, default 200) or deviance
            evaluations (crossed models, default 1000).
        gtol : float
            Per-group models: convergence when the largest absolute gradient entry of the
            profiled deviance D with respect to θ is below ``gtol * max(1, |D| / 1e4)``
            (default 1e-6): absolute for deviances up to 1e4 (fits of up to a few thousand
            rows), relative to the deviance beyond, where its rounding noise grows with the
            rows (:func:`mixedjax.optimize.tol_scale`).  A fit whose deviance can no longer be
            decreased in float64, with the gradient below ``sqrt(gtol)`` on that scale, also
            counts as converged (``Result.NO_PROGRESS``).
        em_iter : int
            Per-group models: maximum EM warm-start iterations (0 disables the warm start).
        **options
            Crossed models: ``ftol``, the predicted decrease of the deviance at which the
            derivative-free search hands over to its Newton polish, and ``xtol``, the Newton step
            below which the polish stops (see ``CrossedLM.default_options`` and :mod:`mixedjax.dfo`).

        Returns
        -------
        MixedLMResults
            Warns with :class:`mixedjax.ConvergenceWarning` when the fit did not
            converge or is singular (a variance estimate on the boundary, 0).
        """
        self.reml = bool(reml)
        if start_params is None:
            start = self.default_start()
        elif isinstance(start_params, MixedLMResults):
            start = start_params.fitted.theta_full
        else:
            start = self.start_from_params(start_params)
        opts = {**self.default_options(), **self.fit_options(maxiter, gtol, em_iter), **options}
        fm = fit_driver(self.backend, self.backend_data, self.reml, start, rows=self.rows_data, **opts)
        return MixedLMResults(self, fm)

    def default_start(self) -> np.ndarray | None:
        return None

    def default_options(self) -> dict:
        return {}

    def fit_many(self, y: Any, reml: bool = True, maxiter: int = 200, gtol: float = 1e-6,
                 em_iter: int = 30, batch_size: int | None = None, progress: bool | None = None,
                 shard: bool = True, working: int | None = None) -> Any:
        """Fit one model per column of ``y`` (an (nobs, M) array or column names) in one vmapped call.

        NaN in a column drops those rows for that model only (``n_dropped`` in the
        results).  ``batch_size`` chunks the model axis to bound memory (one
        compiled program for all chunks), with a progress bar when interactive
        (``progress``); with several devices each chunk is sharded across them.
        ``working`` is the width of the optimiser's working set: it changes the speed,
        not the results.  Returns a :class:`mixedjax.batch.BatchResults` with arrays over
        the model axis (``fe_params [M, p]``, ``cov_re [M, q, q]``, ``llf``, ``converged``,
        ...), ``to_frame()`` and ``result_for(m)``.

        Examples
        --------
        >>> import mixedjax, numpy as np
        >>> d = mixedjax.datasets.load("sleepstudy")
        >>> md = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", re_formula="~Days")
        >>> Y = np.column_stack([d.Reaction, d.Reaction * 2.0])
        >>> res = md.fit_many(Y)
        >>> res.fe_params.shape, bool(res.converged.all())
        ((2, 2), True)
        """
        if not self.rows_in_memory:
            raise NotImplementedError(ROWS_NOT_KEPT.format(what="fit_many (new responses)"))
        return fit_many(self, y, reml=reml, maxiter=maxiter, gtol=gtol, em_iter=em_iter, batch_size=batch_size,
                        progress=progress, shard=shard, working=working)

    @property
    def response_ss(self) -> float:
        """``Σ w y²``: a fingerprint of the response (likelihood-ratio tests check it for models without rows)."""
        if getattr(self, "endog", None) is None:
            return float(self.sums_gram[-1, -1])
        w = 1.0 if self.weights is None else np.asarray(self.weights, float)
        return float(np.sum(w * np.asarray(self.endog, float) ** 2))

    @property
    def fixed_gram(self) -> np.ndarray:
        """``XᵀWX (p, p)`` of the fixed effects (from the cross-products for models without rows)."""
        if getattr(self, "exog", None) is None:
            q = self.sums_gram.shape[0] - self.k_fe - 1
            return self.sums_gram[q : q + self.k_fe, q : q + self.k_fe]
        x = np.asarray(self.exog, float)
        w = np.ones(len(x)) if self.weights is None else np.asarray(self.weights, float)
        return x.T @ (w[:, None] * x)

    @property
    def rows_in_memory(self) -> bool:
        """Whether the model holds its rows (``False`` for a model built from cross-products only: a Parquet
        path, a Dask DataFrame or ``distributed=True``)."""
        return getattr(self, "endog", None) is not None

    def rows_data(self) -> Any:
        """The backend's data with the rows, for features that need them (:meth:`MixedLM.rows_data`)."""
        return self.backend_data

    def shard(self, mesh: Any = None) -> LinearMixedModel:
        """Lay the group axis of this per-group model over several devices (``jax.sharding``); returns ``self``.

        The cross-products (and the padded rows, if the model has them) are sharded over a
        1-D mesh named ``groups`` (default: every local device), so every evaluation of the
        likelihood computes each group where it lives and the sums over groups become one
        all-reduce.  Fits, standard errors, tests and BLUPs are those of one device (the sums
        are only reordered).  Crossed models have no group axis (``NotImplementedError``).

        Examples
        --------
        >>> import mixedjax
        >>> d = mixedjax.datasets.load("sleepstudy")
        >>> md = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", re_formula="~Days").shard()
        >>> round(md.fit().llf, 4)
        -871.8141
        """
        if getattr(self.backend, "kind", None) != "grouped":
            raise NotImplementedError("sharding the group axis needs a per-group model; crossed random effects "
                                      "have no group axis")
        self.backend_data = sharding.shard_grouped(self.rows_data(), mesh)
        return self


def _psd_factor(cov: np.ndarray) -> np.ndarray:
    return psd_cholesky_np(cov)


def _names_of(x: Any, default: str, k: int) -> list[str]:
    if isinstance(x, pd.DataFrame):
        return [str(c) for c in x.columns]
    if isinstance(x, pd.Series) and x.name is not None:
        return [str(x.name)]
    return [f"{default}{i + 1}" for i in range(k)] if k > 1 or default != "y" else ["y"]


def _as_2d(x: Any, what: str, nobs: int) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be numeric: {e}") from e
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] != nobs:
        raise ValueError(f"{what} has shape {a.shape}; expected ({nobs}, k) to match endog")
    return a


class MixedLM(LinearMixedModel):
    """Linear mixed effects model, as statsmodels' ``MixedLM``, on a pure-JAX likelihood.

    For group i, ``y_i = X_i β + Z_i b_i + ε_i`` with ``b_i ~ N(0, cov_re)`` for the
    ``exog_re`` columns (plus independent variance components from ``exog_vc``)
    and ``ε_i ~ N(0, scale / w)`` with prior weights ``w`` (lme4's convention).

    Parameters
    ----------
    endog : (nobs,) array_like
        Response.
    exog : (nobs, p) array_like
        Fixed-effects design (include a constant column for an intercept).
    groups : (nobs,) array_like
        Group labels; groups are independent.
    exog_re : (nobs, q) array_like, optional
        Random-effects design; default a random intercept per group.
    exog_vc : dict, optional
        statsmodels' variance-components layout: ``exog_vc[name][group]`` is an
        ``(n_group, k)`` matrix whose columns get iid random effects with one
        variance per ``name``.
    weights : (nobs,) array_like, optional
        Positive prior weights: the residual variance of row i is ``scale / w_i``.
    missing : {"raise", "drop"}
        What to do with NaN/inf.

    Examples
    --------
    >>> import mixedjax
    >>> data = mixedjax.datasets.load("dietox")
    >>> md = mixedjax.mixedlm("Weight ~ Time", data, groups=data["Pig"])
    >>> mdf = md.fit()
    >>> round(mdf.llf, 3)
    -2404.775
    """

    def __init__(
        self,
        endog: Any,
        exog: Any,
        groups: Any,
        exog_re: Any = None,
        exog_vc: Mapping[str, Mapping[Any, Any]] | None = None,
        weights: Any = None,
        missing: str = "raise",
        residual: Any = None,
        *,
        _vc_designs: list[fml.VCDesign] | None = None,
        _names: dict | None = None,
        _group_index: GroupIndex | None = None,
    ) -> None:
        names = dict(_names or {})
        y_raw = endog
        if isinstance(y_raw, pd.DataFrame):
            if y_raw.shape[1] != 1:
                raise ValueError(f"endog must be one column, got {y_raw.shape[1]}")
            y_raw = y_raw.iloc[:, 0]
        if isinstance(y_raw, pd.Series) and not pd.api.types.is_numeric_dtype(y_raw):
            raise ValueError(f"the response {y_raw.name!r} is not numeric (dtype {y_raw.dtype})")
        try:
            y = np.asarray(y_raw, dtype=float).reshape(-1)
        except (TypeError, ValueError) as e:
            raise ValueError(f"the response is not numeric: {e}") from e
        nobs = y.shape[0]
        if nobs == 0:
            raise ValueError("no observations: the data are empty")
        x = _as_2d(exog, "exog", nobs)
        groups_arr = pd.Series(groups).reset_index(drop=True) if not isinstance(groups, pd.Series) else \
            groups.reset_index(drop=True)
        if len(groups_arr) != nobs:
            raise ValueError(f"groups has length {len(groups_arr)}; the data have {nobs} rows")
        if exog_re is None:
            z_re = np.ones((nobs, 1))
            re_names = ["Group"]
        else:
            z_re = _as_2d(exog_re, "exog_re", nobs) if np.size(exog_re) else np.zeros((nobs, 0))
            re_names = names.get("exog_re_names") or _names_of(exog_re, "z", z_re.shape[1])
        w = np.ones(nobs) if weights is None else np.asarray(weights, dtype=float).reshape(-1)
        if w.shape[0] != nobs:
            raise ValueError(f"weights has length {w.shape[0]}; the data have {nobs} rows")
        bound = residual if isinstance(residual, residuals.BoundResidual) else residuals.bind(residual, None, nobs)

        # non-finite values (the array path; the formula path checked and named columns already)
        bad = ~np.isfinite(y) | ~np.all(np.isfinite(x), axis=1) | ~np.all(np.isfinite(z_re), axis=1) \
            | ~np.isfinite(w) | groups_arr.isna().to_numpy()
        if bad.any():
            if missing != "drop":
                raise ValueError(f"{int(bad.sum())} row(s) have NaN or infinite values in endog, exog, "
                                 "exog_re, weights or groups; pass missing='drop' to drop them")
            keep = ~bad
            y, x, z_re, w = y[keep], x[keep], z_re[keep], w[keep]
            groups_arr = groups_arr[keep].reset_index(drop=True)
            if bound is not None:
                bound = bound._replace(strata=None if bound.strata is None else bound.strata[keep],
                                       time=None if bound.time is None else bound.time[keep])
            if _vc_designs:
                raise ValueError("cannot drop rows after variance components were built")
            nobs = y.shape[0]
            if nobs == 0:
                raise ValueError("no observations left after dropping missing values")
        if np.any(w <= 0):
            i = int(np.flatnonzero(w <= 0)[0])
            raise ValueError(f"weights must be positive: {int(np.sum(w <= 0))} are zero or negative "
                             f"(first at row {i}, value {w[i]})")

        self.endog_names = names.get("endog_names") or _names_of(endog, "y", 1)[0]
        self.exog_names = names.get("exog_names") or _names_of(exog, "x", x.shape[1])
        self.exog_re_names = list(re_names)
        aliased = fml.aliased_columns(x, self.exog_names)
        if aliased:
            raise ValueError(f"the fixed-effects design is rank deficient: column(s) {aliased} are "
                             "linear combinations of the others (aliased); drop them or recode")
        if nobs <= x.shape[1]:
            raise ValueError(f"{nobs} observations cannot identify {x.shape[1]} fixed effects and a residual "
                             "variance")

        gi = _group_index if _group_index is not None and not bad.any() else group_index(groups_arr)
        if bound is not None and bound.spec.ar1:  # AR(1): rows of a group in time order
            gi = gi.with_position(residuals.time_positions(gi.codes, bound.time))
        self.residual = bound
        self.group_labels = gi.labels
        self.n_groups = len(gi.labels)
        if z_re.shape[1]:
            if gi.n_max < z_re.shape[1]:
                raise ValueError(
                    f"the random-effects design has {z_re.shape[1]} columns {self.exog_re_names} but the "
                    f"largest group has {gi.n_max} row(s): no group can identify them")
            aliased_re = fml.aliased_columns(z_re, self.exog_re_names)
            if aliased_re:
                raise ValueError(f"the random-effects design is rank deficient: column(s) {aliased_re} are "
                                 "linear combinations of the others")

        vcs = list(_vc_designs or [])
        if exog_vc:
            for name, blocks in exog_vc.items():
                vcs.append(fml.vc_from_dict(str(name), blocks, gi.labels, gi.codes, nobs))
        if z_re.shape[1] == 0 and not vcs:
            raise ValueError("the model has no random effects: give exog_re, re_formula or variance components")
        self.structure = CovStructure(
            q_re=z_re.shape[1],
            vc_sizes=tuple(v.size for v in vcs),
            re_names=tuple(self.exog_re_names),
            vc_names=tuple(v.name for v in vcs),
        )
        z = np.concatenate([z_re] + [v.values for v in vcs], axis=1) if vcs else z_re
        self.endog, self.exog, self.exog_re, self.weights = y, x, z_re, w
        self.groups = groups_arr.to_numpy()
        self.nobs = nobs
        self.k_fe = x.shape[1]
        self.k_re = z_re.shape[1]
        self.k_re2 = self.k_re * (self.k_re + 1) // 2
        self.k_vc = len(vcs)
        self.group_sizes = gi.sizes

        g_pad = bucket(self.n_groups)
        zmask = np.zeros((g_pad, self.structure.q))
        zmask[: self.n_groups, : self.k_re] = 1.0
        off = self.k_re
        vc_group, vc_col = [], []
        for v in vcs:
            gs, cs = [], []
            for g, nm in enumerate(v.names):
                zmask[g, off : off + len(nm)] = 1.0
                gs += [g] * len(nm)
                cs += list(range(off, off + len(nm)))
            vc_group.append(jnp.asarray(np.array(gs, dtype=np.int32)))
            vc_col.append(jnp.asarray(np.array(cs, dtype=np.int32)))
            off += v.size
        self.group_index = gi
        self.vc_designs = vcs
        self.exog_vc_matrix = z[:, self.k_re :]
        self.backend = GroupedBackend(self.structure, None if bound is None else bound.spec)
        if bound is None:  # iid: the fit needs only the cross-products; the rows are padded on first use
            cp = row_cross_products(gi.codes, y, x, z, None if weights is None else w, g_pad)
            self.backend_data = GroupedModelData(None, cp, jax.device_put(np.asarray(zmask)), None, None, None,
                                                 tuple(vc_group), tuple(vc_col))
        else:
            self.backend_data = self._laid_out(jnp.asarray(zmask), tuple(vc_group), tuple(vc_col), None)
        self._rows_data: GroupedModelData | None = None
        self.group_name = names.get("group_name") or (
            str(groups.name) if isinstance(groups, pd.Series) and groups.name is not None else "Group")
        self.formula: str | None = names.get("formula")
        self.data: pd.DataFrame | None = None
        self.designs: dict | None = None
        self.lmer_terms: list | None = None
        self.set_term_info()

    def _laid_out(self, zmask: Any, vc_group: tuple, vc_col: tuple, cp: CrossProducts | None) -> GroupedModelData:
        """The backend's data with the rows padded per group (``cp``: their cross-products, if already made)."""
        gi = self.group_index
        g_pad, n_pad = int(zmask.shape[0]), bucket(gi.n_max)
        z = np.concatenate([self.exog_re, self.exog_vc_matrix], axis=1)
        padded = pad_groups(gi, self.endog, self.exog, z, self.weights, g_pad, n_pad)
        strata = np.zeros((g_pad, n_pad), dtype=np.int64)
        if self.residual is not None and self.residual.strata is not None:
            strata[gi.codes, gi.position] = self.residual.strata
        return GroupedModelData(padded, cross_products_jit(padded) if cp is None else cp, zmask, jnp.asarray(strata),
                                jnp.asarray(gi.codes.astype(np.int32)), jnp.asarray(gi.position.astype(np.int32)),
                                vc_group, vc_col)

    def rows_data(self) -> GroupedModelData:
        """:attr:`backend_data` with the rows laid out per group (padded), for the features that need rows
        (fitted values, simulation, bootstrap, Kenward–Roger, new responses): made on first use and kept.
        A model with iid residuals fits from its cross-products alone (no sort or padding of the rows)."""
        d = self.backend_data
        if d.padded is not None or self.endog is None:  # laid out already, or no rows (built from sums)
            return d
        if self._rows_data is None or self._rows_data.cp is not d.cp:
            self._rows_data = self._laid_out(d.zmask, d.vc_group, d.vc_col, d.cp)
        return self._rows_data

    def set_term_info(self, lme4_labels: dict | None = None) -> None:
        """Names of the terms (:class:`TermInfo`), in the backend's θ order: the correlated block, then each
        variance component (``cask:Group`` levels for a factor's indicators).  ``lme4_labels`` (lmer models):
        the lme4 label of each variance component, by its name."""
        labels = np.asarray(self.group_labels, dtype=object).astype(str).tolist()
        info = []
        if self.k_re:
            names = tuple("(Intercept)" if n in ("Group", "Intercept") else n for n in self.exog_re_names)
            info.append(TermInfo(self.group_name, self.group_name, names, tuple(labels)))
        for v in self.vc_designs:
            factor = _is_factor_vc(v.values)
            levels = []
            for g, nm in enumerate(v.names):
                levels += [f"{_level_of(col)}:{labels[g]}" if factor else labels[g] for col in nm]
            if lme4_labels and v.name in lme4_labels:
                label, col = lme4_labels[v.name]
            elif factor:
                label, col = f"{v.name}:{self.group_name}", "(Intercept)"
            else:
                label, col = self.group_name, (v.names[0][0] if v.names and v.names[0] else v.name)
            info.append(TermInfo(label, label, (col,), tuple(levels), v.name))
        self.term_info = info

    def cov_param_names(self) -> list[str]:
        """statsmodels' names for the variance rows: ``Group Var``, ``Group x Time Cov``, ``cask Var``."""
        return self.structure.cov_param_names()

    # statsmodels' names of the layout
    @property
    def groups_codes(self) -> np.ndarray:
        return self.group_index.codes

    def default_options(self) -> dict:
        return {"maxiter": 200, "gtol": 1e-6, "em_iter": 30 if self.residual is None else 50}

    @classmethod
    def from_sums(cls, acc: sources.Accumulated, *, endog_name: str, exog_names: list[str],
                  exog_re_names: list[str], k_re: int, vc_names: tuple[str, ...] = (), group_name: str = "Group",
                  formula: str | None = None) -> MixedLM:
        """A model from per-group cross-products alone (:class:`mixedjax.sources.Accumulated`): no rows kept.

        The Z columns are the ``k_re`` columns of the correlated block, then one column per
        variance component in ``vc_names`` (present in every group).  The checks of the
        in-memory constructor (aliased fixed or random effects, groups too small for the
        random-effects block) are made on the summed cross-products.  Features that need no
        rows work (fit, summary, Wald and Satterthwaite tests, profile intervals, LRT, BLUPs,
        prediction for new data); those that need them (``fittedvalues``, ``resid``,
        ``simulate``, ``bootstrap``, Kenward–Roger, ``fit_many``) raise ``NotImplementedError``.
        """
        q, p = acc.q, acc.p
        nobs, labels = acc.nobs, list(acc.labels)
        gram = acc.gram
        aliased = aliased_from_gram(gram[q : q + p, q : q + p], list(exog_names), nobs)
        if aliased:
            raise ValueError(f"the fixed-effects design is rank deficient: column(s) {aliased} are "
                             "linear combinations of the others (aliased); drop them or recode")
        if nobs <= p:
            raise ValueError(f"{nobs} observations cannot identify {p} fixed effects and a residual variance")
        if q == 0:
            raise ValueError("the model has no random effects: give re_formula or random-effects terms")
        if k_re:
            n_max = int(acc.n.max())
            if n_max < k_re:
                raise ValueError(f"the random-effects design has {k_re} columns {list(exog_re_names)} but the "
                                 f"largest group has {n_max} row(s): no group can identify them")
            aliased_re = aliased_from_gram(gram[:k_re, :k_re], list(exog_re_names), nobs)
            if aliased_re:
                raise ValueError(f"the random-effects design is rank deficient: column(s) {aliased_re} are "
                                 "linear combinations of the others")
        self = cls.__new__(cls)
        g = len(labels)
        self.endog_names, self.exog_names, self.exog_re_names = endog_name, list(exog_names), list(exog_re_names)
        self.residual = None
        self.group_labels, self.n_groups = labels, g
        self.structure = CovStructure(q_re=k_re, vc_sizes=(1,) * len(vc_names), re_names=tuple(exog_re_names),
                                      vc_names=tuple(vc_names))
        self.endog = self.exog = self.exog_re = self.weights = self.groups = None
        self.nobs, self.k_fe, self.k_re = nobs, p, k_re
        self.k_re2 = k_re * (k_re + 1) // 2
        self.k_vc = len(vc_names)
        self.group_sizes = np.asarray(acc.n, dtype=float)
        self.group_index = None
        self.vc_designs = [fml.VCDesign(str(v), np.zeros((0, 1)), [[str(v)] for _ in range(g)]) for v in vc_names]
        self.exog_vc_matrix = None
        mesh = sharding.group_mesh() if acc.distributed else None
        cp = sharding.cross_products(acc.packed, p, acc.z_index, bucket(g), mesh)
        g_pad = int(cp.n.shape[0])
        zmask = np.zeros((g_pad, q))
        zmask[:g] = 1.0
        vc_group = [np.arange(g, dtype=np.int32) for _ in vc_names]
        vc_col = [np.full(g, k_re + k, dtype=np.int32) for k in range(len(vc_names))]
        if mesh is None:
            zmask_a, vg, vcol = jnp.asarray(zmask), [jnp.asarray(v) for v in vc_group], [jnp.asarray(v) for v in vc_col]
        else:
            zmask_a = sharding.global_array(zmask, mesh, by_group=True)
            vg = [sharding.global_array(v, mesh, by_group=False) for v in vc_group]
            vcol = [sharding.global_array(v, mesh, by_group=False) for v in vc_col]
        self.backend = GroupedBackend(self.structure, None)
        self.backend_data = GroupedModelData(None, cp, zmask_a, None, None, None, tuple(vg), tuple(vcol))
        self._rows_data = None
        self.group_name = group_name
        self.formula = formula
        self.data = None
        self.designs = None
        self.lmer_terms = None
        self.source = ""
        self.sums_gram = gram  # Σ_g [Z X y]ᵀ W [Z X y]: totals for rank checks and likelihood-ratio tests
        self.set_term_info()
        return self

    @classmethod
    def from_source(cls, formula: str, data: Any, groups: str, re_formula: str | None = None,
                    vc_formula: Mapping[str, str] | None = None, weights: str | None = None, missing: str = "raise",
                    residual: Any = None, batch_size: int | None = None, distributed: bool = False) -> MixedLM:
        """:func:`mixedlm` on data that are not held in memory (a Parquet path, a Dask DataFrame, or with
        ``distributed`` this process's rows): the per-group cross-products are accumulated piece by piece
        (:mod:`mixedjax.sources`) and the model keeps only them."""
        if residual is not None:
            raise NotImplementedError("structured residuals (VarIdent, AR1) need the rows in memory (their "
                                      "cross-products change with the residual parameters): fit them to a pandas "
                                      "DataFrame")
        if vc_formula:
            raise NotImplementedError("variance components (vc_formula) are not implemented for data out of memory: "
                                      "use random-effects terms on the grouping factor (re_formula, or lmer's "
                                      "(1 | g) + (0 + x | g)), or fit a pandas DataFrame")
        if not isinstance(groups, str):
            raise ValueError(f"with data out of memory, groups must be a column name, got {type(groups).__name__}")
        if weights is not None and not isinstance(weights, str):
            raise ValueError("with data out of memory, weights must be a column name")
        if "~" not in formula:
            raise ValueError(f"formula {formula!r} has no '~': write it as 'response ~ terms'")
        lhs, rhs = formula.split("~", 1)
        yname = lhs.strip()
        re_f = "1" if re_formula is None else re_formula
        no_re = fml.as_rhs(re_f) in ("0", "-1")
        src = sources.prepare(data, yname, rhs, [] if no_re else [re_f], groups, weights=weights, missing=missing,
                              batch_size=batch_size, distributed=distributed)
        if src.fixed_design.shape[1] == 0:
            raise ValueError(f"formula {formula!r} has no fixed effects; mixedjax needs at least one")
        zdf = None if no_re else src.random_designs[0]
        zcols = [] if zdf is None else list(zdf.columns)
        acc = src.accumulate([(0, j) for j in range(len(zcols))])
        model = cls.from_sums(acc, endog_name=yname, exog_names=list(src.fixed_design.columns),
                              exog_re_names=["Group" if c == "Intercept" else c for c in zcols], k_re=len(zcols),
                              group_name=groups, formula=formula)
        model.designs = {"fe": src.fixed_design, "re": zdf, "vc": {}}
        model.re_formula = re_formula
        model.vc_formula = {}
        model.source = src.description
        return model

    @classmethod
    def from_formula(
        cls,
        formula: str,
        data: pd.DataFrame,
        groups: Any,
        re_formula: str | None = None,
        vc_formula: Mapping[str, str] | None = None,
        weights: Any = None,
        missing: str = "raise",
    ) -> MixedLM:
        """See :func:`mixedlm`."""
        return mixedlm(formula, data, groups, re_formula=re_formula, vc_formula=vc_formula,
                       weights=weights, missing=missing)

    def term_rows(self, data: pd.DataFrame, which: Any = None) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Each random-effects term's design on new data: ``(z_k (n, q_k), level label of each row (n,))``.

        Aligned with :attr:`term_info`; a row's label is a string of ``term_info[k].levels``
        when the fit saw that level (``"a:A"`` for a factor variance component: level
        ``a`` of ``cask`` in group ``A``), another string (or ``""``: no column of the
        component) when not.  Rebuilt with the formula specs stored at fit time
        (``designs``), or lmer's bars for lmer-built models.  ``which``: indices of the
        terms to build (default all); the others are ``None``.

        Examples
        --------
        >>> import mixedjax, pandas as pd
        >>> d = mixedjax.datasets.load("sleepstudy")
        >>> md = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", re_formula="~Days")
        >>> [(z.tolist(), list(lab)) for z, lab in md.term_rows(pd.DataFrame({"Days": [2.0], "Subject": ["308"]}))]
        [([[1.0, 2.0]], ['308'])]
        """
        builder = getattr(self, "term_rows_builder", None)
        if builder is not None:  # lmer-built (lmer.lmer_term_rows)
            return builder(self, data, which)
        if not isinstance(data, pd.DataFrame):
            raise ValueError(f"the random-effects design needs new data as a DataFrame, got {type(data).__name__}")
        wanted = set(range(len(self.term_info))) if which is None else {int(k) for k in which}
        out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(self.term_info)
        if not wanted:
            return out
        designs = self.designs or {}
        if not designs:
            raise NotImplementedError("the random-effects design of a model built from arrays (MixedLM(...)) "
                                      "cannot be rebuilt for new data: build it with mixedjax.mixedlm(formula, ...)")
        gname = self.group_name
        if gname not in data.columns:
            raise ValueError(f"the random effects of new data need the group column {gname!r}; "
                             f"available: {list(data.columns)}")
        groups = np.array([str(v) for v in data[gname].to_numpy()], dtype=object)
        n = len(data)
        k = 0
        if self.k_re:
            if 0 in wanted:
                spec = designs.get("re")
                if spec is not None:
                    z = fml.design_like(spec, data).to_numpy()
                elif list(self.exog_re_names) == ["Group"]:
                    z = np.ones((n, 1))
                else:
                    raise NotImplementedError("the random-effects design (exog_re) was given as an array: it "
                                              "cannot be rebuilt for new data")
                out[0] = (z, groups)
            k = 1
        for v in self.vc_designs:
            if k in wanted:
                spec = designs.get("vc", {}).get(v.name)
                if spec is None:
                    raise NotImplementedError(f"the variance component {v.name!r} was given as arrays (exog_vc): "
                                              "it cannot be rebuilt for new data")
                vdf = fml.design_like(spec, data)
                vals, cols = vdf.to_numpy(), list(vdf.columns)
                if _is_factor_vc(v.values):
                    nz = vals != 0
                    if np.any(nz.sum(axis=1) > 1):
                        raise ValueError(f"the variance component {v.name!r} has several non-zero columns in a "
                                         "row of the new data; at fit time it was a factor's indicators")
                    j = np.argmax(nz, axis=1)
                    has = nz.any(axis=1)
                    z = np.where(has, vals[np.arange(n), j], 0.0)[:, None]
                    labels = np.array([f"{_level_of(cols[c])}:{g}" if h else "" for c, g, h in
                                       zip(j, groups, has, strict=True)], dtype=object)
                elif vals.shape[1] == 1:
                    z, labels = vals[:, :1], groups
                else:
                    raise NotImplementedError(f"the variance component {v.name!r} is neither a factor's indicators "
                                              f"nor one column ({cols}): its random effects cannot be matched to "
                                              "new data")
                out[k] = (z, labels)
            k += 1
        return out


def mixedlm(
    formula: str,
    data: pd.DataFrame,
    groups: Any,
    re_formula: str | None = None,
    vc_formula: Mapping[str, str] | None = None,
    weights: Any = None,
    missing: str = "raise",
    residual: Any = None,
    *,
    batch_size: int | None = None,
    distributed: bool = False,
) -> MixedLM:
    """Build a :class:`MixedLM` from a formula, as ``statsmodels.formula.api.mixedlm``.

    Parameters
    ----------
    formula : str
        Fixed effects, e.g. ``"Weight ~ Time + C(Evit)"`` (formulaic syntax:
        categoricals in their pandas category order, interactions, ``np.log(x)``).
    data : pandas.DataFrame, Parquet path or Dask DataFrame
        Never modified.  A Parquet file or directory (``str``/``os.PathLike``, or a list
        of them) is read in row batches with pyarrow, and a Dask DataFrame is reduced by
        Dask: only the per-group cross-products are kept (:mod:`mixedjax.sources`; rows
        need not be sorted, groups may span files or partitions).  Such a model has no rows:
        ``fittedvalues``, ``resid``, ``simulate`` and ``bootstrap`` raise
        ``NotImplementedError``; everything else works.  Per-group models with iid
        residuals only (no ``vc_formula``, no ``residual``); ``groups`` and ``weights`` are
        column names.
    groups : str or array_like
        Column name or a vector of group labels, one per row.
    re_formula : str, optional
        Random-effects design per group, e.g. ``"~Time"`` (intercept and slope,
        correlated); default ``"1"``, a random intercept; ``"0"`` none.
    vc_formula : dict, optional
        Variance components, statsmodels' meaning: ``{"cask": "0 + C(cask)"}``
        gives every column of that design, within each group, an independent
        random effect with one common variance.
    weights : str or array_like, optional
        Prior weights (column name or vector): row i has residual variance
        ``scale / w_i``, as lme4's ``weights``.
    missing : {"raise", "drop"}
        NaN/inf in a used column raise a ``ValueError`` naming it, or drop the
        rows (with a warning giving the count).
    residual : VarIdent, AR1 or list of both, optional
        Structured residuals, as nlme: ``mixedjax.VarIdent("Sex")`` (a residual
        variance per level) and/or ``mixedjax.AR1(time="age")`` (AR(1) within each
        group, rows in ``time`` order).  Default: iid residuals.
    batch_size : int, optional
        Rows per Parquet batch (default 524,288): the memory the reading takes.
    distributed : bool
        Several processes started with ``jax.distributed.initialize``: ``data`` (any of
        the kinds above, or a pandas DataFrame) are this process's rows; every process
        calls ``mixedlm`` with its own.  Levels and group ids are united across
        processes, the cross-products summed, and the group axis sharded over every
        process's devices; every process gets the same fit.

    Examples
    --------
    >>> import mixedjax
    >>> data = mixedjax.datasets.load("dietox")
    >>> md = mixedjax.mixedlm("Weight ~ Time", data, groups=data["Pig"], re_formula="~Time")
    >>> round(md.fit().llf, 3)
    -2217.047
    """
    if distributed or sources.is_source(data):
        return MixedLM.from_source(formula, data, groups, re_formula=re_formula, vc_formula=vc_formula,
                                   weights=weights, missing=missing, residual=residual, batch_size=batch_size,
                                   distributed=distributed)
    if not isinstance(data, pd.DataFrame):
        raise ValueError(f"data must be a pandas DataFrame, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("no observations: the data frame is empty")
    if "~" not in formula:
        raise ValueError(f"formula {formula!r} has no '~': write it as 'response ~ terms'")
    lhs, rhs = formula.split("~", 1)
    yname = lhs.strip()
    if yname not in data.columns:
        raise ValueError(f"response column {yname!r} is not in the data; available: {list(data.columns)}")
    if not pd.api.types.is_numeric_dtype(data[yname]) or pd.api.types.is_bool_dtype(data[yname]):
        raise ValueError(f"the response {yname!r} is not numeric (dtype {data[yname].dtype})")
    used = [yname] + fml.required_columns("~" + rhs, data, "formula")
    re_f = "1" if re_formula is None else re_formula
    used += fml.required_columns("~" + fml.as_rhs(re_f), data, "re_formula") if fml.as_rhs(re_f) not in (
        "0", "1", "-1") else []
    for name, f in (vc_formula or {}).items():
        used += fml.required_columns("~" + fml.as_rhs(f), data, f"vc_formula[{name!r}]")
    for r in (residual if isinstance(residual, list | tuple) else [residual]):
        col = getattr(r, "by", getattr(r, "time", None))
        if isinstance(col, str):
            if col not in data.columns:
                raise ValueError(f"residual structure column {col!r} is not in the data")
            used.append(col)

    frame = data
    extra = {}
    if isinstance(groups, str):
        if groups not in data.columns:
            raise ValueError(f"groups column {groups!r} is not in the data; available: {list(data.columns)}")
        used.append(groups)
        gname = groups
    else:
        g = pd.Series(groups.to_numpy() if isinstance(groups, pd.Series) else np.asarray(groups))
        if len(g) != len(data):
            raise ValueError(f"groups has length {len(g)}; the data have {len(data)} rows")
        gname = groups.name if isinstance(groups, pd.Series) and groups.name is not None else "groups"
        extra["__groups__"] = g.to_numpy() if not isinstance(g.dtype, pd.CategoricalDtype) else g.values
    if weights is not None:
        if isinstance(weights, str):
            if weights not in data.columns:
                raise ValueError(f"weights column {weights!r} is not in the data")
            used.append(weights)
        else:
            wv = np.asarray(weights, dtype=float).reshape(-1)
            if len(wv) != len(data):
                raise ValueError(f"weights has length {len(wv)}; the data have {len(data)} rows")
            extra["__weights__"] = wv
    used = list(dict.fromkeys(used))
    if extra:
        frame = data.assign(**extra)  # a new frame: the caller's is untouched
        used += list(extra)
    frame, _ = fml.check_finite(frame, used, missing)
    if len(frame) == 0:
        raise ValueError("no observations left after dropping missing values")

    x = fml.design(rhs, frame)
    if x.shape[1] == 0:
        raise ValueError(f"formula {formula!r} has no fixed effects; mixedjax needs at least one")
    gvec = frame[groups] if isinstance(groups, str) else frame["__groups__"]
    if re_formula is not None and fml.as_rhs(re_formula) in ("0", "-1"):
        z_re = np.zeros((len(frame), 0))
        re_names: list[str] = []
    else:
        zdf = fml.design(re_f, frame)
        z_re = zdf.to_numpy()
        re_names = ["Group" if c == "Intercept" else c for c in zdf.columns]
    w = None
    if weights is not None:
        w = frame[weights].to_numpy(dtype=float) if isinstance(weights, str) else frame["__weights__"].to_numpy()

    gi = group_index(gvec.reset_index(drop=True))
    vcs = []
    vdfs = {}
    for name, f in (vc_formula or {}).items():
        vdf = fml.design(f, frame)
        vdfs[name] = vdf
        vcs.append(fml.vc_from_matrix(str(name), vdf.to_numpy(), list(vdf.columns), gi.codes, len(gi.labels)))
    model = MixedLM(
        frame[yname].to_numpy(dtype=float), x.to_numpy(), gvec.reset_index(drop=True),
        exog_re=z_re if z_re.shape[1] else np.zeros((len(frame), 0)), weights=w, missing="raise",
        residual=residuals.bind(residual, frame, len(frame)),
        _vc_designs=vcs,
        _names={"endog_names": yname, "exog_names": list(x.columns), "exog_re_names": re_names,
                "formula": formula, "group_name": str(gname)},
        _group_index=gi,
    )
    model.data = frame
    # designs with their formulaic specs, for new data (prediction): fixed, random, variance components
    model.designs = {"fe": x, "re": None if not z_re.shape[1] else zdf, "vc": vdfs}
    model.re_formula = re_formula
    model.vc_formula = dict(vc_formula or {})
    return model
