"""mixedjax.export_cache: serialized programs (jax.export) that a second process loads instead of tracing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import mixedjax
from mixedjax import cache, export_cache
from mixedjax.covariance import CovStructure

FIT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import mixedjax
    import lapack_program
    df = mixedjax.datasets.load("dyestuff")
    r = mixedjax.mixedlm("Yield ~ 1", df, groups="Batch").fit()
    print(repr(r.llf))
    print(r.summary())
    print(lapack_program.chol_jit(np.eye(3) + 1.0))
    print(json.dumps(mixedjax.export_cache.stats()))
""")
# a program with a LAPACK call (jaxlib fills its LAPACK table only when it lowers one: a loaded program must not
# find it empty)
LAPACK_PROGRAM = textwrap.dedent("""
    import jax.numpy as jnp
    from mixedjax.export_cache import cached_jit

    def chol(a):
        return jnp.linalg.cholesky(a @ a.T)

    chol_jit = cached_jit(chol)
""")


def run(code: str, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items()
            if k not in ("MIXEDJAX_CACHE_DIR", "MIXEDJAX_CACHE", "JAX_COMPILATION_CACHE_DIR", "TF_CPP_MIN_LOG_LEVEL")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=timeout)


def test_second_process_loads_the_exported_programs(tmp_path):
    d = tmp_path / "cache"
    (tmp_path / "lapack_program.py").write_text(LAPACK_PROGRAM)
    env = {"MIXEDJAX_CACHE_DIR": str(d), "PYTHONPATH": os.pathsep.join([str(tmp_path)] + sys.path)}
    # different hash seeds: the keys must not depend on Python's per-process string hashing
    first = run(FIT, dict(env, PYTHONHASHSEED="1"))
    assert first.returncode == 0, first.stderr
    s1 = json.loads(first.stdout.splitlines()[-1])
    assert s1["exported"] >= 4 and s1["loaded"] == 0 and s1["plain"] == 0, s1  # fit, estimates, Hessian, LAPACK
    assert s1["executables"] == 0 and s1["executables_not_kept"] == 0, s1
    files = sorted(os.listdir(d / "export"))
    programs = [f for f in files if f.endswith(".bin")]
    executables = [f for f in files if f.endswith(".exe")]
    assert len(programs) == len(executables) == s1["exported"] == len(files) // 2, files
    machine = export_cache.machine_key()
    assert {f.removesuffix(".bin") + f"-{machine}.exe" for f in programs} == set(executables)
    second = run(FIT, dict(env, PYTHONHASHSEED="2"))
    assert second.returncode == 0, second.stderr
    s2 = json.loads(second.stdout.splitlines()[-1])
    # every program and its compiled executable read from disk: nothing traced, lowered or compiled
    assert s2["loaded"] == s2["executables"] == s1["exported"] and s2["exported"] == 0 and s2["plain"] == 0, s2
    assert s2["executables_not_kept"] == 0, s2
    assert second.stdout.splitlines()[:-1] == first.stdout.splitlines()[:-1]  # same logLik, same summary
    assert second.stderr == "", second.stderr
    assert sorted(os.listdir(d / "export")) == files
    # a damaged executable is removed and its program compiled here; the results do not change
    damaged = d / "export" / executables[0]
    damaged.write_bytes(export_cache.EXE_MAGIC + b"garbage")
    third = run(FIT, dict(env, PYTHONHASHSEED="3"))
    assert third.returncode == 0, third.stderr
    s3 = json.loads(third.stdout.splitlines()[-1])
    assert s3["executables"] == s1["exported"] - 1 and s3["executables_not_kept"] == 1 and s3["plain"] == 0, s3
    assert third.stdout.splitlines()[:-1] == first.stdout.splitlines()[:-1]
    assert not damaged.exists() or damaged.read_bytes() != export_cache.EXE_MAGIC + b"garbage"  # removed or rewritten


@pytest.fixture
def export_dir(tmp_path, monkeypatch):
    """An export directory and a JAX compilation cache of this test's own, whatever the suite's cache settings (the
    suite's cache outlives a run: its programs would come back as cache hits, which are never written)."""
    d = tmp_path / "export"
    monkeypatch.setattr(export_cache, "directory", lambda: d)
    export_cache.reset_stats()
    before = cache.compilation_cache_dir()
    cache.enable_compilation_cache(tmp_path / "jax")
    yield d
    if before:
        cache.enable_compilation_cache(before)
    else:
        cache.disable_compilation_cache()


def _host_sin(x):
    return jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x) + 1.0


def _scaled(x, k):
    return jnp.sum(x) * k


