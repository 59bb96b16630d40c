"""The ``mixedjax`` command line (also ``python -m mixedjax``).

::

    mixedjax                                   # the demo: the seed's dietox example
    mixedjax fit DATA FORMULA [--groups COL] [--re-formula F] [--vc-formula NAME=F] [--weights COL] [--ml]
                 [--ddf satterthwaite|kenward-roger|none] [--ran-pars-ci none|wald|profile]
                 [--output text|json|csv]
    mixedjax datasets [--output text|json|csv]

``DATA`` is a CSV file (``.csv``, ``.tsv``, optionally gzip-compressed), a Parquet file
(``.parquet``/``.pq``: needs pyarrow) or the name of a bundled data set
(:mod:`mixedjax.datasets`; a file of that name wins).  ``FORMULA`` is lme4 syntax
(``"Reaction ~ Days + (Days | Subject)"``, fitted by :func:`mixedjax.lmer`) or, with
``--groups``, statsmodels syntax (``"Reaction ~ Days"`` with ``--groups Subject --re-formula
"~Days"``, fitted by :func:`mixedjax.mixedlm`).  REML is the default (``--ml`` for maximum
likelihood); the text output says which criterion was used.

``--output json`` prints one JSON object and nothing else on stdout
(:meth:`mixedjax.MixedLMResults.to_dict`; NaN as null); ``--output csv`` the tidy table
(:meth:`~mixedjax.MixedLMResults.to_frame`).  Warnings (a singular fit, no convergence) go to
stderr, one line each.  An error in the input (a missing file, an unknown column or data set, a
malformed formula, a response that is not numeric) prints one line on stderr naming the
problem and exits with status 2, as argparse does for a malformed command line.

Examples
--------
>>> from mixedjax.cli import main
>>> main(["fit", "dyestuff", "Yield ~ 1 + (1 | Batch)", "--output", "csv", "--ddf", "none"])
... # doctest: +NORMALIZE_WHITESPACE
effect,group,term,estimate,std_error,statistic,df,p_value,conf_low,conf_high
fixed,,(Intercept),152...,19.38...,78.80...,,0.0,1489.5...,1565.4...
ran_pars,Batch,sd__(Intercept),42.00...,,,,,,
ran_pars,Residual,sd__Observation,49.51...,,,,,,
0
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import pathlib
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import pandas as pd
from formulaic.errors import FormulaicError

from . import datasets
from .lmer import lmer
from .model import mixedlm
from .results import MixedLMResults

__all__ = ["CommandError", "build_parser", "demo", "fit_command", "main", "read_data"]

EXIT_USAGE = 2  # argparse's status for a malformed command line; ours for malformed input
PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
CSV_SUFFIXES = (".csv", ".tsv", ".tab", ".txt")
# errors that mean "the input is wrong": one line on stderr and status 2, never a traceback
INPUT_ERRORS = (ValueError, KeyError, LookupError, TypeError, OSError, ImportError, NotImplementedError,
                FloatingPointError, FormulaicError)


class CommandError(Exception):
    """A problem with the command's input, reported as one line on stderr (exit status 2)."""


# ------------------------------------------------------------------------------------------------ data
def read_data(source: str) -> pd.DataFrame:
    """The data a command names: a CSV / Parquet file, else a bundled data set (case-insensitive).

    Raises :class:`CommandError` naming the problem: no such file or data set, a directory,
    Parquet without pyarrow.

    Examples
    --------
    >>> read_data("sleepstudy").shape
    (180, 3)
    """
    path = pathlib.Path(source)
    if path.is_dir():
        raise CommandError(f"{source!r} is a directory; DATA is a CSV or Parquet file or a bundled data set")
    if path.is_file():
        suffixes = [s.lower() for s in path.suffixes]
        if suffixes and suffixes[-1] in PARQUET_SUFFIXES:
            if importlib.util.find_spec("pyarrow") is None:
                raise CommandError(f"reading the Parquet file {source!r} needs the optional dependency pyarrow, "
                                   "which is not installed: pip install pyarrow (or pip install \"mixedjax[parquet]\")")
            return pd.read_parquet(path)
        tab = any(s in (".tsv", ".tab") for s in suffixes)
        try:
            return pd.read_csv(path, sep="\t" if tab else ",")
        except pd.errors.EmptyDataError as e:
            raise CommandError(f"{source!r} is empty: no columns to read") from e
        except (pd.errors.ParserError, UnicodeDecodeError) as e:
            raise CommandError(f"cannot read {source!r} as CSV: {e}") from e
    if source.lower() in datasets.list_datasets():
        return datasets.load(source)
    looks_like_path = path.suffix.lower() in PARQUET_SUFFIXES + CSV_SUFFIXES + (".gz",) or "/" in source
    if looks_like_path:
        raise CommandError(f"no such file: {source!r}")
    raise CommandError(f"{source!r} is neither a file nor a bundled data set (bundled: "
                       f"{', '.join(datasets.list_datasets())}; see 'mixedjax datasets')")


