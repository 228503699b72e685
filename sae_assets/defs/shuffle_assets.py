"""Activations group: the exact two-pass out-of-core shuffle of cached activations.

shuffle_scatter [shard] cuts each activation shard into K bucket files by the seeded
multivariate-hypergeometric count table (so the result is a uniform permutation, not a
stratified one); shuffled_shards [bucket] gathers bucket k from every scatter job and
permutes it in memory, spilling through another pass when it exceeds the memory budget.
The asset check `shuffle_is_permutation` compares row counts, order-independent checksums
and, up to a size limit, the sorted source indices of input and output.
"""

import dagster as dg
import numpy as np

from resources import ArtifactStorage, RunSettings
from resources.arrow_files import LocalSpill, open_ipc_table, write_ipc_file, write_ipc_files
from sae_assets.core import schemas
from sae_assets.core.activations import caching as activations
from sae_assets.core import shuffle as sh
from sae_assets.defs.activation_assets import ACTIVATIONS_FILE, cached_activations
from sae_assets.defs.common import SINGLE_RUN, asset_code_version, each_partition, read_upstream, result
from sae_assets.defs.partitions import BUCKETS, SHARDS, bucket_index, bucket_keys, shard_index, training_shard_keys

SHUFFLED_FILE = "shuffled.arrow"
FULL_PERMUTATION_CHECK_MAX_ROWS = 200_000_000  # beyond this the check relies on checksums (16 B/row)


def bucket_file(bucket: int) -> str:
    return f"bucket-{bucket:05d}.arrow"


def consistent_inputs(store, manifests) -> dict:
    """The activation format shared by every input partition; refuses a mixture."""
    first = manifests[0]
    for other in manifests[1:]:
        activations.check_same_format(first.extra["format"], other.extra["format"],
                                      where_expected=f"cached_activations[{first.partition}]",
                                      where_found=f"cached_activations[{other.partition}]")
    return first.extra["format"]


