"""Tests of the exact uniform multi-pass shuffle, its Arrow file helpers and the training reader.

Uniformity is tested statistically on the real scatter -> gather path over many fixed seeds
(N=4 uneven shards, K=3 buckets, 40 rows): per-cell chi-square of the (shard x bucket)
count table against its hypergeometric law, chi-square of the (source row x output
position) table, and the mean Spearman correlation of source index and output position.
The equal-cut scheme goes through the same path and the same count-table statistic must
reject it. Marginals and rank correlation miss laws such as a random cyclic shift, so the
full law is tested too: 4 rows through scatter and a gather forced to spill (and recurse),
each of the 24 orders equally likely over 2400 seeds. Seeds are fixed, so the tests are
deterministic; thresholds are p > 1e-4 for "uniform" and p < 1e-12 for "detected".
Chi-square p-values are computed here (no scipy). The shuffle plan, the mixture of plans it
prevents, and the NaN/inf refusal are tested on the core functions the assets call.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import torch

from resources.arrow_files import CorruptArrowFileError, LocalSpill, open_ipc_table, write_ipc_file
from sae_assets.core import shuffle as sh
from sae_assets.core.shuffle_plan import ShufflePlan, ShufflePlanError
from sae_assets.core.activations.reader import ShuffledActivationReader, to_numpy_matrix
from sae_assets.core.schemas import activation_schema, global_token_index, shard_of_token

HOOK = "blocks.0.hook_resid_post"
ROWS = [7, 13, 5, 15]  # N=4 uneven shards, T=40 rows
K = 3
T = sum(ROWS)
SEEDS = 1000
LAW_SEEDS = 2400  # 100 expected per order of 4 rows


# ---------------------------------------------------------------- fixtures and pipeline

def make_shards(rows=ROWS, width=4, dtype="float16") -> list[pa.Table]:
    """Shard i: global token indices of shard i, token_id = offset, activations from the index."""
    schema = activation_schema({HOOK: width}, dtype)
    shards = []
    for i, n in enumerate(rows):
        index = global_token_index(i, np.arange(n))
        values = (np.repeat(index % 997, width) + np.tile(np.arange(width), n)).astype(np.float32)
        if dtype == "bfloat16":
            storage = pa.array((values.view(np.uint32) >> 16).astype(np.uint16))
        else:
            storage = pa.array(values.astype(dtype))
        columns = [pa.array(index), pa.array(np.arange(n, dtype=np.int32)),
                   pa.FixedSizeListArray.from_arrays(storage, width)]
        shards.append(pa.Table.from_arrays(columns, schema=schema))
    return shards


class DictSpill:
    """In-memory spill callables that record what was spilled."""

    def __init__(self):
        self.files: dict[str, list[pa.RecordBatch]] = {}

    def write(self, name, batch):
        self.files.setdefault(name, []).append(batch)

    def read(self, name):
        return pa.Table.from_batches(self.files[name])


def run_shuffle(shards, seed, *, k=K, table_fn=None, budget=1 << 30, spill=None,
                input_chunk=None, block_rows=sh.SCATTER_BLOCK_ROWS, stats=None) -> list[pa.Table]:
    """The real path: count table, one scatter per shard, one gather per bucket (each bucket's
    GatherStats appended to `stats` if given)."""
    rows = [s.num_rows for s in shards]
    table = table_fn(rows, k) if table_fn else sh.bucket_count_table(rows, k, seed)
    pieces = [[[] for _ in range(k)] for _ in shards]  # [job][bucket] -> batches
    for j, shard in enumerate(shards):
        batches = shard.to_batches(max_chunksize=input_chunk)
        for b, piece in sh.scatter_batches(batches, table[j], seed=seed, job=j, block_rows=block_rows):
            pieces[j][b].append(piece)
    schema = shards[0].schema
    outputs = []
    for b in range(k):
        tables = [pa.Table.from_batches(pieces[j][b], schema=schema) for j in range(len(shards))]
        bucket_stats = sh.GatherStats()
        out = sh.gather_bucket(tables, bucket=b, seed=seed, memory_budget_bytes=budget,
                               spill_write=spill and spill.write, spill_read=spill and spill.read,
                               block_rows=block_rows, stats=bucket_stats)
        outputs.append(pa.Table.from_batches(list(out), schema=schema))
        if stats is not None:
            stats.append(bucket_stats)
    return outputs


def output_index(outputs) -> np.ndarray:
    """(T,) token_index in final order: buckets concatenated in bucket order."""
    return np.concatenate([o.column("token_index").to_numpy() for o in outputs])


# ---------------------------------------------------------------- statistics

def chi2_sf(stat: float, df: float) -> float:
    """P(chi2_df >= stat): regularized upper incomplete gamma Q(df/2, stat/2)."""
    a, x = df / 2.0, stat / 2.0
    if x <= 0:
        return 1.0
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:  # series for the lower function P, then Q = 1 - P
        term = total = 1.0 / a
        n = a
        while term > total * 1e-16:
            n += 1
            term *= x / n
            total += term
        return max(0.0, 1.0 - total * math.exp(log_front))
    tiny = 1e-300  # modified Lentz continued fraction for Q
    b = x + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, 100_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return math.exp(log_front) * h


def gof_pvalue(samples: np.ndarray, pmf: dict[int, float]) -> float:
    """Chi-square goodness of fit of integer samples to `pmf`, bins pooled to expected >= 5."""
    n = samples.size
    values, counts = np.unique(samples, return_counts=True)
    observed = dict(zip(values.tolist(), counts.tolist()))
    if set(observed) - set(pmf):
        return 0.0  # a value the law gives probability 0
    bins, exp_acc, obs_acc = [], 0.0, 0
    for x in sorted(pmf):
        exp_acc += n * pmf[x]
        obs_acc += observed.get(x, 0)
        if exp_acc >= 5:
            bins.append((obs_acc, exp_acc))
            exp_acc, obs_acc = 0.0, 0
    if exp_acc or obs_acc:
        last_obs, last_exp = bins.pop()
        bins.append((last_obs + obs_acc, last_exp + exp_acc))
    stat = sum((o - e) ** 2 / e for o, e in bins)
    return chi2_sf(stat, len(bins) - 1)


def hypergeom_pmf(population: int, successes: int, draws: int) -> dict[int, float]:
    total = math.comb(population, draws)
    return {x: math.comb(successes, x) * math.comb(population - successes, draws - x) / total
            for x in range(max(0, draws - population + successes), min(successes, draws) + 1)}


def count_table_pvalues(runs: list[list[pa.Table]]) -> np.ndarray:
    """(N, K) p-values: is output bucket k's count of shard-i rows hypergeometric over runs?"""
    caps = [o.num_rows for o in runs[0]]
    tables = np.array([[np.bincount(shard_of_token(o.column("token_index").to_numpy()), minlength=len(ROWS))
                        for o in outputs] for outputs in runs])  # (S, K, N)
    return np.array([[gof_pvalue(tables[:, k, i], hypergeom_pmf(T, ROWS[i], caps[k]))
                      for k in range(len(caps))] for i in range(len(ROWS))])


