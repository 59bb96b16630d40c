"""Many responses on one design: one jitted, vmapped fit (:meth:`MixedLM.fit_many`).

Only the response (and, where a response has gaps, the row mask) differs between
models, so the padded design is shared and each model's cross-products are
formed inside the vmapped program.
"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .backends import FAST_COMPILE
from .backends import fit_grouped_many as fit_theta_many
from .covariance import CovStructure, theta_to_profile
from .data import GroupedData, cross_products
from .likelihood import profile
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


@functools.partial(jax.jit, static_argnames=("structure", "maxiter", "gtol", "em_iter", "shared_design", "working"),
                   compiler_options=FAST_COMPILE)
def _fit_vmapped(ys, masks, xs, zs, ws, zmasks, theta0, structure: CovStructure, reml, maxiter, gtol, em_iter,
                 shared_design: bool, working: int | None = None):
    """All models of a chunk in one program; the design (x, z, w, zmask) is shared or per model."""
    d_ax = None if shared_design else 0
    m = ys.shape[0]

    def lane_cp(y, mask, x, z, w):
        return cross_products(GroupedData(jnp.where(mask > 0, y, 0.0), x, z, w, mask))

    cp = jax.vmap(lane_cp, in_axes=(0, 0, d_ax, d_ax, d_ax))(ys, masks, xs, zs, ws)
    zm = jnp.broadcast_to(zmasks, (m,) + zmasks.shape) if shared_design else zmasks
    sol = fit_theta_many(theta0, cp, zm, structure, reml=reml, maxiter=maxiter, gtol=gtol, em_iter=em_iter,
                         working=working)
    pr = jax.vmap(lambda th, c: profile(th, c, structure, reml))(sol.x, cp)
    return _BatchOut(sol.x, pr.deviance, pr.beta, pr.sigma2, pr.normal.a, sol.grad_norm, sol.iterations,
                     sol.result, cp.nobs)


def _working_width(m: int, n_dev: int, working: int | None = None) -> int | None:
    """Working-set width for a chunk of ``m`` models (None: every lane every iteration).

    An eighth of the chunk, at least 1,024 lanes: wide enough that the per-iteration overhead
    stays small, narrow enough that the slowest models do not hold the whole chunk.  Sharded
    chunks keep plain lanes (a working set would gather across devices every iteration).
    """
    if working is not None:
        return None if working >= m else max(1, int(working))
    if n_dev > 1 or m <= 2048:
        return None
    return max(1024, m // 8)


def _n_devices(shard: bool) -> int:
    return len(jax.devices()) if shard else 1


def _model_mesh() -> Mesh | None:
    """A 1-D mesh over every device (``models`` axis), or None on a single device."""
    devices = jax.devices()
    return Mesh(np.array(devices), ("models",)) if len(devices) > 1 else None


def run_chunked(
    batched: tuple[np.ndarray, ...],
    shared: tuple[Any, ...],
    call: Any,
    batch_size: int | None,
    progress: bool | None,
    shard: bool = True,
) -> tuple[Any, int]:
    """Run ``call(*batched_chunk, *shared)`` over the model axis in chunks of ``batch_size``.

    Every chunk is padded to the same size (repeating its last model), so one
    compiled program serves them all; with several devices each chunk is
    sharded over a ``models`` mesh axis (``NamedSharding``) and the shared
    arrays are replicated.  Returns the concatenated outputs (padding dropped) and
    the number of devices used.
    """
    m_count = batched[0].shape[0]
    mesh = _model_mesh() if shard else None
    n_dev = 1 if mesh is None else mesh.devices.size
    size = m_count if batch_size is None else max(1, min(int(batch_size), m_count))
    size = -(-size // n_dev) * n_dev
    starts = list(range(0, m_count, size))
    show = progress if progress is not None else (len(starts) > 1 and sys.stderr.isatty())
    if show:
        from tqdm.auto import tqdm

        starts_iter = tqdm(starts, desc="fitting models", unit="chunk")
    else:
        starts_iter = starts
    if mesh is not None:
        split = NamedSharding(mesh, PartitionSpec("models"))
        replicated = NamedSharding(mesh, PartitionSpec())
        shared = tuple(jax.device_put(a, replicated) if isinstance(a, jax.Array | np.ndarray) else a
                       for a in shared)
    outs = []
    for start in starts_iter:
        stop = min(start + size, m_count)
        idx = np.minimum(np.arange(start, start + size), stop - 1)  # pad by repeating the last model
        chunk = tuple(a[idx] for a in batched)
        chunk = tuple(jax.device_put(a, split) for a in chunk) if mesh is not None else tuple(map(jnp.asarray, chunk))
        out = jax.device_get(call(*chunk, *shared))
        outs.append(jax.tree.map(lambda a, n=stop - start: np.asarray(a)[:n], out))
    return jax.tree.map(lambda *a: np.concatenate(a), *outs), n_dev


def _profile_many(theta: np.ndarray, st: CovStructure) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised :func:`normalize_theta` and :func:`theta_to_profile` over the model axis (M, n_theta)."""
    m_count, q = theta.shape[0], st.q_re
    lam = np.zeros((m_count, q, q))
    idx = np.arange(q)
    if st.re_diagonal:
        lam[:, idx, idx] = np.abs(theta[:, :q])
        re = lam[:, idx, idx]
    else:
        r, c = st.re_tril
        lam[:, r, c] = theta[:, : len(r)]
        lam = lam * np.where(lam[:, idx, idx] < 0, -1.0, 1.0)[:, None, :]
        re = lam[:, r, c]
    vc = np.abs(theta[:, st.n_re_theta :])
    return np.concatenate([re, vc], axis=1), lam @ lam.transpose(0, 2, 1), vc**2


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

    def __init__(self, model: MixedLM, ys: np.ndarray | None, out: _BatchOut, reml: bool, names: list[str],
                 models: list[MixedLM] | None = None) -> None:
        st = model.structure
        self.model, self.reml, self.names, self._ys = model, reml, names, ys
        self.models = models  # fit_batch: one model per data set
        self.theta, cov1, vc1 = _profile_many(np.asarray(out.theta, dtype=float), st)
        self.scale = np.asarray(out.sigma2)
        self.cov_re = cov1 * self.scale[:, None, None]
        self.vcomp = vc1 * self.scale[:, None]
        self.fe_params = np.asarray(out.beta)
        self.llf = -0.5 * np.asarray(out.deviance)
        self.bse_fe = np.sqrt(np.diagonal(np.linalg.inv(np.asarray(out.a)), axis1=1, axis2=2) * self.scale[:, None])
        self.result = np.asarray(out.result)
        self.converged = (self.result <= Result.NO_PROGRESS) & np.isfinite(self.llf)
        self.grad_norm = np.asarray(out.grad_norm)
        self.iterations = np.asarray(out.iterations)
        self.nobs = np.asarray(out.nobs).astype(int)
        full = np.array([mm.nobs for mm in models]) if models is not None else model.nobs
        self.n_dropped = full - self.nobs
        self.n_devices = 1

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

        if self.models is not None:
            return self.models[m].fit(reml=self.reml, start_params=self.theta_params(m))
        mod = self.model
        y = self._ys[:, m]
        keep = np.isfinite(y)
        single = MixedLM(y[keep], mod.exog[keep], pd.Series(mod.groups[keep]),
                         exog_re=mod.exog_re[keep] if mod.k_re else np.zeros((int(keep.sum()), 0)),
                         weights=mod.weights[keep],
                         _vc_designs=[type(v)(v.name, v.values[keep], v.names) for v in mod.vc_designs],
                         _names={"endog_names": self.names[m], "exog_names": mod.exog_names,
                                 "exog_re_names": mod.exog_re_names, "group_name": mod.group_name})
        return single.fit(reml=self.reml, start_params=self.theta_params(m))

    def theta_params(self, m: int) -> np.ndarray:
        """Model ``m``'s estimate in statsmodels' packing."""
        from .covariance import pack_params

        cov1, vc1 = theta_to_profile(self.theta[m], self.model.structure)
        return pack_params(self.fe_params[m], cov1, vc1, self.model.structure)


