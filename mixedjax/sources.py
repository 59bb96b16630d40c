"""Data engines that feed per-group models without holding the rows: Parquet in row batches, Dask, processes.

A per-group model with iid residuals needs only per-group cross-products
(:mod:`mixedjax.crossprod`).  This module gets them from data that never sit in one
process's memory, in two passes over the pieces of the data:

1. **levels** (:func:`mixedjax.crossprod.frame_levels` on every piece, then one merge):
   rows, missing values (reported or dropped as ``missing`` says, exactly as in memory),
   every level of every categorical column and every group id, collected once across all
   pieces before any design is built (pyarrow's dictionaries are per batch; a Dask
   partition sees only its own values).  The designs' formulaic specs are then built on a
   small frame holding every level, so every piece codes its factors alike.
2. **cross-products** (:func:`mixedjax.crossprod.frame_sums` on every piece, then a
   per-group sum).

The pieces:

* a Parquet file or a directory of them (``str`` / ``os.PathLike``, or a list): row batches
  read with ``pyarrow.dataset`` (``batch_size`` rows at a time); rows need not be sorted by
  group and a group may span files;
* a Dask DataFrame: both passes run as Dask tasks (``to_delayed`` for the levels,
  ``map_partitions`` then ``groupby("group").sum()`` for the cross-products), locally or on
  a ``dask.distributed`` cluster; only levels and cross-products come back.  The code that
  runs on the workers is this package's numpy module :mod:`mixedjax.crossprod`, shipped by
  value: workers need neither JAX nor an installed mixedjax;
* with ``distributed=True`` (several processes started with ``jax.distributed``), each
  process's own rows (any of the above, or a pandas DataFrame): levels are gathered from
  every process, and the cross-products summed over processes into a group axis sharded
  over every process's devices (:mod:`mixedjax.sharding`).

pyarrow and dask are optional (``pip install "mixedjax[parquet]"``, ``"mixedjax[dask]"``),
imported when a path or a Dask DataFrame is given.

Examples
--------
>>> import pathlib, tempfile
>>> import mixedjax
>>> d = mixedjax.datasets.load("sleepstudy")
>>> path = pathlib.Path(tempfile.mkdtemp()) / "sleep.parquet"
>>> d.sample(frac=1.0, random_state=0).to_parquet(path)  # rows shuffled: groups need not be sorted
>>> src = prepare(path, "Reaction", "Days", ["Days"], "Subject", batch_size=50)
>>> src.nobs, len(src.labels), list(src.fixed_design.columns)
(180, 18, ['Intercept', 'Days'])
>>> acc = src.accumulate([(0, 0), (0, 1)])
>>> acc.packed.shape, acc.z_index, float(acc.n.sum())  # U = [Intercept, Days, Reaction]: Z = X's columns
((18, 8), (0, 1), 180.0)
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from . import crossprod as cpm
from . import formula as fml
from . import sharding
from .crossprod import (
    DesignPlan,
    LevelPlan,
    Shipped,
    frame_levels,
    frame_sums,
    merge_levels,
    ordered_levels,
    packed_size,
)
from .data import bucket

DEFAULT_BATCH_ROWS = 1 << 19


# =========================================================================================== pieces
def is_dask_frame(data: Any) -> bool:
    """A Dask DataFrame (without importing dask)."""
    return type(data).__module__.split(".")[0] == "dask" and hasattr(data, "map_partitions") and \
        hasattr(data, "to_delayed") and hasattr(data, "columns")


def is_path(data: Any) -> bool:
    if isinstance(data, str | os.PathLike):
        return True
    return isinstance(data, list | tuple) and len(data) > 0 and all(isinstance(d, str | os.PathLike) for d in data)


def is_source(data: Any) -> bool:
    """Data the out-of-core path reads: a Parquet path (or list of paths) or a Dask DataFrame."""
    return is_path(data) or is_dask_frame(data)


class Pieces:
    """The pieces of one data set: its columns, a few first rows, the two passes."""

    description = ""

    @property
    def columns(self) -> list[str]:
        raise NotImplementedError

    def head(self, columns: list[str], n: int) -> pd.DataFrame:
        raise NotImplementedError

    def levels(self, plan: LevelPlan) -> dict:
        raise NotImplementedError

    def sums(self, plan: DesignPlan, m: int, n_groups: int) -> np.ndarray:
        """Dense ``(n_groups, K)`` packed cross-products of every row."""
        raise NotImplementedError


class ParquetPieces(Pieces):
    """Parquet files read file by file in row batches of ``batch_size`` rows (``pyarrow.parquet.ParquetFile``)."""

    def __init__(self, path: Any, batch_size: int | None = None) -> None:
        try:
            import pyarrow.dataset as pads
        except ImportError as e:  # an optional extra
            raise ImportError("reading Parquet needs pyarrow: pip install 'mixedjax[parquet]'") from e
        paths = [os.fspath(p) for p in path] if isinstance(path, list | tuple) else os.fspath(path)
        for p in paths if isinstance(paths, list) else [paths]:
            if not os.path.exists(p):
                raise FileNotFoundError(f"no such Parquet file or directory: {p!r}")
        self.dataset = pads.dataset(paths, format="parquet")
        self.batch_size = int(batch_size or DEFAULT_BATCH_ROWS)
        n_files = len(self.dataset.files)
        self.description = f"Parquet ({n_files} file{'s' if n_files != 1 else ''}, batches of {self.batch_size} rows)"

    @property
    def columns(self) -> list[str]:
        return list(self.dataset.schema.names)

    def head(self, columns: list[str], n: int) -> pd.DataFrame:
        # not dataset.head(): it scans ahead over several files (850 MB at 20M rows for 1,000 rows)
        return next(self.batches(columns, n), None) if self.dataset.files else None

    def batches(self, columns: list[str], batch_size: int | None = None) -> Iterator[pd.DataFrame]:
        """pandas frames of ``batch_size`` rows (fewer at file ends), indexed by row number in the data set.

        One file at a time, one row group decoded at a time (``iter_batches``): pyarrow's
        dataset scanner reads 16 batches and 4 files ahead by default, which held 1.4 GB at 20M
        rows and was slower on 2 cores.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        offset = 0
        for f in self.dataset.files:
            with pq.ParquetFile(f, filesystem=self.dataset.filesystem) as pf:
                for batch in pf.iter_batches(batch_size=batch_size or self.batch_size, columns=columns):
                    if batch.num_rows == 0:
                        continue
                    frame = batch.to_pandas()
                    del batch
                    frame.index = pd.RangeIndex(offset, offset + len(frame))
                    offset += len(frame)
                    yield frame
            pa.default_memory_pool().release_unused()  # the decoded row groups' pages, back to the system

    def levels(self, plan: LevelPlan) -> dict:
        return merge_levels(frame_levels(b, plan) for b in self.batches(list(plan.columns)))

    def sums(self, plan: DesignPlan, m: int, n_groups: int) -> np.ndarray:
        acc = np.zeros((n_groups, packed_size(m)))
        for b in self.batches(list(plan.columns)):
            groups, packed = frame_sums(b, plan)
            acc[groups] += packed  # group codes of a piece are unique
        return acc


