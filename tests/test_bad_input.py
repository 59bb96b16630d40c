"""Bad input gets a clear ValueError naming the problem; the caller's DataFrame is never modified."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import mixedjax


@pytest.fixture
def df(sleepstudy):
    return sleepstudy.copy()


def test_missing_column(df):
    with pytest.raises(ValueError, match=r"\['Dayz'\] not in the data"):
        mixedjax.mixedlm("Reaction ~ Dayz", df, groups="Subject")
    with pytest.raises(ValueError, match="response column 'Reactn'"):
        mixedjax.mixedlm("Reactn ~ Days", df, groups="Subject")
    with pytest.raises(ValueError, match="groups column 'Subj'"):
        mixedjax.mixedlm("Reaction ~ Days", df, groups="Subj")
    with pytest.raises(ValueError, match="re_formula"):
        mixedjax.mixedlm("Reaction ~ Days", df, groups="Subject", re_formula="~Dayz")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_raises_naming_column(df, bad):
    df.loc[5, "Days"] = bad
    with pytest.raises(ValueError, match=r"column 'Days': 1 row\(s\) NaN or infinite"):
        mixedjax.mixedlm("Reaction ~ Days", df, groups="Subject")


def test_nonfinite_dropped_with_count(df):
    df.loc[[3, 7], "Reaction"] = np.nan
    with pytest.warns(UserWarning, match=r"dropped 2 row\(s\)"):
        model = mixedjax.mixedlm("Reaction ~ Days", df, groups="Subject", missing="drop")
    assert model.nobs == 178


def test_non_numeric_response(df):
    df["label"] = np.where(df.Reaction > 300, "slow", "fast")
    with pytest.raises(ValueError, match="response 'label' is not numeric"):
        mixedjax.mixedlm("label ~ Days", df, groups="Subject")


def test_groups_wrong_length(df):
    with pytest.raises(ValueError, match="groups has length 10; the data have 180 rows"):
        mixedjax.mixedlm("Reaction ~ Days", df, groups=np.arange(10))


def test_rank_deficient_fixed_effects_names_aliased(df):
    df["Days2"] = 2 * df["Days"]
    with pytest.raises(ValueError, match=r"rank deficient: column\(s\) \['Days2'\]"):
        mixedjax.mixedlm("Reaction ~ Days + Days2", df, groups="Subject")


def test_empty_data(df):
    with pytest.raises(ValueError, match="empty"):
        mixedjax.mixedlm("Reaction ~ Days", df.iloc[:0], groups="Subject")


def test_random_effects_not_identifiable():
    rng = np.random.default_rng(0)
    d = pd.DataFrame({"y": rng.normal(size=20), "x": rng.normal(size=20), "x2": rng.normal(size=20),
                      "g": np.arange(20) // 2})
    with pytest.raises(ValueError, match="3 columns .* largest group has 2 row"):
        mixedjax.mixedlm("y ~ x", d, groups="g", re_formula="~x + x2")


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_nonpositive_weights(df, value):
    w = np.ones(len(df))
    w[4] = value
    with pytest.raises(ValueError, match="weights must be positive: 1 are zero or negative"):
        mixedjax.mixedlm("Reaction ~ Days", df, groups="Subject", weights=w)


def test_not_a_dataframe():
    with pytest.raises(ValueError, match="pandas DataFrame"):
        mixedjax.mixedlm("y ~ x", {"y": [1.0]}, groups="g")


def test_array_api_rank_deficient_and_nan():
    x = np.column_stack([np.ones(10), np.arange(10.0), np.arange(10.0)])
    with pytest.raises(ValueError, match=r"\['x3'\]"):
        mixedjax.MixedLM(np.arange(10.0), x, np.arange(10) // 2)
    y = np.arange(10.0)
    y[2] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        mixedjax.MixedLM(y, x[:, :2], np.arange(10) // 2)


def test_caller_dataframe_untouched(df):
    before = df.copy(deep=True)
    df.loc[3, "Reaction"] = np.nan
    before.loc[3, "Reaction"] = np.nan
    with pytest.warns(UserWarning):
        m = mixedjax.mixedlm("Reaction ~ Days", df, groups=df["Subject"], re_formula="~Days",
                             weights=np.ones(len(df)), missing="drop")
    m.fit()
    pd.testing.assert_frame_equal(df, before)
    assert list(df.columns) == list(before.columns)
