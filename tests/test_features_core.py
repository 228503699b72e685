"""Feature samples (core): the sampler and the merge against a brute-force numpy computation.

Small dense (N, F) activation matrices with quantised values (many ties) and many zeros, tokens
with large shuffled global indices; checks exact equality of the top-K and sample tables with
the brute force, sharding/batching independence of the merged tables, uniformity of the sample
(chi-square over seeds), short lists, bounded state, Parquet round trips and clear errors.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from support import brute_force

from sae_assets.core.features.sampling import (
    FeatureRangeSampler,
    FeatureSamples,
    _INT64_MIN,
    _mix64_t,
    feature_keys,
    feature_token_hash,
)
from sae_assets.core.features.merge import merge_feature_samples
from sae_assets.core.schemas import global_token_index

SEED = 1234


def make_data(n: int = 600, f: int = 24, density: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, F) float32 activations, quantised to 0.25 with ~(1 - density) zeros; (N,) distinct token indices."""
    rng = np.random.default_rng(seed)
    x = np.round(rng.exponential(1.0, (n, f)) * 4) / 4 * (rng.random((n, f)) < density)
    x[:, 0] = 0.0  # a feature that never fires
    x[:, 1] = np.where(np.arange(n) % 150 == 7, 2.5, 0.0)  # fires on 4 tokens, fewer than top_k
    x[:, 2] = 1.0  # fires everywhere with one value: the top-K is decided by token index alone
    offsets = rng.choice(10 * n, size=n, replace=False)
    tok = global_token_index(0, offsets) + (rng.integers(0, 3, n) << 40)  # three "shards", shuffled
    return x.astype(np.float32), tok.astype(np.int64)


def run(x: np.ndarray, tok: np.ndarray, lo: int, hi: int, *, batch: int, top_k: int = 5, sample_k: int | None = None,
        seed: int = SEED, rows: np.ndarray | None = None) -> FeatureSamples:
    s = FeatureRangeSampler(lo, hi, top_k=top_k, sample_k=sample_k, seed=seed)
    rows = np.arange(len(x)) if rows is None else rows
    for i in range(0, len(rows), batch):
        r = rows[i:i + batch]
        s.update(torch.from_numpy(x[r])[:, lo:hi], torch.from_numpy(tok[r]))  # a strided view, as when slicing f_BF
    return s.result()


def assert_same(a: FeatureSamples, b: FeatureSamples) -> None:
    """Byte-equal tables, except the float64 sums, which may differ in their last bits."""
    assert a.top.equals(b.top, check_metadata=True)
    assert a.sample.equals(b.sample, check_metadata=True)
    for name in ("feature", "count", "max", "hist"):
        assert a.stats.column(name).equals(b.stats.column(name)), name
    np.testing.assert_allclose(a.stats.column("sum").to_numpy(), b.stats.column("sum").to_numpy(), rtol=1e-12)


@pytest.mark.parametrize(("batch", "density"), [(1, 0.3), (37, 0.3), (600, 0.3), (600, 0.02), (90, 0.05)])
def test_sampler_equals_brute_force(batch: int, density: float) -> None:
    """Sparse features next to an always-on one also exercise the padding of rows by size class."""
    x, tok = make_data(density=density)
    lo, hi = 0, 20
    got = run(x, tok, lo, hi, batch=batch, top_k=6, sample_k=25)
    want = brute_force(x, tok, lo, hi, top_k=6, sample_k=25, seed=SEED)
    top = got.top
    for name, col in zip(("feature", "rank", "token_index", "activation"), want["top"]):
        np.testing.assert_array_equal(top.column(name).to_numpy(), col, err_msg=name)
    for name, col in zip(("feature", "rank", "hash", "token_index", "activation"), want["sample"]):
        np.testing.assert_array_equal(got.sample.column(name).to_numpy(), col, err_msg=name)
    stats = got.stats
    np.testing.assert_array_equal(stats.column("count").to_numpy(), [s[1] for s in want["stats"]])
    np.testing.assert_allclose(stats.column("sum").to_numpy(), [s[2] for s in want["stats"]], rtol=1e-12)
    np.testing.assert_array_equal(stats.column("max").to_numpy(), np.float32([s[3] for s in want["stats"]]))
    hist = np.stack(stats.column("hist").to_pylist())
    np.testing.assert_array_equal(hist, np.stack([s[4] for s in want["stats"]]))
    assert got.n_tokens == len(x)
    # Ties really occurred, and feature 2 (all 1.0) takes the smallest token indices.
    assert len(np.unique(top.column("activation").to_numpy())) < len(top) / 2
    f2 = top.filter(pa.compute.equal(top.column("feature"), 2)).column("token_index").to_numpy()
    np.testing.assert_array_equal(f2, np.sort(tok)[:6])


