"""cached_activations and the shuffle assets, materialized on a tiny graph (local and S3).

Checks that cached rows are exactly the model's activations at the hook points with the right
global token indices, that the shuffle output is a permutation (the asset check) reached
through the extra pass a tiny memory budget forces, that reruns are byte-identical, and
that a wrong hook name or a mixture of activation formats is refused with a clear error.
On three cached shards: the shuffle plan is stable, turns the scatter stale only when its
table changes, a gather refuses pieces cut by an older plan (the mixture whose buckets miss
their capacities), and a NaN row is refused by the scatter without touching its output.
"""

import shutil
import uuid

import dagster as dg
import numpy as np
import pytest
import pyarrow as pa
import torch
from dagster._core.definitions.data_version import CachingStaleStatusResolver
from dagster._core.loader import LoadingContextForTest
from support import write_run_config
from resources.arrow_files import open_ipc_table, write_ipc_file
from sae_assets.core import schemas
from sae_assets.core.config import load_config
from sae_assets.core.shuffle_plan import ShufflePlan
from sae_assets.core.activations import caching as activations
from sae_assets.core.corpus import tokenization
from sae_assets.core.activations.reader import ShuffledActivationReader, bf16_bits_to_float32, to_numpy_matrix
from sae_assets.defs.activation_assets import ACTIVATIONS_FILE, CACHED_ACTIVATIONS
from sae_assets.defs.model_assets import load_language_model
from sae_assets.defs.partitions import bucket_keys, shard_keys, sync_partitions
from sae_assets.defs.shuffle_assets import PLAN_FILE, bucket_file
from sae_assets.definitions import ALL_ASSETS, ALL_CHECKS, build_resources, graph_assets
from sae_assets.demo import QUIET, materialize_all, runs_for

HOOKS = ["blocks.0.hook_resid_post", "blocks.0.hook_mlp_out"]
TINY = {
    "corpus": {"source": "embedded", "num_shards": 2, "max_documents": 150},
    "tokenizer": {"vocab_size": 300, "context_length": 16},
    "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "d_mlp": 64, "train_tokens": 4000,
              "batch_size": 8, "warmup_steps": 2, "val_fraction": 0.1},
    "activations": {"hook_points": HOOKS, "dtype": "bfloat16", "batch_size": 7},
    # A budget below one bucket's bytes forces gather_bucket through its extra pass.
    "shuffle": {"num_buckets": 3, "memory_budget_mb": 0.05, "block_rows": 64},
    "sae": {"sweep": [{"architecture": "topk", "width": 32, "sparsity": 4}], "train_tokens": 2048,
            "batch_size": 128, "resample_steps": [], "eval_sequences": 4, "min_loss_recovered": -100.0,
            "max_dead_fraction": 1.0},
}


def config_file(directory, storage, **sections):
    return write_run_config(directory, TINY, storage, **sections)


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    directory = tmp_path_factory.mktemp("graph")
    config_path = config_file(directory, {"root": str(directory / "artifacts")})
    instance = dg.DagsterInstance.ephemeral()
    materialize_all(instance, config_path, log=lambda *_: None)
    return instance, config_path, build_resources(config_path)["storage"].store(), directory


def test_cached_rows_are_the_models_activations(graph):
    instance, _, store, _ = graph
    model, _ = load_language_model(store)
    for shard in shard_keys(instance):
        tokens_ST, first_S = tokenization.sequences_from_table(
            open_ipc_table(store.fetch(store.require("token_shards", shard), "sequences.arrow")))
        manifest = store.require("cached_activations", shard)
        table = open_ipc_table(store.fetch(manifest, "activations.arrow"))
        assert table.num_rows == tokens_ST.size == manifest.total_rows
        expected_index = (first_S[:, None] + np.arange(tokens_ST.shape[1])[None, :]).ravel()
        assert np.array_equal(table.column(schemas.TOKEN_INDEX).to_numpy(), expected_index)
        assert np.array_equal(table.column(schemas.TOKEN_ID).to_numpy(), tokens_ST.ravel())
        assert table.schema.metadata[b"dtype"] == b"bfloat16"
        with torch.inference_mode():
            _, cache = model.run_with_cache(torch.from_numpy(tokens_ST[:5].astype(np.int64)), names_filter=HOOKS)
        for hook in HOOKS:
            stored = bf16_bits_to_float32(to_numpy_matrix(table.column(hook))[: 5 * tokens_ST.shape[1]])
            reference = cache[hook].reshape(-1, cache[hook].shape[-1]).to(torch.bfloat16).float().numpy()
            assert np.array_equal(stored, reference), hook
        assert manifest.extra["format"] == {"dtype": "bfloat16", "hook_widths": {h: 32 for h in HOOKS}}


