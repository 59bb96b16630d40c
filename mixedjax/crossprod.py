"""Per-group cross-products from rows, in numpy: the one interface between data engines and the fit.

For a per-group model with iid residuals the likelihood needs, per group ``g``, only
``Z_gᵀZ_g, Z_gᵀX_g, Z_gᵀy_g, X_gᵀX_g, X_gᵀy_g, y_gᵀy_g`` and ``n_g`` (rows whitened by
``√w`` under prior weights, plus ``Σ log w``).  They are sums over rows, so they can be
built from any pieces of the data (row batches of a Parquet file, partitions of a Dask
DataFrame, the rows each process holds) and added up in any order.  :func:`frame_sums`
is the one function that builds them from a pandas DataFrame; every engine applies it to
its pieces and sums the results (:mod:`mixedjax.sources`).

Everything here is numpy and pandas (formulaic's model specs are applied, never built): a
Dask worker that runs :func:`frame_sums` or :func:`frame_levels` needs neither JAX nor
the rest of mixedjax (:mod:`mixedjax.sources` ships this module's code to the workers by
value).

Layout: the cross-products of one group are the upper triangle of the Gram matrix of
``U = [X | Z columns not in X | y]`` (``m`` columns; a random intercept and slope on
columns of X add none), then ``n`` and ``Σ log w``: one row of ``m (m + 1) / 2 + 2``
numbers (:func:`packed_size`), so that a piece's result is a ``(groups, K)`` array (or a
DataFrame with a ``group`` column) and the sum over pieces is a per-group sum.
``z_index`` gives each column of Z its column of ``U`` (:func:`unpack`).

Examples
--------
>>> import numpy as np
>>> codes = np.array([0, 1, 0, 1, 1])
>>> cols = np.column_stack([np.ones(5), np.arange(5.0), np.arange(5.0) ** 2])  # x = (1, t), y
>>> groups, packed = group_gram(codes, cols)
>>> s = unpack(packed, p=2, z_index=(0,), groups=groups, n_groups=2)  # z = the intercept
>>> s.n.tolist(), s.ztx[:, 0, 1].tolist(), s.yty.tolist()
([2.0, 3.0], [2.0, 8.0], [16.0, 338.0])
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

ROWS_NOT_KEPT = ("the data were not kept in memory: this model was built from per-group cross-products "
                 "(a Parquet path, a Dask DataFrame or distributed=True), and {what} needs the rows. Fit the "
                 "model to an in-memory pandas DataFrame for it")


class GroupSums(NamedTuple):
    """Per-group cross-products of the whitened rows (numpy), groups in label order.

    ``ztz (G, q, q)``, ``ztx (G, q, p)``, ``zty (G, q)``, ``xtx (G, p, p)``, ``xty (G, p)``,
    ``yty (G,)``, ``n (G,)`` rows per group, ``logw (G,)`` ``Σ log w`` per group.
    """

    ztz: np.ndarray
    ztx: np.ndarray
    zty: np.ndarray
    xtx: np.ndarray
    xty: np.ndarray
    yty: np.ndarray
    n: np.ndarray
    logw: np.ndarray

    @property
    def nobs(self) -> int:
        return int(round(float(self.n.sum())))

    @property
    def sum_logw(self) -> float:
        return float(self.logw.sum())


def packed_size(m: int) -> int:
    """Numbers per group in the packed layout: the Gram triangle of the ``m`` columns ``U``, ``n``, ``Σ log w``."""
    return m * (m + 1) // 2 + 2


def group_gram(codes: np.ndarray, cols: np.ndarray | list[np.ndarray], logw: np.ndarray | None = None,
               n_groups: int | None = None, transposed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-group Gram triangles of ``cols``, row counts and ``Σ log w``: ``(groups present, packed (u, K))``.

    ``codes (n,)`` group index of each row, ``cols (n, m)`` (or a list of its ``m`` columns, never
    copied) the whitened ``U = [X | Z not in X | y]``.  One ``np.bincount`` per entry of the
    triangle over the groups of this piece (compacted first, so the cost is O(n m²) whatever the
    total number of groups).  With ``n_groups`` every group ``0 .. n_groups - 1`` gets a row
    (dense), else only those present.  ``transposed``: packed as ``(K, u)`` instead.
    """
    codes = np.asarray(codes)
    if n_groups is None:
        local, groups = pd.factorize(codes, sort=True)
        groups = np.asarray(groups, dtype=np.int64)
    else:
        local, groups = codes, np.arange(n_groups, dtype=np.int64)
    u = len(groups)
    ct = [np.asarray(c, dtype=float) for c in cols] if isinstance(cols, list | tuple) else \
        np.ascontiguousarray(np.asarray(cols, dtype=float).T)  # contiguous columns for the products
    m = len(ct)
    iu, ju = np.triu_indices(m)
    out = np.empty((len(iu) + 2, u))
    out[-2] = np.bincount(local, minlength=u)
    ones = [bool(c[:1].size == 0 or c[0] == 1.0) and bool(np.all(c == 1.0)) for c in ct]  # an intercept: no product
    buf = np.empty(len(local))  # one buffer for every product (a fresh 80 MB array per product costs page faults)
    for k, (i, j) in enumerate(zip(iu, ju, strict=True)):
        if ones[i] and ones[j]:
            out[k] = out[-2]
        else:
            wk = ct[j] if ones[i] else ct[i] if ones[j] else np.multiply(ct[i], ct[j], out=buf)
            out[k] = np.bincount(local, weights=wk, minlength=u)
    out[-1] = 0.0 if logw is None else np.bincount(local, weights=logw, minlength=u)
    return groups, (out if transposed else out.T)


