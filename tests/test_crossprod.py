"""The numpy per-group cross-products (mixedjax.crossprod): against dense per-group products and against the
padded JAX cross-products of an in-memory model; level collection across pieces; shipping to Dask workers."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from formulaic import model_matrix

import mixedjax
from mixedjax import crossprod as cpm
from mixedjax import formula as fml
from mixedjax.data import bucket, cross_products, group_index, pad_groups, row_cross_products


def test_group_gram_equals_dense_products_per_group():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 7, 200)
    z, x, y = rng.normal(size=(200, 2)), rng.normal(size=(200, 3)), rng.normal(size=200)
    w = rng.uniform(0.5, 2.0, 200)
    cols = np.column_stack([x, z, y]) * np.sqrt(w)[:, None]  # U = [X | Z | y]
    groups, packed = cpm.group_gram(codes, cols, np.log(w))
    s = cpm.unpack(packed, 3, (3, 4), groups=groups, n_groups=7)
    for g in range(7):
        r = codes == g
        zw, xw, yw = (a[r] * np.sqrt(w[r]).reshape(-1, *([1] * (a.ndim - 1))) for a in (z, x, y))
        # rtol 1e-12: the same sums in another order
        np.testing.assert_allclose(s.ztz[g], zw.T @ zw, rtol=1e-12)
        np.testing.assert_allclose(s.ztx[g], zw.T @ xw, rtol=1e-12)
        np.testing.assert_allclose(s.zty[g], zw.T @ yw, rtol=1e-12)
        np.testing.assert_allclose(s.xtx[g], xw.T @ xw, rtol=1e-12)
        np.testing.assert_allclose(s.xty[g], xw.T @ yw, rtol=1e-12)
        np.testing.assert_allclose(s.yty[g], yw @ yw, rtol=1e-12)
        assert s.n[g] == r.sum()
        np.testing.assert_allclose(s.logw[g], np.log(w[r]).sum(), rtol=1e-12)


def test_pieces_sum_to_the_whole():
    """Cross-products are sums over rows: any split of the rows, in any order, adds up to the whole."""
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 5, 90)
    cols = rng.normal(size=(90, 4))
    _, whole = cpm.group_gram(codes, cols, n_groups=5)
    acc = np.zeros_like(whole)
    for idx in np.array_split(rng.permutation(90), 4):
        groups, packed = cpm.group_gram(codes[idx], cols[idx])
        acc[groups] += packed
    np.testing.assert_allclose(acc, whole, rtol=1e-12)


def test_frame_sums_equal_the_models_cross_products():
    """frame_sums on a DataFrame gives the cross-products the in-memory model computes from its padded rows."""
    d = mixedjax.datasets.load("sleepstudy")
    md = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", re_formula="~Days")
    x = model_matrix("1 + Days", d)
    for z_columns in (((0, 0), (0, 1)), ((-1, 0), (-1, 1))):  # Z repeated in U, or taken from X's columns
        plan = cpm.DesignPlan(("Reaction", "Days", "Subject"), "Reaction", "Subject", x.model_spec, (x.model_spec,),
                              z_columns, labels=pd.Index(md.group_labels))
        groups, packed = cpm.frame_sums(d, plan)
        s = cpm.unpack(packed, 2, plan.z_index(2), groups=groups, n_groups=len(md.group_labels))
        check_against_model(s, md)


def check_against_model(s: cpm.GroupSums, md: mixedjax.MixedLM) -> None:
    cp = md.backend_data.cp
    g = len(md.group_labels)
    for name in ("ztz", "ztx", "zty", "n"):
        np.testing.assert_allclose(getattr(s, name), np.asarray(getattr(cp, name))[:g], rtol=1e-12, err_msg=name)
    for name in ("xtx", "xty", "yty"):  # the model keeps these summed over the groups (only the sums enter)
        np.testing.assert_allclose(getattr(s, name).sum(axis=0), np.asarray(getattr(cp, name)).sum(axis=0),
                                   rtol=1e-12, err_msg=name)


@pytest.mark.parametrize("weighted", [False, True])
def test_row_cross_products_equal_those_of_the_padded_rows(weighted):
    """The model's cross-products straight from the rows (bincounts, no padding) equal the padded ones, with
    prior weights, a Z column that is not a column of X, and empty groups after the real ones."""
    rng = np.random.default_rng(5)
    n = 300
    codes = rng.permutation(np.repeat(np.arange(11), 30)[:n])
    x = np.column_stack([np.ones(n), rng.normal(size=n), rng.normal(size=n)])
    z = np.column_stack([x[:, 1], np.ones(n), rng.normal(size=n)])  # slope, intercept (in X), a column not in X
    y, w = rng.normal(size=n), rng.uniform(0.3, 3.0, n) if weighted else np.ones(n)
    gi = group_index(codes)
    full = cross_products(pad_groups(gi, y, x, z, w, 16, bucket(gi.n_max)))
    rows = row_cross_products(gi.codes, y, x, z, w if weighted else None, 16)
    for name in full._fields:
        a, b = np.asarray(getattr(full, name)), np.asarray(getattr(rows, name))
        if name in ("xtx", "xty", "yty"):
            a = a.sum(axis=0, keepdims=True)
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12, err_msg=name)


def test_iid_models_lay_out_their_rows_only_when_a_feature_needs_them():
    """An iid per-group model fits from its cross-products; fitted values, simulation and new responses lay the
    rows out once (``rows_data``), with the same cross-products; a structured-residual model has them at once."""
    d = mixedjax.datasets.load("sleepstudy")
    md = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", re_formula="~Days")
    assert md.backend_data.padded is None
    res = md.fit()
    assert md.backend_data.padded is None
    rows = md.rows_data()
    assert rows.padded is not None and rows.cp is md.backend_data.cp and md.rows_data() is rows
    fe = md.exog @ res.fe_params.to_numpy()
    re = res.random_effects
    zb = np.array([re[g].to_numpy() @ [1.0, day] for g, day in zip(d.Subject, d.Days, strict=True)])
    np.testing.assert_allclose(res.fittedvalues, fe + zb, rtol=1e-10)
    np.testing.assert_allclose(res.simulate(2, seed=1).shape, (len(d), 2))
    many = md.fit_many(np.column_stack([d.Reaction, d.Reaction * 2.0]))
    np.testing.assert_allclose(many.llf[0], res.llf, rtol=1e-9)
    structured = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", residual=mixedjax.AR1(time="Days"))
    assert structured.backend_data.padded is not None and structured.rows_data() is structured.backend_data


def test_aliased_from_gram_matches_the_row_rule():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 3))
    x = np.column_stack([x, x[:, 0] - 2 * x[:, 2], np.zeros(50), rng.normal(size=50)])
    names = list("abcdef")
    assert cpm.aliased_from_gram(x.T @ x, names, 50) == fml.aliased_columns(x, names) == ["d", "e"]


def test_levels_are_collected_across_pieces_in_order():
    a = pd.DataFrame({"y": [1.0, 2.0], "s": ["b", "a"], "c": pd.Categorical(["u", "u"], categories=["w", "u", "v"]),
                      "g": [3, 1]})
    b = pd.DataFrame({"y": [np.inf, 4.0], "s": ["c", "z"], "c": pd.Categorical(["v", "w"], categories=["w", "u", "v"]),
                      "g": [2, 5]}, index=[7, 8])
    plan = cpm.LevelPlan(("y", "s", "c", "g"), ("c", "s"), "g", "y", missing="drop")
    m = cpm.merge_levels([cpm.frame_levels(a, plan), cpm.frame_levels(b, plan)])
    assert (m["rows"], m["kept"], m["bad"]) == (4, 3, {"y": (1, 7)})
    assert cpm.ordered_levels(*m["levels"]["s"]) == ["a", "b", "z"]  # the row with y = inf is gone, as in memory
    assert cpm.ordered_levels(*m["levels"]["c"]) == ["w", "u", "v"]  # a categorical keeps its categories' order
    assert cpm.ordered_levels(*m["groups"]) == [1, 3, 5]


@pytest.mark.timeout(60)
def test_shipped_functions_need_neither_mixedjax_nor_jax(tmp_path):
    """What Dask sends to its workers unpickles and runs in a process that never imports mixedjax or JAX."""
    plan = cpm.LevelPlan(("y", "g"), (), "g", "y")
    (tmp_path / "task.pkl").write_bytes(pickle.dumps(cpm.Shipped(cpm.frame_levels, plan)))
    script = ("import pickle, sys, pandas as pd\n"
              "f = pickle.loads(open('task.pkl', 'rb').read())\n"
              "out = f(pd.DataFrame({'y': [1.0, 2.0], 'g': ['a', 'b']}))\n"
              "print(out['groups'][1].tolist(), 'mixedjax' in sys.modules, 'jax' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=50)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["['a',", "'b']", "False", "False"]


@pytest.mark.parametrize("bad", [pd.DataFrame({"y": ["a"], "g": [1]}), pd.DataFrame({"y": [True], "g": [1]})])
def test_non_numeric_response_is_refused(bad):
    with pytest.raises(ValueError, match="not numeric"):
        cpm.frame_levels(bad, cpm.LevelPlan(("y", "g"), (), "g", "y"))


@pytest.mark.parametrize("name", ["mixedjax.crossprod", "mixedjax.sharding"])
def test_docstring_examples(name):
    import doctest
    import importlib

    assert doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS).failed == 0