def test_adversarial_orders_are_exact() -> None:
    """Tokens arriving in ascending or descending activation order (every batch improves the top, or none)."""
    x, tok = make_data(n=300, f=6)
    want = run(x, tok, 0, 6, batch=300)
    for f in range(3, 6):
        for order in (np.argsort(x[:, f], kind="stable"), np.argsort(-x[:, f], kind="stable")):
            assert_same(run(x, tok, 0, 6, batch=7, rows=order), want)


def test_short_lists_and_silent_features() -> None:
    x, tok = make_data()
    got = run(x, tok, 0, 3, batch=50, top_k=6, sample_k=25)
    per_feature_top = np.bincount(got.top.column("feature").to_numpy(), minlength=3)
    per_feature_sample = np.bincount(got.sample.column("feature").to_numpy(), minlength=3)
    np.testing.assert_array_equal(per_feature_top, [0, 4, 6])
    np.testing.assert_array_equal(per_feature_sample, [0, 4, 25])
    row0 = got.stats.slice(0, 1).to_pylist()[0]
    assert row0["count"] == 0 and row0["sum"] == 0.0 and row0["max"] == 0.0 and sum(row0["hist"]) == 0
    assert len(got.stats) == 3


def test_histogram_edges_and_clipping() -> None:
    """Left-closed bins; values below the first or above the last edge land in the end bins."""
    s = FeatureRangeSampler(5, 7, top_k=2, seed=0, hist_edges=[0.5, 1.0, 2.0, 4.0])
    v = np.float32([1e-6, 0.5, 0.99, 1.0, 3.9, 4.0, 5e3, np.inf, 0.0, -1.0])
    s.update(torch.from_numpy(np.stack([v, np.zeros_like(v)], 1)), np.arange(10))
    stats = s.result().stats.to_pylist()
    assert stats[0]["hist"] == [3, 1, 4] and stats[0]["count"] == 8 and stats[0]["max"] == np.inf
    assert stats[1] == {"feature": 6, "count": 0, "sum": 0.0, "max": 0.0, "hist": [0, 0, 0]}


