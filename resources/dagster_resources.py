"""Dagster resources: the run settings and the artifact storage every asset reads and writes.

`RunSettings` loads the typed run config (YAML) once per process. `ArtifactStorage` is the
one place a backend is chosen: the local filesystem by default, S3 through boto3 when
`backend: s3`. S3 credentials come from boto3's default chain (environment, profile, instance
role) or from `access_key_id`/`secret_access_key` bound to `dg.EnvVar`s; they are never
logged or written into metadata. `cache_dir` may hold `{run_id}`, which each run replaces
with its own id: runs then share no local files, as on a cluster whose nodes have separate
disks. Tests: tests/test_definitions.py, tests/test_storage.py, tests/test_cluster.py.
"""

from __future__ import annotations

import functools
from pathlib import Path

import dagster as dg
import pydantic
from pydantic import PrivateAttr

from resources.storage import ArtifactStore, LocalBackend
from sae_assets.core.config import RunConfig, StorageConfig, load_config


@functools.lru_cache(maxsize=8)
def _cached_config(config_path: str | None) -> RunConfig:
    return load_config(config_path)


class RunSettings(dg.ConfigurableResource):
    """Where the run config lives; the packaged default when `config_path` is empty."""

    config_path: str | None = None

    def load(self) -> RunConfig:
        return _cached_config(self.config_path or None)


class ArtifactStorage(dg.ConfigurableResource):
    """Artifact storage: `backend` local (under `root`) or s3 (`bucket`, `prefix`, `endpoint_url`)."""

    backend: str = "local"
    root: str = ".data/artifacts"
    endpoint_url: str | None = None
    bucket: str | None = None
    prefix: str = "sae_assets"
    region: str = "us-east-1"
    cache_dir: str = ".data/s3-cache"
    """S3 downloads and staging; `{run_id}` in it becomes the run's id (`no-run` outside a run)."""
    # Kept out of repr (Dagster prints resources in errors and logs); bind them to dg.EnvVar or
    # leave them unset for boto3's default chain, so the job snapshot stores only a variable name.
    access_key_id: str | None = pydantic.Field(default=None, repr=False)
    secret_access_key: str | None = pydantic.Field(default=None, repr=False)

    _store: ArtifactStore | None = PrivateAttr(default=None)
    _run_id: str | None = PrivateAttr(default=None)

    @classmethod
    def from_config(cls, cfg: StorageConfig) -> ArtifactStorage:
        return cls(
            backend=cfg.backend, root=cfg.root, endpoint_url=cfg.endpoint_url or None,
            bucket=cfg.bucket or None, prefix=cfg.prefix, region=cfg.region, cache_dir=cfg.cache_dir,
        )

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Dagster calls this on the copy of the resource that a run's steps receive.
        self._run_id = context.run.run_id if context.run else None

    def resolved_cache_dir(self) -> Path:
        """`cache_dir` with `{run_id}` replaced by this run's id (or `no-run`)."""
        return Path(self.cache_dir.replace("{run_id}", self._run_id or "no-run"))

    def store(self) -> ArtifactStore:
        if self._store is None:
            self._store = ArtifactStore(self._backend())
        return self._store

    def _backend(self):
        if self.backend == "local":
            return LocalBackend(Path(self.root))
        if self.backend == "s3":
            from resources.s3 import S3Backend  # boto3 is imported only when S3 is used

            if not self.bucket:
                raise ValueError("config key 'storage.bucket' must be set when storage.backend is 's3'")
            return S3Backend(
                bucket=self.bucket, prefix=self.prefix, endpoint_url=self.endpoint_url, region=self.region,
                cache_dir=self.resolved_cache_dir(), access_key_id=self.access_key_id,
                secret_access_key=self.secret_access_key,
            )
        raise ValueError(f"storage.backend {self.backend!r} is not one of 'local', 's3'")