def test_unsupported_programs_fall_back_to_jit(export_dir):
    x = jnp.linspace(0.0, 1.0, 5)
    f = export_cache.cached_jit(_host_sin)  # a host callback: jax.export cannot serialize it
    np.testing.assert_allclose(f(x), np.sin(np.asarray(x)) + 1.0)
    np.testing.assert_allclose(f(x), np.sin(np.asarray(x)) + 1.0)  # the second call goes straight to jit
    st = export_cache.stats()
    assert st["plain"] == 1 and st["exported"] == 0, st
    assert "_host_sin" in st["errors"][0]
    assert not export_dir.exists() or not list(export_dir.iterdir())
    # a static argument without a process-independent repr (a function) and a call under vmap: plain jit too
    g = export_cache.cached_jit(lambda x, fn: fn(x), static_argnames=("fn",), name="test.apply")
    np.testing.assert_allclose(g(x, fn=jnp.cos), np.cos(np.asarray(x)))
    assert export_cache.stats()["plain"] == 2
    h = export_cache.cached_jit(_scaled, static_argnames=("k",))
    np.testing.assert_allclose(jax.vmap(lambda r: h(r, k=3.0))(jnp.ones((2, 4))), [12.0, 12.0])
    assert export_cache.stats()["exported"] == 0
    # and a supported one is exported once, then served from memory; a damaged file is replaced
    assert float(h(x, k=2.0)) == pytest.approx(5.0)
    assert float(h(x, k=2.0)) == pytest.approx(5.0)
    assert export_cache.stats()["exported"] == 1
    assert float(h.compiled(x, k=2.0)(x + 1.0)) == pytest.approx(15.0)  # as jit(...).lower(...).compile()
    assert float(g.compiled(x, fn=jnp.cos)(x)[0]) == pytest.approx(1.0)
    export_cache.wait_for_writes()
    (path,) = export_dir.glob("*.bin")
    path.write_bytes(b"not a program")
    fresh = export_cache.cached_jit(_scaled, static_argnames=("k",))
    assert float(fresh(x, k=2.0)) == pytest.approx(5.0)
    assert export_cache.stats()["exported"] == 2 and path.read_bytes().startswith(export_cache.MAGIC)
    again = export_cache.cached_jit(_scaled, static_argnames=("k",))
    assert float(again(x, k=2.0)) == pytest.approx(5.0) and export_cache.stats()["loaded"] == 1


def _tripled(x):
    return 3.0 * x


def test_writes_inside_writes_after_wait_for_its_end(export_dir):
    f = export_cache.cached_jit(_tripled)
    with export_cache.writes_after():
        with export_cache.writes_after():  # nested: the outermost block's end releases them
            assert float(f(jnp.ones(2))[0]) == 3.0  # compiled and run at once
        for thread in threading.enumerate():
            assert thread.name != "mixedjax-export-cache" or not thread.is_alive()
        assert not export_dir.exists() or not list(export_dir.glob("*.bin"))
    export_cache.wait_for_writes()
    assert len(list(export_dir.glob("*.bin"))) == 1 and export_cache.stats()["exported"] == 1
    # wait_for_writes inside the block starts the held writes instead of waiting for ever
    g = export_cache.cached_jit(_scaled, static_argnames=("k",))
    with export_cache.writes_after():
        assert float(g(jnp.ones(2), k=2.0)) == 4.0
        export_cache.wait_for_writes()
        assert len(list(export_dir.glob("*.bin"))) == 2


def _cubed(x):
    return x**3