def position_stats(runs: list[list[pa.Table]]) -> tuple[float, float]:
    """(chi-square p of source row x position counts, p of the mean Spearman correlation)."""
    source = np.sort(output_index(runs[0]))  # source order = global token index order
    counts = np.zeros((T, T))  # (source rank, output position)
    rhos = []
    for outputs in runs:
        ranks = np.searchsorted(source, output_index(outputs))  # (T,) rank at each position
        counts[ranks, np.arange(T)] += 1
        rhos.append(1 - 6 * np.sum((ranks - np.arange(T)) ** 2) / (T * (T * T - 1)))
    expected = len(runs) / T
    p_positions = chi2_sf(float(((counts - expected) ** 2 / expected).sum()), (T - 1) ** 2)
    z = np.mean(rhos) * math.sqrt(len(runs) * (T - 1))  # sd of rho under H0 is 1/sqrt(T-1)
    return p_positions, math.erfc(abs(z) / math.sqrt(2))


@pytest.fixture(scope="module")
def uniform_runs():
    shards = make_shards()
    return [run_shuffle(shards, seed, input_chunk=4, block_rows=6) for seed in range(SEEDS)]


# ---------------------------------------------------------------- tests

def test_chi2_sf_matches_closed_forms():
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-9)
    assert chi2_sf(7.0, 2) == pytest.approx(math.exp(-3.5), rel=1e-12)
    for x in (20.0, 40.0, 90.0):  # even df: Q(m, x/2) = exp(-x/2) sum_{j<m} (x/2)^j / j!
        closed = math.exp(-x / 2) * sum((x / 2) ** j / math.factorial(j) for j in range(20))
        assert chi2_sf(x, 40) == pytest.approx(closed, rel=1e-9)


