"""One random-slope model on data larger than the fit keeps in memory: Parquet read in row batches (pyarrow), or
the same files as a Dask DataFrame; peak resident memory and time of each pass.

Usage::

    python benchmarks/parquet_scale.py                                  # 20M rows, 200k groups, Parquet
    python benchmarks/parquet_scale.py --rows 2000000 --groups 20000    # a quick run
    python benchmarks/parquet_scale.py --rows 10000000 --groups 1000000 --engine dask   # 10M rows, 1M groups
    python benchmarks/parquet_scale.py --ladder-rung /tmp/mixedjax-ladder/g1000000_seed20261126 --engine dask

Data (fixed seed): ``--rows`` rows over ``--groups`` groups, each row's group drawn uniformly at random, so the
rows are not sorted by group and every group spans every file; ``x1, x2, x3`` standard normal,
``y = 1 + 0.5 x1 - 0.3 x2 + 0.2 x3 + b0_g + b1_g x1 + e`` with sd(b0) = 1, sd(b1) = 0.5, corr(b0, b1) = 0.3,
sd(e) = 1 (the ladder's model, ``benchmarks/ladder.py``); ``g`` an int64 column.  Written once as ``--files``
Parquet files (row groups of 1M rows) under ``--data-dir`` (default ``/tmp/mixedjax-parquet-scale``), in a
separate process, and reused.  ``--ladder-rung DIR``: the same model on one rung of ``benchmarks/ladder.py``
(its raw columns, e.g. the 1M-group rung of 10M rows, written by ``ladder.py``), converted once to Parquet.

Model: ``mixedjax.mixedlm("y ~ x1 + x2 + x3", path, groups="g", re_formula="~x1").fit()`` (REML), in a FRESH
process with an empty compilation cache (compile included).  ``--engine dask`` passes
``dask.dataframe.read_parquet(path)`` instead (Dask's local threaded scheduler, or ``--workers N`` worker
processes of a ``dask.distributed.LocalCluster``).  Reported: the first pass (levels, group ids, missing
values), the second (cross-products), the fit, the whole call, peak RSS of the fitting process (``ru_maxrss``:
Python, JAX, the reader and the fit together; with ``--workers``, the workers' own memory is not in it),
logLik and estimates.  ``--check`` also fits the same data in memory with pandas and reports the logLik's
relative difference (only for sizes that fit in memory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARK = "@@RESULT@@ "
SEED = 20261129
CHUNK = 1_000_000


def generate(path: Path, rows: int, groups: int, files: int, seed: int) -> None:
    """Write the data set in chunks of 1M rows (memory of one chunk), ``files`` files."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    cov = np.array([[1.0, 0.3 * 0.5], [0.3 * 0.5, 0.25]])
    b = rng.multivariate_normal([0.0, 0.0], cov, size=groups)
    path.mkdir(parents=True, exist_ok=True)
    per_file = -(-rows // files)
    done = 0
    for f in range(files):
        n_file = min(per_file, rows - done)
        with pq.ParquetWriter(path / f"part-{f:03d}.parquet", pa.schema([
                ("y", pa.float64()), ("x1", pa.float64()), ("x2", pa.float64()), ("x3", pa.float64()),
                ("g", pa.int64())])) as w:
            left = n_file
            while left > 0:
                n = min(CHUNK, left)
                g = rng.integers(0, groups, n)
                x1, x2, x3 = rng.standard_normal((3, n))
                y = 1 + 0.5 * x1 - 0.3 * x2 + 0.2 * x3 + b[g, 0] + b[g, 1] * x1 + rng.standard_normal(n)
                w.write_table(pa.table({"y": y, "x1": x1, "x2": x2, "x3": x3, "g": g}), row_group_size=CHUNK)
                left -= n
        done += n_file
    (path / "_meta.json").write_text(json.dumps({"rows": rows, "groups": groups, "files": files, "seed": seed}))


def from_ladder(rung: Path, path: Path, files: int) -> None:
    """A rung of ``benchmarks/ladder.py`` (raw little-endian columns) as ``files`` Parquet files, in chunks."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = json.loads((rung / "meta.json").read_text())
    cols = {c: np.memmap(rung / f"{c}.{t}", dtype="<f8" if t == "f64" else "<i4", mode="r")
            for c, t in meta["columns"].items()}
    n = meta["n_rows"]
    path.mkdir(parents=True, exist_ok=True)
    for f, idx in enumerate(np.array_split(np.arange(n), files)):
        with pq.ParquetWriter(path / f"part-{f:03d}.parquet", pa.schema([(c, pa.float64() if t == "f64" else pa.int32())
                                                                        for c, t in meta["columns"].items()])) as w:
            for lo in range(idx[0], idx[-1] + 1, CHUNK):
                hi = min(lo + CHUNK, idx[-1] + 1)
                w.write_table(pa.table({c: np.asarray(v[lo:hi]) for c, v in cols.items()}), row_group_size=CHUNK)
    (path / "_meta.json").write_text(json.dumps({"rows": n, "groups": meta["n_groups"], "files": files,
                                                 "ladder_rung": str(rung)}))


def ensure_data(data_dir: Path, rows: int, groups: int, files: int, seed: int, rung: str | None = None) -> Path:
    if rung:
        path = data_dir / f"ladder_{Path(rung).name}_files{files}"
        if not (path / "_meta.json").exists():
            print(f"converting the ladder's rung {rung} to Parquet in {path} ...", file=sys.stderr, flush=True)
            from_ladder(Path(rung), path, files)
        return path
    path = data_dir / f"rows{rows}_groups{groups}_files{files}_seed{seed}"
    meta = path / "_meta.json"
    if not meta.exists():
        print(f"writing {rows:,} rows to {path} (a separate process) ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--_generate", str(path), "--rows", str(rows), "--groups",
                        str(groups), "--files", str(files), "--seed", str(seed)], check=True)
        print(f"  written in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    return path


def child(path: Path, engine: str, batch_size: int, workers: int, check: bool) -> dict:
    """The fitting process: everything it does counts in its peak RSS."""
    import resource

    t0 = time.perf_counter()
    import numpy as np

    import mixedjax
    from mixedjax import sources

    t_import = time.perf_counter() - t0
    cluster = client = None
    data: object = str(path)
    if engine == "dask":
        import dask.dataframe as dd

        if workers:
            from dask.distributed import Client, LocalCluster

            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
            client = Client(cluster)
        data = dd.read_parquet(str(path))
    times: dict[str, float] = {}
    t = time.perf_counter()
    src = sources.prepare(data, "y", "x1 + x2 + x3", ["x1"], "g", batch_size=batch_size)
    times["first pass (levels, group ids)"] = time.perf_counter() - t
    t = time.perf_counter()
    acc = src.accumulate([(0, 0), (0, 1)])
    times["second pass (cross-products)"] = time.perf_counter() - t
    del acc
    t = time.perf_counter()
    md = mixedjax.mixedlm("y ~ x1 + x2 + x3", data, groups="g", re_formula="~x1", batch_size=batch_size)
    t_model = time.perf_counter() - t
    t = time.perf_counter()
    res = md.fit()
    t_fit = time.perf_counter() - t
    times["mixedlm(path, ...) (both passes)"] = t_model
    times["fit (compile included)"] = t_fit
    times["mixedlm + fit"] = t_model + t_fit
    out = {"times": times, "import_s": t_import, "nobs": int(res.nobs), "ngroups": int(res.ngroups),
           "llf": float(res.llf), "converged": bool(res.converged), "fe_params": res.fe_params.round(6).to_dict(),
           "cov_re": np.asarray(res.cov_re).round(6).tolist(), "scale": float(res.scale), "source": md.source,
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if client is not None:
        client.close()
        cluster.close()
    if check:
        import pandas as pd

        frame = pd.read_parquet(path)
        ref = mixedjax.mixedlm("y ~ x1 + x2 + x3", frame, groups="g", re_formula="~x1").fit()
        out["in_memory_llf"] = float(ref.llf)
        out["llf_rel_diff"] = abs(ref.llf - res.llf) / abs(ref.llf)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20_000_000)
    ap.add_argument("--groups", type=int, default=200_000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--engine", choices=["parquet", "dask"], default="parquet")
    ap.add_argument("--workers", type=int, default=0, help="dask: LocalCluster worker processes (0: threads)")
    ap.add_argument("--batch-size", type=int, default=None, help="Parquet rows per batch (default 524288)")
    ap.add_argument("--data-dir", default="/tmp/mixedjax-parquet-scale")
    ap.add_argument("--ladder-rung", help="a rung directory written by benchmarks/ladder.py (raw columns)")
    ap.add_argument("--check", action="store_true", help="also fit in memory (pandas) and compare logLik")
    ap.add_argument("--_generate")
    ap.add_argument("--_child", action="store_true")
    ap.add_argument("--_path")
    a = ap.parse_args()
    if a._generate:
        generate(Path(a._generate), a.rows, a.groups, a.files, a.seed)
        return
    if a._child:
        print(MARK + json.dumps(child(Path(a._path), a.engine, a.batch_size, a.workers, a.check)), flush=True)
        return
    path = ensure_data(Path(a.data_dir), a.rows, a.groups, a.files, a.seed, a.ladder_rung)
    env = dict(os.environ, MIXEDJAX_CACHE_DIR=tempfile.mkdtemp(prefix="mixedjax-scale-cache-"))
    load_before = os.getloadavg()[0]
    cmd = [sys.executable, __file__, "--_child", "--_path", str(path), "--engine", a.engine, "--workers",
           str(a.workers)] + (["--batch-size", str(a.batch_size)] if a.batch_size else []) + \
        (["--check"] if a.check else [])
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        sys.exit(f"the fitting process failed:\n{proc.stderr[-4000:]}")
    r = json.loads(lines[0][len(MARK):])
    size = sum(p.stat().st_size for p in path.glob("*.parquet")) / 2**20
    print(f"## {r['nobs']:,} rows, {r['ngroups']:,} groups, {a.engine}"
          f"{f' ({a.workers} worker processes)' if a.workers else ''}: {r['source']}")
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load_before:.1f} "
          f"before / {os.getloadavg()[0]:.1f} after; {size:,.0f} MiB of Parquet in {a.files} files; "
          f"fresh process, empty compilation cache; `import mixedjax` {r['import_s']:.1f} s (not timed below)\n")
    print("| step | seconds |\n|---|---:|")
    for k, v in r["times"].items():
        print(f"| {k} | {v:.1f} |")
    print(f"\npeak RSS of the fitting process: **{r['peak_rss_mib']:,.0f} MiB**"
          f" ({'under' if r['peak_rss_mib'] < 1024 else 'OVER'} 1 GiB); process wall time {wall:.1f} s")
    print(f"logLik {r['llf']:.6f}, converged {r['converged']}, fixed effects {r['fe_params']}, "
          f"cov_re {r['cov_re']}, scale {r['scale']:.6f}")
    if "llf_rel_diff" in r:
        print(f"in memory (pandas): logLik {r['in_memory_llf']:.6f}, relative difference {r['llf_rel_diff']:.2e}")


if __name__ == "__main__":
    main()
