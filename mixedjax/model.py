"""The statsmodels-shaped model object: :class:`MixedLM` and :func:`mixedlm`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from . import formula as fml
from . import residuals
from .covariance import CovStructure, normalize_theta, profile_to_theta, unpack_params
from .data import CrossProducts, GroupedData, bucket, cross_products_jit, group_index, pad_groups
from .likelihood import deviance_and_grad, em_update, loglike_packed, profile
from .optimize import Solution, minimize, minimize_many


def _fit_theta(
    theta0: jax.Array,
    cp: CrossProducts,
    zmask: jax.Array,
    structure: CovStructure,
    reml: bool = True,
    maxiter: int = 200,
    gtol: float = 1e-6,
    em_iter: int = 30,
) -> Solution:
    """Minimise the profiled deviance over θ: EM warm start, BFGS, gradient polish (pure JAX, jitted).

    Module-level and jitted once per (shapes, structure, options), so a new model
    on data of the same padded shape reuses the compiled fit.  Vmappable over
    ``theta0``, ``cp`` and ``zmask`` (many models at once).
    """
    vg, warm = _lane_functions(structure, reml)
    return minimize(lambda theta: profile(theta, cp, structure, reml).deviance, theta0,
                    warm_value_and_step=lambda theta: warm(theta, (cp, zmask)), n_warm=em_iter, maxiter=maxiter,
                    gtol=gtol, value_and_grad=lambda theta: vg(theta, (cp, zmask)),
                    snap=structure.diagonal_theta(), snap_tol=SNAP_TOL)


def _lane_functions(structure: CovStructure, reml: bool | jax.Array):
    """The optimiser's objective (closed-form gradient) and EM warm step, of θ and one model's ``(cp, zmask)``.

    Near a degenerate boundary the deviance can be quartic in a diagonal entry of Λ, where a small
    gradient still leaves θ_jj ~ 1e-3 and the deviance ~1e-8 above the boundary optimum: the
    optimiser's snap phase tries the boundary itself (lme4 reaches it through its bounds) and keeps
    it unless worse.
    """

    def value_and_grad(theta, data):
        return deviance_and_grad(theta, data[0], structure, reml)

    def warm(theta, data):
        return em_update(theta, data[0], data[1], structure, reml)

    return value_and_grad, warm


def fit_theta_many(
    theta0: jax.Array,
    cp: CrossProducts,
    zmask: jax.Array,
    structure: CovStructure,
    reml: bool | jax.Array = True,
    maxiter: int = 200,
    gtol: float = 1e-6,
    em_iter: int = 30,
    working: int | None = None,
) -> Solution:
    """:func:`fit_theta` for M models at once: ``cp`` and ``zmask`` with a leading model axis.

    Each model takes the same iterations as alone; ``working`` sets the working-set
    width of :func:`mixedjax.optimize.minimize_many` (None: all M lanes together).
    """
    m = cp.nobs.shape[0]
    vg, warm = _lane_functions(structure, reml)
    return minimize_many(vg, jnp.broadcast_to(theta0, (m,) + theta0.shape), (cp, zmask),
                         warm_value_and_step=warm, n_warm=em_iter, maxiter=maxiter, gtol=gtol,
                         snap=structure.diagonal_theta(), snap_tol=SNAP_TOL, working=working)


SNAP_TOL = 1e-2  # try diagonal entries of Λ below this at exactly 0 after the fit

_FIT_STATIC = ("structure", "maxiter", "gtol", "em_iter")
fit_theta = jax.jit(_fit_theta, static_argnames=_FIT_STATIC)
fit_theta.__doc__ = _fit_theta.__doc__
# XLA:CPU's newer fusion emitters compile these small-op programs more slowly than the classic
# elemental emitter, at the same run time (10,000-model batch: compile ~1.9 s -> ~1.4 s).
FAST_COMPILE = {"xla_cpu_use_fusion_emitters": False}
# One model at a time: with backend optimisation level 0 as well, the dietox fit compiles in ~0.7 s instead
# of ~1.2 s (2-core CPU) and runs in 1 ms instead of 0.5 ms.  Batched fits (vmap over thousands of models)
# keep the default level, where run time matters.
_fit_theta_single = jax.jit(_fit_theta, static_argnames=_FIT_STATIC,
                            compiler_options={**FAST_COMPILE, "xla_backend_optimization_level": 0})


_loglike_jit = jax.jit(loglike_packed, static_argnames=("structure", "profile_fe"))
_score_jit = jax.jit(jax.grad(loglike_packed), static_argnames=("structure", "profile_fe"))
_hessian_jit = jax.jit(jax.hessian(loglike_packed), static_argnames=("structure", "profile_fe"))


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


class MixedLM:
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

        gi = group_index(groups_arr)
        if bound is not None and bound.spec.ar1:  # AR(1): rows of a group in time order
            gi = gi._replace(position=residuals.time_positions(gi.codes, bound.time))
        self.residual = bound
        self._gi = gi
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
        self._vcs = vcs
        self.structure = CovStructure(
            q_re=z_re.shape[1],
            vc_sizes=tuple(v.size for v in vcs),
            re_names=tuple(self.exog_re_names),
            vc_names=tuple(v.name for v in vcs),
        )
        z = np.concatenate([z_re] + [v.values for v in vcs], axis=1)
        self.endog, self.exog, self.exog_re, self.weights = y, x, z_re, w
        self.groups = groups_arr.to_numpy()
        self._z = z
        self.nobs = nobs
        self.k_fe = x.shape[1]
        self.k_re = z_re.shape[1]
        self.k_re2 = self.k_re * (self.k_re + 1) // 2
        self.k_vc = len(vcs)
        self.group_sizes = gi.sizes

        g_pad, n_pad = bucket(self.n_groups), bucket(gi.n_max)
        self._padded: GroupedData = pad_groups(gi, y, x, z, w, g_pad, n_pad)
        self._cp: CrossProducts = cross_products_jit(self._padded)
        if bound is not None:
            strata = np.zeros((g_pad, n_pad), dtype=np.int64)
            if bound.strata is not None:
                strata[gi.codes, gi.position] = bound.strata
            self._strata = jnp.asarray(strata)
        zmask = np.zeros((g_pad, self.structure.q))
        zmask[: self.n_groups, : self.k_re] = 1.0
        off = self.k_re
        for v in vcs:
            for g, nm in enumerate(v.names):
                zmask[g, off : off + len(nm)] = 1.0
            off += v.size
        self._zmask = jnp.asarray(zmask)
        self.reml = True
        self.group_name = names.get("group_name") or (
            str(groups.name) if isinstance(groups, pd.Series) and groups.name is not None else "Group")
        self.formula: str | None = names.get("formula")
        self.data: pd.DataFrame | None = None
        self.designs: dict | None = None

    def _cp_at(self, rho: Any) -> CrossProducts:
        """Cross-products whitened by the residual structure at its unconstrained parameters ``rho``."""
        if self.residual is None:
            return self._cp
        return residuals.whitened_cross_products_jit(self._padded, self._strata, jnp.asarray(rho, dtype=float),
                                                     self.residual.spec)

    # ------------------------------------------------------------------ names
    @property
    def param_names(self) -> list[str]:
        """statsmodels' names of ``params``: fixed effects, then ``Group Var`` etc."""
        return list(self.exog_names) + self.structure.cov_param_names()

    # ------------------------------------------------------------ likelihood
    def _reml(self, reml: bool | None) -> bool:
        return self.reml if reml is None else bool(reml)

    def loglike(self, params: Any, reml: bool | None = None, profile_fe: bool = True) -> float:
        """Log-likelihood at statsmodels-packed ``params``, the scale profiled out.

        ``params`` = fixed effects, lower triangle (row-major) of ``cov_re / scale``,
        ``vcomp / scale``.  With ``profile_fe`` (statsmodels' default) the fixed
        effects are replaced by their GLS estimate.  ``reml`` defaults to the
        criterion of the model's last fit (REML before any fit).
        """
        pv = self._check_params(params)
        return float(_loglike_jit(pv, self._cp, self.structure, self._reml(reml), profile_fe))

    def score(self, params: Any, reml: bool | None = None, profile_fe: bool = True) -> np.ndarray:
        """Gradient of :meth:`loglike` with respect to the packed ``params`` (autodiff).

        Differentiates through the square-root factor of ``cov_re / scale``, so it is
        NaN where a variance in ``params`` is exactly 0 (the factor is not
        differentiable there); :mod:`mixedjax.lindstrom_bates` has closed forms.
        """
        pv = self._check_params(params)
        return np.asarray(_score_jit(pv, self._cp, self.structure, self._reml(reml), profile_fe))

    def hessian(self, params: Any, reml: bool | None = None, profile_fe: bool = False) -> np.ndarray:
        """Hessian of :meth:`loglike` with respect to the packed ``params`` (autodiff).

        By default the fixed effects are not profiled, so the matrix has the
        fixed-effects block statsmodels' ``hessian`` has.
        """
        pv = self._check_params(params)
        return np.asarray(_hessian_jit(pv, self._cp, self.structure, self._reml(reml), profile_fe))

    def _check_params(self, params: Any) -> jax.Array:
        fe, cov, vc = unpack_params(np.asarray(params, dtype=float), self.k_fe, self.structure)
        return jnp.asarray(np.asarray(params, dtype=float))

    # ------------------------------------------------------------------- fit
    def fit(
        self,
        reml: bool = True,
        start_params: Any = None,
        maxiter: int = 200,
        gtol: float = 1e-6,
        em_iter: int = 30,
    ) -> MixedLMResults:  # noqa: F821 - defined in results
        """Fit by REML (default) or ML: EM warm start, then BFGS, then a gradient polish, all in JAX.

        Parameters
        ----------
        reml : bool
            Restricted maximum likelihood (default) or maximum likelihood.
        start_params : array_like or MixedLMResults, optional
            Starting values in statsmodels' packing (``result.params`` of an
            earlier fit restarts from it), or an earlier result.  Default:
            lme4's start, Λ = I.
        maxiter : int
            Maximum BFGS iterations.
        gtol : float
            Convergence when the largest absolute gradient entry of the profiled
            deviance with respect to θ is below ``gtol``.
        em_iter : int
            Maximum EM warm-start iterations (0 disables the warm start).

        Returns
        -------
        MixedLMResults
            Warns with :class:`mixedjax.ConvergenceWarning` when the fit did not
            converge or is singular (a variance estimate on the boundary, 0).
        """
        from .results import MixedLMResults

        results_class = getattr(self, "_results_class", None) or MixedLMResults
        self.reml = bool(reml)
        if start_params is None:
            theta0 = self.structure.theta_start()
        else:
            sp = getattr(start_params, "params", start_params)
            _, cov, vc = unpack_params(np.asarray(sp, dtype=float), self.k_fe, self.structure)
            theta0 = profile_to_theta(cov, vc, self.structure)
        if self.residual is None:
            sol = _fit_theta_single(jnp.asarray(theta0, dtype=self._cp.xtx.dtype), self._cp, self._zmask,
                                    self.structure, reml=self.reml, maxiter=int(maxiter), gtol=float(gtol),
                                    em_iter=int(em_iter))
        else:
            rho0 = getattr(start_params, "residual_params", None)
            rho0 = residuals.residual_start(self.residual.spec) if rho0 is None else np.asarray(rho0, float)
            sol = residuals.fit_theta_structured(
                jnp.asarray(np.concatenate([theta0, rho0]), dtype=self._cp.xtx.dtype), self._padded, self._strata,
                self._zmask, self.structure, self.residual.spec, reml=self.reml, maxiter=int(maxiter),
                gtol=float(gtol), em_iter=int(em_iter))
        sol = jax.device_get(sol)
        x = np.asarray(sol.x)
        n_re = self.structure.n_theta
        theta = np.concatenate([normalize_theta(x[:n_re], self.structure), x[n_re:]])
        return results_class(self, theta, sol, self.reml)

    def fit_many(self, y: Any, reml: bool = True, maxiter: int = 200, gtol: float = 1e-6,
                 em_iter: int = 30, batch_size: int | None = None, progress: bool | None = None,
                 shard: bool = True, working: int | None = None) -> Any:
        """Fit one model per column of ``y`` (an (nobs, M) array or column names) in one vmapped call.

        NaN in a column drops those rows for that model only (``n_dropped`` in the
        results).  ``batch_size`` chunks the model axis to bound memory (one
        compiled program for all chunks), with a progress bar when interactive
        (``progress``); with several devices each chunk is sharded across them.
        ``working`` is the width of the optimiser's working set (default: an eighth
        of a chunk, at least 1,024; every lane at once for chunks up to 2,048 models
        or when sharded): slow models then cost narrow iterations.  It changes the
        speed, not the results.  Returns a :class:`mixedjax.batch.BatchResults` with arrays over the model
        axis (``fe_params [M, p]``, ``cov_re [M, q, q]``, ``llf``, ``converged``,
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
        from .batch import fit_many

        return fit_many(self, y, reml=reml, maxiter=maxiter, gtol=gtol, em_iter=em_iter, batch_size=batch_size,
                        progress=progress, shard=shard, working=working)

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


def mixedlm(
    formula: str,
    data: pd.DataFrame,
    groups: Any,
    re_formula: str | None = None,
    vc_formula: Mapping[str, str] | None = None,
    weights: Any = None,
    missing: str = "raise",
    residual: Any = None,
) -> MixedLM:
    """Build a :class:`MixedLM` from a formula, as ``statsmodels.formula.api.mixedlm``.

    Parameters
    ----------
    formula : str
        Fixed effects, e.g. ``"Weight ~ Time + C(Evit)"`` (formulaic syntax:
        categoricals in their pandas category order, interactions, ``np.log(x)``).
    data : pandas.DataFrame
        Never modified.
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

    Examples
    --------
    >>> import mixedjax
    >>> data = mixedjax.datasets.load("dietox")
    >>> md = mixedjax.mixedlm("Weight ~ Time", data, groups=data["Pig"], re_formula="~Time")
    >>> round(md.fit().llf, 3)
    -2217.047
    """
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
    used += fml.required_columns("~" + fml._as_rhs(re_f), data, "re_formula") if fml._as_rhs(re_f) not in (
        "0", "1", "-1") else []
    for name, f in (vc_formula or {}).items():
        used += fml.required_columns("~" + fml._as_rhs(f), data, f"vc_formula[{name!r}]")
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
    if re_formula is not None and fml._as_rhs(re_formula) in ("0", "-1"):
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
                "formula": formula},
    )
    model.data = frame
    # designs with their formulaic specs, for new data (prediction): fixed, random, variance components
    model.designs = {"fe": x, "re": None if not z_re.shape[1] else zdf, "vc": vdfs}
    model.group_name = str(gname)
    model.re_formula = re_formula
    model.vc_formula = dict(vc_formula or {})
    return model