def unpack(packed: Any, p: int, z_index: Iterable[int], groups: np.ndarray | None = None,
           n_groups: int | None = None, xp: Any = np) -> GroupSums:
    """:class:`GroupSums` of packed rows: ``p`` columns of X first in ``U``, ``z_index`` the column of ``U`` of
    each column of Z (``groups``: the rows' group codes, scattered into ``n_groups`` rows).

    ``xp``: the array module (``numpy``, or ``jax.numpy`` for packed rows on devices: the
    same gathers, so a sharded group axis stays sharded).
    """
    if groups is not None:
        dense = np.zeros((int(n_groups), np.shape(packed)[1]))
        dense[np.asarray(groups, dtype=np.int64)] = np.asarray(packed, dtype=float)
        packed = dense
    k = np.shape(packed)[1] - 2
    m = int(round((np.sqrt(8 * k + 1) - 1) / 2))
    iu, ju = np.triu_indices(m)
    entry = np.zeros((m, m), dtype=np.int64)
    entry[iu, ju] = np.arange(len(iu))
    entry[ju, iu] = np.arange(len(iu))
    zi, xi = np.asarray(list(z_index), dtype=np.int64), np.arange(p)

    def block(rows: np.ndarray, cols: np.ndarray) -> Any:
        return xp.take(packed, entry[np.ix_(rows, cols)].reshape(-1), axis=1).reshape((-1, len(rows), len(cols)))

    y = np.array([m - 1])
    return GroupSums(block(zi, zi), block(zi, xi), block(zi, y)[..., 0], block(xi, xi), block(xi, y)[..., 0],
                     packed[:, entry[m - 1, m - 1]], packed[:, -2], packed[:, -1])


