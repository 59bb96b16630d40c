"""Simulate "sleepstudy-sized" random-slope data sets for the lme4 reference set.

120 data sets, each 18 groups ("0".."17") x 10 observations, x = 0..9 per group:

    y = 250 + 10 x + b0_g + b1_g x + e,   e ~ N(0, 25^2)

Kinds (dataset index ranges):
    0-79    regular : sd(b0) ~ U[10, 40], sd(b1) ~ U[3, 10], corr ~ U[-0.7, 0.7]
    80-99   slope0  : sd(b0) ~ U[10, 40], sd(b1) = 0 (true slope variance 0)
    100-109 corr+1  : sd(b0) ~ U[10, 40], sd(b1) ~ U[3, 10], corr = +1
    110-119 corr-1  : sd(b0) ~ U[10, 40], sd(b1) ~ U[3, 10], corr = -1

Deterministic: numpy.random.default_rng(20261125).
Writes sim_rs_data.csv.gz next to this script.

Usage: python tests/reference/make_sim_rs.py
"""

from pathlib import Path

import numpy as np
import pandas as pd

SEED = 20261125
N_GROUPS = 18
N_PER = 10
SIGMA = 25.0
BETA = (250.0, 10.0)


def kind_of(i: int) -> str:
    if i < 80:
        return "regular"
    if i < 100:
        return "slope0"
    if i < 110:
        return "corr+1"
    return "corr-1"


def simulate() -> pd.DataFrame:
    rng = np.random.default_rng(SEED)
    x1 = np.arange(N_PER, dtype=float)
    x = np.tile(x1, N_GROUPS)
    gidx = np.repeat(np.arange(N_GROUPS), N_PER)
    frames = []
    for i in range(120):
        kind = kind_of(i)
        sd0 = rng.uniform(10.0, 40.0)
        z0 = rng.standard_normal(N_GROUPS)
        if kind == "regular":
            sd1 = rng.uniform(3.0, 10.0)
            rho = rng.uniform(-0.7, 0.7)
            z1 = rng.standard_normal(N_GROUPS)
            b0 = sd0 * z0
            b1 = sd1 * (rho * z0 + np.sqrt(1.0 - rho * rho) * z1)
        elif kind == "slope0":
            b0 = sd0 * z0
            b1 = np.zeros(N_GROUPS)
        else:
            sd1 = rng.uniform(3.0, 10.0)
            sign = 1.0 if kind == "corr+1" else -1.0
            b0 = sd0 * z0
            b1 = sign * sd1 * z0
        e = rng.normal(0.0, SIGMA, size=N_GROUPS * N_PER)
        y = BETA[0] + BETA[1] * x + b0[gidx] + b1[gidx] * x + e
        frames.append(pd.DataFrame({
            "dataset": i,
            "g": gidx.astype(str),
            "x": x,
            "y": y,
            "kind": kind,
        }))
    return pd.concat(frames, ignore_index=True)


def main() -> None:
    df = simulate()
    out = Path(__file__).resolve().parent / "sim_rs_data.csv.gz"
    # mtime=0 keeps the gzip bytes deterministic
    df.to_csv(out, index=False, float_format="%.17g",
              compression={"method": "gzip", "mtime": 0})
    print(f"wrote {out} ({len(df)} rows, {df['dataset'].nunique()} data sets)")


if __name__ == "__main__":
    main()
