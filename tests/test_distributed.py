"""One model over several devices and processes: the group axis of the cross-products sharded with jax.sharding
(4 forced host devices) and over 2 local processes with jax.distributed (each holding half of the groups).

Both run in subprocesses: the device count and the distributed runtime are fixed when JAX starts.  Every
subprocess has a timeout, and the distributed runtime a short initialisation timeout, so a failure fails fast.
Tolerances: the sharded sums over groups are the same sums reordered; logLik to 1e-9 relative (the issue's bar).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import mixedjax

pytest.importorskip("pyarrow")

ENV = dict(os.environ, JAX_PLATFORMS="cpu", MIXEDJAX_CACHE="0")

FOUR_DEVICES = textwrap.dedent(
    """
    import json, sys, jax, mixedjax
    assert len(jax.devices()) == 4, jax.devices()
    d = mixedjax.datasets.load("sleepstudy")
    md = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", re_formula="~Days").shard()
    cp = md.backend_data.cp
    assert len(cp.ztz.sharding.device_set) == 4 and cp.ztz.shape[0] == 20, cp.ztz.sharding  # 18 groups, padded
    r = md.fit()
    d.sample(frac=1.0, random_state=0).to_parquet(sys.argv[1])
    ooc = mixedjax.mixedlm("Reaction ~ Days", sys.argv[1], groups="Subject", re_formula="~Days").shard().fit()
    out = {"llf": r.llf, "fe": r.fe_params.tolist(), "cov_re": r.cov_re.to_numpy().ravel().tolist(),
           "ranef": r.random_effects["335"].tolist(), "fitted": r.fittedvalues[:5].tolist(), "ooc_llf": ooc.llf}
    print("RESULT " + json.dumps(out), flush=True)
    """
)

WORKER = textwrap.dedent(
    """
    import json, sys
    import jax
    pid, port, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid, initialization_timeout=20)
    import mixedjax  # after initialize: importing mixedjax runs JAX computations
    md = mixedjax.mixedlm("Reaction ~ Days", path, groups="Subject", re_formula="~Days", distributed=True)
    shards = md.backend_data.cp.ztz.addressable_shards
    r = md.fit()
    out = {"llf": r.llf, "fe": r.fe_params.tolist(), "cov_re": r.cov_re.to_numpy().ravel().tolist(),
           "bse_fe": r.bse_fe.tolist(), "ngroups": r.ngroups, "nobs": r.nobs,
           "local_groups": [s.data.shape[0] for s in shards], "global_groups": md.backend_data.cp.ztz.shape[0],
           "ranef": r.random_effects["335"].tolist()}
    print("RESULT " + json.dumps(out), flush=True)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def result_of(stdout: str) -> dict:
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])


@pytest.fixture(scope="module")
def sleep_fit():
    d = mixedjax.datasets.load("sleepstudy")
    return mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", re_formula="~Days").fit()


@pytest.mark.timeout(200)
def test_group_axis_over_four_devices(tmp_path, sleep_fit):
    """In memory (cross-products and padded rows sharded) and from Parquet: the single-device answer."""
    env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env.pop("MIXEDJAX_CACHE")  # one process: the suite's compilation cache is safe to share
    out = subprocess.run([sys.executable, "-c", FOUR_DEVICES, str(tmp_path / "sleep.parquet")], env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    got, ref = result_of(out.stdout), sleep_fit
    np.testing.assert_allclose([got["llf"], got["ooc_llf"]], ref.llf, rtol=1e-9)
    np.testing.assert_allclose(got["fe"], ref.fe_params, rtol=1e-7)
    np.testing.assert_allclose(got["cov_re"], ref.cov_re.to_numpy().ravel(), rtol=1e-6)
    np.testing.assert_allclose(got["ranef"], ref.random_effects["335"], rtol=1e-6)
    np.testing.assert_allclose(got["fitted"], ref.fittedvalues[:5], rtol=1e-9)


@pytest.mark.timeout(200)
def test_two_processes_each_holding_half_of_the_groups(tmp_path, sleep_fit):
    d = mixedjax.datasets.load("sleepstudy").sample(frac=1.0, random_state=1).reset_index(drop=True)
    labels = sorted(d.Subject.unique())
    for pid in (0, 1):  # each process its own Parquet file: half of the groups
        d[d.Subject.isin(labels[pid::2])].to_parquet(tmp_path / f"part{pid}.parquet")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(pid), str(port), str(tmp_path / f"part{pid}.parquet")],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in (0, 1)]
    deadline = time.monotonic() + 170
    try:
        while any(p.poll() is None for p in procs):  # one failing process must not leave the other waiting
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outs = [p.communicate(timeout=30) for p in procs]
    for p, (_, stderr) in zip(procs, outs, strict=True):
        assert p.returncode == 0, stderr[-3000:]
    got = [result_of(stdout) for stdout, _ in outs]
    ref = sleep_fit
    for g in got:
        assert g["local_groups"] == [g["global_groups"] // 2] and g["global_groups"] >= 18  # half of the groups each
        assert (g["ngroups"], g["nobs"]) == (18, 180)
        np.testing.assert_allclose(g["llf"], ref.llf, rtol=1e-9)
        np.testing.assert_allclose(g["fe"], ref.fe_params, rtol=1e-7)
        np.testing.assert_allclose(g["cov_re"], ref.cov_re.to_numpy().ravel(), rtol=1e-6)
        np.testing.assert_allclose(g["bse_fe"], ref.bse_fe, rtol=1e-7)
        np.testing.assert_allclose(g["ranef"], ref.random_effects["335"], rtol=1e-6)
