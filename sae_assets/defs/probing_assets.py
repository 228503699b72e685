"""Dictionary group: sae_probing [dictionary], k-sparse probing of each trained SAE beside sae_metrics.

Pools a seeded uniform sample of the language model's held-out sequences (probing.sequences,
the split sae_metrics scores on) into documents, labels each document from its corpus_shards
doc_id (the embedded corpus: the module a docstring comes from) and, per label against the
rest, compares k-sparse probes on the dictionary's latents with a probe on the raw activations
(`core.sae.probing`). Writes `probing.parquet` (one row per task and probe) and shows per k
the mean accuracy over tasks, the raw-activation probe's and the gap between them.
"""

import dagster as dg

from resources import ArtifactStorage, RunSettings
from sae_assets.defs.common import read_upstream, result
from sae_assets.defs.corpus_assets import corpus_shards, token_shards, tokenizer
from sae_assets.defs.dictionary_assets import load_dictionary, sae_dictionary
from sae_assets.defs.identity import AssetIdentity
from sae_assets.defs.model_assets import language_model, load_all_sequences, load_language_model
from sae_assets.defs.partitions import DICTIONARIES, shard_index, training_shard_keys

PROBING_FILE = "probing.parquet"

SAE_PROBING = AssetIdentity(
    "sae_probing", version="1", pool="model", device="sae.device",
    keys=(*(f"probing.{key}" for key in ("k_values", "tasks", "num_tasks", "min_documents", "test_fraction",
                                         "sequences", "seed")),
          "corpus.source",  # what a doc_id's label means
          # Which sequences are held out, and which shards they come from.
          "model.val_fraction", "model.seed", "corpus.training_shards", "tokenizer.context_length"))


@SAE_PROBING.asset(
    group_name="dictionary",
    partitions_def=DICTIONARIES,
    deps=[sae_dictionary, language_model, tokenizer,
          dg.AssetDep(token_shards, partition_mapping=dg.AllPartitionMapping()),
          dg.AssetDep(corpus_shards, partition_mapping=dg.AllPartitionMapping())],
    description="k-sparse probing of one SAE (after SAEBench): per document label against the rest, test "
    "accuracy of logistic probes on the k latents with the largest class-mean difference, against a probe "
    "on the raw activations, on documents pooled from held-out sequences.",
)
def sae_probing(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sae_assets.core import schemas
    from sae_assets.core.corpus.labels import document_label, token_documents
    from sae_assets.core.sae.data import sample_sequences
    from sae_assets.core.sae.probing import document_labels, pool_documents, sparse_probing

    cfg = settings.load()
    store = storage.store()
    key = context.partition_key
    sae, sae_manifest = load_dictionary(store, key, device=cfg.sae.device)
    model, model_manifest = load_language_model(store, device=cfg.sae.device)
    tokenizer_manifest = store.require("tokenizer", None)
    shards = training_shard_keys(context.instance, cfg)
    tokens_ST, first_S, upstream = load_all_sequences(store, shards)
    doc_manifests, doc_versions = read_upstream(store, "corpus_shards", shards)
    upstream.update({**doc_versions, f"sae_dictionary[{key}]": sae_manifest.data_version,
                     "language_model": model_manifest.data_version, "tokenizer": tokenizer_manifest.data_version})
    labels_by_shard = {
        shard_index(m.partition): [document_label(doc_id, cfg.corpus.source) for doc_id in
                                   pl.read_parquet(store.fetch(m, "documents.parquet"), columns=["doc_id"])["doc_id"]]
        for m in doc_manifests}
    document_ST = token_documents(tokens_ST, first_S, tokenizer_manifest.extra["eos_id"])
    sample = sample_sequences(first_S, heldout=True, val_fraction=cfg.model.val_fraction, split_seed=cfg.model.seed,
                              seed=cfg.probing.seed, count=cfg.probing.sequences)
    if len(sample) == 0:
        raise ValueError(f"sae_probing[{key}]: no held-out sequence among {len(first_S)}; raise model.val_fraction "
                         f"({cfg.model.val_fraction}) or add data")
    pooled = pool_documents(model, sae, sae_manifest.extra["hook"], tokens_ST[sample], first_S[sample],
                            document_ST[sample], batch_size=max(1, cfg.activations.batch_size), device=cfg.sae.device)
    probing = sparse_probing(pooled, document_labels(pooled, labels_by_shard), cfg.probing)
    summary = probing.summary(cfg.probing.k_values)
    table = pa.Table.from_pylist(probing.rows, schema=schemas.probing_schema())
    with SAE_PROBING.writer(store, cfg, key, upstream=upstream) as out:
        pq.write_table(table, out.path(PROBING_FILE))
        out.describe_table(PROBING_FILE, rows=table.num_rows, schema=str(table.schema))
        out.extra.update(summary=summary, documents=len(pooled.document_N), sequences=len(sample),
                         skipped={s.label: s.reason for s in probing.skipped})
    return result(out.manifest, store, {
        **{name: dg.MetadataValue.int(value) if isinstance(value, int) else dg.MetadataValue.float(value)
           for name, value in summary.items()},
        "documents": dg.MetadataValue.int(len(pooled.document_N)),
        "tasks_table": dg.MetadataValue.md(tasks_markdown(probing.rows, cfg.probing.k_values)),
        "skipped_tasks": dg.MetadataValue.json({s.label: s.reason for s in probing.skipped}),
    })


def tasks_markdown(rows: list[dict], k_values) -> str:
    """One line per task: its documents, the raw probe's accuracy and each k-sparse probe's."""
    header = "| task | train / test docs | raw | " + " | ".join(f"top-{k}" for k in k_values) + " |"
    lines = [header, "|" + "---|" * (3 + len(k_values))]
    for raw in (r for r in rows if r["probe"] == "raw"):
        sae = {r["k"]: r["accuracy"] for r in rows if r["probe"] == "sae" and r["label"] == raw["label"]}
        lines.append(f"| {raw['label']} | {raw['train_documents']} / {raw['test_documents']} | {raw['accuracy']:.3f} | "
                     + " | ".join(f"{sae[k]:.3f}" for k in k_values) + " |")
    return "\n".join(lines) if len(lines) > 2 else "no task had enough documents (see skipped_tasks)"
