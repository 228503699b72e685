"""The SAE frontier of the embedded default: L0 against held-out loss recovered, per architecture.

On the embedded default config (sae_assets/config/default.yaml; storage root and
DAGSTER_HOME under a work directory, an ephemeral Dagster instance) everything up to
`shuffled_shards` is materialized once, each asset partition by partition as `make demo` does
(`sae_assets.demo.materialize_all`'s loop). Then every `sae.sweep` point of ONE config is
materialized in turn, `sae_dictionary[point]` then `sae_metrics[point]` (each point its own
partition, all sharing the upstream), and its metrics are read back from the artifact store
(`store.require("sae_metrics", key).extra["metrics"]`).

The frontier (the default): the sweep is every architecture (`--architectures`) at every width
(`--widths`) and each architecture's sparsities (`FRONTIER_SPARSITIES`, chosen to span low to
high L0 on this data; `--sparsity ARCH=V/V2/...` replaces an architecture's values). Printed:
a table (architecture, width, sparsity, L0, loss recovered vs zero and vs mean ablation, FVU,
dead fraction, training seconds, checks) and a PNG (`--plot`): L0 (log) against loss recovered,
one colour per architecture, one marker per width, a line through each architecture x width's
sparsities; hollow markers failed an asset check.

`--resample-comparison`: instead, the config's own sweep (its sparsities replaced by
`--sparsity`) twice, with the packaged resampling (`sae.resample: true`,
`rewarm_after_resample: true`) and without (`false`, `false`), the second config overwriting
the first's partitions after its metrics are read; `--no-baseline` skips the second.

sae_metrics' blocking asset checks (dead fraction, loss recovered) raise
DagsterAssetCheckFailedError after the materialization is recorded; that is caught, noted in
the table ("checks" column) and the metrics are read all the same. `--train-tokens N` shortens
SAE training (the resample steps become the same fractions of the shorter run, since a step
past the end is a config error). `--workdir DIR` keeps the artifacts in DIR and, on a rerun,
reuses every partition whose manifest has the current code version and config hash (and, for
sae_metrics, the current dictionary): an interrupted sweep resumes where it stopped, trial
sparsities reuse the upstream (`--stored-only`: report what is stored, train nothing). Without
it everything lives in a temporary directory.

    .venv/bin/python bench/sae_sweep.py --train-tokens 1000000 [--widths 256,512]
        [--architectures relu,topk] [--sparsity relu=1/3/10] [--plot bench/results/sae_frontier.png]
        [--workdir .data/experiments/sae_frontier]
    .venv/bin/python bench/sae_sweep.py --resample-comparison [--train-tokens 2000000] [--no-baseline]
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

ARCHITECTURES = ("relu", "gated", "jumprelu", "topk", "batchtopk", "matryoshka")
FRONTIER_SPARSITIES: dict[str, tuple[float, ...]] = {
    # L1 coefficient (inputs scaled to norm sqrt(d_in)): larger = sparser.
    "relu": (1.0, 3.0, 10.0),
    "gated": (1.0, 3.0, 10.0),  # L1 on the gate
    # L0 coefficient (the loss's MSE is summed over d_in): larger = sparser.
    "jumprelu": (0.01, 0.1, 1.0),
    # k: the L0 itself (per token; on average over a batch for batchtopk and matryoshka).
    "topk": (8.0, 24.0, 64.0),
    "batchtopk": (8.0, 24.0, 64.0),
    "matryoshka": (8.0, 24.0, 64.0),
}
"""Each architecture's sparsities in the frontier, chosen to span low to high L0 on the embedded
default. At width 512 and 500k training tokens (488 steps), held-out L0: relu 53 / 30 / 14,
gated 71 / 17 / 4, jumprelu 86 / 25 / 8, the k ones about k (README, "The frontier")."""
COMPARISON_COLUMNS = ("point", "resample", "L0", "loss_rec", "loss_rec_mean", "FVU", "dead_frac", "tok/s",
                      "resamples", "checks", "seconds")
FRONTIER_COLUMNS = ("architecture", "width", "sparsity", "L0", "loss_rec", "loss_rec_mean", "FVU", "dead_frac",
                    "train_s", "checks")


def parse_sparsity(text: str) -> dict[str, list[float]]:
    """'relu=1/0.3,topk=16' -> {'relu': [1.0, 0.3], 'topk': [16.0]}."""
    wanted: dict[str, list[float]] = {}
    for item in filter(None, text.split(",")):
        arch, _, values = item.partition("=")
        if arch not in ARCHITECTURES or not values:
            raise SystemExit(f"--sparsity: {item!r} is not ARCH=V[/V2...] with ARCH one of {', '.join(ARCHITECTURES)}")
        wanted[arch] = [float(v) for v in values.split("/")]
    return wanted


def training_overrides(args: argparse.Namespace, base) -> dict:
    """The `sae` overrides of `--train-tokens` (the resample steps kept as fractions of the run)."""
    if not args.train_tokens:
        return {}
    return {"train_tokens": args.train_tokens,
            "resample_steps": [s if 0 < s < 1 else s / base.sae.total_steps for s in base.sae.resample_steps]}


def comparison_sweep(base, wanted: dict[str, list[float]]) -> list[dict] | None:
    """The config's sweep with each point of an architecture in `wanted` replaced by one per value."""
    if not wanted:
        return None
    return [{"architecture": p.architecture, "width": p.width, "sparsity": value, "prefixes": list(p.prefixes)}
            for p in base.sae.sweep for value in wanted.get(p.architecture, [p.sparsity])]


