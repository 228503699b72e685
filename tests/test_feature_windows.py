"""Context windows (core): shown-example choice, the two passes against a brute-force encode of
every token, clipping at sequence boundaries, coverage errors and the site documents."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from support import HOOK, SHARD_SEQUENCE_LENGTH, SHARD_WIDTH, shard_table

from sae_assets.core import schemas
from sae_assets.core.features import windows as feature_windows
from sae_assets.core.features import site_data
from sae_assets.core.features.intervals import interval_shares
from sae_assets.core.features.sampling import feature_token_hash, sample_activation_table
from sae_assets.core.features.merge import merge_feature_samples
from sae_assets.core.sae.relu import ReluSae
from sae_assets.core.sae.topk import TopKSae

T, D, F = SHARD_SEQUENCE_LENGTH, SHARD_WIDTH, 12  # tokens per sequence, activation width, features


def make_sae(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    sae = ReluSae(D, F, l1_coefficient=1.0) if kind == "relu" else TopKSae(D, F, k=3)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return sae


def pipeline(tables, sae, lo, hi, *, before=3, after=2, batch=7, boundary_ids=(), sample_k=12, levels=3):
    parts = [sample_activation_table(t, hook=HOOK, encode_range=lambda x: sae.encode_range(x, lo, hi, rectify=False),
                                     lo=lo, hi=hi, top_k=3, sample_k=sample_k, seed=5, batch_size=batch)
             for t in tables]
    merged = merge_feature_samples(parts)
    shown = feature_windows.select_shown_examples(merged, random_examples=2, activation_levels=levels,
                                                  examples_per_level=2)
    gathered = [feature_windows.gather_context_windows(
        shown, t, lambda x: sae.encode_range(x, lo, hi), shard=s, hook=HOOK, context_length=T, before=before,
        after=after, lo=lo, batch_size=batch, boundary_ids=boundary_ids, where=f"shard {s}")
        for s, t in enumerate(tables)]
    windows = feature_windows.assemble_context_windows(shown, gathered, where="test")
    return merged, shown, gathered, windows


@pytest.mark.parametrize("kind", ["relu", "topk"])
def test_encode_range_equals_slicing_the_full_encode(kind) -> None:
    sae = make_sae(kind)
    x = torch.randn(20, D)
    for lo, hi in [(0, F), (3, 7), (11, 12)]:
        assert torch.allclose(sae.encode_range(x, lo, hi), sae.encode(x)[:, lo:hi], atol=1e-6)
    with pytest.raises(ValueError, match="outside the dictionary"):
        sae.encode_range(x, 8, F + 1)


@pytest.mark.parametrize("kind", ["relu", "topk"])
def test_unrectified_encode_gives_the_sampler_the_same_tables(kind) -> None:
    """The feature sampler is fed `encode_range(..., rectify=False)` (as the feature_samples
    asset does): a ReLU dictionary's raw pre-activations, negatives included, give the tables
    of its activations; other architectures return their activations either way."""
    sae, table = make_sae(kind), shard_table(0, 5, 1)
    x = torch.randn(50, D)
    raw = sae.encode_range(x, 2, 9, rectify=False)
    assert bool((raw < 0).any()) == (kind == "relu")
    assert torch.equal(raw.clamp_min(0), sae.encode_range(x, 2, 9))
    a, b = (sample_activation_table(table, hook=HOOK, encode_range=lambda x: sae.encode_range(x, 2, 9, rectify=r),
                                    lo=2, hi=9, top_k=3, sample_k=12, seed=5, batch_size=7) for r in (False, True))
    assert a.top.equals(b.top) and a.sample.equals(b.sample) and a.stats.equals(b.stats)
    assert int(np.sum(a.stats.column("count").to_numpy())) > 0


@pytest.mark.parametrize(("kind", "boundary_ids"), [("relu", ()), ("topk", ()), ("relu", (0, 1, 2, 3, 4)),
                                                     ("topk", (7,))])
def test_two_passes_equal_brute_force_windows(kind, boundary_ids) -> None:
    tables = [shard_table(0, 5, 1), shard_table(1, 4, 2)]
    sae = make_sae(kind)
    lo, hi = 2, 9
    merged, shown, _, windows = pipeline(tables, sae, lo, hi, boundary_ids=boundary_ids, before=5, after=4)
    # Brute force: encode every token of every shard, cut each window by hand.
    dense = {}
    for t in tables:
        x = torch.from_numpy(np.asarray(t.column(HOOK).combine_chunks().flatten()).reshape(-1, D).copy())
        f = sae.encode(x).detach().numpy()
        for i, tok in enumerate(t.column("token_index").to_numpy()):
            dense[int(tok)] = (f[i], int(t.column("token_id")[i].as_py()))
    want = sorted({(f, t) for f, t in zip(shown.column("feature").to_pylist(), shown.column("token_index").to_pylist())})
    got = list(zip(windows.column("feature").to_pylist(), windows.column("token_index").to_pylist()))
    assert got == want and len(got) > 0
    clipped = 0
    for row in windows.to_pylist():
        tok, f = row["token_index"], row["feature"]
        pos = (tok & ((1 << schemas.SHARD_BITS) - 1)) % T
        span = list(range(tok - min(5, pos), tok + min(4, T - 1 - pos) + 1))  # clipped to the sequence
        # ...and to the example's document: after the last boundary before it, up to the first at or after it.
        starts = [s + 1 for s in span if s < tok and dense[s][1] in boundary_ids]
        ends = [s for s in span if s >= tok and dense[s][1] in boundary_ids]
        document = [s for s in span if s >= max(starts, default=span[0]) and s <= min(ends, default=span[-1])]
        clipped += document != span
        span = document
        assert row["first_token_index"] == span[0]
        assert row["token_ids"] == [dense[s][1] for s in span]
        np.testing.assert_allclose(row["activations"], [dense[s][0][f] for s in span], atol=1e-5)
    assert (clipped > 0) == bool(boundary_ids), clipped  # the boundaries did cut some windows
    # The window's centre is the example itself: same value as in the examples table.
    centre = {(r["feature"], r["token_index"]): r["activations"][r["token_index"] - r["first_token_index"]]
              for r in windows.to_pylist()}
    for r in shown.to_pylist():
        assert centre[(r["feature"], r["token_index"])] == pytest.approx(r["activation"], abs=1e-5)


def test_shown_examples_follow_roles_and_levels() -> None:
    tables = [shard_table(0, 8, 3)]
    sae = make_sae("relu")
    merged, shown, _, _ = pipeline(tables, sae, 0, F)
    rows = shown.to_pylist()
    top = merged.top.to_pylist()
    assert [(r["feature"], r["token_index"]) for r in rows if r["role"] == "top"] == \
        [(r["feature"], r["token_index"]) for r in top]
    sample = merged.sample.to_pylist()
    assert [(r["feature"], r["token_index"]) for r in rows if r["role"] == "random"] == \
        [(r["feature"], r["token_index"]) for r in sample if r["rank"] < 2]
    peak = dict(zip(merged.stats.column("feature").to_pylist(), merged.stats.column("max").to_pylist()))
    pool = {(r["feature"], r["token_index"]): r["activation"] for r in sample + top}  # a token in both counts once
    hashes = dict(zip(pool, feature_token_hash(5, [f for f, _ in pool], [t for _, t in pool]).tolist()))
    for f in range(F):
        for level in (1, 2, 3):
            lo_v, hi_v = peak[f] * (level - 1) / 3, peak[f] * level / 3
            in_level = sorted((hashes[key], key[1]) for key, a in pool.items()
                              if key[0] == f and lo_v < a <= hi_v * (1 + 1e-6))
            picked = [r["token_index"] for r in rows if r["role"] == "level" and r["feature"] == f and r["level"] == level]
            assert picked == [t for _, t in in_level[:2]], (f, level)
    # The top interval of a feature is often empty in the sample alone; the top-K fills it.
    assert any(r["role"] == "level" and r["level"] == 3 and (r["feature"], r["token_index"]) not in
               {(s["feature"], s["token_index"]) for s in sample} for r in rows)


def _dense(tables, sae, lo: int, hi: int) -> np.ndarray:
    """(N, W) the range's activations on every token of every table: the brute force."""
    x_ND = np.concatenate([np.asarray(t.column(HOOK).combine_chunks().flatten()).reshape(-1, D) for t in tables])
    return sae.encode_range(torch.from_numpy(x_ND.copy()), lo, hi).detach().numpy()


