"""Per-group models fitted from Parquet in row batches (mixedjax.sources) equal the in-memory fits.

The data are shuffled and split over three files (groups span files), a factor's level first appears in the
last file, a categorical column is stored as a Parquet dictionary (per batch), and batches are small, so
every piece of the levels pass matters.  Tolerances: the out-of-core fit sums the same cross-products in
another order (differences ~1e-13), and both fits stop at the same gradient tolerance, so logLik agrees to
1e-9 relative (the issue's bar) and estimates to 1e-6.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

import mixedjax

pytest.importorskip("pyarrow")

FORMULA = "y ~ site + C(k) + cat + x"


def panel(seed: int = 0, groups: int = 40) -> pd.DataFrame:
    """Unbalanced panel: string groups, a string factor, an integer used as C(k), a categorical, weights."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(3, 12, groups)
    gi = np.repeat(np.arange(groups), sizes)
    n = len(gi)
    x = rng.normal(size=n)
    site = rng.choice(["north", "east", "west"], n)
    k = rng.integers(1, 4, n)
    cat = pd.Categorical(rng.choice(["hi", "lo", "mid"], n), categories=["lo", "mid", "hi"])
    b0, b1 = rng.normal(0, 1.0, groups), rng.normal(0, 0.5, groups)
    y = 1 + 0.5 * x + 0.3 * (site == "east") + 0.2 * k + 0.4 * (cat == "hi") + b0[gi] + b1[gi] * x \
        + rng.normal(0, 0.7, n)
    df = pd.DataFrame({"y": y, "x": x, "site": site, "k": k, "cat": cat, "g": [f"s{i:02d}" for i in gi],
                       "w": rng.uniform(0.5, 2.0, n)})
    df = df.sample(frac=1.0, random_state=seed)
    return pd.concat([df[df.site != "west"], df[df.site == "west"]], ignore_index=True)  # "west" only at the end


def write_parts(df: pd.DataFrame, path, parts: int = 3):
    path.mkdir()
    for i, part in enumerate(np.array_split(np.arange(len(df)), parts)):
        df.iloc[part].to_parquet(path / f"part-{i}.parquet", index=False)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_parts(panel(), tmp_path_factory.mktemp("pq") / "panel")


@pytest.fixture(scope="module")
def slope_fits(data_dir):
    """``y ~ x`` with a random slope, out of memory (batches of 37 rows) and in memory; shared by the tests
    (each feature compiles once per data layout)."""
    md = mixedjax.mixedlm("y ~ x", data_dir, groups="g", re_formula="~x", batch_size=37)
    mem = pd.read_parquet(data_dir)
    return md.fit(), mixedjax.mixedlm("y ~ x", mem, groups="g", re_formula="~x").fit()


