"""No batched LAPACK call in mixedjax's vmapped programs on CPU (README, "Known traps").

jaxlib 0.10.x's CPU LAPACK kernels split a batch over XLA's intra-op thread pool and wait for it; two batched
calls in flight at once can deadlock. Seen on 2 cores with jaxlib 0.10.2: four independent batched Choleskys
(10,000 4 x 4 matrices, or 2,000 40 x 40) and their triangular solves under ``value_and_grad`` never return;
jaxlib 0.9.2 runs the same program in 1.5 s. The per-group algebra is unrolled (``mixedjax.linalg``) and the
crossed model's dense Schur block goes through ``linalg.unbatched_lapack``. These tests read the compiled
programs (deterministic, the same on every jaxlib) instead of waiting for a hang; the large-batch runs keep a
timeout of their own.
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import pandas as pd
import pytest

import mixedjax
from mixedjax.backends import Result
from mixedjax.linalg import cholesky_loop, solve_lower_loop, solve_upper_t_loop, unbatched_lapack
from mixedjax.many import fit_responses

pytestmark = pytest.mark.timeout(300)

_CALL = re.compile(r"=\s*\(?(\w+)\[([\d,]*)\][^=]*custom-call\(.*custom_call_target=\"([^\"]+)\"")


def lapack_calls(fun, *args) -> list[tuple[str, tuple[int, ...]]]:
    """``(target, shape of the first result)`` of every LAPACK custom call in the compiled ``jit(fun)`` (``fun``
    itself where it is jitted already)."""
    out = []
    jitted = fun if hasattr(fun, "lower") else jax.jit(fun)
    for line in jitted.lower(*args).compile().as_text().splitlines():
        m = _CALL.search(line)
        if m and "lapack" in m.group(3):
            out.append((m.group(3), tuple(int(d) for d in m.group(2).split(",") if d)))
    return out


def batched(calls):
    """The calls on a stack of matrices (rank > 2)."""
    return [c for c in calls if len(c[1]) > 2]


def _plain(s, r):
    chol = jax.lax.linalg.cholesky(s, symmetrize_input=False)
    c = jsl.solve_triangular(chol, r, lower=True)
    return chol, c, jsl.solve_triangular(chol, c, lower=True, trans="T")


def _loops(s, r):
    chol = cholesky_loop(s)
    c = solve_lower_loop(chol, r)
    return chol, c, solve_upper_t_loop(chol, c)


def _spd(rng, b, m):
    x = rng.normal(size=(b, m + 3, m))
    return jnp.asarray(np.einsum("bni,bnj->bij", x, x)), jnp.asarray(rng.normal(size=(b, m, 3)))


def test_the_check_sees_batched_lapack():
    s, r = _spd(np.random.default_rng(0), 4, 8)
    assert batched(lapack_calls(jax.vmap(_plain), s, r))
    assert lapack_calls(_plain, s[0], r[0]) and not batched(lapack_calls(_plain, s[0], r[0]))


# the batched form in plain jnp (scalar unrolled up to 6 rows, then fori_loops), and one problem at a time
@pytest.mark.parametrize(("m", "small_max"), [(5, 256), (12, 256), (12, 0)])
def test_unbatched_lapack(m, small_max):
    s, r = _spd(np.random.default_rng(m), 6, m)
    fun = unbatched_lapack(small=_loops, small_max=small_max)(_plain)
    for got, want in zip(jax.jit(jax.vmap(fun))(s, r), jax.vmap(_plain)(s, r), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert not batched(lapack_calls(jax.vmap(fun), s, r))
    nested = jax.vmap(jax.vmap(fun, in_axes=(0, None)), in_axes=(None, 0))  # a batch of batches
    assert not batched(lapack_calls(nested, s, r))
    np.testing.assert_allclose(nested(s, r)[1][2, 3], _plain(s[3], r[2])[1], rtol=1e-10)
    # unbatched: the function itself, derivatives included (forward and reverse over reverse)
    assert lapack_calls(fun, s[0], r[0]) == lapack_calls(_plain, s[0], r[0])

    def obj(f, t):
        chol, c, y = f(s[0] * t[0] + t[1] * jnp.eye(m), r[0])
        return jnp.sum(jnp.log(jnp.diagonal(chol))) + jnp.sum(c**2) + jnp.sum(y)

    t = jnp.array([1.0, 2.0])
    for jac in (jax.jacfwd, jax.jacrev):
        np.testing.assert_allclose(jax.jit(jac(jax.grad(lambda t: obj(fun, t))))(t),
                                   jax.jit(jac(jax.grad(lambda t: obj(_plain, t))))(t), rtol=1e-9)


def _crossed_slopes(seed=0, ns=12, ni=10):
    """Subjects x items with correlated intercepts and slopes in both: a 20 x 20 dense Schur block."""
    rng = np.random.default_rng(seed)
    s, i = np.repeat(np.arange(ns), ni), np.tile(np.arange(ni), ns)
    cond = np.where((s + i) % 2 == 0, 0.5, -0.5)
    y = 400 + 30 * cond + rng.normal(0, 30, ns)[s] + rng.normal(0, 20, ni)[i] + rng.normal(0, 10, ni)[i] * cond \
        + rng.normal(0, 30, s.size)
    return pd.DataFrame({"subj": s.astype(str), "item": i.astype(str), "cond": cond, "y": y})


MODELS = {
    "penicillin": lambda: mixedjax.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)",
                                        mixedjax.datasets.load("penicillin")),
    "crossed_slopes": lambda: mixedjax.lmer("y ~ cond + (1 + cond | subj) + (1 + cond | item)", _crossed_slopes()),
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_vmapped_crossed_fit_makes_no_batched_lapack_call(kind):
    """The program of fit_many for crossed models (bootstrap's refits are the same vmapped optimiser): the
    crossed model's dense Schur block is the one LAPACK user."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mixedjax.ConvergenceWarning)
        res = MODELS[kind]()
    model = res.model
    y0 = jnp.asarray(model.endog)
    ys = y0 + jnp.arange(4.0)[:, None] * jnp.std(y0) * 0.1 * jnp.sin(jnp.arange(y0.size))
    args = (ys, model.rows_data(), jnp.asarray(res.fitted.theta_full), model.backend, jnp.asarray(True), 200, 1e-6, 0)
    assert not batched(lapack_calls(fit_responses, *args))
    out = fit_responses(*args)
    assert float(out.deviance[0]) == pytest.approx(-2 * res.llf, rel=1e-9)
    assert np.all(np.asarray(out.result) <= Result.NO_PROGRESS)


def test_bootstrap_crossed_large_batch():
    """2,000 crossed refits in one vmapped program, under the module's timeout: a deadlock fails fast."""
    res = MODELS["penicillin"]()
    boot = res.bootstrap(n=2000, seed=3)
    assert boot.n_failed == 0 and len(boot.replicates) == 2000
    assert boot.replicates["converged"].mean() > 0.99
