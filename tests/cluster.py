"""A Dagster deployment of separate processes on one machine, laid out as a cluster runs it.

`postgres_server()` starts Debian's PostgreSQL (initdb + postgres, as the `postgres` user when
we are root) on 127.0.0.1 and a free port, with a password made at run time. `dagster_home()`
writes a dagster.yaml whose run, event-log and schedule storage is that Postgres (credentials
from DAGSTER_PG_* environment variables, never in the file), with the QueuedRunCoordinator,
a run limit and pools. `Cluster` starts a code server, the webserver and the daemon as three
processes, each in its own process group, and drives them through `DagsterDev`'s GraphQL
client (tests/dev_server.py). The three share only Postgres: the webserver and the daemon get
neither the run config nor artifact credentials, and runs are launched by the code server, the
only process that reads the run config. Used by tests/test_cluster.py and bench/backfill_load.py.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dev_server import DagsterDev, free_port, group_alive

LOCATION = "sae_assets"
START_TIMEOUT = 240.0
PG_ENV = ("DAGSTER_PG_USERNAME", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_DB")

DAGSTER_YAML = """\
telemetry:
  enabled: false
storage:
  postgres:
    postgres_db:
      username: {env: DAGSTER_PG_USERNAME}
      password: {env: DAGSTER_PG_PASSWORD}
      hostname: {env: DAGSTER_PG_HOST}
      port: {env: DAGSTER_PG_PORT}
      db_name: {env: DAGSTER_PG_DB}
      # SQLAlchemy 2.1 maps plain "postgresql" to psycopg 3; dagster-postgres installs psycopg2.
      scheme: postgresql+psycopg2
# The tests launch every run themselves: the keep_fresh automation sensor (on by default) would
# launch its own for whatever is missing.
auto_materialize:
  enabled: false
  use_sensors: false
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
  config:
    dequeue_interval_seconds: 1
    # The code server answers a launch only once the run's process has loaded the code (seconds);
    # launching from one thread would run one run at a time whatever the limit below.
    dequeue_use_threads: true
    dequeue_num_workers: %(max_concurrent_runs)d
concurrency:
  runs:
    max_concurrent_runs: %(max_concurrent_runs)d
  pools:
    default_limit: 1            # pool "model": one step that holds the language model at a time
    op_granularity_run_buffer: 1
# Step logs would be files under DAGSTER_HOME on the node that ran the step; a cluster keeps
# them in a blob store or drops them. Dropped here, so DAGSTER_HOME holds only this file.
compute_logs:
  module: dagster.core.storage.noop_compute_log_manager
  class: NoOpComputeLogManager
"""


# --- Postgres ---------------------------------------------------------------------------------

def postgres_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and postgres, or initdb's on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[-3]) if p.split("/")[-3].isdigit() else 0)
    initdb = found[-1] if found else shutil.which("initdb")
    if not initdb:
        return None
    directory = Path(initdb).resolve().parent
    return directory if (directory / "postgres").exists() else None


def require_postgres() -> Path:
    """Postgres's bin directory; fails under CI (`make test` installs it) and skips elsewhere."""
    directory = postgres_bin()
    if directory:
        return directory
    message = "PostgreSQL server binaries (initdb, postgres) not found under /usr/lib/postgresql/*/bin"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; `make test` installs Debian's postgresql package", pytrace=False)
    pytest.skip(f"{message} (apt-get install postgresql)")


@dataclass(frozen=True)
class PgServer:
    host: str
    port: int
    user: str
    password: str = field(repr=False)
    db_name: str = "dagster"
    log_path: Path = Path("postgres.log")

    def env(self) -> dict[str, str]:
        """The DAGSTER_PG_* variables that dagster.yaml reads."""
        return dict(zip(PG_ENV, (self.user, self.password, self.host, str(self.port), self.db_name), strict=True))

    def connect(self, db_name: str | None = None):
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                dbname=db_name or self.db_name, connect_timeout=5)

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        connection = self.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchall()
        finally:
            connection.close()


def _as_postgres_user() -> dict:
    """Popen arguments that drop to Debian's `postgres` user: initdb and postgres refuse root."""
    if os.geteuid() != 0:
        return {}
    account = pwd.getpwnam("postgres")
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


