"""Load figure: a backfill of N shard partitions (default 200) through the daemon of a small cluster.

Starts the deployment of tests/cluster.py — PostgreSQL as Dagster's storage, a code server,
`dagster-webserver` and `dagster-daemon` with the QueuedRunCoordinator, each its own process —
over a corpus of local text cut into N shards, launches one partition backfill of
`corpus_shards` through GraphQL (one run per partition, `--max-concurrent-runs` at a time)
and waits for every run to end. Artifacts go to a local root, or with `--storage s3` to a
SeaweedFS server started for the run. From the event log in Postgres it prints:

- `backfill_wall_s`: from the launch mutation to the end of the last run (the daemon marks the
  backfill complete on its next 30 s pass; that time is printed apart);
- `runs_per_minute`: N over that wall time;
- `work_per_partition_s`: mean seconds in the asset's step (STEP_START to STEP_SUCCESS);
- `dagster_overhead_per_partition_s`: mean seconds a run holds its slot outside its step, from
  the queue's launch to the run's end (process start, code load, resources, event writes),
  with its parts, the share of slot time spent in steps, and the wall seconds per partition;

- `code_location_import_vs_dagster`: seconds to import `sae_assets.definitions` in a fresh
  interpreter over seconds to import `dagster` alone (best of five each, measured before the
  cluster starts), which every run process pays;

and, as the last line, the overhead over the work. The corpus step is a small read and one
Parquet write, so the figure is Dagster's cost of one run per partition beside little work:
what to weigh against a partition's own minutes when choosing the shard size. `--executor`
runs the code location with another executor (SAE_ASSETS_EXECUTOR) to compare the choices.

    .venv/bin/python bench/backfill_load.py [--partitions 200] [--max-concurrent-runs 4] [--storage local|s3]
        [--executor one_process_per_step|multiprocess|in_process] [--keep]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import ExitStack
from pathlib import Path

import _common

sys.path.insert(0, str(_common.REPO_ROOT / "tests"))  # the cluster helpers live with the tests

FINISHED = ("SUCCESS", "FAILURE", "CANCELED")


def write_corpus(path: Path, documents: int) -> Path:
    """`documents` JSONL rows of standard-library prose, ~400 characters each."""
    prose = " ".join(m.__doc__ or "" for m in (argparse, csv, json, re, textwrap)).split()
    with open(path, "w") as handle:
        for i in range(documents):
            start = (i * 37) % (len(prose) - 80)
            handle.write(json.dumps({"text": " ".join(prose[start:start + 70])}) + "\n")
    return path


def import_seconds(module: str, repeats: int = 5) -> float:
    """Best of `repeats` wall seconds for a fresh interpreter to import `module` (and exit)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=_common.REPO_ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - started)
    return best


def finished_runs(pg, backfill_id: str) -> dict[str, str]:
    rows = pg.query("SELECT r.run_id, r.status FROM runs r JOIN run_tags t ON t.run_id = r.run_id "
                    "WHERE t.key = 'dagster/backfill' AND t.value = %s", (backfill_id,))
    return {run_id: status for run_id, status in rows if status in FINISHED}


def backfill_status(cluster, backfill_id: str) -> str:
    answer = cluster.gql("query($id: String!) { partitionBackfillOrError(backfillId: $id) { "
                         "... on PartitionBackfill { status } } }", {"id": backfill_id})
    return answer["partitionBackfillOrError"]["status"]


def run_backfill(cluster, pg, partitions: list[str], timeout: float) -> tuple[float, float, float, list[str]]:
    """(launch time, time all runs had ended, time the backfill was COMPLETED, run ids).

    Polls Postgres every 2 s rather than the webserver's backfill query, whose 200-run answer
    would load the machine it is measuring."""
    launched = time.time()
    # No run config, as a backfill launched from the UI: the code location's executor decides.
    backfill_id = cluster.launch_backfill(["corpus_shards"], partitions, f"load {len(partitions)}", run_config={})
    deadline, done = launched + timeout, {}
    while time.time() < deadline:
        cluster.check_alive()
        done = finished_runs(pg, backfill_id)
        failed = [r for r, s in done.items() if s != "SUCCESS"]
        if failed:
            cluster.fail(f"run {failed[0]} ended {done[failed[0]]}:\n{cluster.run_failure(failed[0])}")
        if len(done) == len(partitions):
            break
        time.sleep(2)
    else:
        cluster.fail(f"{len(done)} of {len(partitions)} runs ended after {timeout:.0f} s")
    runs_ended = time.time()
    while time.time() < deadline and backfill_status(cluster, backfill_id) not in ("COMPLETED", "COMPLETED_SUCCESS"):
        time.sleep(2)
    return launched, runs_ended, time.time(), sorted(done)


