"""Many responses on one design: one jitted, vmapped fit (:meth:`mixedjax.model.LinearMixedModel.fit_many`).

Only the response differs between models, so everything response-free is shared and
each model's response enters the backend's data inside the vmapped program.  Two
implementations of the same fit:

* per-group models with iid residuals: the padded design is shared, each model's
  cross-products (with its own row mask, so NaN rows are dropped per model) are formed
  in the program, and :func:`mixedjax.backends.fit_grouped_many` runs a working-set
  BFGS (slots of finished models are refilled, so a few slow models do not hold the
  rest); :func:`fit_grouped_vmapped`;
* every other model (structured residuals, crossed random effects), written against
  the backend interface: ``backend.with_response`` then ``backend.minimize_jax`` and
  :func:`mixedjax.backends.profiled` per response (:func:`fit_responses`).  Structured
  residuals are part of that likelihood (ρ is fitted with θ for every response).  A
  response with NaN is refused there (:class:`ValueError`): dropping its rows changes the
  crossed design and the AR(1) chain, which the shared data cannot express.

:class:`BatchResults` holds the arrays over the model axis.
"""

from __future__ import annotations

import copy
import functools
import sys
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import terms as tm
from .backends import FAST_COMPILE, GroupedBackend, fit_grouped_many, profiled
from .covariance import CovStructure
from .data import GroupedData, cross_products
from .fit import start_theta
from .likelihood import profile
from .optimize import Result
from .plots import plot_batch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .results import MixedLMResults


class BatchOut(NamedTuple):
    """Per model: ``theta`` (``concat(θ, ρ)``, any column signs), ``deviance``, ``beta``, ``sigma2``,
    ``a`` (``X'V⁻¹X``), ``grad_norm``, ``iterations``, ``result`` (:class:`mixedjax.Result` code), ``nobs``."""

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
def fit_grouped_vmapped(ys: jax.Array, masks: jax.Array, xs: jax.Array, zs: jax.Array, ws: jax.Array,
                        zmasks: jax.Array, theta0: jax.Array, structure: CovStructure, reml: jax.Array, maxiter: int,
                        gtol: float, em_iter: int, shared_design: bool, working: int | None = None) -> BatchOut:
    """Per-group iid models of one padded shape in one program; the design (x, z, w, zmask) shared or per model.

    ``ys, masks (M, G, n_max)``; ``xs (G, n_max, p)``, ``zs (G, n_max, q)``, ``ws (G, n_max)``,
    ``zmasks (G, q)`` with ``shared_design``, else each with a leading model axis.
    """
    d_ax = None if shared_design else 0
    m = ys.shape[0]

    def lane_cp(y, mask, x, z, w):
        return cross_products(GroupedData(jnp.where(mask > 0, y, 0.0), x, z, w, mask))

    cp = jax.vmap(lane_cp, in_axes=(0, 0, d_ax, d_ax, d_ax))(ys, masks, xs, zs, ws)
    zm = jnp.broadcast_to(zmasks, (m,) + zmasks.shape) if shared_design else zmasks
    sol = fit_grouped_many(theta0, cp, zm, structure, reml=reml, maxiter=maxiter, gtol=gtol, em_iter=em_iter,
                           working=working)
    pr = jax.vmap(lambda th, c: profile(th, c, structure, reml))(sol.x, cp)
    return BatchOut(sol.x, pr.deviance, pr.beta, pr.sigma2, pr.normal.a, sol.grad_norm, sol.iterations,
                    sol.result, cp.nobs)


@functools.partial(jax.jit, static_argnames=("backend", "maxiter", "gtol", "em_iter"), compiler_options=FAST_COMPILE)
def fit_responses(ys: jax.Array, data: Any, theta0: jax.Array, backend: Any, reml: jax.Array, maxiter: int,
                  gtol: float, em_iter: int) -> BatchOut:
    """Any backend: refit ``data`` to each response ``ys (M, nobs)`` (row order) in one vmapped program.

    Examples
    --------
    >>> import jax.numpy as jnp, mixedjax
    >>> d = mixedjax.datasets.load("penicillin")
    >>> r = mixedjax.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", d)
    >>> m = r.model
    >>> ys = jnp.stack([jnp.asarray(m.endog), 2.0 * jnp.asarray(m.endog)])
    >>> out = fit_responses(ys, m.backend_data, jnp.ones(2), m.backend, jnp.asarray(True), 200, 1e-6, 0)
    >>> [round(float(v), 3) for v in out.beta[:, 0]]
    [22.972, 45.944]
    """

    def one(y):
        d = backend.with_response(data, y)
        sol = backend.minimize_jax(theta0, d, reml, maxiter, gtol, em_iter)
        pr = profiled(backend, sol.x, d, reml)
        return BatchOut(sol.x, pr.deviance, pr.beta, pr.sigma2, pr.normal.a, sol.grad_norm, sol.iterations,
                        sol.result, backend.nobs(d))

    return jax.vmap(one)(ys)


