"""Which tricks matter for training a ReLU SAE? The experiment behind `make experiments`' second table.

"My best guess at the important tricks for training 1L SAEs" ranks five choices by their
effect on L0 and loss recovered: SAE width, resampling dead features (Anthropic's against plain
re-initialisation), an LR warm-up at the start and after every resample, the LR, and shuffling
(which it found did not matter, or hurt). This script varies one factor at a time from a base
setting, each setting over several seeds, on the embedded default's activations:

1. materializes the embedded default up to `shuffled_shards` (corpus, tokenizer, token shards,
   the language model, cached activations, the shuffle) under `--workdir`, unless the language
   model and the shuffle there are fresh (current code version and config hash);
2. trains a ReLU SAE per setting and seed with the core training loop (`train_sae`), on the
   same training rows in one of three orders (`--buffer-rows` sets the buffer):
   exact = our shuffle (`shuffled_shards` read as sae_dictionary reads them),
   buffer = a SAELens-style mixing buffer over cache order, none = cache order
   (`sae_assets/core/sae/data_order.py`); every order starts from the same initialisation;
3. scores each SAE with the core evaluation (`evaluate_dictionary`) on held-out sequences the
   SAEs never saw (one fixed sample for all): L0, loss recovered against zero ablation (the
   write-up's metric) and against mean ablation.

Resample points are fractions of the run, so a shorter `--train-tokens` still resamples; the
table's `resamples` column counts the resampling events that happened (a point with no dead
feature does nothing). Prints a markdown table (mean ± std over seeds) and writes a frontier plot
(L0 against loss recovered, one marker per setting). Last line: `training_tricks_runs: <n>`.
The dead fraction is the training tracker's at the end (features silent on the last
sae.dead_after_tokens training tokens). The 30 SAEs take about 6 minutes on 2 busy cores (one
torch thread: on shared cores a second one mostly waits), after the upstream (minutes on a quiet
machine, once). `--quick` is a smoke run of a minute or two after the upstream.

    .venv/bin/python bench/training_tricks.py [--seeds 0,1,2] [--train-tokens 131072] [--quick]
        [--plot bench/results/training_tricks.png] [--rematerialize]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import _common

WORKDIR = _common.REPO_ROOT / ".data" / "experiments" / "training_tricks"


@dataclass(frozen=True)
class Setting:
    factor: str
    name: str
    sae: dict = field(default_factory=dict)
    """SaeConfig fields changed from the base."""
    order: str = "exact"
    """exact | buffer | none: the order the training rows come in."""


BASE_WIDTH, WIDE = 256, 1024
SETTINGS = (
    Setting("base", f"base: width {BASE_WIDTH}, Anthropic resampling, LR warm-ups, LR 1e-3, exact shuffle"),
    Setting("width", f"width {WIDE}", {"width": WIDE}),
    Setting("resampling", "plain re-initialisation", {"resample_method": "reinit"}),
    Setting("resampling", "no resampling", {"resample": False}),
    Setting("LR warm-up", "no LR re-warm-up after resampling", {"rewarm_after_resample": False}),
    Setting("LR warm-up", "no LR warm-up at all (start or after resampling)",
            {"lr_warmup_steps": 0, "rewarm_after_resample": False}),
    Setting("LR", "LR 3e-4", {"learning_rate": 3e-4}),
    Setting("LR", "LR 3e-3", {"learning_rate": 3e-3}),
    Setting("shuffle", "SAELens-style mixing buffer", order="buffer"),
    Setting("shuffle", "no shuffle (cache order)", order="none"),
)


def base_sae(cfg, args):
    """The base setting's SaeConfig: one ReLU point, resample points as fractions of the run."""
    from sae_assets.core.config import DictionaryPoint, replace

    steps = args.train_tokens // args.batch_size
    return replace(cfg.sae, sweep=(DictionaryPoint("relu", BASE_WIDTH, args.l1),), train_tokens=args.train_tokens,
                   batch_size=args.batch_size, learning_rate=1e-3, resample=True, resample_method="anthropic",
                   resample_steps=(0.2, 0.4, 0.6), rewarm_after_resample=True,
                   lr_warmup_steps=max(1, steps // 25), rewarm_steps=max(1, steps // 25),
                   dead_after_tokens=max(args.batch_size, args.train_tokens // 8), checkpoint_every=10**9)


def setting_sae(base, setting: Setting, seed: int):
    from sae_assets.core.config import replace

    changes = dict(setting.sae)
    point = base.sweep[0]
    if "width" in changes:
        point = replace(point, width=changes.pop("width"))
    return replace(base, sweep=(point,), seed=seed, **changes)


class Inputs:
    """What every run shares: the shuffled stream's buckets, the rows in cache order, the model
    and the evaluation samples."""

    def __init__(self, instance, cfg, eval_sequences: int) -> None:
        import numpy as np
        import torch

        from resources import ArtifactStorage
        from resources.arrow_files import open_ipc_table
        from sae_assets.core.config import replace
        from sae_assets.core.sae import data as sae_data
        from sae_assets.defs.model_assets import load_all_sequences, load_language_model
        from sae_assets.defs.partitions import bucket_index, bucket_keys, training_shard_keys
        from sae_assets.defs.shuffle_assets import SHUFFLED_FILE

        store = ArtifactStorage.from_config(cfg.storage).store()
        keys = [k for k in bucket_keys(instance) if bucket_index(k) < cfg.shuffle.num_buckets]
        self.buckets = [open_ipc_table(store.fetch(store.require("shuffled_shards", k), SHUFFLED_FILE)) for k in keys]
        self.bucket_names = [f"shuffled_shards[{k}]" for k in keys]
        self.hook = cfg.sae_hook
        # Cache order: the training rows of one epoch of the exact stream (held-out tokens dropped
        # as training drops them), sorted back by global token index (shard, then position).
        stream = sae_data.TrainingStream.for_run(self.buckets, cfg, self.bucket_names)
        acts, index = [], []
        for acts_BD, index_B in stream.reader.epoch(0):
            keep_B = ~sae_data.heldout_tokens(index_B.numpy(), cfg.tokenizer.context_length, cfg.model.val_fraction,
                                              cfg.model.seed)
            acts.append(acts_BD[torch.from_numpy(keep_B)])
            index.append(index_B[torch.from_numpy(keep_B)])
        order = torch.cat(index).argsort()
        self.cache_order_ND = torch.cat(acts)[order].contiguous()
        self.d_in = self.cache_order_ND.shape[1]
        self.model, _ = load_language_model(store, device="cpu")
        tokens_ST, first_S, _ = load_all_sequences(store, training_shard_keys(instance, cfg))
        sample = sae_data.evaluation_sample(first_S, replace(cfg, sae=replace(cfg.sae, eval_sequences=eval_sequences)))
        self.eval_ST, self.mean_ST = tokens_ST[sample.eval_S], tokens_ST[sample.mean_S]
        self.eval_tokens = int(np.prod(self.eval_ST.shape))


def train_one(inputs: Inputs, cfg, sae_cfg, setting: Setting, args) -> dict:
    """Train and score one SAE; its metrics, resampling events and seconds."""
    from sae_assets.core.config import replace
    from sae_assets.core.sae import build_sae, train_sae
    from sae_assets.core.sae import data as sae_data
    from sae_assets.core.sae.data_order import buffered_batches, cache_order_batches
    from sae_assets.core.sae.evaluation import evaluate_dictionary

    started = time.perf_counter()
    run_cfg = replace(cfg, sae=sae_cfg)
    stream = sae_data.TrainingStream.for_run(inputs.buckets, run_cfg, inputs.bucket_names)
    point = sae_cfg.sweep[0]
    sae = build_sae(point, inputs.d_in, sae_cfg, stream.init_sample(8))  # the same start for every order
    if setting.order == "exact":
        batches = stream.batches
    elif setting.order == "buffer":
        batches = buffered_batches(inputs.cache_order_ND, sae_cfg.batch_size, buffer_rows=args.buffer_rows,
                                   seed=sae_cfg.seed)
    else:
        batches = cache_order_batches(inputs.cache_order_ND, sae_cfg.batch_size)
    outcome = train_sae(sae, batches, sae_cfg, point, log_every=max(1, sae_cfg.total_steps // 20))
    evaluation = evaluate_dictionary(inputs.model, sae.eval(), inputs.hook, inputs.eval_ST, inputs.mean_ST,
                                     inputs.eval_ST, batch_size=32)
    m = evaluation.metrics
    # Dead: silent on the last sae.dead_after_tokens training tokens (the tracker resampling uses);
    # the held-out sample is too short to call a feature dead.
    return {"l0": m["l0"], "loss_recovered": m["loss_recovered"], "loss_recovered_vs_mean": m["loss_recovered_vs_mean"],
            "dead_fraction": outcome.curve[-1]["dead_fraction"], "resamples": outcome.resamples,
            "seconds": time.perf_counter() - started}


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else float("nan")
    return mean, math.sqrt(var)


def summarise(results: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for setting in SETTINGS:
        runs = results.get(setting.name)
        if not runs:
            continue
        row = {"factor": setting.factor, "setting": setting.name}
        for key in ("l0", "loss_recovered", "loss_recovered_vs_mean", "dead_fraction"):
            row[key] = mean_std([r[key] for r in runs])
        row["resamples"] = "/".join(str(r["resamples"]) for r in runs)
        row["seconds"] = sum(r["seconds"] for r in runs) / len(runs)
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    show = lambda pair, digits: f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"  # noqa: E731
    print("| factor | setting | L0 | loss recovered (zero abl.) | loss recovered (mean abl.) | dead fraction "
          "| resamples per seed | s per run |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['factor']} | {r['setting']} | {show(r['l0'], 1)} | {show(r['loss_recovered'], 4)} "
              f"| {show(r['loss_recovered_vs_mean'], 3)} | {show(r['dead_fraction'], 3)} | {r['resamples']} "
              f"| {r['seconds']:.0f} |")


COLOURS = {"base": "#111111", "width": "#2563eb", "resampling": "#dc2626", "LR warm-up": "#9333ea",
           "LR": "#16a34a", "shuffle": "#d97706"}


def plot(rows: list[dict], path: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = iter("oDs^v<>Pp*Xh")
    fig, ax = plt.subplots(figsize=(10.5, 5.2), dpi=120)
    for r in rows:
        (x, dx), (y, dy) = r["l0"], r["loss_recovered"]
        ax.errorbar(x, y, xerr=dx, yerr=dy, fmt=next(markers), color=COLOURS.get(r["factor"], "#777"), ms=7,
                    capsize=2, label=r["setting"] if r["factor"] == "base" else f"{r['factor']}: {r['setting']}")
    ax.set_xlabel("L0 (features active per token; lower is sparser)")
    ax.set_ylabel("loss recovered vs zero ablation (held out)")
    ax.set_title(f"One factor at a time from the base (mean ± std over seeds)\n{subtitle}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def upstream_fresh(instance, cfg) -> bool:
    """True when --workdir holds the language model and every shuffled bucket, written by the
    current code version under the current config (their manifests' code version and config hash)."""
    import importlib

    from resources import ArtifactStorage
    from sae_assets.defs.identity import DECLARED
    from sae_assets.defs.partitions import bucket_index, bucket_keys

    importlib.import_module("sae_assets.definitions")  # its asset modules declare the identities
    store = ArtifactStorage.from_config(cfg.storage).store()
    wanted = [("language_model", None)] + [("shuffled_shards", k) for k in bucket_keys(instance)
                                           if bucket_index(k) < cfg.shuffle.num_buckets]
    try:
        manifests = [(DECLARED[name], key, store.require(name, key)) for name, key in wanted]
    except Exception:  # noqa: BLE001 (anything missing: materialize)
        return False
    return len(wanted) > 1 and all(m.code_version == ident.version and m.config_hash == ident.config_hash(cfg, key)
                                   for ident, key, m in manifests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train-tokens", type=int, default=131_072, help="SAE training tokens per run")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--l1", type=float, default=5.0, help="the L1 coefficient of every run")
    parser.add_argument("--buffer-rows", type=int, default=16_384, help="the mixing buffer's size (rows)")
    parser.add_argument("--eval-sequences", type=int, default=48, help="held-out sequences scored")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 10 steps each")
    parser.add_argument("--rematerialize", action="store_true",
                        help="materialize the upstream even if --workdir holds a fresh shuffle and model")
    parser.add_argument("--workdir", default=str(WORKDIR))
    parser.add_argument("--plot", default=str(_common.REPO_ROOT / "bench" / "results" / "training_tricks.png"))
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.train_tokens, args.eval_sequences, args.buffer_rows = "0,1", 10 * args.batch_size, 4, 2048
    seeds = [int(s) for s in args.seeds.split(",")]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _common.isolate_env(workdir)
    import dagster as dg
    import torch

    from sae_assets.core.config import load_config
    from sae_assets.demo import materialize_upstream_of

    torch.set_num_threads(1)  # on busy cores a second thread mostly waits for the first
    config_path = _common.write_config(workdir, {}, None, name="experiment.yaml")
    cfg = load_config(config_path)
    started = time.perf_counter()
    results: dict[str, list[dict]] = {}
    with dg.DagsterInstance.get() as instance:
        if args.rematerialize or not upstream_fresh(instance, cfg):
            materialize_upstream_of(instance, config_path, "shuffled_shards")
        inputs = Inputs(instance, cfg, args.eval_sequences)
    base = base_sae(cfg, args)
    print(f"embedded default: {len(inputs.cache_order_ND)} training rows of width {inputs.d_in} at {inputs.hook}; "
          f"{inputs.eval_tokens} held-out tokens scored; upstream {time.perf_counter() - started:.0f} s", flush=True)
    print(f"each run: relu, L1 {args.l1}, {base.train_tokens} tokens = {base.total_steps} steps of {base.batch_size}; "
          f"resample at {list(base.resample_steps)} of the run, dead after {base.dead_after_tokens} tokens; "
          f"warm-ups {base.lr_warmup_steps} / {base.rewarm_steps} steps; mixing buffer {args.buffer_rows} rows; "
          f"seeds {seeds}", flush=True)
    for setting in SETTINGS:
        for seed in seeds:
            run = train_one(inputs, cfg, setting_sae(base, setting, seed), setting, args)
            results.setdefault(setting.name, []).append(run)
            print(f"  {setting.name} seed {seed}: L0 {run['l0']:.1f} loss recovered {run['loss_recovered']:.4f} "
                  f"dead {run['dead_fraction']:.3f} resamples {run['resamples']} ({run['seconds']:.0f} s)", flush=True)
    rows = summarise(results)
    (workdir / "results.json").write_text(json.dumps({"args": vars(args), "runs": results}, indent=2))
    print(f"\ntotal {time.perf_counter() - started:.0f} s; seeds {seeds}; held-out loss recovered and L0 on "
          f"{inputs.eval_tokens} tokens the SAEs never saw; dead fraction from the training tracker\n")
    print_table(rows)
    plot(rows, Path(args.plot), f"ReLU SAEs on the embedded default, {base.train_tokens} tokens each, seeds {seeds}")
    print(f"plot: {args.plot}")
    print(f"training_tricks_runs: {sum(len(v) for v in results.values())}")


if __name__ == "__main__":
    main()
