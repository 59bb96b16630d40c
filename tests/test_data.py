"""The data layer: group codes (the counting path for integer ids), the lazy sort of rows by group, and the
formula designs built without formulaic's materialisation for large numeric designs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from formulaic import model_matrix
from hypothesis import given, settings
from hypothesis import strategies as st

from mixedjax import formula as fml
from mixedjax.data import group_index


def _reference(groups) -> tuple[list, np.ndarray, np.ndarray]:
    codes, uniq = pd.factorize(pd.Series(groups), sort=True)
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes, minlength=len(uniq))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    position = np.empty(len(codes), dtype=np.int64)
    position[order] = np.arange(len(codes)) - starts[codes[order]]
    return list(uniq), codes, position


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-50, 50), min_size=1, max_size=80),
       st.sampled_from([np.int64, np.int32, np.int16, np.int8]), st.booleans())
def test_integer_group_ids_give_the_codes_labels_and_positions_of_a_sorted_factorize(values, dtype, wide):
    """Integer ids (the counting path when their range is short, hashing when ``wide`` makes it long) give
    pandas' sorted factorize: the same labels (plain ints), codes, sizes and in-group positions."""
    g = np.asarray(values, dtype=np.int64) * (10**6 if wide else 1)
    g = g.astype(np.int64 if wide else dtype)
    gi = group_index(g)
    labels, codes, position = _reference(g)
    assert gi.labels == labels and all(type(v) is type(w) for v, w in zip(gi.labels, labels, strict=True))
    np.testing.assert_array_equal(gi.codes, codes)
    np.testing.assert_array_equal(gi.sizes, np.bincount(codes))
    np.testing.assert_array_equal(gi.position, position)
    assert gi.n_max == int(np.bincount(codes).max())


def test_string_and_categorical_groups_and_a_given_position():
    gi = group_index(pd.Categorical(["b", "a", "b"], categories=["z", "b", "a"]))
    assert gi.labels == ["b", "a"] and gi.codes.tolist() == [0, 1, 0] and gi.position.tolist() == [0, 0, 1]
    moved = gi.with_position(np.array([1, 0, 0]))
    assert moved.position.tolist() == [1, 0, 0] and moved.codes is gi.codes


@pytest.mark.parametrize("rhs", ["x1 + x2", "1 + x1", "0 + x1 + n", "x1 * x2", "np.log(x2) + C(f)", "C(f) + x1"])
def test_large_designs_equal_formulaics_and_predict_alike(rhs):
    """Above ``4 * SPEC_ROWS`` rows a design of numeric columns (and the intercept) is copied column by column
    with the spec of its first rows; anything else (transforms, factors, interactions) goes through formulaic.
    Both give formulaic's columns, values and a spec that builds the same design on new data."""
    rng = np.random.default_rng(0)
    n = 4 * fml.SPEC_ROWS + 7
    d = pd.DataFrame({"x1": rng.normal(size=n), "x2": rng.uniform(1, 2, n), "n": rng.integers(0, 9, n),
                      "f": pd.Categorical(rng.choice(["a", "b", "c"], n))})
    want = model_matrix(rhs, d, na_action="ignore")
    got = fml.design(rhs, d)
    assert list(got.columns) == list(want.columns)
    np.testing.assert_array_equal(got.to_numpy(), np.asarray(want, dtype=float))
    new = d.iloc[::-3].reset_index(drop=True)
    np.testing.assert_array_equal(fml.design_like(got, new).to_numpy(),
                                  np.asarray(model_matrix(rhs, new, na_action="ignore"), dtype=float))
