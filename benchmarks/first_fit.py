"""The everyday first fit: a whole Python process that fits small models, mixedjax against statsmodels.

Usage::

    python benchmarks/first_fit.py                 # --repeats 3
    python benchmarks/first_fit.py --show-scripts  # print the four scripts and exit

Two scripts, each written once for mixedjax and once for statsmodels (REML, statsmodels' syntax), and
run as ``python script.py`` in a FRESH process; the wall time of the whole process is measured from
outside (interpreter start, imports, loading the data, the fits, printing, exit):

* **seed**: the seed example, load dietox, ``mixedlm("Weight ~ Time", data, groups=data["Pig"]).fit()``
  and print the summary;
* **eight models**, fitted one after another: sleepstudy ``Reaction ~ Days`` (groups ``Subject``), the
  same with ``re_formula="~Days"``; dietox ``Weight ~ Time`` (``Pig``, ``re_formula="~Time"``);
  Dyestuff ``Yield ~ 1`` (``Batch``); Pastes ``strength ~ 1`` (``batch``,
  ``vc_formula={"cask": "0 + C(cask)"}``); Orthodont ``distance ~ age + Sex`` (``Subject``);
  Orthodont ``distance ~ age * Sex`` (``Subject``, ``re_formula="~age"``); Oxboys ``height ~ age``
  (``Subject``, ``re_formula="~age"``); each prints its log-likelihood.

mixedjax's scripts load the data with ``mixedjax.datasets.load``; statsmodels' scripts read the same
CSV files (``mixedjax/datasets/*.csv``) with ``pandas.read_csv``, not through mixedjax.

* **mixedjax, cold cache**: one process with a new, empty compilation cache directory
  (``MIXEDJAX_CACHE_DIR``): every program is traced and compiled, and written to the cache;
* **mixedjax, warm cache**: ``--repeats`` more processes on the same directory (what a user sees
  the second time a script runs); the median;
* **statsmodels**: one first run (reported), then ``--repeats`` runs; the median.

The warm mixedjax and statsmodels runs alternate, so both see the same load.  Each script also reports,
from inside, the seconds spent in its imports and in the rest (data, fits, printing), and its peak RSS.
The target (issue 11): warm mixedjax no slower than statsmodels for both scripts.  Prints markdown.
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

import machine

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT / "mixedjax" / "datasets"
MARK = "@@RESULT@@ "

# (label, data set, formula, groups, extra keyword arguments as source text)
EIGHT = [
    ("sleepstudy, intercept", "sleepstudy", "Reaction ~ Days", "Subject", ""),
    ("sleepstudy, slope", "sleepstudy", "Reaction ~ Days", "Subject", ', re_formula="~Days"'),
    ("dietox, slope", "dietox", "Weight ~ Time", "Pig", ', re_formula="~Time"'),
    ("Dyestuff", "dyestuff", "Yield ~ 1", "Batch", ""),
    ("Pastes, nested", "pastes", "strength ~ 1", "batch", ', vc_formula={"cask": "0 + C(cask)"}'),
    ("Orthodont, intercept", "orthodont", "distance ~ age + Sex", "Subject", ""),
    ("Orthodont, slope", "orthodont", "distance ~ age * Sex", "Subject", ', re_formula="~age"'),
    ("Oxboys, slope", "oxboys", "height ~ age", "Subject", ', re_formula="~age"'),
]
CSV = {"sleepstudy": "sleepstudy.csv", "dietox": "dietox.csv", "dyestuff": "Dyestuff.csv",
       "pastes": "Pastes.csv", "orthodont": "Orthodont.csv", "oxboys": "Oxboys.csv"}

PROLOGUE = "import time as _time\n_T0 = _time.perf_counter()\n"
AFTER_IMPORTS = "_T1 = _time.perf_counter()\n"
EPILOGUE = textwrap.dedent("""
    import json as _json
    _T2 = _time.perf_counter()
    _hwm = [int(_l.split()[1]) / 1024 for _l in open("/proc/self/status") if _l.startswith("VmHWM:")]
    print("@@RESULT@@ " + _json.dumps({"import_s": _T1 - _T0, "rest_s": _T2 - _T1, "hwm_mib": _hwm[0],
                                       "llf": [float(_f.llf) for _f in _fits],
                                       "converged": [bool(_f.converged) for _f in _fits]}))
