"""Time one mixed-model fit: mixedjax (first call and repeat) against statsmodels.

Usage::

    python benchmarks/single_fit.py [--repeats 7]

For sleepstudy (``Reaction ~ Days``, random intercept and slope by ``Subject``) and
dietox (``Weight ~ Time``, random intercept and slope by ``Pig``), REML:

* **mixedjax first call**: ``mixedlm(...)`` + ``.fit()`` on the original data in a
  fresh Python process (JAX's backend already initialised), so tracing and XLA
  compilation are included;
* **mixedjax repeat**: in the same process, a *new* ``mixedlm(...)`` on new data of the
  same shape (the response plus small Gaussian noise, sd = 1% of the response's
  sd) and ``.fit()``; the median over ``--repeats`` such data sets.  The compiled fit
  is reused because the padded shapes are the same;
* **statsmodels**: ``smf.mixedlm(...).fit(reml=True)`` on the original data and on
  the same noisy data sets, median over all of them, with its warnings recorded.

Each data set is timed in its own subprocess so that its "first call" really is
the first.  The log-likelihoods (llf) are those of the fits to the original data.
Prints a markdown table with the machine information.
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
import warnings

import machine

CASES = {
    "sleepstudy": dict(formula="Reaction ~ Days", groups="Subject", re_formula="~Days"),
    "dietox": dict(formula="Weight ~ Time", groups="Pig", re_formula="~Time"),
}


def _one(name: str, repeats: int, seed: int = 0) -> dict:
    """Time one data set (run in a fresh process); returns a JSON-able dict."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import statsmodels.formula.api as smf

    import mixedjax

    jnp.zeros(1).block_until_ready()  # initialise the backend outside the timings
    case = CASES[name]
    data = mixedjax.datasets.load(name)
    y = case["formula"].split("~")[0].strip()
    rng = np.random.default_rng(seed)
    sd = float(data[y].std())
    noisy = []
    for _ in range(repeats):
        d = data.copy()
        d[y] = d[y] + rng.normal(scale=0.01 * sd, size=len(d))
        noisy.append(d)

    def fit_mj(d):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            r = mixedjax.mixedlm(case["formula"], d, groups=d[case["groups"]],
                                 re_formula=case["re_formula"]).fit(reml=True)
            t = time.perf_counter() - t0
        return t, r, w

    def fit_sm(d):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            r = smf.mixedlm(case["formula"], d, groups=d[case["groups"]],
                            re_formula=case["re_formula"]).fit(reml=True)
            t = time.perf_counter() - t0
        return t, r, w

    t_first, r_mj, w_mj = fit_mj(data)
    rep = [fit_mj(d) for d in noisy]
    sm0 = fit_sm(data)
    sm = [sm0] + [fit_sm(d) for d in noisy]

    def nwarn(ws):
        return sum(1 for x in ws if "onvergence" in type(x.message).__name__)

    return {
        "name": name,
        "nobs": int(r_mj.nobs),
        "ngroups": int(r_mj.ngroups),
        "mj_first_s": t_first,
        "mj_repeat_s": statistics.median(t for t, _, _ in rep),
        "mj_llf": float(r_mj.llf),
        "mj_converged": bool(r_mj.converged),
        "mj_repeat_not_converged": sum(not r.converged for _, r, _ in rep),
        "mj_warnings": nwarn(w_mj) + sum(nwarn(w) for _, _, w in rep),
        "sm_s": statistics.median(t for t, _, _ in sm),
        "sm_llf": float(sm0[1].llf),
        "sm_converged": bool(sm0[1].converged),
        "sm_not_converged": sum(not r.converged for _, r, _ in sm),
        "sm_warnings_first": nwarn(sm0[2]),
        "sm_n": len(sm),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7, help="noisy data sets per model (default 7)")
    ap.add_argument("--one", choices=sorted(CASES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_one(args.one, args.repeats)))
        return

    import statsmodels

    rows = []
    for name in CASES:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--repeats", str(args.repeats)],
                             check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))

    r0 = rows[0]
    print(f"Date: {datetime.date.today().isoformat()}  ")
    print(f"Machine: {platform.platform()}, {machine.cpu_model(fallback='unknown')}, {os.cpu_count()} CPUs  ")
    print(f"Python {platform.python_version()}, jax {r0['jax']} (backend {r0['backend']}, "
          f"{r0['device']}), statsmodels {statsmodels.__version__}  ")
    print(f"REML fits; repeat = median of {args.repeats} new models on noisy copies of the data; "
          f"statsmodels = median of {r0['sm_n']} fits (original + the same copies).")
    print()
    print("| data (nobs, groups) | model | mixedjax first call (s) | mixedjax repeat (s) | "
          "statsmodels (s) | mixedjax llf | statsmodels llf | notes |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        c = CASES[r["name"]]
        notes = []
        if r["sm_converged"] and not r["sm_not_converged"]:
            notes.append("statsmodels converged")
        else:
            notes.append(f"statsmodels did NOT converge on the original data "
                         f"({r['sm_warnings_first']} ConvergenceWarnings)" if not r["sm_converged"] else "")
            notes.append(f"statsmodels not converged on {r['sm_not_converged']}/{r['sm_n']} fits")
        if r["sm_warnings_first"] and r["sm_converged"]:
            notes.append(f"{r['sm_warnings_first']} statsmodels ConvergenceWarnings")
        if r["mj_converged"] and not r["mj_repeat_not_converged"]:
            notes.append("mixedjax converged on all fits")
        else:
            notes.append(f"mixedjax not converged: original {not r['mj_converged']}, "
                         f"repeats {r['mj_repeat_not_converged']}/{args.repeats}")
        if r["mj_warnings"]:
            notes.append(f"{r['mj_warnings']} mixedjax ConvergenceWarnings")
        model = f"`{c['formula']}`, `re_formula=\"{c['re_formula']}\"`, groups `{c['groups']}`"
        print(f"| {r['name']} ({r['nobs']}, {r['ngroups']}) | {model} | {r['mj_first_s']:.2f} | "
              f"{r['mj_repeat_s']:.3f} | {r['sm_s']:.3f} | {r['mj_llf']:.3f} | {r['sm_llf']:.3f} | "
              f"{'; '.join(n for n in notes if n)} |")


if __name__ == "__main__":
    main()
