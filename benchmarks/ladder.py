"""The ladder: one random-slope model at 10k, 100k and 1M groups (0.1M, 1M, 10M rows), mixedjax against
mixedlm (the Rust lme4 port), statsmodels and lme4, each engine in fresh processes in one run.

Usage::

    python benchmarks/ladder.py                               # --rungs 10000,100000,1000000
    python benchmarks/ladder.py --rungs 10000 --skip-statsmodels
    python benchmarks/ladder.py --device gpu                  # also mixedjax on an NVIDIA GPU (largest rung)

Data (fixed seed, ``--seed``): ``G`` groups of 5 to 15 rows (about 10 per group; ``G`` = 10,000 gives
~0.1M rows), ``x1, x2, x3`` standard normal,
``y = 1 + 0.5 x1 - 0.3 x2 + 0.2 x3 + b0_g + b1_g x1 + e`` with sd(b0) = 1, sd(b1) = 0.5,
corr(b0, b1) = 0.3, sd(e) = 1; the rows are shuffled (not sorted by group), ``g`` is an integer column.
Each rung is generated once and written as raw little-endian columns (``y.f64 x1.f64 x2.f64 x3.f64
g.i32`` and ``meta.json``) under ``--data-dir`` (default ``/tmp/mixedjax-ladder``), so every engine
reads the same data (Python with ``numpy.fromfile``, R with ``readBin``).

Model: ``y ~ x1 + x2 + x3`` with a correlated random intercept and slope on ``x1`` by ``g``, REML.
Every engine runs in a FRESH process; reading the data and importing the library are outside the
timed call, model construction (formula, design matrices, grouping) is inside it:

* **mixedjax**, ``mixedjax.mixedlm("y ~ x1 + x2 + x3", df, groups="g", re_formula="~x1").fit()``:
  *cold*: the first fit in a fresh process with a new, empty compilation cache
  (``MIXEDJAX_CACHE_DIR``), so tracing and XLA compilation are included; *warm*: the first fit in a
  second fresh process on the same cache directory, after the cold process fitted the same shapes
  (what a user sees the second time a script runs); *repeat*: the same call again in the warm
  process (median of ``--repeats``).  JAX's compile events (trace, lowering, XLA seconds) and
  persistent-cache hits/misses of each first fit are recorded.  ``JAX_PLATFORMS`` passes through
  to these processes (the table names the backend each one used).
* **mixedlm** (PyPI ``mixedlm``, Rust core; not a mixedjax dependency: ``pip install mixedlm``),
  ``mixedlm.lmer("y ~ x1 + x2 + x3 + (x1 | g)", df)`` with its default control: first and repeat.
* **statsmodels**, ``smf.mixedlm("y ~ x1 + x2 + x3", df, groups=df["g"], re_formula="~x1")
  .fit(reml=True)``: the first fit only, given ``--sm-timeout`` seconds (default 600); after a
  timeout the bigger rungs are skipped.
* **lme4** through ``Rscript`` (``lmer(y ~ x1 + x2 + x3 + (x1 | g), REML = TRUE)``, default
  ``lmerControl``; use an optimised BLAS such as Debian's ``libopenblas0-pthread``): first and repeat,
  timed with ``system.time``.  Skipped with a note when ``Rscript``/lme4 is absent.

Reported per rung and engine: first fit, repeat (median), peak RSS of the engine's process (VmHWM from
``/proc/self/status`` at its end: data, library and fits together), logLik and its relative difference
from mixedlm's and lme4's, mixedjax's ``converged``.  The issue's target ratios (issue 11) are printed as
met / not met.  Writes the markdown report to stdout and ``--out`` (default ``DATA_DIR/ladder.md``) and
a log-log plot of time against rows (``--plot``, default ``DATA_DIR/ladder.png``); the raw measurements go
to the report's name with ``.json``.

``--device gpu``: after the CPU runs, mixedjax's cold and warm processes run again with
``JAX_PLATFORMS=cuda`` on the largest rung (the CPU processes are then pinned to ``JAX_PLATFORMS=cpu``);
needs ``mixedjax[cuda]`` and an NVIDIA GPU.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from pathlib import Path

import machine

FORMULA = "y ~ x1 + x2 + x3"
RE_FORMULA = "~x1"
LMER_FORMULA = "y ~ x1 + x2 + x3 + (x1 | g)"
COLUMNS = {"y": "f64", "x1": "f64", "x2": "f64", "x3": "f64", "g": "i32"}
SEED = 20261126
DATA_VERSION = 1  # bump when the generator changes: cached rungs are regenerated
MARK = "@@RESULT@@ "
READY = "@@READY@@"
LOAD_TIMEOUT = 900.0  # seconds a child may take to import its library and read the data

# issue 11's targets, by number of groups
TARGET_TEXT = {
    10_000: "first fit (warm cache) within 2x of mixedlm's first fit, repeat at least as fast as mixedlm's",
    100_000: "first fit (warm cache) no slower than mixedlm's, repeat >= 2x faster than mixedlm's",
    1_000_000: "first fit (warm cache) >= 2.5x faster than mixedlm's, peak memory no larger than mixedlm's",
}


# ================================================================================ data
def rung_dir(data_dir: Path, n_groups: int, seed: int) -> Path:
    return data_dir / f"g{n_groups}_seed{seed}"


def generate(n_groups: int, seed: int) -> dict:
    """The rung's columns (numpy arrays), rows shuffled."""
    import numpy as np

    rng = np.random.default_rng([seed, n_groups])
    sizes = rng.integers(5, 16, n_groups)  # 5..15 rows, mean 10
    g = np.repeat(np.arange(n_groups, dtype=np.int32), sizes)
    n = g.size
    x = rng.standard_normal((3, n))
    sd0, sd1, rho = 1.0, 0.5, 0.3
    chol = np.linalg.cholesky(np.array([[sd0**2, rho * sd0 * sd1], [rho * sd0 * sd1, sd1**2]]))
    b = rng.standard_normal((n_groups, 2)) @ chol.T
    y = 1.0 + 0.5 * x[0] - 0.3 * x[1] + 0.2 * x[2] + b[g, 0] + b[g, 1] * x[0] + rng.standard_normal(n)
    perm = rng.permutation(n)
    return {"y": y[perm], "x1": x[0][perm], "x2": x[1][perm], "x3": x[2][perm], "g": g[perm]}