""")


def scripts() -> dict[tuple[str, str], str]:
    """The four scripts: {(script, engine): source}; the user's code between the timing lines."""
    seed_mj = textwrap.dedent("""
        import mixedjax
        {after}
        data = mixedjax.datasets.load("dietox")
        md = mixedjax.mixedlm("Weight ~ Time", data, groups=data["Pig"])
        mdf = md.fit()
        print(mdf.summary())
        _fits = [mdf]
    """)
    seed_sm = textwrap.dedent(f"""
        import pandas as pd
        import statsmodels.formula.api as smf
        {{after}}
        data = pd.read_csv({str(DATASETS / CSV["dietox"])!r})
        md = smf.mixedlm("Weight ~ Time", data, groups=data["Pig"])
        mdf = md.fit()
        print(mdf.summary())
        _fits = [mdf]
    """)
    used = sorted({d for _, d, *_ in EIGHT}, key=[d for _, d, *_ in EIGHT].index)
    eight_mj = ["import mixedjax", "{after}"]
    eight_mj += [f"{d} = mixedjax.datasets.load({d!r})" for d in used]
    eight_sm = ["import pandas as pd", "import statsmodels.formula.api as smf", "{after}"]
    eight_sm += [f"{d} = pd.read_csv({str(DATASETS / CSV[d])!r})" for d in used]
    for lib, lines in (("mixedjax", eight_mj), ("smf", eight_sm)):
        lines.append("_fits = []")
        for label, d, formula, groups, extra in EIGHT:
            lines.append(f"_fits.append({lib}.mixedlm({formula!r}, {d}, groups={groups!r}{extra}).fit(reml=True))")
            lines.append(f"print({label!r}, _fits[-1].llf)")
    out = {("seed", "mixedjax"): seed_mj, ("seed", "statsmodels"): seed_sm,
           ("eight", "mixedjax"): "\n".join(eight_mj) + "\n", ("eight", "statsmodels"): "\n".join(eight_sm) + "\n"}
    return {k: PROLOGUE + v.lstrip("\n").replace("{after}", AFTER_IMPORTS.strip()) + EPILOGUE for k, v in out.items()}