def test_shuffle_is_a_permutation_and_the_check_passes(graph):
    instance, config_path, store, _ = graph
    inputs = np.concatenate([
        open_ipc_table(store.fetch(store.require("cached_activations", k), "activations.arrow"))
        .column(schemas.TOKEN_INDEX).to_numpy() for k in shard_keys(instance)])
    tables = [open_ipc_table(store.fetch(store.require("shuffled_shards", k), "shuffled.arrow"))
              for k in bucket_keys(instance)]
    outputs = np.concatenate([t.column(schemas.TOKEN_INDEX).to_numpy() for t in tables])
    assert np.array_equal(np.sort(inputs), np.sort(outputs))
    assert not np.array_equal(inputs, outputs), "the shuffle moved nothing"
    # Output position is not tied to source order.
    ranks = np.argsort(np.argsort(outputs))
    assert abs(np.corrcoef(ranks, np.arange(len(outputs)))[0, 1]) < 0.1
    # Bytes of a bucket exceed the 0.05 MB budget, so the gather took another pass.
    assert store.require("shuffled_shards", "bucket-0000").total_bytes > 0.05 * 2**20
    check = dg.materialize([*ALL_ASSETS, *ALL_CHECKS], selection=dg.AssetSelection.checks(*ALL_CHECKS),
                           instance=instance, resources=build_resources(config_path))
    [evaluation] = check.get_asset_check_evaluations()
    assert evaluation.passed and evaluation.metadata["permutation"].value == "verified"


def test_reader_serves_every_row_once_per_epoch(graph):
    instance, _, store, _ = graph
    buckets = [open_ipc_table(store.fetch(store.require("shuffled_shards", k), "shuffled.arrow"))
               for k in bucket_keys(instance)]
    reader = ShuffledActivationReader(buckets, hook=HOOKS[0], batch_size=50, seed=3, with_token_index=True)
    seen = [np.concatenate([i.numpy() for _, i in reader.epoch(e)]) for e in (0, 1)]
    total = sum(b.num_rows for b in buckets)
    for epoch in seen:
        assert len(epoch) == total and len(np.unique(epoch)) == total
    assert not np.array_equal(seen[0], seen[1])
    first_batch, _ = next(iter(reader.epoch(0)))
    assert first_batch.dtype == torch.float32 and first_batch.shape == (50, 32)


def test_rerun_of_the_shuffle_is_byte_identical(graph):
    instance, config_path, store, _ = graph
    before = {k: store.require("shuffled_shards", k).to_json() for k in bucket_keys(instance)}
    scatter_before = store.require("shuffle_scatter", "shard-0001").to_json()
    resources = build_resources(config_path)
    dg.materialize(ALL_ASSETS, selection=["shuffle_scatter"], partition_key="shard-0001", instance=instance,
                   resources=resources)
    dg.materialize(ALL_ASSETS, selection=["shuffled_shards"], partition_key="bucket-0002", instance=instance,
                   resources=resources)
    assert store.require("shuffle_scatter", "shard-0001").to_json() == scatter_before
    assert {k: store.require("shuffled_shards", k).to_json() for k in bucket_keys(instance)} == before


