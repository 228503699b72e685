"""Fault tests at the asset level: kills, a restarting S3 server, corruption, concurrent runs.

Each test runs real Dagster materializations (tests/faults.py runs them in subprocesses with
fault points wrapped in) on a tiny graph, against a store that holds the upstream partitions of
an undisturbed reference run, and asserts the storage protocol's promises: a run SIGKILLed
mid-write or mid-commit leaves every partition as it was (the killed one absent or at its
previous version, never half), the rerun's manifest and data bytes equal the undisturbed
run's, SAE training resumes from its checkpoint to bit-identical weights, S3 requests ride out
a server restart, a corrupted input is refused by its checksum without touching the output,
and two runs of one partition at once leave one complete, verifiable version.

Manifests hold no timestamps or run ids (resources/manifest.py), so "byte-identical" covers
the manifest itself as well as every data file it lists.
"""

from __future__ import annotations

import signal
import time
import traceback
import uuid
from pathlib import Path

import dagster as dg
import pytest
import torch
from faults import FaultyRun, copy_assets, copy_partition, materialize, partition_keys_stored, snapshot
from support import TINY, overlay, write_run_config

from resources import keys
from resources.manifest import CorruptArtifactError, Manifest
from resources.s3 import S3Backend
from resources.storage import ArtifactStore, LocalBackend
from sae_assets.core.sae import io as sae_io

POINT = "relu-w64-l1_0.3"
CONFIG = overlay(
    TINY,
    model={"train_tokens": 4000},
    attribution={"capture": False},
    activations={"dtype": "float16"},
    # Small blocks and a budget below one bucket: many scatter pieces, and a spilling second pass.
    shuffle={"memory_budget_mb": 0.05, "block_rows": 256},
    sae={"sweep": [{"architecture": "relu", "width": 64, "sparsity": 0.3}]},
)
"""support.TINY with a shorter training run and no capture, half-precision activations, a
spilling shuffle and one SAE (POINT), checkpointed every 25 steps."""
GRAPH = [("corpus_shards", ["shard-0000", "shard-0001"]), ("tokenizer", [None]),
         ("token_shards", ["shard-0000", "shard-0001"]), ("language_model", [None]),
         ("cached_activations", ["shard-0000", "shard-0001"]), ("shuffle_plan", [None]),
         ("shuffle_scatter", ["shard-0000", "shard-0001"]), ("shuffled_shards", ["bucket-0000", "bucket-0001"]),
         ("sae_dictionary", [POINT])]
ASSETS = [asset for asset, _ in GRAPH]


def upstream_of(asset: str) -> list[str]:
    return ASSETS[:ASSETS.index(asset)]


