"""InstEval (73,421 rows; 2,972 students x 1,128 lecturers x 28 dept:service, crossed), REML: mixedjax vs lme4.

Usage::

    python benchmarks/insteval.py [--repeats 3] [--skip-lme4]

Model: ``y ~ service + (1 | s) + (1 | d) + (1 | dept:service)``, REML, lme4's default settings.

* **mixedjax first fit**: in a fresh Python process with the data already in memory (the
  bundled ``mixedjax.datasets.load("insteval")``, JAX initialised), ``mixedjax.lmer(...)``
  end to end: formula parsing, the host-side sparse precomputation, tracing and XLA
  compilation, and the fit.  Then **repeat**: the same call again in that process (the
  compiled program is reused; the precomputation is not cached), the median of
  ``--repeats``.  Run twice, in two fresh processes sharing a new compilation cache
  directory (``MIXEDJAX_CACHE_DIR``, :mod:`mixedjax.cache`): **cold** (empty cache: every
  program compiled) and **warm** (the second process loads the first one's programs; tracing
  still runs).
* **lme4**: ``lme4::lmer(...)`` with the data in memory (``data(InstEval)``), timed with
  ``system.time`` in one ``Rscript`` process: the first call and the median of ``--repeats``.
  R with lme4 installs from the Debian packages ``r-cran-lme4`` (lme4 1.1-31 here); give it an
  optimised BLAS (``libopenblas0-pthread``): with the reference BLAS lme4 is about 4x slower.
  Skipped (with a note) when ``Rscript`` or lme4 is absent.

* **precision**: both fits' distance from the polished lme4 reference
  (``tests/reference/insteval_reml.json``: tight BOBYQA, then a Newton polish of θ): logLik
  (absolute), fixed effects and variances (relative), as ``refcheck.py`` measures them.

Both run one after the other on the same machine in one run of this script; the machine's load
average is printed, because other processes on the machine slow both down.  Prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

FORMULA = "y ~ service + (1 | s) + (1 | d) + (1 | dept:service)"
REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "reference" / "insteval_reml.json"

R_SCRIPT = textwrap.dedent("""
    suppressMessages(library(lme4))
    data(InstEval, package = "lme4")
    reps <- as.integer(commandArgs(trailingOnly = TRUE)[1])
    times <- numeric(0)
    for (i in seq_len(reps + 1)) {
      t <- system.time(fit <- lmer(FORMULA, data = InstEval, REML = TRUE))[["elapsed"]]
      times <- c(times, t)
    }
    si <- sessionInfo()
    cat(sprintf(paste0('{"first": %.6f, "times": [%s], "llf": %.17g, "lme4": "%s", "R": "%s", "blas": "%s", ',
                       '"feval": %d, "fe": [%s], "vcov": [%s]}\\n'),
        times[1], paste(sprintf("%.6f", times[-1]), collapse = ", "), as.numeric(logLik(fit)),
        as.character(packageVersion("lme4")), paste(R.version$major, R.version$minor, sep = "."),
        si$BLAS, as.integer(fit@optinfo$feval), paste(sprintf("%.17g", fixef(fit)), collapse = ", "),
        paste(sprintf("%.17g", as.data.frame(VarCorr(fit))$vcov), collapse = ", ")))
