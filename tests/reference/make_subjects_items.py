"""Simulate the subjects x items data set for crossed models with correlated random slopes.

48 subjects (S01..S48) x 32 items (I01..I32); every subject sees every item once (1536 rows).
cond is -0.5 / +0.5, counterbalanced Latin-square style: subject s (0-based) and item i get
cond = +0.5 when (s + i) is even, else -0.5, so cond varies within every subject (16 + 16 items)
and within every item (24 + 24 subjects).

    y = 500 + 30 cond + u0_subj + u1_subj cond + w0_item + w1_item cond + e

    subject: sd(u0) = 40, sd(u1) = 15, corr(u0, u1) = 0.3
    item:    sd(w0) = 25, sd(w1) = 0   (true item slope variance 0: the maximal model is singular)
    e ~ N(0, 60^2)

With this seed lme4's REML (and ML) fit of y ~ cond + (1 + cond | subj) + (1 + cond | item) is
singular (isSingular() TRUE: the item covariance matrix is estimated with rank 1, correlation -1);
of seeds 1..8, seeds 1, 5 and 7 give singular fits; 7 was picked because its estimated item slope sd
is clearly non-zero (about 5, correlation -1; seed 1 has ~0.2, seed 5 has correlation +1).  See
tests/reference/README.md.  y is rounded to 2 decimals so that every CSV reader parses it to
the same double.

Deterministic: numpy.random.default_rng(SEED).  Writes tests/data/subjects_items.csv.

Usage (from the repository root): .venv/bin/python tests/reference/make_subjects_items.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SEED = 7
N_SUBJ, N_ITEM = 48, 32
BETA = (500.0, 30.0)
SUBJ_SD, SUBJ_CORR = (40.0, 15.0), 0.3
ITEM_SD, ITEM_CORR = (25.0, 0.0), 0.0
SIGMA = 60.0

OUT = Path(__file__).resolve().parents[1] / "data" / "subjects_items.csv"


def _chol(sd: tuple[float, float], corr: float) -> np.ndarray:
    """Lower Cholesky factor of the 2 x 2 covariance (valid for a zero sd or |corr| = 1, too)."""
    return np.array([[sd[0], 0.0], [sd[1] * corr, sd[1] * np.sqrt(1.0 - corr**2)]])


def simulate(seed: int = SEED) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((N_SUBJ, 2)) @ _chol(SUBJ_SD, SUBJ_CORR).T
    w = rng.standard_normal((N_ITEM, 2)) @ _chol(ITEM_SD, ITEM_CORR).T
    s = np.repeat(np.arange(N_SUBJ), N_ITEM)  # subject-major rows
    i = np.tile(np.arange(N_ITEM), N_SUBJ)
    cond = np.where((s + i) % 2 == 0, 0.5, -0.5)
    e = rng.normal(0.0, SIGMA, size=s.size)
    y = BETA[0] + BETA[1] * cond + u[s, 0] + u[s, 1] * cond + w[i, 0] + w[i, 1] * cond + e
    return {"s": s, "i": i, "cond": cond, "y": np.round(y, 2)}


def write(path: Path = OUT, seed: int = SEED) -> None:
    d = simulate(seed)
    lines = ["subj,item,cond,y"]
    for s, i, c, y in zip(d["s"], d["i"], d["cond"], d["y"], strict=True):
        lines.append(f"S{s + 1:02d},I{i + 1:02d},{c:.1f},{y:.2f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    import sys

    seed = int(sys.argv[1]) if len(sys.argv) > 1 else SEED
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else OUT
    write(out, seed)
    print(f"wrote {out} (seed {seed})")