def test_count_table_margins_and_seeding():
    table = sh.bucket_count_table(ROWS, K, seed=5)
    assert table.sum(axis=1).tolist() == ROWS
    assert table.sum(axis=0).tolist() == [14, 13, 13]
    assert np.array_equal(table, sh.bucket_count_table(ROWS, K, seed=5))
    tables = {sh.bucket_count_table(ROWS, K, seed=s, pass_index=p).tobytes() for s in range(4) for p in range(3)}
    assert len(tables) > 6  # seed and pass both change the draw
    assert sh.equal_cut_count_table(ROWS, K).tolist()[1] == [5, 4, 4]


def test_uniform_count_table_is_hypergeometric(uniform_runs):
    p = count_table_pvalues(uniform_runs)
    assert p.min() > 1e-4, p


def test_equal_cut_is_detected_as_stratified():
    shards = make_shards()
    runs = [run_shuffle(shards, seed, table_fn=sh.equal_cut_count_table) for seed in range(300)]
    p = count_table_pvalues(runs)
    assert p.max() < 1e-12, p  # every cell's count is constant, never hypergeometric


def test_positions_uniform_and_uncorrelated(uniform_runs):
    for outputs in uniform_runs[:50]:
        assert [o.num_rows for o in outputs] == [14, 13, 13]
    p_positions, p_spearman = position_stats(uniform_runs)
    assert p_positions > 1e-4 and p_spearman > 1e-4, (p_positions, p_spearman)


def test_multi_pass_is_a_uniform_permutation():
    shards = make_shards()
    bytes_per_row = shards[0].nbytes / shards[0].num_rows  # 20 bytes: int64 + int32 + 4 x f16
    runs, spill_names = [], set()
    for seed in range(400):
        spill = DictSpill()
        runs.append(run_shuffle(shards, seed, budget=int(2.5 * bytes_per_row), spill=spill, block_rows=5))
        spill_names |= set(spill.files)
        sh.check_permutation(output_index(shards), output_index(runs[-1]))
    assert any(name.startswith("shuffle-p1-") for name in spill_names)  # a second pass
    assert any(name.startswith("shuffle-p2-") for name in spill_names)  # and a third (recursion)
    p_positions, p_spearman = position_stats(runs)
    assert p_positions > 1e-4 and p_spearman > 1e-4, (p_positions, p_spearman)
    assert count_table_pvalues(runs).min() > 1e-4


def test_multinomial_fallback_is_uniform(monkeypatch):
    # Totals of 1e9+ rows use independent uniform buckets; shrink the limit to run that path
    # (20: the 40-row table is multinomial, each shard's <= 15 labels still hypergeometric).
    monkeypatch.setattr(sh, "MAX_HYPERGEOMETRIC_TOTAL", 20)
    shards = make_shards()
    runs = [run_shuffle(shards, seed) for seed in range(400)]
    assert all(sh.bucket_count_table(ROWS, K, s).sum(axis=1).tolist() == ROWS for s in range(5))
    assert len({tuple(o.num_rows for o in outputs) for outputs in runs}) > 10  # sizes now vary
    p_positions, p_spearman = position_stats(runs)
    assert p_positions > 1e-4 and p_spearman > 1e-4, (p_positions, p_spearman)


@pytest.mark.parametrize("rows, k, passes", [
    pytest.param([4], 1, 3, id="one-bucket-recursing"),  # 4 rows -> sub-buckets [2, 1, 1] -> [1, 1]
    pytest.param([1, 3], 2, 2, id="two-shards-two-buckets"),  # the count table, then a spill per bucket
])
def test_every_order_of_four_rows_is_equally_likely_through_spills(rows, k, passes):
    """The full permutation law, on the path the assets use with a forced extra pass: every
    one of the 4! orders appears, and a chi-square test over LAW_SEEDS seeds accepts them as
    equally likely. (A uniform random cyclic shift has uniform marginals and zero mean rank
    correlation, so only a test of the law itself rules it out.)"""
    shards = make_shards(rows)
    source = output_index(shards)  # ascending global token indices
    budget = int(1.5 * shards[-1].nbytes / shards[-1].num_rows)  # below 2 rows: every bucket spills
    seen = Counter()
    for seed in range(LAW_SEEDS):
        stats, spill = [], DictSpill()
        outputs = run_shuffle(shards, seed, k=k, budget=budget, spill=spill, stats=stats)
        assert [s.passes for s in stats] == [passes] * k and all(s.spilled_rows > 0 for s in stats)
        seen[tuple(np.searchsorted(source, output_index(outputs)).tolist())] += 1
    orders = list(itertools.permutations(range(4)))
    assert set(seen) == set(orders), f"orders never drawn: {sorted(set(orders) - set(seen))}"
    expected = LAW_SEEDS / len(orders)
    stat = sum((seen[o] - expected) ** 2 / expected for o in orders)
    assert chi2_sf(stat, len(orders) - 1) > 1e-4, (stat, seen.most_common(3), seen.most_common()[-3:])
    in_memory = []
    run_shuffle(shards, 0, k=k, stats=in_memory)
    assert [(s.passes, s.spilled_rows) for s in in_memory] == [(1, 0)] * k