def fit_many(model: MixedLM, y: Any, reml: bool = True, maxiter: int = 200, gtol: float = 1e-6,
             em_iter: int = 30, batch_size: int | None = None, progress: bool | None = None,
             shard: bool = True, working: int | None = None) -> BatchResults:
    """Fit one model per column of ``y`` on ``model``'s design, in one vmapped call per chunk.

    ``y`` is an (nobs, M) array or a list of column names of the model's data.
    NaN in a column drops those rows for that model only.  ``batch_size`` chunks
    the model axis (memory); ``progress`` shows a progress bar over chunks
    (default: when interactive and there are several chunks).  With several
    devices each chunk is sharded across them (``shard=False`` keeps one device).
    ``working``: the optimiser's working-set width (:func:`_working_width`; speed only).
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
    gi = model.group_index
    base = model.backend_data.padded
    m_count = ys.shape[1]
    padded = np.zeros((m_count,) + tuple(base.y.shape))
    masks = np.zeros_like(padded)
    padded[:, gi.codes, gi.position] = np.nan_to_num(ys.T)
    masks[:, gi.codes, gi.position] = np.isfinite(ys.T)
    theta0 = jnp.asarray(model.structure.theta_start())

    def call(yc, mc, x, z, w, zm):
        return _fit_vmapped(yc, mc, x, z, w, zm, theta0, model.structure, jnp.asarray(reml), int(maxiter),
                            float(gtol), int(em_iter), True, _working_width(yc.shape[0], _n_devices(shard), working))

    out, n_dev = run_chunked((padded, masks), (base.x, base.z, base.w, model.backend_data.zmask), call, batch_size, progress,
                             shard)
    res = BatchResults(model, ys, _BatchOut(*out), reml, names)
    res.n_devices = n_dev
    return res
