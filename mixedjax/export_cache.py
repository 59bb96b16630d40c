"""Serialized programs kept from one Python process to the next: no tracing, lowering or compiling when nothing changed.

JAX's persistent compilation cache (:mod:`mixedjax.cache`) keeps the *compiled* programs, but every
new process still traces and lowers each of them to find its cache key: for a small fit and its
summary that is most of the time (the Hessian behind the standard errors alone traces for
seconds).  :func:`cached_jit` is ``jax.jit`` plus a second cache, on disk: the first process
exports each program it traces (``jax.export``: the lowered StableHLO with its calling
convention) and writes it to ``<cache directory>/export/<key>.bin`` (in a background thread, after
compiling and running it as plain ``jax.jit`` would: :func:`wait_for_writes`); a later process that calls
the same function with the same static arguments and argument shapes reads the file instead of
tracing.  The program it compiles from that (or finds in the persistent compilation cache) is kept
too, as XLA's serialized executable (``<key>-<machine>.exe``,
:mod:`jax.experimental.serialize_executable`): a third process loads it as it is, skipping the
lowering and the compilation cache's lookup (~70 ms a program), on a machine with the same
processor (its model and instruction-set flags are in ``<machine>``).

The key (a SHA-256) covers the function (module and qualified name), its static arguments (a
repr built only from values whose repr is the same in every process: numbers, strings, tuples,
NamedTuples, frozen dataclasses, ...), the pytree structure, shapes, dtypes and weak types of the
other arguments, the compiler options, ``jax``/``jaxlib`` versions, ``jax_enable_x64``, the
default backend and device count, and a hash of the source of every ``mixedjax/*.py`` (any
change to mixedjax's code starts afresh).

* where: ``export/`` inside :func:`mixedjax.cache.compilation_cache_dir`; off whenever that cache
  is off (``MIXEDJAX_CACHE=0``, :func:`mixedjax.cache.disable_compilation_cache`), and on its own with
  ``MIXEDJAX_EXPORT_CACHE=0`` (read at every call);
* size: a quarter of ``$MIXEDJAX_CACHE_MAX_BYTES`` (default 256 MiB), programs and executables
  together, the least recently used files removed first;
* never in the way: unstable static arguments, arguments sharded over several devices and calls
  under a transformation such as ``vmap`` (tracers) run through plain ``jax.jit``; a program
  ``jax.export`` cannot serialize (host callbacks, custom pytrees) runs as compiled in this process
  and is not written.

:func:`stats` counts programs loaded, exported and left to plain ``jax.jit``, and executables loaded.

Examples
--------
>>> import jax.numpy as jnp
>>> from mixedjax import export_cache
>>> def scaled_sum(x, k):
...     return jnp.sum(x) * k
>>> f = cached_jit(scaled_sum, static_argnames=("k",))
>>> float(f(jnp.arange(4.0), k=2))
12.0
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import hashlib
import importlib
import inspect
import json
import os
import platform
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jaxlib
import numpy as np

from . import cache

SUBDIR = "export"
MAGIC = b"mixedjax-export-1\n"
EXE_MAGIC = b"mixedjax-executable-1\n"
_PLAIN = object()  # marker: this call signature runs through plain jax.jit
_STATS = {"loaded": 0, "exported": 0, "plain": 0, "executables": 0, "executables_not_kept": 0}
_ERRORS: list[str] = []
_LOCK = threading.Lock()
_REGISTERED: set[type] = set()
_TRACER = getattr(jax.core, "Tracer", ())


class Unstable(TypeError):
    """A static argument whose repr may differ between processes (no disk key)."""


# ------------------------------------------------------------------------------------------------ key
def stable_repr(obj: Any) -> str:
    """A repr of ``obj`` that is the same in every process, or :class:`Unstable`.

    Numbers, strings, bytes, ``None``, tuples, lists, dicts, frozensets, NamedTuples, dataclasses,
    enums, NumPy dtypes and scalars; anything else (functions, arbitrary objects whose default repr
    carries an address) raises.
    """
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        return f"{type(obj).__name__}:{obj!r}"
    if isinstance(obj, enum.Enum):
        return f"{_type_name(type(obj))}.{obj.name}"
    if isinstance(obj, tuple) and hasattr(type(obj), "_fields"):
        return f"{_type_name(type(obj))}(" + ",".join(
            f"{f}={stable_repr(getattr(obj, f))}" for f in type(obj)._fields) + ")"
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return f"{_type_name(type(obj))}(" + ",".join(
            f"{f.name}={stable_repr(getattr(obj, f.name))}" for f in dataclasses.fields(obj)) + ")"
    if isinstance(obj, (tuple, list)):
        return f"{type(obj).__name__}[" + ",".join(stable_repr(v) for v in obj) + "]"
    if isinstance(obj, frozenset):
        return "frozenset{" + ",".join(sorted(stable_repr(v) for v in obj)) + "}"
    if isinstance(obj, dict):
        return "dict{" + ",".join(sorted(f"{stable_repr(k)}:{stable_repr(v)}" for k, v in obj.items())) + "}"
    if isinstance(obj, np.dtype):
        return f"dtype:{obj.str}"
    if isinstance(obj, np.generic):
        return f"{obj.dtype.str}:{obj.item()!r}"
    raise Unstable(f"no process-independent repr for {type(obj).__module__}.{type(obj).__qualname__}")


def _code_hash(fun: Callable) -> str:
    """SHA-256 of a function's source (its bytecode when the source cannot be read)."""
    try:
        text = inspect.getsource(fun).encode()
    except (OSError, TypeError):
        code = getattr(fun, "__code__", None)
        text = code.co_code + repr(code.co_consts).encode() if code is not None else repr(fun).encode()
    return hashlib.sha256(text).hexdigest()[:16]