def working_width(m: int, n_dev: int, working: int | None = None) -> int | None:
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


def n_devices(shard: bool) -> int:
    """Devices a chunk is sharded over (all of them with ``shard``, else 1)."""
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
        shared = tuple(jax.tree.map(lambda a: jax.device_put(a, replicated) if isinstance(a, jax.Array | np.ndarray)
                                    else a, s) for s in shared)
    outs = []
    for start in starts_iter:
        stop = min(start + size, m_count)
        idx = np.minimum(np.arange(start, start + size), stop - 1)  # pad by repeating the last model
        chunk = tuple(a[idx] for a in batched)
        chunk = tuple(jax.device_put(a, split) for a in chunk) if mesh is not None else tuple(map(jnp.asarray, chunk))
        out = jax.device_get(call(*chunk, *shared))
        outs.append(jax.tree.map(lambda a, n=stop - start: np.asarray(a)[:n], out))
    return jax.tree.map(lambda *a: np.concatenate(a), *outs), n_dev


# names batch.py imported before they were public
_BatchOut, _fit_vmapped, _working_width, _n_devices = BatchOut, fit_grouped_vmapped, working_width, n_devices


def term_covariances(theta: np.ndarray, sigma2: np.ndarray, terms: tuple[tm.TermSpec, ...]) -> list[np.ndarray]:
    """Natural-scale covariance ``σ² T_k T_kᵀ`` of every term for M fits: a list of ``(M, q_k, q_k)``.

    ``theta (M, ≥ n_theta)`` in any column signs (``T Tᵀ`` does not depend on them).

    Examples
    --------
    >>> import numpy as np
    >>> term_covariances(np.array([[2.0, 0.5, -1.0]]), np.array([4.0]), (tm.TermSpec(2),))[0][0].tolist()
    [[16.0, 4.0], [4.0, 5.0]]
    """
    theta = np.atleast_2d(np.asarray(theta, float))
    m = theta.shape[0]
    out = []
    for t, sl in zip(terms, tm.theta_slices(terms), strict=True):
        r, c = t.positions()
        lam = np.zeros((m, t.q, t.q))
        lam[:, r, c] = theta[:, sl]
        out.append(lam @ lam.transpose(0, 2, 1) * np.asarray(sigma2, float).reshape(m, 1, 1))
    return out