def report(times: dict, launched: float, completed: float, max_runs: int, imports: dict[str, float]) -> None:
    from cluster import peak_concurrency

    runs = list(times.values())
    n = len(runs)
    last_end = max(t.ended for t in runs)
    wall = last_end - launched
    work = statistics.mean(t.work for t in runs)
    in_flight = statistics.mean(t.ended - t.launched for t in runs)
    spawn = statistics.mean(t.started - t.launched for t in runs)
    in_run = statistics.mean(t.ended - t.started - t.work for t in runs)
    queued = statistics.mean(t.launched - t.enqueued for t in runs)
    first_launch = min(t.launched for t in runs) - launched
    busy = sum(t.ended - t.launched for t in runs) / (last_end - min(t.launched for t in runs))
    peak = peak_concurrency([(t.launched, t.ended) for t in runs])
    overhead = in_flight - work
    print(f"\nruns: {n}, all SUCCESS; max_concurrent_runs {max_runs}, peak {peak}, mean {busy:.2f} in flight")
    print(f"first run launched {first_launch:.1f} s after the backfill mutation (the daemon's backfill pass)")
    print(f"backfill marked COMPLETED {completed - launched:.1f} s after launch (next pass after the last run)")
    print("per partition (mean over runs):")
    print(f"  queued before launch      {queued:8.2f} s  (waiting for a free slot; not counted below)")
    print(f"  launch -> run start       {spawn:8.2f} s  (code server spawns the process, which loads the code)")
    print(f"  run start -> end, no step {in_run:8.2f} s  (resources, events to Postgres, run bookkeeping)")
    print(f"  step (the asset's work)   {work:8.2f} s")
    code_load, dagster_load = imports["sae_assets.definitions"], imports["dagster"]
    print(f"  for reference: a fresh interpreter imports sae_assets.definitions in {code_load:.2f} s, "
          f"dagster alone in {dagster_load:.2f} s")
    print(f"share of run-slot time spent in steps: {work / in_flight:.1%}")
    print(f"wall_per_partition_s: {wall / n:.3f}")
    print(f"backfill_wall_s: {wall:.1f}")
    print(f"runs_per_minute: {60 * n / wall:.1f}")
    print(f"work_per_partition_s: {work:.3f}")
    print(f"dagster_overhead_per_partition_s: {overhead:.2f}")
    print(f"code_location_import_vs_dagster: {code_load / dagster_load:.2f}")
    print(f"overhead_vs_work: {overhead / work:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--partitions", type=int, default=200, help="shard partitions to backfill (default 200)")
    parser.add_argument("--max-concurrent-runs", type=int, default=4, help="the run queue's limit (default 4)")
    parser.add_argument("--documents-per-shard", type=int, default=5)
    parser.add_argument("--storage", choices=("local", "s3"), default="local")
    parser.add_argument("--executor", choices=("one_process_per_step", "multiprocess", "in_process"),
                        default="one_process_per_step", help="the code location's executor (SAE_ASSETS_EXECUTOR)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the runs")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, config) and print its path")
    args = parser.parse_args()

    from cluster import postgres_bin, postgres_server, run_times, running_cluster
    from support import TINY, write_run_config

    bin_dir = postgres_bin()
    if bin_dir is None:
        print("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin (apt-get install postgresql)")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="bench-backfill-"))
    try:
        with ExitStack() as stack:
            corpus = write_corpus(tmp / "corpus.jsonl", args.partitions * args.documents_per_shard)
            storage = {"root": str(tmp / "artifacts"), "cache_dir": str(tmp / "cache" / "{run_id}")}
            code_env = {"SAE_ASSETS_EXECUTOR": args.executor}
            if args.storage == "s3":
                from conftest import running_weed

                weed = stack.enter_context(running_weed(tmp / "seaweedfs", graceful=False)).info
                storage.update(backend="s3", endpoint_url=weed.endpoint_url, bucket=weed.bucket, prefix="load")
                code_env.update(AWS_ACCESS_KEY_ID=weed.access_key_id, AWS_SECRET_ACCESS_KEY=weed.secret_access_key)
            config_path = write_run_config(tmp, TINY, storage, corpus={
                "source": "local", "paths": [str(corpus)], "num_shards": args.partitions, "max_documents": 0,
                "min_document_chars": 10})
            imports = {module: import_seconds(module) for module in ("dagster", "sae_assets.definitions")}
            pg = stack.enter_context(postgres_server(bin_dir))
            started = time.time()
            cluster = stack.enter_context(running_cluster(
                tmp, pg, {**code_env, "SAE_ASSETS_CONFIG": config_path},
                max_concurrent_runs=args.max_concurrent_runs))
            print(f"cluster ready in {time.time() - started:.1f} s on {os.cpu_count()} CPUs; executor {args.executor}; "
                  f"storage {args.storage}; "
                  f"{args.partitions} partitions of {args.documents_per_shard} documents; temp dir {tmp}")
            partitions = [f"shard-{i:04d}" for i in range(args.partitions)]
            for key in partitions:
                cluster.add_partition("shards", key)
            launched, runs_ended, completed, run_ids = run_backfill(cluster, pg, partitions, args.timeout)
            print(f"all {len(run_ids)} runs ended {runs_ended - launched:.1f} s after launch")
            report(run_times(pg, run_ids), launched, completed, args.max_concurrent_runs, imports)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