def dataset_table() -> pd.DataFrame:
    """The bundled data sets: ``name, r_name, rows, columns, source, license, variables``.

    Examples
    --------
    >>> dataset_table().set_index("name").loc["sleepstudy", ["rows", "columns"]].tolist()
    [180, 3]
    """
    rows = []
    for name in datasets.list_datasets():
        d = datasets.load(name)
        rows.append({"name": name, "r_name": d.attrs["name"], "rows": d.shape[0], "columns": d.shape[1],
                     "source": d.attrs["source"], "license": d.attrs["license"], "variables": ", ".join(d.columns)})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ fit
def _check_response(formula: str, data: pd.DataFrame) -> None:
    """Name the problem with the response before a fit does (lmer's message would not)."""
    if "~" not in formula:
        raise CommandError(f"formula {formula!r} has no '~': write it as 'response ~ terms'")
    response = formula.split("~", 1)[0].strip()
    if not response:
        raise CommandError(f"formula {formula!r} has no response left of '~'")
    if response not in data.columns:
        cols = ", ".join(map(str, data.columns))
        raise CommandError(f"response column {response!r} is not in the data; columns: {cols}")
    col = data[response]
    if not pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
        raise CommandError(f"the response {response!r} is not numeric (dtype {col.dtype})")


def _vc_formula(items: list[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    out = {}
    for item in items:
        name, sep, f = item.partition("=")
        if not sep or not name.strip() or not f.strip():
            raise CommandError(f"--vc-formula {item!r}: write it as NAME=FORMULA, e.g. cask='0 + C(cask)'")
        out[name.strip()] = f.strip()
    return out


def fit_model(args: argparse.Namespace, data: pd.DataFrame) -> MixedLMResults:
    """Fit the model a ``fit`` command describes: statsmodels syntax with ``--groups``, lme4's otherwise."""
    _check_response(args.formula, data)
    reml = not args.ml
    if args.groups is None:
        if "|" not in args.formula:
            raise CommandError(f"formula {args.formula!r} has no random-effects term '(expr | group)': write one "
                               "(lme4 syntax) or give --groups COL (statsmodels syntax)")
        return lmer(args.formula, data, reml=reml, weights=args.weights)
    if "|" in args.formula:
        raise CommandError("with --groups the formula is statsmodels syntax (fixed effects only; random effects by "
                           "--re-formula / --vc-formula); drop --groups to use lme4's '(expr | group)' terms")
    model = mixedlm(args.formula, data, groups=args.groups, re_formula=args.re_formula,
                    vc_formula=_vc_formula(args.vc_formula), weights=args.weights)
    return model.fit(reml=reml)


def _criterion_line(res: MixedLMResults) -> str:
    if res.reml:
        return "Fitted by REML (restricted maximum likelihood; --ml fits by maximum likelihood)."
    return "Fitted by ML (maximum likelihood; without --ml the fit is by REML)."


def fit_command(args: argparse.Namespace) -> int:
    """``mixedjax fit``: read, fit, print (text, JSON or CSV) on stdout."""
    data = read_data(args.data)
    ddf = None if args.ddf == "none" else args.ddf
    ran_pars_ci = None if args.ran_pars_ci == "none" else args.ran_pars_ci
    # anything printed while fitting goes to stderr: stdout carries only the requested output
    with contextlib.redirect_stdout(sys.stderr):
        res = fit_model(args, data)
        if args.output == "json":
            text = json.dumps(res.to_dict(ddf=ddf, ran_pars_ci=ran_pars_ci, alpha=args.alpha), allow_nan=False,
                              indent=2)
        elif args.output == "csv":
            text = res.to_frame(ddf=ddf, ran_pars_ci=ran_pars_ci, alpha=args.alpha).to_csv(index=False).rstrip("\n")
        else:
            parts = [_criterion_line(res), str(res.summary(alpha=args.alpha, ddf=ddf))]
            if ran_pars_ci is not None:
                t = res.to_frame(ddf=ddf, ran_pars_ci=ran_pars_ci, alpha=args.alpha)
                ran = t[t.effect == "ran_pars"].drop(columns=["effect", "statistic", "df", "p_value"])
                parts.append(f"Random-effects parameters ({ran_pars_ci} intervals):\n{ran.to_string(index=False)}")
            text = "\n".join(parts)
    print(text)
    return 0


def datasets_command(args: argparse.Namespace) -> int:
    """``mixedjax datasets``: the bundled data sets, their sizes (rows x columns) and sources."""
    table = dataset_table()
    if args.output == "json":
        print(json.dumps(table.to_dict(orient="records"), indent=2))
    elif args.output == "csv":
        print(table.to_csv(index=False).rstrip("\n"))
    else:
        w = max(len(n) for n in table.name) + 2
        for row in table.itertuples(index=False):
            size = f"{row.rows} x {row.columns}"
            print(f"{row.name:<{w}}{size:>12}  {row.source} ({row.license})  {row.variables}")
    return 0


# --------------------------------------------------------------------------------------------- the parser
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``mixedjax`` command (subcommands ``fit`` and ``datasets``)."""
    parser = argparse.ArgumentParser(
        prog="mixedjax", description="Linear mixed models on JAX. Without a command: the dietox demo.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    fit = sub.add_parser(
        "fit", help="fit a linear mixed model and print the results",
        description="Fit a linear mixed model by REML (default) or ML. FORMULA is lme4 syntax, "
                    "e.g. 'Reaction ~ Days + (Days | Subject)', or statsmodels syntax with --groups.")
    fit.add_argument("data", metavar="DATA", help="a CSV or Parquet file, or a bundled data set (mixedjax datasets)")
    fit.add_argument("formula", metavar="FORMULA", help="lme4 formula, or the fixed effects with --groups")
    fit.add_argument("--groups", metavar="COL", help="grouping column: FORMULA is then statsmodels syntax")
    fit.add_argument("--re-formula", metavar="F", help="statsmodels' re_formula, e.g. '~Days' (needs --groups)")
    fit.add_argument("--vc-formula", metavar="NAME=F", action="append",
                     help="a variance component, e.g. cask='0 + C(cask)' (repeatable; needs --groups)")
    fit.add_argument("--weights", metavar="COL", help="prior weights column (row i has residual variance scale/w_i)")
    fit.add_argument("--ml", action="store_true", help="maximum likelihood instead of REML")
    fit.add_argument("--ddf", choices=["satterthwaite", "kenward-roger", "none"], default="satterthwaite",
                     help="denominator df of the fixed effects' t tests (default satterthwaite; none: z tests)")
    fit.add_argument("--ran-pars-ci", choices=["none", "wald", "profile"], default="none",
                     help="standard errors / intervals of the sds and correlations (default none)")
    fit.add_argument("--alpha", type=float, default=0.05, help="1 - confidence level of the intervals (0.05)")
    fit.add_argument("--output", choices=["text", "json", "csv"], default="text",
                     help="text (summary), json (one object: to_dict) or csv (the tidy table)")
    fit.set_defaults(func=fit_command)
    ds = sub.add_parser("datasets", help="list the bundled data sets", description="The bundled data sets: name, "
                        "rows x columns, source (R package) and licence, variables.")
    ds.add_argument("--output", choices=["text", "json", "csv"], default="text")
    ds.set_defaults(func=datasets_command)
    return parser


def demo() -> None:
    """The seed's example: statsmodels' dietox random-intercept model, from the bundled data."""
    data = datasets.load("dietox")
    md = mixedlm("Weight ~ Time", data, groups=data["Pig"])
    mdf = md.fit()
    print(mdf.summary())


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, CommandError | ValueError) else f"{type(e).__name__}: {text}"


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    print(f"mixedjax: warning: {category.__name__}: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mixedjax`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit status 0.

    Without arguments it runs the demo (the seed's dietox example).  A malformed command
    line or input raises ``SystemExit(2)`` after one line on stderr (argparse prints its
    usage too).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        demo()
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("a command is required: fit or datasets")
    if args.command == "fit":
        if args.groups is None and (args.re_formula or args.vc_formula):
            parser.error("--re-formula and --vc-formula need --groups (statsmodels syntax)")
        if not 0 < args.alpha < 1:
            parser.error(f"--alpha must be between 0 and 1, got {args.alpha}")
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _show_warning
        try:
            return args.func(args)
        except BrokenPipeError:  # the reader went away (mixedjax ... | head): stop quietly, as the docs advise
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            raise SystemExit(1) from None
        except (CommandError, *INPUT_ERRORS) as e:
            print(f"mixedjax: error: {_one_line(e)}", file=sys.stderr)
            raise SystemExit(EXIT_USAGE) from None


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
