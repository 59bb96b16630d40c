"""A 1000-replicate parametric bootstrap in mixedjax against 50 statsmodels fits, side by side.

Usage::

    python benchmarks/bootstrap.py [--n-boot 1000] [--n-statsmodels 50]

Model: sleepstudy ``Reaction ~ Days``, correlated random intercept and slope by
``Subject``, REML.  Timed in one process, after JAX's backend is initialised:

* **mixedjax bootstrap, first call**: ``result.bootstrap(n=1000, seed=1)`` —
  simulation and all 1000 refits in one jitted, vmapped call, tracing and XLA
  compilation included;
* **mixedjax bootstrap, repeat**: ``result.bootstrap(n=1000, seed=2)`` (compiled
  program reused: a new seed, or a new model of the same padded shape);
* the same two with ``fast_compile=False`` (XLA's full backend optimisation; the
  default compiles at optimisation level 0);
* **statsmodels**: ``smf.mixedlm(...).fit(reml=True)`` on the first 50 of the
  simulated responses of the first call (the same data), one after another, with the
  number of fits that warned or did not converge, and how far their REML
  log-likelihoods are from mixedjax's fits to the same data.

Prints a markdown table and the machine information.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
import warnings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--n-statsmodels", type=int, default=50)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import statsmodels
    import statsmodels.formula.api as smf

    import mixedjax

    jnp.zeros(1).block_until_ready()
    data = mixedjax.datasets.load("sleepstudy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mixedjax.mixedlm("Reaction ~ Days", data, groups="Subject", re_formula="~Days").fit()

    t0 = time.perf_counter()
    boot = res.bootstrap(n=args.n_boot, seed=1)
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    boot2 = res.bootstrap(n=args.n_boot, seed=2)
    t_repeat = time.perf_counter() - t0
    # the same with XLA's full backend optimisation (fast_compile=False): slower to compile, faster to run
    t0 = time.perf_counter()
    res.bootstrap(n=args.n_boot, seed=1, fast_compile=False)
    t_first_opt = time.perf_counter() - t0
    t0 = time.perf_counter()
    res.bootstrap(n=args.n_boot, seed=2, fast_compile=False)
    t_repeat_opt = time.perf_counter() - t0

    ys = res.simulate(args.n_boot, seed=1)  # the first call's draws
    n_sm = args.n_statsmodels
    warned = not_conv = 0
    gaps = []
    t0 = time.perf_counter()
    for k in range(n_sm):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            r = smf.mixedlm("Reaction ~ Days", data.assign(Reaction=ys[:, k]), groups="Subject",
                            re_formula="~Days").fit(reml=True)
        warned += any("converge" in str(x.message).lower() or "boundary" in str(x.message).lower() for x in w)
        not_conv += not r.converged
        gaps.append(boot.replicates["llf"].iloc[k] - r.llf)
    t_sm = time.perf_counter() - t0
    gaps = np.array(gaps)

    print(f"Date: {datetime.date.today()}  ")
    print(f"Machine: {platform.platform()}, {platform.processor() or 'cpu'}, {jax.device_count()} device(s) "
          f"({jax.default_backend()}), {__import__('os').cpu_count()} CPUs  ")
    print(f"Python {platform.python_version()}, jax {jax.__version__}, statsmodels {statsmodels.__version__}  ")
    print("sleepstudy `Reaction ~ Days`, `re_formula=\"~Days\"`, REML\n")
    print("| | replicates | time (s) | per fit (ms) |")
    print("|---|---:|---:|---:|")
    print(f"| mixedjax `bootstrap`, first call (incl. compile) | {args.n_boot} | {t_first:.2f} | "
          f"{1000 * t_first / args.n_boot:.2f} |")
    print(f"| mixedjax `bootstrap`, repeat (compiled) | {args.n_boot} | {t_repeat:.2f} | "
          f"{1000 * t_repeat / args.n_boot:.2f} |")
    print(f"| mixedjax `bootstrap(fast_compile=False)`, first call | {args.n_boot} | {t_first_opt:.2f} | "
          f"{1000 * t_first_opt / args.n_boot:.2f} |")
    print(f"| mixedjax `bootstrap(fast_compile=False)`, repeat | {args.n_boot} | {t_repeat_opt:.2f} | "
          f"{1000 * t_repeat_opt / args.n_boot:.2f} |")
    print(f"| statsmodels `fit()` in a loop | {n_sm} | {t_sm:.2f} | {1000 * t_sm / n_sm:.1f} |")
    print()
    print(f"mixedjax: {boot.n_failed} + {boot2.n_failed} of {2 * args.n_boot} refits not converged.  ")
    print(f"statsmodels on the same first {n_sm} responses: {warned} warned, {not_conv} not converged; "
          f"mixedjax llf minus statsmodels llf: median {np.median(gaps):.2e}, max {gaps.max():.3g}, "
          f"min {gaps.min():.2e}.")
    ci = boot.conf_int()
    print(f"\n{args.n_boot}-replicate percentile intervals (seed 1):\n")
    print("| parameter | 2.5 % | 97.5 % |\n|---|---:|---:|")
    for name, (lo, hi) in zip(ci.index, ci.to_numpy(), strict=True):
        print(f"| {name} | {lo:.4g} | {hi:.4g} |")


if __name__ == "__main__":
    main()
