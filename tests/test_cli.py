"""The ``mixedjax`` command line (:mod:`mixedjax.cli`): in-process through ``main(argv)``, and one subprocess for
``python -m mixedjax``."""

from __future__ import annotations

import doctest
import importlib.metadata
import importlib.util
import io
import json
import pathlib
import re
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

import mixedjax
from mixedjax import __main__ as entry
from mixedjax import cli

REF = pathlib.Path(__file__).parent / "reference"
SLEEP = "Reaction ~ Days + (Days | Subject)"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``main(argv)``: (exit status, stdout, stderr)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def sleep():
    return mixedjax.lmer(SLEEP, mixedjax.datasets.load("sleepstudy"))


# ------------------------------------------------------------------------------------------------ fit
def test_fit_lme4_syntax_json(capsys, sleep):
    code, out, err = run(capsys, "fit", "sleepstudy", SLEEP, "--output", "json", "--ddf", "none")
    assert code == 0 and err == ""
    got = json.loads(out)  # stdout is exactly one JSON object
    assert got == sleep.to_dict(ddf=None)
    ref = json.loads((REF / "sleepstudy_corr_reml.json").read_text())["results"]["lme4"]
    assert got["method"] == "REML" and got["nobs"] == 180 and got["converged"] is True
    assert abs(got["llf"] - ref["logLik"]) < 1e-6  # lme4 reference: logLik within 1e-6 (README, Accuracy)
    assert got["aic"] == pytest.approx(ref["AIC"], abs=1e-6) and got["bic"] == pytest.approx(ref["BIC"], abs=1e-6)
    assert list(got["fe_params"]) == ["Intercept", "Days"] and set(got["bse_fe"]) == {"Intercept", "Days"}
    assert [r["grp"] for r in got["varcorr"]] == ["Subject"] * 3 + ["Residual"]


def test_fit_statsmodels_syntax_csv(capsys, sleep):
    code, out, err = run(capsys, "fit", "sleepstudy", "Reaction ~ Days", "--groups", "Subject", "--re-formula", "~Days",
                         "--output", "csv", "--ddf", "none")
    assert code == 0 and err == ""
    t = pd.read_csv(io.StringIO(out))
    want = sleep.to_frame(ddf=None)
    assert list(t.columns) == list(want.columns)
    assert list(t.term) == list(want.term)
    np.testing.assert_allclose(t.estimate, want.estimate, rtol=1e-6)  # two fits of one model: same optimum


def test_fit_text_says_the_criterion(capsys):
    code, out, err = run(capsys, "fit", "Dyestuff", "Yield ~ 1 + (1 | Batch)", "--ml", "--ddf", "none")
    assert code == 0 and err == ""
    assert out.startswith("Fitted by ML (maximum likelihood") and re.search(r"Method: +ML\b", out)
    assert "Mixed Linear Model Regression Results" in out
    assert cli._criterion_line(mixedjax.lmer("Yield ~ 1 + (1 | Batch)", mixedjax.datasets.load("dyestuff"))
                               ).startswith("Fitted by REML")


def test_warnings_go_to_stderr(capsys):
    code, out, err = run(capsys, "fit", "dyestuff2", "Yield ~ 1 + (1 | Batch)", "--output", "json", "--ddf", "none")
    assert code == 0
    assert json.loads(out)["singular"] is True
    assert err.startswith("mixedjax: warning: ConvergenceWarning: the fit is singular") and err.count("\n") == 1


def test_csv_file_with_weights(capsys, tmp_path):
    d = mixedjax.datasets.load("sleepstudy")
    d = d.assign(w=1.0 + (d["Days"] % 3))
    path = tmp_path / "sleep.csv"
    d.to_csv(path, index=False)
    code, out, err = run(capsys, "fit", str(path), SLEEP, "--weights", "w", "--output", "json", "--ddf", "none")
    assert code == 0, err
    want = mixedjax.lmer(SLEEP, d, weights="w")
    got = json.loads(out)
    assert abs(got["llf"] - want.llf) < 1e-8 and got["nobs"] == 180


def test_parquet_without_pyarrow(capsys, tmp_path, monkeypatch):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
    code, out, err = run(capsys, "fit", str(path), SLEEP)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "needs the optional dependency pyarrow" in err and "mixedjax[parquet]" in err


