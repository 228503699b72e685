"""Dictionary group: sae_dictionary [dictionary] trains one SAE per sweep point.

Training reads the shuffled buckets through the epoch-reshuffling reader, skips the tokens
the language model held out (sae_metrics scores on those), checkpoints into a directory
keyed by the manifest's config hash and the input data versions (mirrored to S3 when that is the
backend), and resumes from it after a kill. The SAE is saved as cfg.json +
sae_weights.safetensors in one directory, the layout SAELens loads.
"""

import hashlib
import json

import dagster as dg

from resources import ArtifactStorage, RunSettings
from sae_assets.defs.common import progress_log, read_upstream, result
from sae_assets.defs.corpus_assets import excluded_token_ids, tokenizer
from sae_assets.defs.identity import AssetIdentity, dictionary_point
from sae_assets.defs.partitions import DICTIONARIES, bucket_index, bucket_keys
from sae_assets.defs.plots import line_chart_markdown
from sae_assets.defs.shuffle_assets import SHUFFLED_FILE, consistent_inputs, shuffled_shards

INIT_SAMPLE_BATCHES = 8


def shuffled_inputs(context, store, cfg, point=None):
    """Manifests, upstream versions and the widths (D_in, D_out) of a sweep point's two hooks
    (the same hook for an SAE; default: the point-less sae_hook) in the current shuffle."""
    wanted = [k for k in bucket_keys(context.instance) if bucket_index(k) < cfg.shuffle.num_buckets]
    manifests, upstream = read_upstream(store, "shuffled_shards", wanted)
    fmt = consistent_inputs(store, manifests)
    hooks = cfg.point_hooks(point) if point is not None else (cfg.sae_hook, cfg.sae_hook)
    for name, hook in zip(("hook", "target_hook"), hooks):
        if hook not in fmt["hook_widths"]:
            where = f"sae.sweep[{point.key}].{name}" if point is not None and getattr(point, name) else "sae.hook_point"
            raise ValueError(f"{where}: hook {hook!r} is not among the hooks the current shuffled_shards hold "
                             f"{sorted(fmt['hook_widths'])}; rematerialize cached_activations and the shuffle")
    return manifests, upstream, tuple(fmt["hook_widths"][hook] for hook in hooks)


TRAINED_REVISIONS = {"jumprelu": 1, "gated": 1}
"""The architectures' `SparseAutoencoder.training_revision`s (those > 0) this version of
sae_dictionary trains with. Dagster marks partitions stale by the code version, not by the
manifest's partition hash, so a revision bump comes with a version bump and an entry here
(tests/test_identity.py fails otherwise)."""

SAE_DICTIONARY = AssetIdentity(  # 3: TRAINED_REVISIONS (JumpReLU's L0 gradient to z, Gated's frozen norms)
    "sae_dictionary", version="3", pool="model", device="sae.device", partition_config=dictionary_point,
    keys=("sae_hook", *(f"sae.{key}" for key in (
        "train_tokens", "batch_size", "learning_rate", "lr_warmup_steps", "lr_decay_fraction", "l1_warmup_fraction",
        "init", "resample", "resample_steps", "rewarm_after_resample", "rewarm_steps", "dead_after_tokens", "aux_k",
        "aux_coefficient", "seed")),
        # The held-out split that training skips.
        "model.val_fraction", "model.seed", "tokenizer.context_length",
        # The special tokens it skips (special_tokens.exclude, special_tokens.token_ids).
        "special_token_exclusion",
        # Added later: at its default it leaves the hashes of dictionaries trained before it alone.
        "sae.resample_method"),
    hashed_unless_default=("sae.resample_method",))


def training_stream(store, manifests, cfg, exclude_token_ids=(), point=None) -> "sae_data.TrainingStream":
    """What sae_dictionary trains on: the shuffled buckets of `manifests`, held-out tokens and the
    rows of `exclude_token_ids` (special tokens) dropped; a transcoder point's rows are its
    input | target hooks side by side."""
    from resources.arrow_files import open_ipc_table
    from sae_assets.core.sae import data as sae_data

    return sae_data.TrainingStream.for_run([open_ipc_table(store.fetch(m, SHUFFLED_FILE)) for m in manifests], cfg,
                                           bucket_names=[f"shuffled_shards[{m.partition}]" for m in manifests],
                                           exclude_token_ids=exclude_token_ids, point=point)