class DaskPieces(Pieces):
    """A Dask DataFrame: both passes as Dask tasks running :mod:`mixedjax.crossprod`'s numpy functions.

    The functions travel by value (:class:`mixedjax.crossprod.Shipped`): the workers need
    neither JAX nor mixedjax.
    """

    def __init__(self, ddf: Any) -> None:
        self.ddf = ddf
        self.description = f"Dask DataFrame ({ddf.npartitions} partitions)"

    @property
    def columns(self) -> list[str]:
        return [str(c) for c in self.ddf.columns]

    def head(self, columns: list[str], n: int) -> pd.DataFrame:
        import dask

        first = self.ddf[columns].to_delayed()[0]
        return dask.delayed(Shipped(cpm.head_rows, n), pure=True)(first).compute()

    def levels(self, plan: LevelPlan) -> dict:
        import dask

        parts = self.ddf[list(plan.columns)].to_delayed()
        one = dask.delayed(Shipped(cpm.frame_levels, plan), pure=True)
        return dask.delayed(Shipped(cpm.merge_levels), pure=True)([one(part) for part in parts]).compute()

    def sums(self, plan: DesignPlan, m: int, n_groups: int) -> np.ndarray:
        per_piece = self.ddf[list(plan.columns)].map_partitions(Shipped(cpm.frame_sums_frame, plan),
                                                                meta=cpm.sums_meta(m), align_dataframes=False)
        # pairwise combines: at 10M rows and 1M groups (local threads) peak memory 2.1 GB instead of 3.0 GB, and faster
        total = per_piece.groupby("group").sum(split_every=2).compute()
        acc = np.zeros((n_groups, packed_size(m)))
        acc[total.index.to_numpy(dtype=np.int64)] = total.to_numpy(dtype=float)
        return acc


