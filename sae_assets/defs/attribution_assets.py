"""Model group: parameter_shifts [training step range] and attribution_tables, after
"Gradient capture / training-data attribution from outlier parameter shifts" (SERI MATS 3.1).

parameter_shifts[steps-000001-000100] publishes one range of the per-datum shifts that
language_model captured while training (defs/capture_io.py): `shifts.parquet` (step, datum
id, rank, tensor, row, column, value) and `steps.parquet` (lr, clip coefficient, loss, the
sum check and the split of each update). attribution_tables reads every range and writes
how often each parameter lands in a top-k, the per-unit summary, each unit's notable tokens
(that write-up's heuristic) and the zero-ablation flip tables against random control units.
Computation lives in sae_assets.core.attribution. Tests: tests/test_attribution_assets.py.
"""

import dagster as dg

from resources import ArtifactStorage, RunSettings
from sae_assets.defs.common import each_partition, progress_log, read_upstream, result
from sae_assets.defs.identity import AssetIdentity
from sae_assets.defs.corpus_assets import load_tokenizer, token_shards, tokenizer
from sae_assets.defs.model_assets import language_model, load_all_sequences, load_language_model
from sae_assets.defs.partitions import STEP_RANGES, step_range, step_range_keys, training_shard_keys

SHIFTS_FILE, STEPS_FILE = "shifts.parquet", "steps.parquet"
TABLE_FILES = ("parameter_counts.parquet", "units.parquet", "notable_tokens.parquet", "ablation_flips.parquet",
               "ablation_summary.parquet")


def _check_settings(cfg, facts: dict, where: str) -> None:
    wanted = cfg.attribution.capture_settings()
    stale = [key for key in wanted if facts.get(key) != wanted[key]]
    if stale:
        raise ValueError(f"{where}: language_model was captured with "
                         f"{', '.join(f'attribution.{k}={facts.get(k)!r}' for k in stale)} but the config says "
                         f"{', '.join(f'{wanted[k]!r}' for k in stale)}; rematerialize language_model")


PARAMETER_SHIFTS = AssetIdentity("parameter_shifts", version="1", keys=(
    "attribution.capture", "attribution.tensors", "attribution.top_k", "attribution.steps_per_range"))


