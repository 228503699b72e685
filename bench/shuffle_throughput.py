"""Out-of-core shuffle throughput per pass against a plain read+write copy on the same disk.

Builds N synthetic activation shards (`schemas.activation_schema`: token_index, token_id and
one float32 fixed-size-list column of width 128; ~`--total-mb` MB in all) as Arrow IPC files
in a temp dir, then alternates, rotating which goes first:

- `shuffle`: scatter every shard into K bucket files (`core.shuffle.bucket_count_table` +
  `scatter_batches` into `arrow_files.write_ipc_files`, as shuffle_scatter does; the bucket
  files are then fsynced, as the asset's commit does, so every pass writes durably), then gather
  each bucket (`gather_bucket` over the memory-mapped pieces with a `LocalSpill`, into
  `write_ipc_file`, as shuffled_shards does) at the default memory budget (256 MB, no spill);
- `copy`: each input file read in 1 MiB chunks (one reused buffer) and written to a new file,
  fsynced (the bytes moved once, the way write_ipc_file commits a file);
- `arrow copy` (shown, not the headline): each input memory-mapped with `open_ipc_table` and
  rewritten with `write_ipc_file`.

Cleanup is not timed, and the page cache is flushed (os.sync, untimed) after each subject so
none waits on another's writeback. Shuffle throughput per pass = bytes x 2 passes / (scatter
+ gather seconds); the headline divides it by the copy's bytes / seconds: the median over
repetitions of that ratio within each repetition. Then, each in a fresh subprocess, the
peak memory of one scatter job, of one bucket gathered within budget, and of one bucket
gathered with a budget of 1/4 of its size (at least 4x over budget, so it spills through an
extra pass): peak RSS (VmHWM reset after imports and a warm-up; it counts touched pages of
memory-mapped files), sampled peak anonymous RSS, and Arrow's pool peak, against the budget.

    .venv/bin/python bench/shuffle_throughput.py [--total-mb 400] [--shards 8] [--buckets 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _common

HOOK = "blocks.1.hook_resid_post"
WIDTH = 128
WRITE_BATCH_ROWS = 4096  # what cached_activations writes per batch (32 sequences x 128 tokens)
DEFAULT_BUDGET = 256 * 2**20  # shuffle.memory_budget_mb of the packaged config
SEED, BLOCK_ROWS = 0, 4096
COPY_CHUNK = 2**20  # shutil.copyfileobj's size on Linux; 8 MiB writes were bimodal (0.4-1.4 s) here


def schema():
    from sae_assets.core import schemas

    return schemas.activation_schema({HOOK: WIDTH}, "float32")


def make_inputs(directory: Path, shards: int, total_bytes: int) -> list[Path]:
    """`shards` activation files of ~total_bytes in all; global token indices as the pipeline's."""
    import numpy as np
    import pyarrow as pa

    from resources.arrow_files import write_ipc_file
    from sae_assets.core import schemas

    row_bytes = 8 + 4 + 4 * WIDTH
    rows = max(1, total_bytes // row_bytes // shards)
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(shards):
        def batches(shard=shard):
            for start in range(0, rows, WRITE_BATCH_ROWS):
                n = min(WRITE_BATCH_ROWS, rows - start)
                index = schemas.global_token_index(shard, np.arange(start, start + n))
                acts = rng.standard_normal(n * WIDTH, dtype=np.float32)
                yield pa.RecordBatch.from_arrays(
                    [pa.array(index, pa.int64()), pa.array(rng.integers(0, 4096, n, dtype=np.int32), pa.int32()),
                     pa.FixedSizeListArray.from_arrays(pa.array(acts), WIDTH)], schema=schema())
        path = directory / f"shard-{shard:04d}.arrow"
        write_ipc_file(path, schema(), batches())
        paths.append(path)
    return paths


def bucket_path(directory: Path, job: int, bucket: int) -> Path:
    return directory / f"job-{job:04d}" / f"bucket-{bucket:05d}.arrow"


def count_table(inputs: list[Path], buckets: int):
    from resources.arrow_files import open_ipc_table
    from sae_assets.core import shuffle as sh

    return sh.bucket_count_table([open_ipc_table(p).num_rows for p in inputs], buckets, SEED)


def scatter_job(inputs: list[Path], job: int, counts_NK, directory: Path) -> None:
    from resources.arrow_files import open_ipc_table, write_ipc_files
    from sae_assets.core import shuffle as sh

    table = open_ipc_table(inputs[job])
    paths = {k: bucket_path(directory, job, k) for k in range(counts_NK.shape[1])}
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    pieces = sh.scatter_batches(table.to_batches(), counts_NK[job], seed=SEED, job=job, block_rows=BLOCK_ROWS)
    rows = write_ipc_files(paths, table.schema, pieces)
    if [rows[k] for k in range(len(paths))] != counts_NK[job].tolist():
        raise RuntimeError(f"scatter job {job} wrote {rows}, table says {counts_NK[job].tolist()}")


def gather_one(scatter_dir: Path, jobs: int, bucket: int, budget: int, out: Path, spill_parent: Path) -> int:
    """Gather bucket `bucket` into `out`; returns rows written."""
    from resources.arrow_files import LocalSpill, open_ipc_table, write_ipc_file
    from sae_assets.core import shuffle as sh

    pieces = [open_ipc_table(bucket_path(scatter_dir, j, bucket)) for j in range(jobs)]
    with LocalSpill(pieces[0].schema, parent=spill_parent) as spill:
        batches = sh.gather_bucket(pieces, bucket=bucket, seed=SEED, memory_budget_bytes=budget,
                                   spill_write=spill.write, spill_read=spill.read, schema=pieces[0].schema,
                                   block_rows=BLOCK_ROWS)
        rows, _ = write_ipc_file(out, pieces[0].schema, batches)
    return rows


def shuffle_pass(inputs: list[Path], buckets: int, work: Path, budget: int = DEFAULT_BUDGET) -> dict[str, float]:
    """One full scatter + gather under `work` (removed afterwards, not timed); seconds of each phase."""
    scatter_dir, out_dir = work / "scatter", work / "shuffled"
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    counts_NK = count_table(inputs, buckets)
    for job in range(len(inputs)):
        scatter_job(inputs, job, counts_NK, scatter_dir)
    written = time.perf_counter()
    for path in sorted(scatter_dir.rglob("*.arrow")):  # the asset's commit fsyncs each file (put_file)
        fsync(path)
    scattered = time.perf_counter()
    for bucket in range(buckets):
        gather_one(scatter_dir, len(inputs), bucket, budget, out_dir / f"bucket-{bucket:05d}.arrow", work)
    gathered = time.perf_counter()
    shutil.rmtree(work)
    return {"scatter": scattered - started, "scatter fsync": scattered - written, "gather": gathered - scattered}


def fsync(path: Path) -> None:
    from resources.storage import fsync_path

    fsync_path(path)


def raw_copy(inputs: list[Path], work: Path) -> float:
    """Seconds to copy every input (1 MiB reads into one reused buffer, writes, fsync); then removed."""
    work.mkdir(parents=True, exist_ok=True)
    buffer = bytearray(COPY_CHUNK)
    view = memoryview(buffer)
    started = time.perf_counter()
    for path in inputs:
        target = work / path.name
        with open(path, "rb", buffering=0) as src, open(target, "wb", buffering=0) as dst:
            while n := src.readinto(buffer):
                dst.write(view[:n])
            os.fsync(dst.fileno())
    seconds = time.perf_counter() - started
    shutil.rmtree(work)
    return seconds


def arrow_copy(inputs: list[Path], work: Path) -> float:
    """Seconds to rewrite every input through open_ipc_table + write_ipc_file; then removed."""
    from resources.arrow_files import open_ipc_table, write_ipc_file

    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for path in inputs:
        table = open_ipc_table(path)
        write_ipc_file(work / path.name, table.schema, table.to_batches())
    seconds = time.perf_counter() - started
    shutil.rmtree(work)
    return seconds


def verify(inputs: list[Path], buckets: int, work: Path) -> None:
    """One shuffle whose output is checked to be a permutation of the input (not timed)."""
    import numpy as np

    from resources.arrow_files import open_ipc_table
    from sae_assets.core import shuffle as sh

    scatter_dir, out_dir = work / "scatter", work / "shuffled"
    out_dir.mkdir(parents=True, exist_ok=True)
    counts_NK = count_table(inputs, buckets)
    for job in range(len(inputs)):
        scatter_job(inputs, job, counts_NK, scatter_dir)
    outputs = []
    for bucket in range(buckets):
        gather_one(scatter_dir, len(inputs), bucket, DEFAULT_BUDGET, out_dir / f"b{bucket}.arrow", work)
        outputs.append(open_ipc_table(out_dir / f"b{bucket}.arrow").column("token_index").to_numpy())
    source = np.concatenate([open_ipc_table(p).column("token_index").to_numpy() for p in inputs])
    sh.check_permutation(source, np.concatenate(outputs))
    shutil.rmtree(work)


# ---- memory phases, each run in a fresh subprocess ----------------------------------------

class _Sampler(threading.Thread):
    """Polls /proc/self/status for the peak anonymous RSS (heap, not mapped file pages)."""

    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval, self.peak_anon, self.peak_file, self.stopped = interval, 0, 0, threading.Event()

    @staticmethod
    def status() -> dict[str, int]:
        fields = {}
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")):
                    name, value = line.split(":")
                    fields[name] = int(value.split()[0]) * 1024
        return fields

    def run(self) -> None:
        while not self.stopped.is_set():
            status = self.status()
            self.peak_anon = max(self.peak_anon, status.get("RssAnon", 0))
            self.peak_file = max(self.peak_file, status.get("RssFile", 0) + status.get("RssShmem", 0))
            time.sleep(self.interval)


def _warm_up(work: Path) -> None:
    """Run scatter, gather and an IPC write on a few rows, so thread pools and allocator arenas
    exist before the baseline is taken (fixed costs, not what the budget is about)."""
    import numpy as np
    import pyarrow as pa

    from resources.arrow_files import write_ipc_file
    from sae_assets.core import shuffle as sh

    rows = 256
    table = pa.table({"token_index": pa.array(np.arange(rows), pa.int64()),
                      "token_id": pa.array(np.zeros(rows, np.int32), pa.int32()),
                      HOOK: pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(rows * WIDTH, np.float32)), WIDTH)},
                     schema=schema())
    pieces = list(sh.scatter_batches(table.to_batches(), [rows // 2, rows - rows // 2], seed=1, job=0))
    path = work / f"warm-{os.getpid()}.arrow"
    write_ipc_file(path, schema(), sh.gather_bucket([table], bucket=0, seed=1, memory_budget_bytes=2**30))
    path.unlink()
    del pieces


def child(args) -> int:
    """--phase scatter|gather: one scatter job or one bucket's gather; prints a JSON line.

    The peak RSS (VmHWM, which counts touched pages of memory-mapped files too) is reset
    through /proc/self/clear_refs after imports and a warm-up; the peak anonymous RSS (heap:
    what the memory budget is about) is sampled every 2 ms by a thread.
    """
    import gc

    import pyarrow as pa

    import resources.arrow_files  # noqa: F401  (imports, torch among them, before the baseline)
    import sae_assets.core.shuffle  # noqa: F401

    work = Path(args.work)
    inputs = sorted((work / "inputs").glob("*.arrow"))
    scatter_dir = work / "scatter"
    _warm_up(work)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:  # resets VmHWM (Linux >= 4.0)
        handle.write("5")
    before = _Sampler.status()
    arrow_before = pa.default_memory_pool().max_memory()
    sampler = _Sampler()
    sampler.start()
    started = time.perf_counter()
    if args.phase == "scatter":
        scatter_job(inputs, 0, count_table(inputs, args.buckets), scatter_dir)
    else:
        out = work / f"gathered-{os.getpid()}.arrow"
        gather_one(scatter_dir, len(inputs), 0, args.budget, out, work)
        out.unlink()
    seconds = time.perf_counter() - started
    sampler.stopped.set()
    sampler.join()
    after = _Sampler.status()
    print(json.dumps({
        "seconds": seconds, "rss_before": before["VmRSS"], "anon_before": before.get("RssAnon", 0),
        # VmHWM, not ru_maxrss: after fork+exec ru_maxrss keeps the parent's peak, which
        # clear_refs does not reset
        "peak_rss": after["VmHWM"], "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_anon": max(sampler.peak_anon, after.get("RssAnon", 0)),
        "file_before": before.get("RssFile", 0) + before.get("RssShmem", 0), "peak_file": sampler.peak_file,
        "arrow_peak": pa.default_memory_pool().max_memory(), "arrow_before": arrow_before,
    }))
    return 0


def run_child(work: Path, phase: str, buckets: int, budget: int = 0) -> dict:
    command = [sys.executable, __file__, "--phase", phase, "--work", str(work), "--buckets", str(buckets),
               "--budget", str(budget)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"phase {phase} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mb(n: float) -> str:
    return f"{n / 2**20:7.1f} MB"


def memory_report(inputs: list[Path], buckets: int, work: Path) -> None:
    from resources.arrow_files import open_ipc_table

    counts_NK = count_table(inputs, buckets)
    for job in range(len(inputs)):  # the pieces the gathers read
        scatter_job(inputs, job, counts_NK, work / "scatter")
    # what gather_bucket weighs against its budget: the pieces' Arrow buffer bytes
    bucket_bytes = sum(open_ipc_table(bucket_path(work / "scatter", j, 0)).nbytes for j in range(len(inputs)))
    spill_budget = max(1, bucket_bytes // 4)
    (work / "inputs").symlink_to(inputs[0].parent)
    print(f"\npeak memory, each phase in a fresh subprocess (bucket 0 = {mb(bucket_bytes)}; input shard = "
          f"{mb(inputs[0].stat().st_size)}):")
    print("  peaks above the child's baseline (taken after imports and a warm-up); 'file' = mapped file pages")
    print(f"  {'phase':<34} {'budget':>9} {'seconds':>7} {'peak RSS':>10} {'peak anon':>10} {'peak file':>10} "
          f"{'Arrow pool':>10}")
    rows = [("scatter (1 job)", "scatter", 0), ("gather, default budget", "gather", DEFAULT_BUDGET),
            ("gather, budget = bucket/4 (spills)", "gather", spill_budget)]
    for label, phase, budget in rows:
        r = run_child(work, phase, buckets, budget)
        rss, anon = r["peak_rss"] - r["rss_before"], r["peak_anon"] - r["anon_before"]
        file, pool = r["peak_file"] - r["file_before"], r["arrow_peak"]
        print(f"  {label:<34} {mb(budget) if budget else '-':>9} {r['seconds']:7.2f} {mb(rss)} {mb(anon)} "
              f"{mb(file)} {mb(pool)}")
        if phase == "gather" and budget == spill_budget:
            spilled = (f"spilled gather: bucket {mb(bucket_bytes).strip()} = {bucket_bytes / budget:.1f}x the budget "
                       f"{mb(budget).strip()}; above baseline: peak anonymous RSS {mb(anon).strip()} = "
                       f"{anon / budget:.2f}x budget, Arrow pool peak {mb(pool).strip()} = {pool / budget:.2f}x, "
                       f"peak RSS incl. mapped file pages {mb(rss).strip()} = {rss / budget:.2f}x")
    print(spilled)
    shutil.rmtree(work / "scatter")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--total-mb", type=float, default=400.0, help="input data in all (MB)")
    parser.add_argument("--shards", type=int, default=8, help="N input shards (scatter jobs)")
    parser.add_argument("--buckets", type=int, default=8, help="K buckets")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions of shuffle and copies")
    parser.add_argument("--dir", help="parent of the temp dir (default: the system temp dir)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the subprocess peak-memory phases")
    parser.add_argument("--phase", choices=["scatter", "gather"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        return child(args)

    tmp = Path(tempfile.mkdtemp(prefix="bench-shuffle-", dir=args.dir))
    try:
        started = time.perf_counter()
        inputs = make_inputs(tmp / "inputs", args.shards, int(args.total_mb * 2**20))
        total = sum(p.stat().st_size for p in inputs)
        print(f"{args.shards} input shards, {total / 2**20:.0f} MB in all ({total // args.shards / 2**20:.1f} MB each), "
              f"K={args.buckets} buckets; made in {time.perf_counter() - started:.1f} s under {tmp}")
        verify(inputs, args.buckets, tmp / "verify")
        print("shuffle output verified: a permutation of the input token indices")

        seconds: dict[str, list[float]] = {"shuffle": [], "scatter": [], "scatter fsync": [], "gather": [],
                                           "copy": [], "arrow copy": []}

        def shuffle() -> None:
            phases = shuffle_pass(inputs, args.buckets, tmp / "work")
            for name, value in phases.items():
                seconds[name].append(value)
            seconds["shuffle"].append(phases["scatter"] + phases["gather"])
            os.sync()  # untimed: no dirty pages left for the next subject to wait on

        def copy() -> None:
            seconds["copy"].append(raw_copy(inputs, tmp / "copy"))
            os.sync()

        def copy_arrow() -> None:
            seconds["arrow copy"].append(arrow_copy(inputs, tmp / "arrow-copy"))
            os.sync()

        _common.interleave({"shuffle": shuffle, "copy": copy, "arrow copy": copy_arrow}, repeats=args.repeats,
                           warmup=0)  # the interleave's own timings include cleanup; these do not
        shuffle_s, scatter_s, _, gather_s, copy_s, arrow_s = (statistics.median(v) for v in seconds.values())
        copy_rate = total / copy_s
        per_pass = 2 * total / shuffle_s
        print(f"\nmedians over {args.repeats} interleaved repetitions ({total / 2**20:.0f} MB):")
        print(f"  {'':<26} {'seconds':>8} {'MB/s':>9} {'vs copy':>8}")
        rows = [("copy (read+write+fsync)", copy_s, total), ("arrow copy (mmap+IPC)", arrow_s, total),
                ("shuffle scatter pass", scatter_s, total),
                ("  of which fsync", statistics.median(seconds["scatter fsync"]), None),
                ("shuffle gather pass", gather_s, total),
                ("shuffle, per pass (2)", shuffle_s, 2 * total), ("shuffle, end to end", shuffle_s, total)]
        for label, s, nbytes in rows:
            rates = f"{nbytes / s / 2**20:9.1f} {nbytes / s / copy_rate:8.3f}" if nbytes else ""
            print(f"  {label:<26} {s:8.2f} {rates}")
        print("  seconds per repetition (cleanup not timed):")
        for name, values in seconds.items():
            print(f"    {name:<14} {_common.spread(values)}")
        paired = 2 * _common.paired_ratio(seconds["shuffle"], seconds["copy"])
        print(f"shuffle per pass / copy: ratio of medians {per_pass / copy_rate:.3f}; per repetition "
              f"{' '.join(f'{2 * c / s:.2f}' for s, c in zip(seconds['shuffle'], seconds['copy']))} "
              f"(median {paired:.3f})")

        if not args.skip_memory:
            memory_report(inputs, args.buckets, tmp / "memory")
        print(f"shuffle_vs_copy: {paired:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