class FramePieces(Pieces):
    """An in-memory pandas DataFrame as one piece (a process's own rows under ``distributed=True``)."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame = frame
        self.description = f"DataFrame ({len(frame)} rows)"

    @property
    def columns(self) -> list[str]:
        return [str(c) for c in self.frame.columns]

    def head(self, columns: list[str], n: int) -> pd.DataFrame:
        return self.frame[columns].head(n)

    def levels(self, plan: LevelPlan) -> dict:
        return merge_levels([frame_levels(self.frame, plan)])

    def sums(self, plan: DesignPlan, m: int, n_groups: int) -> np.ndarray:
        groups, packed = frame_sums(self.frame, plan)
        acc = np.zeros((n_groups, packed_size(m)))
        acc[groups] = packed
        return acc


def pieces_of(data: Any, batch_size: int | None = None) -> Pieces:
    """The :class:`Pieces` reader of ``data``: a Parquet path (or list), a Dask DataFrame or a pandas DataFrame."""
    if is_dask_frame(data):
        return DaskPieces(data)
    if is_path(data):
        return ParquetPieces(data, batch_size)
    if isinstance(data, pd.DataFrame):
        return FramePieces(data)
    raise ValueError(f"data must be a pandas DataFrame, a Parquet path or a Dask DataFrame, got "
                     f"{type(data).__name__}")


# ====================================================================================== first pass
_STATEFUL = re.compile(r"\b(center|scale|standardize|bs|cs|cr|cc|te|poly|lag)\s*\(")
_STATEFUL_MESSAGE = ("the formula {!r} has a data-dependent transform (center, scale, splines, poly, ...): out of "
                     "memory its state would come from part of the data. Compute the column before writing the "
                     "data, or fit in memory")


def _categorical_columns(formulas: list[str], probe: pd.DataFrame) -> set[str]:
    """Columns whose levels a design needs: those behind every categorical factor of the formulas' specs on
    the first rows, and every non-numeric column the formulas use."""
    out = set()
    for f in formulas:
        if fml.as_rhs(f) in ("0", "-1", "1", ""):
            continue
        if _STATEFUL.search(f):
            raise NotImplementedError(_STATEFUL_MESSAGE.format(f))
        spec = fml.design(f, probe).attrs.get("model_spec")
        if spec is None:
            continue
        if spec.transform_state:
            raise NotImplementedError(_STATEFUL_MESSAGE.format(f))
        kinds = spec.encoder_state
        for factor, variables in spec.factor_variables.items():
            state = kinds.get(str(factor))
            if state is not None and str(getattr(state[0], "value", state[0])) == "categorical":
                out |= {v for v in variables if v in probe.columns}
    for c in probe.columns:
        s = probe[c]
        if not pd.api.types.is_numeric_dtype(s) or isinstance(s.dtype, pd.CategoricalDtype):
            out.add(c)
    return out


def _missing_report(bad: dict) -> str:
    return "; ".join(f"column {c!r}: {k} row(s) NaN or infinite (first at row {first!r})"
                     for c, (k, first) in bad.items())


def _prototype(levels: dict, probe: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """A small frame with every level of every categorical column (numeric columns from the first rows), on which
    the designs' formulaic specs are built."""
    n = max([len(v) for _, v in levels.values()] + [1])
    out = {}
    for c in columns:
        if c in levels:
            kind, values = levels[c]
            vals = values if values else [np.nan]
            cyc = [vals[i % len(vals)] for i in range(n)]
            if kind == "categories":
                out[c] = pd.Categorical(cyc, categories=values)
            else:
                arr = np.asarray(cyc)
                out[c] = arr if arr.dtype.kind in "biuf" else np.asarray(cyc, dtype=object)
        else:
            s = probe[c].dropna() if c in probe.columns else pd.Series([], dtype=float)
            vals = s.to_numpy() if len(s) else np.zeros(1)
            out[c] = np.resize(vals, n)
    return pd.DataFrame(out)