def latest_materialization(instance, asset: str, partition: str) -> tuple[str, str]:
    """(run id, data version) of the partition's latest materialization."""
    [record] = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1).records
    return record.run_id, record.asset_materialization.tags["dagster/data_version"]


def test_single_run_backfill_of_the_scatter_equals_runs_per_shard(graph):
    instance, config_path, store, _ = graph
    shards = shard_keys(instance)
    resources = build_resources(config_path)
    [(key, tags)] = runs_for(next(a for a in ALL_ASSETS if a.key.path == ["shuffle_scatter"]), shards)
    assert key is None and set(tags.values()) == {shards[0], shards[-1]}, "one run for the whole range"

    def ranged_run():
        dg.materialize(ALL_ASSETS, selection=["shuffle_scatter"], tags=tags, instance=instance, resources=resources)
        return {k: latest_materialization(instance, "shuffle_scatter", k) for k in shards}

    ranged = ranged_run()
    ranged_manifests = {k: store.require("shuffle_scatter", k).to_json() for k in shards}
    assert len({run for run, _ in ranged.values()}) == 1, "every shard materialized by the one run"
    assert len({version for _, version in ranged.values()}) == 1, "Dagster gives a ranged step one version"
    again = ranged_run()  # a new run on the same inputs: the same version, so nothing turns stale
    assert {r for r, _ in again.values()} != {r for r, _ in ranged.values()}
    assert {v for _, v in again.values()} == {v for _, v in ranged.values()}
    for k in shards:  # one run per shard writes byte-identical partitions, each with its own version
        dg.materialize(ALL_ASSETS, selection=["shuffle_scatter"], partition_key=k, instance=instance,
                       resources=resources)
        assert store.require("shuffle_scatter", k).to_json() == ranged_manifests[k]
        assert latest_materialization(instance, "shuffle_scatter", k)[1] == store.require("shuffle_scatter", k).data_version


def test_wrong_hook_name_lists_the_valid_ones(graph):
    instance, _, store, directory = graph
    before = store.require("cached_activations", "shard-0000").to_json()
    bad = config_file(directory, {"root": str(directory / "artifacts")},
                      activations={"hook_points": ["blocks.0.hook_resid_pots"]})
    with pytest.raises(Exception, match=r"blocks\.0\.hook_resid_pots.*blocks\.0\.hook_resid_post"):
        dg.materialize(ALL_ASSETS, selection=["cached_activations"], partition_key="shard-0000",
                       instance=instance, resources=build_resources(bad))
    assert store.require("cached_activations", "shard-0000").to_json() == before


def test_mixed_activation_formats_are_refused(tmp_path):
    config_path = config_file(tmp_path, {"root": str(tmp_path / "artifacts")})
    instance = dg.DagsterInstance.ephemeral()
    materialize_all(instance, config_path, log=lambda *_: None)
    float16 = config_file(tmp_path, {"root": str(tmp_path / "artifacts")}, activations={"dtype": "float16"})
    dg.materialize(ALL_ASSETS, selection=["cached_activations"], partition_key="shard-0001",
                   instance=instance, resources=build_resources(float16))
    store = build_resources(config_path)["storage"].store()
    before = {(a, p): store.require(a, p).to_json() for a, p in
              [("shuffle_plan", None), ("shuffle_scatter", "shard-0000"), ("shuffle_scatter", "shard-0001")]}
    # The plan was drawn from the bfloat16 shard: its scatter is refused, and so is a new plan.
    with pytest.raises(Exception, match=r"shuffle_scatter\[shard-0001\]: shuffle_plan version \w+ was drawn from "
                                        r"cached_activations\[shard-0001\] version \w+ with \d+ rows; .* is now"):
        dg.materialize(ALL_ASSETS, selection=["shuffle_scatter"], partition_key="shard-0001",
                       instance=instance, resources=build_resources(float16))
    with pytest.raises(Exception, match=r"cached_activations\[shard-0001\].*float16.*refusing to mix"):
        dg.materialize(ALL_ASSETS, selection=["shuffle_plan"], instance=instance, resources=build_resources(float16))
    assert {key: store.require(*key).to_json() for key in before} == before


