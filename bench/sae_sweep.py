"""The SAE sweep of the embedded default, trained and evaluated with resampling on and off.

On the embedded default config (sae_assets/config/default.yaml; storage root and
DAGSTER_HOME in a temporary directory, an ephemeral Dagster instance) everything up to
`shuffled_shards` is materialized once, each asset partition by partition as `make demo` does
(`sae_assets.demo.materialize_all`'s loop). Then, for two configs that differ only in
resampling, every `sae.sweep` point is materialized: `sae_dictionary[point]`, then
`sae_metrics[point]`, and its metrics are read back from the artifact store
(`store.require("sae_metrics", key).extra["metrics"]`) before the next config overwrites the
partition (both configs share the upstream artifacts and the partition keys):

- resample on: the packaged defaults (`sae.resample: true`, `rewarm_after_resample: true`);
- resample off: the same with `sae.resample: false` and `sae.rewarm_after_resample: false`.

sae_metrics' blocking asset checks (dead fraction, loss recovered) raise
DagsterAssetCheckFailedError after the materialization is recorded; that is caught, noted in
the table ("checks" column) and the metrics are read all the same.

Printed per point: resampling, L0, loss recovered vs zero ablation and vs mean ablation,
FVU, dead fraction, training tokens/s (the `tokens_per_second` metadata of sae_dictionary),
resample events, checks and wall seconds. `--train-tokens N` shortens SAE training (the
resample steps stay at their configured steps, so a run shorter than the first of them never
resamples: the script says so). `--sparsity ARCH=V[/V2...],...` replaces each sweep point of
that architecture by one point per value, to try alternatives (e.g. `--sparsity relu=1/0.3`);
`--no-baseline` skips the resample-off config. Defaults take 10+ minutes on 2 busy cores.

    .venv/bin/python bench/sae_sweep.py [--train-tokens 2000000] [--sparsity relu=1] [--no-baseline]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common

SILENT = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
"""Failed asset checks are expected here (they are reported in the table), so not logged."""
COLUMNS = ("point", "resample", "L0", "loss_rec", "loss_rec_mean", "FVU", "dead_frac", "tok/s", "resamples",
           "checks", "seconds")


def sweep_overrides(args: argparse.Namespace, base) -> dict:
    """The `sae` overrides shared by both configs (train tokens, replaced sparsities)."""
    sae: dict = {}
    if args.train_tokens:
        sae["train_tokens"] = args.train_tokens
    if args.sparsity:
        wanted = {arch: [float(v) for v in values.split("/")]
                  for arch, values in (item.split("=", 1) for item in args.sparsity.split(","))}
        sweep = []
        for p in base.sae.sweep:
            for value in wanted.get(p.architecture, [p.sparsity]):
                sweep.append({"architecture": p.architecture, "width": p.width, "sparsity": value,
                              "prefixes": list(p.prefixes)})
        sae["sweep"] = sweep
    return {"sae": sae} if sae else {}


def materialize(dg, definitions, asset, key, instance, resources, quiet, log) -> tuple[object, str]:
    """(result or None, 'ok' | 'check failed: ...' | 'failed: ...') of one asset partition."""
    from dagster._core.errors import DagsterAssetCheckFailedError

    from sae_assets.definitions import ALL_CHECKS

    selection = dg.AssetSelection.assets(asset) - dg.AssetSelection.checks(*ALL_CHECKS)
    try:
        return dg.materialize(definitions, selection=selection, partition_key=key, instance=instance,
                              resources=resources, run_config=quiet), "ok"
    except DagsterAssetCheckFailedError as exc:
        return None, "check failed: " + str(exc).splitlines()[-1].strip()
    except Exception as exc:  # noqa: BLE001 (a failed point is reported, the sweep goes on)
        log(f"  {asset.key.to_user_string()}[{key}] FAILED: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        return None, f"failed: {type(exc).__name__}"


def upstream(instance, config_path: str, log) -> None:
    """Materialize every asset before sae_dictionary, each partition in turn (as make demo)."""
    import dagster as dg

    from sae_assets.core.config import load_config
    from sae_assets.defs.partitions import partition_keys, sync_partitions
    from sae_assets.defs.shuffle_assets import shuffled_shards
    from sae_assets.definitions import ALL_ASSETS, ALL_CHECKS, build_resources
    from sae_assets.demo import QUIET

    sync_partitions(instance, load_config(config_path))
    resources = build_resources(config_path)
    definitions = [*ALL_ASSETS, *ALL_CHECKS]
    for asset in ALL_ASSETS[: ALL_ASSETS.index(shuffled_shards) + 1]:
        started = time.perf_counter()
        keys = partition_keys(asset.partitions_def, instance)
        for key in keys:
            _, status = materialize(dg, definitions, asset, key, instance, resources, QUIET, log)
            if status != "ok":
                raise RuntimeError(f"{asset.key.to_user_string()}[{key}]: {status}")
        log(f"  {asset.key.to_user_string():<22} {len(keys)} partition(s) in {time.perf_counter() - started:6.1f} s")


def sweep(instance, config_path: str, label: str, log) -> list[dict]:
    """sae_dictionary then sae_metrics for every sweep point of the config; one row per point."""
    import dagster as dg

    from resources import ArtifactStorage
    from sae_assets.core.config import load_config
    from sae_assets.core.sae.training import total_steps
    from sae_assets.defs.dictionary_assets import sae_dictionary
    from sae_assets.defs.metrics_assets import sae_metrics_asset
    from sae_assets.defs.partitions import sync_partitions
    from sae_assets.definitions import ALL_ASSETS, ALL_CHECKS, build_resources

    cfg = load_config(config_path)
    sync_partitions(instance, cfg)
    resources = build_resources(config_path)
    definitions = [*ALL_ASSETS, *ALL_CHECKS]
    store = ArtifactStorage.from_config(cfg.storage).store()
    steps = total_steps(cfg.sae)
    late = [s for s in cfg.sae.resample_steps if s >= steps]
    log(f"config '{label}': resample={cfg.sae.resample} rewarm={cfg.sae.rewarm_after_resample} "
        f"train_tokens={cfg.sae.train_tokens} ({steps} steps) resample_steps={list(cfg.sae.resample_steps)}"
        + (f"  [note: {late} >= the run's {steps} steps, never reached]" if cfg.sae.resample and late else ""))
    rows = []
    for point in cfg.sae.sweep:
        key = point.key
        started = time.perf_counter()
        trained, status = materialize(dg, definitions, sae_dictionary, key, instance, resources, SILENT, log)
        row = {"point": key, "resample": "on" if cfg.sae.resample else "off", "checks": status}
        if trained is not None:
            meta = trained.asset_materializations_for_node("sae_dictionary")[0].metadata
            row["tok/s"] = meta["tokens_per_second"].value
            row["resamples"] = meta["resamples"].value
            _, status = materialize(dg, definitions, sae_metrics_asset, key, instance, resources, SILENT, log)
            row["checks"] = "passed" if status == "ok" else status
            if not status.startswith("failed"):
                manifest = store.require("sae_metrics", key)
                metrics = manifest.extra["metrics"]
                row.update(L0=metrics["l0"], loss_rec=metrics["loss_recovered"],
                           loss_rec_mean=metrics["loss_recovered_vs_mean"], FVU=metrics["fvu"],
                           dead_frac=metrics["dead_fraction"])
                failed = [name for name, ok in manifest.extra.get("checks", {}).items() if not ok]
                if failed:
                    row["checks"] = "FAILED " + ",".join(failed)
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        log(f"  {key} resample {row['resample']}: {format_row(row)}")
    return rows


def format_row(row: dict) -> str:
    def cell(name: str) -> str:
        value = row.get(name, "-")
        if isinstance(value, float):
            return f"{value:.0f}" if name in ("tok/s", "seconds") else f"{value:.4g}"
        return str(value)

    return "  ".join(f"{name}={cell(name)}" for name in COLUMNS[1:])


def print_table(rows: list[dict]) -> None:
    widths = {"point": max(len("point"), *(len(r["point"]) for r in rows)), "checks": 40}
    print("  ".join(f"{c:<{widths.get(c, 11)}}" for c in COLUMNS))
    for row in rows:
        cells = []
        for c in COLUMNS:
            value = row.get(c, "-")
            if isinstance(value, float):
                value = f"{value:.0f}" if c in ("tok/s", "seconds") else f"{value:.4f}"
            cells.append(f"{str(value):<{widths.get(c, 11)}}")
        print("  ".join(cells).rstrip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-tokens", type=int, default=0, help="sae.train_tokens (0 = the config's)")
    parser.add_argument("--sparsity", default="",
                        help="replace sweep sparsities by architecture, e.g. relu=1/0.3,topk=16")
    parser.add_argument("--model-train-tokens", type=int, default=0,
                        help="model.train_tokens (0 = the config's; smaller only for quick trials)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the resample-off config")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir and print its path")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-sae-sweep-"))
    try:
        _common.isolate_env(tmp)
        import dagster as dg

        from sae_assets.core.config import load_config

        base = load_config(None)
        model = {"model": {"train_tokens": args.model_train_tokens}} if args.model_train_tokens else {}
        overrides = _common.merge(sweep_overrides(args, base), model)
        on_path = _common.write_config(tmp, overrides, name="resample_on.yaml")
        off_path = _common.write_config(tmp, _common.merge(
            overrides, {"sae": {"resample": False, "rewarm_after_resample": False}}), name="resample_off.yaml")
        cfg = load_config(on_path)
        print(f"embedded default; sweep {[p.key for p in cfg.sae.sweep]}; sae.train_tokens {cfg.sae.train_tokens}; "
              f"model.train_tokens {cfg.model.train_tokens}; artifacts in {tmp}", flush=True)
        log = lambda line: print(line, flush=True)  # noqa: E731
        started = time.perf_counter()
        with dg.DagsterInstance.ephemeral(tempdir=str(tmp / "instance")) as instance:
            upstream(instance, on_path, log)
            rows = sweep(instance, on_path, "resample on", log)
            if not args.no_baseline:
                rows += sweep(instance, off_path, "resample off", log)
        print(f"\ntotal {time.perf_counter() - started:.0f} s; loss_rec = loss recovered vs zero ablation, "
              f"loss_rec_mean = vs mean ablation, FVU = fraction of variance unexplained, on held-out tokens\n")
        rows.sort(key=lambda r: (r["point"], r["resample"] != "on"))
        print_table(rows)
        if args.keep:
            print(f"kept {tmp}")
        print(f"sae_sweep_points: {len(rows)}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