class BatchResults:
    """Results of :meth:`fit_many <mixedjax.model.LinearMixedModel.fit_many>` and
    :func:`mixedjax.fit_batch`: arrays over the model axis (first axis, length M).

    Attributes
    ----------
    fe_params : (M, p)
    cov_terms : list of (M, q_k, q_k)
        Natural-scale covariance of every random-effects term, aligned with
        ``model.term_info`` (every model kind).
    cov_re : (M, q, q)
        The first term's covariance where the model has a correlated block first (the
        ``exog_re`` block of a ``mixedlm`` model, the first term of an ``lmer`` one), as
        :attr:`mixedjax.MixedLMResults.cov_re`; ``(M, 0, 0)`` otherwise.
    vcomp : (M, n_vc)
        Variances of every other term's columns (statsmodels' variance components).
    residual_params : (M, n_rho)
        Residual-structure parameters on their natural scale (VarIdent sd ratios, AR(1) φ).
    scale, llf : (M,)
    bse_fe : (M, p)
    converged : (M,) bool
    nobs, n_dropped : (M,) rows used and rows dropped for NaN in that response
    theta : (M, n_theta + n_rho)
        ``concat(θ, ρ)`` of every model (θ sign-normalised; ``theta_full`` as the optimiser ended).
    """

    def __init__(self, model: Any, ys: np.ndarray | None, out: BatchOut, reml: bool, names: list[str],
                 models: list[Any] | None = None) -> None:
        backend = model.backend
        self.model, self.reml, self.names, self.ys = model, reml, names, ys
        self.models = models  # fit_batch: one model per data set
        theta_full = np.asarray(out.theta, dtype=float)
        self.scale = np.asarray(out.sigma2, dtype=float)
        self.cov_terms = term_covariances(theta_full, self.scale, backend.terms)
        self.theta_full = theta_full
        m_count = theta_full.shape[0]
        first = 1 if getattr(model, "k_re", 0) else 0
        self.cov_re = self.cov_terms[0] if first else np.zeros((m_count, 0, 0))
        rest = [np.diagonal(c, axis1=1, axis2=2) for c in self.cov_terms[first:]]
        self.vcomp = np.concatenate(rest, axis=1) if rest else np.zeros((m_count, 0))
        rho = theta_full[:, backend.n_theta :]
        self.residual_params = (np.stack([np.asarray(backend.rho_to_natural(r)) for r in rho]) if backend.n_rho
                                else np.zeros((m_count, 0)))
        self.fe_params = np.asarray(out.beta)
        self.llf = -0.5 * np.asarray(out.deviance)
        with np.errstate(invalid="ignore"):
            self.bse_fe = np.sqrt(np.diagonal(_inv_many(np.asarray(out.a)), axis1=1, axis2=2)
                                  * self.scale[:, None])
        self.result = np.asarray(out.result)
        self.converged = (self.result <= Result.NO_PROGRESS) & np.isfinite(self.llf) & ~self._exact_fit(ys)
        self.grad_norm = np.asarray(out.grad_norm)
        self.iterations = np.asarray(out.iterations)
        self.nobs = np.asarray(out.nobs).astype(int)
        full = np.array([mm.nobs for mm in models]) if models is not None else model.nobs
        self.n_dropped = full - self.nobs
        self.n_devices = 1

    @functools.cached_property
    def theta(self) -> np.ndarray:
        """``(M, n_theta + n_rho)``: ``concat(θ, ρ)`` of every model, θ sign-normalised (lme4's convention)."""
        backend = self.model.backend
        th = self.theta_full[:, : backend.n_theta]
        return np.concatenate([np.stack([tm.normalize_theta(t, backend.terms) for t in th]) if len(th) else th,
                               self.theta_full[:, backend.n_theta :]], axis=1)

    def __len__(self) -> int:
        return len(self.llf)

    def variance_params(self) -> np.ndarray:
        """``(M, n_cov)`` natural-scale variance parameters (each term's covariance lower triangle, row-major),
        in the order of ``model.cov_param_names()``."""
        cols = [c[:, t.positions()[0], t.positions()[1]]
                for c, t in zip(self.cov_terms, self.model.backend.terms, strict=True)]
        return np.concatenate(cols, axis=1) if cols else np.zeros((len(self), 0))

    def _exact_fit(self, ys: Any) -> np.ndarray:
        """Models whose residual variance is rounding noise of the response (a constant response, or one
        the fixed effects reproduce exactly): the likelihood is unbounded there, whatever the optimiser
        reports, so they are not converged."""
        if ys is None:
            return np.zeros(self.scale.shape, bool)
        with np.errstate(invalid="ignore"):
            size = np.nanmean(np.asarray(ys, dtype=float) ** 2, axis=0)
        return ~(self.scale > 1e-12 * size)

    def to_frame(self) -> pd.DataFrame:
        """A tidy DataFrame: one row per model, fixed effects, variances (natural scale, the names of the
        variance rows of ``params``), residual-structure parameters, scale, llf, convergence."""
        m = self.model
        df = pd.DataFrame(self.fe_params, columns=m.exog_names, index=self.names)
        for name, col in zip(m.cov_param_names(), self.variance_params().T, strict=True):
            df[name] = col
        for name, col in zip(m.residual_param_names, self.residual_params.T, strict=True):
            df[name] = col
        df["scale"], df["llf"], df["converged"] = self.scale, self.llf, self.converged
        df["nobs"], df["n_dropped"] = self.nobs, self.n_dropped
        return df

    def _repr_html_(self) -> str:
        """Notebook display: how many models, the criterion and how many converged, then :meth:`to_frame`
        (at most 20 rows shown)."""
        n, ok = len(self), int(np.sum(self.converged))
        head = (f"<p><b>BatchResults</b>: {n} model{'s' if n != 1 else ''} fitted by {'REML' if self.reml else 'ML'}"
                f", {ok} converged</p>")
        return head + self.to_frame().to_html(max_rows=20, float_format=lambda v: f"{v:.6g}")

    def __repr__(self) -> str:
        return (f"<BatchResults {len(self)} models {'REML' if self.reml else 'ML'}, "
                f"{int(np.sum(self.converged))} converged>")

    def theta_params(self, m: int) -> np.ndarray:
        """Model ``m``'s estimate in statsmodels' packing (``params``: fixed effects, ``cov / scale`` of each term,
        residual parameters on their natural scale), a start for a single fit."""
        return np.concatenate([self.fe_params[m], self.variance_params()[m] / self.scale[m],
                               self.residual_params[m]])

    def plot(self, param: str, kind: str = "hist", alpha: float = 0.05, bins: int = 30,
             figsize: tuple[float, float] | None = None) -> Figure:
        """One estimate across the models: ``kind="hist"`` its histogram, ``"volcano"`` (a fixed effect) the
        estimate against ``−log10 p`` of its Wald z test (:func:`mixedjax.plots.plot_batch`).

        Examples
        --------
        >>> import mixedjax, numpy as np
        >>> d = mixedjax.datasets.load("sleepstudy")
        >>> md = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject")
        >>> y = d["Reaction"].to_numpy()[:, None] + np.random.default_rng(0).normal(0, 20, (180, 20))
        >>> batch = md.fit_many(y)
        >>> batch.plot("Days").axes[0].get_xlabel(), batch.plot("Days", kind="volcano").axes[0].get_xlabel()
        ('Days', 'Days estimate')
        """
        return plot_batch(self, param, kind=kind, alpha=alpha, bins=bins, figsize=figsize)

    def result_for(self, m: int) -> MixedLMResults:
        """Model ``m`` as a full :class:`mixedjax.MixedLMResults`, refitted alone from its batched estimate.

        The model is the batch's model with response ``m`` (its data frame's response
        column replaced, so formula-based features see it); a response with NaN rows is
        a model rebuilt on the remaining rows (per-group iid models only).
        """
        if self.models is not None:
            return self.models[m].fit(reml=self.reml, start_params=self.theta_params(m))
        y = self.ys[:, m]
        keep = np.isfinite(y)
        single = _with_response(self.model, y) if keep.all() else _rebuilt_without(self.model, y, keep, self.names[m])
        return single.fit(reml=self.reml, start_params=self.theta_params(m))