def test_nan_activations_name_the_hook_and_shard():
    stats = activations.ActivationStats()
    acts = torch.ones(4, 3)
    acts[2, 1] = float("nan")
    with pytest.raises(activations.ActivationError, match=r"cached_activations\[shard-0004\]: 1 .*blocks.0.hook_x"):
        stats.update("blocks.0.hook_x", acts, "cached_activations[shard-0004]")


def test_capture_stops_after_the_last_requested_hook(graph):
    _, _, store, _ = graph
    model, _ = load_language_model(store)
    tokens = torch.zeros((2, 8), dtype=torch.int64)
    unembed_calls = []
    handle = model.unembed.register_forward_hook(lambda *args: unembed_calls.append(1))
    try:
        captured = activations.capture_hooks(model, tokens, HOOKS)
        assert not unembed_calls, "caching ran the unembedding it does not need"
        model(tokens)
        assert unembed_calls, "the probe would not notice an unembedding call"
    finally:
        handle.remove()
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=HOOKS)
    for hook in HOOKS:
        assert torch.equal(captured[hook], cache[hook])


# ---- the shuffle plan, on three cached shards ------------------------------------------------------

SHARDS3 = ["shard-0000", "shard-0001", "shard-0002"]
BUCKETS3 = ["bucket-0000", "bucket-0001", "bucket-0002"]
NAN_BF16, FLIPPED_SIGN = 0x7FC0, 0x8000


def run(instance, config_path, asset: str, partition: str | None = None) -> None:
    """One run of asset[partition] on the config's graph, its checks left out (as `make demo`)."""
    definitions = [*graph_assets(load_config(config_path)), *ALL_CHECKS]
    dg.materialize(definitions, selection=dg.AssetSelection.assets(asset) - dg.AssetSelection.checks(*ALL_CHECKS),
                   partition_key=partition, instance=instance, resources=build_resources(config_path),
                   run_config=QUIET)


@pytest.fixture(scope="module")
def three_cached_shards(tmp_path_factory):
    """A Dagster home and artifact root with three cached shards (the real model's activations),
    and nothing of the shuffle; each test works on its own copy of both."""
    directory = tmp_path_factory.mktemp("three-shards")
    config_path = config_file(directory, {"root": str(directory / "artifacts")},
                              corpus={"num_shards": 3, "training_shards": 2})
    (directory / "home").mkdir()
    (directory / "home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with dg.DagsterInstance.local_temp(tempdir=str(directory / "home")) as instance:
        sync_partitions(instance, load_config(config_path))
        for asset, partitions in [("corpus_shards", SHARDS3), ("tokenizer", [None]), ("token_shards", SHARDS3),
                                  ("language_model", [None]), ("cached_activations", SHARDS3)]:
            for partition in partitions:
                run(instance, config_path, asset, partition)
    return directory


@pytest.fixture
def shuffle_home(three_cached_shards, tmp_path):
    """(instance, config of `training_shards` first shards, store) on a copy of three_cached_shards."""
    for part in ("home", "artifacts"):
        shutil.copytree(three_cached_shards / part, tmp_path / part)
    configs = {n: config_file(tmp_path, {"root": str(tmp_path / "artifacts")},
                              corpus={"num_shards": 3, "training_shards": n}) for n in (2, 3)}
    with dg.DagsterInstance.local_temp(tempdir=str(tmp_path / "home")) as instance:
        yield instance, configs, build_resources(configs[2])["storage"].store()


def with_bits(table: pa.Table, column: str, row: int, change) -> pa.Table:
    """`table` with the first bfloat16 value of `column` at `row` replaced by change(bits)."""
    width = table.schema.field(column).type.list_size
    bits = table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False).copy()
    bits[row * width] = change(int(bits[row * width]))
    array = pa.FixedSizeListArray.from_arrays(pa.array(bits), width)
    return table.set_column(table.schema.get_field_index(column), table.schema.field(column), array)


