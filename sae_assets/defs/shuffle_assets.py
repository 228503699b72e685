"""Activations group: the exact two-pass out-of-core shuffle of cached activations.

shuffle_plan draws the seeded multivariate-hypergeometric (N, K) count table once from every
training shard's row count (so the result is a uniform permutation, not a stratified one).
Its data version is the hash of its content, not of its inputs: a shard re-cached with the
same row count gives the same table and turns no other shard's scatter stale. shuffle_scatter
[shard] cuts its own activation shard into K bucket files by its row of the plan, refusing a
plan drawn from other rows or bytes of that shard, and NaN/inf rows. shuffled_shards [bucket]
refuses pieces cut by different plans, or by a plan the cached shards no longer match, then
gathers bucket k from every scatter job and permutes it in memory, spilling through another
pass when it exceeds the memory budget. The asset check `shuffle_is_permutation` checks that
every bucket was gathered by the current plan at its capacity, and compares row counts,
order-independent checksums and, up to a size limit, the sorted source indices of input and
output.
"""

import dagster as dg

from resources import ArtifactStorage, RunSettings, keys
from resources.manifest import Manifest
from sae_assets.defs.activation_assets import ACTIVATIONS_FILE, cached_activations
from sae_assets.defs.common import SINGLE_RUN, each_partition, read_upstream, result
from sae_assets.defs.identity import AssetIdentity
from sae_assets.defs.partitions import BUCKETS, SHARDS, bucket_index, bucket_keys, shard_index, training_shard_keys

SHUFFLED_FILE = "shuffled.arrow"
PLAN_FILE = "plan.json"
REPLAN = "rematerialize shuffle_plan, then the shuffle_scatter partitions it marks stale"
FULL_PERMUTATION_CHECK_MAX_ROWS = 200_000_000  # beyond this the check relies on checksums (16 B/row)


def bucket_file(bucket: int) -> str:
    return f"bucket-{bucket:05d}.arrow"


def consistent_inputs(store, manifests) -> dict:
    """The activation format shared by every input partition; refuses a mixture."""
    from sae_assets.core.activations import caching as activations

    first = manifests[0]
    for other in manifests[1:]:
        activations.check_same_format(first.extra["format"], other.extra["format"],
                                      where_expected=keys.describe(first.asset, first.partition),
                                      where_found=keys.describe(other.asset, other.partition))
    return first.extra["format"]


def current_plan(store, cfg, where: str) -> "tuple[Manifest, ShufflePlan]":
    """The shuffle_plan manifest and plan, refused unless drawn for the configured K and seed."""
    from sae_assets.core.shuffle_plan import ShufflePlan

    manifest = store.require("shuffle_plan", None)
    plan = ShufflePlan.from_json(store.read_bytes(manifest, PLAN_FILE), where=f"shuffle_plan {PLAN_FILE}")
    at = f"{where}: shuffle_plan version {manifest.content_version}"
    plan.check_config(cfg.shuffle.num_buckets, cfg.shuffle.seed, where=at, hint=REPLAN)
    return manifest, plan


def check_plan_shards(plan: "ShufflePlan", plan_manifest: Manifest, training: list[str], where: str) -> None:
    from sae_assets.core.shuffle_plan import ShufflePlanError

    if list(plan.shards) != training:
        raise ShufflePlanError(
            f"{where}: shuffle_plan version {plan_manifest.content_version} was drawn for {len(plan.shards)} shards "
            f"{list(plan.shards)[:8]}, the training shards are now {len(training)}: {training[:8]}; {REPLAN}")


def check_source(plan: "ShufflePlan", plan_manifest: Manifest, source: Manifest, where: str) -> int:
    """The job index of a cached_activations partition, refused if the plan was drawn from other rows or bytes."""
    from sae_assets.core.shuffle_plan import ShufflePlanError

    version = plan_manifest.content_version
    job = plan.job(source.partition, where=f"{where}: shuffle_plan version {version}", hint=REPLAN)
    name = keys.describe(source.asset, source.partition)
    planned = plan_manifest.upstream.get(name)
    if (planned, plan.rows[job]) != (source.data_version, source.total_rows):
        raise ShufflePlanError(
            f"{where}: shuffle_plan version {version} was drawn from {name} version {planned} with "
            f"{plan.rows[job]} rows; {name} is now version {source.data_version} with {source.total_rows} rows; "
            f"{REPLAN}")
    return job


