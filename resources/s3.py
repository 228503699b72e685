"""S3 backend for ArtifactStore: any S3 API (AWS, MinIO, SeaweedFS) through boto3.

`S3Backend` moves bytes under `s3://bucket/prefix/<key>`; the manifest-last protocol lives in
resources/storage.py. Construction checks that the endpoint answers and the bucket exists,
so a wrong URL, bucket or credential fails at startup with a message naming what is wrong.
Requests retry with backoff (botocore "standard" mode), which rides out a restarting server.
Reads are downloaded once into a content-addressed local cache. Credentials come from the
arguments or boto3's default chain and are never logged, stored in messages or repr'd.
Tested against a real SeaweedFS server by the contract tests in tests/test_storage.py.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
)

from resources import keys
from resources.storage import Backend, StorageError, StoredObject

_MiB = 1024 * 1024
_DELETE_BATCH = 1000  # the S3 DeleteObjects limit
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_NO_BUCKET = {"NoSuchBucket"}
_DENIED = {"403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken"}


class _Redactor:
    """Replaces explicitly passed credentials in text; its repr shows nothing."""

    def __init__(self, *secrets: str | None):
        self._secrets = tuple(s for s in secrets if s)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def __repr__(self) -> str:
        return "_Redactor(***)"


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3Backend(Backend):
    """Keys live at `s3://<bucket>/<prefix>/<key>`; downloads are cached under `cache_dir`."""

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        cache_dir: str | Path,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        max_attempts: int = 10,
        connect_timeout: float = 3.0,
        read_timeout: float = 60.0,
    ):
        if not bucket or "/" in bucket:
            raise StorageError(f"S3 bucket name {bucket!r} is empty or contains '/'")
        if (access_key_id is None) != (secret_access_key is None):
            raise StorageError("pass both access_key_id and secret_access_key, or neither (boto3's default chain)")
        self.bucket = bucket
        self.prefix = self._normalize_prefix(prefix)
        self.cache_dir = Path(cache_dir).resolve()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._redact = _Redactor(access_key_id, secret_access_key)

        session = boto3.session.Session(
            aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key, region_name=region
        )
        s3_options = {"addressing_style": "path"} if endpoint_url else {}

        def client(attempts: int):
            config = Config(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                max_pool_connections=16,  # transfer threads plus concurrent fetches
                retries={"mode": "standard", "max_attempts": attempts},
                s3=s3_options,
                # Checksums only where the API demands them: not every S3 server speaks the
                # newer flexible-checksum headers; integrity is ours (sha256 in the manifest).
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            return session.client("s3", endpoint_url=endpoint_url, config=config)

        self._client = client(max_attempts)
        self.endpoint_url = self._client.meta.endpoint_url
        self._transfer = TransferConfig(
            multipart_threshold=64 * _MiB, multipart_chunksize=64 * _MiB, max_concurrency=8, use_threads=True
        )
        # Fail fast at startup: one retry, not the patient schedule used for data requests.
        self._check_bucket(client(2))

    @staticmethod
    def _normalize_prefix(prefix: str) -> str:
        prefix = prefix.strip("/")
        if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
            raise keys.InvalidKeyError(f"S3 prefix {prefix!r} has an empty, '.' or '..' component")
        return prefix + "/" if prefix else ""

    def __repr__(self) -> str:
        return f"S3Backend({self.describe()!r}, endpoint_url={self.endpoint_url!r})"

    __str__ = __repr__

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    # ---- errors ----------------------------------------------------------------------------

    def _check_bucket(self, probe) -> None:
        where = f"bucket {self.bucket!r} at {self.endpoint_url}"
        try:
            probe.head_bucket(Bucket=self.bucket)
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise StorageError(
                f"no S3 credentials for {where}: pass access_key_id/secret_access_key or set "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or an AWS profile)"
            ) from exc
        except BotoConnectionError as exc:
            raise StorageError(
                f"S3 endpoint {self.endpoint_url} is unreachable ({type(exc).__name__}); "
                "is the server running and the URL right?"
            ) from exc
        except ClientError as exc:
            code = _error_code(exc)
            if code in _NOT_FOUND or code in _NO_BUCKET:
                raise StorageError(f"S3 bucket {self.bucket!r} does not exist at {self.endpoint_url}") from exc
            if code in _DENIED:
                raise StorageError(
                    f"access denied to {where} ({code}): check the credentials and their permissions"
                ) from exc
            raise StorageError(f"S3 check of {where} failed: {self._redact(str(exc))}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 check of {where} failed: {self._redact(str(exc))}") from exc

    @contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        """Turn boto errors into StorageError naming the object; not-found handling is the caller's."""
        try:
            yield
        except ClientError as exc:
            raise StorageError(
                f"S3 {action} of {self.describe()}/{key} at {self.endpoint_url} failed: {self._redact(str(exc))}"
            ) from exc
        except BotoCoreError as exc:
            raise StorageError(
                f"S3 {action} of {self.describe()}/{key} at {self.endpoint_url} failed: {self._redact(str(exc))}"
            ) from exc

    # ---- keys ------------------------------------------------------------------------------

    def _full(self, key: str, *, directory: bool = False) -> str:
        """The object name for a relative key; refuses keys that could alias or escape."""
        parts = key.split("/")
        if directory and parts[-1] == "":
            parts = parts[:-1]
        if not parts or any(part in ("", ".", "..") for part in parts) or "\\" in key:
            raise keys.InvalidKeyError(f"key {key!r} is not a clean relative key under {self.describe()}")
        return self.prefix + key

    def scratch_dir(self) -> Path:
        scratch = self.cache_dir / ".staging"
        scratch.mkdir(parents=True, exist_ok=True)
        return scratch

    # ---- bytes -----------------------------------------------------------------------------

    def put_file(self, local_path: Path, key: str) -> None:
        name = self._full(key)
        with self._errors("upload", key):
            self._client.upload_file(str(local_path), self.bucket, name, Config=self._transfer)

    def put_bytes(self, data: bytes, key: str) -> None:
        name = self._full(key)
        with self._errors("put", key):
            self._client.put_object(Bucket=self.bucket, Key=name, Body=data)

    def get_bytes(self, key: str) -> bytes | None:
        name = self._full(key)
        with self._errors("get", key):
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=name)
            except ClientError as exc:
                if _error_code(exc) in _NOT_FOUND:
                    return None
                raise
            return response["Body"].read()

    def _size(self, key: str) -> int | None:
        name = self._full(key)
        with self._errors("head", key):
            try:
                return int(self._client.head_object(Bucket=self.bucket, Key=name)["ContentLength"])
            except ClientError as exc:
                if _error_code(exc) in _NOT_FOUND:
                    return None
                raise

    def exists(self, key: str) -> bool:
        return self._size(key) is not None

    def local_copy(self, key: str, sha256: str) -> Path:
        """Download once into cache_dir/<sha256[:2]>/<sha256>; the caller verifies the checksum.

        A cached copy whose size matches the object is reused without downloading. If it was
        damaged in place, the store's checksum reports it at this path; delete it to refetch.
        """
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise keys.InvalidKeyError(f"checksum {sha256!r} is not a sha256 hex digest")
        size = self._size(key)
        if size is None:
            raise FileNotFoundError(f"{self.describe()}/{key} does not exist")
        target = self.cache_dir / sha256[:2] / sha256
        if target.exists() and target.stat().st_size == size:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{sha256}.{uuid.uuid4().hex}.tmp")
        try:
            with self._errors("download", key):
                self._client.download_file(self.bucket, self._full(key), str(tmp), Config=self._transfer)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target

    def evict(self, key: str, sha256: str) -> bool:
        target = self.cache_dir / sha256[:2] / sha256
        if target.exists():
            target.unlink()
            return True
        return False

    def list_keys(self, prefix: str) -> list[str]:
        full = self._full(prefix, directory=True) if prefix else self.prefix
        found = []
        with self._errors("list", prefix):
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                found.extend(
                    obj["Key"][len(self.prefix):] for obj in page.get("Contents", []) if not obj["Key"].endswith("/")
                )
        return sorted(found)

    def list_objects(self, prefix: str) -> list[StoredObject]:
        full = self._full(prefix, directory=True) if prefix else self.prefix
        found = []
        with self._errors("list", prefix):
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                found.extend(
                    StoredObject(obj["Key"][len(self.prefix):], int(obj["Size"]), obj["LastModified"].timestamp())
                    for obj in page.get("Contents", []) if not obj["Key"].endswith("/")
                )
        return sorted(found)

    def delete(self, keys_to_delete: list[str]) -> None:
        names = [self._full(key) for key in keys_to_delete]
        for start in range(0, len(names), _DELETE_BATCH):
            batch = names[start : start + _DELETE_BATCH]
            with self._errors("delete", batch[0]):
                response = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": n} for n in batch], "Quiet": True}
                )
            errors = response.get("Errors", [])
            if errors:
                shown = ", ".join(f"{e.get('Key')} ({e.get('Code')})" for e in errors[:5])
                raise StorageError(f"S3 delete under {self.describe()} failed for {len(errors)} keys: {shown}")