def rewrite_cached(instance, store, config_path, shard: str, change) -> None:
    """Rewrite cached_activations[shard] as change(its table) through the asset's own writer (a
    consistent manifest: same code version, config hash, upstream and format) and record the
    materialization in Dagster with the new data version, as the asset would."""
    old = store.require("cached_activations", shard)
    table = change(open_ipc_table(store.fetch(old, ACTIVATIONS_FILE)))
    with CACHED_ACTIVATIONS.writer(store, load_config(config_path), shard, upstream=old.upstream) as out:
        write_ipc_file(out.path(ACTIVATIONS_FILE), table.schema, table.to_batches(max_chunksize=64))
        out.describe_table(ACTIVATIONS_FILE, rows=table.num_rows, schema=str(table.schema))
        out.extra.update(old.extra)
    event = dg.AssetMaterialization("cached_activations", partition=shard,
                                    tags={"dagster/data_version": out.manifest.data_version})

    @dg.op
    def report(context: dg.OpExecutionContext):
        context.log_event(event)

    @dg.job
    def report_cached_activations():
        report()

    report_cached_activations.execute_in_process(instance=instance)


def read_plan(store) -> tuple:
    manifest = store.require("shuffle_plan", None)
    return manifest, ShufflePlan.from_json(store.read_bytes(manifest, PLAN_FILE), where="shuffle_plan")


def dagster_version(instance, asset: str) -> str:
    [record] = instance.fetch_materializations(dg.AssetKey(asset), limit=1).records
    return record.asset_materialization.tags["dagster/data_version"]


def stale(instance, config_path) -> dict[str, str]:
    """'asset[partition]' -> Dagster's stale status, for every shuffle cell materialized."""
    assets = graph_assets(load_config(config_path))
    graph = dg.Definitions(assets=assets, resources=build_resources(config_path)).resolve_asset_graph()
    resolver = CachingStaleStatusResolver(instance, graph, LoadingContextForTest(instance))
    cells = [("shuffle_plan", None)] + [("shuffle_scatter", s) for s in SHARDS3] + [("shuffled_shards", b)
                                                                                     for b in BUCKETS3]
    return {(a if p is None else f"{a}[{p}]"): resolver.get_status(dg.AssetKey(a), p).value for a, p in cells
            if instance.get_latest_materialization_event(dg.AssetKey(a)) is not None
            and (p is None or instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey(a), asset_partitions=[p]), limit=1).records)}


def check_outcome(instance, config_path) -> dict:
    """The metadata of a shuffle_is_permutation evaluation, with its outcome under 'passed'."""
    outcome = dg.materialize([*graph_assets(load_config(config_path)), *ALL_CHECKS], instance=instance,
                             selection=dg.AssetSelection.checks(*ALL_CHECKS), resources=build_resources(config_path),
                             run_config=QUIET)
    [evaluation] = outcome.get_asset_check_evaluations()
    return {**evaluation.metadata, "passed": evaluation.passed}


