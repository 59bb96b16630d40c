"""Formulas and data frames to design matrices, with the input checks users need.

Uses formulaic: categoricals keep their pandas category order (first level is
the reference, as R's treatment contrasts), interactions, ``C(x)`` and
``np.log(x)`` work.  Every check names the column, the group or the problem.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from formulaic import Formula, model_matrix

from .crossprod import plain_columns


def as_rhs(formula: str) -> str:
    f = formula.strip()
    return f[1:].strip() if f.startswith("~") else f


def required_columns(formula: str, data: pd.DataFrame, what: str) -> list[str]:
    """Columns of ``data`` a formula uses; ``ValueError`` naming any that are missing."""
    try:
        needed = Formula(formula).required_variables
    except Exception as e:  # formulaic raises several parser errors
        raise ValueError(f"cannot parse {what} {formula!r}: {e}") from e
    names = {n for n in needed if n not in ("np", "C", "numpy")}
    missing = sorted(n for n in names if n not in data.columns)
    if missing:
        raise ValueError(
            f"{what} {formula!r} uses column(s) {missing} not in the data; available: {list(data.columns)}"
        )
    return sorted(names)


SPEC_ROWS = 64
"""Rows from which the formulaic spec of a large design is taken when every column of the design is a numeric
column of the data or the intercept (:func:`mixedjax.crossprod.plain_columns`): the same spec, and the
columns are then copied once instead of materialised by formulaic (10M rows: 0.1 s instead of 2 s)."""


def design(formula: str, data: pd.DataFrame) -> pd.DataFrame:
    """Right-hand-side model matrix of ``formula`` (a one-sided formula or a bare right-hand side)."""
    rhs = as_rhs(formula)
    if rhs in ("0", "-1", "0 +", ""):
        return pd.DataFrame(index=data.index)
    if len(data) > 4 * SPEC_ROWS:  # numeric columns and an intercept: formulaic's spec from a few rows, no copies
        spec = model_matrix(rhs, data.iloc[:SPEC_ROWS], na_action="ignore").model_spec
        plain = plain_columns(spec, data)
        if plain is not None:
            values = np.empty((len(data), len(plain)), order="F")  # column-major: whole columns, as pandas keeps them
            for j, c in enumerate(plain):
                values[:, j] = 1.0 if c == "Intercept" else data[c].to_numpy(dtype=float)
            out = pd.DataFrame(values, columns=plain, index=data.index, copy=False)
            out.attrs["model_spec"] = spec
            return out
    mm = model_matrix(rhs, data, na_action="ignore")
    out = pd.DataFrame(np.asarray(mm, dtype=float), columns=list(mm.columns), index=data.index)
    out.attrs["model_spec"] = mm.model_spec
    return out


def design_like(df_with_spec: pd.DataFrame, data: pd.DataFrame) -> pd.DataFrame:
    """The design of new ``data`` with the columns, levels and coding of an earlier :func:`design`.

    Categorical levels and contrasts come from the stored formulaic ``ModelSpec``, so new data with
    fewer levels still get every column.
    """
    spec = df_with_spec.attrs.get("model_spec")
    if spec is None:  # an empty design (no columns)
        return pd.DataFrame(index=data.index)
    mm = spec.get_model_matrix(data, na_action="ignore")
    return pd.DataFrame(np.asarray(mm, dtype=float), columns=list(mm.columns), index=data.index)


def check_finite(data: pd.DataFrame, columns: list[str], missing: str) -> tuple[pd.DataFrame, int]:
    """Raise on NaN/inf in ``columns`` (``missing="raise"``) or drop those rows (``"drop"``)."""
    if missing not in ("raise", "drop", "none"):
        raise ValueError(f"missing must be 'raise', 'drop' or 'none', got {missing!r}")
    bad = np.zeros(len(data), dtype=bool)
    report = []
    for col in columns:
        s = data[col]
        isna = s.isna().to_numpy()
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            isna = isna | ~np.isfinite(s.to_numpy(dtype=float, na_value=np.nan))
        if isna.any():
            report.append(f"column {col!r}: {int(isna.sum())} row(s) NaN or infinite "
                          f"(first at row {data.index[np.flatnonzero(isna)[0]]!r})")
            bad |= isna
    if not bad.any() or missing == "none":
        return data, 0
    if missing == "raise":
        raise ValueError("missing or non-finite values: " + "; ".join(report)
                         + ". Pass missing='drop' to drop those rows.")
    n = int(bad.sum())
    warnings.warn(f"dropped {n} row(s) with missing or non-finite values: " + "; ".join(report),
                  UserWarning, stacklevel=4)
    return data.loc[~bad], n


def _clearly_full_rank(gram: np.ndarray, margin: float = 1e-8) -> bool:
    """Every pivot of the in-order Cholesky of a unit-diagonal Gram matrix above ``margin`` (squared residual
    norms above 1e-4, far from any aliasing tolerance however the Gram matrix's rounding errors fall)."""
    a = np.array(gram, dtype=float)
    for j in range(a.shape[0]):
        if not a[j, j] > margin:
            return False
        a[j + 1 :, j + 1 :] -= np.outer(a[j + 1 :, j], a[j, j + 1 :]) / a[j, j]
    return True


def aliased_columns(x: np.ndarray, names: list[str], tol: float = 1e-9) -> list[str]:
    """Columns of ``x`` that are linear combinations of earlier columns (greedy, in order).

    Column j is aliased when the residual of its unit-scaled values on the unit-scaled
    columns kept before it has norm below ``tol √n + 1e-7``: the ``|R_jj|`` of a QR
    factorisation of the kept columns in order (one ``O(n p²)`` QR unless a column is dropped).

    Examples
    --------
    >>> x = np.column_stack([np.ones(4), np.arange(4.0), 2 * np.arange(4.0) + 1])
    >>> aliased_columns(x, ["a", "b", "c"])
    ['c']
    """
    n = x.shape[0]
    gram = x.T @ x  # the common case decided from one O(n p²) product, without copying x
    d = np.sqrt(np.diag(gram))
    if np.all(d > 0) and _clearly_full_rank(gram / np.outer(d, d)):
        return []
    scale = np.linalg.norm(x, axis=0)
    aliased = [j for j in range(x.shape[1]) if scale[j] == 0]
    cols = [j for j in range(x.shape[1]) if scale[j] != 0]
    xs = x[:, cols] / scale[cols]
    while cols:
        r = np.abs(np.diag(np.linalg.qr(xs, mode="r")))
        bad = np.flatnonzero(r < tol * np.sqrt(n) + 1e-7)
        if not len(bad):
            break
        k = int(bad[0])
        aliased.append(cols.pop(k))
        xs = np.delete(xs, k, axis=1)
    return [names[j] for j in sorted(aliased)]


@dataclass
class VCDesign:
    """One variance component: per-row values of the columns each group uses.

    ``values (nobs, k)``: row i's entries in its group's columns (padded with 0);
    ``names[g]``: the column names group g uses, in order.
    """

    name: str
    values: np.ndarray
    names: list[list[str]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.values.shape[1]


def vc_from_matrix(name: str, mat: np.ndarray, colnames: list[str], codes: np.ndarray, ngroups: int) -> VCDesign:
    """Per group, keep the columns of ``mat`` that are non-zero in that group (statsmodels' vc_formula)."""
    used = []
    for g in range(ngroups):
        rows = codes == g
        used.append(np.flatnonzero(np.any(mat[rows] != 0, axis=0)))
    k = max((len(u) for u in used), default=0)
    k = max(k, 1)
    values = np.zeros((mat.shape[0], k))
    names = []
    for g, cols in enumerate(used):
        rows = np.flatnonzero(codes == g)
        values[np.ix_(rows, np.arange(len(cols)))] = mat[np.ix_(rows, cols)]
        names.append([colnames[c] for c in cols])
    return VCDesign(name, values, names)


def vc_from_dict(name: str, blocks: dict, labels: list, codes: np.ndarray, nobs: int) -> VCDesign:
    """statsmodels' ``exog_vc[name][group] = (n_g, k_g) matrix`` layout to a :class:`VCDesign`."""
    k = max((np.atleast_2d(np.asarray(m)).shape[1] for m in blocks.values()), default=1)
    values = np.zeros((nobs, max(k, 1)))
    names = []
    for g, lab in enumerate(labels):
        rows = np.flatnonzero(codes == g)
        if lab not in blocks:
            names.append([])
            continue
        m = np.asarray(blocks[lab], dtype=float)
        m = m.reshape(len(rows), -1) if m.ndim < 2 else m
        if m.shape[0] != len(rows):
            raise ValueError(f"exog_vc[{name!r}][{lab!r}] has {m.shape[0]} rows; group {lab!r} has {len(rows)}")
        values[np.ix_(rows, np.arange(m.shape[1]))] = m
        names.append([f"{name}[{j}]" for j in range(m.shape[1])])
    return VCDesign(name, values, names)