def ensure_data(data_dir: Path, n_groups: int, seed: int) -> tuple[Path, dict]:
    """Write the rung once (reused while ``meta.json`` matches); returns its directory and metadata."""
    d = rung_dir(data_dir, n_groups, seed)
    meta_file = d / "meta.json"
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("version") == DATA_VERSION and all((d / f"{c}.{t}").exists() for c, t in COLUMNS.items()):
            return d, meta
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cols = generate(n_groups, seed)
    for c, t in COLUMNS.items():
        cols[c].astype("<f8" if t == "f64" else "<i4").tofile(d / f"{c}.{t}")
    meta = {"version": DATA_VERSION, "n_groups": n_groups, "n_rows": int(cols["y"].size), "seed": seed,
            "generated_s": time.perf_counter() - t0, "columns": COLUMNS}
    del cols
    meta_file.write_text(json.dumps(meta))
    return d, meta


def load_frame(d: Path):
    import numpy as np
    import pandas as pd

    return pd.DataFrame({c: np.fromfile(d / f"{c}.{t}", dtype="<f8" if t == "f64" else "<i4")
                         for c, t in COLUMNS.items()})


# ================================================================================ child processes
def _ready() -> None:
    print(READY, flush=True)


def child_mixedjax(d: Path, repeats: int) -> dict:
    t0 = time.perf_counter()
    import jax
    import jax.numpy as jnp

    import mixedjax

    jnp.zeros(1).block_until_ready()  # initialise the backend outside the timing
    out: dict = {"import_s": time.perf_counter() - t0, "jax": jax.__version__, "backend": jax.default_backend(),
                 "device": str(jax.devices()[0].device_kind),
                 "cache_dir": mixedjax.cache.compilation_cache_dir() if hasattr(mixedjax, "cache") else None}
    t0 = time.perf_counter()
    df = load_frame(d)
    out["load_s"] = time.perf_counter() - t0
    events = {"/jax/core/compile/jaxpr_trace_duration": "trace",
              "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
              "/jax/core/compile/backend_compile_duration": "xla"}
    compile_s = {"trace": 0.0, "lower": 0.0, "xla": 0.0}
    counts = {"cache_hits": 0, "cache_misses": 0}

    def on_duration(event: str, secs: float, **_) -> None:
        if event in events:
            compile_s[events[event]] += secs

    def on_event(event: str, **_) -> None:
        for k in counts:
            if event == f"/jax/compilation_cache/{k}":
                counts[k] += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)

    def fit():
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            t = time.perf_counter()
            r = mixedjax.mixedlm(FORMULA, df, groups="g", re_formula=RE_FORMULA).fit()
            return time.perf_counter() - t, r, w

    _ready()
    out["first_s"], r, w = fit()
    out["compile_s"], out["cache_events"] = dict(compile_s), dict(counts)
    out["llf"], out["converged"] = float(r.llf), bool(r.converged)
    o = r.optim
    out["optim"] = {"iterations": int(o.iterations), "evaluations": int(o.evaluations),
                    "message": str(o.message), "grad_norm": float(o.grad_norm)}
    out["warnings"] = sorted({f"{type(v.message).__name__}: {v.message}"[:160] for v in w})
    out["repeat_s"], out["repeat_llf"] = [], []
    for _ in range(repeats):
        t, r2, _w = fit()
        out["repeat_s"].append(t)
        out["repeat_llf"].append(float(r2.llf))
    out["hwm_mib"] = machine.hwm_mib()
    return out


