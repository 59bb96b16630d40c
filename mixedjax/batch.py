"""One formula on many data sets in one vmapped call: :func:`fit_batch` (built on :mod:`mixedjax.many`)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pandas as pd

from .covariance import CovStructure
from .data import bucket, pad_groups
from .many import BatchResults, _BatchOut, _fit_vmapped, _n_devices, _working_width, run_chunked
from .model import MixedLM, mixedlm


def _relayout_z(model: MixedLM, vc_sizes: tuple[int, ...]) -> np.ndarray:
    """The model's random-effects columns with each variance component widened to ``vc_sizes``."""
    blocks = [model.exog_re]
    for v, size in zip(model.vc_designs, vc_sizes, strict=True):
        blocks.append(np.pad(v.values, ((0, 0), (0, size - v.size))))
    return np.concatenate(blocks, axis=1)


def fit_batch(
    formula: str,
    datasets: list[pd.DataFrame],
    groups: str,
    re_formula: str | None = None,
    vc_formula: dict[str, str] | None = None,
    weights: str | None = None,
    reml: bool = True,
    missing: str = "raise",
    maxiter: int = 200,
    gtol: float = 1e-6,
    em_iter: int = 30,
    batch_size: int | None = None,
    progress: bool | None = None,
    shard: bool = True,
    working: int | None = None,
) -> BatchResults:
    """Fit one formula to many data sets in one vmapped call (per chunk).

    Every data set is padded to one shape (group count and group size bucketed,
    variance components widened), so a single compiled program fits them all.
    The fixed-effects columns must agree across data sets (same levels of every
    categorical), else a ``ValueError`` names the data set and the columns.
    ``batch_size``, ``progress``, ``shard`` and ``working`` as in :func:`fit_many`.

    Examples
    --------
    >>> import mixedjax
    >>> d = mixedjax.datasets.load("sleepstudy")
    >>> res = mixedjax.fit_batch("Reaction ~ Days", [d, d.iloc[:100]], groups="Subject", re_formula="~Days")
    >>> res.fe_params.shape, res.nobs.tolist()
    ((2, 2), [180, 100])
    """
    if len(datasets) == 0:
        raise ValueError("fit_batch needs at least one data set")
    models = []
    for k, df in enumerate(datasets):
        try:
            models.append(mixedlm(formula, df, groups=groups, re_formula=re_formula, vc_formula=vc_formula,
                                  weights=weights, missing=missing))
        except ValueError as e:
            raise ValueError(f"data set {k}: {e}") from e
    first = models[0]
    for k, mm in enumerate(models[1:], start=1):
        if mm.exog_names != first.exog_names:
            raise ValueError(f"data set {k} has fixed-effects columns {mm.exog_names}; data set 0 has "
                             f"{first.exog_names} (give categoricals the same levels in every data set)")
        if mm.exog_re_names != first.exog_re_names or mm.structure.vc_names != first.structure.vc_names:
            raise ValueError(f"data set {k} has random-effects columns {mm.exog_re_names} and components "
                             f"{mm.structure.vc_names}; data set 0 has {first.exog_re_names} and "
                             f"{first.structure.vc_names}")
    vc_sizes = tuple(max(mm.structure.vc_sizes[j] for mm in models) for j in range(first.k_vc))
    structure = CovStructure(q_re=first.k_re, vc_sizes=vc_sizes, re_names=first.structure.re_names,
                             vc_names=first.structure.vc_names)
    g_pad = bucket(max(mm.n_groups for mm in models))
    n_pad = bucket(max(mm.group_index.n_max for mm in models))
    stacks: dict[str, list] = {k: [] for k in ("y", "mask", "x", "z", "w", "zmask")}
    for mm in models:
        z = _relayout_z(mm, vc_sizes)
        pg = pad_groups(mm.group_index, mm.endog, mm.exog, z, mm.weights, g_pad, n_pad)
        zmask = np.zeros((g_pad, structure.q))
        zmask[: mm.n_groups, : mm.k_re] = 1.0
        off = mm.k_re
        for v, size in zip(mm.vc_designs, vc_sizes, strict=True):
            for g, nm in enumerate(v.names):
                zmask[g, off : off + len(nm)] = 1.0
            off += size
        for key, val in zip(("y", "mask", "x", "z", "w", "zmask"),
                            (pg.y, pg.mask, pg.x, pg.z, pg.w, zmask), strict=True):
            stacks[key].append(np.asarray(val))
    arrays = tuple(np.stack(stacks[k]) for k in ("y", "mask", "x", "z", "w", "zmask"))
    theta0 = jnp.asarray(structure.theta_start())

    def call(yc, mc, xc, zc, wc, zmc):
        return _fit_vmapped(yc, mc, xc, zc, wc, zmc, theta0, structure, jnp.asarray(reml), int(maxiter),
                            float(gtol), int(em_iter), False, _working_width(yc.shape[0], _n_devices(shard), working))

    out, n_dev = run_chunked(arrays, (), call, batch_size, progress, shard)
    res = BatchResults(first, None, _BatchOut(*out), reml, [f"data{k}" for k in range(len(models))], models)
    res.n_devices = n_dev
    return res