def aliased_from_gram(gram: np.ndarray, names: list[str], nobs: int, tol: float = 1e-9) -> list[str]:
    """Columns that are linear combinations of earlier ones, from their Gram matrix ``Σ_g X_gᵀX_g``.

    The rule of :func:`mixedjax.formula.aliased_columns` (greedy, in order; norm of the
    residual of the unit-scaled column on the kept ones below ``tol √n + 1e-7``), with the
    residual norm taken from the Schur complement of the scaled Gram matrix.

    Examples
    --------
    >>> x = np.column_stack([np.ones(4), np.arange(4.0), 2 * np.arange(4.0)])
    >>> aliased_from_gram(x.T @ x, ["a", "b", "c"], 4)
    ['c']
    """
    gram = np.asarray(gram, dtype=float)
    scale = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    kept: list[int] = []
    aliased = []
    for j in range(gram.shape[0]):
        if scale[j] == 0:
            aliased.append(names[j])
            continue
        resid2 = 1.0
        if kept:
            c = gram[np.ix_(kept, kept)] / np.outer(scale[kept], scale[kept])
            b = gram[kept, j] / (scale[kept] * scale[j])
            try:
                resid2 = 1.0 - b @ np.linalg.solve(c, b)
            except np.linalg.LinAlgError:
                resid2 = 0.0
        if np.sqrt(max(resid2, 0.0)) < tol * np.sqrt(nobs) + 1e-7:
            aliased.append(names[j])
            continue
        kept.append(j)
    return aliased


# ============================================================================ levels, before any design
@dataclass(frozen=True)
class LevelPlan:
    """What the first pass over the pieces collects: levels of the categorical columns and the group ids.

    ``columns``: every column the model uses (rows with a missing value in any of them are
    dropped, or reported, as ``missing`` says); ``categorical``: columns whose levels the
    designs need; ``group``: the grouping column; ``response``, ``weights``: checked to be
    numeric and (weights) positive.
    """

    columns: tuple[str, ...]
    categorical: tuple[str, ...]
    group: str
    response: str
    weights: str | None = None
    missing: str = "raise"


def plain_strings(frame: pd.DataFrame) -> pd.DataFrame:
    """String columns with ``pd.NA`` (``string[pyarrow]``, Dask's default) as pandas' default ``str``, which
    formulaic codes as a factor (it takes the ``pd.NA`` kind for values)."""
    cols = [c for c in frame.columns if isinstance(frame[c].dtype, pd.StringDtype) and frame[c].dtype.na_value is pd.NA]
    return frame.astype({c: "str" for c in cols}) if cols else frame