@pytest.mark.parametrize("sample_k", [12, 4096])
def test_interval_groups_cover_the_range_with_their_shares_and_examples(sample_k) -> None:
    """SAEDashboard's 10 interval groups in the feature documents, against every activation: the
    ranges tile (0, max], the shares sum to 1 and equal the true shares where marked exact (all of
    them when the sample holds every activation), an estimate errs by at most the histogram bins
    its edges cut, and every example lies in its group, at most examples_per_level of them."""
    tables = [shard_table(0, 30, 3), shard_table(1, 20, 4)]
    sae = make_sae("relu")
    merged, shown, _, windows = pipeline(tables, sae, 0, F, sample_k=sample_k, levels=10)
    logits = site_data.logit_effects(sae.W_dec.detach(), torch.randn(D, 50), 4)
    docs = list(site_data.feature_documents(merged, shown, windows, [f"t{i}" for i in range(50)], logits=logits,
                                            activation_levels=10, dictionary="relu-test"))
    dense_NW = _dense(tables, sae, 0, F)
    inner = np.asarray(merged.hist_edges[1:-1])
    hist_WH = np.asarray(merged.stats.column("hist").combine_chunks().flatten()).reshape(F, -1)
    estimated = 0
    for doc in docs:
        values = dense_NW[:, doc["feature"]][dense_NW[:, doc["feature"]] > 0].astype(np.float64)
        assert doc["count"] == len(values) > 0
        peak = values.max()
        levels = doc["levels"]
        assert [g["level"] for g in levels] == list(range(10, 0, -1))  # highest first
        assert levels[-1]["low"] == 0 and levels[0]["high"] == doc["max"] == pytest.approx(peak, rel=1e-3)
        assert all(a["low"] == b["high"] for a, b in zip(levels, levels[1:]))  # they tile (0, max]
        assert sum(g["share"] for g in levels) == pytest.approx(1, abs=1e-3)
        for g in levels:
            low, high = peak * (g["level"] - 1) / 10, peak * g["level"] / 10
            true = ((values > low) & (values <= high)).mean()
            if g["exact"]:
                assert g["share"] == pytest.approx(true, rel=1e-3, abs=1e-6), (doc["feature"], g)
            else:
                estimated += 1
                cut = hist_WH[doc["feature"], np.searchsorted(inner, [low, high], side="right")]
                assert abs(g["share"] - true) <= cut.sum() / len(values) + 1e-3, (doc["feature"], g)
            assert len(g["examples"]) <= 2
            for e in g["examples"]:
                assert g["low"] * (1 - 1e-3) < e["activation"] <= g["high"] * (1 + 1e-3), (doc["feature"], g, e)
        json.dumps(doc, allow_nan=False)
    assert estimated > 0 if sample_k == 12 else estimated == 0
    shares = interval_shares(merged, 10)
    assert shares.share.shape == shares.exact.shape == (F, 10)
    assert interval_shares(merged, 0).share.shape == (F, 0)