def child_mixedlm(d: Path, repeats: int) -> dict:
    t0 = time.perf_counter()
    import mixedlm

    out: dict = {"import_s": time.perf_counter() - t0, "version": importlib.metadata.version("mixedlm")}
    t0 = time.perf_counter()
    df = load_frame(d)
    out["load_s"] = time.perf_counter() - t0

    def fit():
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            t = time.perf_counter()
            r = mixedlm.lmer(LMER_FORMULA, df, REML=True)
            return time.perf_counter() - t, r, w

    _ready()
    out["first_s"], r, w = fit()
    ll = r.logLik()
    out["llf"] = float(getattr(ll, "value", ll))
    out["converged"] = bool(getattr(r, "converged", True))
    out["optim"] = {"optimizer": str(getattr(r, "optimizer", "")),
                    "evaluations": int(getattr(r, "function_evals", -1) or -1)}
    out["warnings"] = sorted({f"{type(v.message).__name__}: {v.message}"[:160] for v in w})
    out["repeat_s"] = []
    for _ in range(repeats):
        out["repeat_s"].append(fit()[0])
    out["hwm_mib"] = machine.hwm_mib()
    return out


def child_statsmodels(d: Path, repeats: int) -> dict:
    t0 = time.perf_counter()
    import statsmodels
    import statsmodels.formula.api as smf

    out: dict = {"import_s": time.perf_counter() - t0, "version": statsmodels.__version__}
    t0 = time.perf_counter()
    df = load_frame(d)
    out["load_s"] = time.perf_counter() - t0

    def fit():
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            t = time.perf_counter()
            r = smf.mixedlm(FORMULA, df, groups=df["g"], re_formula=RE_FORMULA).fit(reml=True)
            return time.perf_counter() - t, r, w

    _ready()
    out["first_s"], r, w = fit()
    out["llf"], out["converged"] = float(r.llf), bool(r.converged)
    out["warnings"] = sorted({f"{type(v.message).__name__}"[:160] for v in w})
    out["repeat_s"] = [fit()[0] for _ in range(repeats)]
    out["hwm_mib"] = machine.hwm_mib()
    return out