@dg.asset(
    group_name="activations",
    partitions_def=SHARDS,
    deps=[dg.AssetDep(cached_activations, partition_mapping=dg.AllPartitionMapping())],
    code_version="1",
    backfill_policy=SINGLE_RUN,
    description="Shuffle pass 1: each activation shard cut into K bucket files by a seeded "
    "multivariate-hypergeometric count table (exactly uniform overall). A backfill runs every shard in one run.",
)
def shuffle_scatter(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
    cfg = settings.load()
    store = storage.store()
    shards = training_shard_keys(context.instance, cfg)
    manifests, upstream = read_upstream(store, "cached_activations", shards)
    consistent_inputs(store, manifests)
    num_buckets = cfg.shuffle.num_buckets
    counts_NK = sh.bucket_count_table([m.total_rows for m in manifests], num_buckets, cfg.shuffle.seed)

    def scatter_one(shard: str):
        if shard not in shards:
            raise ValueError(f"shuffle_scatter[{shard}]: the shuffle feeds dictionary training, which "
                             f"uses the first corpus.training_shards={cfg.corpus.training_shards} shards only")
        job = shards.index(shard)
        table = open_ipc_table(store.fetch(manifests[job], ACTIVATIONS_FILE))
        with store.writer("shuffle_scatter", shard, code_version=asset_code_version(context),
                          upstream=upstream, config_hash=cfg.section_hash("shuffle")) as out:
            paths = {k: out.path(bucket_file(k)) for k in range(num_buckets)}
            pieces = sh.scatter_batches(table.to_batches(), counts_NK[job], seed=cfg.shuffle.seed, job=job,
                                        block_rows=cfg.shuffle.block_rows)
            rows = write_ipc_files(paths, table.schema, pieces)
            for k, path in paths.items():
                out.describe_table(path.name, rows=rows[k], schema=None)
            if [rows[k] for k in range(num_buckets)] != counts_NK[job].tolist():
                raise RuntimeError(f"shuffle_scatter[{shard}] wrote {rows}, table says {counts_NK[job]}")
            out.extra.update(format=manifests[job].extra["format"], shard=shard_index(shard),
                             job=job, counts=counts_NK[job].tolist())
        return out.manifest, {"rows_per_bucket": dg.MetadataValue.json(counts_NK[job].tolist())}

    return each_partition(context, store, scatter_one)


@dg.asset(
    group_name="activations",
    partitions_def=BUCKETS,
    deps=[dg.AssetDep(shuffle_scatter, partition_mapping=dg.AllPartitionMapping())],
    code_version="1",
    description="Shuffle pass 2: bucket k gathered from every scatter job and uniformly permuted in "
    "memory (another pass through disk when it exceeds shuffle.memory_budget_mb).",
)
def shuffled_shards(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
    cfg = settings.load()
    store = storage.store()
    bucket = bucket_index(context.partition_key)
    if bucket >= cfg.shuffle.num_buckets:
        raise ValueError(f"partition {context.partition_key} is beyond shuffle.num_buckets={cfg.shuffle.num_buckets}")
    manifests, upstream = read_upstream(store, "shuffle_scatter", training_shard_keys(context.instance, cfg))
    pieces = [open_ipc_table(store.fetch(m, bucket_file(bucket))) for m in manifests]
    expected = sh.combine_checksums(*(sh.source_checksum(p.column(schemas.TOKEN_INDEX).to_numpy()) for p in pieces))
    budget = int(cfg.shuffle.memory_budget_mb * 2**20)
    with store.writer("shuffled_shards", context.partition_key, code_version=asset_code_version(context),
                      upstream=upstream,
                      config_hash=cfg.section_hash("shuffle")) as out, \
            LocalSpill(pieces[0].schema, parent=out.scratch.parent) as spill:
        batches = sh.gather_bucket(pieces, bucket=bucket, seed=cfg.shuffle.seed, memory_budget_bytes=budget,
                                   spill_write=spill.write, spill_read=spill.read, schema=pieces[0].schema,
                                   block_rows=cfg.shuffle.block_rows)
        rows, nbytes = write_ipc_file(out.path(SHUFFLED_FILE), pieces[0].schema, batches)
        written = open_ipc_table(out.path(SHUFFLED_FILE)).column(schemas.TOKEN_INDEX).to_numpy()
        checksum = sh.source_checksum(written)
        if checksum != expected:
            raise sh.PermutationError(f"shuffled_shards[{context.partition_key}] checksum {checksum} != "
                                      f"its scatter pieces' {expected}")
        out.describe_table(SHUFFLED_FILE, rows=rows, schema=str(pieces[0].schema))
        out.extra.update(format=manifests[0].extra["format"], bucket=bucket, checksum=list(checksum))
    return result(out.manifest, store, {"passes": 1 + int(nbytes > budget), "budget_bytes": budget})


@dg.asset_check(asset=shuffled_shards, description="Rows and source indices of the shuffle output equal "
                "the cached activations': same count, same order-independent checksum, a permutation.")
def shuffle_is_permutation(context: dg.AssetCheckExecutionContext, settings: RunSettings,
                           storage: ArtifactStorage) -> dg.AssetCheckResult:
    store = storage.store()
    cfg = settings.load()
    inputs, _ = read_upstream(store, "cached_activations", training_shard_keys(context.instance, cfg))
    wanted = [k for k in bucket_keys(context.instance) if bucket_index(k) < cfg.shuffle.num_buckets]
    missing = [k for k in wanted if store.manifest("shuffled_shards", k) is None]
    if missing:
        return dg.AssetCheckResult(passed=False, metadata={"missing_buckets": dg.MetadataValue.json(missing)})
    outputs, _ = read_upstream(store, "shuffled_shards", wanted)
    in_index = [open_ipc_table(store.fetch(m, ACTIVATIONS_FILE)).column(schemas.TOKEN_INDEX).to_numpy() for m in inputs]
    out_index = [open_ipc_table(store.fetch(m, SHUFFLED_FILE)).column(schemas.TOKEN_INDEX).to_numpy() for m in outputs]
    in_sum = sh.combine_checksums(*(sh.source_checksum(i) for i in in_index))
    out_sum = sh.combine_checksums(*(sh.source_checksum(o) for o in out_index))
    facts = {"input_rows": in_sum[0], "output_rows": out_sum[0], "checksums_equal": in_sum == out_sum}
    if in_sum == out_sum and in_sum[0] <= FULL_PERMUTATION_CHECK_MAX_ROWS:
        try:
            sh.check_permutation(np.concatenate(in_index), np.concatenate(out_index))
            facts["permutation"] = "verified"
        except sh.PermutationError as exc:
            facts["permutation"] = str(exc)
            return dg.AssetCheckResult(passed=False, metadata=facts)
    return dg.AssetCheckResult(passed=in_sum == out_sum, metadata=facts)