def test_a_gather_refuses_pieces_cut_by_an_older_plan(shuffle_home):
    """The issue's mixture through the assets: job 0 cut by the 2-shard table, jobs 1 and 2 by the
    3-shard one. Without the plan the buckets were gathered at sizes that miss their capacities."""
    instance, configs, store = shuffle_home
    run(instance, configs[2], "shuffle_plan")
    old_plan = store.require("shuffle_plan", None).content_version
    for shard in SHARDS3[:2]:
        run(instance, configs[2], "shuffle_scatter", shard)
    for bucket in BUCKETS3:
        run(instance, configs[2], "shuffled_shards", bucket)
    gathered = {b: store.require("shuffled_shards", b).to_json() for b in BUCKETS3}

    # The training set grows to three shards: the 2-shard plan is refused until drawn again ...
    with pytest.raises(Exception, match=rf"shuffle_scatter\[shard-0001\]: shuffle_plan version {old_plan} was drawn "
                                        r"for 2 shards .* now 3"):
        run(instance, configs[3], "shuffle_scatter", "shard-0001")
    run(instance, configs[3], "shuffle_plan")
    manifest, plan = read_plan(store)
    assert plan.shards == tuple(SHARDS3) and manifest.content_version != old_plan
    for shard in SHARDS3[1:]:  # ... and only shards 1 and 2 are scattered by the new one
        run(instance, configs[3], "shuffle_scatter", shard)
    scatters = [store.require("shuffle_scatter", s) for s in SHARDS3]
    sizes = [sum(m.files[bucket_file(k)].rows for m in scatters) for k in range(3)]
    assert sizes != plan.capacities.tolist(), "the mixture would fill the buckets to other sizes"
    with pytest.raises(Exception, match=rf"shuffled_shards\[bucket-0000\]: refusing to gather pieces that do not "
                                        rf"all follow the current shuffle_plan version {manifest.content_version} "
                                        rf"\(digest {plan.digest}\): shuffle_scatter\[shard-0000\] was cut by "
                                        rf"shuffle_plan version {old_plan}; rematerialize") as refused:
        run(instance, configs[3], "shuffled_shards", "bucket-0000")
    assert "shuffle_scatter[shard-0001]" not in str(refused.value) and "[shard-0002]" not in str(refused.value)
    assert {b: store.require("shuffled_shards", b).to_json() for b in BUCKETS3} == gathered, "a refusal wrote"
    off_plan = check_outcome(instance, configs[3])  # every bucket was gathered by the old plan
    assert not off_plan["passed"] and off_plan["buckets_off_plan"].value == BUCKETS3

    run(instance, configs[3], "shuffle_scatter", "shard-0000")  # the stale piece, cut again
    for bucket in BUCKETS3:
        run(instance, configs[3], "shuffled_shards", bucket)
    assert [store.require("shuffled_shards", b).total_rows for b in BUCKETS3] == plan.capacities.tolist()
    on_plan = check_outcome(instance, configs[3])
    assert on_plan["passed"] and on_plan["permutation"].value == "verified"
    [record] = instance.fetch_materializations(dg.AssetKey("shuffled_shards"), limit=1).records
    assert record.asset_materialization.metadata["passes"].value >= 2  # the depth gather_bucket used


def test_the_plan_is_stable_and_only_a_new_table_makes_the_scatter_stale(shuffle_home):
    instance, configs, store = shuffle_home
    run(instance, configs[2], "shuffle_plan")
    first, plan = read_plan(store)
    cached = [store.require("cached_activations", s) for s in SHARDS3[:2]]
    assert plan.shards == tuple(SHARDS3[:2]) and list(plan.rows) == [m.total_rows for m in cached]
    assert first.upstream == {f"cached_activations[{m.partition}]": m.data_version for m in cached}
    assert first.extra["digest"] == plan.digest and plan.table.sum() == sum(m.total_rows for m in cached)
    run(instance, configs[2], "shuffle_plan")
    assert store.require("shuffle_plan", None).to_json() == first.to_json()  # byte-identical rerun
    assert dagster_version(instance, "shuffle_plan") == first.content_version
    for shard in SHARDS3[:2]:
        run(instance, configs[2], "shuffle_scatter", shard)
    for bucket in BUCKETS3:
        run(instance, configs[2], "shuffled_shards", bucket)
    assert set(stale(instance, configs[2]).values()) == {"FRESH"}

    # Shard 1 re-cached with other bytes, as many rows: the same table. Its scatter must rerun
    # (after the plan has recorded the new version); nothing else changes.
    rewrite_cached(instance, store, configs[2], "shard-0001", lambda t: with_bits(t, HOOKS[0], 0, FLIPPED_SIGN.__xor__))
    now = store.require("cached_activations", "shard-0001")
    with pytest.raises(Exception, match=rf"shuffle_scatter\[shard-0001\]: shuffle_plan version {first.content_version}"
                                        rf" was drawn from cached_activations\[shard-0001\] version "
                                        rf"{cached[1].data_version} with {now.total_rows} rows; "
                                        rf"cached_activations\[shard-0001\] is now version {now.data_version} with "
                                        rf"{now.total_rows} rows; rematerialize shuffle_plan"):
        run(instance, configs[2], "shuffle_scatter", "shard-0001")
    run(instance, configs[2], "shuffle_plan")
    second = store.require("shuffle_plan", None)
    assert second.to_json() != first.to_json() and second.content_version == first.content_version
    assert dagster_version(instance, "shuffle_plan") == first.content_version
    statuses = stale(instance, configs[2])
    assert statuses.pop("shuffle_scatter[shard-0001]") == "STALE" and set(statuses.values()) == {"FRESH"}
    run(instance, configs[2], "shuffle_scatter", "shard-0001")

    # A changed row count is a new table: every scatter cell turns stale, through the plan.
    rewrite_cached(instance, store, configs[2], "shard-0000", lambda t: t.slice(0, t.num_rows - 16))
    assert stale(instance, configs[2])["shuffle_plan"] == "STALE"
    run(instance, configs[2], "shuffle_plan")
    assert store.require("shuffle_plan", None).content_version != first.content_version
    statuses = stale(instance, configs[2])
    assert statuses["shuffle_plan"] == "FRESH"
    assert {statuses[f"shuffle_scatter[{s}]"] for s in SHARDS3[:2]} == {statuses[f"shuffled_shards[{b}]"]
                                                                        for b in BUCKETS3} == {"STALE"}