def test_compile_ahead_is_the_compilation_the_call_uses(export_dir):
    compiles = []

    def listen(event, secs, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration" and kwargs.get("fun_name") == "jit(bound_fun)":
            compiles.append(secs)

    x, x1, ones = (jax.device_put(v) for v in (np.arange(4.0), np.arange(1.0, 5.0), np.ones(3)))  # no programs
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        f = export_cache.cached_jit(_cubed)
        thread = f.compile_ahead(jax.ShapeDtypeStruct((4,), np.float64))  # the array does not exist yet
        np.testing.assert_allclose(f(x), np.arange(4.0) ** 3)  # waits for the thread's compilation
        thread.join()
        np.testing.assert_allclose(f.compiled(x)(x1), np.arange(1.0, 5.0) ** 3)
        assert len(compiles) == 1, compiles
        # a wrong guess costs a compilation, never a wrong answer
        f.compile_ahead(jax.ShapeDtypeStruct((5,), np.float64)).join()
        np.testing.assert_allclose(f(ones), np.ones(3))
        assert len(compiles) == 3, compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    # what jit cannot trace is noted, not raised
    g = export_cache.cached_jit(_cubed)
    g.compile_ahead(jax.ShapeDtypeStruct((2, 2), np.dtype("U1"))).join()
    assert any("_cubed" in e for e in export_cache.stats()["errors"])


def test_the_key_follows_static_arguments_and_shapes():
    def key(static, shape, dtype=np.float64, weak=False, opts=None):
        treedef = jax.tree_util.tree_structure({"x": 0})
        return export_cache.program_key("m.f", static, treedef, ((shape, np.dtype(dtype), weak),), opts or {})

    s1 = {"structure": CovStructure(q_re=1, re_names=("Group",))}
    s2 = {"structure": CovStructure(q_re=2, re_names=("Group", "Time"))}
    base = key(s1, (3, 2))
    assert key(s1, (3, 2)) == base
    assert key(dict(s1), (3, 2)) == base
    assert len({base, key(s2, (3, 2)), key(s1, (3, 3)), key(s1, (3, 2), np.float32), key(s1, (3, 2), weak=True),
                key(s1, (3, 2), opts={"xla_backend_optimization_level": 0})}) == 6
    # reprs that carry an address (or a function) are refused: such programs are never written
    with pytest.raises(export_cache.Unstable):
        key({"fn": object()}, (3,))
    with pytest.raises(export_cache.Unstable):
        export_cache.stable_repr(jnp.cos)
    assert export_cache.stable_repr(("a", 1, 2.5, None, True)) == export_cache.stable_repr(("a", 1, 2.5, None, True))


def test_off_with_the_compilation_cache(monkeypatch, tmp_path):
    for var in ("MIXEDJAX_CACHE", "MIXEDJAX_EXPORT_CACHE"):
        monkeypatch.setenv(var, "0")
        assert export_cache.directory() is None
        monkeypatch.delenv(var)
    monkeypatch.setattr(export_cache.cache, "compilation_cache_dir", lambda: None)
    assert export_cache.directory() is None
    monkeypatch.setattr(export_cache.cache, "compilation_cache_dir", lambda: str(tmp_path))
    assert export_cache.directory() == tmp_path / "export"
    monkeypatch.setenv("MIXEDJAX_CACHE_MAX_BYTES", str(4 << 20))
    assert export_cache.max_bytes() == 1 << 20


def test_a_compiled_program_serves_later_calls_with_equal_arguments(export_dir):
    """``compiled()`` keeps its executable for ``__call__`` (the crossed fit's program then also gives the
    estimates, without a second compile); a numpy array and a JAX array of one shape and dtype are one key."""
    assert export_cache._signature([np.zeros(3)]) == export_cache._signature([jnp.zeros(3)])

    def affine(x, scale):
        return x * scale + 1.0

    f = export_cache.cached_jit(affine, name="tests.affine_compiled")
    run_ = f.compiled(np.arange(3.0), np.asarray(2.0))
    export_cache.wait_for_writes()  # exported and written in the background
    (program,) = f.programs.values()
    executable = program.executable
    assert executable is not None
    calls = []

    def counting(d):
        calls.append(1)
        return executable(d)

    program.executable = counting
    np.testing.assert_allclose(f(jnp.arange(3.0), jnp.asarray(np.asarray(2.0))), [1.0, 3.0, 5.0])  # not weak
    np.testing.assert_allclose(run_(np.arange(3.0), np.asarray(2.0)), [1.0, 3.0, 5.0])
    assert calls == [1, 1]  # the compiled() callable and __call__ ran the one executable
    assert len(list(export_dir.glob("*.exe"))) == 1  # kept for the next process


def test_an_executable_written_by_one_process_serves_the_next(export_dir):
    """A new :class:`CachedJit` (as in a new process) loads the program and its executable: neither is traced nor
    compiled again; another machine (a different :func:`machine_key`) never reads it."""

    def cube(x):
        return x ** 3

    first = export_cache.cached_jit(cube, name="tests.cube")
    np.testing.assert_allclose(first(np.arange(4.0)), [0.0, 1.0, 8.0, 27.0])
    assert export_cache.stats()["exported"] == 1 and len(list(export_dir.glob("*.exe"))) == 1
    second = export_cache.cached_jit(cube, name="tests.cube")
    np.testing.assert_allclose(second(np.arange(4.0) + 1.0), [1.0, 8.0, 27.0, 64.0])
    st = export_cache.stats()
    assert st["loaded"] == 1 and st["executables"] == 1 and st["exported"] == 1, st
    (program,) = second.programs.values()
    assert program.executable is not None
    export_cache.machine_key.cache_clear()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(export_cache.platform, "machine", lambda: "another-machine")
            third = export_cache.cached_jit(cube, name="tests.cube")
            np.testing.assert_allclose(third(np.arange(4.0)), [0.0, 1.0, 8.0, 27.0])
            assert export_cache.stats()["executables"] == 1  # not read: compiled here (a compilation cache hit)
    finally:
        export_cache.machine_key.cache_clear()


def _masked(x):
    return jnp.sum(jnp.where(x > 0.5, x, 0.0)) + jnp.sum(jnp.sin(x))


def test_a_broken_executable_is_compiled_afresh_and_a_cache_hit_is_never_written(export_dir):
    """An executable that fails on its first run (here: one serialized again after loading, which loses kernels in
    jaxlib 0.9) is removed and the program compiled in this process; an executable that JAX's persistent compilation
    cache handed back is never written (it would serialize without some of its kernels)."""
    from jax.experimental import serialize_executable

    x = np.linspace(0.0, 1.0, 7)
    expected = float(np.sum(np.where(x > 0.5, x, 0.0)) + np.sum(np.sin(x)))
    first = export_cache.cached_jit(_masked, name="tests.masked")
    assert float(first(x)) == pytest.approx(expected)
    export_cache.wait_for_writes()
    (exe,) = export_dir.glob("*.exe")
    (program,) = first.programs.values()
    loaded = export_cache._read_executable(exe, {"x": x}, program.exported.out_tree)
    exe.write_bytes(export_cache.EXE_MAGIC + serialize_executable.serialize(loaded)[0])
    second = export_cache.cached_jit(_masked, name="tests.masked")
    assert float(second(x)) == pytest.approx(expected)
    assert float(second(x + 0.0)) == pytest.approx(expected)
    st = export_cache.stats()
    assert st["executables"] == 1 and st["executables_not_kept"] == 1, st
    assert "not found" in st["errors"][-1].lower(), st["errors"]
    assert not exe.exists()
    # the program compiled again above came from JAX's persistent cache (on in the suite) or from XLA: written only
    # in the second case; either way a third process runs it
    third = export_cache.cached_jit(_masked, name="tests.masked")
    assert float(third(x)) == pytest.approx(expected)
    assert export_cache.stats()["executables_not_kept"] == 1
    if jax.config.jax_compilation_cache_dir:
        assert not list(export_dir.glob("*.exe"))


def _plus_ones(x):
    return x + jnp.ones(3)  # float64 under x64, float32 without


def test_a_call_under_a_thread_local_configuration_is_not_written_wrongly(export_dir):
    """The background export traces under the global configuration only; a call made under a thread-local one
    (``jax.enable_x64(False)``) that gives another program is kept in memory, never written under its key."""
    f = export_cache.cached_jit(_plus_ones, name="tests.plus_ones")
    with jax.enable_x64(False):
        out = f(np.ones(3, np.float32))
    assert out.dtype == np.float32
    st = export_cache.stats()
    assert st["exported"] == 0 and st["plain"] == 1 and "differ" in st["errors"][-1], st
    assert not list(export_dir.glob("*"))
    np.testing.assert_allclose(f(np.ones(3)), 2.0 * np.ones(3))  # the global configuration: float64, written
    assert export_cache.stats()["exported"] == 1


def test_the_crossed_fit_compiles_its_program_once_while_the_data_are_formed(export_dir):
    """lmer's crossed models start compiling the fit's program when the data's shapes are known
    (``crossed_data(on_shapes=...)``): the shapes guessed are those of the data formed, and the fit
    waits for that compilation instead of compiling again."""
    from mixedjax.crossed_data import crossed_data
    from mixedjax.lmer import RETerm

    rng = np.random.default_rng(7)
    n, la, lb, lc = 1500, 41, 23, 5  # sizes of this test's own: no other test compiled this program
    codes = [rng.integers(0, k, n) for k in (la, lb, lc)]
    terms = [RETerm(f"g{j}", c, np.arange(k).astype(str), np.ones((n, 1)), ["(Intercept)"], f"g{j}", f"g{j}")
             for j, (c, k) in enumerate(zip(codes, (la, lb, lc), strict=True))]
    x = np.column_stack([np.ones(n), rng.normal(size=n)])
    y = x @ [1.0, 0.5] + sum(rng.normal(size=k)[c] for c, k in zip(codes, (la, lb, lc), strict=True)) \
        + rng.normal(size=n)
    specs = []
    data, st = crossed_data(y, x, terms, None, on_shapes=lambda spec, s: specs.append((spec, s)))
    assert len(specs) == 1 and specs[0][1] == st

    def avals(tree):
        return jax.tree.map(lambda a: (tuple(a.shape), np.dtype(a.dtype), bool(getattr(a, "weak_type", False))), tree)

    assert avals(specs[0][0]) == avals(data)
    compiles = []

    def listen(event, secs, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration" and kwargs.get("fun_name") == "jit(bound_fun)":
            compiles.append(kwargs.get("fun_name"))  # mixedjax's cached programs (jax 0.10 also stages arrays)

    df = pd.DataFrame({"y": y, "x": x[:, 1], **{f"g{j}": c for j, c in enumerate(codes)}})
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        r = mixedjax.lmer("y ~ x + (1 | g0) + (1 | g1) + (1 | g2)", df)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert r.converged
    assert len(compiles) == 1, compiles
    np.testing.assert_allclose(r.llf, -0.5 * r.model.deviance(r.theta), rtol=0, atol=1e-9)
