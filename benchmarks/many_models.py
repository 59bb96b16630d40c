"""Many models on one design: mixedjax ``fit_many`` against statsmodels and lme4 loops.

Usage::

    python benchmarks/many_models.py                 # --models 10000 (default)
    python benchmarks/many_models.py --memory-100k   # 100,000 models, batch_size=10000

Data: ``--models`` sleepstudy-sized random-slope data sets on ONE design, 18 groups
x 10 observations, ``x = 0..9`` in every group,
``y = 250 + 10 x + b0 + b1 x + e`` with sd(b0) = 25, sd(b1) = 6, corr(b0, b1) = 0.1,
sd(e) = 25 (fixed seed; data set ``m`` does not depend on ``--models``).
Model: ``y ~ x``, random intercept and slope by ``g``, REML.

* **mixedjax**: ``mixedlm("y ~ x", df, groups="g", re_formula="~x").fit_many(Y)`` on
  all data sets, in a FRESH Python subprocess, so the first call includes tracing and
  XLA compilation (model construction included; JAX's backend is initialised before
  the timer, its import time is reported separately); then a repeat call in the same
  subprocess.  Resident memory of that subprocess is read from ``/proc/self/status``
  (VmRSS after each stage, VmHWM = peak) and ``getrusage`` (``ru_maxrss``).
* **statsmodels**: a loop of ``smf.mixedlm(...).fit(reml=True)`` over the first
  ``--sm-models`` data sets; time per fit extrapolated to ``--models``.
* **lme4** (``benchmarks/many_models_lme4.R``, skipped when ``Rscript`` is absent): one
  ``lmer(y ~ x + (1 + x | g), REML = TRUE)``, then a loop of
  ``refit(fit, newresp = y_m)`` over the first ``--lme4-models`` data sets, and a loop
  of fresh ``lmer()`` fits over the first ``--lme4-fresh`` data sets; extrapolated.
  The log-likelihoods are compared with the fresh ``lmer()`` fits (lme4 1.1-31's
  ``refit(newresp=)`` reports a different REML logLik; the discrepancy is printed).

``--memory-100k`` instead runs only ``fit_many`` on 100,000 data sets in a fresh
subprocess with ``batch_size=10000`` (or, when ``fit_many`` does not accept
``batch_size``, a loop of ``fit_many`` over column chunks of 10,000; said so in the
output) and reports time and peak RSS.

Prints markdown tables and the machine information.  Timings are wall-clock; on a
shared machine the 1-minute load average is printed with each phase.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import machine

HERE = os.path.dirname(os.path.abspath(__file__))
N_GROUPS, N_PER = 18, 10
CHUNK = 1000  # models per random-number stream in simulate()
SEED = 20261125
MARK = "@@RESULT@@ "


# ---------------------------------------------------------------------------- helpers


def simulate(n_models: int, seed: int = SEED):
    """x, g (length 180) and Y (180, n_models); column m is the same for any n_models >= m + 1."""
    import numpy as np

    g = np.repeat(np.arange(N_GROUPS), N_PER)
    x = np.tile(np.arange(N_PER, dtype=float), N_GROUPS)
    sd0, sd1, rho, sde = 25.0, 6.0, 0.1, 25.0
    chol = np.linalg.cholesky(np.array([[sd0**2, rho * sd0 * sd1], [rho * sd0 * sd1, sd1**2]]))
    nobs = N_GROUPS * N_PER
    y = np.empty((nobs, n_models))
    for c, start in enumerate(range(0, n_models, CHUNK)):
        n = min(CHUNK, n_models - start)
        # one row of draws per model, so a shorter final chunk is a prefix of the full chunk
        z = np.random.default_rng([seed, c]).standard_normal((n, 2 * N_GROUPS + nobs))
        b = z[:, : 2 * N_GROUPS].reshape(n, N_GROUPS, 2) @ chol.T  # (n, 18, 2)
        e = sde * z[:, 2 * N_GROUPS:]
        y[:, start:start + n] = (250.0 + 10.0 * x + b[:, g, 0] + b[:, g, 1] * x + e).T
    return x, g, y


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def _mem() -> dict:
    import resource

    return {"rss_mib": _proc_status_kib("VmRSS") / 1024, "hwm_mib": _proc_status_kib("VmHWM") / 1024,
            "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


# ---------------------------------------------------------------------------- mixedjax worker


def _worker(n_models: int, batch_size: int | None, repeat: int, keep: int, seed: int) -> dict:
    """Runs in a fresh subprocess: import, simulate, fit_many (first call, repeats)."""
    out: dict = {"mem": {"start": _mem()}, "load": {"start": _load()}}
    t0 = time.perf_counter()
    import numpy as np
    import pandas as pd

    out["mem"]["numpy_pandas"] = _mem()
    t1 = time.perf_counter()
    import inspect

    import jax
    import jax.numpy as jnp

    import mixedjax

    out["import_jax_mixedjax_s"] = time.perf_counter() - t1
    out["import_numpy_pandas_s"] = t1 - t0
    out["mem"]["import_jax_mixedjax"] = _mem()
    t1 = time.perf_counter()
    jnp.zeros(1).block_until_ready()
    out["backend_init_s"] = time.perf_counter() - t1
    out["mem"]["backend_init"] = _mem()
    out["jax"], out["backend"] = jax.__version__, jax.default_backend()
    out["device"] = str(jax.devices()[0].device_kind)
    out["x64"] = bool(jax.config.read("jax_enable_x64"))

    x, g, y = simulate(n_models, seed)
    df = pd.DataFrame({"y": y[:, 0], "x": x, "g": g})
    out["mem"]["data"] = _mem()
    out["data_mib"] = y.nbytes / 2**20

    params = inspect.signature(mixedjax.MixedLM.fit_many).parameters
    out["fit_many_signature"] = str(inspect.signature(mixedjax.MixedLM.fit_many))
    out["batch_size_supported"] = "batch_size" in params
    out["batch_size"] = batch_size
    if batch_size and "batch_size" in params:
        out["chunking"] = f"fit_many(..., batch_size={batch_size})"
    elif batch_size:
        out["chunking"] = (f"fit_many has no batch_size: a Python loop of fit_many over "
                           f"column chunks of {batch_size}")
    else:
        out["chunking"] = "one fit_many call on all models"

    def run():
        md = mixedjax.mixedlm("y ~ x", df, groups="g", re_formula="~x")
        if batch_size and "batch_size" in params:
            r = md.fit_many(y, reml=True, batch_size=batch_size)
            return np.asarray(r.llf), np.asarray(r.fe_params), np.asarray(r.converged)
        if batch_size:
            parts = [md.fit_many(y[:, s:s + batch_size], reml=True) for s in range(0, n_models, batch_size)]
            return (np.concatenate([p.llf for p in parts]), np.concatenate([p.fe_params for p in parts]),
                    np.concatenate([p.converged for p in parts]))
        r = md.fit_many(y, reml=True)
        return np.asarray(r.llf), np.asarray(r.fe_params), np.asarray(r.converged)

    out["load"]["first"] = _load()
    c0, t1 = time.process_time(), time.perf_counter()
    llf, fe, conv = run()
    out["first_s"], out["first_cpu_s"] = time.perf_counter() - t1, time.process_time() - c0
    out["mem"]["after_first"] = _mem()
    out["converged"] = int(conv.sum())
    out["finite_llf"] = int(np.isfinite(llf).sum())
    out["n_models"] = n_models
    out["repeat_s"], out["repeat_cpu_s"] = [], []
    for _ in range(repeat):
        out["load"]["repeat"] = _load()
        c0, t1 = time.process_time(), time.perf_counter()
        llf2, _, _ = run()
        out["repeat_s"].append(time.perf_counter() - t1)
        out["repeat_cpu_s"].append(time.process_time() - c0)
        out["repeat_same_llf"] = bool(np.allclose(llf2, llf, rtol=0, atol=1e-8, equal_nan=True))
    out["mem"]["end"] = _mem()
    out["llf"] = [float(v) for v in llf[:keep]]
    out["fe_params"] = fe[:keep].tolist()
    return out


def run_worker(n_models: int, batch_size: int | None, repeat: int, keep: int, seed: int,
               timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", "--models", str(n_models),
           "--repeat", str(repeat), "--keep", str(keep), "--seed", str(seed)]
    if batch_size:
        cmd += ["--batch-size", str(batch_size)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.stderr.write(p.stdout + p.stderr)
        raise RuntimeError(f"mixedjax worker failed with exit status {p.returncode}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith(MARK)][-1]
    res = json.loads(line[len(MARK):])
    res["process_wall_s"] = wall
    return res


# ---------------------------------------------------------------------------- statsmodels


def run_statsmodels(x, g, y, n: int) -> dict:
    import numpy as np
    import pandas as pd
    import statsmodels.formula.api as smf

    base = pd.DataFrame({"y": y[:, 0], "x": x, "g": g})
    llf, fe, conv, n_warn = [], [], [], 0
    times = []
    load = _load()
    c0 = time.process_time()
    for m in range(n):
        df = base.copy()
        df["y"] = y[:, m]
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            r = smf.mixedlm("y ~ x", df, groups=df["g"], re_formula="~x").fit(reml=True)
            times.append(time.perf_counter() - t0)
        n_warn += sum(1 for v in w if "onvergence" in type(v.message).__name__)
        conv.append(bool(r.converged))
        llf.append(float(r.llf))
        fe.append(np.asarray(r.fe_params, dtype=float).tolist())
    cpu = time.process_time() - c0
    return {"n": n, "total_s": float(sum(times)), "cpu_s": cpu, "per_fit_s": float(sum(times) / n),
            "median_s": float(np.median(times)), "llf": llf, "fe_params": fe,
            "converged": conv, "not_converged": int(n - sum(conv)), "convergence_warnings": int(n_warn), "load": load}


# ---------------------------------------------------------------------------- lme4


def run_lme4(x, g, y, n_refit: int, n_fresh: int, timeout: float) -> dict | None:
    import numpy as np
    import pandas as pd

    rscript = shutil.which("Rscript")
    if rscript is None:
        print("NOTE: Rscript not found; lme4 comparison skipped.\n")
        return None
    k = max(n_refit, n_fresh)
    with tempfile.TemporaryDirectory(prefix="many_models_") as tmp:
        csv = os.path.join(tmp, "data.csv")
        wide = pd.DataFrame({"g": g, "x": x})
        wide = pd.concat([wide, pd.DataFrame(y[:, :k], columns=[f"y{m}" for m in range(k)])], axis=1)
        wide.to_csv(csv, index=False, float_format="%.17g")
        prefix = os.path.join(tmp, "lme4")
        load = _load()
        p = subprocess.run([rscript, os.path.join(HERE, "many_models_lme4.R"), csv, str(n_refit),
                            str(n_fresh), prefix], capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            sys.stderr.write(p.stdout + p.stderr)
            print(f"NOTE: the lme4 script failed (exit status {p.returncode}); lme4 comparison skipped.\n")
            return None
        info = {}
        with open(prefix + "_info.txt") as f:
            for line in f:
                key, _, val = line.strip().partition(" ")
                info[key] = val
        fits = pd.read_csv(prefix + "_fits.csv")
    for key in list(info):
        if key.endswith("_s"):
            info[key] = float(info[key])
        elif key.startswith(("n_", "refit_sing", "fresh_sing", "fresh_warn")):
            info[key] = int(info[key])
    info["fits"] = fits
    info["load"] = load
    info["refit_vs_fresh_llf_max_abs"] = float(np.nanmax(np.abs(fits.refit_llf - fits.fresh_llf)))
    info["refit_vs_fresh_llf_mean"] = float(np.nanmean(fits.refit_llf - fits.fresh_llf))
    info["refit_vs_fresh_fe_max_abs"] = float(np.nanmax(np.abs(
        fits[["refit_b0", "refit_b1"]].to_numpy() - fits[["fresh_b0", "fresh_b1"]].to_numpy())))
    return info


# ---------------------------------------------------------------------------- reporting


def _fmt_s(s: float) -> str:
    return f"{s:,.1f}" if s >= 10 else f"{s:.2f}"


def _machine(mj: dict, lme: dict | None) -> list[str]:
    lines = [f"Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}  ",
             f"Machine: {platform.platform()}, {machine.cpu_model(fallback='unknown')}, {os.cpu_count()} CPUs  ",
             f"Python {platform.python_version()}, jax {mj['jax']} (backend {mj['backend']}, "
             f"{mj['device']}, x64 {mj['x64']}), jaxlib {machine.version('jaxlib')}, numpy {machine.version('numpy')}, "
             f"statsmodels {machine.version('statsmodels')}  "]
    if lme is not None:
        lines.append(f"{lme['r_version'].replace('_', ' ')}, lme4 {lme['lme4_version']}, "
                     f"BLAS {lme['blas']}  ")
    lines.append(f"`fit_many{mj['fit_many_signature']}`; {mj['chunking']}  ")
    return lines


def _memory_table(mj: dict) -> list[str]:
    m = mj["mem"]
    rows = [("Python start", "start"), ("after `import numpy, pandas`", "numpy_pandas"),
            ("after `import jax, mixedjax`", "import_jax_mixedjax"),
            ("after JAX backend init", "backend_init"),
            (f"after simulating the data ({mj['data_mib']:.0f} MiB of responses)", "data"),
            ("after first `fit_many`", "after_first"), ("end of the subprocess", "end")]
    out = ["| stage (mixedjax subprocess) | RSS (MiB) | peak RSS so far, VmHWM (MiB) |", "|---|---:|---:|"]
    for label, key in rows:
        if key in m:
            out.append(f"| {label} | {m[key]['rss_mib']:.0f} | {m[key]['hwm_mib']:.0f} |")
    return out


def _peak_bytes(mj: dict) -> float:
    return max(mj["mem"]["end"]["hwm_mib"], mj["mem"]["end"]["maxrss_mib"]) * 2**20


def report_main(args, mj: dict, sm: dict, lme: dict | None) -> None:
    import numpy as np

    n = args.models
    first = mj["first_s"]
    rep = min(mj["repeat_s"]) if mj["repeat_s"] else float("nan")
    print("\n".join(_machine(mj, lme)))
    print(f"{n:,} REML fits of `y ~ x`, random intercept + slope by `g` (18 groups x 10 obs, one design); "
          f"seed {args.seed}.  ")
    print(f"1-min load average at start of: mixedjax first call {mj['load']['first']}, "
          f"statsmodels {sm['load']}" + (f", lme4 {lme['load']}" if lme else "") + ".")
    print()
    print(f"| method | models fitted | wall seconds for {n:,} models | ms per model | "
          f"mixedjax speed-up (first call, compile incl.) | mixedjax speed-up (repeat call) | "
          f"CPU seconds for {n:,} | CPU speed-up (first call) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    first_cpu = mj["first_cpu_s"]

    def row(label, fitted, secs, cpu, how, ours=False):
        sp = "| — | — |" if ours else f"| {secs / first:,.1f}x | {secs / rep:,.1f}x |"
        csp = "—" if ours else f"{cpu / first_cpu:,.1f}x"
        print(f"| {label} | {fitted:,} | {_fmt_s(secs)} ({how}) | {1000 * secs / n:.2f} {sp} {_fmt_s(cpu)} | {csp} |")

    row("mixedjax `fit_many`, first call in a fresh process (trace + compile incl.)", n, first, first_cpu,
        "measured", True)
    if mj["repeat_s"]:
        row("mixedjax `fit_many`, repeat call (same process)", n, rep, min(mj["repeat_cpu_s"]), "measured", True)
    row("statsmodels `smf.mixedlm(...).fit(reml=True)` loop", sm["n"], sm["per_fit_s"] * n,
        sm["cpu_s"] / sm["n"] * n, "extrapolated")
    if lme is not None:
        row("lme4 `refit(fit, newresp = y_m)` loop", lme["n_refit"], lme["refit_elapsed_s"] / lme["n_refit"] * n,
            lme["refit_cpu_s"] / lme["n_refit"] * n, "extrapolated")
        row("lme4 fresh `lmer(y ~ x + (1 + x | g))` loop", lme["n_fresh"],
            lme["fresh_elapsed_s"] / lme["n_fresh"] * n, lme["fresh_cpu_s"] / lme["n_fresh"] * n, "extrapolated")
    print()
    print(f"mixedjax subprocess: `import numpy, pandas` {mj['import_numpy_pandas_s']:.2f} s, "
          f"`import jax, mixedjax` {mj['import_jax_mixedjax_s']:.2f} s, backend init {mj['backend_init_s']:.2f} s "
          f"(not in the first-call time); whole subprocess (start to exit, incl. simulation and "
          f"{len(mj['repeat_s'])} repeat call(s)) {mj['process_wall_s']:.1f} s wall.  ")
    print("CPU time = user + system time of the process (all its threads), a check on the wall times "
          "when the machine is shared.  ")
    print(f"mixedjax CPU time (all threads): first call {mj['first_cpu_s']:.1f} s, repeat "
          + (", ".join(f"{c:.1f}" for c in mj["repeat_cpu_s"]) or "-") + " s.  ")
    print(f"mixedjax converged: {mj['converged']:,}/{n:,}; finite llf {mj['finite_llf']:,}/{n:,}"
          + (f"; repeat call gave the same llf: {mj['repeat_same_llf']}" if mj["repeat_s"] else "") + ".  ")
    print(f"statsmodels: {sm['n']} fits, mean {1000 * sm['per_fit_s']:.1f} ms (median {1000 * sm['median_s']:.1f} ms); "
          f"not converged {sm['not_converged']}/{sm['n']}; {sm['convergence_warnings']} ConvergenceWarnings.  ")
    if lme is not None:
        print(f"lme4: refit loop {lme['n_refit']} fits in {lme['refit_elapsed_s']:.2f} s "
              f"({1000 * lme['refit_elapsed_s'] / lme['n_refit']:.1f} ms/fit, CPU {lme['refit_cpu_s']:.2f} s), "
              f"{lme['refit_singular']} singular; fresh lmer loop {lme['n_fresh']} fits in "
              f"{lme['fresh_elapsed_s']:.2f} s ({1000 * lme['fresh_elapsed_s'] / lme['n_fresh']:.1f} ms/fit), "
              f"{lme['fresh_singular']} singular, {lme['fresh_warnings']} warnings.")
    print()
    print("Memory of the mixedjax subprocess:")
    print()
    print("\n".join(_memory_table(mj)))
    print()
    imp = mj["mem"]["import_jax_mixedjax"]["rss_mib"] - mj["mem"]["numpy_pandas"]["rss_mib"]
    print(f"`import jax, mixedjax` alone adds {imp:.0f} MiB; JAX backend init adds "
          f"{mj['mem']['backend_init']['rss_mib'] - mj['mem']['import_jax_mixedjax']['rss_mib']:.0f} MiB; "
          f"peak RSS (getrusage ru_maxrss) {mj['mem']['end']['maxrss_mib']:.0f} MiB.")
    print()

    # log-likelihood agreement
    ours = np.asarray(mj["llf"])
    print("Log-likelihood agreement (REML; ours - theirs, on the same data sets):")
    print()
    d_sm = ours[: sm["n"]] - np.asarray(sm["llf"])
    print(f"* statsmodels, {sm['n']} models: max |diff| {np.max(np.abs(d_sm)):.2e}, min diff {np.min(d_sm):.2e} "
          f"(ours >= statsmodels - 1e-6 on {int(np.sum(d_sm >= -1e-6))}/{sm['n']}); on the "
          f"{int(np.sum(sm['converged']))} fits statsmodels reports converged: max |diff| "
          f"{np.max(np.abs(d_sm[np.asarray(sm['converged'])]), initial=0):.2e}.")
    if lme is not None:
        f = lme["fits"]
        k = lme["n_fresh"]
        d_l = ours[:k] - f.fresh_llf.to_numpy()[:k]
        print(f"* lme4 fresh `lmer()`, {k} models: max |diff| {np.max(np.abs(d_l)):.2e}, min diff {np.min(d_l):.2e} "
              f"(ours >= lme4 - 1e-6 on {int(np.sum(d_l >= -1e-6))}/{k}).")
        fe_ours = np.asarray(mj["fe_params"])[:k]
        fe_l = f[["fresh_b0", "fresh_b1"]].to_numpy()[:k]
        print(f"* fixed effects vs fresh `lmer()`: max |diff| {np.max(np.abs(fe_ours - fe_l)):.2e}.")
        print(f"* lme4's own `refit(newresp=)` vs fresh `lmer()` on {k} models: logLik max |diff| "
              f"{lme['refit_vs_fresh_llf_max_abs']:.3f} (mean refit - fresh {lme['refit_vs_fresh_llf_mean']:.3f}); "
              f"fixed effects max |diff| {lme['refit_vs_fresh_fe_max_abs']:.2e} (so the refit loop's timing "
              f"is of a fit that reaches the same fixed effects; its reported logLik is not used).")
    print()

    # targets
    peak = _peak_bytes(mj)
    print("Targets (issue 4):")
    print()
    print(f"* {n:,} models under 1 GB (1e9 bytes) peak RSS: {'met' if peak < 1e9 else 'NOT met'} "
          f"({peak / 2**20:.0f} MiB = {peak / 1e9:.2f} GB).")
    print(f"* >= 100x faster than the statsmodels loop, compile included: "
          f"{'met' if sm['per_fit_s'] * n / first >= 100 else 'NOT met'} ({sm['per_fit_s'] * n / first:.1f}x).")
    if lme is not None:
        s = lme["refit_elapsed_s"] / lme["n_refit"] * n / first
        print(f"* >= 20x faster than the lme4 refit loop, compile included: {'met' if s >= 20 else 'NOT met'} "
              f"({s:.1f}x).")


def report_100k(args, mj: dict) -> None:
    n = mj["n_models"]
    print("\n".join(_machine(mj, None)))
    print(f"{n:,} REML fits of `y ~ x`, random intercept + slope by `g` (18 groups x 10 obs, one design); "
          f"seed {args.seed}; 1-min load average at start of the call {mj['load']['first']}.  ")
    print()
    print("| run | models | wall seconds (fresh process, compile incl.) | ms per model | CPU s | peak RSS (MiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| {mj['chunking']} | {n:,} | {mj['first_s']:.1f} | {1000 * mj['first_s'] / n:.2f} | "
          f"{mj['first_cpu_s']:.1f} | {_peak_bytes(mj) / 2**20:.0f} |")
    print()
    print(f"converged {mj['converged']:,}/{n:,}; finite llf {mj['finite_llf']:,}/{n:,}.  ")
    print(f"`import jax, mixedjax` {mj['import_jax_mixedjax_s']:.2f} s; "
          f"whole subprocess {mj['process_wall_s']:.1f} s wall.")
    print()
    print("\n".join(_memory_table(mj)))
    print()
    peak = _peak_bytes(mj)
    print(f"Target: {n:,} models (chunked) under 2 GB (2e9 bytes) peak RSS: "
          f"{'met' if peak < 2e9 else 'NOT met'} ({peak / 2**20:.0f} MiB = {peak / 1e9:.2f} GB).")


# ---------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=10000, help="data sets fitted by mixedjax (default 10000)")
    ap.add_argument("--sm-models", type=int, default=50, help="statsmodels fits timed (default 50)")
    ap.add_argument("--lme4-models", type=int, default=500, help="lme4 refit() fits timed (default 500)")
    ap.add_argument("--lme4-fresh", type=int, default=100,
                    help="fresh lmer() fits, for timing and logLik (default 100)")
    ap.add_argument("--memory-100k", action="store_true",
                    help="only fit_many on 100,000 models with batch_size=10000, time and peak RSS")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed per subprocess (default 900)")
    ap.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--keep", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._worker:
        res = _worker(args.models, args.batch_size, args.repeat, args.keep, args.seed)
        print(MARK + json.dumps(res))
        return

    if args.memory_100k:
        mj = run_worker(100_000, 10_000, 0, 0, args.seed, args.timeout)
        report_100k(args, mj)
        return

    k = min(max(args.sm_models, args.lme4_models, args.lme4_fresh), args.models)
    args.sm_models, args.lme4_models, args.lme4_fresh = (min(v, args.models) for v in
                                                         (args.sm_models, args.lme4_models, args.lme4_fresh))
    mj = run_worker(args.models, None, 1, k, args.seed, args.timeout)
    x, g, y = simulate(k, args.seed)
    sm = run_statsmodels(x, g, y, args.sm_models)
    lme = run_lme4(x, g, y, args.lme4_models, args.lme4_fresh, args.timeout)
    report_main(args, mj, sm, lme)


if __name__ == "__main__":
    main()
