"""k-sparse probing (sae_assets.core.sae.probing) and document labels (sae_assets.core.corpus.labels)
on synthetic data whose answer is planted: a latent that separates the classes must be the one
a k=1 probe picks, and it must beat a probe on raw activations that hold no signal. Pooling is
checked against a brute-force pooling through a tiny untrained model; tasks, splits and bad
inputs against what they promise. Runs in seconds on CPU. The asset itself is checked on the
tiny graph in tests/test_sae_assets.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_assets.core import schemas
from sae_assets.core.config import ConfigError, ModelConfig, ProbingConfig, config_from_dict
from sae_assets.core.corpus.labels import SEPARATOR, document_label, token_documents
from sae_assets.core.model.lm import build_embedded_model
from sae_assets.core.sae.probing import (
    PooledDocuments, ProbingError, build_tasks, fit_logistic, pool_documents, sparse_probing, top_mean_difference,
)

PLANTED = 7


def planted(n_per_class=40, n_features=32, width=12, seed=0, signal=True):
    """Pooled documents of labels 'a' and 'b' (and unlabelled ones): latent PLANTED is large on 'a'
    and zero elsewhere (if `signal`); every other latent, and the raw activations, are noise."""
    rng = np.random.default_rng(seed)
    labels = ["a"] * n_per_class + ["b"] * n_per_class + [None] * 5
    n = len(labels)
    latents = rng.exponential(1.0, size=(n, n_features)) * (rng.random((n, n_features)) < 0.3)
    latents[:, PLANTED] = 0.0
    if signal:
        latents[:n_per_class, PLANTED] = 1.0 + rng.random(n_per_class)
    raw = torch.from_numpy(rng.normal(size=(n, width)))
    pooled = PooledDocuments(np.zeros(n, np.int64), np.arange(n, dtype=np.int64), np.ones(n, np.int64), raw,
                             torch.from_numpy(latents).to_sparse().coalesce())
    return pooled, labels


CFG = ProbingConfig(k_values=(1, 2, 5), tasks=("a",), min_documents=10, test_fraction=0.25, seed=0)


def test_k1_probe_finds_the_planted_latent_and_beats_noise_activations():
    pooled, labels = planted()
    result = sparse_probing(pooled, labels, CFG)
    by = {(r["probe"], r["k"]): r for r in result.rows}
    assert by[("sae", 1)]["latents"] == [PLANTED]
    assert all(PLANTED in by[("sae", k)]["latents"] for k in (2, 5))
    assert by[("sae", 1)]["accuracy"] == 1.0
    assert by[("raw", 0)]["accuracy"] < 0.8, "raw activations are noise: a probe on them must not separate"
    summary = result.summary(CFG.k_values)
    assert summary["gap_top_1"] == pytest.approx(summary["raw_accuracy"] - 1.0)
    assert summary["tasks"] == 1


def test_without_the_planted_latent_no_probe_separates():
    pooled, labels = planted(signal=False)
    result = sparse_probing(pooled, labels, CFG)
    assert all(r["accuracy"] < 0.85 for r in result.rows), result.rows


def test_raw_probe_separates_linearly_separable_activations():
    rng = np.random.default_rng(1)
    y = np.arange(60) % 2 == 0
    x = torch.from_numpy(rng.normal(size=(60, 5)) + 3.0 * y[:, None] * np.array([1, -1, 0, 0, 0]))
    probe = fit_logistic(x[:40], y[:40])
    assert (probe.predict(x[40:]) == y[40:]).mean() == 1.0
    again = fit_logistic(x[:40], y[:40])
    assert torch.equal(probe.w_D, again.w_D), "the fit is deterministic"


def test_top_mean_difference_ranks_by_absolute_class_mean_difference():
    x = torch.tensor([[0.0, 5.0, 1.0, 0.0], [0.0, 5.0, 1.0, 0.0], [3.0, 0.0, 1.0, -1.0], [3.0, 0.0, 1.0, -1.0]])
    y = np.array([True, True, False, False])
    assert top_mean_difference(x, y, 2).tolist() == [1, 0]  # |5| then |-3|
    assert top_mean_difference(x.to_sparse(), y, 3).tolist() == [1, 0, 3]
    assert top_mean_difference(x, y, 10).tolist() == [1, 0, 3, 2], "k beyond F keeps every latent"


def test_tasks_are_balanced_split_by_document_and_seeded():
    labels = ["a"] * 30 + ["b"] * 12 + ["c"] * 5 + [None] * 4
    cfg = ProbingConfig(num_tasks=5, min_documents=10, test_fraction=0.25, seed=3)
    tasks, skipped = build_tasks(labels, cfg)
    assert [t.label for t in tasks] == ["a", "b"], "the most frequent labels with enough documents"
    assert skipped == []
    for task, per_class in zip(tasks, (17, 12)):  # 'a': 30 against 17 others; 'b': 12 against 35
        assert task.y_train.sum() == (~task.y_train).sum() and task.y_test.sum() == (~task.y_test).sum()
        assert len(task.train_N) + len(task.test_N) == 2 * per_class
        assert task.y_test.sum() == round(per_class * 0.25)
        assert not set(task.train_N) & set(task.test_N), "a document is in one split only"
        assert all(labels[i] is not None for i in np.concatenate([task.train_N, task.test_N]))
        assert all((labels[i] == task.label) == y for i, y in zip(task.train_N, task.y_train))
    again, _ = build_tasks(labels, cfg)
    assert all(np.array_equal(t.train_N, u.train_N) for t, u in zip(tasks, again))
    alone, _ = build_tasks(labels, ProbingConfig(tasks=("b",), min_documents=10, seed=3))
    assert np.array_equal(alone[0].test_N, tasks[1].test_N), "a task's draw does not depend on the other tasks"


def test_labels_without_enough_documents_are_skipped_by_name():
    labels = ["a"] * 30 + ["b"] * 3
    tasks, skipped = build_tasks(labels, ProbingConfig(tasks=("b", "zzz"), min_documents=5))
    assert tasks == [] and [s.label for s in skipped] == ["b", "zzz"]
    assert "3 documents labelled 'b'" in skipped[0].reason and "probing.min_documents=5" in skipped[0].reason
    tasks, skipped = build_tasks(labels, ProbingConfig(min_documents=5))
    assert tasks == [] and "no label has probing.min_documents=5" in skipped[0].reason, "one class only"
    result = sparse_probing(*planted(n_per_class=3), ProbingConfig(min_documents=5))
    assert result.rows == [] and np.isnan(result.summary((1,))["raw_accuracy"])


def test_bad_inputs_raise_clear_errors():
    pooled, labels = planted()
    nan = pooled._replace(raw_ND=pooled.raw_ND.clone().index_fill_(0, torch.tensor([3]), float("nan")))
    with pytest.raises(ProbingError, match="NaN"):
        sparse_probing(nan, labels, CFG)
    with pytest.raises(ProbingError, match="labels for"):
        sparse_probing(pooled, labels[:-1], CFG)
    with pytest.raises(ProbingError, match="one class"):
        fit_logistic(torch.ones(4, 2), np.ones(4, bool))
    with pytest.raises(ConfigError, match="probing.k_values"):
        config_from_dict({"probing": {"k_values": [0, 2]}})
    with pytest.raises(ConfigError, match="probing.min_documents"):
        config_from_dict({"probing": {"min_documents": 1}})


def test_document_labels_come_from_the_doc_id():
    assert document_label("json/decoder.py:JSONDecoder.decode", "embedded") == "json"
    assert document_label("argparse.py:<module>", "embedded") == "argparse"
    assert document_label("data/pos/review1.txt", "local") == "pos"
    assert document_label("data/reviews/train.jsonl:12", "local") == "reviews"
    assert document_label("imdb:train:5", "huggingface") is None


def test_token_documents_count_separators_from_the_shard_start():
    eos, T = 0, 4
    stream = np.array([5, 6, eos, 7, eos, eos, 8, 9, 9, eos, 3, 3])  # docs 0, 1, 2 (empty), 3, 4
    first = schemas.global_token_index(2, np.arange(3) * T)
    order = np.array([2, 0, 1])  # rows in any order
    docs = token_documents(stream.reshape(3, T)[order], first[order], eos)
    expected = np.array([0, 0, SEPARATOR, 1, SEPARATOR, SEPARATOR, 3, 3, 3, SEPARATOR, 4, 4]).reshape(3, T)
    assert np.array_equal(docs, expected[order])
    with pytest.raises(ValueError, match="shard 2 is not whole"):
        token_documents(stream.reshape(3, T)[1:], first[1:], eos)


def test_pooling_matches_brute_force_through_a_model():
    cfg = ModelConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=32, seed=0)
    torch.manual_seed(0)
    model = build_embedded_model(cfg, vocab_size=20, context_length=8)
    hook = "blocks.0.hook_resid_post"

    class Relu:
        W_enc, W_dec = torch.randn(16, 24), torch.randn(24, 16)

        def encode(self, x):
            return (x @ self.W_enc - 0.5).relu()

        def decode(self, f):
            return f @ self.W_dec

    sae = Relu()
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 20, size=(5, 8)).astype(np.int32)
    tokens[rng.random((5, 8)) < 0.2] = 0
    first = np.concatenate([schemas.global_token_index(0, np.arange(3) * 8),  # shard 0: 3 sequences
                            schemas.global_token_index(1, np.arange(2) * 8)])  # shard 1: 2 sequences
    documents = token_documents(tokens, first, eos_id=0)
    pooled = pool_documents(model, sae, hook, tokens, first, documents, batch_size=2)
    _, cache = model.run_with_cache(torch.from_numpy(tokens.astype(np.int64)), names_filter=hook)
    acts = cache[hook].reshape(-1, 16).double()
    latents = sae.encode(acts.float()).double()
    shard = np.repeat(first >> schemas.SHARD_BITS, 8)  # (S * T,)
    for i, (s, d) in enumerate(zip(pooled.shard_N, pooled.document_N)):
        mine = torch.from_numpy((shard == s) & (documents.reshape(-1) == d))
        assert pooled.tokens_N[i] == int(mine.sum()) > 0
        assert torch.allclose(pooled.raw_ND[i], acts[mine].mean(0), atol=1e-5)
        assert torch.allclose(pooled.latents_NF[i].to_dense(), latents[mine].mean(0), atol=1e-4)
    keys = {(int(s), int(d)) for s, d in zip(shard, documents.reshape(-1)) if d >= 0}
    assert keys == set(zip(pooled.shard_N.tolist(), pooled.document_N.tolist())), "every document once, shards apart"
