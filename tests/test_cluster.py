"""Several processes as a cluster runs them: Postgres, a code server, the webserver, the daemon, S3.

The fixture starts PostgreSQL (Dagster's run, event-log and schedule storage), a SeaweedFS S3
server (the only artifact storage) and the three Dagster processes of tests/cluster.py. The run
config stores artifacts in S3 and gives every run a download cache of its own
(`storage.cache_dir: .../{run_id}`), as if each run had a node to itself. One partition backfill
of corpus_shards -> tokenizer -> token_shards over three shards, launched through GraphQL and
run by the daemon through the run queue, must complete with several runs at once; every run's
materializations must be in Postgres (read with psycopg2 and through the webserver); each run
must have read every input it used from S3 into its own cache; the bucket must hold a manifest
for every partition, and no local artifact root, SQLite file or step log may exist.
"""

from __future__ import annotations

import json
import time
import uuid

import dagster as dg
import pytest
from cluster import PgServer, peak_concurrency, postgres_server, require_postgres, run_times, running_cluster
from dev_server import log, write_corpus
from support import TINY, write_run_config

from resources import ArtifactStorage
from resources.s3 import S3Backend
from resources.storage import ArtifactStore

SHARDS = [f"shard-{i:04d}" for i in range(3)]
MAX_CONCURRENT_RUNS = 3
ASSETS = ["corpus_shards", "tokenizer", "token_shards"]


def test_cache_dir_is_per_run(tmp_path):
    """`{run_id}` in storage.cache_dir becomes each run's id; outside a run, `no-run`."""

    @dg.asset
    def cache_probe(storage: ArtifactStorage) -> str:
        return str(storage.resolved_cache_dir())

    storage = ArtifactStorage(root=str(tmp_path / "artifacts"), cache_dir=str(tmp_path / "cache" / "{run_id}"))
    runs = [dg.materialize([cache_probe], resources={"storage": storage}) for _ in range(2)]
    assert [r.output_for_node("cache_probe") for r in runs] == [str(tmp_path / "cache" / r.run_id) for r in runs]
    assert runs[0].run_id != runs[1].run_id
    assert storage.resolved_cache_dir() == tmp_path / "cache" / "no-run"
    assert ArtifactStorage(cache_dir="/c").resolved_cache_dir().as_posix() == "/c"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    """(Cluster, PgServer, run-config facts) for a tiny config with S3 storage."""
    bin_dir = require_postgres()
    directory = tmp_path_factory.mktemp("cluster")
    prefix = f"cluster-{uuid.uuid4().hex[:8]}"
    storage = {"backend": "s3", "endpoint_url": s3_server.endpoint_url, "bucket": s3_server.bucket,
               "prefix": prefix, "region": s3_server.region, "root": str(directory / "artifacts"),
               "cache_dir": str(directory / "run-cache" / "{run_id}")}
    # The text is read-only input that every node can read (a mounted volume in a cluster); what
    # runs write and read from each other goes through S3.
    documents = write_corpus(directory / "corpus")
    config_path = write_run_config(
        directory, TINY, storage, corpus={"source": "local", "paths": [str(p) for p in documents],
                                          "num_shards": len(SHARDS), "max_documents": 0, "min_document_chars": 10})
    # The code server alone gets the run config and the S3 credentials (boto3's default chain).
    code_env = {"SAE_ASSETS_CONFIG": config_path, "AWS_ACCESS_KEY_ID": s3_server.access_key_id,
                "AWS_SECRET_ACCESS_KEY": s3_server.secret_access_key}
    with postgres_server(bin_dir) as pg, running_cluster(directory, pg, code_env,
                                                         max_concurrent_runs=MAX_CONCURRENT_RUNS) as cluster:
        log(f"cluster ready: webserver {cluster.url}, postgres port {pg.port}")
        yield cluster, pg, {"directory": directory, "prefix": prefix, "s3": s3_server}


def s3_store(facts: dict) -> ArtifactStore:
    s3 = facts["s3"]
    return ArtifactStore(S3Backend(**s3.backend_kwargs(prefix=facts["prefix"],
                                                       cache_dir=facts["directory"] / "checker-cache")))


def materializations_in_postgres(pg: PgServer) -> dict[tuple[str, str | None], list[str]]:
    """{(asset, partition): run ids} straight from Dagster's event_logs table."""
    rows = pg.query("SELECT asset_key, partition, run_id FROM event_logs "
                    "WHERE dagster_event_type = 'ASSET_MATERIALIZATION' ORDER BY id")
    out: dict[tuple[str, str | None], list[str]] = {}
    for asset_key, partition, run_id in rows:
        out.setdefault((json.loads(asset_key)[-1], partition), []).append(run_id)
    return out


def materializations_in_webserver(cluster) -> dict[tuple[str, str | None], list[str]]:
    nodes = cluster.gql("""query($keys: [AssetKeyInput!]) { assetNodes(assetKeys: $keys) {
        assetKey { path } assetMaterializations { partition runId timestamp } } }""",
                        {"keys": [{"path": [a]} for a in ASSETS]})["assetNodes"]
    out: dict[tuple[str, str | None], list[tuple[int, str]]] = {}
    for node in nodes:
        for event in node["assetMaterializations"]:
            out.setdefault((node["assetKey"]["path"][-1], event["partition"]), []).append(
                (int(event["timestamp"]), event["runId"]))
    return {k: [run for _, run in sorted(v)] for k, v in out.items()}


