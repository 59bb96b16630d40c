"""Batched fits shard the model axis over devices; sharded results equal unsharded ones.

Runs in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4 (four CPU devices), since
the device count is fixed when JAX starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np, mixedjax
    assert len(jax.devices()) == 4, jax.devices()
    d = mixedjax.datasets.load("sleepstudy")
    md = mixedjax.mixedlm("Reaction ~ Days", d, groups="Subject", re_formula="~Days")
    rng = np.random.default_rng(0)
    Y = d.Reaction.to_numpy()[:, None] + rng.normal(0, 30, (180, 30))
    Y[rng.random(Y.shape) < 0.03] = np.nan
    sharded = md.fit_many(Y, batch_size=14)  # chunks of 16 (a multiple of 4 devices), 3 chunks
    single = md.fit_many(Y, shard=False)
    assert sharded.n_devices == 4 and single.n_devices == 1
    assert sharded.converged.all() and single.converged.all()
    np.testing.assert_allclose(sharded.llf, single.llf, rtol=0, atol=1e-8)
    np.testing.assert_allclose(sharded.fe_params, single.fe_params, rtol=1e-8)
    np.testing.assert_allclose(sharded.cov_re, single.cov_re, rtol=1e-6, atol=1e-6)
    print("OK", sharded.n_devices)
    """
)


@pytest.mark.timeout(300)
def test_sharded_equals_unsharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK 4" in out.stdout