@contextmanager
def postgres_server(bin_dir: Path, *, timeout: float = 60.0) -> Iterator[PgServer]:
    """A fresh cluster in a temp dir, serving database `dagster` on 127.0.0.1; removed afterwards."""
    # Not under pytest's tmp_path: its parents are private to root, and postgres must reach the dir.
    root = Path(tempfile.mkdtemp(prefix="pg-"))
    drop = _as_postgres_user()
    if drop:
        os.chown(root, drop["user"], drop["group"])
    password, port = secrets.token_hex(16), free_port()
    server = PgServer("127.0.0.1", port, "dagster", password, log_path=root / "postgres.log")
    proc = None
    try:
        secret = root / "pwfile"
        secret.write_text(password + "\n")
        secret.chmod(0o600)
        if drop:
            os.chown(secret, drop["user"], drop["group"])
        initdb = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", server.user, f"--pwfile={secret}",
             "--auth=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"],
            capture_output=True, text=True, cwd=root, **drop)
        secret.unlink()
        if initdb.returncode:
            raise RuntimeError(f"initdb failed ({initdb.returncode}): {initdb.stderr[-2000:]}")
        with open(server.log_path, "ab") as log:
            # Throwaway data: no fsync. max_connections covers a few dozen concurrent run workers.
            proc = subprocess.Popen(
                [str(bin_dir / "postgres"), "-D", str(root / "data"), "-p", str(port),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={root}",
                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", "max_connections=300"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=root,
                start_new_session=True, **drop)
        _create_database(server, proc, timeout)
        yield server
    finally:
        if proc is not None:
            _stop_group(proc, signal.SIGINT, 20.0)  # SIGINT: postgres's "fast" shutdown
        shutil.rmtree(root, ignore_errors=True)


def _create_database(server: PgServer, proc: subprocess.Popen, timeout: float) -> None:
    import psycopg2

    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"postgres exited with {proc.returncode}: {_tail(server.log_path)}")
        try:
            connection = server.connect("postgres")
        except psycopg2.OperationalError as exc:  # still starting
            last = exc
            time.sleep(0.2)
            continue
        connection.autocommit = True  # CREATE DATABASE refuses to run in a transaction
        try:
            with connection.cursor() as cursor:
                cursor.execute(f"CREATE DATABASE {server.db_name}")
        finally:
            connection.close()
        return
    raise RuntimeError(f"postgres on port {server.port} not ready after {timeout:.0f} s ({last}): "
                       f"{_tail(server.log_path)}")


# --- processes ----------------------------------------------------------------------------------