@pytest.mark.slow
def test_backfill_on_postgres_queue_and_s3(cluster):
    cluster, pg, facts = cluster
    directory = facts["directory"]
    for key in SHARDS:
        cluster.add_partition("shards", key)

    # One backfill across a change of partitioning: every corpus shard, then the tokenizer
    # (trained on all of them), then every token shard; the daemon advances it pass by pass.
    launched = time.time()
    backfill_id = cluster.launch_backfill(ASSETS, SHARDS, "cluster")
    done = cluster.wait_backfill(backfill_id)
    log(f"backfill {backfill_id} completed: {len(done['runs'])} runs in {time.time() - launched:.0f} s")

    # Runs, from Postgres: one per shard for each partitioned asset, one for the tokenizer.
    runs = pg.query("SELECT r.run_id, r.status, t.value FROM runs r "
                    "LEFT JOIN run_tags t ON t.run_id = r.run_id AND t.key = 'dagster/partition' "
                    "WHERE r.run_id IN (SELECT run_id FROM run_tags WHERE key = 'dagster/backfill' AND value = %s)",
                    (backfill_id,))
    assert {r[0] for r in runs} == {r["runId"] for r in done["runs"]}, "the webserver reads the same runs"
    assert len(runs) == 2 * len(SHARDS) + 1 and {r[1] for r in runs} == {"SUCCESS"}
    by_run = {run_id: partition for run_id, _, partition in runs}

    # Every run's materializations are recorded in Postgres, and the webserver shows the same.
    recorded = materializations_in_postgres(pg)
    assert recorded == materializations_in_webserver(cluster)
    expected = {(a, p): 1 for a in ("corpus_shards", "token_shards") for p in SHARDS} | {("tokenizer", None): 1}
    assert {k: len(v) for k, v in recorded.items()} == expected, "each partition materialized exactly once"
    for (asset, partition), [run_id] in recorded.items():
        assert by_run[run_id] == partition, f"{asset}[{partition}] was materialized by run {run_id}"
    tokenizer_run = recorded[("tokenizer", None)][0]
    corpus_runs = {p: recorded[("corpus_shards", p)][0] for p in SHARDS}
    token_runs = {p: recorded[("token_shards", p)][0] for p in SHARDS}
    assert len({tokenizer_run, *corpus_runs.values(), *token_runs.values()}) == len(runs)

    # Several runs at once, never more than the queue allows: a run holds its slot from its
    # launch (the code server starts its process) to its end.
    times = run_times(pg, list(by_run))
    peak = peak_concurrency([(t.launched, t.ended) for t in times.values()])
    log(f"peak concurrent runs: {peak}; runs (partition: launched, started, ended, s after the backfill): " + "; ".join(
        f"{by_run[r] or 'tokenizer'}: {t.launched - launched:.0f}, {t.started - launched:.0f}, {t.ended - launched:.0f}"
        for r, t in sorted(times.items(), key=lambda item: item[1].launched)))
    assert 2 <= peak <= MAX_CONCURRENT_RUNS, f"peak of {peak} concurrent runs"

    # S3 holds a complete output: a manifest for every partition, each file listed in it present,
    # and its hash is the data version Dagster recorded.
    store = s3_store(facts)
    assert sorted(store.partitions("corpus_shards")) == sorted(store.partitions("token_shards")) == SHARDS
    assert store.partitions("tokenizer") == [None]
    manifests = {(a, p): store.require(a, p) for (a, p) in recorded}
    stored = set(store.backend.list_keys(""))
    for manifest in manifests.values():
        assert {entry.key for entry in manifest.files.values()} <= stored
    versions = cluster.gql("""query($keys: [AssetKeyInput!], $parts: [String!]) { assetNodes(assetKeys: $keys) {
        assetKey { path } dataVersionByPartition(partitions: $parts) } }""",
                           {"keys": [{"path": ["corpus_shards"]}, {"path": ["token_shards"]}], "parts": SHARDS})
    for node in versions["assetNodes"]:
        asset = node["assetKey"]["path"][-1]
        assert node["dataVersionByPartition"] == [manifests[(asset, p)].data_version for p in SHARDS]

    # S3 is the only data plane: every run downloaded what it read into a cache of its own.
    caches = directory / "run-cache"
    assert sorted(p.name for p in caches.iterdir()) == sorted(by_run), "one cache per run, none outside a run"

    def downloaded(run_id: str) -> set[str]:
        return {p.name for p in (caches / run_id).glob("??/*") if p.is_file()}

    def sha(asset: str, partition: str | None, name: str) -> str:
        return manifests[(asset, partition)].files[name].sha256

    for partition, run_id in corpus_runs.items():
        assert downloaded(run_id) == set(), f"corpus_shards[{partition}] reads no artifact"
    assert downloaded(tokenizer_run) == {sha("corpus_shards", p, "documents.parquet") for p in SHARDS}
    for partition, run_id in token_runs.items():
        assert downloaded(run_id) == {sha("corpus_shards", partition, "documents.parquet"),
                                      sha("tokenizer", None, "tokenizer.json")}
    for run_id in by_run:  # staged outputs are removed once uploaded
        assert not any((caches / run_id / ".staging").iterdir())
    assert not (directory / "artifacts").exists(), "backend s3 writes no local artifact root"
    assert not any(cluster.workdir.iterdir()), "runs wrote nothing into their working directory"

    # Dagster's own state is in Postgres alone: DAGSTER_HOME holds dagster.yaml and nothing else
    # (no SQLite storage, no step logs), and the daemon's heartbeats reach the webserver through it.
    assert [p.name for p in (directory / "dagster_home").rglob("*") if not p.is_dir()] == ["dagster.yaml"]
    heartbeats = {name for (name,) in pg.query("SELECT daemon_type FROM daemon_heartbeats")}
    assert {"BACKFILL", "QUEUED_RUN_COORDINATOR"} <= heartbeats