def _type_name(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """SHA-256 of the source of every ``mixedjax/*.py`` (once per process): a code change invalidates."""
    h = hashlib.sha256()
    for p in sorted(Path(__file__).resolve().parent.glob("*.py")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def environment_key() -> str:
    """What the programs depend on besides mixedjax's code and the call: JAX, precision, platform."""
    return "|".join([
        f"jax={jax.__version__}", f"jaxlib={_jaxlib_version()}", f"x64={bool(jax.config.jax_enable_x64)}",
        f"platform={jax.default_backend()}", f"devices={jax.device_count()}", f"processes={jax.process_count()}",
        f"precision={jax.config.jax_default_matmul_precision}", f"promotion={jax.config.jax_numpy_dtype_promotion}",
        f"source={source_hash()}"])


@functools.lru_cache(maxsize=1)
def machine_key() -> str:
    """What a compiled executable depends on besides its program: the devices and, on a CPU, the processor's
    model and instruction-set flags (a cache directory shared by machines never hands one a foreign binary)."""
    parts = [jax.default_backend(), platform.machine()]
    try:
        parts += sorted({f"{d.platform}:{d.device_kind}" for d in jax.devices()})
        parts.append(str(jax.devices()[0].client.platform_version))
    except Exception:  # noqa: BLE001 - a backend without these attributes: the names above only
        pass
    try:
        with open("/proc/cpuinfo") as f:
            parts += sorted({line.strip() for line in f if line.startswith(("model name", "flags", "Features"))})
    except OSError:
        parts.append(platform.processor())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _jaxlib_version() -> str:
    return str(getattr(jaxlib, "__version__", "?"))


_KIND: dict[type, str] = {}  # argument leaf type -> "jax", "numpy", "scalar" or "" (unusable: plain jit)


def _kind(t: type) -> str:
    if issubclass(t, _TRACER):  # under a transformation: plain jit
        kind = ""
    elif issubclass(t, jax.Array | jax.ShapeDtypeStruct):
        kind = "jax"  # a ShapeDtypeStruct stands for an array not formed yet (CachedJit.compile_ahead)
    elif issubclass(t, np.ndarray | np.generic):
        kind = "numpy"
    elif issubclass(t, bool | int | float | complex):
        kind = "scalar"
    else:
        kind = ""
    _KIND[t] = kind
    return kind


def _signature(leaves: list) -> tuple | None:
    """In-process signature of the argument leaves (shapes, dtypes); ``None`` if one is unusable (a tracer, an array
    sharded over several devices, a non-array)."""
    out = []
    for x in leaves:
        t = type(x)
        kind = _KIND.get(t)
        if kind is None:
            kind = _kind(t)
        if kind == "jax":
            try:
                if isinstance(x, jax.Array) and x.committed and not isinstance(x.sharding,
                                                                              jax.sharding.SingleDeviceSharding):
                    return None  # sharded over devices: plain jit keeps the shardings
                out.append((tuple(x.shape), np.dtype(x.dtype), bool(x.weak_type)))
            except Exception:  # noqa: BLE001 - not a concrete array (a tracer of another JAX version)
                return None
        elif kind == "numpy":
            out.append((x.shape, np.dtype(x.dtype), False))  # as a committed JAX array of that dtype (never weak)
        elif kind == "scalar":
            out.append(t)
        else:
            return None
    return tuple(out)


def _aval(x: Any) -> tuple:
    """``(shape, dtype, weak type)`` of an argument leaf accepted by :func:`_signature` (for the disk key)."""
    if isinstance(x, jax.Array | jax.ShapeDtypeStruct):
        return (tuple(x.shape), np.dtype(x.dtype), bool(x.weak_type))
    if isinstance(x, np.ndarray | np.generic):
        return (tuple(x.shape), np.dtype(x.dtype), False)
    return ((), type(x), True)


def program_key(fun_id: str, static: dict, treedef: Any, avals: tuple, compiler_options: dict) -> str:
    """The file name (SHA-256, hex) of a program; raises :class:`Unstable` for an unusable static argument."""
    text = "\n".join([
        environment_key(), fun_id, stable_repr(static), stable_repr(compiler_options), str(treedef),
        ";".join(f"{s}:{np.dtype(d).str if not isinstance(d, type) else d.__name__}:{w}" for s, d, w in avals)])
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------------------ storage
def directory() -> Path | None:
    """Where serialized programs are kept now (``None``: off, as the compilation cache)."""
    d = cache.compilation_cache_dir()
    if not d or _off(os.environ.get("MIXEDJAX_CACHE")) or _off(os.environ.get("MIXEDJAX_EXPORT_CACHE")):
        return None
    return _subdir(d)


def _off(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("0", "off", "false", "no")


@functools.lru_cache(maxsize=16)
def _subdir(d: str) -> Path:
    return Path(d) / SUBDIR


def max_bytes() -> int:
    """The size cap of the ``export/`` directory: a quarter of ``$MIXEDJAX_CACHE_MAX_BYTES``."""
    try:
        total = int(os.environ.get("MIXEDJAX_CACHE_MAX_BYTES", cache.DEFAULT_MAX_BYTES))
    except ValueError:
        total = cache.DEFAULT_MAX_BYTES
    return max(total // 4, 0)


def stats() -> dict:
    """Programs ``loaded`` from disk, ``exported`` (traced and written) and run by ``plain`` jit, this process;
    compiled ``executables`` loaded from disk and ``executables_not_kept`` (not read or not written: the program is
    compiled as usual); ``errors``: why (the last 20).  Waits for the writes in flight first."""
    wait_for_writes()
    return dict(_STATS, errors=list(_ERRORS[-20:]))


def reset_stats() -> None:
    wait_for_writes()
    for k in _STATS:
        _STATS[k] = 0
    _ERRORS.clear()


def _node_types(treedef: Any, out: set) -> set:
    data = treedef.node_data()
    if data is not None and data[0] is not None and hasattr(data[0], "_fields") and issubclass(data[0], tuple):
        out.add(data[0])
    for child in treedef.children():
        _node_types(child, out)
    return out


def _register(types: set) -> None:
    with _LOCK:
        for t in types:
            if t in _REGISTERED:
                continue
            try:
                jax.export.register_namedtuple_serialization(t, serialized_name=_type_name(t))
            except ValueError:  # registered already (by the user, or under this name)
                pass
            _REGISTERED.add(t)


def _resolve(name: str) -> type:
    module, _, qual = name.partition(":")
    obj: Any = sys.modules[module]
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def _write(path: Path, types: set, blob: bytes) -> None:
    header = json.dumps({"types": sorted(f"{t.__module__}:{t.__qualname__}" for t in types)}).encode()
    _write_atomically(path, MAGIC + header + b"\n" + bytes(blob))


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it (readers never see half a file); then evict."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        _unlink(Path(tmp))
        raise
    _evict(path.parent)


def _touch(path: Path) -> None:
    """Mark ``path`` used (the least recently used files go first)."""
    try:
        os.utime(path)
    except OSError:
        pass


def _read(path: Path) -> Any:
    prepare_backend()
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise ValueError(f"{path.name}: not a mixedjax export file")
    header, _, blob = data[len(MAGIC):].partition(b"\n")
    _register({_resolve(n) for n in json.loads(header)["types"]})
    exported = jax.export.deserialize(bytearray(blob))
    _touch(path)
    return exported


def _write_executable(path: Path, compiled: Any, dyn: dict, out_tree: Any) -> None:
    """Write ``compiled`` (``jax.stages.Compiled`` of a program called with ``dyn``) for later processes.

    Written only when its calling convention is the one :func:`_read_executable` rebuilds (the arguments'
    tree, the program's output tree); :class:`OSError` and serialization errors propagate (noted by the caller).
    """
    from jax.experimental import serialize_executable

    blob, in_tree, compiled_out = serialize_executable.serialize(compiled)
    if in_tree != jax.tree_util.tree_structure(((dyn,), {})) or compiled_out != out_tree:
        raise ValueError("the compiled program's calling convention is not the exported one")
    _write_atomically(path, EXE_MAGIC + blob)


def _read_executable(path: Path, dyn: dict, out_tree: Any) -> Any:
    """The ``jax.stages.Compiled`` written by :func:`_write_executable`, loaded onto this process's devices."""
    from jax.experimental import serialize_executable

    prepare_backend()
    data = path.read_bytes()
    if not data.startswith(EXE_MAGIC):
        raise ValueError(f"{path.name}: not a mixedjax executable file")
    compiled = serialize_executable.deserialize_and_load(data[len(EXE_MAGIC):],
                                                         jax.tree_util.tree_structure(((dyn,), {})), out_tree)
    _touch(path)
    return compiled


@functools.lru_cache(maxsize=1)
def prepare_backend() -> None:
    """What JAX does while *lowering* that a loaded program still needs, once per process.

    jaxlib fills its table of LAPACK kernels (from SciPy's) the first time it lowers a LAPACK call; a
    program loaded from disk is never lowered from JAX's operations, and its first Cholesky would call
    an empty table (a segmentation fault).  So the table is filled here, before any program is loaded.
    """
    if jax.default_backend() != "cpu":
        return
    try:
        importlib.import_module("jaxlib.lapack").prepare_lapack_call("potrf_ffi", np.dtype(np.float64))
    except Exception:  # noqa: BLE001 - another jaxlib layout: lower one Cholesky, as JAX would
        jax.jit(jax.numpy.linalg.cholesky).lower(jax.ShapeDtypeStruct((2, 2), np.float32))


def _evict(folder: Path) -> None:
    cap = max_bytes()
    try:
        files = [(p.stat(), p) for pattern in ("*.bin", "*.exe") for p in folder.glob(pattern)]
    except OSError:
        return
    total = sum(s.st_size for s, _ in files)
    if total <= cap:
        return
    for s, p in sorted(files, key=lambda sp: sp[0].st_mtime):
        try:
            p.unlink()
        except OSError:
            continue
        total -= s.st_size
        if total <= 0.8 * cap:
            break


# ------------------------------------------------------------------------------------------ wrapper
class CachedJit:
    """``jax.jit(fun, static_argnames=..., compiler_options=...)`` whose programs are kept on disk
    (:func:`cached_jit`).  ``lower``, ``trace``, ``eval_shape`` and any other attribute are the plain
    jitted function's."""

    def __init__(self, fun: Callable, static_argnames: tuple | str = (), compiler_options: dict | None = None,
                 name: str | None = None) -> None:
        self.fun = fun
        self.static_argnames = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)
        self.compiler_options = dict(compiler_options or {})
        self.jitted = jax.jit(fun, static_argnames=self.static_argnames, compiler_options=compiler_options or None)
        functools.update_wrapper(self, fun)
        self.fun_id = name or f"{fun.__module__}.{fun.__qualname__}"
        if not str(getattr(fun, "__module__", "")).startswith("mixedjax"):
            self.fun_id += f"@{_code_hash(fun)}"  # outside mixedjax, source_hash() does not see the code
        self.programs: dict = {}  # in-process key -> _Program (or _PLAIN)
        self.lock = threading.Lock()  # one _Program per key, also when compile_ahead's thread asks at the same time
        try:
            params = list(inspect.signature(fun).parameters.values())
        except (TypeError, ValueError):
            params = None
        usable = params is not None and all(
            p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params) and (
            name is not None or ("<lambda>" not in self.fun_id and "<locals>" not in self.fun_id))
        # None: no reliable name or keyword calling convention, plain jit always
        self.names: tuple | None = tuple(p.name for p in params) if usable else None
        self.positional = tuple(p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD) if usable else ()
        self.required = frozenset(p.name for p in params if p.default is p.empty) if usable else frozenset()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["jitted"], name)

    def _resolve(self, args: tuple, kwargs: dict) -> tuple[Any, Any, dict]:
        """``(in-process key, program or _PLAIN, dynamic arguments by name)`` of a call."""
        if self.names is None or jax.config.jax_disable_jit:
            return None, _PLAIN, {}
        folder = directory()
        if folder is None or len(args) > len(self.positional):
            return None, _PLAIN, {}
        arguments = dict(zip(self.positional, args, strict=False))
        for k, v in kwargs.items():
            if k in arguments or k not in self.names:
                return None, _PLAIN, {}  # jit's own error message
            arguments[k] = v
        if not self.required <= arguments.keys():
            return None, _PLAIN, {}
        static, dyn = {}, {}
        for k in self.names:  # the signature's order
            if k in arguments:
                (static if k in self.static_argnames else dyn)[k] = arguments[k]
        leaves, treedef = jax.tree_util.tree_flatten(dyn)
        sig = _signature(leaves)
        if sig is None:
            return None, _PLAIN, dyn
        try:
            local = (tuple(static.items()), treedef, sig)
            prog = self.programs.get(local)
        except TypeError:  # an unhashable static argument: jit says so
            return None, _PLAIN, dyn
        if prog is None:
            with self.lock:
                prog = self.programs.get(local)
                if prog is None:
                    prog = self._program(folder, static, dyn, treedef, tuple(_aval(x) for x in leaves))
                    self.programs[local] = prog
        return local, prog, dyn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        local, prog, dyn = self._resolve(args, kwargs)
        if prog is not _PLAIN:
            try:
                return prog(dyn)
            except Exception as e:  # noqa: BLE001 - never break a fit: plain jit gives the real error, if any
                _note(self.fun_id, e)
                self.programs[local] = _PLAIN
        return self.jitted(*args, **kwargs)

    def compiled(self, *args: Any, **kwargs: Any) -> Callable:
        """The compiled program for these arguments, as ``jax.jit(...).lower(*args, **kwargs).compile()``: called
        with the non-static arguments, positionally, in the order of the signature (no dispatch per call).
        Later calls of this function with equal arguments run the same executable."""
        local, prog, dyn = self._resolve(args, kwargs)
        if prog is not _PLAIN:
            try:
                prog.compile(dyn)
                names = list(dyn)

                def call(*a: Any) -> Any:
                    return prog(dict(zip(names, a, strict=True)))

                return call
            except Exception as e:  # noqa: BLE001 - never break a fit
                _note(self.fun_id, e)
                self.programs[local] = _PLAIN
        return self.jitted.lower(*args, **kwargs).compile()

    def compile_ahead(self, *args: Any, **kwargs: Any) -> threading.Thread:
        """Start compiling the program for these arguments in a thread of its own, and return the thread.

        Arguments not formed yet may be given as :class:`jax.ShapeDtypeStruct` (shape, dtype and weak
        type as the real ones will have them).  A later call, or :meth:`compiled`, with arguments of the
        same shapes waits for this compilation instead of starting another: the caller forms its data
        meanwhile (XLA compiles without the GIL).  Nothing is raised: a failure is noted
        (:func:`stats`) and the later call compiles as usual.  Only programs kept on disk are compiled
        ahead (with the cache off this does nothing).

        Examples
        --------
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> def norm2(x):
        ...     return jnp.sum(x * x)
        >>> f = cached_jit(norm2)
        >>> f.compile_ahead(jax.ShapeDtypeStruct((3,), np.float64)).join()
        >>> float(f(jnp.arange(3.0)))  # compiled already
        5.0
        """
        def work() -> None:
            try:
                _, prog, dyn = self._resolve(args, kwargs)
                if prog is not _PLAIN:
                    prog.compile(dyn)
            except Exception as e:  # noqa: BLE001 - the later call compiles (and raises what jit raises)
                _note(self.fun_id, e)

        thread = threading.Thread(target=work, name="mixedjax-compile-ahead")
        thread.start()
        return thread

    def _program(self, folder: Path, static: dict, dyn: dict, treedef: Any, avals: tuple) -> Any:
        try:
            key = program_key(self.fun_id, static, treedef, avals, self.compiler_options)
        except Unstable as e:
            _note(self.fun_id, e)
            return _PLAIN
        path = folder / f"{key}.bin"
        exe = folder / f"{key}-{machine_key()}.exe"
        options = self.compiler_options or None
        if path.exists():
            try:
                exported = _read(path)
                _STATS["loaded"] += 1
                return _Program(self.fun_id, exported, options, exe, dyn)
            except Exception as e:  # noqa: BLE001 - a damaged or foreign file: export afresh
                _note(self.fun_id, e)
        fun = self.fun

        def bound_fun(d: dict) -> Any:
            return fun(**static, **d)

        # compiled here first; exported (and written, with its executable) in the background once it runs
        return _Program(self.fun_id, None, options, exe, None, jitted=jax.jit(bound_fun, compiler_options=options),
                        path=path)


class _Program:
    """The program of one call signature: exported (read from disk) or still to export (``jitted`` and ``path``), and
    its executable once compiled (or loaded: ``dyn``, the call's arguments, given and ``exe`` on disk).

    A program not on disk yet is lowered and compiled as plain ``jax.jit`` would, and runs at once; exporting it
    (a second lowering, ~0.1-0.3 s) and writing it and its executable happen in a background thread
    (:func:`wait_for_writes`), off the first fit's path.  Only an executable XLA compiled in this process is
    written: one that JAX's persistent compilation cache handed back (a deserialized executable) can serialize
    without some of its kernels ("Function ... not found" when a later process runs it; jaxlib 0.9).  A loaded
    executable's first run is waited for inside a ``try``: if it fails, its file is removed and the program is
    compiled here instead.
    """

    def __init__(self, fun_id: str, exported: Any, options: dict | None, exe: Path | None, dyn: dict | None,
                 jitted: Any = None, path: Path | None = None) -> None:
        self.fun_id = fun_id
        self.exported = exported
        self.jitted = jitted if exported is None else jax.jit(exported.call, compiler_options=options)
        self.path = path  # where to export it (None: read from there already)
        self.exe = exe
        self.executable: Any = None
        self.verified = True  # False: loaded from disk and not yet run
        self.lock = threading.Lock()  # one compilation, also when compile_ahead's thread is at it
        if dyn is not None and exe is not None and exe.exists():
            try:
                self.executable = _read_executable(exe, dyn, exported.out_tree)
                self.verified = False
                _STATS["executables"] += 1
            except Exception as e:  # noqa: BLE001 - damaged, or from another jaxlib: removed, compiled here
                _note(fun_id, e, "executables_not_kept")
                _unlink(exe)

    def compile(self, dyn: dict) -> Any:
        """The executable for arguments like ``dyn`` (lowered and compiled on the first call, then written)."""
        if self.executable is None:
            with self.lock:
                if self.executable is None:
                    hits = _compile_cache_hits()
                    executable = self.jitted.lower(dyn).compile()
                    fresh = _compile_cache_hits() == hits  # approximate when another program compiles meanwhile
                    self.executable = executable
                    if self.path is not None:
                        path, self.path = self.path, None
                        _background(self._export, path, dyn, fresh)
                    elif self.exe is not None and fresh:
                        self._write_executable(dyn, self.exported.out_tree)
        return self.executable

    def _export(self, path: Path, dyn: dict, fresh: bool) -> None:
        """Export the program, write it to ``path`` and, if compiled here (``fresh``), its executable."""
        try:
            exported = jax.export.export(self.jitted)(dyn)
            types = _node_types(exported.in_tree, set()) | _node_types(exported.out_tree, set())
            _register(types)
            blob = exported.serialize()
            # traced again in this thread, under the global configuration only (a thread-local one, such as a
            # `with jax.enable_x64(False)` around the call, is not seen here): written only if it is the same program
            compiled_out = [(tuple(a.shape), np.dtype(a.dtype)) for a in jax.tree.leaves(self.executable.out_info)]
            if compiled_out != [(tuple(a.shape), np.dtype(a.dtype)) for a in exported.out_avals]:
                raise ValueError("the exported program's outputs differ from the compiled one's")
        except Exception as e:  # noqa: BLE001 - what export cannot serialize stays in memory (plain jit)
            _note(self.fun_id, e)
            return
        self.exported = exported
        try:
            _write(path, types, blob)
            _STATS["exported"] += 1
        except OSError as e:  # a read-only cache: the program still runs, from memory
            _note(self.fun_id, e)
            return
        if fresh and self.exe is not None:
            self._write_executable(dyn, exported.out_tree)

    def _write_executable(self, dyn: dict, out_tree: Any) -> None:
        try:
            _write_executable(self.exe, self.executable, dyn, out_tree)
        except Exception as e:  # noqa: BLE001 - not serializable here (a backend, constants): run from memory
            _note(self.fun_id, e, "executables_not_kept")

    def __call__(self, dyn: dict) -> Any:
        executable = self.compile(dyn)
        if self.verified:
            return executable(dyn)
        try:
            out = jax.block_until_ready(executable(dyn))
            self.verified = True
            return out
        except Exception as e:  # noqa: BLE001 - a broken file: compile here, never write it again
            _note(self.fun_id, e, "executables_not_kept")
            _unlink(self.exe)
            self.exe, self.executable, self.verified = None, None, True
            return self.compile(dyn)(dyn)


_PENDING: list[threading.Thread] = []
_PENDING_LOCK = threading.Lock()
_HELD: list[threading.Thread] = []  # waiting for the end of the outermost :func:`writes_after` block
_HOLDS = [0]


def _background(target: Callable, *args: Any) -> None:
    """Run ``target(*args)`` in a thread of its own (not a daemon: the interpreter waits for its files at exit),
    at once or, inside :func:`writes_after`, when that block ends."""
    thread = threading.Thread(target=target, args=args, name="mixedjax-export-cache")
    with _PENDING_LOCK:
        if _HOLDS[0]:
            _HELD.append(thread)
            return
    _start(thread)


def _start(thread: threading.Thread) -> None:
    with _PENDING_LOCK:
        _PENDING[:] = [t for t in _PENDING if t.is_alive()]  # finished ones need no waiting for
        _PENDING.append(thread)
    thread.start()


def _release_held() -> None:
    with _PENDING_LOCK:
        held = list(_HELD)
        _HELD.clear()
    for thread in held:
        _start(thread)


@contextlib.contextmanager
def writes_after() -> Iterator[None]:
    """Programs compiled inside this block are exported and written only when it ends (the outermost one).

    The export traces and lowers the program once more, holding the GIL and a core: inside a fit
    whose evaluations run on every core (the crossed fit) that would slow them down.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> def doubled(x):
    ...     return 2.0 * x
    >>> with writes_after():  # compiled and run now, written after the block
    ...     total = float(cached_jit(doubled)(jnp.ones(3)).sum())
    >>> total
    6.0
    """
    with _PENDING_LOCK:
        _HOLDS[0] += 1
    try:
        yield
    finally:
        with _PENDING_LOCK:
            _HOLDS[0] -= 1
            last = _HOLDS[0] == 0
        if last:
            _release_held()


def wait_for_writes() -> None:
    """Wait until the programs being exported and written in the background are on disk (:func:`stats` waits;
    writes held by an enclosing :func:`writes_after` start now)."""
    _release_held()
    while True:
        with _PENDING_LOCK:
            if not _PENDING:
                return
            thread = _PENDING.pop()
        thread.join()


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


_HITS = [0, False]  # persistent compilation cache hits in this process; the listener registered


def _compile_cache_hits() -> int:
    """How many programs JAX's persistent compilation cache has handed back so far in this process."""
    if not _HITS[1]:
        def listen(event: str, **kwargs: Any) -> None:
            if event == "/jax/compilation_cache/cache_hits":
                _HITS[0] += 1

        jax.monitoring.register_event_listener(listen)
        _HITS[1] = True
    return _HITS[0]


def _note(fun_id: str, e: BaseException, what: str = "plain") -> None:
    """Count a program left to plain jit (or an executable not read or written: ``what``), with why."""
    _STATS[what] += 1
    _ERRORS.append(f"{fun_id}: {type(e).__name__}: {str(e)[:300]}")


def cached_jit(fun: Callable | None = None, *, static_argnames: tuple | str = (),
               compiler_options: dict | None = None, name: str | None = None) -> Any:
    """``jax.jit`` whose traced programs are kept on disk between processes (:class:`CachedJit`).

    ``name`` identifies the function in the key when its qualified name does not (a lambda, a
    closure); without one such functions run through plain ``jax.jit``.  Usable as a decorator.
    """
    if fun is None:
        return functools.partial(cached_jit, static_argnames=static_argnames, compiler_options=compiler_options,
                                 name=name)
    return CachedJit(fun, static_argnames, compiler_options, name)


__all__ = ["CachedJit", "Unstable", "cached_jit", "directory", "machine_key", "max_bytes", "program_key", "reset_stats",
           "source_hash", "stable_repr", "stats", "wait_for_writes", "writes_after"]