def test_deterministic_through_files_and_independent_of_batching(tmp_path):
    """Shards -> IPC files -> scatter files -> gather with LocalSpill -> output files, 3 times."""
    rows = [900, 1300, 40, 700]
    shards = make_shards(rows, width=8)
    schema = shards[0].schema
    table = sh.bucket_count_table(rows, 4, seed=11)

    def pipeline(run: str, chunk: int | None) -> list[bytes]:
        root = tmp_path / run
        root.mkdir()
        for j, shard in enumerate(shards):  # the input, as cached_activations would write it
            write_ipc_file(root / f"in{j}.arrow", schema, shard.to_batches(max_chunksize=chunk))
        for j in range(len(shards)):
            mapped = open_ipc_table(root / f"in{j}.arrow")
            pieces = [[] for _ in range(4)]
            for b, piece in sh.scatter_batches(mapped.to_batches(), table[j], seed=11, job=j, block_rows=256):
                pieces[b].append(piece)
            for b in range(4):
                write_ipc_file(root / f"scatter{j}-{b}.arrow", schema, pieces[b])
        outputs = []
        with LocalSpill(schema, parent=root) as spill:
            for b in range(4):
                tables = [open_ipc_table(root / f"scatter{j}-{b}.arrow") for j in range(len(shards))]
                batches = sh.gather_bucket(tables, bucket=b, seed=11, memory_budget_bytes=10_000,
                                           spill_write=spill.write, spill_read=spill.read, batch_rows=100)
                write_ipc_file(root / f"out{b}.arrow", schema, batches)
                outputs.append((root / f"out{b}.arrow").read_bytes())
            assert len(list(spill.directory.iterdir())) >= 4 * 2  # every bucket took a second pass
        sh.check_permutation(output_index(shards),
                             output_index([open_ipc_table(root / f"out{b}.arrow") for b in range(4)]))
        return outputs

    first = pipeline("a", None)
    assert pipeline("b", None) == first  # a rerun is byte-identical
    assert pipeline("c", 7) == first  # input batching does not matter
    assert pipeline("d", 1000) == first
    assert [open_ipc_table(tmp_path / "a" / f"out{b}.arrow").num_rows for b in range(4)] == [735] * 4


def test_seed_and_block_rows_key_the_order_but_input_batching_does_not():
    shards = make_shards()
    a = output_index(run_shuffle(shards, 1))
    assert not np.array_equal(a, output_index(run_shuffle(shards, 2)))
    assert not np.array_equal(a, output_index(run_shuffle(shards, 1, block_rows=3)))
    assert np.array_equal(a, output_index(run_shuffle(shards, 1, input_chunk=1)))


def test_check_permutation_and_checksums_catch_lost_and_duplicated_rows():
    shards = make_shards()
    source = output_index(shards)
    out = output_index(run_shuffle(shards, 3))
    sh.check_permutation(source, out)
    with pytest.raises(sh.PermutationError, match="1 missing"):
        sh.check_permutation(source, out[1:])  # a dropped row
    duplicated = out.copy()
    duplicated[5] = duplicated[6]
    with pytest.raises(sh.PermutationError, match=r"40 out; 1 missing .* 1 duplicated"):
        sh.check_permutation(source, duplicated)
    per_shard = [sh.source_checksum(s.column("token_index").to_numpy()) for s in shards]
    assert sh.combine_checksums(*per_shard) == sh.source_checksum(out)
    assert sh.source_checksum(duplicated) != sh.source_checksum(out)
    assert sh.source_checksum(out[1:]) != sh.source_checksum(out)