@dataclass
class Accumulated:
    """The cross-products of every row: ``packed (G, K)`` (numpy, or a group-sharded JAX array across
    processes) in :mod:`mixedjax.crossprod`'s layout (``p`` columns of X, ``z_index`` the columns of Z), the
    group ``labels``, rows per group ``n (G,)`` and the totals ``gram`` = ``Σ_g [Z X y]ᵀW[Z X y]`` (for rank
    checks) on the host of every process."""

    packed: Any
    p: int
    z_index: tuple[int, ...]
    labels: list
    n: np.ndarray
    gram: np.ndarray
    distributed: bool

    @property
    def nobs(self) -> int:
        return int(round(float(self.n.sum())))

    @property
    def q(self) -> int:
        return len(self.z_index)


@dataclass
class PreparedSource:
    """The result of the first pass: designs (on the prototype frame, with their formulaic specs), group ids, rows.

    ``fixed_design``/``random_designs``: DataFrames whose ``attrs["model_spec"]`` code new data
    as the fit did (:func:`mixedjax.formula.design_like`); :meth:`accumulate` runs the second
    pass for a choice of Z columns.
    """

    pieces: Pieces
    response: str
    group: str
    weights: str | None
    columns: list[str]
    fixed_design: pd.DataFrame
    random_designs: list[pd.DataFrame]
    labels: list
    nobs: int
    n_dropped: int
    distributed: bool

    @property
    def description(self) -> str:
        return self.pieces.description + (" per process, distributed" if self.distributed else "")

    def accumulate(self, z_columns: Sequence[tuple[int, int]]) -> Accumulated:
        """The second pass: per-group cross-products with Z = the ``(random design, column)`` columns, summed.

        A column of Z that is also a column of X (same name: ``1 + x`` on ``y ~ x``) is taken
        from X, so the per-group Gram matrices are no larger than they need be.
        """
        q, p = len(z_columns), self.fixed_design.shape[1]
        fixed_names = list(self.fixed_design.columns)
        z_columns = tuple((-1, fixed_names.index(self.random_designs[k].columns[j]))
                          if self.random_designs[k].columns[j] in fixed_names else (k, j) for k, j in z_columns)
        plan = DesignPlan(tuple(self.columns), self.response, self.group, self.fixed_design.attrs.get("model_spec"),
                          tuple(d.attrs.get("model_spec") for d in self.random_designs), z_columns,
                          pd.Index(self.labels), self.weights)
        z_index = plan.z_index(p)
        m = p + sum(k >= 0 for k, _ in z_columns) + 1
        g = len(self.labels)
        local = self.pieces.sums(plan, m, g)
        if not self.distributed:
            gram = _gram(cpm.unpack(local.sum(axis=0, keepdims=True), p, z_index), q, p)
            return Accumulated(local, p, z_index, self.labels, local[:, -2].copy(), gram, False)
        total = sharding.global_cross_products(local, bucket(g))  # the group count the model pads to
        n = sharding.gather_rows(total[:, -2])[:g]
        every = np.sum([np.asarray(t) for t in sharding.allgather_objects(local.sum(axis=0))], axis=0)
        gram = _gram(cpm.unpack(every[None, :], p, z_index), q, p)
        return Accumulated(total, p, z_index, self.labels, n, gram, True)


def _gram(s: cpm.GroupSums, q: int, p: int) -> np.ndarray:
    """The Gram matrix of ``[Z | X | y]`` from one row of sums."""
    m = q + p + 1
    gram = np.zeros((m, m))
    gram[:q, :q], gram[:q, q : q + p], gram[:q, -1] = s.ztz[0], s.ztx[0], s.zty[0]
    gram[q : q + p, q : q + p], gram[q : q + p, -1], gram[-1, -1] = s.xtx[0], s.xty[0], s.yty[0]
    return np.triu(gram) + np.triu(gram, 1).T


