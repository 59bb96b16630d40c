"""Cost of one deviance evaluation against the number of rows, at a fixed number of groups (iid residuals).

Usage::

    python benchmarks/eval_cost.py                        # --rows 1e4,1e5,1e6,1e7 --groups 1000
    python benchmarks/eval_cost.py --rows 1e4,1e5 --calls 500

Data (fixed seed): ``--groups`` groups, each row assigned to a uniformly random group (rows in random
order, about rows/groups per group), ``x1, x2, x3`` standard normal,
``y = 1 + 0.5 x1 - 0.3 x2 + 0.2 x3 + b0_g + b1_g x1 + e`` (sd(b0) = 1, sd(b1) = 0.5, corr 0.3, sd(e) = 1).
Model: ``mixedjax.mixedlm("y ~ x1 + x2 + x3", df, groups="g", re_formula="~x1")``, REML.

Each number of rows runs in a FRESH process, one at a time (the 1e7-row process holds the data frame, the
padded groups and the design, a few GiB).  In it:

* **construction**: ``mixedjax.mixedlm(...)`` (formula, design, grouping and the one pass over the rows
  that forms the per-group cross-products; the rows are not padded: an iid model lays them out only
  for features that need them), timed alone;
* **fit**: ``.fit()`` (compile included; the processes run with ``MIXEDJAX_CACHE=0``, no persistent
  compilation cache, unless ``--keep-cache``), which gives the fitted θ;
* **cross-products pass**: the per-group cross-products from the rows
  (``mixedjax.data.row_cross_products``, bincounts), median of a few calls: the only part of a model
  whose cost grows with the rows, paid once per model;
* **deviance evaluation**: ``mixedjax.backends.deviance(model.backend, θ, model.backend_data, reml)``
  (the profiled REML deviance every fit minimises) under ``jax.jit``, at the fitted θ;
* **deviance + gradient**: ``mixedjax.likelihood.deviance_and_grad(θ, cp, structure, reml)`` under
  ``jax.jit``, the call the BFGS optimiser makes per iteration (closed-form gradient).

The two evaluations are the median (and minimum) of ``--calls`` calls after ``--warmup`` calls, each
call blocked on its result, so a call's dispatch (tens of microseconds) is included.  They work on the
(groups x q x q) cross-products only, so their cost should not depend on the rows.  The deviance at the
fitted θ is checked against the fit's.  Prints the machine information, the load average and a markdown
table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import machine

FORMULA = "y ~ x1 + x2 + x3"
RE_FORMULA = "~x1"
SEED = 20261127
MARK = "@@RESULT@@ "


def simulate(n_rows: int, n_groups: int, seed: int):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng([seed, n_rows, n_groups])
    g = rng.integers(0, n_groups, n_rows).astype(np.int32)
    x = rng.standard_normal((3, n_rows))
    sd0, sd1, rho = 1.0, 0.5, 0.3
    chol = np.linalg.cholesky(np.array([[sd0**2, rho * sd0 * sd1], [rho * sd0 * sd1, sd1**2]]))
    b = rng.standard_normal((n_groups, 2)) @ chol.T
    y = 1.0 + 0.5 * x[0] - 0.3 * x[1] + 0.2 * x[2] + b[g, 0] + b[g, 1] * x[0] + rng.standard_normal(n_rows)
    return pd.DataFrame({"y": y, "x1": x[0], "x2": x[1], "x3": x[2], "g": g})


def _time_calls(fn, calls: int, warmup: int) -> tuple[float, float]:
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn())
    ts = []
    for _ in range(calls):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), min(ts)


def child(n_rows: int, n_groups: int, calls: int, warmup: int, seed: int) -> dict:
    t0 = time.perf_counter()
    import jax
    import jax.numpy as jnp

    import mixedjax
    from mixedjax import backends, likelihood
    from mixedjax.data import row_cross_products

    jnp.zeros(1).block_until_ready()
    out: dict = {"import_s": time.perf_counter() - t0, "jax": jax.__version__, "backend": jax.default_backend()}
    t0 = time.perf_counter()
    df = simulate(n_rows, n_groups, seed)
    out["simulate_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    md = mixedjax.mixedlm(FORMULA, df, groups="g", re_formula=RE_FORMULA)
    out["construct_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = md.fit()
    out["fit_s"] = time.perf_counter() - t0
    out["converged"], out["llf"] = bool(res.converged), float(res.llf)
    out["evaluations"] = int(res.optim.evaluations)
    reml = bool(getattr(md, "reml", True))
    backend, data = md.backend, md.backend_data
    theta = jnp.asarray(res.optim.theta)
    g_pad = int(data.cp.n.shape[0])
    out["padded_shape"] = [g_pad, int(md.group_index.n_max)]
    out["cp_pass_s"], _ = _time_calls(lambda: row_cross_products(md.group_index.codes, md.endog, md.exog, md.exog_re,
                                                                 None, g_pad), max(3, min(20, calls // 10)), 1)

    dev_jit = jax.jit(backends.deviance, static_argnames=("backend", "reml"))
    out["dev_median_s"], out["dev_min_s"] = _time_calls(lambda: dev_jit(backend, theta, data, reml), calls, warmup)
    out["dev_at_fit"] = float(dev_jit(backend, theta, data, reml))
    out["dev_fit_reported"] = float(res.optim.deviance)

    cp, structure = getattr(data, "cp", None), getattr(backend, "structure", None)
    if cp is not None and structure is not None:
        dg_jit = jax.jit(likelihood.deviance_and_grad, static_argnames=("structure", "reml"))
        out["dg_median_s"], out["dg_min_s"] = _time_calls(lambda: dg_jit(theta, cp, structure, reml), calls, warmup)
        out["cp_shapes"] = {k: list(v.shape) for k, v in cp._asdict().items() if hasattr(v, "shape")}
    out["hwm_mib"] = machine.hwm_mib()
    return out


def _us(s: float | None) -> str:
    return "—" if s is None else f"{1e6 * s:,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1e4,1e5,1e6,1e7", help="numbers of rows, comma-separated")
    ap.add_argument("--groups", type=int, default=1000)
    ap.add_argument("--calls", type=int, default=200, help="timed evaluations per rung (median)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds allowed for one rung's process")
    ap.add_argument("--keep-cache", action="store_true",
                    help="leave mixedjax's persistent compilation cache as configured (default: off, MIXEDJAX_CACHE=0)")
    ap.add_argument("--_child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child is not None:
        print(MARK + json.dumps(child(args._child, args.groups, args.calls, args.warmup, args.seed)), flush=True)
        return

    rows = [int(float(s)) for s in args.rows.split(",") if s.strip()]
    started, load0 = datetime.datetime.now(), machine.load()
    results = []
    for n in rows:
        print(f"[{n:,} rows] ...", file=sys.stderr, flush=True)
        load = machine.load()
        cmd = [sys.executable, os.path.abspath(__file__), "--_child", str(n), "--groups", str(args.groups),
               "--calls", str(args.calls), "--warmup", str(args.warmup), "--seed", str(args.seed)]
        env = dict(os.environ) if args.keep_cache else dict(os.environ, MIXEDJAX_CACHE="0")
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith(MARK)]
        if p.returncode != 0 or not line:
            sys.stderr.write(p.stdout[-2000:] + p.stderr[-4000:])
            results.append({"n_rows": n, "failed": f"exit status {p.returncode}", "load": load})
            continue
        r = json.loads(line[-1][len(MARK):])
        r["n_rows"], r["load"] = n, load
        results.append(r)
        print(f"  ... construction {r['construct_s']:.2f} s, fit {r['fit_s']:.2f} s, deviance "
              f"{_us(r['dev_median_s'])} us", file=sys.stderr, flush=True)

    ok = [r for r in results if "failed" not in r]
    lines = [f"Date: {started:%Y-%m-%d %H:%M}  ",
             f"Machine: {platform.platform()}, {machine.cpu_model()}, {os.cpu_count()} CPUs; 1-min load average "
             f"{load0:.2f} at the start, {machine.load():.2f} at the end  ",
             f"Python {platform.python_version()}, jax {machine.version('jax')}, "
             f"jaxlib {machine.version('jaxlib')}, numpy {machine.version('numpy')}"
             + (f"; JAX backend {ok[0]['backend']}" if ok else "") + "  ",
             f"Model: `{FORMULA}`, `re_formula=\"{RE_FORMULA}\"`, groups `g` ({args.groups:,} groups), REML, iid "
             f"residuals; seed {args.seed}; each row count in a fresh process"
             + ("" if args.keep_cache else " without the persistent compilation cache") + ".  ",
             f"Evaluations: median (min) of {args.calls} jitted calls at the fitted θ after {args.warmup} warm-up "
             "calls, dispatch included.  ", "",
             "| rows | groups (padded x largest) | construction (s) | fit, compile incl. (s) | cross-products pass "
             "(ms) | deviance evaluation (µs) | deviance + gradient (µs) | peak RSS (MiB) | notes |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if "failed" in r:
            lines.append(f"| {r['n_rows']:,} | — | — | — | — | — | — | — | failed: {r['failed']} |")
            continue
        shape = " x ".join(f"{v:,}" for v in r["padded_shape"]) if r.get("padded_shape") else "—"
        cp = f"{1e3 * r['cp_pass_s']:,.1f}" if "cp_pass_s" in r else "—"
        dg = f"{_us(r.get('dg_median_s'))} ({_us(r.get('dg_min_s'))})" if "dg_median_s" in r else "—"
        dev_diff = abs(r["dev_at_fit"] - r["dev_fit_reported"])
        lines.append(f"| {r['n_rows']:,} | {shape} | {r['construct_s']:.2f} | {r['fit_s']:.2f} | {cp} | "
                     f"{_us(r['dev_median_s'])} ({_us(r['dev_min_s'])}) | {dg} | {r['hwm_mib']:,.0f} | "
                     f"converged {r['converged']}, {r['evaluations']} evaluations; deviance at θ̂ − fit's "
                     f"{dev_diff:.1e}; load avg {r['load']:.1f} |")
    if len(ok) >= 2:
        a, b = ok[0], ok[-1]
        lines += ["", f"From {a['n_rows']:,} to {b['n_rows']:,} rows ({b['n_rows'] / a['n_rows']:,.0f}x): one "
                  f"deviance evaluation {b['dev_median_s'] / a['dev_median_s']:.2f}x"
                  + (f", deviance + gradient {b['dg_median_s'] / a['dg_median_s']:.2f}x"
                     if "dg_median_s" in a and "dg_median_s" in b else "")
                  + f"; construction {b['construct_s'] / a['construct_s']:.1f}x"
                  + (f", the cross-products pass {b['cp_pass_s'] / a['cp_pass_s']:.1f}x"
                     if "cp_pass_s" in a and "cp_pass_s" in b else "") + "."]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