def frontier_sweep(architectures: list[str], widths: list[int], wanted: dict[str, list[float]]) -> list[dict]:
    """Every width x architecture x its sparsities (matryoshka with its default prefixes), in the
    order that makes a sweep cut short most useful: width by width, and within a width every
    architecture's middle sparsity, then every one's first, then the rest."""
    points = []
    for width in widths:
        values = {arch: list(wanted.get(arch, FRONTIER_SPARSITIES[arch])) for arch in architectures}
        rounds = max(len(v) for v in values.values())
        for rank in sorted(range(rounds), key=lambda r: (r != rounds // 2, r)):
            points += [{"architecture": arch, "width": width, "sparsity": v[rank]}
                       for arch, v in values.items() if rank < len(v)]
    return points


def is_current(store, asset, cfg, key: str | None) -> bool:
    """Whether `asset[key]` is stored with the code version and config hash the config would write."""
    from sae_assets.defs.identity import identity_of

    manifest = store.manifest(asset.key.to_user_string(), key)
    identity = identity_of(asset)
    return (manifest is not None and manifest.code_version == identity.version
            and manifest.config_hash == identity.config_hash(cfg, key))


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


def upstream(instance, config_path: str, log, reuse: bool) -> None:
    """Materialize what shuffled_shards is built from, and it, each partition in turn (as make
    demo; the training shards only where the asset says so); with `reuse`, skip the partitions
    already stored current."""
    import dagster as dg

    from resources import ArtifactStorage
    from sae_assets.core.config import load_config
    from sae_assets.defs.identity import identity_of
    from sae_assets.defs.partitions import partition_keys, sync_partitions, training_shard_keys
    from sae_assets.defs.shuffle_assets import shuffled_shards
    from sae_assets.definitions import ALL_ASSETS, ALL_CHECKS, build_resources
    from sae_assets.demo import QUIET

    cfg = load_config(config_path)
    sync_partitions(instance, cfg)
    resources = build_resources(config_path)
    store = ArtifactStorage.from_config(cfg.storage).store()
    definitions = [*ALL_ASSETS, *ALL_CHECKS]
    wanted = dg.AssetSelection.assets(shuffled_shards).upstream().resolve(ALL_ASSETS)
    for asset in (a for a in ALL_ASSETS if a.key in wanted):
        started = time.perf_counter()
        if identity_of(asset).training_shards_only:
            keys = list(training_shard_keys(instance, cfg))
        else:
            keys = partition_keys(asset.partitions_def, instance)
        stale = [key for key in keys if not (reuse and is_current(store, asset, cfg, key))]
        for key in stale:
            _, status = materialize(dg, definitions, asset, key, instance, resources, QUIET, log)
            if status != "ok":
                raise RuntimeError(f"{asset.key.to_user_string()}[{key}]: {status}")
        log(f"  {asset.key.to_user_string():<22} {len(stale)} of {len(keys)} partition(s) in "
            f"{time.perf_counter() - started:6.1f} s")


def sweep(instance, config_path: str, label: str, log, reuse: bool = False, stored_only: bool = False,
          row_log: Path | None = None) -> list[dict]:
    """sae_dictionary then sae_metrics for every sweep point of the config; one row per point.

    `reuse`: a point stored current is read, not retrained; `stored_only`: points not stored are
    skipped. `row_log`: each trained point's row is appended there (JSON lines), and a reused
    point takes its training speed from there."""
    import json

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
    log(f"config '{label}': {len(cfg.sae.sweep)} point(s); resample={cfg.sae.resample} "
        f"rewarm={cfg.sae.rewarm_after_resample} train_tokens={cfg.sae.train_tokens} ({steps} steps) "
        f"resample_steps={list(cfg.sae.resample_steps)}")
    logged: dict[str, dict] = {}
    if row_log is not None and row_log.exists():
        for line in row_log.read_text().splitlines():
            earlier = json.loads(line)
            logged[earlier["dictionary_version"]] = earlier
    rows = []
    for n, point in enumerate(cfg.sae.sweep, 1):
        key = point.key
        started = time.perf_counter()
        row = {"point": key, "architecture": point.architecture, "width": point.width, "sparsity": point.sparsity,
               "resample": "on" if cfg.sae.resample else "off", "checks": "failed"}
        trained = None
        reused = reuse and is_current(store, sae_dictionary, cfg, key)
        if stored_only and not reused:
            log(f"  [{n}/{len(cfg.sae.sweep)}] {key}: not stored, skipped")
            continue
        if reused:
            earlier = logged.get(store.require("sae_dictionary", key).data_version, {})
            row.update({name: earlier[name] for name in ("tok/s", "train_s", "resamples") if name in earlier})
        if not reused:
            trained, status = materialize(dg, definitions, sae_dictionary, key, instance, resources, SILENT, log)
            row["checks"] = status
        if trained is not None:
            meta = trained.asset_materializations_for_node("sae_dictionary")[0].metadata
            row["tok/s"] = meta["tokens_per_second"].value
            row["train_s"] = cfg.sae.train_tokens / row["tok/s"]
            row["resamples"] = meta["resamples"].value
        if trained is not None or reused:
            dictionary = store.require("sae_dictionary", key)
            metrics_manifest = store.manifest("sae_metrics", key)
            if (reused and is_current(store, sae_metrics_asset, cfg, key)
                    and dictionary.data_version in metrics_manifest.upstream.values()):
                status = "ok"
            else:
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
            if reused:
                row["checks"] += " (reused)"
            elif row_log is not None and trained is not None:
                with row_log.open("a") as out:
                    out.write(json.dumps({**row, "dictionary_version": dictionary.data_version}) + "\n")
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        log(f"  [{n}/{len(cfg.sae.sweep)}] {key} resample {row['resample']}: "
            + "  ".join(f"{name}={cell(row, name, 4)}" for name in COMPARISON_COLUMNS[2:]))
    return rows


def cell(row: dict, name: str, digits: int) -> str:
    value = row.get(name, "-")
    if name == "sparsity":
        return f"{value:g}"
    if isinstance(value, float):
        return f"{value:.0f}" if name in ("tok/s", "seconds", "train_s") else f"{value:.{digits}f}"
    return str(value)


def print_table(rows: list[dict], columns: tuple[str, ...]) -> None:
    """A Markdown table (pasted into the README as it is)."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(cell(row, c, 4) for c in columns) + " |")


def plot_frontier(rows: list[dict], path: Path, title: str) -> None:
    """L0 (log) against loss recovered vs zero ablation (left) and vs mean ablation (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colours = dict(zip(ARCHITECTURES, ("#1f77b4", "#2ca02c", "#9467bd", "#d62728", "#ff7f0e", "#8c564b")))
    widths = sorted({r["width"] for r in rows})
    markers = dict(zip(widths, "osD^vP*X"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), dpi=120)
    for ax, field, label in ((axes[0], "loss_rec", "vs zero ablation"), (axes[1], "loss_rec_mean", "vs mean ablation")):
        for arch in ARCHITECTURES:
            for width in widths:
                line = sorted((r for r in rows if r["architecture"] == arch and r["width"] == width
                               and r.get(field) is not None), key=lambda r: r["L0"])
                if not line:
                    continue
                ax.plot([r["L0"] for r in line], [r[field] for r in line], color=colours[arch], lw=1,
                        ls="-" if width == widths[-1] else "--", alpha=0.8)
                for r in line:
                    passed = r["checks"].startswith("passed")
                    ax.scatter(r["L0"], r[field], marker=markers[width], s=30, color=colours[arch],
                               facecolors=colours[arch] if passed else "none", zorder=3)
        ax.set_xscale("log")
        ax.set_xlabel("L0 (active features per token, held out)")
        ax.set_ylabel(f"loss recovered {label}")
        ax.grid(True, which="both", alpha=0.25)
    handles = [Line2D([], [], color=colours[a], lw=2, label=a) for a in ARCHITECTURES
               if any(r["architecture"] == a for r in rows)]
    handles += [Line2D([], [], color="#555", marker=markers[w], ls="-" if w == widths[-1] else "--",
                       label=f"width {w}") for w in widths]
    handles.append(Line2D([], [], color="#555", marker="o", ls="", markerfacecolor="none", label="failed a check"))
    axes[1].legend(handles=handles, loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-tokens", type=int, default=0, help="sae.train_tokens (0 = the config's)")
    parser.add_argument("--widths", default="256,512", help="frontier: dictionary widths (the default: 36 points, "
                        "about 15 minutes at 500k training tokens on two CPU cores)")
    parser.add_argument("--architectures", default=",".join(ARCHITECTURES), help="frontier: which architectures")
    parser.add_argument("--sparsity", default="",
                        help="replace sparsities by architecture, e.g. relu=1/0.3,topk=16")
    parser.add_argument("--plot", default=str(_common.REPO_ROOT / "bench" / "results" / "sae_frontier.png"),
                        help="frontier: where the PNG goes")
    parser.add_argument("--model-train-tokens", type=int, default=0,
                        help="model.train_tokens (0 = the config's; smaller only for quick trials)")
    parser.add_argument("--resample-comparison", action="store_true",
                        help="the config's sweep with resampling on and off instead of the frontier")
    parser.add_argument("--no-baseline", action="store_true", help="--resample-comparison: skip resampling off")
    parser.add_argument("--workdir", default="", help="keep artifacts here and reuse what is current (default: a "
                        "temporary directory, removed at the end)")
    parser.add_argument("--stored-only", action="store_true",
                        help="with --workdir: report the points already stored there, train nothing")
    args = parser.parse_args()

    architectures = [a for a in args.architectures.split(",") if a]
    unknown = sorted(set(architectures) - set(ARCHITECTURES))
    if unknown:
        raise SystemExit(f"--architectures: unknown {unknown}; choose from {', '.join(ARCHITECTURES)}")
    wanted = parse_sparsity(args.sparsity)
    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-sae-sweep-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        _common.isolate_env(tmp)
        import dagster as dg

        from sae_assets.core.config import load_config

        base = load_config(None)
        sae = training_overrides(args, base)
        if args.resample_comparison:
            points = comparison_sweep(base, wanted)
        else:
            points = frontier_sweep(architectures, [int(w) for w in args.widths.split(",")], wanted)
        if points is not None:
            sae["sweep"] = points
        model = {"model": {"train_tokens": args.model_train_tokens}} if args.model_train_tokens else {}
        overrides = _common.merge({"sae": sae}, model)
        on_path = _common.write_config(tmp, overrides, name="sweep.yaml")
        off_path = _common.write_config(tmp, _common.merge(
            overrides, {"sae": {"resample": False, "rewarm_after_resample": False}}), name="resample_off.yaml")
        cfg = load_config(on_path)
        print(f"embedded default; {len(cfg.sae.sweep)} sweep point(s); sae.train_tokens {cfg.sae.train_tokens}; "
              f"model.train_tokens {cfg.model.train_tokens}; artifacts in {tmp}", flush=True)
        log = lambda line: print(line, flush=True)  # noqa: E731
        started = time.perf_counter()
        reuse = bool(args.workdir)
        with dg.DagsterInstance.ephemeral(tempdir=str(tmp / "instance")) as instance:
            upstream(instance, on_path, log, reuse)
            rows = sweep(instance, on_path, "resample on" if args.resample_comparison else "frontier", log, reuse,
                         stored_only=args.stored_only and reuse, row_log=tmp / "rows.jsonl" if reuse else None)
            if args.resample_comparison and not args.no_baseline:
                rows += sweep(instance, off_path, "resample off", log)
        print(f"\ntotal {time.perf_counter() - started:.0f} s; loss_rec = loss recovered vs zero ablation, "
              f"loss_rec_mean = vs mean ablation, FVU = fraction of variance unexplained, all on held-out tokens\n")
        if args.resample_comparison:
            rows.sort(key=lambda r: (r["point"], r["resample"] != "on"))
            print_table(rows, COMPARISON_COLUMNS)
        else:
            order = {arch: i for i, arch in enumerate(ARCHITECTURES)}
            rows.sort(key=lambda r: (order[r["architecture"]], r["width"], r.get("L0", 0)))
            print_table(rows, FRONTIER_COLUMNS)
            plot_frontier(rows, Path(args.plot), f"SAE frontier on the embedded default: held-out tokens, "
                          f"{cfg.sae.train_tokens:,} training tokens per dictionary")
            print(f"\nplot: {args.plot}")
        print(f"sae_sweep_points: {len(rows)}")
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