def local_config(directory: Path, root: Path, **sections) -> str:
    return write_run_config(directory, CONFIG, {"root": str(root)}, **sections)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The undisturbed run: every asset of GRAPH materialized in order, in this process."""
    directory = tmp_path_factory.mktemp("reference")
    config_path = local_config(directory, directory / "artifacts")
    instance = dg.DagsterInstance.ephemeral()
    for asset, partitions in GRAPH:
        for partition in partitions:
            materialize(config_path, instance, asset, partition)
    return LocalBackend(directory / "artifacts")


def everything(backend, *, leave_out: tuple[str, str | None] | None = None) -> dict:
    """Snapshots of every partition of GRAPH a backend holds, but one."""
    return {(a, p): snapshot(backend, a, p) for a, parts in GRAPH for p in parts if (a, p) != leave_out}


def assert_readable(store: ArtifactStore, asset: str, partition: str | None) -> None:
    manifest = store.require(asset, partition)
    for name in manifest.files:
        store.fetch(manifest, name)  # verifies size and sha256


def assert_identical(backend, reference_backend, asset: str, partition: str | None) -> None:
    """The partition's manifest and files equal the reference run's, byte for byte, and
    nothing else is stored under it but the superseded versions that its history lists (kept
    for resources/gc.py: no commit deletes), complete; no stray version."""
    got, want = snapshot(backend, asset, partition), snapshot(reference_backend, asset, partition)
    assert got is not None, f"{asset}[{partition}] has no manifest"
    assert got.keys() == want.keys(), "stored under other keys than the undisturbed run"
    for key in want:
        assert got[key] == want[key], f"{key} differs from the undisturbed run's"
    stored = partition_keys_stored(backend, asset, partition)
    history = keys.history_prefix(asset, partition)
    superseded = set()
    for key in stored:
        if key.startswith(history) and key not in want:
            older = Manifest.from_json(backend.get_bytes(key), where=key)
            superseded |= {key, *(entry.key for entry in older.files.values())}
    assert stored == sorted(set(want) | superseded)


def staged_files(root: Path, asset: str) -> list[Path]:
    """Non-empty files in the staging directories of `asset` (named `<asset>@<host>@<pid>@...`)."""
    return [p for p in (root / ".staging").glob(f"{asset}@*/*") if p.is_file() and p.stat().st_size > 0]


# ---- kill -9 mid-write and mid-commit -------------------------------------------------------------

KILLS = [
    # asset, partition, where the run is killed, what the partition held before it
    pytest.param("cached_activations", "shard-0000", ("cache_batch", 3), "older",
                 id="cache-mid-write-over-older-version"),
    pytest.param("cached_activations", "shard-0001", ("put_manifest", 1), None,
                 id="cache-data-stored-manifest-not"),
    pytest.param("shuffle_scatter", "shard-0001", ("scatter_piece", 5), None, id="scatter-mid-write"),
    pytest.param("shuffle_scatter", "shard-0000", ("put_file", 2), "same",
                 id="scatter-mid-commit-over-same-version"),
    pytest.param("shuffled_shards", "bucket-0001", ("gather_batch", 1), "same", id="gather-mid-write"),
]


@pytest.mark.slow
@pytest.mark.parametrize("asset, partition, fault, previous", KILLS)
def test_kill_mid_write_loses_nothing_and_rerun_is_identical(reference, tmp_path, asset, partition, fault,
                                                              previous):
    root = tmp_path / "artifacts"
    config_path = local_config(tmp_path, root)
    backend = LocalBackend(root)
    store = ArtifactStore(backend)
    copy_assets(reference, backend, upstream_of(asset))
    siblings = [p for a, parts in GRAPH if a == asset for p in parts if p != partition]
    for sibling in siblings:  # already materialized partitions of the same asset
        copy_partition(reference, backend, asset, sibling)
    if previous == "same":
        copy_partition(reference, backend, asset, partition)
    elif previous == "older":  # a version made with another dtype, so the rerun replaces real content
        older = local_config(tmp_path, root, activations={"dtype": "float32"})
        materialize(older, dg.DagsterInstance.ephemeral(), asset, partition)
    before = everything(backend)
    held = snapshot(backend, asset, partition)
    listed = sorted(map(str, store.partitions(asset)))
    assert (held is None) == (previous is None)
    if previous == "older":
        assert held != snapshot(reference, asset, partition), "the older version should differ from the rerun's"

    point, nth = fault
    run = FaultyRun.start(config_path, asset, partition, home=tmp_path / "home", fault_dir=tmp_path / "faults",
                          faults=[{"at": point, "nth": nth}], tag="killed")
    run.wait_for(point, nth)
    mid_write = point in ("cache_batch", "scatter_piece", "gather_batch")
    if mid_write:
        assert staged_files(root, asset), "the kill should land while the output is being written"
    if point == "put_manifest":
        new = set(partition_keys_stored(backend, asset, partition)) - set(held or {})
        assert new, "the kill should land after data files were stored, before the manifest"
    assert run.kill() == -signal.SIGKILL

    # Nothing lost: every partition as before, the killed one absent or at its previous version.
    assert everything(backend) == before
    assert sorted(map(str, store.partitions(asset))) == listed
    if held is None:
        assert store.manifest(asset, partition) is None
    else:
        assert_readable(store, asset, partition)
    for sibling in siblings:
        assert_readable(store, asset, sibling)

    # The rerun is a plain run in this process (another process than the killed one, as after a crash).
    if mid_write:
        assert staged_files(root, asset), "the killed run's partial files stay until a writer reclaims them"
    materialize(config_path, dg.DagsterInstance.ephemeral(), asset, partition)
    assert not staged_files(root, asset), "the rerun's writer reclaimed the dead run's staging"
    assert_identical(backend, reference, asset, partition)
    assert everything(backend, leave_out=(asset, partition)) == {
        k: v for k, v in before.items() if k != (asset, partition)}


@pytest.mark.slow
def test_killed_sae_training_resumes_from_its_checkpoint_bit_identically(reference, tmp_path):
    root = tmp_path / "artifacts"
    config_path = local_config(tmp_path, root)
    backend = LocalBackend(root)
    store = ArtifactStore(backend)
    copy_assets(reference, backend, upstream_of("sae_dictionary"))
    before = everything(backend)

    run = FaultyRun.start(config_path, "sae_dictionary", POINT, home=tmp_path / "home",
                          fault_dir=tmp_path / "faults", faults=[{"at": "checkpoint", "nth": 1}], tag="killed")
    run.wait_for("checkpoint", 1)
    checkpoints = list((root / ".checkpoints").glob(f"sae_dictionary/{POINT}/*/checkpoint.pt"))
    assert len(checkpoints) == 1
    assert run.kill() == -signal.SIGKILL
    assert run.trace() == {"train_start_step": [0], "checkpoint_step": [25]}
    assert store.manifest("sae_dictionary", POINT) is None and store.partitions("sae_dictionary") == []
    assert everything(backend) == before
    assert checkpoints[0].exists()

    rerun = FaultyRun.start(config_path, "sae_dictionary", POINT, home=tmp_path / "home",
                            fault_dir=tmp_path / "faults", tag="rerun")
    assert rerun.finish() == 0, rerun.output()
    trace = rerun.trace()
    assert trace["train_start_step"] == [25], "the rerun should continue from the checkpoint, not restart"
    assert trace["checkpoint_step"] == [50, 75, 100]
    assert_identical(backend, reference, "sae_dictionary", POINT)
    resumed = sae_io.load_sae(store.fetch(store.require("sae_dictionary", POINT), sae_io.CFG_FILE).parent)
    undisturbed = sae_io.load_sae(reference.root / ArtifactStore(reference).require("sae_dictionary", POINT)
                                  .files[sae_io.CFG_FILE].key.rsplit("/", 1)[0])
    for name, value in undisturbed.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert not checkpoints[0].parent.exists(), "a finished run's checkpoints are dropped"


# ---- the S3 server restarted mid-run ---------------------------------------------------------------


def s3_config(directory: Path, server, prefix: str, cache: Path) -> str:
    storage = {"backend": "s3", "endpoint_url": server.endpoint_url, "bucket": server.bucket, "prefix": prefix,
               "cache_dir": str(cache)}
    return write_run_config(directory, CONFIG, storage)


def s3_env(server) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": server.access_key_id, "AWS_SECRET_ACCESS_KEY": server.secret_access_key}


def restart_while_waiting(weed, run: FaultyRun, point: str, nth: int, down_s: float = 1.0) -> None:
    """Kill the server while the run is paused at `point`, let the run go on into the dead
    endpoint, and start the server again (same ports, same data) after `down_s`."""
    run.wait_for(point, nth)
    weed.kill()
    run.release(point, nth)
    time.sleep(down_s)
    assert run.proc.poll() is None, f"the run gave up while the server was down:\n{run.output()}"
    weed.start()


@pytest.mark.s3
@pytest.mark.slow
def test_s3_restart_mid_run_is_ridden_out_by_retries(reference, private_weed, tmp_path):
    server = private_weed.info
    prefix = "restart"
    backend = S3Backend(**server.backend_kwargs(prefix=prefix, cache_dir=tmp_path / "test-cache"))
    copy_assets(reference, backend, upstream_of("shuffle_scatter"))
    config_path = s3_config(tmp_path, server, prefix, tmp_path / "run-cache")

    run = FaultyRun.start(config_path, "shuffle_scatter", "shard-0000", home=tmp_path / "home",
                          fault_dir=tmp_path / "faults", env=s3_env(server),
                          faults=[{"at": "download", "nth": 1}, {"at": "put_file", "nth": 2}])
    restart_while_waiting(private_weed, run, "download", 1)  # reading the activation shard
    restart_while_waiting(private_weed, run, "put_file", 2)  # uploading the second bucket file
    assert run.finish() == 0, run.output()
    assert_identical(backend, reference, "shuffle_scatter", "shard-0000")
    assert_readable(ArtifactStore(backend), "shuffle_scatter", "shard-0000")


# ---- a corrupted artifact is refused --------------------------------------------------------------


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def fresh_store(request, tmp_path, reference, monkeypatch):
    """(config path, backend) of an empty store on either backend."""
    if request.param == "local":
        root = tmp_path / "artifacts"
        return local_config(tmp_path, root), LocalBackend(root)
    server = request.getfixturevalue("s3_server")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key_id)  # boto3's default chain, as in production
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_access_key)
    prefix = f"faults-{uuid.uuid4().hex[:8]}"
    backend = S3Backend(**server.backend_kwargs(prefix=prefix, cache_dir=tmp_path / "test-cache"))
    return s3_config(tmp_path, server, prefix, tmp_path / "run-cache"), backend


def test_corrupted_input_is_refused_and_the_output_is_untouched(reference, fresh_store):
    config_path, backend = fresh_store
    store = ArtifactStore(backend)
    copy_assets(reference, backend, upstream_of("shuffled_shards"))
    manifest = store.require("cached_activations", "shard-0000")
    key = manifest.files["activations.arrow"].key
    damaged = bytearray(backend.get_bytes(key))
    damaged[len(damaged) // 2] ^= 0x10  # same size: only the checksum can tell
    backend.put_bytes(bytes(damaged), key)
    before = everything(backend)

    instance = dg.DagsterInstance.ephemeral()
    with pytest.raises(Exception) as failure:
        materialize(config_path, instance, "shuffle_scatter", "shard-0000")
    message = "".join(traceback.format_exception(failure.value))
    assert "cached_activations[shard-0000] file 'activations.arrow'" in message
    assert "fails its checksum" in message and "CorruptArtifactError" in message
    assert everything(backend) == before, "a refused run must not change any partition"
    with pytest.raises(CorruptArtifactError):
        store.fetch(manifest, "activations.arrow")

    # Rematerializing the damaged partition repairs it in place; the downstream then reruns as
    # if nothing had happened.
    materialize(config_path, instance, "cached_activations", "shard-0000")
    assert_identical(backend, reference, "cached_activations", "shard-0000")
    materialize(config_path, instance, "shuffle_scatter", "shard-0000")
    assert_identical(backend, reference, "shuffle_scatter", "shard-0000")


# ---- two runs of one partition at once --------------------------------------------------------------

CONCURRENT = [
    # Both runs held before their commits and let go together: the uploads and manifest writes race.
    pytest.param("cached_activations", "shard-0000", "local", ("commit", 1), id="cache-local"),
    pytest.param("cached_activations", "shard-0000", "s3", ("commit", 1), id="cache-s3",
                 marks=pytest.mark.s3),
    # Both held after their first checkpoint: they then train on from one shared checkpoint file,
    # and the first to finish drops it while the other still writes to it.
    pytest.param("sae_dictionary", POINT, "local", ("checkpoint", 1), id="sae-local"),
]


@pytest.mark.slow
@pytest.mark.parametrize("asset, partition, kind, barrier", CONCURRENT)
def test_two_runs_of_one_partition_at_once(reference, tmp_path, request, asset, partition, kind, barrier):
    env: dict[str, str] = {}
    if kind == "local":
        root = tmp_path / "artifacts"
        config_path, backend = local_config(tmp_path, root), LocalBackend(root)
    else:
        server = request.getfixturevalue("s3_server")
        prefix = f"concurrent-{uuid.uuid4().hex[:8]}"
        backend = S3Backend(**server.backend_kwargs(prefix=prefix, cache_dir=tmp_path / "test-cache"))
        config_path, env = s3_config(tmp_path, server, prefix, tmp_path / "run-cache"), s3_env(server)
    copy_assets(reference, backend, upstream_of(asset))
    point, nth = barrier
    runs = [FaultyRun.start(config_path, asset, partition, home=tmp_path / "home", fault_dir=tmp_path / "faults",
                            faults=[{"at": point, "nth": nth}], tag=tag, env=env) for tag in ("a", "b")]
    for run in runs:
        run.wait_for(point, nth)
    for run in runs:
        run.release(point, nth)
    codes = [run.finish() for run in runs]
    assert codes == [0, 0], "\n\n".join(run.output() for run in runs)
    assert_identical(backend, reference, asset, partition)
    assert_readable(ArtifactStore(backend), asset, partition)
    if kind == "local":  # not even a hidden temp file of either run is left beside the version
        on_disk = sorted(str(p.relative_to(root)) for p in (root / asset).rglob("*") if p.is_file())
        assert on_disk == sorted(snapshot(backend, asset, partition))
    if asset == "sae_dictionary":
        assert not list((root / ".checkpoints").glob(f"sae_dictionary/{partition}/*/*")), "checkpoints left behind"
        assert all(run.trace()["checkpoint_step"][-1] == 100 for run in runs)


@pytest.mark.slow
def test_a_run_finishing_while_another_writes_a_checkpoint_leaves_it_alone(reference, tmp_path):
    # Run b pauses with its step-50 checkpoint written to a temp file but not yet renamed into
    # place. Run a, started then, resumes from b's step-25 checkpoint, finishes, commits and
    # drops the partition's checkpoints. b must then carry on and commit the same version.
    root = tmp_path / "artifacts"
    config_path, backend = local_config(tmp_path, root), LocalBackend(root)
    copy_assets(reference, backend, upstream_of("sae_dictionary"))
    start = dict(home=tmp_path / "home", fault_dir=tmp_path / "faults")
    b = FaultyRun.start(config_path, "sae_dictionary", POINT, tag="b", **start,
                        faults=[{"at": "checkpoint_replace", "nth": 2}])
    b.wait_for("checkpoint_replace", 2)
    a = FaultyRun.start(config_path, "sae_dictionary", POINT, tag="a", **start)
    assert a.finish() == 0, a.output()
    assert a.trace()["train_start_step"] == [25], "a should resume from b's checkpoint"
    assert_identical(backend, reference, "sae_dictionary", POINT)
    b.release("checkpoint_replace", 2)
    assert b.finish() == 0, b.output()
    assert b.trace()["checkpoint_step"] == [25, 50, 75, 100]
    assert_identical(backend, reference, "sae_dictionary", POINT)
    left = [p.name for p in (root / ".checkpoints").rglob("*") if p.is_file()]
    assert left == [], f"checkpoint files left behind: {left}"
