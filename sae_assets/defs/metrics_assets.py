"""Dictionary group: sae_metrics [dictionary], the evaluation of each trained SAE.

Scores on the language model's held-out sequences (never seen by SAE training): L0, MSE,
fraction of variance unexplained, loss recovered with the reconstruction spliced in at the
hook point (zero- and mean-ablation baselines, KL divergence), dead and dense fractions and
a feature-density histogram. Two asset checks with thresholds from the config (dead
fraction, loss recovered) are evaluated in the same step; their outcome is also written to
the manifest so that feature assets can refuse a dictionary that failed them.
"""

import json

import dagster as dg
import numpy as np
import polars as pl
import torch

from resources import ArtifactStorage, RunSettings
from sae_assets.core.activations import caching as activations
from sae_assets.core.sae import data as sae_data
from sae_assets.core.sae import metrics as sae_metrics
from sae_assets.defs.common import asset_code_version, result
from sae_assets.defs.corpus_assets import token_shards
from sae_assets.defs.dictionary_assets import load_dictionary, sae_dictionary
from sae_assets.defs.model_assets import language_model, load_all_sequences, load_language_model
from sae_assets.defs.partitions import DICTIONARIES, training_shard_keys
from sae_assets.defs.plots import bar_chart_markdown

DEAD_CHECK = "dead_fraction_below_threshold"
LOSS_CHECK = "loss_recovered_above_threshold"


@dg.asset(
    name="sae_metrics",
    group_name="dictionary",
    partitions_def=DICTIONARIES,
    deps=[sae_dictionary, language_model, dg.AssetDep(token_shards, partition_mapping=dg.AllPartitionMapping())],
    code_version="1",
    pool="model",
    check_specs=[
        dg.AssetCheckSpec(DEAD_CHECK, asset="sae_metrics", blocking=True,
                          description="Dead features (never firing on held-out tokens) <= sae.max_dead_fraction"),
        dg.AssetCheckSpec(LOSS_CHECK, asset="sae_metrics", blocking=True,
                          description="Loss recovered against the mean-ablation baseline >= sae.min_loss_recovered"),
    ],
    description="Evaluation of one SAE on held-out tokens: L0, MSE, FVU, loss recovered (zero and mean "
    "ablation), KL divergence, dead/dense fractions and a density histogram.",
)
def sae_metrics_asset(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
    cfg = settings.load()
    store = storage.store()
    key = context.partition_key
    device = cfg.sae.device
    sae, sae_manifest = load_dictionary(store, key, device=device)
    model, model_manifest = load_language_model(store, device=device)
    hook = sae_manifest.extra["hook"]
    tokens_ST, first_S, upstream = load_all_sequences(store, training_shard_keys(context.instance, cfg))
    eval_ST = sae_data.heldout_sequences(tokens_ST, first_S, val_fraction=cfg.model.val_fraction,
                                         seed=cfg.model.seed, limit=cfg.sae.eval_sequences)
    upstream.update({f"sae_dictionary[{key}]": sae_manifest.data_version, "language_model": model_manifest.data_version})
    batch = max(1, cfg.activations.batch_size)
    with torch.no_grad():
        stats = sae_metrics.reconstruction_stats(
            sae, activations.hook_activations(model, eval_ST, hook, batch_size=batch, device=device))
        recovered = sae_metrics.loss_recovered(model, sae, torch.from_numpy(eval_ST.astype(np.int64)).to(device),
                                               hook, batch_size=batch,
                                               mean_activation=torch.from_numpy(stats.activation_mean).float())
    metrics = sae_metrics.summary(stats, recovered)
    checks = {DEAD_CHECK: (metrics["dead_fraction"] <= cfg.sae.max_dead_fraction, cfg.sae.max_dead_fraction,
                           "dead_fraction"),
              # Against mean ablation: zeroing a residual stream is so poor a baseline that a
              # dictionary with every feature dead still "recovers" most of the loss against it.
              LOSS_CHECK: (metrics["loss_recovered_vs_mean"] >= cfg.sae.min_loss_recovered,
                           cfg.sae.min_loss_recovered, "loss_recovered_vs_mean")}
    histogram = sae_metrics.density_histogram(stats.feature_counts, stats.n_tokens)
    with store.writer("sae_metrics", key, code_version=asset_code_version(context),
                      upstream=upstream, config_hash=cfg.section_hash("sae")) as out:
        out.path("metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        density = pl.DataFrame({"feature": np.arange(len(stats.feature_counts)), "count": stats.feature_counts,
                                "density": sae_metrics.feature_density(stats.feature_counts, stats.n_tokens)})
        density.write_parquet(out.path("feature_density.parquet"))
        out.describe_table("feature_density.parquet", rows=density.height)
        out.extra.update(metrics=metrics, checks={name: bool(ok) for name, (ok, _, _) in checks.items()})
    return _with_checks(out.manifest, store, metrics, histogram, checks)


def _with_checks(manifest, store, metrics, histogram, checks) -> dg.MaterializeResult:
    shown = result(manifest, store, {
        **{name: dg.MetadataValue.float(float(value)) for name, value in metrics.items()},
        "density_histogram": dg.MetadataValue.md(bar_chart_markdown(
            histogram.edges[:-1], histogram.counts, xlabel="log10 feature density",
            note=f"{histogram.never_fired} features never fired")),
    })
    check_results = [
        dg.AssetCheckResult(check_name=name, passed=bool(ok), severity=dg.AssetCheckSeverity.ERROR,
                            metadata={"value": float(metrics[field]), "threshold": float(threshold)})
        for name, (ok, threshold, field) in checks.items()
    ]
    return dg.MaterializeResult(data_version=shown.data_version, metadata=shown.metadata, check_results=check_results)
