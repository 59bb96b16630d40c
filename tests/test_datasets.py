"""Tests for mixedjax.datasets: bundled R datasets load with R's types, factor levels and shapes."""

from __future__ import annotations

import doctest
import json
from importlib import resources

import numpy as np
import pandas as pd
import pytest

import mixedjax.datasets as datasets_module
from mixedjax.datasets import list_datasets, load

NAMES = [
    "dietox",
    "sleepstudy",
    "dyestuff",
    "dyestuff2",
    "penicillin",
    "pastes",
    "insteval",
    "orthodont",
    "oxboys",
    "cake",
    "machines",
    "exam",
    "scotssec",
]

# Shapes as documented for the R datasets (independent of factor_levels.json).
SHAPES = {
    "dietox": (861, 8),
    "sleepstudy": (180, 3),
    "dyestuff": (30, 2),
    "dyestuff2": (30, 2),
    "penicillin": (144, 3),
    "pastes": (60, 4),
    "insteval": (73421, 7),
    "orthodont": (108, 4),
    "oxboys": (234, 4),
    "cake": (270, 5),
    "machines": (54, 3),
    "exam": (4059, 10),
    "scotssec": (3435, 6),
}

R_ORDERED = {
    "insteval": ["studage", "lectage"],
    "orthodont": ["Subject"],
    "oxboys": ["Subject", "Occasion"],
    "cake": ["temperature"],
    "machines": ["Worker"],
}

SOURCES = {
    "dietox": ("R package geepack 1.3.9", "GPL (>= 3)"),
    "orthodont": ("R package nlme 3.1-162", "GPL (>= 2)"),
    "oxboys": ("R package nlme 3.1-162", "GPL (>= 2)"),
    "cake": ("R package lme4 1.1-31", "GPL (>= 2)"),
    "machines": ("R package nlme 3.1-162", "GPL (>= 2)"),
    "exam": ("R package mlmRev 1.0-8", "GPL (>= 2)"),
    "scotssec": ("R package mlmRev 1.0-8", "GPL (>= 2)"),
}


def _metadata() -> dict:
    text = resources.files("mixedjax.datasets").joinpath("factor_levels.json").read_text(encoding="utf-8")
    return {name.lower(): entry for name, entry in json.loads(text).items()}


META = _metadata()


def test_list_datasets() -> None:
    assert list_datasets() == sorted(NAMES)
    assert sorted(META) == sorted(NAMES)


def test_bundled_files_present() -> None:
    pkg = resources.files("mixedjax.datasets")
    licenses = pkg.joinpath("LICENSES.md").read_text(encoding="utf-8")
    for entry in META.values():
        assert pkg.joinpath(entry["file"]).is_file()
        assert f"`{entry['file']}`" in licenses
        assert entry["package"] in licenses
        assert entry["package_version"] in licenses
    assert "BSD-3-Clause" in licenses


@pytest.mark.parametrize("name", NAMES)
def test_shape_and_columns(name: str) -> None:
    df = load(name)
    meta = META[name]
    assert isinstance(df, pd.DataFrame)
    assert df.shape == (meta["rows"], len(meta["column_types"]))
    assert df.shape == SHAPES[name]
    assert list(df.columns) == list(meta["column_types"])
    assert isinstance(df.index, pd.RangeIndex)


@pytest.mark.parametrize("name", NAMES)
def test_factor_columns_are_categoricals_in_r_level_order(name: str) -> None:
    df = load(name)
    meta = META[name]
    factor_cols = [c for c, t in meta["column_types"].items() if t in ("factor", "ordered")]
    assert sorted(factor_cols) == sorted(meta["factors"])
    for col in factor_cols:
        assert isinstance(df[col].dtype, pd.CategoricalDtype), col
        assert df[col].cat.ordered is False, col
        assert list(df[col].cat.categories) == meta["factors"][col]["levels"], col
        assert not df[col].isna().any(), col
        # every level is a str label, exactly as in R
        assert all(isinstance(level, str) for level in df[col].cat.categories)


@pytest.mark.parametrize("name", NAMES)
def test_numeric_dtypes(name: str) -> None:
    df = load(name)
    for col, rtype in META[name]["column_types"].items():
        if rtype == "integer":
            assert df[col].dtype == np.int64, col
        elif rtype == "double":
            assert df[col].dtype == np.float64, col


@pytest.mark.parametrize("name", NAMES)
def test_attrs(name: str) -> None:
    df = load(name)
    meta = META[name]
    assert df.attrs["r_ordered"] == R_ORDERED.get(name, [])
    assert df.attrs["source"] == f"R package {meta['package']} {meta['package_version']}"
    assert df.attrs["license"] == ("GPL (>= 3)" if meta["package"] == "geepack" else "GPL (>= 2)")
    assert df.attrs["name"].lower() == name
    if name in SOURCES:
        assert (df.attrs["source"], df.attrs["license"]) == SOURCES[name]


def test_missing_values() -> None:
    dietox = load("dietox")
    assert dietox["Feed"].isna().sum() == 72
    assert dietox.drop(columns="Feed").notna().all().all()
    for name in NAMES:
        if name != "dietox":
            assert load(name).notna().all().all(), name