def test_missing_or_foreign_shards_are_named() -> None:
    tables = [shard_table(0, 5, 1), shard_table(1, 4, 2)]
    sae = make_sae("relu")
    _, shown, gathered, _ = pipeline(tables, sae, 0, F)
    with pytest.raises(feature_windows.WindowError, match=r"shard\(s\) \[1\]"):
        feature_windows.assemble_context_windows(shown, [gathered[0]], where="t")
    offsets = [t & 0xFFFF for t in shown.column("token_index").to_pylist() if (t >> schemas.SHARD_BITS) == 1]
    short = tables[1].slice(0, max(offsets))  # a truncated shard: its last example points past the end
    with pytest.raises(feature_windows.WindowError, match="beyond the shard"):
        feature_windows.gather_context_windows(shown, short, lambda x: sae.encode_range(x, 0, F), shard=1, hook=HOOK,
                                               context_length=T, before=3, after=2, lo=0, batch_size=8,
                                               where="shard 1")


def test_windows_from_another_dictionary_or_schema_are_refused_by_shard() -> None:
    tables = [shard_table(0, 5, 1), shard_table(1, 4, 2)]
    sae = make_sae("relu")
    _, shown, gathered, _ = pipeline(tables, sae, 0, F)
    other = make_sae("topk")  # pass 1 of shard 1 encoded with a different dictionary
    foreign = feature_windows.gather_context_windows(shown, tables[1], lambda x: other.encode_range(x, 0, F), shard=1,
                                                     hook=HOOK, context_length=T, before=3, after=2, lo=0,
                                                     batch_size=7, where="shard 1")
    with pytest.raises(feature_windows.WindowError, match="disagree with their example's activation"):
        feature_windows.assemble_context_windows(shown, [gathered[0], foreign], where="t")
    wrong_schema = gathered[1].drop_columns(["token_ids"])
    with pytest.raises(feature_windows.WindowError, match=r"windows of shard-0001 do not follow"):
        feature_windows.assemble_context_windows(shown, [gathered[0], wrong_schema], where="t",
                                                 shard_names=["shard-0000", "shard-0001"])