def prepare(data: Any, response: str, fixed: str, random: Sequence[str], group: str, weights: str | None = None,
            missing: str = "raise", batch_size: int | None = None, distributed: bool = False) -> PreparedSource:
    """The first pass over ``data`` (a Parquet path, a Dask DataFrame, or with ``distributed`` this process's rows).

    Parameters
    ----------
    data : str, os.PathLike, list of paths, dask.dataframe.DataFrame or pandas.DataFrame
    response : str
        The response column.
    fixed : str
        Right-hand side of the fixed effects (``"x1 + C(site)"``).
    random : list of str
        Right-hand sides of the random-effects designs (``"1"``, ``"Days"``).
    group : str
        The grouping column.
    weights : str, optional
        Column of prior weights.
    missing : {"raise", "drop", "none"}
        As in memory: raise naming the columns, or drop those rows with a warning.
    batch_size : int, optional
        Rows per Parquet batch (default 524,288).
    distributed : bool
        ``data`` are this process's rows; the levels and group ids of every process are
        united (every process must call this with its own rows).

    Returns
    -------
    PreparedSource
    """
    if missing not in ("raise", "drop", "none"):
        raise ValueError(f"missing must be 'raise', 'drop' or 'none', got {missing!r}")
    pieces = pieces_of(data, batch_size)
    empty = pd.DataFrame(columns=pieces.columns)
    if response not in empty.columns:
        raise ValueError(f"response column {response!r} is not in the data; available: {list(empty.columns)}")
    used = [response] + fml.required_columns("~" + fml.as_rhs(fixed), empty, "formula")
    for f in random:
        if fml.as_rhs(f) not in ("0", "1", "-1"):
            used += fml.required_columns("~" + fml.as_rhs(f), empty, "random-effects formula")
    if group not in empty.columns:
        raise ValueError(f"groups column {group!r} is not in the data; available: {list(empty.columns)}")
    used.append(group)
    if weights is not None:
        if weights not in empty.columns:
            raise ValueError(f"weights column {weights!r} is not in the data")
        used.append(weights)
    used = list(dict.fromkeys(used))
    probe = pieces.head(used, 1000)
    probe = cpm.plain_strings(probe if probe is not None else pd.DataFrame({c: [] for c in used}))
    if not distributed and len(probe) == 0:
        raise ValueError("no observations: the data are empty")
    categorical = _categorical_columns([fixed, *random], probe) - {group}
    lplan = LevelPlan(tuple(used), tuple(sorted(categorical)), group, response, weights, missing)
    parts = [pieces.levels(lplan)]
    if distributed:
        parts = sharding.allgather_objects(parts[0])
        probes = sharding.allgather_objects(probe)
        probe = next((p for p in probes if len(p)), probe)
    merged = merge_levels(parts)
    merged["bad"] = {c: merged["bad"][c] for c in used if c in merged["bad"]}  # in the columns' order, as in memory
    if merged["bad"] and missing != "none":
        if missing == "raise":
            raise ValueError("missing or non-finite values: " + _missing_report(merged["bad"])
                             + ". Pass missing='drop' to drop those rows.")
        warnings.warn(f"dropped {merged['rows'] - merged['kept']} row(s) with missing or non-finite values: "
                      + _missing_report(merged["bad"]), UserWarning, stacklevel=3)
    if merged["kept"] == 0:
        raise ValueError("no observations left after dropping missing values" if merged["rows"] else
                         "no observations: the data are empty")
    kind, values = merged["groups"]
    labels = ordered_levels(kind, values, merged.get("groups_used") if kind == "categories" else None)
    levels = {c: (k, ordered_levels(k, v) if k == "values" else list(v)) for c, (k, v) in merged["levels"].items()}
    proto = _prototype(levels, probe, [c for c in used if c != group])
    x = fml.design(fixed, proto)
    zs = [fml.design(f, proto) for f in random]
    return PreparedSource(pieces, response, group, weights, used, x, zs, labels, int(merged["kept"]),
                          int(merged["rows"] - merged["kept"]) if missing != "none" else 0, distributed)


__all__ = ["Accumulated", "DEFAULT_BATCH_ROWS", "PreparedSource", "is_dask_frame", "is_path", "is_source",
           "pieces_of", "prepare"]
