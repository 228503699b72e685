"""Fault injection for asset-level tests: runs that pause at a named point, to be killed or let go.

Run as a script, this module materializes one partition of one asset through a real Dagster run
(`dg.materialize` on the definitions' assets, a persistent instance under $DAGSTER_HOME, the run
config at the given path):

    python tests/faults.py CONFIG ASSET PARTITION

With $FAULTS set (a JSON list of {"at": <point>, "nth": <n>}), it first wraps the named points
of the code under test in this process only; nothing in production code knows about faults.
When a point is hit for the n-th time, the run writes `<tag>.<point>-<n>.reached` into
$FAULT_DIR and waits until `<tag>.<point>-<n>.go` appears. The test process meanwhile
SIGKILLs the run's whole process group (a crash at an exact, known moment) or creates the
`.go` file (the run goes on, e.g. into a server that has just been killed). Points:

- cache_batch:  after the n-th batch of activations reached the shard's Arrow writer
- scatter_piece, gather_batch: after the n-th piece/batch of the shuffle's two passes
- checkpoint:   after the n-th SAE training checkpoint is in place (and mirrored)
- checkpoint_replace: before the n-th checkpoint's temp file is renamed over checkpoint.pt
- put_file:     before the n-th data file is moved/uploaded to its final key
- put_manifest: before the n-th manifest is written (every data file already stored)
- commit:       before the n-th ArtifactStore.commit (every file staged, nothing stored)
- download:     before the n-th S3 download (S3Backend.local_copy)

The test side (`FaultyRun`, `snapshot`, `copy_assets`) starts such runs, waits for a point,
kills or releases them, and compares what a store holds. Used by tests/test_faults.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


# ---- both sides ---------------------------------------------------------------------------------


def materialize(config_path: str, instance, asset: str, partition: str | None) -> None:
    """One Dagster run of `asset[partition]` (its checks left out), as `make demo` runs it."""
    import dagster as dg

    from sae_assets.core.config import load_config
    from sae_assets.defs.partitions import sync_partitions
    from sae_assets.definitions import ALL_CHECKS, build_resources, graph_assets

    config = load_config(config_path)
    sync_partitions(instance, config)
    dg.materialize([*graph_assets(config), *ALL_CHECKS],
                   selection=dg.AssetSelection.assets(asset) - dg.AssetSelection.checks(*ALL_CHECKS),
                   partition_key=partition, instance=instance, resources=build_resources(config_path),
                   run_config=QUIET)


# ---- the run's side -----------------------------------------------------------------------------


class _Points:
    """Counts hits of each fault point and pauses at the configured ones."""

    def __init__(self, faults: list[dict], directory: Path, tag: str):
        self.wanted = {(f["at"], int(f["nth"])) for f in faults}
        self.directory, self.tag = directory, tag
        self.hits: dict[str, int] = {}

    def hit(self, point: str) -> None:
        n = self.hits[point] = self.hits.get(point, 0) + 1
        if (point, n) not in self.wanted:
            return
        stem = f"{self.tag}.{point}-{n}"
        tmp = self.directory / f"{stem}.tmp"
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, self.directory / f"{stem}.reached")  # the test never sees a half-written marker
        go = self.directory / f"{stem}.go"
        while not go.exists():  # until released; a kill ends it here
            time.sleep(0.01)

    def trace(self, key: str, value) -> None:
        """Record a fact for the test (e.g. the step a training run started from)."""
        path = self.directory / f"{self.tag}.trace.json"
        facts = json.loads(path.read_text()) if path.exists() else {}
        facts.setdefault(key, []).append(value)
        path.write_text(json.dumps(facts))


def _after_each(point: str, points: _Points, stream: Iterable) -> Iterable:
    for item in stream:
        yield item  # resumed once the consumer has taken (and written) the item
        points.hit(point)


def _wrap_generator(owner, name: str, point: str, points: _Points) -> None:
    original = getattr(owner, name)
    setattr(owner, name, lambda *a, **k: _after_each(point, points, original(*a, **k)))


def _before(owner, name: str, point: str, points: _Points, when: Callable[..., bool] = lambda *a: True) -> None:
    original = getattr(owner, name)

    def wrapped(self, *args, **kwargs):
        if when(*args):
            points.hit(point)
        return original(self, *args, **kwargs)

    setattr(owner, name, wrapped)


def install(points: _Points) -> None:
    """Wrap every fault point (a point nobody asked for only counts its hits)."""
    from resources.s3 import S3Backend
    from resources.storage import ArtifactStore, LocalBackend
    from sae_assets.core.activations import caching as activations
    from sae_assets.core import shuffle as sh
    from sae_assets.core.sae import checkpoint
    from sae_assets.core.sae import training as sae_training  # sae_dictionary imports train_sae from here per run

    _wrap_generator(activations, "cache_activations", "cache_batch", points)
    _wrap_generator(sh, "scatter_batches", "scatter_piece", points)
    _wrap_generator(sh, "gather_bucket", "gather_batch", points)
    for backend in (LocalBackend, S3Backend):
        _before(backend, "put_file", "put_file", points)
        _before(backend, "put_bytes", "put_manifest", points, when=lambda data, key: key.endswith("/manifest.json"))
    _before(S3Backend, "local_copy", "download", points)
    _before(ArtifactStore, "commit", "commit", points)

    # checkpoint.py renames its finished temp file with os.replace: give that module an `os`
    # whose replace pauses first (the real os module stays as it is for everyone else).
    real_os = checkpoint.os

    def replace(src, dst):
        points.hit("checkpoint_replace")
        real_os.replace(src, dst)

    checkpoint.os = types.SimpleNamespace(**{**vars(real_os), "replace": replace})

    train_sae = sae_training.train_sae

    def traced_train_sae(sae, batches, cfg, point, *, on_checkpoint=None, **kwargs):
        def traced_batches(start_step: int):
            points.trace("train_start_step", start_step)
            return batches(start_step)

        def checkpointed(path, step):
            if on_checkpoint is not None:
                on_checkpoint(path, step)
            points.trace("checkpoint_step", step)
            points.hit("checkpoint")

        return train_sae(sae, traced_batches, cfg, point, on_checkpoint=checkpointed, **kwargs)

    sae_training.train_sae = traced_train_sae


def main(argv: list[str]) -> int:
    config_path, asset, partition = argv
    import dagster as dg

    points = _Points(json.loads(os.environ.get("FAULTS", "[]")), Path(os.environ.get("FAULT_DIR", ".")),
                     os.environ.get("FAULT_TAG", "run"))
    install(points)
    try:
        with dg.DagsterInstance.get() as instance:
            materialize(config_path, instance, asset, None if partition == "-" else partition)
    except Exception:
        traceback.print_exc()
        return 1
    return 0


# ---- the test's side ----------------------------------------------------------------------------


def prepare_home(home: Path, config_path: str) -> None:
    """A persistent sqlite instance at `home` with the config's dynamic partitions added.

    Added here, once, so the runs a test starts together find nothing to add and start at the
    same speed (sync_partitions also survives such a race: tests/test_growth.py).
    """
    import dagster as dg

    from sae_assets.core.config import load_config
    from sae_assets.defs.partitions import sync_partitions

    home.mkdir(parents=True, exist_ok=True)
    settings = home / "dagster.yaml"
    if not settings.exists():
        settings.write_text("telemetry:\n  enabled: false\n")
    with dg.DagsterInstance.local_temp(tempdir=str(home)) as instance:
        sync_partitions(instance, load_config(config_path))


@dataclass
class FaultyRun:
    """A run of `python tests/faults.py` in its own process group."""

    proc: subprocess.Popen
    fault_dir: Path
    tag: str
    log: Path

    @classmethod
    def start(cls, config_path: str, asset: str, partition: str | None, *, home: Path, fault_dir: Path,
              faults: list[dict] = (), tag: str = "run", env: dict[str, str] | None = None) -> FaultyRun:
        prepare_home(home, config_path)
        fault_dir.mkdir(parents=True, exist_ok=True)
        run_env = {**os.environ, **(env or {}), "DAGSTER_HOME": str(home), "FAULT_DIR": str(fault_dir),
                   "FAULT_TAG": tag, "FAULTS": json.dumps(list(faults)), "PYTHONPATH": str(REPO)}
        log = fault_dir / f"{tag}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), config_path, asset,
                                     partition or "-"], cwd=REPO, env=run_env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        return cls(proc, fault_dir, tag, log)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def _marker(self, point: str, nth: int, suffix: str) -> Path:
        return self.fault_dir / f"{self.tag}.{point}-{nth}.{suffix}"

    def wait_for(self, point: str, nth: int = 1, timeout: float = 180.0) -> None:
        """Block until the run pauses at `point`; fail if it ends or times out first."""
        deadline = time.monotonic() + timeout
        while not self._marker(point, nth, "reached").exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"run {self.tag} ended (rc {self.proc.returncode}) before reaching "
                                     f"{point} #{nth}:\n{self.output()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"run {self.tag} did not reach {point} #{nth} in {timeout:.0f}s:\n"
                                     f"{self.output()}")
            time.sleep(0.02)

    def release(self, point: str, nth: int = 1) -> None:
        self._marker(point, nth, "go").touch()

    def kill(self) -> int:
        """SIGKILL the whole process group, as a crashed node or an OOM kill would."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.proc.wait(timeout=60)

    def finish(self, timeout: float = 300.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"run {self.tag} did not finish in {timeout:.0f}s:\n{self.output()}") from None

    def trace(self) -> dict:
        path = self.fault_dir / f"{self.tag}.trace.json"
        return json.loads(path.read_text()) if path.exists() else {}


