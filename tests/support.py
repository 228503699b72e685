"""What the test modules share, so that none imports another: the tiny run config `TINY` (a
two-shard graph that trains in seconds on CPU), `write_run_config` and `overlay` to vary it by
section, `materialize` for chosen assets of one partition, `stale_cells` (Dagster's own staleness), the feature settings `FEATURES`, a
cached_activations-like `shard_table` and the numpy `brute_force` of the feature samplers.
A plain module, not a test module; tests/test_layers.py checks that test modules import
helpers from here (or tests/dev_server.py, tests/cluster.py, ...) and never from each other.
"""

from __future__ import annotations

import uuid

import numpy as np
import pyarrow as pa
import yaml

from sae_assets.core import schemas
from sae_assets.core.config import load_config
from sae_assets.core.features.sampling import DEFAULT_HIST_EDGES, feature_token_hash

SWEEP = [{"architecture": "relu", "width": 64, "sparsity": 0.3}, {"architecture": "topk", "width": 64, "sparsity": 4}]
TINY = {
    "corpus": {"source": "embedded", "num_shards": 2, "max_documents": 150},
    "tokenizer": {"vocab_size": 300, "context_length": 16},
    "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "d_mlp": 64, "train_tokens": 6000,
              "batch_size": 8, "warmup_steps": 2, "val_fraction": 0.1},
    "activations": {"hook_points": ["blocks.0.hook_resid_post"], "batch_size": 16},
    "shuffle": {"num_buckets": 2},
    "sae": {"sweep": SWEEP, "train_tokens": 12800, "batch_size": 128, "resample_steps": [0.5],
            "rewarm_steps": 5, "lr_warmup_steps": 5, "checkpoint_every": 25, "eval_sequences": 8,
            "dead_after_tokens": 3000, "max_dead_fraction": 1.0, "min_loss_recovered": -100.0},
    "features": {"dictionaries": []},
}
"""The tiny run config: two shards, a one-layer model of width 32, two SAEs of width 64; the
browser serves the first (tests of several served dictionaries set features.dictionaries)."""

FEATURES = {"range_width": 24, "top_k": 4, "random_examples": 3, "activation_levels": 2, "examples_per_level": 2,
            "batch_size": 100, "window_before": 5, "window_after": 2, "neuronpedia_export": True}
"""A `features` section for TINY: three feature ranges of the 64 features, small windows."""

HOOK = "blocks.0.hook_resid_post"
SHARD_SEQUENCE_LENGTH, SHARD_WIDTH = 10, 6
"""Tokens per sequence and activation width of `shard_table`."""


def overlay(base: dict, **sections: dict) -> dict:
    """`base` with each section's keys laid over that section's own (a new section is added)."""
    return {**base, **{name: {**base.get(name, {}), **values} for name, values in sections.items()}}


def write_run_config(directory, base: dict, storage: dict, **sections: dict) -> str:
    """Write `base` with `storage` and each section's keys laid over it; return the file's path."""
    data = overlay({**base, "storage": storage}, **sections)
    path = directory / f"config-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def materialize(instance, config_path, names, partition=None):
    """Materialize the named assets of the config's graph (one partition, if given), with the checks."""
    import dagster as dg  # here, so that the core tests that import this module do not load Dagster

    from sae_assets.definitions import ALL_CHECKS, build_resources, graph_assets
    from sae_assets.demo import QUIET

    assets = graph_assets(load_config(config_path))
    chosen = [a for a in assets if a.key.to_user_string() in names]
    return dg.materialize([*assets, *ALL_CHECKS], selection=dg.AssetSelection.assets(*chosen), partition_key=partition,
                          instance=instance, resources=build_resources(config_path), run_config=QUIET)


def stale_cells(instance, config_path) -> dict[str, str]:
    """'asset[partition]' -> Dagster's own stale status, for every partition that is not FRESH."""
    import dagster as dg
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._core.loader import LoadingContextForTest

    from sae_assets.defs.partitions import partition_keys
    from sae_assets.definitions import build_resources, graph_assets

    assets = graph_assets(load_config(config_path))
    graph = dg.Definitions(assets=assets, resources=build_resources(config_path)).resolve_asset_graph()
    resolver = CachingStaleStatusResolver(instance, graph, LoadingContextForTest(instance))
    found = {}
    for asset in assets:
        for key in partition_keys(asset.partitions_def, instance):
            status = resolver.get_status(asset.key, key).value
            if status != "FRESH":
                found[f"{asset.key.to_user_string()}[{key}]" if key else asset.key.to_user_string()] = status
    return found


