"""k-sparse probing of a dictionary: do a few of its latents tell one label of document from the rest?

After SAEBench's sparse probing (Karvonen, Rager, Lin, Tigges, Bloom et al., "SAEBench: A
Comprehensive Benchmark for Sparse Autoencoders"), on data this project has:
1. `pool_documents` runs the language model over sequences, encodes every token's activation
   with the dictionary and averages, per document, the raw activations (D,) and the latents
   (F,) over the document's tokens (end-of-text separators left out). Latents stay sparse:
   memory is tokens x L0, not documents x F.
2. `build_tasks` makes one binary task per label, that label against the rest: as many
   documents of other labels, drawn at random, as there are of the label; a seeded split by
   document, per class, into train and test. A label with too few documents is skipped, with
   the reason, rather than scored on a handful.
3. For each task and each k, the k latents whose class means differ most on the training
   split (|mean positive - mean negative|) feed a logistic regression; its test accuracy is
   the k-sparse probe accuracy. The baseline is a logistic regression on the pooled raw
   activations: the gap says how much of what the model's activations know about the label
   the dictionary's k best latents keep.
Logistic regressions standardise their inputs on the training split and minimise the mean
log loss + (1 / 2n) ||w||^2 (scikit-learn's default C = 1) with full-batch L-BFGS in float64:
deterministic. Tests: tests/test_probing.py.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from sae_assets.core import schemas
from sae_assets.core.activations.caching import hook_activations
from sae_assets.core.config import ProbingConfig
from sae_assets.core.corpus.labels import SEPARATOR
from sae_assets.core.sae.metrics import Dictionary, check_activations, dictionary_widths, reconstruct

# Letter key: S sequences, T positions, N documents (n of one task), D activation width, F latents, K chosen.


class ProbingError(ValueError):
    """Inputs a probe cannot be fitted on (NaN, one class, mismatched shapes); the message says which."""


class PooledDocuments(NamedTuple):
    """Documents' mean activations over their tokens in the pooled sequences."""

    shard_N: np.ndarray
    """(N,) int64 shard of each document."""
    document_N: np.ndarray
    """(N,) int64 ordinal of the document within its shard (its corpus_shards row)."""
    tokens_N: np.ndarray
    """(N,) int64 tokens averaged."""
    raw_ND: torch.Tensor
    """(N, D) float64 mean activation at the hook."""
    latents_NF: torch.Tensor
    """(N, F) float64 sparse COO (coalesced): mean latent activation."""


def pool_documents(model, sae: Dictionary, hook: str, tokens_ST: np.ndarray, first_S: np.ndarray,
                   document_ST: np.ndarray, *, batch_size: int, device="cpu") -> PooledDocuments:
    """Pool the raw activations and the dictionary's latents of `tokens_ST` per document
    (`document_ST`: ordinals within each sequence's shard, SEPARATOR where none)."""
    n_features, width = dictionary_widths(sae)
    if document_ST.shape != tokens_ST.shape or len(first_S) != len(tokens_ST):
        raise ProbingError(f"pool_documents: tokens {tokens_ST.shape}, documents {document_ST.shape} and "
                           f"{len(first_S)} first indices do not match")
    shard_ST = np.broadcast_to(schemas.shard_of_token(np.asarray(first_S))[:, None], tokens_ST.shape)
    keep = document_ST != SEPARATOR
    pairs, compact = np.unique(np.stack([shard_ST[keep], document_ST[keep]]), axis=1, return_inverse=True)
    row_ST = np.full(tokens_ST.shape, -1, dtype=np.int64)  # (S, T) pooled row of each token
    row_ST[keep] = compact.reshape(-1)
    n_docs = pairs.shape[1]
    raw_ND = torch.zeros(n_docs, width, dtype=torch.float64)
    rows_parts, cols_parts, values_parts = [], [], []  # the nonzero latents as COO triples
    with torch.no_grad():
        batches = hook_activations(model, tokens_ST, hook, batch_size=batch_size, device=device)
        for b, acts_ND in enumerate(batches):
            check_activations(acts_ND, width, f"hook {hook!r} on the probing sequences (batch {b})")
            row_N = torch.from_numpy(row_ST[b * batch_size:(b + 1) * batch_size].reshape(-1))
            mine = row_N >= 0
            acts_ND = acts_ND[mine.to(acts_ND.device)]
            f_NF, _ = reconstruct(sae, acts_ND)
            row_N = row_N[mine]
            raw_ND.index_add_(0, row_N, acts_ND.double().cpu())
            token, latent = torch.nonzero(f_NF, as_tuple=True)
            rows_parts.append(row_N[token.cpu()])
            cols_parts.append(latent.cpu())
            values_parts.append(f_NF[token, latent].double().cpu())
    tokens_N = np.bincount(row_ST[keep], minlength=n_docs).astype(np.int64)
    counts = torch.from_numpy(tokens_N).double()
    rows = torch.cat(rows_parts) if rows_parts else torch.zeros(0, dtype=torch.int64)
    values = torch.cat(values_parts) / counts[rows] if values_parts else torch.zeros(0, dtype=torch.float64)
    latents_NF = torch.sparse_coo_tensor(torch.stack([rows, torch.cat(cols_parts) if cols_parts else rows]),
                                         values, (n_docs, n_features), check_invariants=True).coalesce()
    return PooledDocuments(pairs[0], pairs[1], tokens_N, raw_ND / counts.clamp(min=1)[:, None], latents_NF)