def run_script(path: Path, env: dict, timeout: float) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - t0
    line = [ln for ln in p.stdout.splitlines() if ln.startswith(MARK)]
    if p.returncode != 0 or not line:
        sys.stderr.write(p.stdout[-2000:] + p.stderr[-4000:])
        raise RuntimeError(f"{path.name} failed with exit status {p.returncode}")
    res = json.loads(line[-1][len(MARK):])
    res["wall_s"] = wall
    res["stderr_lines"] = len([ln for ln in p.stderr.splitlines() if ln.strip()])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="warm mixedjax and statsmodels runs (median)")
    ap.add_argument("--scripts", default="seed,eight", help="which scripts: seed, eight or both")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed for one process")
    ap.add_argument("--show-scripts", action="store_true", help="print the scripts and exit")
    args = ap.parse_args()
    src = scripts()
    if args.show_scripts:
        for (name, engine), text in src.items():
            print(f"# ---- {name}, {engine}\n{text}")
        return

    which = [s.strip() for s in args.scripts.split(",") if s.strip()]
    started, load0 = datetime.datetime.now(), machine.load()
    tmp = Path(tempfile.mkdtemp(prefix="mixedjax-first-fit-"))
    env = {k: v for k, v in os.environ.items() if k != "MIXEDJAX_CACHE"}
    res: dict = {}
    try:
        for name in which:
            paths = {}
            for engine in ("mixedjax", "statsmodels"):
                paths[engine] = tmp / f"{name}_{engine}.py"
                paths[engine].write_text(src[(name, engine)])
            cache = tmp / f"cache_{name}"
            cache.mkdir()
            mj_env = dict(env, MIXEDJAX_CACHE_DIR=str(cache))
            r = res[name] = {"warm": [], "sm": [], "loads": []}
            print(f"[{name}] mixedjax, cold cache", file=sys.stderr, flush=True)
            r["loads"].append(machine.load())
            r["cold"] = run_script(paths["mixedjax"], mj_env, args.timeout)
            files = [p for p in cache.rglob("*") if p.is_file()]
            r["cache_files"], r["cache_mib"] = len(files), sum(p.stat().st_size for p in files) / 2**20
            print(f"[{name}] statsmodels, first run", file=sys.stderr, flush=True)
            r["sm_first"] = run_script(paths["statsmodels"], env, args.timeout)
            for i in range(args.repeats):
                print(f"[{name}] mixedjax warm / statsmodels, run {i + 1} of {args.repeats}", file=sys.stderr,
                      flush=True)
                r["loads"].append(machine.load())
                r["warm"].append(run_script(paths["mixedjax"], mj_env, args.timeout))
                r["sm"].append(run_script(paths["statsmodels"], env, args.timeout))
            r["loads"].append(machine.load())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    lines = [f"Date: {started:%Y-%m-%d %H:%M}  ",
             f"Machine: {platform.platform()}, {machine.cpu_model()}, {os.cpu_count()} CPUs; 1-min load average "
             f"{load0:.2f} at the start, {machine.load():.2f} at the end  ",
             f"Python {platform.python_version()}, jax {machine.version('jax')}, jaxlib "
             f"{machine.version('jaxlib')}, mixedjax {machine.version('mixedjax')}, statsmodels "
             f"{machine.version('statsmodels')}, pandas {machine.version('pandas')}, numpy "
             f"{machine.version('numpy')}  ",
             f"Wall seconds of a whole `python script.py` process (imports included); warm and statsmodels: median "
             f"of {args.repeats} runs, alternating.  ", "",
             "| script | mixedjax, cold cache (s) | mixedjax, warm cache (s) | statsmodels, first run (s) | "
             "statsmodels (s) | statsmodels / mixedjax warm | target: warm mixedjax no slower |",
             "|---|---:|---:|---:|---:|---:|---|"]
    label = {"seed": "seed example (dietox, fit, summary)", "eight": "eight models, one after another"}
    for name, r in res.items():
        warm = statistics.median(x["wall_s"] for x in r["warm"]) if r["warm"] else float("nan")
        sm = statistics.median(x["wall_s"] for x in r["sm"]) if r["sm"] else float("nan")
        met = "met" if warm <= sm else "NOT met"
        lines.append(f"| {label[name]} | {r['cold']['wall_s']:.2f} | {warm:.2f} | {r['sm_first']['wall_s']:.2f} | "
                     f"{sm:.2f} | {sm / warm:.2f}x | {met} |")
    lines += ["", "Inside the processes (medians; imports = the script's import lines, rest = data, fits, printing; "
              "peak RSS = VmHWM):", "",
              "| script | run | imports (s) | rest (s) | whole process (s) | peak RSS (MiB) | lines on stderr |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in res.items():
        for run, xs in (("mixedjax, cold cache", [r["cold"]]), ("mixedjax, warm cache", r["warm"]),
                        ("statsmodels, first run", [r["sm_first"]]), ("statsmodels", r["sm"])):
            if not xs:
                continue
            med = {k: statistics.median(x[k] for x in xs) for k in ("import_s", "rest_s", "wall_s", "hwm_mib")}
            lines.append(f"| {name} | {run} | {med['import_s']:.2f} | {med['rest_s']:.2f} | {med['wall_s']:.2f} | "
                         f"{med['hwm_mib']:.0f} | {max(x['stderr_lines'] for x in xs)} |")
    lines.append("")
    for name, r in res.items():
        lines.append(f"{name}: the cold mixedjax process left {r['cache_files']} files ({r['cache_mib']:.1f} MiB) "
                     f"in its cache directory; 1-min load average before each pair of runs: "
                     + ", ".join(f"{x:.1f}" for x in r["loads"]) + ".  ")
    if "eight" in res:
        r = res["eight"]
        mj, sm = r["warm"][0] if r["warm"] else r["cold"], r["sm"][0] if r["sm"] else r["sm_first"]
        lines += ["", "Log-likelihoods (REML) of the eight fits:", "",
                  "| model | mixedjax | converged | statsmodels | converged | mixedjax − statsmodels |",
                  "|---|---:|---|---:|---|---:|"]
        for (lab, *_), a, ca, b, cb in zip(EIGHT, mj["llf"], mj["converged"], sm["llf"], sm["converged"],
                                           strict=True):
            lines.append(f"| {lab} | {a:.6f} | {ca} | {b:.6f} | {cb} | {a - b:.2e} |")
    if "seed" in res:
        r = res["seed"]
        lines += ["", f"Seed example logLik: mixedjax {r['cold']['llf'][0]:.6f}, statsmodels "
                      f"{r['sm_first']['llf'][0]:.6f}."]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