def test_scatter_and_gather_refuse_bad_input():
    shards = make_shards()
    with pytest.raises(ValueError, match="job 1: shard has more rows"):
        list(sh.scatter_batches(shards[1].to_batches(), [5, 5, 2], seed=0, job=1))
    with pytest.raises(ValueError, match="job 1: shard has 2 fewer rows"):
        list(sh.scatter_batches(shards[1].to_batches(), [5, 5, 5], seed=0, job=1))
    with pytest.raises(ValueError, match="memory budget 100; pass spill_write"):
        list(sh.gather_bucket(shards, bucket=0, seed=0, memory_budget_bytes=100))
    with pytest.raises(ValueError, match="job 1: schema"):
        list(sh.gather_bucket([shards[0], shards[1].drop_columns(["token_id"])], bucket=0, seed=0,
                              memory_budget_bytes=1 << 20))


def test_pieces_cut_by_two_plans_do_not_fill_the_buckets_and_the_plan_says_so():
    """The issue's mixture: job 0 cut by a 2-shard table, jobs 1 and 2 by the 3-shard one."""
    shards = make_shards([6, 6, 6])
    old = ShufflePlan.draw(["shard-0000", "shard-0001"], [6, 6], num_buckets=2, seed=0)
    new = ShufflePlan.draw(["shard-0000", "shard-0001", "shard-0002"], [6, 6, 6], num_buckets=2, seed=0)
    rows_JK = [old.table[0], new.table[1], new.table[2]]  # what each scatter job wrote per bucket
    pieces = [[pa.Table.from_batches([p for b, p in sh.scatter_batches(shard.to_batches(), rows_JK[j], seed=0, job=j)
                                      if b == k], schema=shard.schema) for k in range(2)]
              for j, shard in enumerate(shards)]
    gathered = [sum(batch.num_rows for batch in sh.gather_bucket([pieces[j][k] for j in range(3)], bucket=k, seed=0,
                                                                 memory_budget_bytes=1 << 20)) for k in range(2)]
    assert gathered == [10, 8] and new.capacities.tolist() == [9, 9]  # silently wrong without the plan
    names = [f"shuffle_scatter[{s}]" for s in new.shards]
    with pytest.raises(ShufflePlanError, match=r"bucket 0 would gather 10 rows .* capacity .* is 9 .*"
                                               r"shuffle_scatter\[shard-0000\] has 3 rows, the plan says 2"):
        new.check_pieces(0, [pieces[j][0].num_rows for j in range(3)], names, where="shuffled_shards[bucket-0000]")
    new.check_pieces(0, new.table[:, 0].tolist(), names, where="unused")  # the pieces one plan cuts fit


def test_plan_round_trips_and_refuses_what_it_was_not_drawn_for():
    plan = ShufflePlan.draw(["shard-0000", "shard-0001"], ROWS[:2], num_buckets=K, seed=5)
    assert np.array_equal(plan.table, sh.bucket_count_table(ROWS[:2], K, seed=5)) and not plan.table.flags.writeable
    again = ShufflePlan.from_json(plan.to_json(), where="plan.json")
    assert again.to_json() == plan.to_json() and again.digest == plan.digest
    assert ShufflePlan.draw(["shard-0000", "shard-0001"], [7, 14], K, 5).digest != plan.digest
    assert plan.job("shard-0001", where="w") == 1
    with pytest.raises(ShufflePlanError, match=r"s\[shard-0002\]: the plan .* does not list shard-0002; it was drawn "
                                               r"for 2 shards \[shard-0000, shard-0001\]; replan"):
        plan.job("shard-0002", where="s[shard-0002]", hint="replan")
    with pytest.raises(ShufflePlanError, match="drawn for num_buckets=3, seed=5; the config says .* seed=6"):
        plan.check_config(K, 6, where="w")
    for bad, why in [(b"{}", "KeyError"), (plan.to_json().replace(b"[7,13]", b"[7,12]"), "rows do not sum"),
                     (plan.to_json().replace(b'"num_buckets":3', b'"num_buckets":2'), "reshape")]:
        assert bad != plan.to_json() or why == "KeyError"
        with pytest.raises(ShufflePlanError, match=f"plan.json: .*{why}"):
            ShufflePlan.from_json(bad, where="plan.json")


