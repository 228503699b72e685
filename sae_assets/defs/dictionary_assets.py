"""Dictionary group: sae_dictionary [dictionary] trains one SAE per sweep point.

Training reads the shuffled buckets through the epoch-reshuffling reader, skips the tokens
the language model held out (sae_metrics scores on those), checkpoints into a directory
keyed by the config fingerprint and the input data versions (mirrored to S3 when that is the
backend), and resumes from it after a kill. The SAE is saved as cfg.json +
sae_weights.safetensors in one directory, the layout SAELens loads.
"""

import hashlib
import json

import dagster as dg
import polars as pl
import torch

from resources import ArtifactStorage, RunSettings
from resources.arrow_files import open_ipc_table
from sae_assets.core.sae import data as sae_data
from sae_assets.core.activations.reader import ShuffledActivationReader
from sae_assets.core.sae import io as sae_io
from sae_assets.core.sae.build import build_sae
from sae_assets.core.sae.training import SaeTrainingError, config_fingerprint, train_sae
from sae_assets.defs.common import asset_code_version, read_upstream, result
from sae_assets.defs.partitions import DICTIONARIES, bucket_index, bucket_keys
from sae_assets.defs.plots import line_chart_markdown
from sae_assets.defs.shuffle_assets import SHUFFLED_FILE, consistent_inputs, shuffled_shards

INIT_SAMPLE_BATCHES = 8


def shuffled_inputs(context, store, cfg):
    """Manifests, upstream versions, activation format and d_in of the current shuffle."""
    wanted = [k for k in bucket_keys(context.instance) if bucket_index(k) < cfg.shuffle.num_buckets]
    manifests, upstream = read_upstream(store, "shuffled_shards", wanted)
    fmt = consistent_inputs(store, manifests)
    hook = cfg.sae_hook
    if hook not in fmt["hook_widths"]:
        raise ValueError(f"sae.hook_point {hook!r} is not among the cached hooks {sorted(fmt['hook_widths'])}")
    return manifests, upstream, fmt["hook_widths"][hook]


@dg.asset(
    group_name="dictionary",
    partitions_def=DICTIONARIES,
    deps=[dg.AssetDep(shuffled_shards, partition_mapping=dg.AllPartitionMapping())],
    code_version="1",
    pool="model",
    description="A sparse autoencoder trained on the shuffled activations for one sweep point "
    "(architecture, width, sparsity); cfg.json + sae_weights.safetensors as SAELens loads them.",
)
def sae_dictionary(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
    cfg = settings.load()
    store = storage.store()
    key = context.partition_key
    point = cfg.sae.point(key)
    manifests, upstream, d_in = shuffled_inputs(context, store, cfg)
    reader = ShuffledActivationReader([open_ipc_table(store.fetch(m, SHUFFLED_FILE)) for m in manifests],
                                      hook=cfg.sae_hook, batch_size=cfg.sae.batch_size, seed=cfg.sae.seed,
                                      with_token_index=True)

    def batches(start_step: int):  # batch s is a pure function of s: resumes are exact
        stream = sae_data.training_batches(reader, batch_size=cfg.sae.batch_size, start_step=start_step,
                                           context_length=cfg.tokenizer.context_length,
                                           val_fraction=cfg.model.val_fraction, split_seed=cfg.model.seed)
        return (x.to(cfg.sae.device) for x in stream)

    sample_ND = torch.cat([b.cpu() for _, b in zip(range(INIT_SAMPLE_BATCHES), batches(0))])
    sae = build_sae(point, d_in, cfg.sae, sample_ND).to(cfg.sae.device)
    tag = hashlib.sha256(json.dumps([config_fingerprint(cfg.sae, point, d_in), upstream], sort_keys=True)
                         .encode()).hexdigest()[:16]
    checkpoints = store.checkpoint_dir("sae_dictionary", key, tag)
    try:
        outcome = train_sae(sae, batches, cfg.sae, point, checkpoint_dir=checkpoints,
                            on_checkpoint=lambda path, step: store.mirror_checkpoint("sae_dictionary", key, tag, path))
    except SaeTrainingError as exc:
        raise SaeTrainingError(f"sae_dictionary[{key}]: {exc}; the last good checkpoint stays in {checkpoints}",
                               step=exc.step) from exc
    curve = pl.DataFrame(outcome.curve)
    with store.writer("sae_dictionary", key, code_version=asset_code_version(context), upstream=upstream,
                      config_hash=config_fingerprint(cfg.sae, point, d_in)) as out:
        sae_io.save_sae(sae.cpu(), out.scratch, hook_name=cfg.sae_hook, extra={"sae_assets_partition": key})
        curve.write_parquet(out.path("training_curve.parquet"))
        out.extra.update(point=point.key, architecture=point.architecture, width=point.width,
                         sparsity=point.sparsity, d_in=d_in, hook=cfg.sae_hook, steps=outcome.steps,
                         resamples=outcome.resamples)
    store.drop_checkpoints("sae_dictionary", key, tag)
    last = outcome.curve[-1] if outcome.curve else {}
    return result(out.manifest, store, {
        "tokens_per_second": dg.MetadataValue.float(outcome.tokens_per_second),
        "steps": outcome.steps,
        "resamples": outcome.resamples,
        **{f"final_{name}": dg.MetadataValue.float(float(last[name]))
           for name in ("loss", "mse", "l0", "dead_fraction") if name in last},
        "training_curve": dg.MetadataValue.md(
            line_chart_markdown(curve, "step", ["loss", "mse", "l0", "dead_fraction", "lr"], log_y=True)),
    })


def load_dictionary(store, key: str, device: str = "cpu"):
    """The sae_dictionary partition `key` as our SAE module, with its manifest."""
    manifest = store.require("sae_dictionary", key)
    cfg_json = json.loads(store.read_bytes(manifest, sae_io.CFG_FILE))
    from safetensors.torch import load_file

    tensors = load_file(str(store.fetch(manifest, sae_io.WEIGHTS_FILE)), device=device)
    return sae_io.sae_from_saelens(cfg_json, tensors, where=f"sae_dictionary[{key}]").to(device), manifest
