"""Fit every simulated data set with statsmodels MixedLM (default settings)
and compare its REML optimum with lme4's (not a test; a script).

Usage (from the repository root):
    .venv/bin/python tests/reference/statsmodels_sim_rs.py \
        > tests/reference/statsmodels_sim_rs.txt

Fit: smf.mixedlm("y ~ x", df, groups=df["g"], re_formula="~x").fit(reml=True)
Reference: tests/reference/sim_rs_lme4.json ("reml" entry, tight BOBYQA;
also "reml_best", the best over several lme4 optimisers/starts).

As a scale check, statsmodels' REML log-likelihood is also evaluated at
lme4's optimum (fixef, Lambda Lambda^T); it should equal lme4's logLik.
"""

import collections
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import statsmodels
import statsmodels.formula.api as smf
from statsmodels.regression.mixed_linear_model import MixedLMParams

TOL = 1e-6
HERE = Path(__file__).resolve().parent


def main() -> None:
    data = pd.read_csv(HERE / "sim_rs_data.csv.gz", dtype={"g": str})
    ref = json.loads((HERE / "sim_rs_lme4.json").read_text())
    ref = {d["dataset"]: d for d in ref["datasets"]}

    rows = []
    for i, df in data.groupby("dataset", sort=True):
        df = df.reset_index(drop=True)
        r = ref[i]["reml"]
        model = smf.mixedlm("y ~ x", df, groups=df["g"], re_formula="~x")
        with warnings.catch_warnings(record=True) as wl:
            warnings.simplefilter("always")
            try:
                res = model.fit(reml=True)
                llf, err = float(res.llf), None
                converged = bool(res.converged)
            except Exception as e:  # noqa: BLE001
                llf, err, converged = np.nan, f"{type(e).__name__}: {e}", False
        # statsmodels' REML loglike at lme4's optimum (scale check)
        t = r["theta"]
        lam = np.array([[t[0], 0.0], [t[1], t[2]]])
        p = MixedLMParams.from_components(np.asarray(r["fixef"]),
                                          cov_re=lam @ lam.T)
        # (only where lme4's Lambda is nonsingular: statsmodels needs
        # cov_re invertible)
        if min(abs(t[0]), abs(t[2])) > 1e-4:
            ll_at_lme4 = float(model.loglike(p, profile_fe=False))
        else:
            ll_at_lme4 = np.nan
        rows.append(dict(
            dataset=i, kind=ref[i]["kind"], lme4=r["logLik"], sm=llf,
            diff_best=llf - ref[i]["reml_best"]["logLik"],
            diff=llf - r["logLik"], scale_diff=ll_at_lme4 - r["logLik"],
            converged=converged, error=err,
            warnings=sorted({f"{w.category.__name__}: "
                             + re.sub(r"\d+\.\d+", "#",
                                      str(w.message).splitlines()[0])
                             for w in wl}),
        ))
    out = pd.DataFrame(rows)

    print(f"statsmodels {statsmodels.__version__}, numpy {np.__version__}, "
          f"pandas {pd.__version__}")
    print("fit: smf.mixedlm('y ~ x', df, groups=df['g'], re_formula='~x')"
          ".fit(reml=True)")
    print(f"data sets: {len(out)}")
    sd = out["scale_diff"].dropna()
    print(f"scale check, max |statsmodels REML loglike at lme4 optimum - "
          f"lme4 logLik|: {sd.abs().max():.3g} (over the {len(sd)} data sets "
          f"with nonsingular lme4 Lambda)")
    print(f"errors (exceptions): {out['error'].notna().sum()}")
    print(f"converged flag False: {(~out['converged']).sum()}")
    below = out[out["diff"] < -TOL]
    above = out[out["diff"] > TOL]
    print(f"below lme4 REML logLik by > {TOL:g}: {len(below)}")
    if len(below):
        w = below.loc[below["diff"].idxmin()]
        print(f"  worst: {w['diff']:.6g} (dataset {w['dataset']}, {w['kind']})")
        print("  by kind: " + ", ".join(
            f"{k}={v}" for k, v in below["kind"].value_counts().sort_index().items()))
        counts = [int((below["diff"] < -c).sum()) for c in (1e-3, 1e-2, 1e-1, 1.0)]
        print("  below by > 1e-3: {}, > 1e-2: {}, > 1e-1: {}, > 1: {}".format(*counts))
    print(f"above lme4 REML logLik by > {TOL:g}: {len(above)}"
          + (f" (max {above['diff'].max():.3g})" if len(above) else ""))
    bb = out[out["diff_best"] < -TOL]
    print(f"below lme4 reml_best logLik (multi-optimiser best) by > {TOL:g}: "
          f"{len(bb)} (worst {bb['diff_best'].min():.6g})")
    warned = out[out["warnings"].map(len) > 0]
    print(f"fits with warnings: {len(warned)}")
    cnt = collections.Counter(w for ws in out["warnings"] for w in ws)
    for msg, n in cnt.most_common():
        print(f"  {n:4d}  {msg}")
    print(f"warned and below by > {TOL:g}: "
          f"{((out['warnings'].map(len) > 0) & (out['diff'] < -TOL)).sum()}")
    print()
    print("per data set (diff = statsmodels llf - lme4 REML logLik):")
    with pd.option_context("display.max_rows", None, "display.width", 200):
        out2 = out[["dataset", "kind", "lme4", "sm", "diff", "converged"]].copy()
        out2["n_warn"] = out["warnings"].map(len)
        print(out2.to_string(index=False, float_format=lambda v: f"{v:.10g}"))


if __name__ == "__main__":
    main()