def test_pass_one_bytes_do_not_grow_with_the_hook_width() -> None:
    """Pass 1 keeps each example's feature activation on its window, not the D-wide hook
    activations: its bytes are a token id and a value per window slot, whatever D is."""
    for width in (8, 256):
        table = shard_table(0, 5, 1, width=width)
        torch.manual_seed(0)
        sae = ReluSae(width, F, l1_coefficient=1.0)
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn_like(p) * 0.5)
        samples = sample_activation_table(table, hook=HOOK, encode_range=lambda x: sae.encode_range(x, 0, F), lo=0,
                                          hi=F, top_k=3, sample_k=12, seed=5, batch_size=7)
        shown = feature_windows.select_shown_examples(merge_feature_samples([samples]), random_examples=2,
                                                      activation_levels=3, examples_per_level=2)
        windows = feature_windows.gather_context_windows(shown, table, lambda x: sae.encode_range(x, 0, F), shard=0,
                                                         hook=HOOK, context_length=T, before=3, after=2, lo=0,
                                                         batch_size=7, where="t")
        slots = sum(len(r["token_ids"]) for r in windows.to_pylist())
        assert windows.num_rows > 0 and slots >= windows.num_rows
        # Per row: feature, two token indices and two list offsets; per slot: an id and a value.
        assert windows.nbytes <= windows.num_rows * 32 + slots * 8 + 64, (width, windows.nbytes)


def test_half_precision_windows_equal_the_examples_activations() -> None:
    tables = [shard_table(0, 4, 7, dtype="float16")]
    sae = make_sae("relu")
    _, shown, _, windows = pipeline(tables, sae, 0, F)  # assemble checks every centre against `shown`
    assert windows.num_rows == len({(r["feature"], r["token_index"]) for r in shown.to_pylist()}) > 0


def test_feature_documents_and_neuronpedia_layout() -> None:
    tables = [shard_table(0, 6, 4)]
    sae = make_sae("relu")
    merged, shown, _, windows = pipeline(tables, sae, 0, F)
    strings = [f"<t{i}>" for i in range(50)]
    logits = site_data.logit_effects(sae.W_dec.detach(), torch.randn(D, 50), 4)
    docs = list(site_data.feature_documents(merged, shown, windows, strings, logits=logits, activation_levels=3,
                                            dictionary="relu-test"))
    assert [d["feature"] for d in docs] == list(range(F))
    for doc in docs:
        json.dumps(doc, allow_nan=False)
        assert len(doc["top"]) == min(3, doc["count"])
        for example in doc["top"] + doc["random"]:
            assert example["tokens"][example["center"]].startswith("<t")
            assert example["acts"][example["center"]] == pytest.approx(example["activation"], rel=1e-2)
        assert [v for _, v in doc["logits"]["top"]] == sorted([v for _, v in doc["logits"]["top"]], reverse=True)
        exported = site_data.neuronpedia_feature(doc, merged.hist_edges)
        assert len(exported["freq_hist_data_bar_heights"]) == len(exported["freq_hist_data_bar_values"])
        assert exported["feature_index"] == doc["feature"] and exported["pos_str"] == [t for t, _ in doc["logits"]["top"]]
    row = site_data.index_row(docs[0])
    assert row[0] == 0 and row[1] == docs[0]["density"] and len(row[3]) <= 5


def test_token_strings_show_partial_characters_as_bytes() -> None:
    from sae_assets.core.corpus.tokenization import train_bpe

    tokenizer = train_bpe(["h\u00e9llo w\u00f6rld \u201cquoted\u201d \u2014 tick \u2713"] * 50, 300)
    strings = site_data.token_strings(tokenizer)
    assert len(strings) == tokenizer.get_vocab_size()
    assert not any("\ufffd" in s for s in strings), "no token collapses to the replacement character"
    assert "\\xe2" in strings and " w\u00f6rld" in strings  # a lone lead byte; a whole word
    assert len(set(strings)) == len(strings), "distinct tokens stay distinguishable"