def check_pieces_share_plan(plan_manifest: Manifest, plan: "ShufflePlan", sources: list[Manifest],
                            scatters: list[Manifest], where: str) -> None:
    """Refuse scatter pieces cut by another plan or from other cached bytes, and a plan whose row
    counts the cached shards no longer have, naming every partition and version that disagrees."""
    from sae_assets.core.shuffle_plan import ShufflePlanError

    version = plan_manifest.content_version
    stale = []
    for rows, source, scatter in zip(plan.rows, sources, scatters):
        cached, cut = keys.describe(source.asset, source.partition), keys.describe(scatter.asset, scatter.partition)
        if source.total_rows != rows:
            stale.append(f"{cached} has {source.total_rows} rows, the plan {rows}")
        if scatter.upstream.get("shuffle_plan") != version:
            stale.append(f"{cut} was cut by shuffle_plan version {scatter.upstream.get('shuffle_plan', '(none)')}")
        elif scatter.upstream.get(cached) != source.data_version:
            stale.append(f"{cut} was cut from {cached} version {scatter.upstream.get(cached)}, "
                         f"now {source.data_version}")
    if stale:
        raise ShufflePlanError(f"{where}: refusing to gather pieces that do not all follow the current shuffle_plan "
                               f"version {version} (digest {plan.digest}): " + "; ".join(stale)
                               + "; rematerialize the shuffle_scatter partitions named (and shuffle_plan first if a "
                               "row count changed)")


def gather_inputs(store, cfg, instance, bucket: int, where: str) -> "tuple[Manifest, ShufflePlan, list[Manifest], dict]":
    """(plan manifest, plan, scatter manifests in job order, upstream versions) for gathering
    `bucket`, refused unless every piece follows the current plan and fills its cell of the table."""
    plan_manifest, plan = current_plan(store, cfg, where)
    check_plan_shards(plan, plan_manifest, training_shard_keys(instance, cfg), where)
    sources, _ = read_upstream(store, "cached_activations", list(plan.shards))
    scatters, upstream = read_upstream(store, "shuffle_scatter", list(plan.shards))
    check_pieces_share_plan(plan_manifest, plan, sources, scatters, where)
    plan.check_pieces(bucket, [m.files[bucket_file(bucket)].rows for m in scatters],
                      [keys.describe(m.asset, m.partition) for m in scatters], where=where)
    return plan_manifest, plan, scatters, {**upstream, "shuffle_plan": plan_manifest.content_version}


SHUFFLE_PLAN = AssetIdentity("shuffle_plan", version="1", keys=("shuffle.num_buckets", "shuffle.seed",
                                                             "corpus.training_shards"))


