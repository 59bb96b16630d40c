"""A Dask DataFrame as data: Dask computes the per-group cross-products (map_partitions, then a per-group sum),
locally and on a dask.distributed LocalCluster with two worker processes; the fit equals the in-memory fit.

Tolerance: the same cross-products summed in another order; logLik to 1e-9 relative (the issue's bar).
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

import mixedjax

dd = pytest.importorskip("dask.dataframe")
distributed = pytest.importorskip("dask.distributed")


@pytest.fixture(scope="module")
def sleep():
    d = mixedjax.datasets.load("sleepstudy").sample(frac=1.0, random_state=2).reset_index(drop=True)
    d["site"] = np.where(d.index % 3 == 0, "b", "a")  # a string factor: levels collected over partitions
    return d


@pytest.fixture(scope="module")
def in_memory(sleep):
    return mixedjax.mixedlm("Reaction ~ Days + site", sleep, groups="Subject", re_formula="~Days").fit()


def test_dask_dataframe_local_scheduler(sleep, in_memory):
    ddf = dd.from_pandas(sleep, npartitions=4, sort=False)  # groups span partitions
    md = mixedjax.mixedlm("Reaction ~ Days + site", ddf, groups="Subject", re_formula="~Days")
    assert not md.rows_in_memory and md.source == "Dask DataFrame (4 partitions)"
    r = md.fit()
    np.testing.assert_allclose(r.llf, in_memory.llf, rtol=1e-9)
    np.testing.assert_allclose(r.fe_params, in_memory.fe_params, rtol=1e-6)
    np.testing.assert_allclose(r.random_effects["308"], in_memory.random_effects["308"], rtol=1e-5)
    rl = mixedjax.lmer("Reaction ~ Days + (Days || Subject)", ddf)
    rli = mixedjax.lmer("Reaction ~ Days + (Days || Subject)", sleep)
    np.testing.assert_allclose(rl.llf, rli.llf, rtol=1e-9)
    with pytest.raises(NotImplementedError, match="not kept in memory"):
        r.fittedvalues  # noqa: B018


@pytest.mark.timeout(180)
def test_dask_local_cluster_two_worker_processes(sleep, in_memory):
    """Two worker processes; only cross-products come back, and the workers never import mixedjax or JAX."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cl, \
            distributed.Client(cl) as client:
        ddf = dd.from_pandas(sleep, npartitions=6, sort=False)
        r = mixedjax.mixedlm("Reaction ~ Days + site", ddf, groups="Subject", re_formula="~Days").fit()
        imported = client.run(lambda: ("jax" in sys.modules, "mixedjax" in sys.modules))
    np.testing.assert_allclose(r.llf, in_memory.llf, rtol=1e-9)
    np.testing.assert_allclose(r.fe_params, in_memory.fe_params, rtol=1e-6)
    np.testing.assert_allclose(r.cov_re, in_memory.cov_re, rtol=1e-5)
    assert len(imported) == 2 and all(v == (False, False) for v in imported.values()), imported


def test_missing_values_in_a_dask_frame(sleep):
    d = sleep.copy()
    d.loc[[3, 70], "Days"] = np.nan
    ddf = dd.from_pandas(d, npartitions=3, sort=False)
    with pytest.raises(ValueError, match=r"column 'Days': 2 row\(s\) NaN or infinite \(first at row 3\)"):
        mixedjax.mixedlm("Reaction ~ Days", ddf, groups="Subject")
    with pytest.warns(UserWarning, match="dropped 2 row"):
        r = mixedjax.mixedlm("Reaction ~ Days", ddf, groups="Subject", missing="drop").fit()
    ri = mixedjax.mixedlm("Reaction ~ Days", d.dropna(), groups="Subject").fit()
    np.testing.assert_allclose(r.llf, ri.llf, rtol=1e-9)
    assert isinstance(ri.fe_params, pd.Series)