""").replace("FORMULA", FORMULA)


def _mixedjax(repeats: int) -> dict:
    """Run in a fresh process: first fit (compile included) and repeats."""
    t0 = time.perf_counter()
    import jax
    import jax.numpy as jnp

    import mixedjax

    jnp.zeros(1).block_until_ready()  # initialise the backend
    t_import = time.perf_counter() - t0
    data = mixedjax.datasets.load("insteval")
    compile_s = {"trace": 0.0, "lower": 0.0, "xla": 0.0}  # JAX's own timings of the first fit's compilations
    events = {"/jax/core/compile/jaxpr_trace_duration": "trace",
              "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
              "/jax/core/compile/backend_compile_duration": "xla"}

    def listener(event: str, secs: float, **kwargs) -> None:
        if event in events:
            compile_s[events[event]] += secs

    jax.monitoring.register_event_duration_secs_listener(listener)
    t = time.perf_counter()
    res = mixedjax.lmer(FORMULA, data)
    first = time.perf_counter() - t
    jax.monitoring.unregister_event_duration_listener(listener)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mixedjax.lmer(FORMULA, data)
        times.append(time.perf_counter() - t)
    return {"first": first, "times": times, "llf": res.llf, "converged": res.converged,
            "iterations": res.optim.iterations, "polish": res.optim.polish_iterations,
            "evaluations": res.optim.evaluations, "import_s": t_import, "jax": jax.__version__,
            "compile_s": compile_s, "fe": res.fe_params.tolist(), "vcov": res.varcorr().vcov.tolist()}


def _precision(fit: dict, ref: dict) -> str:
    """Distance of a fit from the polished lme4 reference: logLik (absolute), fixed effects and variances
    (relative; refcheck.py's measures)."""
    fe_ref = np.array(ref["fixed_effects"]["estimate"])
    v_ref = np.array([t["variances"][0] for t in ref["random_effects"]] + [ref["residual_variance"]])
    fe = np.abs(np.array(fit["fe"]) - fe_ref) / np.maximum(np.abs(fe_ref), 1e-6 * np.abs(fe_ref).max())
    var = np.abs(np.array(fit["vcov"]) - v_ref) / v_ref
    return f"logLik {abs(fit['llf'] - ref['logLik']):.1e}, fixed effects {fe.max():.1e}, variances {var.max():.1e}"


def _lme4(repeats: int) -> dict | None:
    if shutil.which("Rscript") is None:
        return {"skipped": "Rscript not found (install r-cran-lme4)"}
    proc = subprocess.run(["Rscript", "-e", R_SCRIPT, str(repeats)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"skipped": f"Rscript failed: {proc.stderr.strip()[-300:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-lme4", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_mixedjax(args.repeats)))
        return
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="mixedjax-insteval-cache-") as cache_dir:
        # cold: an empty compilation cache; warm: a second fresh process finds the first one's programs
        env = {**os.environ, "MIXEDJAX_CACHE_DIR": cache_dir}
        runs = [json.loads(subprocess.run([sys.executable, __file__, "--child", "--repeats", str(args.repeats)],
                                          capture_output=True, text=True, check=True, env=env
                                          ).stdout.strip().splitlines()[-1]) for _ in range(2)]
    cold, mj = runs
    r = {"skipped": "--skip-lme4"} if args.skip_lme4 else _lme4(args.repeats)
    load1 = os.getloadavg()[0]

    print(f"Date: {datetime.date.today()}  ")
    print(f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"load average {load0:.1f} before, {load1:.1f} after  ")
    print(f"Python {platform.python_version()}, jax {mj['jax']}; `import jax, mixedjax` {mj['import_s']:.2f} s  ")
    print(f"Model: `{FORMULA}`, REML, 73,421 rows  ")
    print()
    print("| engine | first fit (s) | repeat, median (s) | logLik | notes |")
    print("|---|---:|---:|---:|---|")
    print(f"| mixedjax `lmer`, cold compilation cache | {cold['first']:.2f} | "
          f"{statistics.median(cold['times']):.2f} | {cold['llf']:.6f} | first fit in a fresh process with an "
          "empty compilation cache: tracing and XLA compilation included |")
    print(f"| mixedjax `lmer`, warm compilation cache | {mj['first']:.2f} | {statistics.median(mj['times']):.2f} | "
          f"{mj['llf']:.6f} | a second fresh process (compiled programs from the first, tracing included); "
          f"{mj['evaluations']} deviance evaluations (derivative-free: {mj['iterations']} search steps, "
          f"{mj['polish']} polish batches); converged {mj['converged']} |")
    if "skipped" in r:
        print(f"| lme4 | — | — | — | skipped: {r['skipped']} |")
    else:
        print(f"| lme4 {r['lme4']} (R {r['R']}) | {r['first']:.2f} | {statistics.median(r['times']):.2f} | "
              f"{r['llf']:.6f} | default lmerControl; {r['feval']} deviance evaluations; BLAS {r['blas']} |")
        print()
        print(f"Ratio lme4 / mixedjax: first fit {r['first'] / cold['first']:.2f}x (cold cache), "
              f"{r['first'] / mj['first']:.2f}x (warm cache); "
              f"repeat {statistics.median(r['times']) / statistics.median(mj['times']):.2f}x.")
    if REFERENCE.exists():
        ref = json.loads(REFERENCE.read_text())["results"]["lme4"]
        print()
        print(f"Distance from the polished lme4 reference ({REFERENCE.name}): mixedjax {_precision(mj, ref)}"
              + ("" if "skipped" in r else f"; lme4 with default settings {_precision(r, ref)}") + ".")
    c = cold["compile_s"]
    print()
    print(f"mixedjax first fit, cold cache: tracing {c['trace']:.2f} s, lowering {c['lower']:.2f} s, XLA compilation "
          f"{c['xla']:.2f} s (JAX's compile events); the rest is host setup and the evaluations, as in the repeat.")


if __name__ == "__main__":
    main()
