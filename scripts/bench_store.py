"""What per-iteration logging costs on a shared tracking server (`mlflow server` over HTTP,
on PostgreSQL) versus a local SQLite file.

For each store and repeat, one run receives 30,000 values through our buffer
(`clr_mlflow.IterationLogger`) the way the training loop
sends them: `series(steps, {3 metrics})` calls of 8 iterations each (1,250 calls). Measured:

- loop_us_per_value: time spent inside the `series` calls / 30,000: what the loop pays;
- close_s: time for `close()` to return (everything sent and stored), and
  total_s: first `series` call to `close()` returning;
- log_metric_ms: for reference, one `mlflow.log_metric` call per value (a few hundred);
- http_roundtrip_ms: GET /health on the server (the floor of any request), and the
  1-minute load average, as the context of the other numbers.

Every value is read back afterwards, so a lost point fails the benchmark.
PostgreSQL and the server are started and stopped here, with the code of tests/servers.py
(PostgreSQL with its default, durable settings).

    python scripts/bench_store.py [--repeats 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from clr_mlflow.tracking.iteration_logger import IterationLogger  # noqa: E402
from tests.servers import MlflowServer, PostgresServer, pg_bin_dir  # noqa: E402

ITERS_PER_CALL = 8
METRICS = ("bench/lr", "bench/loss", "bench/smoothed_loss")
VALUES = 30_000
LOG_METRIC_CALLS = 300


def make_buffer(run_id: str, client: MlflowClient):
    return IterationLogger(run_id, client=client)


def one_repeat(uri: str, experiment_id: str, repeat: int) -> dict:
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    iterations = VALUES // len(METRICS)
    rng = np.random.default_rng(repeat)
    lrs, losses = np.geomspace(1e-5, 10, iterations), rng.random(iterations)
    smoothed = np.cumsum(losses) / np.arange(1, iterations + 1)

    run = client.create_run(experiment_id, run_name=f"buffer-{repeat}")
    run_id = run.info.run_id
    buf = make_buffer(run_id, client)
    in_loop = 0.0
    began = time.perf_counter()
    for start in range(0, iterations, ITERS_PER_CALL):
        end = min(start + ITERS_PER_CALL, iterations)
        steps = np.arange(start, end)
        chunk = {METRICS[0]: lrs[start:end], METRICS[1]: losses[start:end], METRICS[2]: smoothed[start:end]}
        t = time.perf_counter()
        buf.series(steps, chunk)
        in_loop += time.perf_counter() - t
    loop_wall = time.perf_counter() - began
    t = time.perf_counter()
    buf.close()
    close_s = time.perf_counter() - t
    total_s = time.perf_counter() - began
    client.set_terminated(run_id)
    for key in METRICS:  # nothing lost
        got = len(client.get_metric_history(run_id, key))
        assert got == iterations, f"{uri}: {key} has {got} of {iterations} values"

    ref = client.create_run(experiment_id, run_name=f"log_metric-{repeat}")
    t = time.perf_counter()
    for i in range(LOG_METRIC_CALLS):
        mlflow.log_metric("bench/loss", float(losses[i]), step=i, run_id=ref.info.run_id)
    log_metric_ms = (time.perf_counter() - t) / LOG_METRIC_CALLS * 1e3
    client.set_terminated(ref.info.run_id)
    return dict(load_avg_1min=os.getloadavg()[0], http_roundtrip_ms=http_roundtrip_ms(uri), values=iterations * len(METRICS), series_calls=-(-iterations // ITERS_PER_CALL),
                batches=getattr(buf, "calls", None), loop_us_per_value=in_loop / VALUES * 1e6,
                loop_wall_s=loop_wall, close_s=close_s, total_s=total_s, log_metric_ms=log_metric_ms)


def http_roundtrip_ms(uri: str, n: int = 20) -> float | None:
    """Median time of GET /health: the server's floor for any request (None for a local store)."""
    if not uri.startswith("http"):
        return None
    times = []
    for _ in range(n):
        t = time.perf_counter()
        with urllib.request.urlopen(f"{uri}/health", timeout=30) as r:
            r.read()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def bench_store(repeats: int) -> list[dict]:
    """One dict per (store, repeat): store, uri, repeat and the numbers of `one_repeat`."""
    if pg_bin_dir() is None:
        raise SystemExit("PostgreSQL binaries (initdb, pg_ctl, postgres) not found; set CLR_MLFLOW_PG_BIN")
    rows = []
    previous_uri = mlflow.get_tracking_uri()
    with tempfile.TemporaryDirectory(prefix="clr_mlflow_bench_") as tmp, \
            PostgresServer(durable=True) as pg, MlflowServer(pg.uri) as server:
        stores = [("postgres via mlflow server (HTTP)", server.uri), ("local SQLite file", f"sqlite:///{tmp}/mlflow.db")]
        try:
            for name, uri in stores:
                client = MlflowClient(tracking_uri=uri)  # creates the SQLite schema before timing
                experiment_id = client.create_experiment(
                    "bench_store", artifact_location=None if uri.startswith("http") else f"{tmp}/artifacts")
                for r in range(repeats):
                    rows.append(dict(store=name, uri=uri, repeat=r) | one_repeat(uri, experiment_id, r))
        finally:
            mlflow.set_tracking_uri(previous_uri)
    return rows


def bench_rows(repeats: int) -> list[tuple]:
    """Rows for scripts/bench.py: the loop's cost per value and the final flush, HTTP vs SQLite."""
    rows = bench_store(repeats)
    med = {(store, k): statistics.median(r[k] for r in rows if r["store"] == store)
           for store in {r["store"] for r in rows} for k in ("loop_us_per_value", "close_s")}
    http, local = "postgres via mlflow server (HTTP)", "local SQLite file"
    loop = med[http, "loop_us_per_value"] / med[local, "loop_us_per_value"]
    return [("6. Per-value cost in the loop, IterationLogger (30,000 values): mlflow server on PostgreSQL over "
             "HTTP vs local SQLite", f"{med[http, 'loop_us_per_value']:.2f} us vs {med[local, 'loop_us_per_value']:.2f}"
             " us", f"ratio {loop:.2f}", "<= 1.5 (the buffer keeps it the same)", loop <= 1.5),
            ("6b. Same, time for close() to store everything: HTTP vs SQLite",
             f"{med[http, 'close_s']:.2f} s vs {med[local, 'close_s']:.2f} s",
             f"ratio {med[http, 'close_s'] / med[local, 'close_s']:.1f}", "-", None)]


def summary(rows: list[dict]) -> str:
    lines = [f"{'store':<34} {'loop us/value':>13} {'close s':>8} {'total s':>8} {'log_metric ms':>13}"]
    for store in dict.fromkeys(r["store"] for r in rows):
        mine = [r for r in rows if r["store"] == store]
        med = {k: statistics.median(r[k] for r in mine) for k in ("loop_us_per_value", "close_s", "total_s",
                                                                    "log_metric_ms")}
        lines.append(f"{store:<34} {med['loop_us_per_value']:>13.2f} {med['close_s']:>8.2f} {med['total_s']:>8.2f} "
                     f"{med['log_metric_ms']:>13.2f}")
    return "\n".join(lines) + f"\n(medians of {len(mine)} repeats; {VALUES:,} values in series calls of " \
                              f"{ITERS_PER_CALL} iterations x {len(METRICS)} metrics; {LOG_METRIC_CALLS} log_metric calls)"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = bench_store(args.repeats)
    for row in rows:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items() if k != "uri"})
    print(summary(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