@SHUFFLE_PLAN.asset(
    group_name="activations",
    deps=[dg.AssetDep(cached_activations, partition_mapping=dg.AllPartitionMapping())],
    description="The shuffle's (N, K) count table, drawn once from every training shard's row count by a "
    "seeded multivariate hypergeometric: what every scatter job cuts by and every gather checks. Its data "
    "version changes exactly when the table does.",
)
def shuffle_plan(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
    from sae_assets.core.shuffle_plan import ShufflePlan

    cfg = settings.load()
    store = storage.store()
    shards = training_shard_keys(context.instance, cfg)
    if not shards:
        raise ValueError("shuffle_plan: there are no training shards to shuffle (add shard partitions first)")
    manifests, upstream = read_upstream(store, "cached_activations", shards)
    consistent_inputs(store, manifests)
    plan = ShufflePlan.draw(shards, [m.total_rows for m in manifests], cfg.shuffle.num_buckets, cfg.shuffle.seed)
    # The cached versions go in `upstream` only: the data version is the content version, which
    # leaves them out, so a re-cached shard with the same row count changes nothing downstream.
    with SHUFFLE_PLAN.writer(store, cfg, None, upstream=upstream) as out:
        out.path(PLAN_FILE).write_bytes(plan.to_json())
        out.extra.update(digest=plan.digest, shards=len(shards), rows=sum(plan.rows), num_buckets=plan.num_buckets)
    return result(out.manifest, store, {"digest": plan.digest, "shards": len(shards), "rows": sum(plan.rows)},
                  content_version=True)


SHUFFLE_SCATTER = AssetIdentity("shuffle_scatter", version="1", training_shards_only=True, keys=(
    "shuffle.num_buckets", "shuffle.seed", "shuffle.block_rows"))


@SHUFFLE_SCATTER.asset(
    group_name="activations",
    partitions_def=SHARDS,
    deps=[shuffle_plan, dg.AssetDep(cached_activations, partition_mapping=dg.IdentityPartitionMapping())],
    backfill_policy=SINGLE_RUN,
    description="Shuffle pass 1: each activation shard cut into K bucket files by its row of shuffle_plan's "
    "count table (exactly uniform overall); refuses a stale plan and NaN/inf rows. A backfill runs every "
    "shard in one run.",
)
def shuffle_scatter(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
    from resources.arrow_files import open_ipc_table, write_ipc_files
    from sae_assets.core import shuffle as sh

    cfg = settings.load()
    store = storage.store()
    shards = training_shard_keys(context.instance, cfg)
    for shard in context.partition_keys:
        if shard not in shards:
            raise ValueError(f"shuffle_scatter[{shard}]: the shuffle feeds dictionary training, which "
                             f"uses the first corpus.training_shards={cfg.corpus.training_shards} shards only")
    run = context.partition_keys
    where_run = f"shuffle_scatter[{run[0]}{'...' + run[-1] if len(run) > 1 else ''}]"
    plan_manifest, plan = current_plan(store, cfg, where_run)
    check_plan_shards(plan, plan_manifest, shards, where_run)

    def scatter_one(shard: str):
        where = f"shuffle_scatter[{shard}]"
        [source], upstream = read_upstream(store, "cached_activations", [shard])
        job = check_source(plan, plan_manifest, source, where)
        counts_K = plan.table[job]
        upstream["shuffle_plan"] = plan_manifest.content_version
        table = open_ipc_table(store.fetch(source, ACTIVATIONS_FILE))
        with SHUFFLE_SCATTER.writer(store, cfg, shard, upstream=upstream) as out:
            paths = {k: out.path(bucket_file(k)) for k in range(plan.num_buckets)}
            batches = sh.finite_batches(table.to_batches(), where=f"{where} reading cached_activations[{shard}]")
            pieces = sh.scatter_batches(batches, counts_K, seed=plan.seed, job=job, block_rows=cfg.shuffle.block_rows)
            rows = write_ipc_files(paths, table.schema, pieces)
            for k, path in paths.items():
                out.describe_table(path.name, rows=rows[k], schema=None)
            if [rows[k] for k in range(plan.num_buckets)] != counts_K.tolist():
                raise RuntimeError(f"{where} wrote {rows}, the plan says {counts_K.tolist()}")
            out.extra.update(format=source.extra["format"], shard=shard_index(shard), job=job,
                             counts=counts_K.tolist(), plan=plan_manifest.content_version, plan_digest=plan.digest)
        return out.manifest, {"rows_per_bucket": dg.MetadataValue.json(counts_K.tolist()),
                              "plan": plan_manifest.content_version}

    return each_partition(context, store, scatter_one)


# The memory budget decides whether a bucket takes another pass, which permutes it differently.
SHUFFLED_SHARDS = AssetIdentity("shuffled_shards", version="1", keys=(
    "shuffle.num_buckets", "shuffle.seed", "shuffle.block_rows", "shuffle.memory_budget_mb"))


@SHUFFLED_SHARDS.asset(
    group_name="activations",
    partitions_def=BUCKETS,
    deps=[shuffle_plan, dg.AssetDep(shuffle_scatter, partition_mapping=dg.AllPartitionMapping())],
    description="Shuffle pass 2: bucket k gathered from every scatter job and uniformly permuted in "
    "memory (another pass through disk when it exceeds shuffle.memory_budget_mb); refuses pieces cut by "
    "different or stale plans.",
)
def shuffled_shards(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
    from resources.arrow_files import LocalSpill, open_ipc_table, write_ipc_file
    from sae_assets.core import schemas
    from sae_assets.core import shuffle as sh

    cfg = settings.load()
    store = storage.store()

    def gather_one(partition: str):
        where = f"shuffled_shards[{partition}]"
        bucket = bucket_index(partition)
        if bucket >= cfg.shuffle.num_buckets:
            raise ValueError(f"partition {partition} is beyond shuffle.num_buckets={cfg.shuffle.num_buckets}")
        plan_manifest, plan, manifests, upstream = gather_inputs(store, cfg, context.instance, bucket, where)
        fmt = consistent_inputs(store, manifests)
        pieces = [open_ipc_table(store.fetch(m, bucket_file(bucket))) for m in manifests]
        expected = sh.combine_checksums(*(sh.source_checksum(p.column(schemas.TOKEN_INDEX).to_numpy())
                                          for p in pieces))
        budget, stats = int(cfg.shuffle.memory_budget_mb * 2**20), sh.GatherStats()
        capacity = int(plan.capacities[bucket])
        with SHUFFLED_SHARDS.writer(store, cfg, partition, upstream=upstream) as out, \
                LocalSpill(pieces[0].schema, parent=out.scratch.parent) as spill:
            batches = sh.gather_bucket(pieces, bucket=bucket, seed=plan.seed, memory_budget_bytes=budget,
                                       spill_write=spill.write, spill_read=spill.read, schema=pieces[0].schema,
                                       block_rows=cfg.shuffle.block_rows, stats=stats)
            rows, _ = write_ipc_file(out.path(SHUFFLED_FILE), pieces[0].schema, sh.finite_batches(batches, where=where))
            written = open_ipc_table(out.path(SHUFFLED_FILE)).column(schemas.TOKEN_INDEX).to_numpy()
            checksum = sh.source_checksum(written)
            if checksum != expected or rows != capacity:
                raise sh.PermutationError(f"{where}: wrote {rows} rows (checksum {checksum}); its scatter pieces "
                                          f"hold {expected[0]} (checksum {expected}) and its capacity in the plan "
                                          f"is {capacity}")
            out.describe_table(SHUFFLED_FILE, rows=rows, schema=str(pieces[0].schema))
            out.extra.update(format=fmt, bucket=bucket, checksum=list(checksum), plan=plan_manifest.content_version)
        return out.manifest, {"passes": stats.passes, "spilled_rows": stats.spilled_rows, "budget_bytes": budget,
                              "capacity": capacity}

    return each_partition(context, store, gather_one)


@dg.asset_check(asset=shuffled_shards, description="Every bucket was gathered by the current shuffle_plan at "
                "its capacity, and the output's rows and source indices equal the cached activations': same count, "
                "same order-independent checksum, a permutation.")
def shuffle_is_permutation(context: dg.AssetCheckExecutionContext, settings: RunSettings,
                           storage: ArtifactStorage) -> dg.AssetCheckResult:
    import numpy as np

    from resources.arrow_files import open_ipc_table
    from sae_assets.core import schemas
    from sae_assets.core import shuffle as sh

    store = storage.store()
    cfg = settings.load()
    inputs, _ = read_upstream(store, "cached_activations", training_shard_keys(context.instance, cfg))
    wanted = [k for k in bucket_keys(context.instance) if bucket_index(k) < cfg.shuffle.num_buckets]
    missing = [k for k in wanted if store.manifest("shuffled_shards", k) is None]
    if missing:
        return dg.AssetCheckResult(passed=False, metadata={"missing_buckets": dg.MetadataValue.json(missing)})
    outputs, _ = read_upstream(store, "shuffled_shards", wanted)
    plan_manifest, plan = current_plan(store, cfg, "shuffle_is_permutation")
    other_plan = [m.partition for m in outputs if m.extra.get("plan") != plan_manifest.content_version
                  or m.total_rows != plan.capacities[bucket_index(m.partition)]]
    if other_plan:  # gathered by another plan, or not at its capacity in this one
        return dg.AssetCheckResult(passed=False, metadata={"plan": plan_manifest.content_version,
                                                           "buckets_off_plan": dg.MetadataValue.json(other_plan)})
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