def _tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _stop_group(proc: subprocess.Popen, first: signal.Signals, grace: float) -> None:
    """`first` to the process group (the leader and every child it started), SIGKILL after `grace` s."""
    for sig, wait in ((first, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, so it does not count as alive
            if not group_alive(proc.pid):
                break
            time.sleep(0.2)
        if not group_alive(proc.pid):
            break
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


@dataclass(frozen=True)
class RunTimes:
    """When a run passed each stage, in epoch seconds, from Dagster's event log."""

    enqueued: float
    launched: float
    """RUN_STARTING: the queue took the run and asked the code server to start it."""
    started: float
    """RUN_START: the run's process has loaded the code and begins executing."""
    ended: float
    steps: dict[str, tuple[float, float]]
    """Step key -> (STEP_START, STEP_SUCCESS or STEP_FAILURE)."""

    @property
    def work(self) -> float:
        return sum(end - start for start, end in self.steps.values())


def run_times(pg: PgServer, run_ids: list[str]) -> dict[str, RunTimes]:
    """RunTimes of each run, read from the event_logs table in Postgres."""
    from dagster._core.events import DagsterEventType as E

    stage = {E.RUN_ENQUEUED.value: "enqueued", E.RUN_STARTING.value: "launched", E.RUN_START.value: "started",
             E.RUN_SUCCESS.value: "ended", E.RUN_FAILURE.value: "ended"}
    step = {E.STEP_START.value: 0, E.STEP_SUCCESS.value: 1, E.STEP_FAILURE.value: 1}
    rows = pg.query("SELECT run_id, dagster_event_type, step_key, EXTRACT(EPOCH FROM timestamp) FROM event_logs "
                    "WHERE run_id = ANY(%s) AND dagster_event_type = ANY(%s)", (list(run_ids), [*stage, *step]))
    found: dict[str, dict] = {run_id: {"steps": {}} for run_id in run_ids}
    for run_id, kind, step_key, at in rows:
        if kind in stage:
            found[run_id][stage[kind]] = float(at)
        else:
            found[run_id]["steps"].setdefault(step_key, [0.0, 0.0])[step[kind]] = float(at)
    out = {}
    for run_id, times in found.items():
        times["steps"] = {k: (a, b) for k, (a, b) in times["steps"].items()}
        missing = {"enqueued", "launched", "started", "ended"} - set(times)
        assert not missing, f"run {run_id} has no {sorted(missing)} event in the event log"
        out[run_id] = RunTimes(**times)
    return out


def peak_concurrency(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (an end at t closes before a start at t opens)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    peak = current = 0
    for _, change in events:
        current += change
        peak = max(peak, current)
    return peak


def dagster_home(directory: Path, *, max_concurrent_runs: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "dagster.yaml").write_text(DAGSTER_YAML % {"max_concurrent_runs": max_concurrent_runs})
    return directory


def _base_env(home: Path, pg: PgServer) -> dict[str, str]:
    """What every process gets: this environment minus anything naming other storage or the run
    config, plus DAGSTER_HOME and the Postgres credentials."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "DAGSTER_", "SAE_ASSETS_")) and k != "PYTHONPATH"}
    return {**env, **pg.env(), "DAGSTER_HOME": str(home), "PYTHONUNBUFFERED": "1"}


class Cluster(DagsterDev):
    """A code server, `dagster-webserver` and `dagster-daemon`, each its own process (group).

    `code_env` (the run config, artifact-storage credentials) goes to the code server alone: it
    launches the runs, so only it and its run workers need them.
    """

    def __init__(self, directory: Path, home: Path, pg: PgServer, code_env: dict[str, str]):
        self.directory, self.pg = directory, pg
        self.location = self.repository = None
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs = []
        grpc_port, self.port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = directory / "webserver.log"
        workspace = directory / "workspace.yaml"
        workspace.write_text(f"load_from:\n  - grpc_server:\n      host: 127.0.0.1\n      port: {grpc_port}\n"
                             f"      location_name: {LOCATION}\n")
        # The run workers' working directory: a relative path in the run config would land here.
        self.workdir = directory / "code-server-cwd"
        self.workdir.mkdir(exist_ok=True)
        env = _base_env(home, pg)
        bin_dir = Path(sys.executable).parent
        DagsterDev.started = time.monotonic()
        self._start("code-server", [str(bin_dir / "dagster"), "code-server", "start", "-h", "127.0.0.1",
                                    "-p", str(grpc_port), "-m", "sae_assets.definitions", "--location-name",
                                    LOCATION, "--use-python-environment-entry-point"],
                    {**env, **code_env}, self.workdir)
        try:
            self._wait_code_server(grpc_port)
            self._start("webserver", [str(bin_dir / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(self.port),
                                      "-w", str(workspace)], env, directory)
            self._start("daemon", [str(bin_dir / "dagster-daemon"), "run", "-w", str(workspace)], env, directory)
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, args: list[str], env: dict[str, str], cwd: Path) -> None:
        log = open(self.directory / f"{name}.log", "wb")
        self._logs.append(log)
        self.procs[name] = subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_code_server(self, port: int, timeout: float = START_TIMEOUT) -> None:
        """Until the code server lists the repository (its code loaded), so the webserver and the
        daemon find the location loaded on their first try."""
        from dagster._grpc.client import DagsterGrpcClient

        client, deadline, last = DagsterGrpcClient(port=port, host="127.0.0.1"), time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                answer = client.list_repositories()
            except Exception as exc:  # not listening yet, or still loading the code
                last = repr(exc)[:300]
                time.sleep(1)
                continue
            if "SerializableErrorInfo" in answer:
                self.fail(f"the code server failed to load sae_assets.definitions: {answer[:3000]}")
            return
        self.fail(f"code server on port {port} not ready after {timeout:.0f} s: {last}")

    # --- DagsterDev's process hooks, for three processes --------------------------------------

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(f"--- {name}.log ---\n{_tail(self.directory / f'{name}.log', lines)}" for name in self.procs)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                self.fail(f"{name} exited with code {proc.returncode}")

    def stop(self) -> None:
        """SIGTERM to each process group (the daemon first, the code server and its run workers
        last), then SIGKILL."""
        for name in ("daemon", "webserver", "code-server"):
            if name in self.procs:
                _stop_group(self.procs[name], signal.SIGTERM, 20.0)
        for log in self._logs:
            log.close()

    def leftover_processes(self) -> list[int]:
        """Pids still alive in any of the three process groups (empty after `stop`)."""
        return [p.pid for p in self.procs.values() if group_alive(p.pid)]


@contextmanager
def running_cluster(directory: Path, pg: PgServer, code_env: dict[str, str], *,
                    max_concurrent_runs: int) -> Iterator[Cluster]:
    home = dagster_home(directory / "dagster_home", max_concurrent_runs=max_concurrent_runs)
    cluster = Cluster(directory, home, pg, code_env)
    try:
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()
        leftover = cluster.leftover_processes()
        assert not leftover, f"processes of the cluster still running after stop: {leftover}"

