"""Training throughput of the `language_model` asset against a bare loop on the same model and data.

Materializes corpus_shards, tokenizer and token_shards once on the embedded default with a
reduced model.train_tokens (temp storage root, ephemeral instance), warms up with a few bare
steps, then alternates (rotating which goes first; short runs, many rounds, so load from
other processes lands on both sides):

- subject: `dg.materialize` of `language_model`; its `tokens_per_second` metadata (optimiser
  steps only, evaluation excluded) and the wall time of the whole asset step;
- baseline: a hand-written loop over the same batches (`lm_train.batch_indices` on the same
  train split and seed) of a fresh `lm.build_embedded_model`: AdamW, forward, cross-entropy,
  backward, step; no clipping, logging or evaluation.

Each optimiser step of both is also timed on its own (the asset's through a thin wrapper
around `lm_train.train_step`), and the ratio of median step times is printed: with 2 cores
shared with other processes, whole-run figures swing widely (torch's threads stall when a
core is taken), and per-step medians are the steadier view. `--threads 1` steadies both.

Headline: the median over rounds of asset tokens/s (metadata) / bare tokens/s of the same
round (the ratio of the medians is printed too).

    .venv/bin/python bench/lm_train_overhead.py [--train-tokens 16384] [--repeats 8] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common


def bare_loop(cfg, vocab_size: int, context_length: int, batches, step_seconds: list[float] | None = None) -> float:
    """Seconds of a minimal AdamW loop over `batches` on a freshly built embedded model."""
    import torch
    import torch.nn.functional as F

    from sae_assets.core.model import lm

    model = lm.build_embedded_model(cfg, vocab_size=vocab_size, context_length=context_length)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.95),
                                  weight_decay=cfg.weight_decay)
    total = 0.0
    for batch_BT in batches:
        started = time.perf_counter()
        logits_BTV = model(batch_BT)
        loss = F.cross_entropy(logits_BTV[:, :-1].reshape(-1, logits_BTV.shape[-1]), batch_BT[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds = time.perf_counter() - started
        total += seconds
        if step_seconds is not None:
            step_seconds.append(seconds)
    return total


def record_steps(lm_train, step_seconds: list[float]) -> None:
    """Time every call of lm_train.train_step (train_language_model looks it up at call time)."""
    original = lm_train.train_step

    def timed_step(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            step_seconds.append(time.perf_counter() - started)

    lm_train.train_step = timed_step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-tokens", type=int, default=16_384, help="model.train_tokens (8 steps by default)")
    parser.add_argument("--repeats", type=int, default=8, help="rounds: runs of each of asset and bare loop")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    parser.add_argument("--config", help="a run config YAML laid over the packaged defaults")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-lm-"))
    try:
        _common.isolate_env(tmp)
        import dagster as dg
        import numpy as np
        import torch

        from sae_assets.core.model import lm
        from sae_assets.core.model import training as lm_train
        from sae_assets.core.config import load_config
        from sae_assets.defs import corpus_assets, model_assets
        from sae_assets.defs.partitions import shard_keys, sync_partitions
        from sae_assets.definitions import ALL_ASSETS, build_resources
        from sae_assets.demo import QUIET

        if args.threads:
            torch.set_num_threads(args.threads)
        config_path = _common.write_config(tmp, {"model": {"train_tokens": args.train_tokens}}, args.config)
        cfg = load_config(config_path)
        resources = build_resources(config_path)
        instance = dg.DagsterInstance.ephemeral(tempdir=str(tmp / "instance"))
        sync_partitions(instance, cfg)
        started = time.perf_counter()
        for asset in (corpus_assets.corpus_shards, corpus_assets.tokenizer, corpus_assets.token_shards):
            for key in (shard_keys(instance) if asset.partitions_def else [None]):
                dg.materialize(ALL_ASSETS, selection=dg.AssetSelection.assets(asset), partition_key=key,
                               instance=instance, resources=resources, run_config=QUIET)
        print(f"upstream assets materialized in {time.perf_counter() - started:.1f} s")

        store = resources["storage"].store()
        tokens, first_index, _ = model_assets.load_all_sequences(store, shard_keys(instance))
        is_val = lm.split_is_validation(first_index, cfg.model.val_fraction, cfg.model.seed)
        vocab_size = store.require("tokenizer", None).extra["vocab_size"]
        context_length = tokens.shape[1]
        train = torch.from_numpy(tokens[~is_val].astype(np.int64))  # (N, T)
        tokens_per_step = cfg.model.batch_size * context_length
        steps = max(1, math.ceil(cfg.model.train_tokens / tokens_per_step))
        batches = [train[idx] for idx in lm_train.batch_indices(len(train), cfg.model.batch_size, steps, cfg.model.seed)]
        trained_tokens = steps * tokens_per_step
        print(f"model {cfg.model.n_layers}L d{cfg.model.d_model} vocab {vocab_size} ctx {context_length}; "
              f"{len(train)} train sequences; {steps} steps x {tokens_per_step} tokens = {trained_tokens} tokens; "
              f"torch threads {torch.get_num_threads()}")

        asset_tps: list[float] = []
        asset_wall: list[float] = []
        bare_seconds: list[float] = []
        asset_steps: list[float] = []
        bare_steps: list[float] = []
        record_steps(lm_train, asset_steps)

        def run_asset() -> None:
            wall, outcome = _common.timed(lambda: dg.materialize(
                ALL_ASSETS, selection=dg.AssetSelection.assets(model_assets.language_model), instance=instance,
                resources=resources, run_config=QUIET))
            [event] = outcome.asset_materializations_for_node("language_model")
            asset_tps.append(float(event.metadata["tokens_per_second"].value))
            asset_wall.append(wall)

        def run_bare() -> None:
            bare_seconds.append(bare_loop(cfg.model, vocab_size, context_length, batches, bare_steps))

        bare_loop(cfg.model, vocab_size, context_length, batches[:3])  # warm-up: allocator, kernels
        for r in range(args.repeats):  # alternate, rotating which goes first
            for name, fn in ([("bare", run_bare), ("asset", run_asset)] if r % 2 == 0 else
                             [("asset", run_asset), ("bare", run_bare)]):
                fn()
                shown = (f"{trained_tokens / bare_seconds[-1]:9.0f} tokens/s ({bare_seconds[-1]:.1f} s)"
                         if name == "bare" else
                         f"{asset_tps[-1]:9.0f} tokens/s in training steps; whole step {asset_wall[-1]:.1f} s")
                print(f"  round {r}: {name:<5} {shown}")

        bare_tps = [trained_tokens / s for s in bare_seconds]
        whole_tps = [trained_tokens / s for s in asset_wall]
        m_asset, m_bare, m_whole = (statistics.median(v) for v in (asset_tps, bare_tps, whole_tps))
        print("\nmedians:")
        print(f"  bare loop                          {m_bare:9.0f} tokens/s")
        print(f"  language_model (metadata, steps)   {m_asset:9.0f} tokens/s   ratio {m_asset / m_bare:.3f}")
        print(f"  language_model (whole asset step)  {m_whole:9.0f} tokens/s   ratio {m_whole / m_bare:.3f}")
        s_asset, s_bare = statistics.median(asset_steps), statistics.median(bare_steps)
        print(f"  median step time: bare {1000 * s_bare:.1f} ms, asset {1000 * s_asset:.1f} ms "
              f"({len(bare_steps)} and {len(asset_steps)} steps)   ratio {s_bare / s_asset:.3f}")
        paired = statistics.median(a / b for a, b in zip(asset_tps, bare_tps, strict=True))
        print(f"  per-round ratios (asset metadata / bare): "
              f"{' '.join(f'{a / b:.2f}' for a, b in zip(asset_tps, bare_tps, strict=True))}; median {paired:.3f}")
        print(f"lm_asset_vs_bare: {paired:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
