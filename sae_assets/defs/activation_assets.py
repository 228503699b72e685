"""Activations group: cached_activations [shard] (shuffle assets live in shuffle_assets.py).

cached_activations runs the language model over one token shard and streams the hook
outputs into a memory-mappable Arrow IPC file, batch by batch.
"""

import time

import dagster as dg

from resources import ArtifactStorage, RunSettings
from sae_assets.defs.common import progress_log, read_upstream, result
from sae_assets.defs.identity import AssetIdentity
from sae_assets.defs.corpus_assets import token_shards
from sae_assets.defs.model_assets import language_model, load_language_model
from sae_assets.defs.partitions import SHARDS

ACTIVATIONS_FILE = "activations.arrow"


CACHED_ACTIVATIONS = AssetIdentity("cached_activations", version="1", pool="model", device="activations.device",
                                   keys=("activations.hook_points", "activations.dtype"))


@CACHED_ACTIVATIONS.asset(
    group_name="activations",
    partitions_def=SHARDS,
    deps=[token_shards, language_model],
    description="Activations at the configured hook points for every token of the shard, with token id "
    "and 64-bit global token index (Arrow IPC, memory-mappable).",
)
def cached_activations(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
    from resources.arrow_files import open_ipc_table, write_ipc_file
    from sae_assets.core import schemas
    from sae_assets.core.activations import caching as activations
    from sae_assets.core.corpus import tokenization
    from sae_assets.core.model import lm

    cfg = settings.load().activations
    store = storage.store()
    [shard_manifest], upstream = read_upstream(store, "token_shards", [context.partition_key])
    model, model_manifest = load_language_model(store, device=cfg.device)
    upstream["language_model"] = model_manifest.data_version
    lm.check_hook_names(model, cfg.hook_points)
    tokens_ST, first_S = tokenization.sequences_from_table(open_ipc_table(store.fetch(shard_manifest, "sequences.arrow")))
    widths = activations.hook_widths(model, cfg.hook_points, tokens_ST.shape[1], device=cfg.device)
    stats = activations.ActivationStats()
    where = f"cached_activations[{context.partition_key}]"
    started = time.perf_counter()
    with CACHED_ACTIVATIONS.writer(store, settings.load(), context.partition_key, upstream=upstream) as out:
        batches = activations.cache_activations(
            model, tokens_ST, first_S, hook_points=cfg.hook_points, dtype=cfg.dtype, batch_size=cfg.batch_size,
            device=cfg.device, stats=stats, where=where, progress_log=progress_log(context),
        )
        schema = schemas.activation_schema(widths, cfg.dtype)
        rows, _ = write_ipc_file(out.path(ACTIVATIONS_FILE), schema, batches)
        seconds = time.perf_counter() - started
        out.describe_table(ACTIVATIONS_FILE, rows=rows, schema=str(schema))
        out.extra.update(activation_format(widths, cfg.dtype))
    summary = stats.summary()
    return result(out.manifest, store, {
        "tokens_per_second": dg.MetadataValue.float(rows / max(seconds, 1e-9)),
        "dtype": cfg.dtype,
        "hook_widths": dg.MetadataValue.json(widths),
        **{f"{hook}/mean_norm": dg.MetadataValue.float(s["mean_norm"]) for hook, s in summary.items()},
        **{f"{hook}/max_norm": dg.MetadataValue.float(s["max_norm"]) for hook, s in summary.items()},
    })


def activation_format(widths: dict[str, int], dtype: str) -> dict:
    """What must agree between activation partitions before anything reads them together."""
    return {"format": {"dtype": dtype, "hook_widths": dict(widths)}}