def set_up_dictionary(key: str, d_in: int, cfg, stream: "sae_data.TrainingStream", d_out: int | None = None):
    """The SAE of partition `key` before its first step: input scale and decoder initialised from
    the first INIT_SAMPLE_BATCHES training batches (with `d_out`: a transcoder, whose rows are
    input | target). A bad sample (NaN/inf rows, all zeros) is a ValueError naming the partition
    and, for a non-finite row, its token and shuffled bucket."""
    from sae_assets.core.sae.build import build_sae

    try:
        return build_sae(cfg.sae.point(key), d_in, cfg.sae, stream.init_sample(INIT_SAMPLE_BATCHES),
                         d_out=d_out).to(cfg.sae.device)
    except ValueError as exc:
        raise ValueError(f"sae_dictionary[{key}]: cannot set up the SAE: {exc}") from exc


@SAE_DICTIONARY.asset(
    group_name="dictionary",
    partitions_def=DICTIONARIES,
    # The tokenizer: its special tokens are kept out of training (special_tokens.exclude).
    deps=[dg.AssetDep(shuffled_shards, partition_mapping=dg.AllPartitionMapping()), tokenizer],
    description="A sparse autoencoder trained on the shuffled activations for one sweep point "
    "(architecture, width, sparsity); cfg.json + sae_weights.safetensors as SAELens loads them.",
)
def sae_dictionary(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
    import polars as pl

    from sae_assets.core.sae import io as sae_io
    from sae_assets.core.sae.training import SaeTrainingError, train_sae

    cfg = settings.load()
    store = storage.store()
    key = context.partition_key
    point = cfg.sae.point(key)
    hook, target_hook = cfg.point_hooks(point)
    manifests, upstream, (d_in, d_out) = shuffled_inputs(context, store, cfg, point)
    excluded, tokenizer_version = excluded_token_ids(store, cfg)  # special_tokens: kept out of training
    upstream.update(tokenizer_version)
    stream = training_stream(store, manifests, cfg, excluded, point)

    def batches(start_step: int):  # batch s is a pure function of s: resumes are exact
        return (x.to(cfg.sae.device) for x in stream.batches(start_step))

    sae = set_up_dictionary(key, d_in, cfg, stream, d_out if point.is_transcoder else None)
    fingerprint = SAE_DICTIONARY.config_hash(cfg, key)
    tag = hashlib.sha256(json.dumps([fingerprint, upstream], sort_keys=True).encode()).hexdigest()[:16]
    checkpoints = store.checkpoint_dir("sae_dictionary", key, tag)
    try:
        outcome = train_sae(sae, batches, cfg.sae, point, checkpoint_dir=checkpoints, fingerprint=fingerprint,
                            on_checkpoint=lambda path, step: store.mirror_checkpoint("sae_dictionary", key, tag, path),
                            progress_log=progress_log(context))
    except SaeTrainingError as exc:
        raise SaeTrainingError(f"sae_dictionary[{key}]: {exc}; the last good checkpoint stays in {checkpoints}",
                               step=exc.step) from exc
    curve = pl.DataFrame(outcome.curve)
    with SAE_DICTIONARY.writer(store, cfg, key, upstream=upstream) as out:
        sae_io.save_sae(sae.cpu(), out.scratch, hook_name=hook, extra={"sae_assets_partition": key},
                        hook_name_out=target_hook if point.is_transcoder else None)
        curve.write_parquet(out.path("training_curve.parquet"))
        # `hook` is what the dictionary reads (the feature browser encodes it); `target_hook` what
        # it reconstructs, where sae_metrics splices its output in (= hook for an SAE).
        out.extra.update(point=point.key, architecture=point.architecture, width=point.width,
                         sparsity=point.sparsity, d_in=d_in, d_out=d_out, hook=hook, target_hook=target_hook,
                         steps=outcome.steps,
                         resamples=outcome.resamples, excluded_token_ids=list(excluded))
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


def load_dictionary(store, key: str, device: str = "cpu", *, manifest=None):
    """The sae_dictionary partition `key` as our SAE module, with its manifest (`manifest`: the
    version already read, so that what is loaded is what the caller recorded)."""
    from safetensors.torch import load_file

    from sae_assets.core.sae import io as sae_io

    manifest = manifest or store.require("sae_dictionary", key)
    cfg_json = json.loads(store.read_bytes(manifest, sae_io.CFG_FILE))

    tensors = load_file(str(store.fetch(manifest, sae_io.WEIGHTS_FILE)), device=device)
    return sae_io.sae_from_saelens(cfg_json, tensors, where=f"sae_dictionary[{key}]").to(device), manifest
