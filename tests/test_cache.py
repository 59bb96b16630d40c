"""mixedjax.cache: compiled programs kept between processes, quietly, where the user says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax

import mixedjax
from mixedjax import cache

FIT = textwrap.dedent("""
    import mixedjax
    df = mixedjax.datasets.load("dyestuff")
    r = mixedjax.mixedlm("Yield ~ 1", df, groups="Batch").fit()
    print(repr(r.llf), mixedjax.cache.compilation_cache_dir())
""")


def run(code: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items()
            if k not in ("MIXEDJAX_CACHE_DIR", "MIXEDJAX_CACHE", "JAX_COMPILATION_CACHE_DIR", "TF_CPP_MIN_LOG_LEVEL")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=timeout)


def test_second_process_loads_the_programs_quietly(tmp_path):
    d = tmp_path / "cache"
    first = run(FIT, {"MIXEDJAX_CACHE_DIR": str(d)})
    assert first.returncode == 0, first.stderr
    written = os.listdir(d)
    assert written, "the first process wrote no compiled programs"
    second = run(FIT, {"MIXEDJAX_CACHE_DIR": str(d)})
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout  # same logLik, same directory
    assert second.stdout.split()[1] == str(d)
    # jaxlib's "Assume version compatibility" line for each loaded program is not shown
    assert "version compatibility" not in second.stderr and "Warning" not in second.stderr, second.stderr


def test_switches_off_and_respects_the_users_jax_directory(tmp_path):
    off = run("import mixedjax; print(mixedjax.cache.compilation_cache_dir())", {"MIXEDJAX_CACHE": "0"})
    assert off.stdout.strip() == "None", off.stderr
    mine = tmp_path / "mine"
    kept = run("import mixedjax; print(mixedjax.cache.compilation_cache_dir())",
               {"JAX_COMPILATION_CACHE_DIR": str(mine), "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert kept.stdout.strip() == str(mine), kept.stderr
    default = run("import mixedjax; print(mixedjax.cache.compilation_cache_dir())",
                  {"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert default.stdout.strip() == str(tmp_path / "xdg" / "mixedjax" / "jax"), default.stderr
    # jaxlib loaded first with its warnings on: the cache would print a line per program, so it stays off
    late = run("import jax; import mixedjax; print(mixedjax.cache.compilation_cache_dir())",
               {"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert late.stdout.strip() == "None", late.stderr


def test_enable_and_disable_in_process(tmp_path):
    before = cache.compilation_cache_dir()
    size = jax.config.jax_compilation_cache_max_size
    try:
        assert cache.enable_compilation_cache(tmp_path / "c", max_bytes=10_000_000) == str(tmp_path / "c")
        assert cache.compilation_cache_dir() == str(tmp_path / "c")
        assert jax.config.jax_compilation_cache_max_size == 10_000_000
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
        cache.disable_compilation_cache()
        assert cache.compilation_cache_dir() is None
    finally:
        if before is None:
            cache.disable_compilation_cache()
        else:
            cache.enable_compilation_cache(before, max_bytes=size)
    assert mixedjax.cache.compilation_cache_dir() == before


GC_STATE = "import gc, json; {before}import mixedjax; print(json.dumps([gc.isenabled(), gc.get_freeze_count()]))"


def test_import_freezes_the_long_lived_objects_and_restores_the_collector(tmp_path):
    """``import mixedjax`` pauses the cyclic collector while it imports and freezes what it imported; the
    collector is left as the user had it (on or off), and ``MIXEDJAX_GC_FREEZE=0`` leaves it alone."""
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    on = run(GC_STATE.format(before=""), env)
    assert on.returncode == 0, on.stderr
    enabled, frozen = json.loads(on.stdout)
    assert enabled is True and frozen > 10_000, on.stdout
    off = run(GC_STATE.format(before="gc.disable(); "), env)
    assert json.loads(off.stdout)[0] is False, off.stdout  # the user's choice is kept
    alone = run(GC_STATE.format(before=""), dict(env, MIXEDJAX_GC_FREEZE="0"))
    assert json.loads(alone.stdout) == [True, 0], alone.stdout