R_SCRIPT = textwrap.dedent(r"""
    suppressMessages(library(lme4))
    a <- commandArgs(trailingOnly = TRUE)
    dir <- a[1]; n <- as.integer(a[2]); reps <- as.integer(a[3])
    rd <- function(name, what, size) {
      con <- file(file.path(dir, name), "rb"); on.exit(close(con))
      readBin(con, what, n = n, size = size, endian = "little")
    }
    t0 <- proc.time()[["elapsed"]]
    df <- data.frame(y = rd("y.f64", "double", 8), x1 = rd("x1.f64", "double", 8),
                     x2 = rd("x2.f64", "double", 8), x3 = rd("x3.f64", "double", 8),
                     g = rd("g.i32", "integer", 4))
    load_s <- proc.time()[["elapsed"]] - t0
    cat("@@READY@@\n"); flush(stdout())
    times <- numeric(0)
    for (i in seq_len(reps + 1)) {
      t <- system.time(fit <- lmer(FORMULA, data = df, REML = TRUE))[["elapsed"]]
      times <- c(times, t)
    }
    msgs <- fit@optinfo$conv$lme4$messages
    st <- readLines("/proc/self/status")
    hwm <- as.numeric(gsub("[^0-9]", "", st[grep("^VmHWM", st)])) / 1024
    si <- sessionInfo()
    cat(sprintf(paste0('@@RESULT@@ {"first_s": %.6f, "repeat_s": [%s], "llf": %.17g, "version": "%s", ',
                       '"R": "%s", "blas": "%s", "converged": %s, "evaluations": %d, "hwm_mib": %.1f, ',
                       '"load_s": %.3f}\n'),
        times[1], paste(sprintf("%.6f", times[-1]), collapse = ", "), as.numeric(logLik(fit)),
        as.character(packageVersion("lme4")), paste(R.version$major, R.version$minor, sep = "."),
        si$BLAS, if (is.null(msgs)) "true" else "false", as.integer(fit@optinfo$feval), hwm, load_s))
""").replace("FORMULA", LMER_FORMULA)

CHILDREN = {"mixedjax": child_mixedjax, "mixedlm": child_mixedlm, "statsmodels": child_statsmodels}


def run_child(cmd: list[str], env: dict, fit_timeout: float) -> dict:
    """Run an engine's process; ``fit_timeout`` counts from its READY line (library imported, data read).

    Returns ``{"status": "ok" | "timeout" | "failed", "result": ..., "wall_s": ..., "note": ...}``.
    """
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    lines: queue.Queue = queue.Queue()
    err: list[str] = []

    def pump_out() -> None:
        for line in p.stdout:
            lines.put(line)
        lines.put(None)

    def pump_err() -> None:
        err.extend(p.stderr)

    threads = [threading.Thread(target=pump_out, daemon=True), threading.Thread(target=pump_err, daemon=True)]
    for t in threads:
        t.start()
    result, status, ready_at, deadline = None, None, None, time.perf_counter() + LOAD_TIMEOUT
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.perf_counter()))
        except queue.Empty:
            status = "timeout"
            break
        if line is None:
            break
        if line.startswith(READY) and ready_at is None:
            ready_at = time.perf_counter()
            deadline = ready_at + fit_timeout
        elif line.startswith(MARK):
            result = json.loads(line[len(MARK):])
    if status == "timeout":
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for t in threads:
        t.join(timeout=30)
    p.wait()
    wall = time.perf_counter() - t0
    if status == "timeout":
        what = "the fit" if ready_at is not None else "import + data loading"
        limit = fit_timeout if ready_at is not None else LOAD_TIMEOUT
        return {"status": "timeout", "wall_s": wall, "note": f"{what} did not finish within {limit:.0f} s"}
    if p.returncode != 0 or result is None:
        errs = [ln.strip() for ln in "".join(err).splitlines() if ln.strip()]
        cause = [ln for ln in errs if re.match(r"^[\w.]*(Error|Exception|Killed)\b", ln)] or errs[-1:] or ["?"]
        return {"status": "failed", "wall_s": wall, "note": f"exit status {p.returncode}: {cause[-1][:300]}"}
    return {"status": "ok", "result": result, "wall_s": wall}


def python_child(engine: str, d: Path, repeats: int, env: dict, fit_timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", engine, "--_dir", str(d),
           "--repeats", str(repeats)]
    return run_child(cmd, env, fit_timeout)


def lme4_child(d: Path, n_rows: int, repeats: int, fit_timeout: float) -> dict:
    rscript = shutil.which("Rscript")
    if rscript is None:
        return {"status": "skipped", "note": "Rscript not found (R with lme4: Debian r-cran-lme4)"}
    probe = subprocess.run([rscript, "-e", "cat(requireNamespace('lme4', quietly = TRUE))"],
                           capture_output=True, text=True)
    if probe.stdout.strip() != "TRUE":
        return {"status": "skipped", "note": "the R package lme4 is not installed"}
    return run_child([rscript, "-e", R_SCRIPT, str(d), str(n_rows), str(repeats)], dict(os.environ), fit_timeout)