def _inv_many(a: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.inv(a)
    except np.linalg.LinAlgError:
        out = np.full_like(a, np.nan)
        for k in range(a.shape[0]):
            try:
                out[k] = np.linalg.inv(a[k])
            except np.linalg.LinAlgError:
                pass
        return out


def _with_response(model: Any, y: np.ndarray) -> Any:
    """A copy of ``model`` with response ``y`` (row order): endog, backend data, the data frame's response
    column and a formula refitter bound to that frame."""
    new = copy.copy(model)
    new.endog = np.asarray(y, float)
    new.backend_data = model.backend.with_response(model.rows_data(), jnp.asarray(new.endog))
    name = getattr(model, "endog_names", None)
    if isinstance(model.data, pd.DataFrame) and isinstance(name, str) and name in model.data.columns:
        new.data = model.data.assign(**{name: new.endog})
        refit = getattr(model, "refit_formula", None)
        if isinstance(refit, functools.partial) and "data" in refit.keywords:
            new.refit_formula = functools.partial(refit.func, *refit.args, **{**refit.keywords, "data": new.data})
    return new


def _rebuilt_without(model: Any, y: np.ndarray, keep: np.ndarray, name: str) -> Any:
    """A per-group iid model (``MixedLM``) on the rows ``keep`` of response ``y``."""
    vcs = [type(v)(v.name, v.values[keep], v.names) for v in model.vc_designs]
    return type(model)(y[keep], model.exog[keep], pd.Series(model.groups[keep]),
                       exog_re=model.exog_re[keep] if model.k_re else np.zeros((int(keep.sum()), 0)),
                       weights=model.weights[keep], _vc_designs=vcs,
                       _names={"endog_names": name, "exog_names": model.exog_names,
                               "exog_re_names": model.exog_re_names, "group_name": model.group_name})


def _responses(model: Any, y: Any) -> tuple[np.ndarray, list[str]]:
    """``(nobs, M)`` responses and their names from an array, a DataFrame or column names of the model's data."""
    if isinstance(y, list | tuple) and y and all(isinstance(c, str) for c in y):
        if model.data is None:
            raise ValueError("column names need a model built from a DataFrame (mixedlm() or lmer())")
        missing = [c for c in y if c not in model.data.columns]
        if missing:
            raise ValueError(f"response column(s) {missing} are not in the data")
        names = list(y)
        ys = model.data[names].to_numpy(dtype=float)
    else:
        ys = np.asarray(y, dtype=float)
        ys = ys[:, None] if ys.ndim == 1 else ys
        names = [str(c) for c in y.columns] if isinstance(y, pd.DataFrame) else [f"y{m}" for m in range(ys.shape[1])]
    if ys.ndim != 2 or ys.shape[0] != model.nobs:
        raise ValueError(f"y has shape {ys.shape}; expected ({model.nobs}, M) to match the model's rows")
    if np.any(np.isinf(ys)):
        raise ValueError("y has infinite values")
    return ys, names


def fit_many(model: Any, y: Any, reml: bool = True, maxiter: int = 200, gtol: float = 1e-6,
             em_iter: int = 30, batch_size: int | None = None, progress: bool | None = None,
             shard: bool = True, working: int | None = None) -> BatchResults:
    """Fit one model per column of ``y`` on ``model``'s design, in one vmapped call per chunk.

    ``y`` is an (nobs, M) array, a DataFrame, or a list of column names of the model's
    data.  Every model kind: per-group iid models take the working-set path, every other
    backend (structured residuals, crossed random effects) the generic one (module
    docstring); both minimise the same deviance as ``model.fit()`` to ``gtol``.

    NaN in a column drops those rows for that model only on per-group models with iid
    residuals; on other models it raises :class:`ValueError`.  ``batch_size`` chunks
    the model axis (memory); ``progress`` shows a progress bar over chunks (default:
    when interactive and there are several chunks).  With several devices each chunk
    is sharded across them (``shard=False`` keeps one device).  ``working``: the
    working-set width of the per-group iid path (:func:`working_width`; speed only).

    Examples
    --------
    >>> import mixedjax, numpy as np
    >>> d = mixedjax.datasets.load("orthodont")
    >>> md = mixedjax.mixedlm("distance ~ age + Sex", d, groups="Subject", residual=mixedjax.VarIdent("Sex"))
    >>> res = fit_many(md, np.column_stack([d.distance, d.distance + 1.0]))
    >>> [round(float(v), 2) for v in res.llf], res.residual_params.shape
    ([-210.18, -210.18], (2, 1))
    """
    ys, names = _responses(model, y)
    backend = model.backend
    reml_arr = jnp.asarray(bool(reml))
    if isinstance(backend, GroupedBackend) and backend.n_rho == 0:
        # per-group iid: the design stays padded and shared, each model brings its own row mask
        data = model.rows_data()
        codes, position = np.asarray(data.codes), np.asarray(data.position)
        base = data.padded
        m_count = ys.shape[1]
        padded = np.zeros((m_count,) + tuple(base.y.shape))
        masks = np.zeros_like(padded)
        padded[:, codes, position] = np.nan_to_num(ys.T)
        masks[:, codes, position] = np.isfinite(ys.T)
        theta0 = jnp.asarray(backend.structure.theta_start())

        def call(yc, mc, x, z, w, zm):
            return fit_grouped_vmapped(yc, mc, x, z, w, zm, theta0, backend.structure, reml_arr, int(maxiter),
                                       float(gtol), int(em_iter), True,
                                       working_width(yc.shape[0], n_devices(shard), working))

        out, n_dev = run_chunked((padded, masks), (base.x, base.z, base.w, data.zmask), call, batch_size,
                                 progress, shard)
    else:
        if np.isnan(ys).any():
            bad = sorted({names[k] for k in np.flatnonzero(np.isnan(ys).any(axis=0))})
            raise ValueError(
                f"response(s) {bad[:5]}{' ...' if len(bad) > 5 else ''} have NaN: fit_many drops NaN rows per "
                "response only on per-group models with iid residuals; with structured residuals or crossed "
                "random effects the rows of a response are part of the shared design (AR(1) chain, crossed "
                "pattern). Fit those responses on a model built without the rows, or fill them")
        theta0 = jnp.asarray(start_theta(backend))

        def call(yc, data):
            return fit_responses(yc, data, theta0, backend, reml_arr, int(maxiter), float(gtol), int(em_iter))

        out, n_dev = run_chunked((ys.T,), (model.rows_data(),), call, batch_size, progress, shard)
    res = BatchResults(model, ys, BatchOut(*out), bool(reml), names)
    res.n_devices = n_dev
    return res