def assert_same_fit(a, b):
    assert a.converged and b.converged
    np.testing.assert_allclose(a.llf, b.llf, rtol=1e-9)  # the bar
    assert list(a.fe_params.index) == list(b.fe_params.index)
    np.testing.assert_allclose(a.fe_params.to_numpy(), b.fe_params.to_numpy(), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(a.bse_fe.to_numpy(), b.bse_fe.to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(a.scale, b.scale, rtol=1e-6)
    np.testing.assert_allclose(a.cov_re.to_numpy(), b.cov_re.to_numpy(), rtol=1e-5, atol=1e-8)
    assert a.nobs == b.nobs and a.ngroups == b.ngroups


def test_mixedlm_from_parquet_equals_in_memory(data_dir, slope_fits):
    r, ri = slope_fits
    assert not pd.read_parquet(data_dir).g.is_monotonic_increasing  # rows not sorted by group
    assert not r.model.rows_in_memory and r.model.source.startswith("Parquet (3 files")
    assert_same_fit(r, ri)
    np.testing.assert_allclose(r.bse_re.to_numpy(), ri.bse_re.to_numpy(), rtol=1e-5)
    assert r.model.group_labels == ri.model.group_labels
    for lab in ("s00", "s39"):
        np.testing.assert_allclose(r.random_effects[lab], ri.random_effects[lab], rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(r.random_effects_cov[lab], ri.random_effects_cov[lab], rtol=1e-5, atol=1e-10)
    assert r.summary().tables[1].equals(ri.summary().tables[1])
    new = pd.DataFrame({"x": [0.5, -1.0], "g": ["s03", "unseen"]})
    for cond in (False, True):
        np.testing.assert_allclose(r.predict(new, conditional=cond), ri.predict(new, conditional=cond), rtol=1e-6)
    np.testing.assert_allclose(r.predict(new, se=True).to_numpy(), ri.predict(new, se=True).to_numpy(), rtol=1e-6)


def test_factor_levels_collected_across_batches_and_files(data_dir):
    """A level first seen in the last file, a categorical stored as per-batch Parquet dictionaries and an integer
    column used as C(k) are coded in every batch as in memory."""
    mem = pd.read_parquet(data_dir)
    assert isinstance(mem.cat.dtype, pd.CategoricalDtype) and "west" not in set(mem.site.iloc[:100])
    r = mixedjax.mixedlm(FORMULA, data_dir, groups="g", batch_size=29).fit()
    ri = mixedjax.mixedlm(FORMULA, mem, groups="g").fit()
    assert list(r.fe_params.index) == ["Intercept", "site[T.north]", "site[T.west]", "C(k)[T.2]", "C(k)[T.3]",
                                       "cat[T.mid]", "cat[T.hi]", "x"]
    assert_same_fit(r, ri)
    new = pd.DataFrame({"x": [0.5], "site": ["west"], "k": [3], "cat": ["hi"], "g": ["s03"]})
    np.testing.assert_allclose(r.predict(new, conditional=True), ri.predict(new, conditional=True), rtol=1e-6)


def test_one_file_and_a_list_of_files(data_dir, tmp_path):
    mem = pd.read_parquet(data_dir)
    one = tmp_path / "all.parquet"
    mem.to_parquet(one, row_group_size=50)
    files = sorted(str(p) for p in data_dir.glob("*.parquet"))
    a = mixedjax.mixedlm("y ~ x", one, groups="g").fit()
    b = mixedjax.mixedlm("y ~ x", files, groups="g", batch_size=64).fit()
    c = mixedjax.mixedlm("y ~ x", mem, groups="g").fit()
    np.testing.assert_allclose([a.llf, b.llf], c.llf, rtol=1e-9)


def test_lmer_from_parquet_with_weights_equals_in_memory(data_dir):
    mem = pd.read_parquet(data_dir)
    r = mixedjax.lmer("y ~ x + (x || g)", data_dir, weights="w", batch_size=50)
    ri = mixedjax.lmer("y ~ x + (x || g)", mem, weights="w")
    np.testing.assert_allclose(r.llf, ri.llf, rtol=1e-9)
    np.testing.assert_allclose(r.varcorr().vcov, ri.varcorr().vcov, rtol=1e-5)
    assert list(r.varcorr().group) == list(ri.varcorr().group) == ["g", "g.1", "Residual"]
    np.testing.assert_allclose(r.random_effects["g"].to_numpy(), ri.random_effects["g"].to_numpy(), rtol=1e-5,
                               atol=1e-8)
    new = pd.DataFrame({"x": [1.0], "g": ["s05"]})
    np.testing.assert_allclose(r.predict(new, conditional=True), ri.predict(new, conditional=True), rtol=1e-6)


def test_missing_values_as_in_memory(tmp_path):
    df = panel()
    df.loc[[5, len(df) - 4], "x"] = np.nan
    df.loc[17, "y"] = np.inf
    path = write_parts(df, tmp_path / "miss")
    with pytest.raises(ValueError, match=r"column 'y': 1 row\(s\) NaN or infinite \(first at row 17\); "
                                         r"column 'x': 2 row\(s\) NaN or infinite \(first at row 5\)"):
        mixedjax.mixedlm("y ~ x", path, groups="g")
    with pytest.warns(UserWarning, match="dropped 3 row"):
        r = mixedjax.mixedlm("y ~ x", path, groups="g", missing="drop", batch_size=30).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ri = mixedjax.mixedlm("y ~ x", pd.read_parquet(path), groups="g", missing="drop").fit()
    assert r.nobs == ri.nobs == len(df) - 3
    np.testing.assert_allclose(r.llf, ri.llf, rtol=1e-9)


def test_inference_without_rows(data_dir, slope_fits):
    """What needs no rows: Satterthwaite df, Wald tests, likelihood-ratio tests, profile intervals, condVar."""
    r, ri = slope_fits
    np.testing.assert_allclose(r.fe_table("satterthwaite")["df"], ri.fe_table("satterthwaite")["df"], rtol=1e-5)
    np.testing.assert_allclose(r.t_test("x = 0.5").pvalue, ri.t_test("x = 0.5").pvalue, rtol=1e-6)
    np.testing.assert_allclose(r.condvar().condsd, ri.condvar().condsd, rtol=1e-5)
    r0 = mixedjax.mixedlm("y ~ x", data_dir, groups="g").fit()
    ri0 = mixedjax.mixedlm("y ~ x", pd.read_parquet(data_dir), groups="g").fit()
    np.testing.assert_allclose(mixedjax.anova(r0, r)["Chisq"].iloc[1], mixedjax.anova(ri0, ri)["Chisq"].iloc[1],
                               rtol=1e-6)
    # profile intervals: lme4's rows, the ends found by the same root search on either data layout
    np.testing.assert_allclose(r0.conf_int(method="profile").to_numpy(), ri0.conf_int(method="profile").to_numpy(),
                               rtol=1e-5)


def test_what_needs_rows_says_so(slope_fits):
    r, _ = slope_fits
    for what in (lambda: r.fittedvalues, lambda: r.resid, lambda: r.simulate(2), lambda: r.bootstrap(3),
                 lambda: r.model.fit_many(np.zeros((r.nobs, 2))), lambda: r.summary(ddf="kenward-roger"),
                 lambda: r.predict()):
        with pytest.raises(NotImplementedError, match="not kept in memory"):
            what()


def test_out_of_memory_refusals(data_dir):
    with pytest.raises(NotImplementedError, match="crossed or nested"):
        mixedjax.lmer("y ~ x + (1 | g) + (1 | site)", data_dir)
    with pytest.raises(NotImplementedError, match="structured residuals"):
        mixedjax.mixedlm("y ~ x", data_dir, groups="g", residual=mixedjax.VarIdent("site"))
    with pytest.raises(NotImplementedError, match="variance components"):
        mixedjax.mixedlm("y ~ x", data_dir, groups="g", vc_formula={"s": "0 + C(site)"})
    with pytest.raises(NotImplementedError, match="data-dependent transform"):
        mixedjax.mixedlm("y ~ center(x)", data_dir, groups="g")
    with pytest.raises(ValueError, match="column name"):
        mixedjax.mixedlm("y ~ x", data_dir, groups=np.zeros(3))
    with pytest.raises(ValueError, match="not in the data"):
        mixedjax.mixedlm("y ~ nope", data_dir, groups="g")
    with pytest.raises(FileNotFoundError):
        mixedjax.mixedlm("y ~ x", data_dir / "missing.parquet", groups="g")


def test_docstring_examples():
    import doctest

    from mixedjax import sources

    assert doctest.testmod(sources, optionflags=doctest.ELLIPSIS).failed == 0
