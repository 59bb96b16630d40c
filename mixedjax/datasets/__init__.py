"""Reference datasets for linear mixed models, bundled with mixedjax.

The datasets are the classic examples from the R packages geepack, lme4, nlme and mlmRev, exported with
R 4.2.2 and shipped unmodified as CSV files inside this package (see ``LICENSES.md`` next to this
module for their sources and licences). They are read with :mod:`importlib.resources`, so they work
from a source checkout and from an installed wheel alike.

R's column types are restored from the bundled ``factor_levels.json``:

* R factors (ordered or not) become unordered :class:`pandas.Categorical` columns whose categories
  are in R's level order, so the first level is the treatment-contrast reference level exactly as
  in lme4/nlme. The names of the columns that are *ordered* factors in R are listed in
  ``df.attrs["r_ordered"]`` (R would give those polynomial contrasts by default; the reference fits
  in mixedjax's test-suite use treatment contrasts throughout).
* R integers become ``int64`` columns and R doubles ``float64`` columns (missing values are NaN;
  only ``dietox.Feed`` has any).

``df.attrs`` also records ``"name"`` (the R dataset name), ``"source"`` (R package and version) and
``"license"`` (the R package's licence).

Available datasets (names are case-insensitive):

============  =====================  ============================================================
name          R package (version)    structure
============  =====================  ============================================================
dietox        geepack 1.3.9          longitudinal: 72 pigs weighed weekly, 861 rows
sleepstudy    lme4 1.1-31            longitudinal: 18 subjects x 10 days, 180 rows
dyestuff      lme4 1.1-31            one grouping factor: 6 batches x 5, 30 rows
dyestuff2     lme4 1.1-31            as Dyestuff, simulated with a zero batch variance (singular)
penicillin    lme4 1.1-31            crossed: 24 plates x 6 samples, 144 rows
pastes        lme4 1.1-31            nested: 30 casks within 10 batches, 60 rows
insteval      lme4 1.1-31            crossed, large: 2972 students x 1128 lecturers, 73421 rows
orthodont     nlme 3.1-162           longitudinal: 27 children x 4 ages, 108 rows
oxboys        nlme 3.1-162           longitudinal: 26 boys x 9 occasions, 234 rows
cake          lme4 1.1-31            split-plot: 15 replicates x 3 recipes x 6 temperatures, 270 rows
machines      nlme 3.1-162           nested: 6 workers x 3 machines x 3 replicates, 54 rows
exam          mlmRev 1.0-8           two-level: 4059 students in 65 schools
scotssec      mlmRev 1.0-8           crossed: 3435 pupils, 148 primary x 19 secondary schools
============  =====================  ============================================================

Examples
--------
>>> from mixedjax.datasets import load, list_datasets
>>> "sleepstudy" in list_datasets()
True
>>> df = load("sleepstudy")
>>> df.shape
(180, 3)
>>> list(df.columns)
['Reaction', 'Days', 'Subject']
>>> df["Subject"].cat.categories[0]
'308'
>>> list(load("scotssec")["sex"].cat.categories)  # R's level order, not sorted
['M', 'F']
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

import pandas as pd

__all__ = ["list_datasets", "load"]

_METADATA_FILE = "factor_levels.json"

# Licence of each source R package, as stated in its DESCRIPTION file.
_PACKAGE_LICENSES: dict[str, str] = {
    "geepack": "GPL (>= 3)",
    "lme4": "GPL (>= 2)",
    "nlme": "GPL (>= 2)",
    "mlmRev": "GPL (>= 2)",
}

# R column type -> pandas dtype used when reading the CSV (factors are read as str, then converted).
_READ_DTYPES: dict[str, Any] = {
    "factor": str,
    "ordered": str,
    "integer": "int64",
    "double": "float64",
}


@functools.cache
def _metadata() -> dict[str, dict[str, Any]]:
    """Return the parsed ``factor_levels.json``, keyed by R dataset name."""
    text = resources.files(__name__).joinpath(_METADATA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


@functools.cache
def _name_map() -> dict[str, str]:
    """Return a mapping from lower-case dataset name to R dataset name."""
    return {r_name.lower(): r_name for r_name in _metadata()}


def list_datasets() -> list[str]:
    """List the names of the bundled datasets.

    Returns
    -------
    list of str
        Lower-case dataset names, sorted alphabetically. Any capitalisation of these names (for
        example the R spelling ``"Dyestuff"``) is accepted by :func:`load`.

    Examples
    --------
    >>> from mixedjax.datasets import list_datasets
    >>> list_datasets()  # doctest: +NORMALIZE_WHITESPACE
    ['cake', 'dietox', 'dyestuff', 'dyestuff2', 'exam', 'insteval', 'machines', 'orthodont',
     'oxboys', 'pastes', 'penicillin', 'scotssec', 'sleepstudy']
    """
    return sorted(_name_map())


@functools.cache
def _read(r_name: str) -> pd.DataFrame:
    """Read and type one dataset (cached; callers must copy before handing it out)."""
    meta = _metadata()[r_name]
    column_types: dict[str, str] = meta["column_types"]
    factors: dict[str, dict[str, Any]] = meta["factors"]
    filename: str = meta["file"]

    resource = resources.files(__name__).joinpath(filename)
    with resource.open("rb") as fh:
        df = pd.read_csv(
            fh,
            dtype={col: _READ_DTYPES[rtype] for col, rtype in column_types.items()},
            keep_default_na=False,
            na_values=[""],
            compression="gzip" if filename.endswith(".gz") else None,
        )

    if list(df.columns) != list(column_types):
        raise RuntimeError(
            f"{filename}: columns {list(df.columns)} do not match factor_levels.json {list(column_types)}"
        )
    if len(df) != meta["rows"]:
        raise RuntimeError(f"{filename}: {len(df)} rows, factor_levels.json says {meta['rows']}")

    for col, info in factors.items():
        values = df[col]
        cat = pd.Categorical(values, categories=info["levels"], ordered=False)
        unknown = values.notna() & pd.isna(cat)
        if unknown.any():
            bad = sorted(set(values[unknown]))[:5]
            raise RuntimeError(f"{filename}: column {col!r} has values not among R's levels: {bad}")
        df[col] = cat

    df.attrs = _attrs(r_name)
    return df


def _attrs(r_name: str) -> dict[str, Any]:
    """Build a fresh ``attrs`` dictionary for dataset ``r_name``."""
    meta = _metadata()[r_name]
    package: str = meta["package"]
    return {
        "name": r_name,
        "source": f"R package {package} {meta['package_version']}",
        "license": _PACKAGE_LICENSES[package],
        "r_ordered": [col for col, info in meta["factors"].items() if info["ordered"]],
    }


def load(name: str) -> pd.DataFrame:
    """Load a bundled dataset as a :class:`pandas.DataFrame`.

    Parameters
    ----------
    name : str
        Dataset name, case-insensitive (``"sleepstudy"``, ``"Dyestuff"``, ``"INSTEVAL"``, ...); see
        :func:`list_datasets`.

    Returns
    -------
    pandas.DataFrame
        A new DataFrame on every call (modifying it does not affect later calls), with R's column
        names, column order and row order. R factors are unordered categoricals with categories in
        R's level order; R integers are ``int64`` and R doubles ``float64``. ``df.attrs`` holds
        ``"name"`` (R dataset name), ``"source"`` (R package and version), ``"license"`` (that
        package's licence) and ``"r_ordered"`` (list of the columns that are ordered factors in R).

    Raises
    ------
    ValueError
        If ``name`` is not one of the bundled datasets; the message lists the available names.
    TypeError
        If ``name`` is not a string.

    Examples
    --------
    >>> from mixedjax.datasets import load
    >>> load("dietox").shape
    (861, 8)
    >>> df = load("Orthodont")
    >>> list(df["Sex"].cat.categories)
    ['Male', 'Female']
    >>> df["Subject"].cat.ordered, df.attrs["r_ordered"]
    (False, ['Subject'])
    >>> df.attrs["source"], df.attrs["license"]
    ('R package nlme 3.1-162', 'GPL (>= 2)')
    """
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__}")
    r_name = _name_map().get(name.lower())
    if r_name is None:
        raise ValueError(f"unknown dataset {name!r}; available datasets: {', '.join(list_datasets())}")
    df = _read(r_name).copy(deep=True)
    df.attrs = _attrs(r_name)
    return df