def finite_rows(frame: pd.DataFrame, columns: Iterable[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(rows with no missing or non-finite value in columns, per column its bad-row mask)``."""
    keep = np.ones(len(frame), dtype=bool)
    bad = {}
    for col in columns:
        s = frame[col]
        isna = s.isna().to_numpy()
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            isna = isna | ~np.isfinite(s.to_numpy(dtype=float, na_value=np.nan))
        if isna.any():
            bad[col] = isna
            keep &= ~isna
    return keep, bad


def _values_in_order(s: pd.Series) -> tuple[str, Any]:
    """``("categories", all categories)`` of a categorical column, else ``("values", unique values)`` (an array,
    in order of first appearance)."""
    if isinstance(s.dtype, pd.CategoricalDtype):
        return "categories", list(s.cat.categories)
    return "values", pd.unique(s.to_numpy())


def frame_levels(frame: pd.DataFrame, plan: LevelPlan) -> dict:
    """The first pass on one piece: rows, missing values, levels and group ids (plain Python containers).

    Returns ``{"rows", "kept", "bad": {column: (count, first row label)}, "levels": {column:
    (kind, values)}, "groups": (kind, values)}``, where ``kind`` is ``"categories"`` for a
    categorical column (every category, in order) or ``"values"`` (unique values present);
    a categorical grouping column also lists ``"groups_used"``, the categories present.
    Pieces are merged with :func:`merge_levels`.

    Examples
    --------
    >>> df = pd.DataFrame({"y": [1.0, np.nan, 3.0], "g": ["b", "a", "b"], "s": ["u", "v", "w"]})
    >>> out = frame_levels(df, LevelPlan(("y", "g", "s"), ("s",), "g", "y", missing="drop"))
    >>> out["kept"], out["bad"]["y"], out["groups"][1].tolist(), out["levels"]["s"][1].tolist()
    (2, (1, 1), ['b'], ['u', 'w'])
    """
    frame = plain_strings(frame[list(plan.columns)])
    for col in (plan.response, plan.weights):
        if col is not None and (not pd.api.types.is_numeric_dtype(frame[col]) or
                                pd.api.types.is_bool_dtype(frame[col])):
            raise ValueError(f"the {'response' if col == plan.response else 'weights'} {col!r} is not numeric "
                             f"(dtype {frame[col].dtype})")
    rows = len(frame)
    keep, bad = finite_rows(frame, plan.columns)
    report = {c: (int(m.sum()), frame.index[np.flatnonzero(m)[0]]) for c, m in bad.items()}
    if plan.missing != "none" and not keep.all():
        frame = frame.loc[keep]
    out: dict[str, Any] = {"rows": rows, "kept": len(frame), "bad": report,
                           "levels": {c: _values_in_order(frame[c]) for c in plan.categorical}}
    g = frame[plan.group]
    out["groups"] = _values_in_order(g)
    if isinstance(g.dtype, pd.CategoricalDtype):
        out["groups_used"] = list(g.cat.categories[np.unique(g.cat.codes.to_numpy()[g.cat.codes.to_numpy() >= 0])])
    return out


def _union(a: Any, b: Any) -> Any:
    """``a`` then the values of ``b`` not in ``a``, in order (lists stay lists, arrays arrays)."""
    if len(a) == 0:
        return b
    if isinstance(a, list):
        seen = pd.Index(a)
        new = [v for v, hit in zip(b, seen.get_indexer(list(b)) >= 0, strict=True) if not hit]
        return a + list(dict.fromkeys(new))
    return pd.unique(np.concatenate([np.asarray(a), np.asarray(b)]))


def merge_levels(parts: Iterable[dict]) -> dict:
    """Merge :func:`frame_levels` results (in piece order): counts add, levels unite in order.

    Examples
    --------
    >>> a = {"rows": 2, "kept": 2, "bad": {}, "levels": {"s": ("values", ["v"])}, "groups": ("values", [2, 1])}
    >>> b = {"rows": 1, "kept": 1, "bad": {}, "levels": {"s": ("values", ["u"])}, "groups": ("values", [3, 1])}
    >>> m = merge_levels([a, b])
    >>> m["rows"], m["levels"]["s"], m["groups"]
    (3, ('values', ['v', 'u']), ('values', [2, 1, 3]))
    >>> a["groups"], b["groups"] = ("values", np.array([2, 1])), ("values", np.array([3, 1]))
    >>> merge_levels([a, b])["groups"][1].tolist()
    [2, 1, 3]
    """
    out: dict[str, Any] = {"rows": 0, "kept": 0, "bad": {}, "levels": {}, "groups": None}
    for part in parts:
        out["rows"] += part["rows"]
        out["kept"] += part["kept"]
        for c, (k, first) in part["bad"].items():
            n0, f0 = out["bad"].get(c, (0, first))
            out["bad"][c] = (n0 + k, f0)
        for c, (kind, vals) in part["levels"].items():
            k0, v0 = out["levels"].get(c, (kind, vals[:0]))
            out["levels"][c] = (k0, _union(v0, vals)) if k0 == kind else ("values", _union(list(v0), list(vals)))
        kind, vals = part["groups"]
        k0, v0 = out["groups"] or (kind, vals[:0])
        out["groups"] = (k0, _union(v0, vals)) if k0 == kind else ("values", _union(list(v0), list(vals)))
        if "groups_used" in part:
            out["groups_used"] = _union(out.get("groups_used", []), part["groups_used"])
    return out


def ordered_levels(kind: str, values: Any, used: Any = None) -> list:
    """The level order an in-memory fit gives: a categorical's categories (``used``: only those present, the
    grouping factor's rule), else the sorted values (pandas' ``factorize(sort=True)``, formulaic's order)."""
    if kind == "categories":
        if used is None:
            return list(values)
        present = set(used)
        return [v for v in values if v in present]
    try:
        return np.sort(np.asarray(values)).tolist() if np.asarray(values).dtype.kind in "biuf" else sorted(values)
    except TypeError:  # mixed types: pandas' order
        return list(pd.Index(list(values)).sort_values())


# ================================================================================== cross-products
@dataclass(frozen=True)
class DesignPlan:
    """How :func:`frame_sums` turns rows into cross-products: everything fixed before the second pass.

    ``fixed``: formulaic model spec of the fixed effects; ``random``: one spec per
    random-effects design (``None``: an intercept column); ``z_columns``: the columns of Z
    as ``(design index, column index)``, design ``-1`` being the fixed effects' (a column
    of X is not repeated in ``U``; :meth:`z_index`); ``labels``: the group ids in group
    order.  The
    specs were built on a frame holding every level of every categorical column (collected
    over all pieces by :func:`frame_levels`), and formulaic codes each piece by the levels
    stored in them, so every piece codes its factors alike.
    """

    columns: tuple[str, ...]
    response: str
    group: str
    fixed: Any
    random: tuple = ()
    z_columns: tuple[tuple[int, int], ...] = ()
    labels: Any = None
    weights: str | None = None

    def z_index(self, p: int) -> tuple[int, ...]:
        """The column of ``U = [X | Z not in X | y]`` of each column of Z."""
        out, extra = [], p
        for k, j in self.z_columns:
            if k < 0:
                out.append(j)
            else:
                out.append(extra)
                extra += 1
        return tuple(out)


def plain_columns(spec: Any, frame: pd.DataFrame) -> list[str] | None:
    """The design's columns when each is the intercept or a numeric column taken as it is (else ``None``)."""
    names = list(spec.column_names)
    state = spec.encoder_state
    for c in names:
        if c == "Intercept":
            continue
        if c not in frame.columns or not pd.api.types.is_numeric_dtype(frame[c]) or \
                str(getattr(state.get(c, ("",))[0], "value", "")) != "numerical":
            return None
    return names


def _design(spec: Any, frame: pd.DataFrame) -> np.ndarray:
    if spec is None:
        return np.ones((len(frame), 1))
    plain = plain_columns(spec, frame)
    if plain is not None:  # numeric columns and an intercept: formulaic's result, without its per-call overhead
        out = np.empty((len(frame), len(plain)))
        for j, c in enumerate(plain):
            out[:, j] = 1.0 if c == "Intercept" else frame[c].to_numpy(dtype=float)
        return out
    return np.asarray(spec.get_model_matrix(frame, na_action="ignore"), dtype=float)


def frame_rows(frame: pd.DataFrame, plan: DesignPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(group codes (n,), whitened U = [X | Z not in X | y] (n, m), log w (n,) or None)`` of a piece's complete
    rows."""
    frame = plain_strings(frame[list(plan.columns)])
    keep, _ = finite_rows(frame, plan.columns)
    if not keep.all():
        frame = frame.loc[keep]
    labels = plan.labels if isinstance(plan.labels, pd.Index) else pd.Index(plan.labels)
    codes = labels.get_indexer(frame[plan.group])  # the Index keeps its hash table: built once per process
    if len(codes) and codes.min() < 0:
        raise ValueError(f"a group id of column {plan.group!r} was not seen when the groups were collected")
    x = _design(plan.fixed, frame)
    used = {k for k, _ in plan.z_columns if k >= 0}
    designs = {k: _design(plan.random[k], frame) for k in used}
    extra = [designs[k][:, j] for k, j in plan.z_columns if k >= 0]
    y = frame[plan.response].to_numpy(dtype=float)
    cols = np.column_stack([x, *extra, y])
    logw = None
    if plan.weights is not None:
        w = frame[plan.weights].to_numpy(dtype=float)
        if np.any(w <= 0):
            i = int(np.flatnonzero(w <= 0)[0])
            raise ValueError(f"weights must be positive: {int(np.sum(w <= 0))} are zero or negative in a piece "
                             f"(row {frame.index[i]!r}, value {w[i]})")
        cols = cols * np.sqrt(w)[:, None]
        logw = np.log(w)
    return codes, cols, logw


def frame_sums(frame: pd.DataFrame, plan: DesignPlan) -> tuple[np.ndarray, np.ndarray]:
    """The per-group cross-products of one piece of rows: ``(group codes present (u,), packed (u, K))``.

    The one function that builds cross-products from rows: the Parquet, Dask and
    multi-process paths apply it to their pieces and sum (:func:`unpack` reads the packed
    rows).  Rows with a missing value in a used column are skipped (the first pass has
    reported or counted them).

    Examples
    --------
    >>> from formulaic import model_matrix
    >>> df = pd.DataFrame({"y": [1.0, 2.0, 4.0], "x": [0.0, 1.0, 2.0], "g": ["a", "b", "a"]})
    >>> spec = model_matrix("1 + x", df).model_spec
    >>> plan = DesignPlan(("y", "x", "g"), "y", "g", spec, (), ((-1, 0), (-1, 1)), labels=["a", "b"])
    >>> groups, packed = frame_sums(df, plan)  # Z = (1, x): both columns of X, so U = [1, x, y]
    >>> packed.shape
    (2, 8)
    >>> s = unpack(packed, p=2, z_index=plan.z_index(2), groups=groups, n_groups=2)
    >>> s.xty.tolist(), s.n.tolist()
    ([[5.0, 8.0], [2.0, 2.0]], [2.0, 1.0])
    """
    codes, cols, logw = frame_rows(frame, plan)
    return group_gram(codes, cols, logw)


def frame_sums_frame(frame: pd.DataFrame, plan: DesignPlan) -> pd.DataFrame:
    """:func:`frame_sums` as a DataFrame (column ``group``, then ``s0 .. s{K-1}``), for Dask's per-group sum."""
    groups, packed = frame_sums(frame, plan)
    out = pd.DataFrame(packed, columns=[f"s{k}" for k in range(packed.shape[1])])
    out.insert(0, "group", groups)
    return out


def sums_meta(m: int) -> pd.DataFrame:
    """An empty frame with :func:`frame_sums_frame`'s columns and dtypes for ``m`` columns in ``U`` (Dask's
    ``meta``)."""
    k = packed_size(m)
    out = pd.DataFrame({f"s{j}": pd.Series([], dtype=float) for j in range(k)})
    out.insert(0, "group", pd.Series([], dtype=np.int64))
    return out


def head_rows(frame: pd.DataFrame, n: int) -> pd.DataFrame:
    """The first ``n`` rows of a piece (the rows on which the designs' kinds of columns are read)."""
    return frame.head(n)


def _bound(fn: Callable, args: tuple) -> Callable:
    return lambda *first: fn(*first, *args)


class Shipped:
    """``fn(piece, *args)`` for Dask tasks, pickled as cloudpickle bytes carrying this module's code by value.

    Dask's serialiser uses plain ``pickle`` where it can, which would name
    ``mixedjax.crossprod`` and make every worker import mixedjax (and with it JAX).  A
    ``Shipped`` pickles to ``cloudpickle.loads(<bytes>)``: the worker gets the function,
    the module's functions it calls and the plan's classes themselves, and imports only
    numpy, pandas, formulaic and cloudpickle.

    Examples
    --------
    >>> import pickle
    >>> f = pickle.loads(pickle.dumps(Shipped(head_rows, 1)))
    >>> f(pd.DataFrame({"a": [1, 2]})).shape
    (1, 1)
    """

    def __init__(self, fn: Callable, *args: Any) -> None:
        self.fn = fn
        self.args = args
        self.token = uuid.uuid4().hex

    def __call__(self, *first: Any) -> Any:
        return self.fn(*first, *self.args)

    def __reduce__(self) -> tuple:
        import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])
        return cloudpickle.loads, (cloudpickle.dumps(_bound(self.fn, self.args)),)

    def __dask_tokenize__(self) -> str:
        return self.token
