"""Compiled programs kept from one Python process to the next (JAX's persistent compilation cache).

A fit compiles a handful of XLA programs for its shapes (0.5–2 s on a CPU); kept on disk, a
new process with data of the same shapes loads them instead.  On by default at ``import
mixedjax``:

* where: ``$MIXEDJAX_CACHE_DIR``, else the directory the user has already given JAX
  (``JAX_COMPILATION_CACHE_DIR`` / ``jax.config.jax_compilation_cache_dir``, left as it is),
  else ``$XDG_CACHE_HOME/mixedjax/jax`` (``~/.cache/mixedjax/jax``);
* off: ``MIXEDJAX_CACHE=0`` in the environment before ``import mixedjax``, or
  :func:`disable_compilation_cache` at any time;
* size: capped at ``$MIXEDJAX_CACHE_MAX_BYTES`` (default 1 GiB; JAX evicts the least recently
  used programs);
* every program is written, however fast it compiled (JAX's default keeps only programs that
  took over 1 s, and most of a fit's take less).

This sets JAX's process-wide options ``jax_compilation_cache_dir``,
``jax_persistent_cache_min_compile_time_secs`` (0), ``jax_persistent_cache_min_entry_size_bytes``
(0) and ``jax_compilation_cache_max_size``: they apply to every JAX program of the process, the
user's own included.  Programs with host callbacks are never cached (JAX's rule).

Examples
--------
>>> from mixedjax import cache
>>> before = cache.compilation_cache_dir()
>>> cache.enable_compilation_cache("/tmp/mixedjax-doc-cache")
'/tmp/mixedjax-doc-cache'
>>> cache.disable_compilation_cache()
>>> cache.compilation_cache_dir() is None
True
>>> _ = cache.enable_compilation_cache(before) if before else None
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cc  # reset_cache: re-read the options

DEFAULT_MAX_BYTES = 1 << 30
_LOGGERS = ("jax._src.compilation_cache", "jax._src.compiler", "jax._src.cache_key")


def default_cache_dir() -> str:
    """``$MIXEDJAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/mixedjax/jax`` (``~/.cache/mixedjax/jax``)."""
    if os.environ.get("MIXEDJAX_CACHE_DIR"):
        return os.environ["MIXEDJAX_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "mixedjax" / "jax")


def compilation_cache_dir() -> str | None:
    """The directory JAX keeps compiled programs in now (``None`` when off)."""
    return jax.config.jax_compilation_cache_dir


def enable_compilation_cache(path: str | os.PathLike | None = None, max_bytes: int | None = None) -> str:
    """Keep compiled programs in ``path`` (default :func:`default_cache_dir`), at most ``max_bytes``.

    Returns the directory.  Takes effect at the next compilation; programs already compiled in this
    process stay in memory as they are.
    """
    path = str(path) if path is not None else default_cache_dir()
    if max_bytes is None:
        max_bytes = int(os.environ.get("MIXEDJAX_CACHE_MAX_BYTES", DEFAULT_MAX_BYTES))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:  # a read-only home: run without a cache rather than fail at import
        return path
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", int(max_bytes))
    jax_cc.reset_cache()
    return path


def disable_compilation_cache() -> None:
    """Stop reading and writing compiled programs on disk (for this process)."""
    jax.config.update("jax_compilation_cache_dir", None)
    jax_cc.reset_cache()


def _quiet_cache_logs() -> None:
    # jaxlib logs every cache miss/write at WARNING under some settings (e.g. JAX_DEBUG_LOG_MODULES);
    # they are not the user's business.
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def configure_from_environment(jaxlib_preloaded: bool = False) -> None:
    """Applied at ``import mixedjax``: on unless ``MIXEDJAX_CACHE=0``.

    A directory the user already gave JAX is kept (only the size and minimum-compile-time options are
    set then).  When jaxlib was loaded before mixedjax, with its C++ log level below errors
    (``TF_CPP_MIN_LOG_LEVEL`` < 2), every program loaded from the cache would print a line on stderr; then
    the cache stays off unless the user configured one (:func:`enable_compilation_cache` turns it on).
    """
    if os.environ.get("MIXEDJAX_CACHE", "1").strip().lower() in ("0", "off", "false", "no"):
        return
    _quiet_cache_logs()
    user_dir = jax.config.jax_compilation_cache_dir
    if os.environ.get("MIXEDJAX_CACHE_DIR"):
        enable_compilation_cache()
    elif user_dir:
        enable_compilation_cache(user_dir)
    elif not jaxlib_preloaded or _cpp_log_level() >= 2:
        enable_compilation_cache()


def _cpp_log_level() -> int:
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0
