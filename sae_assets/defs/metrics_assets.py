"""Dictionary group: sae_metrics [dictionary], the evaluation of each trained SAE.

Scores a uniform, seeded sample of the language model's held-out sequences (never seen by SAE
training; `core.sae.data.evaluation_sample`): L0, MSE, fraction of variance unexplained, loss
recovered with the reconstruction spliced in at the hook point (a transcoder's output at its
target hook, computed from its input hook in the same forward pass; zero- and mean-ablation
baselines, the mean taken over training tokens, KL divergence), with standard errors; dead
and dense fractions and a feature-density histogram over at least sae.dead_after_tokens
held-out tokens (`core.sae.evaluation.evaluate_dictionary` does all of it), special-token
positions left out (special_tokens.exclude: the model sees them, the scores do not). Two asset checks
with thresholds from the config (dead fraction, loss recovered) are evaluated in the same
step; their outcome is also written to the manifest so that feature assets can refuse a
dictionary that failed them.
"""

import json

import dagster as dg

from resources import ArtifactStorage, RunSettings
from sae_assets.defs.common import result
from sae_assets.defs.identity import AssetIdentity
from sae_assets.defs.corpus_assets import excluded_token_ids, token_shards, tokenizer
from sae_assets.defs.dictionary_assets import load_dictionary, sae_dictionary
from sae_assets.defs.model_assets import language_model, load_all_sequences, load_language_model
from sae_assets.defs.partitions import DICTIONARIES, training_shard_keys
from sae_assets.defs.plots import bar_chart_markdown

DEAD_CHECK = "dead_fraction_below_threshold"
LOSS_CHECK = "loss_recovered_above_threshold"


SAE_METRICS = AssetIdentity(
    "sae_metrics", version="3", pool="model", device="sae.device",
    keys=("sae.eval_sequences", "sae.max_dead_fraction", "sae.min_loss_recovered", "sae.seed",
          # Dead features are counted over at least this many held-out tokens (whole sequences).
          "sae.dead_after_tokens", "tokenizer.context_length",
          # Which sequences are held out, and which shards they come from.
          "model.val_fraction", "model.seed", "corpus.training_shards",
          # The special tokens left out of the scores.
          "special_token_exclusion"))


@SAE_METRICS.asset(
    group_name="dictionary",
    partitions_def=DICTIONARIES,
    deps=[sae_dictionary, language_model, dg.AssetDep(token_shards, partition_mapping=dg.AllPartitionMapping()),
          tokenizer],  # its special tokens are left out of the scores
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
    import numpy as np
    import polars as pl

    from sae_assets.core.sae import data as sae_data
    from sae_assets.core.sae.evaluation import evaluate_dictionary

    cfg = settings.load()
    store = storage.store()
    key = context.partition_key
    device = cfg.sae.device
    sae, sae_manifest = load_dictionary(store, key, device=device)
    model, model_manifest = load_language_model(store, device=device)
    hook = sae_manifest.extra["hook"]
    target_hook = sae_manifest.extra.get("target_hook", hook)  # a transcoder's output hook: spliced there
    tokens_ST, first_S, upstream = load_all_sequences(store, training_shard_keys(context.instance, cfg))
    upstream.update({f"sae_dictionary[{key}]": sae_manifest.data_version, "language_model": model_manifest.data_version})
    excluded, tokenizer_version = excluded_token_ids(store, cfg)  # special_tokens: left out of the scores
    upstream.update(tokenizer_version)
    sample = sae_data.evaluation_sample(first_S, cfg)
    evaluation = evaluate_dictionary(model, sae, hook, tokens_ST[sample.eval_S], tokens_ST[sample.mean_S],
                                     tokens_ST[sample.density_S], batch_size=max(1, cfg.activations.batch_size),
                                     exclude_token_ids=excluded, target_hook=target_hook)
    metrics = evaluation.metrics
    checks = {DEAD_CHECK: (metrics["dead_fraction"] <= cfg.sae.max_dead_fraction, cfg.sae.max_dead_fraction,
                           "dead_fraction"),
              # Against mean ablation: zeroing a residual stream is so poor a baseline that a
              # dictionary with every feature dead still "recovers" most of the loss against it.
              LOSS_CHECK: (metrics["loss_recovered_vs_mean"] >= cfg.sae.min_loss_recovered,
                           cfg.sae.min_loss_recovered, "loss_recovered_vs_mean")}
    with SAE_METRICS.writer(store, cfg, key, upstream=upstream) as out:
        out.path("metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        density = pl.DataFrame({"feature": np.arange(len(evaluation.feature_counts)),
                                "count": evaluation.feature_counts, "density": evaluation.feature_density})
        density.write_parquet(out.path("feature_density.parquet"))
        out.describe_table("feature_density.parquet", rows=density.height)
        out.extra.update(metrics=metrics, checks={name: bool(ok) for name, (ok, _, _) in checks.items()},
                         excluded_token_ids=list(excluded))
    return _with_checks(out.manifest, store, metrics, evaluation.histogram, checks)


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