def document_labels(pooled: PooledDocuments, labels_by_shard: dict[int, Sequence[str | None]]) -> list[str | None]:
    """(N,) the label of each pooled document, from each shard's labels in document order."""
    out = []
    for shard, document in zip(pooled.shard_N.tolist(), pooled.document_N.tolist()):
        labels = labels_by_shard.get(shard)
        if labels is None or document >= len(labels):
            raise ProbingError(f"shard {shard} has {0 if labels is None else len(labels)} documents but its "
                               f"token stream reaches document {document}: the corpus and token shards disagree "
                               f"(or a document's text holds the end-of-text token)")
        out.append(labels[document])
    return out


class ProbingTask(NamedTuple):
    label: str
    """The positive class: documents with this label, against as many with others."""
    train_N: np.ndarray
    """Positions into the pooled documents of the training split."""
    y_train: np.ndarray
    """(n,) bool: True for the label's documents."""
    test_N: np.ndarray
    y_test: np.ndarray


class SkippedTask(NamedTuple):
    label: str
    reason: str


def _task_rng(seed: int, label: str) -> np.random.Generator:
    # Keyed on the label, so a task's draw does not depend on which other tasks exist.
    return np.random.default_rng([seed, zlib.crc32(label.encode())])


def build_tasks(labels_N: Sequence[str | None], cfg: ProbingConfig) -> tuple[list[ProbingTask], list[SkippedTask]]:
    """One balanced one-vs-rest task per label of `cfg.tasks` (or the `cfg.num_tasks` most frequent
    labels with enough documents), split by document; unlabelled documents take no part."""
    labelled = np.array([i for i, label in enumerate(labels_N) if label is not None], dtype=np.int64)
    counts = Counter(labels_N[i] for i in labelled)
    enough = lambda label: min(counts[label], len(labelled) - counts[label]) >= cfg.min_documents  # noqa: E731
    if cfg.tasks:
        wanted = list(cfg.tasks)
    else:
        wanted = [label for label, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if enough(label)]
        wanted = wanted[: cfg.num_tasks]
    tasks, skipped = [], []
    for label in wanted:
        if not enough(label):
            skipped.append(SkippedTask(label, f"{counts[label]} documents labelled {label!r} and "
                                              f"{len(labelled) - counts[label]} others in the sample; each side needs "
                                              f"probing.min_documents={cfg.min_documents}"))
            continue
        tasks.append(_one_task(label, labelled, np.array([labels_N[i] == label for i in labelled]), cfg))
    if not cfg.tasks and not tasks:
        top = ", ".join(f"{label!r}: {n}" for label, n in counts.most_common(3)) or "none"
        skipped.append(SkippedTask("*", f"no label has probing.min_documents={cfg.min_documents} documents (and as "
                                        f"many others) among {len(labelled)} labelled documents; most frequent: {top}"))
    return tasks, skipped


def _one_task(label: str, labelled: np.ndarray, positive: np.ndarray, cfg: ProbingConfig) -> ProbingTask:
    rng = _task_rng(cfg.seed, label)
    pos, neg = labelled[positive], labelled[~positive]
    n = min(len(pos), len(neg))  # balanced: the larger side is subsampled
    pos, neg = (np.sort(rng.choice(side, size=n, replace=False)) for side in (pos, neg))
    n_test = min(n - 1, max(1, round(n * cfg.test_fraction)))
    train, test = [], []
    for members in (rng.permutation(pos), rng.permutation(neg)):
        test.append(members[:n_test])
        train.append(members[n_test:])
    y = lambda parts: np.concatenate([np.ones(len(parts[0]), bool), np.zeros(len(parts[1]), bool)])  # noqa: E731
    return ProbingTask(label, np.concatenate(train), y(train), np.concatenate(test), y(test))


def top_mean_difference(latents_NF: torch.Tensor, y_N: np.ndarray, k: int) -> np.ndarray:
    """(K,) int64 the min(k, F) latents with the largest |mean over positives - mean over negatives|
    (ties: lower index first). `latents_NF` dense or sparse COO."""
    y = torch.from_numpy(np.asarray(y_N, dtype=bool))
    if int(y.sum()) == 0 or int((~y).sum()) == 0:
        raise ProbingError("top_mean_difference needs documents of both classes")

    def mean(rows: torch.Tensor) -> np.ndarray:
        part = latents_NF.index_select(0, rows)
        total = torch.sparse.sum(part, dim=0).to_dense() if part.is_sparse else part.sum(dim=0)
        return (total.double() / len(rows)).numpy()

    diff_F = np.abs(mean(torch.nonzero(y).flatten()) - mean(torch.nonzero(~y).flatten()))
    if not np.isfinite(diff_F).all():
        raise ProbingError("latents hold NaN or inf")
    return np.lexsort((np.arange(len(diff_F)), -diff_F))[:k].astype(np.int64)