def with_value(shard: pa.Table, column: str, row: int, bits_or_value) -> pa.Table:
    """`shard` with the first element of `column` at `row` replaced (a float, or bfloat16 bits)."""
    values = shard.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False).copy()
    width = shard.schema.field(column).type.list_size
    values[row * width] = bits_or_value
    array = pa.FixedSizeListArray.from_arrays(pa.array(values), width)
    return shard.set_column(shard.schema.get_field_index(column), shard.schema.field(column), array)


@pytest.mark.parametrize("dtype, bad", [("float32", np.nan), ("float16", np.inf), ("float16", -np.inf),
                                        ("bfloat16", 0x7FC0), ("bfloat16", 0xFF80)])
def test_finite_batches_names_the_first_nan_or_inf_row(dtype, bad):
    shard = make_shards([50], width=4, dtype=dtype)[0]
    assert [b.num_rows for b in sh.finite_batches(shard.to_batches(max_chunksize=16), where="w")] == [16, 16, 16, 2]
    assert make_shards([1], dtype="bfloat16")[0].column(HOOK).combine_chunks().flatten().type == pa.uint16()
    poisoned = with_value(with_value(shard, HOOK, 37, bad), HOOK, 41, bad)
    token_index = poisoned.column("token_index")[37].as_py()
    passed = []
    with pytest.raises(sh.NonFiniteActivationError, match=rf"shuffle_scatter\[shard-0000\] reading x: 2 row\(s\) "
                                                          rf"of a batch hold NaN or inf in {HOOK}, the first at "
                                                          rf"token_index {token_index};"):
        where = "shuffle_scatter[shard-0000] reading x"
        for batch in sh.finite_batches(poisoned.to_batches(max_chunksize=16), where=where):
            passed.append(batch.num_rows)
    assert passed == [16, 16]  # streamed: the clean batches before it went through
    largest = {"float32": 3.4e38, "float16": 65504.0, "bfloat16": 0x7F7F}[dtype]  # finite extremes pass
    list(sh.finite_batches(with_value(shard, HOOK, 3, largest).to_batches(), where="w"))


def test_arrow_files_atomic_write_and_corruption(tmp_path):
    shard = make_shards([100], width=8)[0]
    path = tmp_path / "shard.arrow"
    rows, size = write_ipc_file(path, shard.schema, shard.to_batches(max_chunksize=30))
    assert rows == 100 and size == path.stat().st_size
    mapped = open_ipc_table(path)
    assert mapped.equals(shard) and mapped.schema.metadata == shard.schema.metadata
    view = to_numpy_matrix(mapped.column(HOOK).chunk(1))  # (30, 8) zero-copy float16
    assert view.shape == (30, 8) and view.dtype == np.float16 and not view.flags.owndata

    def failing():
        yield shard.to_batches()[0]
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_ipc_file(path, shard.schema, failing())
    assert open_ipc_table(path).equals(shard)  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.arrow"]  # no temp left
    path.write_bytes(path.read_bytes()[: size // 2])
    with pytest.raises(CorruptArrowFileError, match="shard.arrow") as info:
        open_ipc_table(path)
    assert isinstance(info.value, ValueError) and info.value.path == path


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_reader_serves_every_row_once_per_epoch(dtype):
    shards = make_shards([37, 50, 0, 21], width=4, dtype=dtype)  # stand-ins for bucket files
    tables = [pa.Table.from_batches(s.to_batches(max_chunksize=8), schema=s.schema) for s in shards]
    reader = ShuffledActivationReader([lambda t=t: t for t in tables], hook=HOOK, batch_size=16,
                                      seed=4, window=2, with_token_index=True)
    epochs = []
    for epoch in range(3):
        batches = list(reader.epoch(epoch))
        assert len(batches) == len(reader) == 7 and [b[0].shape for b in batches][-1] == (12, 4)
        acts = torch.cat([a for a, _ in batches])
        index = torch.cat([i for _, i in batches]).numpy()
        assert acts.dtype == torch.float32
        assert np.array_equal(np.sort(index), np.sort(output_index(shards)))  # each row once
        assert torch.equal(acts[:, 1], torch.from_numpy((index % 997 + 1).astype(np.float32)))
        epochs.append(index)
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    again = torch.cat([i for _, i in reader.epoch(1)]).numpy()
    assert np.array_equal(again, epochs[1])  # same epoch, same order
    resumed = torch.cat([i for _, i in reader.epoch(1, skip_batches=3)]).numpy()
    assert np.array_equal(resumed, epochs[1][3 * 16:])