def shard_table(shard: int, n_sequences: int, seed: int, dtype: str = "float32", width: int = SHARD_WIDTH) -> pa.Table:
    """A cached_activations-like table: row r is offset r; activations (N, D), D = `width`."""
    T, D = SHARD_SEQUENCE_LENGTH, width
    rng = np.random.default_rng(seed)
    n = n_sequences * T
    x = rng.normal(size=(n, D)).astype(np.float32)
    values = pa.array(x.reshape(-1), pa.float32()) if dtype == "float32" else pa.array(x.reshape(-1).astype(np.float16))
    return pa.table({"token_index": schemas.global_token_index(shard, np.arange(n)),
                     "token_id": rng.integers(0, 50, n).astype(np.int32),
                     HOOK: pa.FixedSizeListArray.from_arrays(values, D)},
                    schema=schemas.activation_schema({HOOK: D}, dtype))


def brute_force(x: np.ndarray, tok: np.ndarray, lo: int, hi: int, top_k: int, sample_k: int, seed: int,
                edges=DEFAULT_HIST_EDGES) -> dict:
    """The feature samplers' tables for features [lo, hi) of dense (N, F) activations, by numpy:
    {"top": columns (feature, rank, token_index, activation), "sample": columns (feature, rank,
    hash, token_index, activation), "stats": per feature (feature, count, sum, max, hist)}."""
    edges = np.asarray(edges)
    top, sample, stats = [], [], []
    for f in range(lo, hi):
        active = np.nonzero(x[:, f] > 0)[0]
        v, t = x[active, f], tok[active]
        o = np.lexsort((t, -v))[:top_k]
        top += [(f, r, t[i], v[i]) for r, i in enumerate(o)]
        h = feature_token_hash(seed, f, t)
        o = np.lexsort((t, h))[:sample_k]
        sample += [(f, r, h[i], t[i], v[i]) for r, i in enumerate(o)]
        bins = np.clip(np.searchsorted(edges, v.astype(np.float64), side="right") - 1, 0, len(edges) - 2)
        stats.append((f, len(v), v.astype(np.float64).sum(), v.max() if len(v) else 0.0,
                      np.bincount(bins, minlength=len(edges) - 1)))
    cols = lambda rows, n: [np.array([r[j] for r in rows]) for j in range(n)]  # noqa: E731
    return {"top": cols(top, 4), "sample": cols(sample, 5), "stats": stats}


def toy_sae_config(point, steps: int, batch: int, **changes):
    """The SAE training config of the core tests: `steps` steps of `batch` toy rows, short
    warm-ups, data init, no resampling unless asked; `changes` override any SaeConfig field."""
    from sae_assets.core.config import SaeConfig, replace

    base = SaeConfig(sweep=(point,), train_tokens=batch * steps, batch_size=batch, learning_rate=3e-3,
                     lr_warmup_steps=5, lr_decay_fraction=0.2, l1_warmup_fraction=0.1, init="data", resample=False,
                     dead_after_tokens=10 * batch, aux_k=16, checkpoint_every=4, seed=0)
    return replace(base, **changes)


def fused_and_graph_losses(sae, x, info, target=None):
    """[(LossOutput, {parameter: gradient}, input gradient)] of `sae.loss` (an architecture's fused
    loss with its own backward) and of the generic autograd graph (`SparseAutoencoder.loss`), in
    that order, for tests that hold the two equal. A transcoder's `target` rows go in as its
    target, and their gradient is in the dict as 'target'."""
    from sae_assets.core.sae.base import SparseAutoencoder

    results = []
    for loss in (sae.loss, lambda x, info, y: SparseAutoencoder.loss(sae, x, info, y)):
        sae.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        yg = None if target is None else target.clone().requires_grad_(True)
        out = loss(xg, info, yg)
        out.total.backward()
        grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
        if yg is not None:
            grads["target"] = yg.grad.clone()
        results.append((out, grads, xg.grad.clone()))
    return results