def test_parquet_file(capsys, tmp_path, sleep):
    pytest.importorskip("pyarrow")
    path = tmp_path / "sleep.parquet"
    mixedjax.datasets.load("sleepstudy").to_parquet(path)
    code, out, err = run(capsys, "fit", str(path), SLEEP, "--output", "json", "--ddf", "none")
    assert code == 0 and abs(json.loads(out)["llf"] - sleep.llf) < 1e-8


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("argv, names", [
    (["fit", "no/such/file.csv", SLEEP], "no such file: 'no/such/file.csv'"),
    (["fit", "sleepstudyy", SLEEP], "'sleepstudyy' is neither a file nor a bundled data set"),
    (["fit", "sleepstudy", "Reaction ~ Dayz + (Days | Subject)"], "Dayz"),
    (["fit", "sleepstudy", "Reaction ~ Days + (Days | Subjekt)"], "Subjekt"),
    (["fit", "sleepstudy", "Reaction ~ Days", "--groups", "Subjekt"], "groups column 'Subjekt'"),
    (["fit", "sleepstudy", "Reaction ~ Days + (Days | Subject", ], "unbalanced '('"),
    (["fit", "sleepstudy", "Reaction Days + (Days | Subject)"], "has no '~'"),
    (["fit", "sleepstudy", "Reaction ~ Days"], "no random-effects term"),
    (["fit", "sleepstudy", "Subject ~ Days + (1 | Subject)"], "the response 'Subject' is not numeric"),
    (["fit", "sleepstudy", "Reactio ~ Days + (1 | Subject)"], "response column 'Reactio' is not in the data"),
    (["fit", "sleepstudy", SLEEP, "--weights", "ww"], "weights column 'ww'"),
    (["fit", "sleepstudy", "Reaction ~ Days", "--groups", "Subject", "--vc-formula", "bad"], "NAME=FORMULA"),
    (["fit", ".", SLEEP], "is a directory"),
])
def test_input_errors_are_one_line_and_status_2(capsys, argv, names):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("mixedjax: error: ") and "Traceback" not in err
    assert names in err, err


def test_empty_and_non_numeric_files(capsys, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    code, _, err = run(capsys, "fit", str(empty), SLEEP)
    assert code == 2 and "is empty" in err and err.count("\n") == 1
    text = tmp_path / "text.csv"
    pd.DataFrame({"y": ["a", "b", "c", "d"], "g": ["1", "1", "2", "2"]}).to_csv(text, index=False)
    code, _, err = run(capsys, "fit", str(text), "y ~ 1 + (1 | g)")
    assert code == 2 and "the response 'y' is not numeric" in err


@pytest.mark.parametrize("argv", [["fit"], ["fit", "sleepstudy", "y ~ x", "--re-formula", "~x"], ["frobnicate"],
                                  ["fit", "sleepstudy", SLEEP, "--output", "xml"], ["fit", "d", "f", "--alpha", "2"]])
def test_usage_errors_exit_2(capsys, argv):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and "usage: mixedjax" in err


def test_closed_stdout_stops_quietly(capsys, monkeypatch):
    """``mixedjax ... | head``: the reader closes the pipe; no error line, status 1 (Python's documented advice)."""

    def closed(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "datasets_command", closed)
    code, out, err = run(capsys, "datasets")
    assert code == 1 and err == ""


# ------------------------------------------------------------------------------------------- datasets
def test_datasets(capsys):
    code, out, err = run(capsys, "datasets")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert len(lines) == len(mixedjax.datasets.list_datasets())
    sleep = next(line for line in lines if line.startswith("sleepstudy"))
    assert "180 x 3" in sleep and "R package lme4 1.1-31" in sleep and "GPL (>= 2)" in sleep
    code, out, _ = run(capsys, "datasets", "--output", "json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["insteval"]["rows"] == 73421 and rows["dietox"]["source"] == "R package geepack 1.3.9"


# ---------------------------------------------------------------------------------- entry points, demo
def test_no_arguments_runs_the_demo(capsys, monkeypatch):
    called = []
    monkeypatch.setattr(cli, "demo", lambda: called.append(True))
    assert cli.main([]) == 0 and called == [True]
    assert entry.main is cli.main  # python -m mixedjax


def test_console_script_is_declared():
    text = (pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert 'mixedjax = "mixedjax.cli:main"' in text
    eps = importlib.metadata.entry_points(group="console_scripts")
    installed = [ep for ep in eps if ep.name == "mixedjax"]
    if installed:  # the editable install was refreshed after the entry point was added
        assert installed[0].value == "mixedjax.cli:main"


def test_python_m_mixedjax_fit():
    """One subprocess: ``python -m mixedjax fit`` prints one JSON object on stdout and exits 0."""
    proc = subprocess.run([sys.executable, "-m", "mixedjax", "fit", "dyestuff", "Yield ~ 1 + (1 | Batch)", "--output",
                           "json", "--ddf", "none"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    ref = json.loads((REF / "dyestuff_reml.json").read_text())["results"]["lme4"]
    assert abs(got["llf"] - ref["logLik"]) < 1e-6
    assert got["tidy"][1]["term"] == "sd__(Intercept)"


def test_docstring_examples():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mixedjax.ConvergenceWarning)
        result = doctest.testmod(cli, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted >= 3
