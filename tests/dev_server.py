"""`dagster dev` (webserver + daemon) in a subprocess of its own process group, and a small
GraphQL client for it: launch runs and partition backfills, wait for them, read stale status,
data versions and materialization records. With the helpers of such tests: a free port,
whether a process group is alive, progress lines timed from the start, a tiny prose corpus.
A plain module, not a test module: used by tests/test_dagster_dev.py, tests/cluster.py (whose
`Cluster` drives its processes through `DagsterDev`'s client) and tests/test_cluster.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
S0, S1 = SHARDS = ["shard-0000", "shard-0001"]
PARTITIONED = ["corpus_shards", "token_shards", "cached_activations", "shuffle_scatter"]
UNPARTITIONED = ["tokenizer", "language_model", "shuffle_plan"]
CELLS = [f"corpus_shards[{S0}]", f"corpus_shards[{S1}]", "tokenizer", f"token_shards[{S0}]", f"token_shards[{S1}]",
         "language_model", f"cached_activations[{S0}]", f"cached_activations[{S1}]", "shuffle_plan",
         f"shuffle_scatter[{S0}]", f"shuffle_scatter[{S1}]"]
"""Every asset partition tests/test_dagster_dev.py materializes, as 'asset[partition]' (or 'asset'):
the cells `DagsterDev.state` and `DagsterDev.materializations` report."""

IN_PROCESS = {"execution": {"config": {"in_process": {}}}}
"""Run config of most runs: the default executor's in-process mode, so a run loads the code
location once (the multiprocess mode starts another Python process per step). The tests run the
backfill of the model-holding shard asset on the multiprocess executor, as a UI-launched backfill does."""
MULTIPROCESS: dict = {}
"""Run config of the default executor (one_process_per_step) as the UI launches it: a one-step run
executes in its run worker, a longer one forks a process per step."""
START_TIMEOUT, RUN_TIMEOUT, BACKFILL_TIMEOUT = 240, 300, 420
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}
BACKFILL_DONE = {"COMPLETED", "COMPLETED_SUCCESS"}
BACKFILL_BAD = {"FAILED", "CANCELED", "CANCELING", "COMPLETED_FAILED", "FAILING"}


def log(message: str) -> None:
    """Progress with seconds since dagster dev was started (pytest shows it for a failed test)."""
    print(f"[{time.monotonic() - DagsterDev.started:6.1f} s] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_alive(pgid: int) -> bool:
    """Whether any process of the process group is still running (zombies do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def cell(asset: str, partition: str | None) -> str:
    return f"{asset}[{partition}]" if partition else asset


def write_corpus(directory: Path) -> list[Path]:
    """24 documents of English prose (standard-library docstrings), one .txt file each."""
    import argparse
    import csv
    import http.server
    import re
    import textwrap

    prose = "".join(m.__doc__ or "" for m in (argparse, re, csv, json, http.server, textwrap))
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(24):
        start = (i * 331) % (len(prose) - 700)
        path = directory / f"doc-{i:02d}.txt"
        path.write_text(prose[start:start + 700])
        paths.append(path)
    return paths


@dataclass(frozen=True)
class Cell:
    status: str
    causes: tuple[str, ...]
    """Root causes of staleness, as 'asset[partition]'."""
    version: str | None


CAUSES = "{ key { path } partitionKey category reason }"


class DagsterDev:
    """`dagster dev` in a subprocess (own process group) and a small GraphQL client for it."""

    started = time.monotonic()

    def __init__(self, home: Path, config_path: str, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.location = self.repository = None
        env = {**os.environ, "DAGSTER_HOME": str(home), "SAE_ASSETS_CONFIG": config_path, "PYTHONUNBUFFERED": "1"}
        self._log = open(log_path, "wb")
        DagsterDev.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dagster", "dev", "-h", "127.0.0.1", "-p", str(self.port), "-w", "workspace.yaml"],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)

    # --- process ------------------------------------------------------------------------------

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def fail(self, message: str):
        pytest.fail(f"{message}\n--- dagster dev log (webserver + daemon), last lines ---\n{self.log_tail()}",
                    pytrace=False)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            self.fail(f"dagster dev exited with code {self.proc.returncode}")

    def _group_alive(self) -> bool:
        return group_alive(self.proc.pid)

    def _running(self) -> bool:
        exited = self.proc.poll() is not None  # reaps the group leader
        return self._group_alive() if Path("/proc/self/stat").exists() else not exited

    def stop(self) -> None:
        """SIGINT to the whole process group (webserver, daemon, code servers, run workers), then SIGKILL."""
        for sig, grace in ((signal.SIGINT, 15.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while self._running() and time.monotonic() < deadline:
                time.sleep(0.25)
            if not self._running():
                break
        try:
            self.proc.wait(timeout=10)
        finally:
            self._log.close()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until the webserver answers /server_info, the code location is loaded and the daemons
        that launch runs and backfills report healthy heartbeats."""
        query = """{ instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } }
                     workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
                       locationOrLoadError { __typename ... on RepositoryLocation { repositories { name } }
                                             ... on PythonError { message } } } } } }"""
        deadline, last = time.monotonic() + timeout, "no answer"
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with urllib.request.urlopen(f"{self.url}/server_info", timeout=10) as response:
                    json.loads(response.read())
                data = self.gql(query)
            except (OSError, ValueError, AssertionError) as exc:
                last = repr(exc)
                time.sleep(1)
                continue
            healthy = {d["daemonType"]: d["healthy"] for d in data["instance"]["daemonHealth"]["allDaemonStatuses"]}
            entries = data["workspaceOrError"].get("locationEntries") or []
            for entry in entries:
                if entry["locationOrLoadError"] and entry["locationOrLoadError"]["__typename"] == "PythonError":
                    self.fail(f"code location {entry['name']} failed to load: "
                              f"{entry['locationOrLoadError']['message']}")
            loaded = [e for e in entries if e["loadStatus"] == "LOADED" and e["locationOrLoadError"]]
            last = f"daemons {healthy}, locations {[(e['name'], e['loadStatus']) for e in entries]}"
            if loaded and healthy.get("BACKFILL") and healthy.get("QUEUED_RUN_COORDINATOR"):
                self.location = loaded[0]["name"]
                self.repository = loaded[0]["locationOrLoadError"]["repositories"][0]["name"]
                return
            time.sleep(1)
        self.fail(f"dagster dev not ready after {timeout:.0f} s: {last}")

    # --- GraphQL ------------------------------------------------------------------------------

    def gql(self, query: str, variables: dict | None = None) -> dict:
        request = urllib.request.Request(f"{self.url}/graphql", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"query": query, "variables": variables or {}}).encode())
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # GraphQL errors come back as 4xx/5xx with a JSON body
            body = exc.read().decode(errors="replace")
            try:
                payload = json.loads(body)
            except ValueError:
                raise AssertionError(f"GraphQL HTTP {exc.code}: {body[:2000]}") from None
        if payload.get("errors"):
            raise AssertionError(f"GraphQL errors: {json.dumps(payload['errors'])[:3000]}")
        return payload["data"]

    def _repository(self) -> dict:
        return {"repositoryLocationName": self.location, "repositoryName": self.repository}

    def add_partition(self, partitions_def: str, key: str) -> None:
        result = self.gql("""mutation($repo: RepositorySelector!, $name: String!, $key: String!) {
            addDynamicPartition(repositorySelector: $repo, partitionsDefName: $name, partitionKey: $key) {
              __typename ... on AddDynamicPartitionSuccess { partitionKey } ... on Error { message } } }""",
                          {"repo": self._repository(), "name": partitions_def, "key": key})["addDynamicPartition"]
        assert result["__typename"] == "AddDynamicPartitionSuccess", result

    def wait_partitions(self, asset: str, wanted: list[str], timeout: float = 90.0) -> list[str]:
        """The partition keys of `asset` once they include `wanted` (added by a sensor, say)."""
        deadline, keys = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            self.check_alive()
            node = self.gql("query($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { "
                            "... on AssetNode { partitionKeys } } }", {"key": {"path": [asset]}})
            keys = node["assetNodeOrError"].get("partitionKeys") or []
            if set(wanted) <= set(keys):
                return keys
            time.sleep(1)
        self.fail(f"{asset} has partitions {keys} after {timeout:.0f} s, not {wanted}")

    def launch_run(self, assets: list[str], partition: str | None = None) -> str:
        """One run of the implicit asset job for `assets` (one partition of them, if given)."""
        params = {"selector": {**self._repository(), "jobName": "__ASSET_JOB",
                               "assetSelection": [{"path": [a]} for a in assets]},
                  "runConfigData": IN_PROCESS,
                  "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition}]
                                        if partition else []}}
        result = self.gql("""mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
            __typename ... on LaunchRunSuccess { run { runId } } ... on Error { message }
            ... on RunConfigValidationInvalid { errors { message } } } }""", {"params": params})["launchRun"]
        assert result["__typename"] == "LaunchRunSuccess", f"launchRun {assets}[{partition}]: {result}"
        return result["run"]["runId"]

    def run_failure(self, run_id: str) -> str:
        """The errors a failed run logged (step failures, run failure), for the failure message."""
        events = self.gql("""query($id: ID!) { logsForRun(runId: $id) { __typename ... on EventConnection {
            events { __typename ... on MessageEvent { message stepKey }
                     ... on ErrorEvent { error { message stack } } } } } }""",
                          {"id": run_id})["logsForRun"].get("events", [])
        errors = [e for e in events if e.get("error")]
        return "\n".join(f"[{e['__typename']} {e.get('stepKey') or ''}] {e.get('message', '')}\n"
                          f"{e['error']['message']}{''.join(e['error'].get('stack') or [])[-2000:]}"
                          for e in errors[-3:]) or "(no error event)"

    def engine_messages(self, run_id: str) -> str:
        """The run's engine event messages (which executor ran it, step processes), one per line."""
        events = self.gql("""query($id: ID!) { logsForRun(runId: $id) { __typename ... on EventConnection {
            events { __typename ... on EngineEvent { message } } } } }""", {"id": run_id})["logsForRun"]
        return "\n".join(e["message"] for e in events.get("events", []) if e["__typename"] == "EngineEvent")

    def runs(self, run_ids) -> dict[str, str]:
        return {run_id: self.gql("query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status } } }",
                                 {"id": run_id})["runOrError"]["status"] for run_id in run_ids}

    def wait_runs(self, run_ids, timeout: float = RUN_TIMEOUT) -> None:
        run_ids, deadline = list(run_ids), time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            statuses = self.runs(run_ids)
            bad = [r for r, s in statuses.items() if s in FINISHED - {"SUCCESS"}]
            if bad:
                self.fail(f"run {bad[0]} ended {statuses[bad[0]]}:\n{self.run_failure(bad[0])}")
            if all(s == "SUCCESS" for s in statuses.values()):
                return
            time.sleep(1)
        self.fail(f"runs not finished after {timeout:.0f} s: {self.runs(run_ids)}")

    def step_interval(self, run_id: str, step_key: str) -> tuple[float, float]:
        stats = self.gql("""query($id: ID!) { runOrError(runId: $id) { ... on Run {
            stepStats { stepKey startTime endTime } } } }""", {"id": run_id})["runOrError"]["stepStats"]
        [step] = [s for s in stats if s["stepKey"] == step_key]
        return step["startTime"], step["endTime"]

    def launch_backfill(self, assets: list[str], partitions: list[str], title: str,
                        run_config: dict = IN_PROCESS) -> str:
        result = self.gql("""mutation($params: LaunchBackfillParams!) {
          launchPartitionBackfill(backfillParams: $params) {
            __typename ... on LaunchBackfillSuccess { backfillId } ... on Error { message } } }""",
                          {"params": {"partitionNames": partitions, "assetSelection": [{"path": [a]} for a in assets],
                                      "title": title, "runConfigData": run_config}})["launchPartitionBackfill"]
        assert result["__typename"] == "LaunchBackfillSuccess", f"backfill of {assets} {partitions}: {result}"
        return result["backfillId"]

    def backfill(self, backfill_id: str) -> dict:
        return self.gql("""query($id: String!) { partitionBackfillOrError(backfillId: $id) {
            __typename ... on PartitionBackfill { id status error { message }
              runs { runId status tags { key value } }
              assetBackfillData { assetBackfillStatuses { __typename
                ... on AssetPartitionsStatusCounts { assetKey { path } numPartitionsTargeted
                                                     numPartitionsMaterialized numPartitionsFailed }
                ... on UnpartitionedAssetStatus { assetKey { path } materialized failed } } } }
            ... on Error { message } } }""", {"id": backfill_id})["partitionBackfillOrError"]

    def wait_backfill(self, backfill_id: str, *, runs_done: int | None = None,
                      timeout: float = BACKFILL_TIMEOUT) -> dict:
        """Poll partitionBackfillOrError until the backfill is COMPLETED — or, with `runs_done`,
        only until that many of its runs have succeeded (the daemon closes it on a later pass)."""
        deadline, backfill = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            self.check_alive()
            backfill = self.backfill(backfill_id)
            assert backfill["__typename"] == "PartitionBackfill", backfill
            failed = [r for r in backfill["runs"] if r["status"] in FINISHED - {"SUCCESS"}]
            if backfill["status"] in BACKFILL_BAD or failed:
                detail = self.run_failure(failed[0]["runId"]) if failed else backfill["error"]
                self.fail(f"backfill {backfill_id} {backfill['status']}: {detail}")
            succeeded = sum(r["status"] == "SUCCESS" for r in backfill["runs"])
            if backfill["status"] in BACKFILL_DONE or (runs_done is not None and succeeded >= runs_done):
                return backfill
            time.sleep(1)
        self.fail(f"backfill {backfill_id} not COMPLETED after {timeout:.0f} s: status {backfill.get('status')}, "
                  f"runs {[(r['runId'], r['status']) for r in backfill.get('runs', [])]}")

    # --- asset state --------------------------------------------------------------------------

    def state(self) -> dict[str, Cell]:
        """Stale status, root stale causes and data version of every cell, from GraphQL."""

        def keys(names: list[str]) -> list[dict]:
            return [{"path": [n]} for n in names]

        def causes(found: list[dict]) -> tuple[str, ...]:
            return tuple(sorted(cell(c["key"]["path"][-1], c["partitionKey"]) for c in found))

        partitioned = self.gql("""query($keys: [AssetKeyInput!], $parts: [String!]) {
          assetNodes(assetKeys: $keys) {
            assetKey { path } staleStatusByPartition(partitions: $parts)
            staleCausesByPartition(partitions: $parts) %s dataVersionByPartition(partitions: $parts) } }""" % CAUSES,
                               {"keys": keys(PARTITIONED), "parts": SHARDS})["assetNodes"]
        unpartitioned = self.gql("""query($keys: [AssetKeyInput!]) { assetNodes(assetKeys: $keys) {
            assetKey { path } staleStatus staleCauses %s dataVersion } }""" % CAUSES,
                                 {"keys": keys(UNPARTITIONED)})["assetNodes"]
        out = {}
        for node in partitioned:
            columns = zip(SHARDS, node["staleStatusByPartition"], node["staleCausesByPartition"],
                          node["dataVersionByPartition"])
            for shard, status, found, version in columns:
                out[cell(node["assetKey"]["path"][-1], shard)] = Cell(status, causes(found), version)
        for node in unpartitioned:
            name = node["assetKey"]["path"][-1]
            out[name] = Cell(node["staleStatus"], causes(node["staleCauses"]), node["dataVersion"])
        assert sorted(out) == sorted(CELLS), out
        return out

    def materializations(self) -> dict[str, list[str]]:
        """The run ids of every cell's materializations, oldest first (from assetMaterializations)."""
        nodes = self.gql("""query($keys: [AssetKeyInput!]) { assetNodes(assetKeys: $keys) {
            assetKey { path } assetMaterializations { partition runId timestamp } } }""",
                         {"keys": [{"path": [n]} for n in PARTITIONED + UNPARTITIONED]})["assetNodes"]
        out: dict[str, list[tuple[int, str]]] = {c: [] for c in CELLS}
        for node in nodes:
            for event in node["assetMaterializations"]:
                key = cell(node["assetKey"]["path"][-1], event["partition"])
                out[key].append((int(event["timestamp"]), event["runId"]))
        return {c: [run for _, run in sorted(events)] for c, events in out.items()}