# ================================================================================ reporting
def _s(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:,.1f}" if x >= 100 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def _rel(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "—"
    return f"{abs(a - b) / abs(b):.1e}"


def _first(run: dict) -> float | None:
    return run["result"]["first_s"] if run.get("status") == "ok" else None


def _repeat(run: dict) -> float | None:
    if run.get("status") != "ok" or not run["result"].get("repeat_s"):
        return None
    return statistics.median(run["result"]["repeat_s"])


def _llf(run: dict | None) -> float | None:
    return run["result"]["llf"] if run and run.get("status") == "ok" else None


def _peak(run: dict | None) -> float | None:
    return run["result"].get("hwm_mib") if run and run.get("status") == "ok" else None


def engine_rows(rung: dict) -> list[tuple[str, dict, str]]:
    """(label, run, which) for the table: which = "first" or "warm" (first from this run, repeat too)."""
    rows = []
    for key, label in (("mj_cold", "mixedjax, cold cache"), ("mj_warm", "mixedjax, warm cache"),
                       ("mj_gpu_cold", "mixedjax GPU, cold cache"), ("mj_gpu_warm", "mixedjax GPU, warm cache"),
                       ("mixedlm", "mixedlm (Rust)"), ("statsmodels", "statsmodels"), ("lme4", "lme4 (R)")):
        if key in rung:
            rows.append((key, rung[key], label))
    return rows


def _note(key: str, run: dict) -> str:
    if run.get("status") != "ok":
        return f"{run.get('status')}: {run.get('note', '')}"
    r = run["result"]
    if key.startswith("mj"):
        parts = [f"{r['backend']}; converged {r['converged']}; {r['optim']['evaluations']} evaluations"]
    elif key == "mixedlm":
        parts = [f"{r['optim']['optimizer']}, {r['optim']['evaluations']} evaluations; converged {r['converged']}"]
    elif key == "statsmodels":
        parts = [f"converged {r['converged']}" + (f"; {', '.join(r['warnings'])}" if r["warnings"] else "")]
    else:
        parts = [f"{r['evaluations']} evaluations; " + ("converged" if r["converged"] else "convergence message")]
    if r.get("warnings") and key != "statsmodels":
        parts.append("warnings: " + "; ".join(r["warnings"])[:200])
    parts.append(f"load avg {run['load']:.1f}")
    return "; ".join(parts)


def mixedjax_details(rungs: list[dict]) -> list[str]:
    """One line per mixedjax process: optimiser, compile events, cache use, the cache it left."""
    out = []
    for rung in rungs:
        for key, run, label in engine_rows(rung):
            if not key.startswith("mj") or run.get("status") != "ok":
                continue
            r = run["result"]
            c, ev, o = r["compile_s"], r["cache_events"], r["optim"]
            line = (f"* {rung['n_groups']:,} groups, {label}: {o['iterations']} iterations, {o['evaluations']} "
                    f"evaluations, gradient norm {o['grad_norm']:.1e} ({o['message']}); first fit's compile events: "
                    f"trace {c['trace']:.2f} s, lowering {c['lower']:.2f} s, XLA {c['xla']:.2f} s; persistent cache "
                    f"hits {ev['cache_hits']}, misses {ev['cache_misses']}; data read in {r['load_s']:.2f} s")
            if r.get("repeat_llf"):
                line += f"; repeats' logLik within {max(abs(v - r['llf']) for v in r['repeat_llf']):.1e}"
            cache = rung.get(key.replace("_cold", "_cache").replace("_warm", "_cache"))
            if key.endswith("_cold") and cache:
                line += f"; left {cache[0]} files ({cache[1]:.1f} MiB) in the cache directory"
            out.append(line + ".")
    return out


