"""Turn the raw JSON written by make_lme4_refs.R / make_nlme_intervals.R into tests/reference files.

    .venv/bin/python tests/reference/write_refs.py [RAW_DIR]     # default /tmp/mixedjax_lme4_raw

* ``<case>_<reml|ml>.json``: written as ``json.dumps(obj, indent=1)`` (the layout of
  ../shared/reference/*.json and of the copies already in tests/reference): R wrote every double with
  "%.17g", Python reads it back exactly and writes the shortest string that round-trips.
* ``penicillin_*``: tests/reference already holds trimmed copies of the shared reference fits, which the
  test-suite uses; they are kept as they are and only ``results.lmerTest`` and ``results.predictions``
  (computed by make_lme4_refs.R from its own polished REML fit) are added to penicillin_reml.json, after
  checking that that fit agrees with the stored one (logLik within 1e-9, theta within 1e-7); both
  penicillin copies also get ``dataset_path`` (relative to the repository root) so that
  ``refcheck.py --cases tests/reference --root .`` can read them.
* ``nlme_intervals.json``: reformatted the same way.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
RAW = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/mixedjax_lme4_raw")
KEEP_EXISTING = {"penicillin_reml", "penicillin_ml"}  # copies of the shared reference fits
MERGE_KEYS = ("lmerTest", "predictions")
# dataset_path (relative to the repository root, refcheck.py --root .) added to the kept copies, which
# lack it, so that refcheck.py --cases tests/reference can read them
DATASET_PATH = {"penicillin_reml": "../shared/data/Penicillin.csv", "penicillin_ml": "../shared/data/Penicillin.csv"}


def _with_dataset_path(obj: dict, path: str) -> dict:
    if "dataset_path" in obj:
        return obj
    out = {}
    for k, v in obj.items():
        out[k] = v
        if k == "dataset":
            out["dataset_path"] = path
    return out


def _check_finite(obj, where=""):
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"non-finite number at {where}")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_finite(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_finite(v, f"{where}[{i}]")


def _dump(obj, path: pathlib.Path, newline: bool = True) -> None:
    _check_finite(obj)
    path.write_text(json.dumps(obj, indent=1) + ("\n" if newline else ""))


def main() -> int:
    raw_files = sorted(RAW.glob("*.json"))
    if not raw_files:
        print(f"no raw JSON in {RAW}; run make_lme4_refs.R / make_nlme_intervals.R first")
        return 1
    for raw in raw_files:
        obj = json.loads(raw.read_text())
        dest = HERE / raw.name
        if raw.stem in KEEP_EXISTING and dest.exists():
            old_text = dest.read_text()
            old = json.loads(old_text)
            a, b = old["results"]["lme4"], obj["results"]["lme4"]
            dll = abs(a["logLik"] - b["logLik"])
            dth = max(abs(x - y) for x, y in zip(a["theta"]["values"], b["theta"]["values"], strict=True))
            if dll > 1e-9 or dth > 1e-7:
                raise SystemExit(f"{raw.stem}: new fit differs from the stored one (logLik {dll:.1e}, theta {dth:.1e})")
            added = [k for k in MERGE_KEYS if k in obj["results"]]
            for k in added:
                old["results"][k] = obj["results"][k]
            old = _with_dataset_path(old, DATASET_PATH[raw.stem])
            _dump(old, dest, newline=old_text.endswith("\n"))
            print(
                f"{dest.name}: kept the stored fit (logLik diff {dll:.1e}, theta diff {dth:.1e}); "
                f"added results.{', results.'.join(added) or '-'}"
            )
            continue
        _dump(obj, dest)
        print(f"{dest.name}: written")
    for name, path in DATASET_PATH.items():  # kept copies not among the raw files (penicillin_ml)
        dest = HERE / f"{name}.json"
        if dest.exists() and not (RAW / dest.name).exists():
            text = dest.read_text()
            obj = json.loads(text)
            if "dataset_path" not in obj:
                _dump(_with_dataset_path(obj, path), dest, newline=text.endswith("\n"))
                print(f"{dest.name}: added dataset_path")
    return 0


if __name__ == "__main__":
    sys.exit(main())