def shard_rows(n: int, n_shards: int, seed: int) -> list[np.ndarray]:
    """A random, uneven split of the row indices (not contiguous ranges)."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, n_shards, n)
    return [np.nonzero(label == s)[0] for s in range(n_shards)]


def test_merge_is_sharding_and_batching_independent() -> None:
    x, tok = make_data()
    lo, hi = 4, 20
    one = run(x, tok, lo, hi, batch=600)
    shards = [run(x, tok, lo, hi, batch=b, rows=r) for b, r in zip([1, 3, 16, 64, 5, 200, 9], shard_rows(600, 7, 1))]
    merged = merge_feature_samples(shards)
    assert_same(merged, one)
    assert merged.n_tokens == 600
    # Associative: any grouping of the parts gives the same tables.
    left = merge_feature_samples([merge_feature_samples(shards[:3]), merge_feature_samples(shards[3:])])
    right = merge_feature_samples([shards[0], merge_feature_samples([merge_feature_samples(shards[1:5]), *shards[5:]])])
    assert_same(left, merged)
    assert_same(right, merged)
    # Merging with a part that saw no tokens changes nothing; nor does merging one part.
    empty = FeatureRangeSampler(lo, hi, top_k=5, seed=SEED).result()
    assert_same(merge_feature_samples([empty, one]), one)
    assert_same(merge_feature_samples([one]), one)


def test_merge_to_smaller_k_equals_sampler_with_smaller_k() -> None:
    x, tok = make_data()
    parts = [run(x, tok, 0, 12, batch=40, top_k=8, sample_k=30, rows=r) for r in shard_rows(600, 3, 2)]
    assert_same(merge_feature_samples(parts, top_k=3, sample_k=11), run(x, tok, 0, 12, batch=600, top_k=3, sample_k=11))
    with pytest.raises(ValueError, match="cannot merge exactly"):
        merge_feature_samples(parts, top_k=9)


def test_merge_rejects_mismatched_parts() -> None:
    x, tok = make_data(n=100)
    a = run(x, tok, 0, 8, batch=100)
    with pytest.raises(ValueError, match="seed"):
        merge_feature_samples([a, run(x, tok, 0, 8, batch=100, seed=SEED + 1)])
    with pytest.raises(ValueError, match="lo"):
        merge_feature_samples([a, run(x, tok, 1, 8, batch=100)])
    with pytest.raises(ValueError, match="appears in two parts"):
        merge_feature_samples([a, a])  # the same tokens twice: overlapping shards


def test_sample_is_uniform_over_active_tokens() -> None:
    """Over many seeds each active token of a feature is sampled equally often; inactive ones never."""
    n, n_active, k, n_features, n_seeds = 60, 20, 5, 16, 150
    rng = np.random.default_rng(3)
    active = np.sort(rng.choice(n, n_active, replace=False))
    x = np.zeros((n, n_features), np.float32)
    x[active] = rng.random((n_active, n_features)).astype(np.float32) + 0.1
    tok = np.arange(1000, 1000 + n, dtype=np.int64)  # consecutive indices: the hardest case for a weak hash
    hits = np.zeros(n, np.int64)
    for seed in range(n_seeds):
        s = FeatureRangeSampler(100, 100 + n_features, top_k=1, sample_k=k, seed=seed)
        s.update(torch.from_numpy(x), tok)
        np.add.at(hits, s.result().sample.column("token_index").to_numpy() - 1000, 1)
    assert hits[np.setdiff1d(np.arange(n), active)].sum() == 0
    observed = hits[active]
    expected = n_seeds * n_features * k / n_active
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2_sf(chi2, n_active - 1) > 1e-4, (chi2, observed)


def chi2_sf(x: float, df: int) -> float:
    """Upper tail of the chi-square distribution: 1 - P(df/2, x/2) by the gamma series."""
    a, z = df / 2, x / 2
    term = total = 1.0 / a
    n = 0
    while term > 1e-17 * total:
        n += 1
        term *= z / (a + n)
        total += term
    return 1.0 - math.exp(a * math.log(z) - z - math.lgamma(a)) * total


def test_hash_torch_matches_numpy_reference_and_is_a_bijection() -> None:
    tok = np.concatenate([np.arange(5000), global_token_index(7, np.arange(100)), [2**62, 2**63 - 1]]).astype(np.int64)
    feats = np.array([0, 1, 2**31 - 1])
    ref = feature_token_hash(99, feats[None, :], tok[:, None])  # (T, 3) uint64
    keys = torch.from_numpy(feature_keys(99, feats).view(np.int64))
    t = torch.from_numpy(tok)
    order = _mix64_t(_mix64_t(t)[:, None] + keys[None, :]) ^ _INT64_MIN
    np.testing.assert_array_equal(order.numpy().view(np.uint64) ^ np.uint64(1 << 63), ref)
    assert all(len(np.unique(ref[:, j])) == len(tok) for j in range(3))
    assert feature_token_hash(99, 1, 5) != feature_token_hash(98, 1, 5)
    assert ref.dtype == np.uint64 and ref.max() > 2**63  # the full 64-bit range is used


def test_state_stays_bounded() -> None:
    rng = np.random.default_rng(5)
    s = FeatureRangeSampler(0, 32, top_k=4, seed=0)
    for i in range(3):
        x = (rng.random((256, 32)) * (rng.random((256, 32)) < 0.5)).astype(np.float32)
        s.update(torch.from_numpy(x), np.arange(i * 256, (i + 1) * 256))
    sizes = {name: tuple(t.shape) for name, t in s.state_tensors().items()}
    for i in range(3, 60):
        x = (rng.random((256, 32)) * (rng.random((256, 32)) < 0.5)).astype(np.float32)
        s.update(torch.from_numpy(x), np.arange(i * 256, (i + 1) * 256))
    assert {name: tuple(t.shape) for name, t in s.state_tensors().items()} == sizes
    assert sizes["top_val"] == (32, 4) and sizes["sample_key"] == (32, 40) and sizes["hist"] == (32, 56)
    assert s.n_tokens == 60 * 256


def test_parquet_round_trip() -> None:
    x, tok = make_data(n=200)
    got = run(x, tok, 3, 11, batch=64)
    tables = []
    for table in (got.top, got.sample, got.stats):
        buf = io.BytesIO()
        pq.write_table(table, buf)
        tables.append(pq.read_table(io.BytesIO(buf.getvalue())))
    back = FeatureSamples.from_tables(*tables)
    assert back.meta() == got.meta()
    assert_same(back, got)
    assert back.sample.schema.field("hash").type == pa.uint64()
    with pytest.raises(ValueError, match="metadata"):
        FeatureSamples.from_tables(got.top.replace_schema_metadata(None), got.sample, got.stats)


def test_stored_stats_keep_only_features_that_fired_and_read_back_whole() -> None:
    x, tok = make_data(n=300)
    x[:, 5:9] = 0.0  # four features never fire
    got = run(x, tok, 2, 14, batch=64)
    top, sample, stats = got.stored()
    fired = got.stats.column("count").to_numpy() > 0
    assert stats.num_rows == int(fired.sum()) == got.hi - got.lo - 4
    assert stats.column("feature").to_pylist() == (np.flatnonzero(fired) + got.lo).tolist()
    tables = []
    for table in (top, sample, stats):
        buf = io.BytesIO()
        pq.write_table(table, buf)
        tables.append(pq.read_table(io.BytesIO(buf.getvalue())))
    back = FeatureSamples.from_tables(*tables)
    assert back.stats.num_rows == got.hi - got.lo
    assert_same(back, got)
    with pytest.raises(ValueError, match="distinct features"):
        FeatureSamples.from_tables(top, sample, stats.take([1, 0]))


def test_bad_input_is_rejected() -> None:
    s = FeatureRangeSampler(0, 4, top_k=2, seed=0)
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        s.update(torch.zeros(3, 5), np.arange(3))
    with pytest.raises(ValueError, match="token_index"):
        s.update(torch.zeros(3, 4), np.arange(4))
    with pytest.raises(ValueError, match="token_index"):
        s.update(torch.zeros(3, 4), np.arange(3, dtype=np.float64))
    with pytest.raises(ValueError, match="NaN"):
        s.update(torch.tensor([[0.0, float("nan"), 1.0, 0.0]]), np.arange(1))
    with pytest.raises(ValueError, match="seed"):
        FeatureRangeSampler(0, 4, top_k=2, seed=-1)
    with pytest.raises(ValueError, match="hist_edges"):
        FeatureRangeSampler(0, 4, top_k=2, seed=0, hist_edges=[1.0, 0.5])
    s = FeatureRangeSampler(0, 4, top_k=2, seed=0)
    batch = torch.tensor([[1.0, 0.0, 2.0, 0.5], [3.0, 0.0, 0.0, 0.5]])
    s.update(batch, np.array([10, 11]))
    with pytest.raises(ValueError, match="offered twice"):
        s.update(batch, np.array([10, 11]))  # a repeated batch


def test_half_precision_and_empty_batches() -> None:
    x, tok = make_data(n=120, f=8)
    s = FeatureRangeSampler(0, 8, top_k=5, seed=SEED)
    s.update(torch.zeros(0, 8), np.zeros(0, np.int64))
    x_bf16 = torch.from_numpy(x).to(torch.bfloat16)
    assert torch.equal(x_bf16.float(), torch.from_numpy(x))  # quarter steps below 64 are exact in bf16
    s.update(x_bf16, tok)
    assert_same(s.result(), run(x, tok, 0, 8, batch=120))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    x, tok = make_data()
    s = FeatureRangeSampler(0, 24, top_k=5, seed=SEED)
    for i in range(0, 600, 64):
        s.update(torch.from_numpy(x[i:i + 64]).cuda(), torch.from_numpy(tok[i:i + 64]).cuda())
    assert_same(s.result(), run(x, tok, 0, 24, batch=64))


def wide_data(n: int = 700, f: int = 200, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """make_data over 200 features (three 64-feature words and a tail), plus entries the kernel's
    bit tests must skip or catch: negatives, -0.0, +inf and subnormals."""
    x, tok = make_data(n=n, f=f, density=0.1, seed=seed)
    rng = np.random.default_rng(seed)
    for value in (-1.0, -0.0, np.inf, 1e-45, -np.inf):
        rows, cols = rng.integers(0, n, 40), rng.integers(3, f, 40)
        x[rows, cols] = value
    return x, tok


@pytest.mark.parametrize(("batch", "threads"), [(5, 2), (64, 1), (64, 3), (700, 2), (333, 8)])
def test_compiled_kernel_equals_torch_path(batch: int, threads: int) -> None:
    """The numba kernel (CPU batches) and the torch code (CUDA batches, here run on the CPU) give
    byte-equal tables, float64 sums included, however the features are split between threads."""
    x, tok = wide_data()
    for lo, hi, top_k, sample_k in ((0, 200, 6, 25), (5, 138, 1, 3), (64, 192, 20, 300)):
        got, want = (FeatureRangeSampler(lo, hi, top_k=top_k, sample_k=sample_k, seed=SEED, compiled=c,
                                         kernel_threads=threads) for c in (True, False))
        for i in range(0, len(x), batch):
            for s in (got, want):
                s.update(torch.from_numpy(x[i:i + batch, lo:hi]), torch.from_numpy(tok[i:i + batch]))
        a, b = got.result(), want.result()
        assert a.top.equals(b.top) and a.sample.equals(b.sample) and a.stats.equals(b.stats), (lo, hi)
        assert len(a.top) and len(a.sample) and a.meta() == b.meta()
        # A result in the middle leaves the state usable: more batches give the one-pass tables.
        assert_same(got.result(), run(x, tok, lo, hi, batch=700, top_k=top_k, sample_k=sample_k))


@pytest.mark.parametrize("compiled", [True, False])
def test_both_paths_reject_nan_and_repeats(compiled: bool) -> None:
    x = np.zeros((3, 130), np.float32)
    x[1, [7, 129]] = np.float32("nan")
    x[2, 100] = -np.float32("nan")  # the sign bit set, as x86 makes NaNs
    x[0, 5] = 1.0
    with pytest.raises(ValueError, match=r"NaN activations for feature\(s\) \[17, 110, 139\]"):
        FeatureRangeSampler(10, 140, top_k=2, seed=0, compiled=compiled).update(torch.from_numpy(x), np.arange(3))
    s = FeatureRangeSampler(0, 2, top_k=4, seed=0, compiled=compiled)
    with pytest.raises(ValueError, match="token 12 was offered twice"):  # within one batch
        s.update(torch.tensor([[1.0, 0.0], [2.0, 0.0], [2.0, 0.0]]), np.array([11, 12, 12]))
    s = FeatureRangeSampler(0, 2, top_k=1, sample_k=5, seed=0, compiled=compiled)
    s.update(torch.tensor([[0.0, 1.0], [0.0, 2.0]]), np.array([11, 12]))
    with pytest.raises(ValueError, match="token 11 was offered twice for feature offset 1"):  # found by the sample
        s.update(torch.tensor([[0.0, 0.5]]), np.array([11]))


@pytest.mark.parametrize("compiled", [True, False])
def test_ties_on_neighbouring_tokens(compiled: bool) -> None:
    """Equal activations on consecutive token indices in random orders: the top-K tie rule (the
    smaller index wins) is decided between neighbours, where an off-by-one would show."""
    n = 300
    for seed in range(8):
        rng = np.random.default_rng(seed)
        x = np.round(rng.random((n, 6)) * 2 + 1).astype(np.float32)  # three values, many ties
        x[:, :3] = 1.0  # one value: the top-K is the smallest indices
        tok = rng.permutation(n).astype(np.int64) + 5000
        for top_k, batch in ((2, 1), (3, 300), (7, 13)):
            want = brute_force(x, tok, 0, 6, top_k=top_k, sample_k=9, seed=SEED)
            s = FeatureRangeSampler(0, 6, top_k=top_k, sample_k=9, seed=SEED, compiled=compiled)
            for i in range(0, n, batch):
                s.update(torch.from_numpy(x[i:i + batch]), torch.from_numpy(tok[i:i + batch]))
            got = s.result()
            for name, col in zip(("feature", "rank", "token_index", "activation"), want["top"]):
                np.testing.assert_array_equal(got.top.column(name).to_numpy(), col, err_msg=name)
            np.testing.assert_array_equal(got.sample.column("token_index").to_numpy(), want["sample"][3])