def table(rungs: list[dict]) -> list[str]:
    out = ["| groups / rows | engine | first fit (s) | repeat, median (s) | peak RSS (MiB) | logLik | "
           "rel. diff vs mixedlm | rel. diff vs lme4 | notes |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for rung in rungs:
        ref_mlm, ref_lme4 = _llf(rung.get("mixedlm")), _llf(rung.get("lme4"))
        head = f"{rung['n_groups']:,} / {rung['n_rows']:,}"
        for key, run, label in engine_rows(rung):
            llf = _llf(run)
            out.append(f"| {head} | {label} | {_s(_first(run))} | {_s(_repeat(run))} | "
                       f"{'—' if _peak(run) is None else f'{_peak(run):,.0f}'} | "
                       f"{'—' if llf is None else f'{llf:.6f}'} | "
                       f"{'—' if key == 'mixedlm' else _rel(llf, ref_mlm)} | "
                       f"{'—' if key == 'lme4' else _rel(llf, ref_lme4)} | {_note(key, run)} |")
    return out


def targets(rungs: list[dict]) -> list[str]:
    out = []
    for rung in rungs:
        g = rung["n_groups"]
        warm, mlm = rung.get("mj_warm", {}), rung.get("mixedlm", {})
        f_mj, f_ml = _first(warm) if warm else None, _first(mlm) if mlm else None
        r_mj, r_ml = _repeat(warm) if warm else None, _repeat(mlm) if mlm else None
        lab = f"{g:,} groups"
        if g in TARGET_TEXT:
            checks = []
            if f_mj is None or f_ml is None:
                checks.append("first-fit ratio: not measured")
            elif g == 10_000:
                checks.append(f"first fit mixedlm / mixedjax {f_ml / f_mj:.2f}x (need >= 0.5x): "
                              f"{'met' if f_mj <= 2 * f_ml else 'NOT met'}")
            elif g == 100_000:
                checks.append(f"first fit mixedlm / mixedjax {f_ml / f_mj:.2f}x (need >= 1x): "
                              f"{'met' if f_mj <= f_ml else 'NOT met'}")
            else:
                checks.append(f"first fit mixedlm / mixedjax {f_ml / f_mj:.2f}x (need >= 2.5x): "
                              f"{'met' if f_ml >= 2.5 * f_mj else 'NOT met'}")
            if g in (10_000, 100_000):
                need = 1.0 if g == 10_000 else 2.0
                if r_mj is None or r_ml is None:
                    checks.append("repeat ratio: not measured")
                else:
                    checks.append(f"repeat mixedlm / mixedjax {r_ml / r_mj:.2f}x (need >= {need:g}x): "
                                  f"{'met' if r_ml >= need * r_mj else 'NOT met'}")
            if g == 1_000_000:
                p_mj, p_ml = _peak(warm), _peak(mlm)
                if p_mj is None or p_ml is None:
                    checks.append("peak memory: not measured")
                else:
                    checks.append(f"peak RSS mixedjax {p_mj:,.0f} MiB vs mixedlm {p_ml:,.0f} MiB: "
                                  f"{'met' if p_mj <= p_ml else 'NOT met'}")
            out.append(f"* {lab} ({TARGET_TEXT[g]}): " + "; ".join(checks) + ".")
        ref = _llf(mlm) if mlm else None
        lls = {k: _llf(rung.get(k)) for k in ("mj_cold", "mj_warm", "mj_gpu_cold", "mj_gpu_warm") if rung.get(k)}
        lls = {k: v for k, v in lls.items() if v is not None}
        if ref is None or not lls:
            out.append(f"* {lab}, logLik within 1e-8 relative of mixedlm's: not measured.")
        else:
            worst = max(abs(v - ref) / abs(ref) for v in lls.values())
            out.append(f"* {lab}, logLik within 1e-8 relative of mixedlm's: {'met' if worst <= 1e-8 else 'NOT met'} "
                       f"(worst mixedjax run {worst:.1e}).")
        conv = [rung[k]["result"]["converged"] for k in lls]
        out.append(f"* {lab}, mixedjax `converged`: {', '.join(str(c) for c in conv)} "
                   f"({', '.join(k for k in lls)}).")
    return out


def plot(rungs: list[dict], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = [("mj_cold", _first, "mixedjax first fit, cold cache", "C0", "D", ":"),
              ("mj_warm", _first, "mixedjax first fit, warm cache", "C0", "o", "-"),
              ("mj_warm", _repeat, "mixedjax repeat", "C0", "s", "--"),
              ("mj_gpu_cold", _first, "mixedjax GPU first fit, cold cache", "C4", "D", ":"),
              ("mj_gpu_warm", _first, "mixedjax GPU first fit, warm cache", "C4", "o", "-"),
              ("mj_gpu_warm", _repeat, "mixedjax GPU repeat", "C4", "s", "--"),
              ("mixedlm", _first, "mixedlm first fit", "C1", "o", "-"),
              ("mixedlm", _repeat, "mixedlm repeat", "C1", "s", "--"),
              ("statsmodels", _first, "statsmodels", "C2", "o", "-"),
              ("lme4", _first, "lme4 first fit", "C3", "o", "-"),
              ("lme4", _repeat, "lme4 repeat", "C3", "s", "--")]
    fig = Figure(figsize=(7.5, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for key, get, label, color, marker, ls in series:
        pts = [(r["n_rows"], get(r[key])) for r in rungs if key in r and get(r[key]) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), color=color, marker=marker, linestyle=ls, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rows (about 10 per group)")
    ax.set_ylabel("wall seconds (model construction + fit)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


# ================================================================================ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rungs", default="10000,100000,1000000", help="numbers of groups, comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="repeat fits in the warm process (median)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "mixedjax-ladder")
    ap.add_argument("--out", type=Path, default=None, help="markdown report (default DATA_DIR/ladder.md)")
    ap.add_argument("--plot", type=Path, default=None, help="PNG plot (default DATA_DIR/ladder.png)")
    ap.add_argument("--skip-statsmodels", action="store_true")
    ap.add_argument("--skip-lme4", action="store_true")
    ap.add_argument("--skip-mixedlm", action="store_true")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds allowed for each engine's fits")
    ap.add_argument("--sm-timeout", type=float, default=600, help="seconds allowed for statsmodels' fit")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                    help="gpu: also run mixedjax with JAX_PLATFORMS=cuda on the largest rung")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._child:
        res = CHILDREN[args._child](args._dir, args.repeats)
        print(MARK + json.dumps(res), flush=True)
        return

    n_groups = [int(s.replace("_", "")) for s in args.rungs.split(",") if s.strip()]
    args.data_dir.mkdir(parents=True, exist_ok=True)
    out_md = args.out or args.data_dir / "ladder.md"
    out_png = args.plot or args.data_dir / "ladder.png"
    started = datetime.datetime.now()
    load_start = machine.load()
    base_env = dict(os.environ)
    cpu_env = dict(base_env, JAX_PLATFORMS="cpu") if args.device == "gpu" else base_env
    rungs: list[dict] = []
    sm_skip: str | None = "--skip-statsmodels" if args.skip_statsmodels else None
    cache_root = Path(tempfile.mkdtemp(prefix="cache-", dir=args.data_dir))

    def timed(fn, *a) -> dict:
        load = machine.load()
        run = fn(*a)
        run["load"] = load
        st = run.get("status")
        what = (f"first {_s(_first(run))} s, repeat {_s(_repeat(run))} s, llf {_llf(run)}" if st == "ok"
                else f"{st}: {run.get('note', '')}")
        print(f"  ... {what}", file=sys.stderr, flush=True)
        return run

    def mixedjax_pair(rung: dict, d: Path, env: dict, prefix: str, tag: str) -> None:
        cache = cache_root / f"{tag}-g{rung['n_groups']}"
        cache.mkdir()
        env = dict(env, MIXEDJAX_CACHE_DIR=str(cache))
        env.pop("MIXEDJAX_CACHE", None)
        print(f"[{rung['n_groups']:,} groups] mixedjax ({tag}), cold cache", file=sys.stderr, flush=True)
        rung[f"{prefix}_cold"] = timed(python_child, "mixedjax", d, 0, env, args.timeout)
        files = [p for p in cache.rglob("*") if p.is_file()]
        rung[f"{prefix}_cache"] = (len(files), sum(p.stat().st_size for p in files) / 2**20)
        print(f"[{rung['n_groups']:,} groups] mixedjax ({tag}), warm cache", file=sys.stderr, flush=True)
        rung[f"{prefix}_warm"] = timed(python_child, "mixedjax", d, args.repeats, env, args.timeout)

    for g in n_groups:
        t0 = time.perf_counter()
        d, meta = ensure_data(args.data_dir, g, args.seed)
        print(f"[{g:,} groups] data {d} ({meta['n_rows']:,} rows; ready in {time.perf_counter() - t0:.1f} s)",
              file=sys.stderr, flush=True)
        rung = {"n_groups": g, "n_rows": meta["n_rows"], "dir": str(d)}
        rungs.append(rung)
        mixedjax_pair(rung, d, cpu_env, "mj", "cpu")
        if not args.skip_mixedlm:
            print(f"[{g:,} groups] mixedlm", file=sys.stderr, flush=True)
            rung["mixedlm"] = timed(python_child, "mixedlm", d, args.repeats, cpu_env, args.timeout)
        if sm_skip:
            rung["statsmodels"] = {"status": "skipped", "note": sm_skip, "load": machine.load()}
        else:
            print(f"[{g:,} groups] statsmodels", file=sys.stderr, flush=True)
            rung["statsmodels"] = timed(python_child, "statsmodels", d, 0, cpu_env, args.sm_timeout)
            if rung["statsmodels"]["status"] == "timeout":
                sm_skip = f"skipped after the timeout at {g:,} groups"
        if args.skip_lme4:
            rung["lme4"] = {"status": "skipped", "note": "--skip-lme4", "load": machine.load()}
        else:
            print(f"[{g:,} groups] lme4", file=sys.stderr, flush=True)
            rung["lme4"] = timed(lme4_child, d, meta["n_rows"], args.repeats, args.timeout)
    if args.device == "gpu":
        top = max(rungs, key=lambda r: r["n_groups"])
        mixedjax_pair(top, Path(top["dir"]), dict(base_env, JAX_PLATFORMS="cuda"), "mj_gpu", "gpu")
    shutil.rmtree(cache_root, ignore_errors=True)

    # --------------------------------------------------------------------- report
    mj = next((r["mj_warm"]["result"] for r in rungs if r["mj_warm"].get("status") == "ok"), None)
    lme = next((r["lme4"]["result"] for r in rungs if r.get("lme4", {}).get("status") == "ok"), None)
    lines = [f"Date: {started:%Y-%m-%d %H:%M}  ",
             f"Machine: {platform.platform()}, {machine.cpu_model()}, {os.cpu_count()} CPUs, "
             f"{machine.mem_total_gib():.0f} GiB; 1-min load average {load_start:.2f} at the start, "
             f"{machine.load():.2f} at the end  ",
             f"Python {platform.python_version()}, jax {machine.version('jax')}, jaxlib "
             f"{machine.version('jaxlib')}, numpy {machine.version('numpy')}, pandas {machine.version('pandas')}, "
             f"mixedlm {machine.version('mixedlm')}, statsmodels {machine.version('statsmodels')}"
             + (f", R {lme['R']} with lme4 {lme['version']} (BLAS {lme['blas']})" if lme else "") + "  "]
    if mj:
        lines.append(f"mixedjax: `import jax, mixedjax` {mj['import_s']:.2f} s (not timed), backend {mj['backend']} "
                     f"({mj['device']})  ")
    lines += [f"Model: `{FORMULA}`, `re_formula=\"{RE_FORMULA}\"` (lme4: `{LMER_FORMULA}`), REML; 5-15 rows per "
              f"group, rows shuffled; seed {args.seed}; data in {args.data_dir}  ",
              "Each engine in fresh processes; times are wall seconds of model construction + fit (data in memory, "
              f"imports not timed); repeat = median of {args.repeats} in the same process; peak RSS = VmHWM of the "
              "engine's process (data, imports and all its fits).  ", ""]
    lines += table(rungs)
    lines += ["", "mixedjax processes:", ""]
    lines += mixedjax_details(rungs)
    lines += ["", "Targets (issue 11; each a ratio within this run, mixedjax's first fit with a warm cache):", ""]
    lines += targets(rungs)
    report = "\n".join(lines) + "\n"
    print(report)
    out_md.write_text(report)
    out_md.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                        "started": f"{started:%Y-%m-%d %H:%M}", "rungs": rungs},
                                                       indent=1))
    try:
        plot(rungs, out_png, f"y ~ x1 + x2 + x3 + (x1 | g), REML; {machine.cpu_model()}, {os.cpu_count()} CPUs; "
                             f"{started:%Y-%m-%d}")
        print(f"Report written to {out_md}; plot to {out_png}.", file=sys.stderr)
    except ImportError:
        print(f"Report written to {out_md}; no plot (matplotlib not installed).", file=sys.stderr)


if __name__ == "__main__":
    main()
