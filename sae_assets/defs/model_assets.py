"""Model group: language_model, the embedded TransformerLens-native model trained here, or a
reference to a named Hugging Face model that later assets boot through TransformerBridge.
With attribution.capture on, its partition also holds the captured parameter shifts
(defs/capture_io.py), which parameter_shifts publishes per step range.
"""


import json

import dagster as dg

from resources import ArtifactStorage, RunSettings
from sae_assets.defs.common import progress_log, read_upstream, result
from sae_assets.defs.identity import AssetIdentity
from sae_assets.defs.corpus_assets import token_shards, tokenizer
from sae_assets.defs.partitions import training_shard_keys
from sae_assets.defs.plots import line_chart_markdown


def load_all_sequences(store, partitions: list[str]) -> "tuple[np.ndarray, np.ndarray, dict[str, str]]":
    """((S, T) int32 tokens, (S,) int64 first_token_index, upstream versions) of all shards."""
    import numpy as np

    from resources.arrow_files import open_ipc_table
    from sae_assets.core.corpus import tokenization

    manifests, upstream = read_upstream(store, "token_shards", partitions)
    parts = [tokenization.sequences_from_table(open_ipc_table(store.fetch(m, "sequences.arrow"))) for m in manifests]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), upstream


LANGUAGE_MODEL = AssetIdentity(
    "language_model", version="3", pool="model", device="model.device",  # one model-holding step at a time
    keys=(*(f"model.{key}" for key in ("kind", "name", "n_layers", "d_model", "n_heads", "d_mlp", "train_tokens",
                                       "batch_size", "learning_rate", "weight_decay", "warmup_steps", "max_grad_norm",
                                       "val_fraction", "seed")),
          "tokenizer.context_length", "corpus.training_shards",
          # With capture on, the per-datum shifts are written into this partition.
          "attribution.capture", "attribution.tensors", "attribution.top_k", "attribution.steps_per_range"))


@LANGUAGE_MODEL.asset(
    group_name="model",
    deps=[token_shards, tokenizer],
    description="The language model: the embedded TransformerLens-native model trained on the token "
    "shards with a held-out split (capturing per-datum parameter shifts when attribution.capture is on), "
    "or a reference to a named model.",
)
def language_model(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
    import numpy as np
    import polars as pl
    import torch

    from sae_assets.core.model import lm
    from sae_assets.core.model import training as lm_train
    from sae_assets.defs import capture_io

    cfg = settings.load()
    store = storage.store()
    tok_manifest = store.require("tokenizer", None)
    if cfg.model.kind == "named":
        with LANGUAGE_MODEL.writer(store, cfg, None, upstream={"tokenizer": tok_manifest.data_version}) as out:
            out.path("model_ref.json").write_text(json.dumps({"kind": "named", "name": cfg.model.name}))
            out.extra.update(kind="named", name=cfg.model.name)
        return result(out.manifest, store, {"model": cfg.model.name})

    tokens, first_index, upstream = load_all_sequences(store, training_shard_keys(context.instance, cfg))
    upstream["tokenizer"] = tok_manifest.data_version
    is_val = lm.split_is_validation(first_index, cfg.model.val_fraction, cfg.model.seed)
    if not is_val.any() or is_val.all():
        raise ValueError(f"language_model: {int(is_val.sum())} of {len(is_val)} sequences are held out; "
                         f"change model.val_fraction={cfg.model.val_fraction} or add data")
    vocab_size = tok_manifest.extra["vocab_size"]
    torch.manual_seed(cfg.model.seed)
    model = lm.build_embedded_model(cfg.model, vocab_size=vocab_size, context_length=tokens.shape[1])
    train = torch.from_numpy(tokens[~is_val].astype(np.int64))  # (N, T)
    val = torch.from_numpy(tokens[is_val].astype(np.int64))  # (M, T)
    with LANGUAGE_MODEL.writer(store, cfg, None, upstream=upstream) as out:
        # With attribution.capture, per-datum shifts of each step range go into this partition.
        with capture_io.capture_into(out, cfg, model, first_index[~is_val], tokens.shape[1]) as capture:
            trained = lm_train.train_language_model(model, train, val, cfg.model, capture=capture,
                                                    progress_log=progress_log(context))
        entropy = lm.unigram_entropy(tokens[~is_val])
        curve = pl.DataFrame(trained.curve)
        lm.save_embedded_model(model, cfg=cfg.model, vocab_size=vocab_size, context_length=tokens.shape[1],
                               directory=out.scratch)
        curve.write_parquet(out.path("training_curve.parquet"))
        out.extra.update(kind="embedded", val_loss=round(trained.val_loss, 6), unigram_entropy=round(entropy, 6),
                         train_sequences=int(len(train)), val_sequences=int(len(val)))
    return result(out.manifest, store, {
        "train_loss": dg.MetadataValue.float(trained.final_train_loss),
        "val_loss": dg.MetadataValue.float(trained.val_loss),
        "unigram_entropy": dg.MetadataValue.float(entropy),
        "tokens_per_second": dg.MetadataValue.float(trained.tokens_per_second),
        "steps": trained.steps,
        "parameters": sum(p.numel() for p in model.parameters()),
        "training_curve": dg.MetadataValue.md(line_chart_markdown(curve, "step", ["train_loss", "val_loss"])),
        **capture_io.capture_metadata(capture, trained.train_seconds),
    })


def load_language_model(store, device: str = "cpu"):
    """The language_model asset as a TransformerBridge, with its manifest."""
    from sae_assets.core.model import lm

    manifest = store.require("language_model", None)
    if manifest.extra.get("kind") == "named":
        return lm.load_named_model(manifest.extra["name"], device=device), manifest
    weights = store.fetch(manifest, lm.WEIGHTS_FILE)
    return lm.load_embedded_model_files(weights, store.fetch(manifest, lm.CONFIG_FILE), device=device), manifest
