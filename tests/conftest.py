"""Shared fixtures: reference cases (copied from lme4 fits into tests/reference) and their data."""

from __future__ import annotations

import gc
import json
import os
import pathlib
import sys
import tempfile
import warnings

# The suite's own throw-away compilation cache (mixedjax.cache) in the temporary directory, never the user's:
# modules whose compiled programs conftest drops (below) reload them from it, and the suite's two pytest
# processes share it.
os.environ.setdefault("MIXEDJAX_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"mixedjax-test-cache-{os.getuid()}"))

import jax
import numpy as np
import pandas as pd
import pytest

import mixedjax

REF = pathlib.Path(__file__).parent / "reference"

CASES = [
    f"{c}_{m}"
    for c in ["dietox_ri", "dietox_rs", "dietox_indep", "sleepstudy_corr", "sleepstudy_indep",
              "sleepstudy_weighted", "dyestuff", "dyestuff2", "pastes"]
    for m in ["reml", "ml"]
]


def load_case(case_id: str) -> dict:
    return json.loads((REF / f"{case_id}.json").read_text())


def case_data(case: dict) -> pd.DataFrame:
    df = mixedjax.datasets.load(case["dataset"].split(".")[0])
    w = case["model"].get("weights")
    if w:
        df[w["column"]] = df.eval(w["python"]).astype(float)
    return df


def fit_case(case: dict) -> mixedjax.MixedLMResults:
    """Fit a reference case through the statsmodels-style formula API."""
    df = case_data(case)
    spec = case["model"]["statsmodels"]
    kw = {}
    if case["model"].get("weights"):
        kw["weights"] = case["model"]["weights"]["column"]
    if spec.get("re_formula") is not None:
        kw["re_formula"] = spec["re_formula"]
    if spec.get("vc_formula"):
        kw["vc_formula"] = spec["vc_formula"]
    formula = spec["formula"].replace("C(", "").replace(")", "") if "Treatment" in spec["formula"] else spec[
        "formula"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mixedjax.ConvergenceWarning)
        return mixedjax.mixedlm(formula, df, groups=spec["groups"], **kw).fit(reml=case["method"] == "REML")


def rel(a: float, b: float, floor: float) -> float:
    return abs(a - b) / max(abs(b), floor)


@pytest.fixture(scope="session")
def dietox() -> pd.DataFrame:
    return mixedjax.datasets.load("dietox")


@pytest.fixture(scope="session")
def sleepstudy() -> pd.DataFrame:
    return mixedjax.datasets.load("sleepstudy")


def simulate_rs(rng: np.random.Generator, n_groups: int = 18, n_per: int = 10) -> pd.DataFrame:
    """Sleepstudy-shaped random-slope data."""
    g = np.repeat(np.arange(n_groups), n_per)
    x = np.tile(np.arange(n_per, dtype=float), n_groups)
    b0 = rng.normal(0, 25, n_groups)
    b1 = rng.normal(0, 6, n_groups)
    y = 250 + 10 * x + b0[g] + b1[g] * x + rng.normal(0, 25, g.size)
    return pd.DataFrame({"y": y, "x": x, "g": g.astype(str)})


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module: a long suite in one process otherwise keeps
    every program it ever compiled (gigabytes by the end)."""
    yield
    jax.clear_caches()
    gc.collect()


# A timed-out test may leave XLA's threads deadlocked (README, "Known traps"): every later test would then wait
# out its own timeout, and the interpreter would never exit. Stop the session at the first timeout and leave
# without the interpreter's shutdown, so that a hang fails CI at once.
_TIMED_OUT: list[str] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and "from pytest-timeout" in report.longreprtext:
        _TIMED_OUT.append(item.nodeid)
        item.session.shouldstop = f"{item.nodeid} timed out (JAX's threads may be stuck): the session stops here"
    return report


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _TIMED_OUT:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
