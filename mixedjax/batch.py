"""Many responses on one design: one jitted, vmapped fit (:meth:`MixedLM.fit_many`).

Only the response (and, where a response has gaps, the row mask) differs between
models, so the padded design is shared and each model's cross-products are
formed inside the vmapped program.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .covariance import CovStructure, normalize_theta, theta_to_profile
from .data import GroupedData, cross_products
from .likelihood import profile
from .model import fit_theta
from .optimize import Result

if TYPE_CHECKING:
    from .model import MixedLM
    from .results import MixedLMResults


class _BatchOut(NamedTuple):
    theta: jax.Array
    deviance: jax.Array
    beta: jax.Array
    sigma2: jax.Array
    a: jax.Array
    grad_norm: jax.Array
    iterations: jax.Array
    result: jax.Array
    nobs: jax.Array


@functools.partial(jax.jit, static_argnames=("structure", "maxiter", "gtol", "em_iter"))
def _fit_many(ys, masks, base: GroupedData, zmask, theta0, structure: CovStructure, reml, maxiter, gtol, em_iter):
    def one(y, mask):
        data = base._replace(y=jnp.where(mask > 0, y, 0.0), mask=mask)
        cp = cross_products(data)
        sol = fit_theta(theta0, cp, zmask, structure, reml=reml, maxiter=maxiter, gtol=gtol, em_iter=em_iter)
        pr = profile(sol.x, cp, structure, reml)
        return _BatchOut(sol.x, pr.deviance, pr.beta, pr.sigma2, pr.normal.a, sol.grad_norm, sol.iterations,
                         sol.result, cp.nobs)

    return jax.vmap(one)(ys, masks)


class BatchResults:
    """Results of :meth:`MixedLM.fit_many`: arrays over the model axis (first axis, length M).

    Attributes
    ----------
    fe_params : (M, p)
    cov_re : (M, q, q)
    vcomp : (M, n_vc)
    scale, llf : (M,)
    bse_fe : (M, p)
    converged : (M,) bool
    nobs, n_dropped : (M,) rows used and rows dropped for NaN in that response
    """

    def __init__(self, model: MixedLM, ys: np.ndarray, out: _BatchOut, reml: bool, names: list[str]) -> None:
        st = model.structure
        self.model, self.reml, self.names, self._ys = model, reml, names, ys
        self.theta = np.stack([normalize_theta(t, st) for t in np.asarray(out.theta)])
        self.scale = np.asarray(out.sigma2)
        prof = [theta_to_profile(t, st) for t in self.theta]
        self.cov_re = np.stack([c for c, _ in prof]) * self.scale[:, None, None]
        self.vcomp = np.stack([v for _, v in prof]).reshape(len(names), -1) * self.scale[:, None]
        self.fe_params = np.asarray(out.beta)
        self.llf = -0.5 * np.asarray(out.deviance)
        self.bse_fe = np.sqrt(np.diagonal(np.linalg.inv(np.asarray(out.a)), axis1=1, axis2=2) * self.scale[:, None])
        self.result = np.asarray(out.result)
        self.converged = (self.result <= Result.NO_PROGRESS) & np.isfinite(self.llf)
        self.grad_norm = np.asarray(out.grad_norm)
        self.iterations = np.asarray(out.iterations)
        self.nobs = np.asarray(out.nobs).astype(int)
        self.n_dropped = model.nobs - self.nobs

    def to_frame(self) -> pd.DataFrame:
        """A tidy DataFrame: one row per model, fixed effects, variances, scale, llf, convergence."""
        m = self.model
        df = pd.DataFrame(self.fe_params, columns=m.exog_names, index=self.names)
        r, c = m.structure.re_tril
        for k, name in enumerate(m.structure.cov_param_names()[: len(r)]):
            df[name] = self.cov_re[:, r[k], c[k]]
        for k, name in enumerate(m.structure.vc_names):
            df[f"{name} Var"] = self.vcomp[:, k]
        df["scale"], df["llf"], df["converged"] = self.scale, self.llf, self.converged
        df["nobs"], df["n_dropped"] = self.nobs, self.n_dropped
        return df

    def result_for(self, m: int) -> MixedLMResults:
        """Model ``m`` as a full :class:`MixedLMResults` (refitted alone from its batched estimate)."""
        from .model import MixedLM

        mod = self.model
        y = self._ys[:, m]
        keep = np.isfinite(y)
        single = MixedLM(y[keep], mod.exog[keep], pd.Series(mod.groups[keep]),
                         exog_re=mod.exog_re[keep] if mod.k_re else np.zeros((int(keep.sum()), 0)),
                         weights=mod.weights[keep],
                         _vc_designs=[type(v)(v.name, v.values[keep], v.names) for v in mod._vcs],
                         _names={"endog_names": self.names[m], "exog_names": mod.exog_names,
                                 "exog_re_names": mod.exog_re_names, "group_name": mod.group_name})
        return single.fit(reml=self.reml, start_params=self.theta_params(m))

    def theta_params(self, m: int) -> np.ndarray:
        """Model ``m``'s estimate in statsmodels' packing."""
        from .covariance import pack_params

        cov1, vc1 = theta_to_profile(self.theta[m], self.model.structure)
        return pack_params(self.fe_params[m], cov1, vc1, self.model.structure)


def fit_many(model: MixedLM, y: Any, reml: bool = True, maxiter: int = 200, gtol: float = 1e-6,
             em_iter: int = 10) -> BatchResults:
    """Fit one model per column of ``y`` on ``model``'s design, in one vmapped call.

    ``y`` is an (nobs, M) array or a list of column names of the model's data.
    NaN in a column drops those rows for that model only.
    """
    if isinstance(y, list | tuple) and all(isinstance(c, str) for c in y):
        if model.data is None:
            raise ValueError("column names need a model built by mixedlm() from a DataFrame")
        missing = [c for c in y if c not in model.data.columns]
        if missing:
            raise ValueError(f"response column(s) {missing} are not in the data")
        names = list(y)
        ys = model.data[names].to_numpy(dtype=float)
    else:
        ys = np.asarray(y, dtype=float)
        ys = ys[:, None] if ys.ndim == 1 else ys
        names = list(y.columns) if isinstance(y, pd.DataFrame) else [f"y{m}" for m in range(ys.shape[1])]
    if ys.ndim != 2 or ys.shape[0] != model.nobs:
        raise ValueError(f"y has shape {ys.shape}; expected ({model.nobs}, M) to match the model's rows")
    if np.any(np.isinf(ys)):
        raise ValueError("y has infinite values")
    gi = model._gi
    base = model._padded
    m_count = ys.shape[1]
    padded = np.zeros((m_count,) + tuple(base.y.shape))
    masks = np.zeros_like(padded)
    padded[:, gi.codes, gi.position] = np.nan_to_num(ys.T)
    masks[:, gi.codes, gi.position] = np.isfinite(ys.T)
    theta0 = jnp.asarray(model.structure.theta_start())
    out = _fit_many(jnp.asarray(padded), jnp.asarray(masks), base, model._zmask, theta0, model.structure,
                    jnp.asarray(reml), int(maxiter), float(gtol), int(em_iter))
    return BatchResults(model, ys, jax.device_get(out), reml, names)