def test_known_values() -> None:
    sleep = load("sleepstudy")
    assert sleep.loc[0, "Reaction"] == 249.56
    assert sleep.loc[0, "Days"] == 0.0
    assert sleep.loc[0, "Subject"] == "308"
    assert sleep["Reaction"].mean() == pytest.approx(298.507892, abs=1e-6)
    assert sorted(sleep["Days"].unique()) == list(range(10))
    assert (sleep["Subject"].value_counts() == 10).all()

    assert load("dyestuff")["Yield"].mean() == pytest.approx(1527.5)
    assert list(load("dyestuff")["Batch"].value_counts().sort_index()) == [5] * 6

    dietox = load("dietox")
    assert dietox["Time"].min() == 1 and dietox["Time"].max() == 12
    assert dietox["Pig"].nunique() == 72

    ortho = load("orthodont")
    assert list(ortho["Sex"].cat.categories) == ["Male", "Female"]
    assert ortho["Subject"].cat.categories[0] == "M16"
    assert ortho.loc[0, "Subject"] == "M01"

    oxboys = load("oxboys")
    assert list(oxboys["Subject"].cat.categories[:4]) == ["10", "26", "25", "9"]
    assert oxboys["Subject"].cat.codes.iloc[0] == 12  # label "1" is R's 13th level

    insteval = load("insteval")
    assert list(insteval["dept"].cat.categories[:3]) == ["15", "5", "10"]
    assert insteval["s"].nunique() == 2972
    assert insteval["d"].nunique() == 1128
    assert set(insteval["y"].unique()) == {1, 2, 3, 4, 5}

    pastes = load("pastes")
    assert (
        pastes["sample"].astype(str) == pastes["batch"].astype(str) + ":" + pastes["cask"].astype(str)
    ).all()

    cake = load("cake")
    assert cake["angle"].dtype == np.int64
    assert list(cake["temperature"].cat.categories) == ["175", "185", "195", "205", "215", "225"]
    assert (cake["temp"] == cake["temperature"].astype(str).astype(float)).all()
    assert list(cake["replicate"].cat.categories[:3]) == ["1", "2", "3"]  # numeric, not "1", "10", "11"
    assert (cake.groupby(["recipe", "replicate"], observed=True).size() == 6).all()
    assert cake.groupby(["recipe", "replicate"], observed=True).ngroups == 45

    machines = load("machines")
    assert list(machines["Worker"].cat.categories) == ["6", "2", "4", "1", "3", "5"]
    assert list(machines["Machine"].cat.categories) == ["A", "B", "C"]
    assert (machines.groupby(["Worker", "Machine"], observed=True).size() == 3).all()
    assert machines.loc[0, "score"] == 52.0

    exam = load("exam")
    assert list(exam["schgend"].cat.categories) == ["mixed", "boys", "girls"]
    assert list(exam["sex"].cat.categories) == ["F", "M"]
    assert exam["school"].nunique() == 65
    assert exam.loc[0, "normexam"] == 0.2613242
    assert exam.loc[0, "standLRT"] == 0.6190592

    scots = load("scotssec")
    assert list(scots["sex"].cat.categories) == ["M", "F"]
    assert scots["primary"].nunique() == 148
    assert scots["second"].nunique() == 19
    assert scots.loc[0, "attain"] == 10.0
    # partially crossed: some primary schools send pupils to more than one secondary school
    assert (scots.groupby("primary", observed=True)["second"].nunique() > 1).any()


def test_load_returns_independent_copies() -> None:
    first = load("sleepstudy")
    reference = load("sleepstudy")
    first.loc[0, "Reaction"] = -1.0
    first["Days"] *= 2
    first["Subject"] = first["Subject"].cat.rename_categories(lambda s: "S" + s)
    first["extra"] = 1
    first.attrs["r_ordered"].append("Subject")
    first.attrs["source"] = "changed"

    second = load("sleepstudy")
    assert second is not first
    pd.testing.assert_frame_equal(second, reference)
    assert second.loc[0, "Reaction"] == 249.56
    assert "extra" not in second.columns
    assert second.attrs["r_ordered"] == []
    assert second.attrs["source"] == "R package lme4 1.1-31"

    # in-place changes must not leak either
    third = load("dietox")
    third.loc[:, "Weight"] = 0.0
    third.iloc[0, third.columns.get_loc("Pig")] = "4602"
    third["Time"] += 100
    fresh = load("dietox")
    assert fresh["Weight"].iloc[0] == 26.5
    assert fresh["Time"].iloc[0] == 1
    assert fresh["Pig"].iloc[0] == "4601"
    assert isinstance(fresh.index, pd.RangeIndex)


def test_unknown_name_raises() -> None:
    with pytest.raises(ValueError, match="no_such_data") as excinfo:
        load("no_such_data")
    message = str(excinfo.value)
    for name in NAMES:
        assert name in message
    with pytest.raises(ValueError):
        load("")
    with pytest.raises(TypeError):
        load(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("SLEEPSTUDY", "sleepstudy"),
        ("SleepStudy", "sleepstudy"),
        ("Dyestuff", "dyestuff"),
        ("DYESTUFF2", "dyestuff2"),
        ("InstEval", "insteval"),
        ("Orthodont", "orthodont"),
        ("OxBoys", "oxboys"),
        ("DIETOX", "dietox"),
        ("Cake", "cake"),
        ("Machines", "machines"),
        ("Exam", "exam"),
        ("ScotsSec", "scotssec"),
    ],
)
def test_case_insensitive(alias: str, name: str) -> None:
    a, b = load(alias), load(name)
    pd.testing.assert_frame_equal(a, b)
    assert a.attrs == b.attrs


def test_doctests() -> None:
    result = doctest.testmod(datasets_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