def snapshot(backend, asset: str, partition: str | None) -> dict[str, bytes] | None:
    """{key: raw bytes} of a partition's manifest, its history entry and every file it lists
    (None: no manifest).

    Raw backend bytes, not verified reads: a comparison must see exactly what is stored.
    """
    from resources import keys
    from resources.manifest import Manifest

    manifest_key = keys.manifest_key(asset, partition)
    data = backend.get_bytes(manifest_key)
    if data is None:
        return None
    manifest = Manifest.from_json(data, where=manifest_key)
    history_key = keys.history_key(asset, partition, manifest.data_version)
    found = {manifest_key: data, history_key: backend.get_bytes(history_key)}
    for entry in manifest.files.values():
        found[entry.key] = backend.get_bytes(entry.key)
    return found


def partition_keys_stored(backend, asset: str, partition: str | None) -> list[str]:
    from resources import keys

    return backend.list_keys(keys.partition_prefix(asset, partition))


def copy_partition(source, target, asset: str, partition: str | None) -> None:
    from resources import keys

    for key in source.list_keys(keys.partition_prefix(asset, partition)):
        target.put_bytes(source.get_bytes(key), key)


def copy_assets(source, target, assets: Iterable[str]) -> None:
    """Copy every stored key of `assets` from one backend to another (keys are root-relative)."""
    for asset in assets:
        for key in source.list_keys(f"{asset}/"):
            target.put_bytes(source.get_bytes(key), key)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
