"""Wall time of `make demo`'s materialization, and of a rerun with nothing changed.

Runs `sae_assets.demo.materialize_stale` (the function `make demo` calls) on the embedded
default config, or on `--config PATH` laid over it, with storage.root and DAGSTER_HOME in a
temporary directory and an ephemeral Dagster instance; the directory is removed afterwards.
The first pass has no cursor, so it materializes every asset, each partition in turn; the
second pass evaluates the automation condition again and should run nothing. Prints the
seconds of each asset (all its partitions), the asset checks and imports, the first pass's
wall time (assets + checks; imports excluded), the rerun's, and as the last line the rerun's
seconds over the first pass's (goal <= 0.05). Before that it prints the bytes of the
context windows (both passes) over the activation cache's (goal <= 0.05).

    .venv/bin/python bench/demo_walltime.py [--config my_run.yaml] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common


def window_and_cache_bytes(cfg) -> tuple[int, int]:
    """Committed bytes of the two context-window assets, and of the activation cache, in `cfg`'s store."""
    from resources import ArtifactStorage

    store = ArtifactStorage.from_config(cfg.storage).store()

    def total(asset: str) -> int:
        return sum(store.require(asset, p).total_bytes for p in store.partitions(asset))

    return total("context_gather") + total("context_windows"), total("cached_activations")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="a run config YAML laid over the packaged defaults (storage.root is "
                                         "redirected into a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir and print its path")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    try:
        _common.isolate_env(tmp)
        started = time.perf_counter()
        import dagster as dg

        from sae_assets.core.config import load_config
        from sae_assets.demo import materialize_stale, print_report
        imports = time.perf_counter() - started
        config_path = _common.write_config(tmp, {}, args.config)
        cfg = load_config(config_path)
        print(f"config: {args.config or 'embedded default'}; shards={cfg.corpus.num_shards} "
              f"buckets={cfg.shuffle.num_buckets} model={cfg.model.n_layers}L d{cfg.model.d_model} "
              f"train_tokens={cfg.model.train_tokens} device={cfg.model.device}; artifacts in {tmp}")
        print(f"imports (dagster, sae_assets.demo): {imports:.1f} s")
        started = time.perf_counter()
        with dg.DagsterInstance.ephemeral(tempdir=str(tmp / "instance")) as instance:
            first = materialize_stale(instance, config_path, cursor_path=tmp / "cursor", log=print)
            total = time.perf_counter() - started
            started = time.perf_counter()
            rerun = materialize_stale(instance, config_path, cursor_path=tmp / "cursor", log=print)
            rerun_seconds = time.perf_counter() - started
        seconds = first.seconds
        window_bytes, cache_bytes = window_and_cache_bytes(cfg)
        print("\nseconds per asset (all partitions):")
        for name, value in seconds.items():
            print(f"  {name:<22} {value:8.2f} s  {100 * value / total:5.1f} %")
        rest = total - sum(seconds.values())
        print(f"  {'checks + setup':<22} {rest:8.2f} s  {100 * rest / total:5.1f} %")
        print(f"total first-pass wall time: {total:.2f} s (plus {imports:.1f} s of imports = "
              f"{total + imports:.1f} s)")
        print(f"rerun with nothing changed: {rerun_seconds:.2f} s, {rerun.evaluations} evaluation(s)")
        print_report(rerun, log=lambda line: print("  " + line))
        if args.keep:
            print(f"kept {tmp}")
        print(f"context window data (context_gather + context_windows): {window_bytes / 1e6:.2f} MB; "
              f"activation cache (cached_activations): {cache_bytes / 1e6:.2f} MB")
        print(f"window_bytes_vs_activation_cache: {window_bytes / cache_bytes:.4f}")
        print(f"demo_walltime_seconds: {total:.2f}")
        print(f"no_change_rerun_vs_first: {rerun_seconds / total:.4f}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