@PARAMETER_SHIFTS.asset(
    group_name="model",
    partitions_def=STEP_RANGES,
    deps=[language_model],
    description="Per-datum parameter shifts captured while language_model trained, one training step range: "
    "the top-k |shift| of every datum at every step, and a per-step table with the sum check.",
)
def parameter_shifts(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
    import pyarrow.compute as pc

    from sae_assets.core.attribution import tables
    from sae_assets.defs import capture_io

    cfg = settings.load()
    store = storage.store()
    lm_manifest = store.require("language_model", None)

    def publish_one(key: str):
        start, end = step_range(key)
        raw, steps, layout, facts = capture_io.read_range(store, lm_manifest, start, end, key)
        _check_settings(cfg, facts, f"parameter_shifts[{key}]")
        shifts = tables.publish_shifts(raw, layout, facts["top_k"])
        with PARAMETER_SHIFTS.writer(store, cfg, key, upstream={"language_model": lm_manifest.data_version}) as out:
            capture_io.write_table(out, SHIFTS_FILE, shifts)
            capture_io.write_table(out, STEPS_FILE, steps)
            out.extra.update(first_step=start, last_step=end, top_k=facts["top_k"], tensors=layout.names,
                             optimizer=facts["optimizer"])
        data = steps.num_rows * facts["batch_size"]
        return out.manifest, {
            "steps": steps.num_rows, "data": data,
            "bytes_per_datum": dg.MetadataValue.float(out.manifest.files[SHIFTS_FILE].size / data),
            "sum_check_error_max": dg.MetadataValue.float(pc.max(steps.column("sum_check_error")).as_py()),
            "topk_mass_mean": dg.MetadataValue.float(pc.mean(steps.column("topk_mass")).as_py()),
            "mean_loss": dg.MetadataValue.float(pc.mean(steps.column("loss")).as_py()),
        }

    return each_partition(context, store, publish_one, content_version=True)


def _corpus(store, context, upstream: dict, cfg) -> "analysis.Corpus":
    """Every training sequence (the data) with its id, the training token frequencies, token texts."""
    from sae_assets.core.attribution import analysis
    from sae_assets.core.model import lm

    tokens_ST, first_S, shard_versions = load_all_sequences(store, training_shard_keys(context.instance, cfg))
    tok, tok_manifest = load_tokenizer(store)
    upstream.update(shard_versions, tokenizer=tok_manifest.data_version)
    train_S = ~lm.split_is_validation(first_S, cfg.model.val_fraction, cfg.model.seed)
    return analysis.training_corpus(tokens_ST, first_S, train_S,
                                    [tok.decode([i]) for i in range(tok_manifest.extra["vocab_size"])])


def _shifts(store, context, lm_manifest, upstream: dict) -> "pl.DataFrame":
    import polars as pl

    keys = step_range_keys(context.instance)
    if not keys:
        raise ValueError("attribution_tables: no parameter_shifts step ranges exist; sync partitions "
                         "(sync_partitions / make demo) after turning attribution.capture on")
    manifests, versions = read_upstream(store, "parameter_shifts", keys)
    for manifest in manifests:
        if manifest.upstream.get("language_model") != lm_manifest.data_version:
            raise ValueError(f"parameter_shifts[{manifest.partition}] was built from another language_model; "
                             "rematerialize it before attribution_tables")
    upstream.update(versions)
    return pl.concat([pl.read_parquet(store.fetch(m, SHIFTS_FILE)) for m in manifests])


ATTRIBUTION_TABLES = AssetIdentity(
    "attribution_tables", version="2", device="model.device",
    keys=(*(f"attribution.{key}" for key in ("capture", "tensors", "top_k", "steps_per_range", "heuristic_min_count",
                                             "heuristic_top_relative", "heuristic_top_count", "ablation_kind",
                                             "ablation_units", "ablation_windows", "seed", "activation_sequences")),
          "model.kind", "model.val_fraction", "model.seed", "corpus.training_shards"))


@ATTRIBUTION_TABLES.asset(
    group_name="model",
    deps=[dg.AssetDep(parameter_shifts, partition_mapping=dg.AllPartitionMapping()), language_model,
          dg.AssetDep(token_shards, partition_mapping=dg.AllPartitionMapping()), tokenizer],
    description="Training-data attribution: how often each parameter lands in a datum's top-k shifts, units "
    "(MLP neurons, heads), their notable tokens (the heuristic of 'Gradient capture / training-data attribution "
    "from outlier parameter shifts') and zero-ablation prediction flips against random control units, with a "
    "one-sided paired sign-flip test (paired_test_p_value) and each neuron's rank by activations alone.",
)
def attribution_tables(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
    from sae_assets.core.attribution import analysis
    from sae_assets.core.attribution.tensors import TensorLayout
    from sae_assets.defs import capture_io

    cfg = settings.load()
    store = storage.store()
    lm_manifest = store.require("language_model", None)
    upstream = {"language_model": lm_manifest.data_version}
    if not cfg.attribution.capture or cfg.model.kind != "embedded":
        built, note = analysis.empty_tables(), "no capture (attribution.capture off or a named model)"
    else:
        facts = capture_io.captured(lm_manifest)
        _check_settings(cfg, facts, "attribution_tables")
        shifts = _shifts(store, context, lm_manifest, upstream)
        corpus = _corpus(store, context, upstream, cfg)
        model, _ = load_language_model(store, device=cfg.model.device)
        built = analysis.build_tables(shifts, TensorLayout.from_json(facts["layout"]), corpus, model,
                                      cfg.attribution, batch_size=cfg.activations.batch_size,
                                      progress_log=progress_log(context))
        note = f"{shifts.height} shifts from {len(step_range_keys(context.instance))} step ranges"
    with ATTRIBUTION_TABLES.writer(store, cfg, None, upstream=upstream) as out:
        for name, table in zip(TABLE_FILES, built):
            capture_io.write_table(out, name, table)
        facts = analysis.summary(built, seed=cfg.attribution.seed)
        out.extra.update(facts)
    return result(out.manifest, store, {"source": note, **facts,
                                        "ablation_summary": dg.MetadataValue.md(analysis.summary_markdown(built))},
                  content_version=True)