def test_a_nan_row_is_refused_by_the_scatter_and_its_previous_output_stays(shuffle_home):
    instance, configs, store = shuffle_home
    run(instance, configs[2], "shuffle_plan")
    run(instance, configs[2], "shuffle_scatter", "shard-0001")
    before = store.require("shuffle_scatter", "shard-0001")
    table = open_ipc_table(store.fetch(store.require("cached_activations", "shard-0001"), ACTIVATIONS_FILE))
    token_index = table.column(schemas.TOKEN_INDEX)[100].as_py()
    rewrite_cached(instance, store, configs[2], "shard-0001", lambda t: with_bits(t, HOOKS[1], 100, lambda _: NAN_BF16))
    run(instance, configs[2], "shuffle_plan")  # the same row counts: the same table, drawn from the new version
    with pytest.raises(Exception, match=rf"shuffle_scatter\[shard-0001\] reading cached_activations\[shard-0001\]: "
                                        rf"1 row\(s\) of a batch hold NaN or inf in {HOOKS[1]}, the first at "
                                        rf"token_index {token_index}; refusing"):
        run(instance, configs[2], "shuffle_scatter", "shard-0001")
    assert store.require("shuffle_scatter", "shard-0001").to_json() == before.to_json()
    for name in before.files:
        store.fetch(before, name)  # still listed, present and matching its checksum


@pytest.mark.s3
def test_graph_on_s3(s3_server, tmp_path, monkeypatch):
    # Credentials reach boto3 through its default chain, as in production.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_access_key)
    storage = {"backend": "s3", "endpoint_url": s3_server.endpoint_url, "bucket": s3_server.bucket,
               "prefix": f"graph-{uuid.uuid4().hex[:8]}", "cache_dir": str(tmp_path / "cache")}
    config_path = config_file(tmp_path, storage)
    instance = dg.DagsterInstance.ephemeral()
    materialize_all(instance, config_path, log=lambda *_: None)
    store = build_resources(config_path)["storage"].store()
    assert store.describe().startswith(f"s3://{s3_server.bucket}/graph-")
    assert sorted(store.partitions("shuffled_shards")) == ["bucket-0000", "bucket-0001", "bucket-0002"]
    rows = sum(store.require("shuffled_shards", k).total_rows for k in bucket_keys(instance))
    assert rows == sum(store.require("cached_activations", k).total_rows for k in shard_keys(instance))
