"""Security properties: credentials never leak, storage keys never leave the artifact root,
servers listen on 127.0.0.1 unless an operator deliberately publishes them.

Credentials: real materializations against the SeaweedFS fixture with the S3 credentials
passed as production passes them (boto3's default chain from the environment, and
`dg.EnvVar`-bound resource fields), plus a run that fails on a wrong secret. Then every place
something is recorded is searched for the access key, the secret and the wrong secret:
every event-log entry, run, job and plan snapshot of the instance (decoded, since Dagster
stores snapshots compressed), every file of the instance directory (captured compute logs
included), the process's stdout/stderr, Python log records (the secret at DEBUG, both keys at
INFO and above: botocore's DEBUG request dump names the access key id in its signature),
every object and manifest in the bucket and the local download cache. Positive controls show
the search would have found them: the same search finds literal credentials in the job
snapshot, and the expected metadata in each place.

Paths: hostile partition keys, asset and file names through the storage API of both
backends, direct backend keys, hostile dynamic partitions through a real materialization,
and configured paths, with a listing of the disk around the root before and after.

Binding: the Makefile's `ui` command is run as written (free port, temporary DAGSTER_HOME)
and the listening TCP sockets of its whole process tree are read from /proc/net/tcp{,6};
the SeaweedFS fixture's sockets likewise; compose, Helm and the feature-browser instructions
are read. The /proc reader is itself checked against a socket bound to 0.0.0.0.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import time
import traceback
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable
from pathlib import Path

import boto3
import dagster as dg
import pytest
import yaml
from botocore.config import Config
from dagster._serdes import serialize_value
from support import TINY, write_run_config

from resources import ArtifactStorage, RunSettings, keys
from resources.s3 import S3Backend
from resources.storage import ArtifactStore, LocalBackend, StorageError
from sae_assets.core.config import load_config
from sae_assets.definitions import ALL_ASSETS, build_resources
from sae_assets.defs.partitions import SHARDS, sync_partitions

REPO = Path(__file__).resolve().parent.parent
KEY_ID_VAR, SECRET_VAR, WRONG_SECRET_VAR = "SAE_TEST_S3_ACCESS_KEY_ID", "SAE_TEST_S3_SECRET", "SAE_TEST_S3_WRONG_SECRET"


def write_corpus(directory: Path, count: int = 16) -> Path:
    """Small local text files: materializing them takes a second, unlike the embedded corpus."""
    import argparse
    import csv
    import json
    import textwrap

    prose = "".join(m.__doc__ or "" for m in (argparse, re, csv, json, textwrap))
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        start = (i * 331) % (len(prose) - 600)
        (directory / f"doc-{i:02d}.txt").write_text(prose[start:start + 600])
    return directory


def tiny_config(directory: Path, storage: dict) -> str:
    corpus = {"source": "local", "paths": [str(write_corpus(directory / "docs"))], "num_shards": 2, "max_documents": 0}
    return write_run_config(directory, TINY, storage, corpus=corpus)


def isolate_aws_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No AWS settings from the machine: only what a test sets reaches boto3."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))


def s3_storage(s3_server, prefix: str, cache_dir: Path, **credentials) -> dict:
    return {"backend": "s3", "endpoint_url": s3_server.endpoint_url, "bucket": s3_server.bucket,
            "prefix": prefix, "region": s3_server.region, "cache_dir": str(cache_dir), **credentials}


def instance_texts(instance: dg.DagsterInstance) -> dict[str, str]:
    """Everything the instance recorded, decoded: runs, their event logs, job and plan snapshots."""
    texts = {}
    for run in instance.get_runs():
        texts[f"run {run.run_id}"] = serialize_value(run)
        texts[f"events {run.run_id}"] = "\n".join(serialize_value(e) for e in instance.all_logs(run.run_id))
        texts[f"job snapshot {run.run_id}"] = serialize_value(instance.get_job_snapshot(run.job_snapshot_id))
        if run.execution_plan_snapshot_id:
            texts[f"plan snapshot {run.run_id}"] = serialize_value(
                instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id))
    return texts


def file_texts(root: Path) -> dict[str, str]:
    return {str(p): p.read_bytes().decode("utf-8", "replace") for p in sorted(root.rglob("*")) if p.is_file()}


def bucket_texts(s3_server, prefix: str) -> dict[str, str]:
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name=s3_server.region,
                          aws_access_key_id=s3_server.access_key_id, aws_secret_access_key=s3_server.secret_access_key,
                          config=Config(s3={"addressing_style": "path"}))
    texts = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3_server.bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=s3_server.bucket, Key=obj["Key"])["Body"].read()
            texts[f"s3://{s3_server.bucket}/{obj['Key']}"] = obj["Key"] + "\n" + body.decode("utf-8", "replace")
    return texts


def where_found(needles: dict[str, str], texts: dict[str, str]) -> list[str]:
    return [f"{label} in {place}" for place, text in texts.items()
            for label, needle in needles.items() if needle in text]


# --- credentials ------------------------------------------------------------------------------------

@pytest.mark.s3
def test_credentials_never_appear_in_logs_metadata_manifests_or_objects(s3_server, tmp_path, monkeypatch,
                                                                        capfd, caplog):
    isolate_aws_environment(monkeypatch, tmp_path)
    wrong_secret = "wrong-" + uuid.uuid4().hex
    prefix = f"security/{uuid.uuid4().hex[:8]}"
    cache_dir, home, cwd = tmp_path / "s3-cache", tmp_path / "dagster_home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # a relative path anywhere would write here
    config_path = tiny_config(tmp_path, s3_storage(s3_server, prefix, cache_dir))
    caplog.set_level(logging.DEBUG)
    instance = dg.DagsterInstance.local_temp(tempdir=str(home))
    sync_partitions(instance, load_config(config_path))
    shards = ["shard-0000", "shard-0001"]

    # 1. As definitions.py runs in production: no credentials in the resource, boto3's default
    #    chain reads them from the process environment.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_access_key)
    from_chain = build_resources(config_path)
    for shard in shards:
        dg.materialize(ALL_ASSETS, selection=["corpus_shards"], partition_key=shard, instance=instance,
                       resources=from_chain)
    dg.materialize(ALL_ASSETS, selection=["tokenizer"], instance=instance, resources=from_chain)

    # 2. Resource fields bound to dg.EnvVar, with nothing for boto3 to fall back on.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv(KEY_ID_VAR, s3_server.access_key_id)
    monkeypatch.setenv(SECRET_VAR, s3_server.secret_access_key)
    monkeypatch.setenv(WRONG_SECRET_VAR, wrong_secret)
    from_env_vars = {"settings": RunSettings(config_path=config_path), "storage": ArtifactStorage(
        **s3_storage(s3_server, prefix, cache_dir), access_key_id=dg.EnvVar(KEY_ID_VAR),
        secret_access_key=dg.EnvVar(SECRET_VAR))}
    for shard in shards:
        dg.materialize(ALL_ASSETS, selection=["token_shards"], partition_key=shard, instance=instance,
                       resources=from_env_vars)

    # 3. A wrong secret: the run fails, and its error is recorded everywhere a failure goes.
    wrong = {**from_env_vars, "storage": ArtifactStorage(
        **s3_storage(s3_server, prefix, cache_dir), access_key_id=dg.EnvVar(KEY_ID_VAR),
        secret_access_key=dg.EnvVar(WRONG_SECRET_VAR))}
    failed = dg.materialize(ALL_ASSETS, selection=["tokenizer"], instance=instance, resources=wrong,
                            raise_on_error=False)
    assert not failed.success

    out, err = capfd.readouterr()
    recorded = instance_texts(instance)
    places = {**recorded, **file_texts(home), "stdout": out, "stderr": err, **bucket_texts(s3_server, prefix),
              **file_texts(cache_dir)}
    debug_logs = "\n".join(f"{r.name}: {r.getMessage()}" for r in caplog.records)
    info_logs = "\n".join(f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.INFO)
    secrets = {"secret key": s3_server.secret_access_key, "wrong secret": wrong_secret}
    found = where_found({**secrets, "access key id": s3_server.access_key_id}, {**places, "INFO+ logs": info_logs})
    found += where_found(secrets, {"DEBUG logs": debug_logs})
    assert not found, "credentials leaked: " + "; ".join(found)

    # Positive controls: each searched place holds what a leak would sit beside.
    events = "\n".join(t for p, t in recorded.items() if p.startswith("events"))
    assert f"s3://{s3_server.bucket}/{prefix}/token_shards/" in events, "materialization metadata was searched"
    assert f"access denied to bucket {s3_server.bucket!r}" in events.replace("\\'", "'"), "the failure was searched"
    assert "STEP_SUCCESS" in err or "STEP_SUCCESS" in out, "Dagster's console log was captured"
    assert any(p.endswith(".err") for p in file_texts(home)), "captured compute logs were searched"
    manifests = [p for p in places if p.endswith("/manifest.json")]
    assert len(manifests) == 5, f"manifests of 2 corpus shards, the tokenizer and 2 token shards: {manifests}"
    assert any(r.name.startswith("botocore") and r.levelno == logging.DEBUG for r in caplog.records)
    assert not list(cwd.iterdir()), "nothing is written relative to the working directory"


@pytest.mark.s3
def test_literal_credentials_reach_the_job_snapshot_so_production_binds_env_vars(s3_server, tmp_path, monkeypatch):
    """Why credentials must be dg.EnvVar (or boto3's chain): a literal value on a resource is
    stored in every run's job snapshot in the instance database. Also the search's own control."""
    isolate_aws_environment(monkeypatch, tmp_path)
    monkeypatch.setenv(SECRET_VAR, s3_server.secret_access_key)
    seen = {}

    @dg.asset
    def probe(storage: ArtifactStorage) -> None:
        seen.setdefault("describe", []).append(storage.store().describe())

    snapshots = {}
    for label, secret in (("literal", s3_server.secret_access_key), ("env var", dg.EnvVar(SECRET_VAR))):
        instance = dg.DagsterInstance.ephemeral()
        storage = ArtifactStorage(**s3_storage(s3_server, "security/probe", tmp_path / "cache"),
                                  access_key_id=s3_server.access_key_id, secret_access_key=secret)
        assert dg.materialize([probe], instance=instance, resources={"storage": storage}).success
        snapshots[label] = "\n".join(instance_texts(instance).values())
    assert seen["describe"] == [f"s3://{s3_server.bucket}/security/probe"] * 2
    assert s3_server.secret_access_key in snapshots["literal"]
    assert s3_server.secret_access_key not in snapshots["env var"] and SECRET_VAR in snapshots["env var"]


@pytest.mark.s3
def test_backend_errors_and_repr_never_show_the_secret(s3_server, tmp_path, monkeypatch):
    isolate_aws_environment(monkeypatch, tmp_path)
    secret, wrong = s3_server.secret_access_key, "wrong-" + uuid.uuid4().hex
    closed_port = socket.socket()
    closed_port.bind(("127.0.0.1", 0))
    unreachable = f"http://127.0.0.1:{closed_port.getsockname()[1]}"
    closed_port.close()
    cases = {
        "unreachable endpoint": dict(endpoint_url=unreachable, secret_access_key=secret),
        "wrong secret": dict(endpoint_url=s3_server.endpoint_url, secret_access_key=wrong),
        "missing bucket": dict(endpoint_url=s3_server.endpoint_url, secret_access_key=secret, bucket="no-such-bucket"),
    }
    for case, overrides in cases.items():
        kwargs = dict(bucket=s3_server.bucket, prefix="security/errors", region=s3_server.region,
                      cache_dir=tmp_path / "cache", access_key_id=s3_server.access_key_id,
                      connect_timeout=1.0, max_attempts=1)
        kwargs.update(overrides)
        with pytest.raises(StorageError) as info:
            S3Backend(**kwargs)
        text = "".join(traceback.format_exception(info.value))  # the whole chain of causes
        assert secret not in text and wrong not in text, f"{case}: {text[-400:]}"
        assert str(info.value), case
    backend = S3Backend(bucket=s3_server.bucket, prefix="security/errors", endpoint_url=s3_server.endpoint_url,
                        region=s3_server.region, cache_dir=tmp_path / "cache", access_key_id=s3_server.access_key_id,
                        secret_access_key=secret)
    assert secret not in repr(backend) and secret not in str(backend) and secret not in repr(ArtifactStore(backend))
    with pytest.raises(keys.InvalidKeyError) as info:
        backend.put_bytes(b"x", "../outside")
    assert secret not in str(info.value)


def test_storage_resource_repr_hides_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv(SECRET_VAR, "env-secret-" + uuid.uuid4().hex)
    literal = ArtifactStorage(backend="s3", bucket="b", access_key_id="AKIDLITERAL", secret_access_key="literal-secret")
    seen = {}

    @dg.asset
    def probe(storage: ArtifactStorage) -> None:  # the resolved copy a run's steps receive
        seen["repr"], seen["str"] = repr(storage), str(storage)

    resolved = ArtifactStorage(backend="local", root=str(tmp_path), secret_access_key=dg.EnvVar(SECRET_VAR))
    dg.materialize([probe], instance=dg.DagsterInstance.ephemeral(), resources={"storage": resolved})
    shown = [repr(literal), str(literal), seen["repr"], seen["str"]]
    assert not any(s in text for text in shown for s in ("literal-secret", "AKIDLITERAL", os.environ[SECRET_VAR]))


# --- paths ------------------------------------------------------------------------------------------

HOSTILE_PARTITIONS = ["../x", "a/../../b", "../../../../../../tmp/escape", "/etc/passwd", "..", ".", ".hidden",
                      "%2e%2e", "%2e%2e%2fescape", "..\\..\\windows", "a/./b", "~root", "x\x00y", "shard-0000/../..",
                      "_all", "a" * 201]
ESCAPING_KEYS = ["../escape", "a/../../escape", "/etc/passwd", "..", "../../../../../../etc/passwd"]
HOSTILE_NAMES = ["../x", "/etc/passwd", "a/b", "..", ".hidden", "x\x00y", "a\\b", ""]


def disk_listing(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def test_hostile_partition_keys_stay_inside_the_root_or_are_refused(store, tmp_path):
    before = disk_listing(tmp_path)
    written = {}
    for partition in HOSTILE_PARTITIONS:
        try:
            with store.writer("corpus_shards", partition) as out:
                out.path("documents.parquet").write_bytes(partition.encode("utf-8", "replace"))
        except keys.InvalidKeyError:
            continue
        written[partition] = out.manifest
    # Refused: the reserved, hidden and too-long; kept, percent-encoded into one path component: the rest.
    assert set(HOSTILE_PARTITIONS) - set(written) == {"..", ".", ".hidden", "_all", "a" * 201, "../x",
                                                     "../../../../../../tmp/escape", "..\\..\\windows"}
    assert sorted(store.partitions("corpus_shards")) == sorted(written), "every key round-trips exactly"
    for partition, manifest in written.items():
        assert store.read_bytes(store.require("corpus_shards", partition), "documents.parquet") == \
            partition.encode("utf-8", "replace")
        for entry in manifest.files.values():
            assert entry.key.count("/") == 3 and entry.key.startswith("corpus_shards/"), entry.key
    backend = store.backend
    if isinstance(backend, LocalBackend):
        for path in disk_listing(tmp_path) - before:
            assert Path(path).resolve().is_relative_to(backend.root), f"{path} is outside {backend.root}"
    else:
        assert all(k.startswith("corpus_shards/") for k in backend.list_keys(""))
        assert not disk_listing(tmp_path) - before - disk_listing(backend.cache_dir) - {str(backend.cache_dir)}


def test_hostile_asset_file_and_backend_keys_are_refused(store):
    for name in HOSTILE_NAMES:
        with pytest.raises(keys.InvalidKeyError):
            with store.writer(name or "x/..", "p"):
                pass
        with pytest.raises(keys.InvalidKeyError), store.writer("corpus_shards", "p") as out:
            out.path(name)
    backend = store.backend
    for key in ESCAPING_KEYS:
        for attempt in (lambda: backend.put_bytes(b"x", key), lambda: backend.get_bytes(key),
                        lambda: backend.exists(key), lambda: backend.delete([key]), lambda: backend.list_keys(key)):
            with pytest.raises(keys.InvalidKeyError):
                attempt()
    if isinstance(backend, LocalBackend):  # a symlink inside the root does not lead out of it
        outside = backend.root.parent / "outside"
        outside.mkdir()
        (backend.root / "link").symlink_to(outside)
        with pytest.raises(keys.InvalidKeyError):
            backend.put_bytes(b"x", "link/file")
        assert not list(outside.iterdir())


def test_s3_prefix_cannot_climb_out_of_its_bucket_path(tmp_path):
    for prefix in ["../other", "a/../../b", "a/./b", "a//b"]:
        storage = ArtifactStorage.from_config(load_config(overrides={"storage": {
            "backend": "s3", "endpoint_url": "http://127.0.0.1:9", "bucket": "b", "prefix": prefix,
            "cache_dir": str(tmp_path / "cache")}}).storage)
        with pytest.raises(keys.InvalidKeyError, match="prefix"):
            storage.store()


def test_hostile_dynamic_partitions_fail_the_run_and_write_nothing_outside_the_root(tmp_path):
    root, home = tmp_path / "artifacts", tmp_path / "dagster_home"
    home.mkdir()
    config_path = tiny_config(tmp_path / "config", {"root": str(root)})
    instance = dg.DagsterInstance.local_temp(tempdir=str(home))
    hostile = ["../escape", "a/../../escape", "/tmp/escape", "%2e%2e"]
    instance.add_dynamic_partitions(SHARDS.name, hostile)
    before = disk_listing(tmp_path)
    resources = build_resources(config_path)
    for key in hostile:
        result = dg.materialize(ALL_ASSETS, selection=["corpus_shards"], partition_key=key, instance=instance,
                                resources=resources, raise_on_error=False)
        assert not result.success, key
        failure = next(e for e in result.all_events if e.is_step_failure)
        assert repr(key) in failure.step_failure_data.error.to_string(), "the error names the bad partition"
    for path in disk_listing(tmp_path) - before:
        assert Path(path).is_relative_to(root) or Path(path).is_relative_to(home), path
    assert not Path("/tmp/escape").exists()


def test_configured_roots_hold_every_local_write(tmp_path, monkeypatch):
    """A run on the local backend writes only under storage.root (its data, staging and
    checkpoints); with the S3 backend (previous tests) only under storage.cache_dir."""
    root, home, cwd = tmp_path / "artifacts", tmp_path / "dagster_home", tmp_path / "cwd"
    cwd.mkdir()
    home.mkdir()
    monkeypatch.chdir(cwd)
    config_path = tiny_config(tmp_path / "config", {"root": str(root)})
    instance = dg.DagsterInstance.local_temp(tempdir=str(home))
    sync_partitions(instance, load_config(config_path))
    before = disk_listing(tmp_path)
    resources = build_resources(config_path)
    dg.materialize(ALL_ASSETS, selection=["corpus_shards"], partition_key="shard-0000", instance=instance,
                   resources=resources)
    new = disk_listing(tmp_path) - before
    assert any(Path(p).name == "manifest.json" for p in new)
    assert all(Path(p).is_relative_to(root) or Path(p).is_relative_to(home) for p in new), sorted(new)
    assert not list(cwd.iterdir())


# --- binding ----------------------------------------------------------------------------------------

def _address(hex_address: str) -> tuple[str, int]:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16)
    # /proc prints an IPv6 address as four host-order 32-bit words.
    return socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))), int(port, 16)


def process_tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


def listening_sockets(pids: Iterable[int]) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket that one of `pids` holds open."""
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if match := re.fullmatch(r"socket:\[(\d+)\]", target):
                inodes.add(match.group(1))
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: TCP_LISTEN
                found.append(_address(fields[1]))
    return found


def pid_listening_on(port: int) -> int:
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        if ("127.0.0.1", port) in listening_sockets([pid]):
            return pid
    raise AssertionError(f"no process listens on 127.0.0.1:{port}")


def test_the_socket_reader_sees_a_wildcard_bind():
    with socket.socket() as wildcard, socket.socket() as loopback:
        wildcard.bind(("0.0.0.0", 0))
        wildcard.listen()
        loopback.bind(("127.0.0.1", 0))
        loopback.listen()
        mine = listening_sockets([os.getpid()])
        assert ("0.0.0.0", wildcard.getsockname()[1]) in mine
        assert ("127.0.0.1", loopback.getsockname()[1]) in mine


@pytest.mark.s3
def test_the_s3_fixture_listens_on_loopback_only(s3_server):
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    pid = pid_listening_on(port)
    sockets = listening_sockets(process_tree(pid))
    assert len(sockets) >= 5, f"weed mini runs master, volume, filer, S3 and their gRPC ports: {sockets}"
    assert {address for address, _ in sockets} == {"127.0.0.1"}, sockets


def test_compose_publishes_ports_on_loopback_only():
    compose = yaml.safe_load((REPO / "deploy" / "docker-compose.yaml").read_text())
    published = []
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and re.fullmatch(r"127\.0\.0\.1:\d+:\d+", port), f"{name} publishes {port}"
            published.append(name)
        assert service.get("network_mode") != "host", f"{name} would bind the host's interfaces"
    assert sorted(published) == ["seaweedfs", "webserver"]
    helm = yaml.safe_load((REPO / "deploy" / "helm" / "values.yaml").read_text())
    assert helm["dagsterWebserver"]["service"]["type"] == "ClusterIP", "the UI has no login: no public Service"


def test_feature_browser_instructions_serve_on_loopback(tmp_path):
    from sae_assets.demo import site_instructions

    config = load_config(overrides={"storage": {"root": str(tmp_path / "artifacts")}})
    store = ArtifactStorage.from_config(config.storage).store()
    with store.writer("feature_site", None) as out:
        out.path("index.html").write_text("<html></html>")
    text = site_instructions(config)
    command = next(line for line in text.splitlines() if "http.server" in line).split(":", 1)[1]
    argv = shlex.split(command)
    assert argv[argv.index("-b") + 1] == "127.0.0.1", text
    assert "0.0.0.0" not in text


def makefile_ui_command() -> list[str]:
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ui:"))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    (command,) = [line for line in recipe if " dev " in line]
    argv = shlex.split(command.replace("$(CURDIR)", str(REPO)).replace("$(VENV)", ".venv").replace("$$", "$"))
    while "=" in argv[0] and not argv[0].startswith("-"):  # the recipe's VAR=value prefixes
        argv.pop(0)
    return [str(REPO / argv[0]), *argv[1:]]


def makefile_ui_env() -> dict[str, str]:
    """The variables `make ui`'s recipe sets before its command (VIRTUAL_ENV, PATH)."""
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ui:"))
    command = next(line.strip() for line in lines[start + 1:] if " dev " in line)
    env = {}
    for word in shlex.split(command.replace("$(CURDIR)", str(REPO)).replace("$(VENV)", ".venv")):
        if "=" not in word or word.startswith("-"):
            break
        name, value = word.split("=", 1)
        env[name] = value.replace("$$PATH", os.environ.get("PATH", ""))
    return env


def test_makefile_servers_bind_loopback():
    argv = makefile_ui_command()
    assert argv[argv.index("-h") + 1] == "127.0.0.1"
    assert "0.0.0.0" not in (REPO / "Makefile").read_text()


@pytest.mark.slow
def test_make_ui_listens_on_loopback_only(tmp_path):
    """Start `make ui`'s command as written (its port swapped for a free one) and read the
    listening sockets of the webserver, the daemon and the code server it spawns."""
    argv = makefile_ui_command()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv[argv.index("-p") + 1] = str(port)
    home = tmp_path / "dagster_home"
    home.mkdir()
    # As `make ui` copies it, without the automation that would start materializing the default
    # graph into the checkout's .data while the sockets are read.
    (home / "dagster.yaml").write_text((REPO / "deploy" / "dagster-local.yaml").read_text()
                                       + "auto_materialize:\n  enabled: false\n  use_sensors: false\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAE_ASSETS_")} | makefile_ui_env()
    env["DAGSTER_HOME"] = str(home)
    log = open(tmp_path / "dagster-dev.log", "wb")
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 50
        loaded = False
        while time.monotonic() < deadline and not loaded:
            assert proc.poll() is None, (tmp_path / "dagster-dev.log").read_text()[-2000:]
            try:  # served, and the code location loaded (its server process is running)
                query = b'{"query": "{ workspaceOrError { ... on Workspace { locationEntries { loadStatus } } } }"}'
                request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=query,
                                                 headers={"Content-Type": "application/json"})
                loaded = b'"LOADED"' in urllib.request.urlopen(request, timeout=5).read()
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if not loaded:
                time.sleep(0.5)
        assert loaded, "dagster dev did not serve a loaded workspace within 50 s"
        tree = process_tree(proc.pid)
        sockets = listening_sockets(tree)
        assert ("127.0.0.1", port) in sockets and len(tree) >= 3, (tree, sockets)
        assert {address for address, _ in sockets} == {"127.0.0.1"}, sockets
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