class LogisticProbe(NamedTuple):
    mean_D: torch.Tensor
    scale_D: torch.Tensor
    w_D: torch.Tensor
    b: torch.Tensor

    def predict(self, x_ND: torch.Tensor) -> np.ndarray:
        """(N,) bool: the positive class where the logit is > 0."""
        return (((x_ND.double() - self.mean_D) / self.scale_D) @ self.w_D + self.b > 0).numpy()


def fit_logistic(x_ND: torch.Tensor, y_N: np.ndarray, *, max_iter: int = 200) -> LogisticProbe:
    """L2-regularised logistic regression (strength 1/n) on standardised inputs, by L-BFGS."""
    x = x_ND.double()
    y = torch.from_numpy(np.asarray(y_N, dtype=np.float64))
    if x.ndim != 2 or len(x) != len(y) or len(x) == 0:
        raise ProbingError(f"fit_logistic: inputs {tuple(x.shape)} and labels {tuple(y.shape)} do not match")
    if not bool(torch.isfinite(x).all()):
        raise ProbingError("fit_logistic: inputs hold NaN or inf")
    if y.min() == y.max():
        raise ProbingError("fit_logistic: the training labels hold one class only")
    mean_D, scale_D = x.mean(dim=0), x.std(dim=0, unbiased=False)
    scale_D = torch.where(scale_D > 0, scale_D, torch.ones_like(scale_D))
    z = (x - mean_D) / scale_D
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    l2 = 1.0 / len(y)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ w + b, y) + 0.5 * l2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LogisticProbe(mean_D, scale_D, w.detach(), b.detach())


def probe_accuracy(x_train: torch.Tensor, y_train: np.ndarray, x_test: torch.Tensor, y_test: np.ndarray) -> float:
    """Test accuracy of a logistic regression fitted on the training split."""
    return float((fit_logistic(x_train, y_train).predict(x_test) == np.asarray(y_test, bool)).mean())


class ProbingResult(NamedTuple):
    rows: list[dict]
    """One per task and probe: label, probe ('raw' or 'sae'), k (0 for raw), accuracy,
    train_documents, test_documents, latents (the k chosen; empty for raw)."""
    skipped: list[SkippedTask]

    def summary(self, k_values: Sequence[int]) -> dict[str, float | int]:
        """Mean test accuracy over tasks: raw_accuracy, sae_top_{k}_accuracy and gap_top_{k} = raw - sae
        for each k (NaN without tasks), and the task count `tasks`."""
        mean = lambda rows: float(np.mean([r["accuracy"] for r in rows])) if rows else float("nan")  # noqa: E731
        raw = mean([r for r in self.rows if r["probe"] == "raw"])
        out: dict[str, float | int] = {"tasks": sum(r["probe"] == "raw" for r in self.rows), "raw_accuracy": raw}
        for k in k_values:
            sae = mean([r for r in self.rows if r["probe"] == "sae" and r["k"] == k])
            out[f"sae_top_{k}_accuracy"], out[f"gap_top_{k}"] = sae, raw - sae
        return out


def sparse_probing(pooled: PooledDocuments, labels_N: Sequence[str | None], cfg: ProbingConfig) -> ProbingResult:
    """k-sparse probes on the latents and a dense probe on the raw activations, for every task."""
    if len(labels_N) != len(pooled.raw_ND):
        raise ProbingError(f"{len(labels_N)} labels for {len(pooled.raw_ND)} pooled documents")
    if not bool(torch.isfinite(pooled.raw_ND).all()) or not bool(torch.isfinite(pooled.latents_NF.values()).all()):
        raise ProbingError("pooled activations or latents hold NaN or inf")
    tasks, skipped = build_tasks(labels_N, cfg)
    rows = []
    for task in tasks:
        train, test = torch.from_numpy(task.train_N), torch.from_numpy(task.test_N)
        sizes = {"label": task.label, "train_documents": len(train), "test_documents": len(test)}
        raw = probe_accuracy(pooled.raw_ND[train], task.y_train, pooled.raw_ND[test], task.y_test)
        rows.append({**sizes, "probe": "raw", "k": 0, "accuracy": raw, "latents": []})
        latents_train, latents_test = (pooled.latents_NF.index_select(0, part) for part in (train, test))
        for k in cfg.k_values:
            chosen = torch.from_numpy(top_mean_difference(latents_train, task.y_train, k))  # (K,)
            accuracy = probe_accuracy(latents_train.index_select(1, chosen).to_dense(), task.y_train,
                                      latents_test.index_select(1, chosen).to_dense(), task.y_test)
            rows.append({**sizes, "probe": "sae", "k": k, "accuracy": accuracy, "latents": chosen.tolist()})
    return ProbingResult(rows, skipped)
