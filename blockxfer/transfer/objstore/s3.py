"""The ObjectStore calls over boto3: the one module that talks S3.

Endpoint, credentials and region come from boto3's usual sources (AWS_* variables,
~/.aws/config and credentials, AWS_PROFILE, instance roles) unless `endpoint` is
given. Every S3 error becomes a blockxfer error here and nowhere else: a refused
signature or key is one line and exit 4. PUTs carry a CRC32 the server checks
(boto3's flexible checksums), on top of our own xxh3 in every object.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from blockxfer.errors import DeviceError, NotFound, UsageError

from .objects import Conflict, Missing, ObjectInfo
from .store import Store, parse_url

_AUTH = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
         "ExpiredToken", "AuthorizationHeaderMalformed", "Forbidden", "403"}
_MISSING = {"NoSuchKey", "404", "NotFound"}
_CONFLICT = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


def client_for(endpoint: str | None = None, access_key: str | None = None,
               secret_key: str | None = None, region: str | None = None) -> Any:
    import os

    import boto3
    from botocore.config import Config
    attempts = int(os.environ.get("AWS_MAX_ATTEMPTS", "10"))   # boto3's own variable
    cfg = Config(retries={"max_attempts": attempts, "mode": "standard"}, max_pool_connections=16,
                 s3={"addressing_style": "path"}, connect_timeout=10, read_timeout=120,
                 request_checksum_calculation="when_supported",
                 # a ranged GET may come back with the whole object's checksum (rclone):
                 # ask for checks on whole-object GETs only; our xxh3 covers every blob
                 response_checksum_validation="when_required")
    session = boto3.session.Session()
    try:
        return session.client("s3", endpoint_url=endpoint, aws_access_key_id=access_key,
                              aws_secret_access_key=secret_key,
                              region_name=region or session.region_name or "us-east-1",
                              config=cfg)
    except ValueError as e:     # botocore: "Invalid endpoint: ..." (from the option or env)
        raise UsageError(f"{e}: give the S3 endpoint as http(s)://HOST[:PORT] "
                         "(--s3-endpoint or AWS_ENDPOINT_URL)") from e


class S3Objects:
    """One bucket of an S3 endpoint."""

    def __init__(self, client: Any, bucket: str):
        self.c, self.bucket = client, bucket
        self.url = f"s3://{bucket}/"

    @contextmanager
    def _errors(self, what: str, key: str) -> Iterator[None]:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
        )
        where = f"s3://{self.bucket}/{key}"
        try:
            yield
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in _MISSING:
                raise Missing(f"{where} does not exist") from e
            if code in _CONFLICT:
                raise Conflict(f"{where} was changed by another writer") from e
            if code in _AUTH:
                raise DeviceError(f"s3://{self.bucket}: the store refused our credentials "
                                  f"({code}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                                  "or the profile") from e
            if code == "NoSuchBucket":
                raise NotFound(f"s3://{self.bucket}: no such bucket") from e
            raise DeviceError(f"{what} {where}: {code} {e}") from e
        except EndpointConnectionError as e:
            raise DeviceError(f"cannot reach the S3 endpoint {self.c.meta.endpoint_url}; check "
                              "--s3-endpoint or AWS_ENDPOINT_URL") from e
        except NoCredentialsError as e:
            raise DeviceError("no S3 credentials: set AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE") from e
        except BotoCoreError as e:
            raise DeviceError(f"{what} {where}: {e}") from e

    def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        kw = {"ChecksumMode": "ENABLED"}
        if start or end is not None:
            kw = {"Range": f"bytes={start}-{'' if end is None else end - 1}"}
        with self._errors("GET", key):
            body = self.c.get_object(Bucket=self.bucket, Key=key, **kw)["Body"]
            try:
                data: bytes = body.read()
            finally:
                body.close()
        if end is not None and len(data) != end - start:
            raise Missing(f"s3://{self.bucket}/{key} is shorter than the byte {end} we need")
        return data

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        with self._errors("GET", key):
            r = self.c.get_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
            return r["Body"].read(), str(r["ETag"])

    def put(self, key: str, data: bytes | bytearray | memoryview, *, if_none_match: bool = False,
            if_match: str | None = None, retain_until: float | None = None) -> str:
        kw: dict[str, Any] = {}
        if if_none_match:
            kw["IfNoneMatch"] = "*"
        if if_match is not None:
            kw["IfMatch"] = if_match
        if retain_until is not None:
            kw["ObjectLockMode"] = lock_mode()
            kw["ObjectLockRetainUntilDate"] = _when(retain_until)
        body = data if isinstance(data, bytes | bytearray) else bytes(data)  # a pack: not copied
        with self._errors("PUT", key):
            r = self.c.put_object(Bucket=self.bucket, Key=key, Body=body,
                                  ChecksumAlgorithm="CRC32", **kw)
            return str(r["ETag"])

    def retain(self, key: str, until: float) -> None:
        from botocore.exceptions import ClientError
        try:                                    # never shorten (COMPLIANCE forbids it)
            now = self.c.get_object_retention(Bucket=self.bucket, Key=key)["Retention"]
            if now["RetainUntilDate"].timestamp() >= until:
                return
        except ClientError:
            pass                                # none yet (or unreadable: the PUT says)
        with self._errors("PUT retention of", key):
            self.c.put_object_retention(Bucket=self.bucket, Key=key, Retention={
                "Mode": lock_mode(), "RetainUntilDate": _when(until)})

    def lock_enabled(self) -> bool:
        from botocore.exceptions import ClientError
        try:
            conf = self.c.get_object_lock_configuration(Bucket=self.bucket)
        except ClientError as e:
            if "ObjectLockConfigurationNotFound" in str(e.response.get("Error", {})):
                return False
            with self._errors("GET object lock of", ""):
                raise
        return bool(conf.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled")

    def head(self, key: str) -> ObjectInfo | None:
        try:
            with self._errors("HEAD", key):
                r = self.c.head_object(Bucket=self.bucket, Key=key)
        except Missing:
            return None
        return ObjectInfo(key, int(r["ContentLength"]), r["LastModified"].timestamp(),
                          str(r["ETag"]))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        with self._errors("LIST", prefix):
            pages = self.c.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                      Prefix=prefix)
            for page in pages:
                for o in page.get("Contents", []):
                    yield ObjectInfo(o["Key"], int(o["Size"]), o["LastModified"].timestamp(),
                                     str(o.get("ETag", "")))

    def delete(self, key: str) -> None:
        with self._errors("DELETE", key):
            self.c.delete_object(Bucket=self.bucket, Key=key)


def lock_mode() -> str:
    """COMPLIANCE (no one may delete before the date) unless BLOCKXFER_S3_LOCK_MODE says
    GOVERNANCE (users with s3:BypassGovernanceRetention may)."""
    import os
    mode = os.environ.get("BLOCKXFER_S3_LOCK_MODE", "COMPLIANCE").upper()
    if mode not in ("COMPLIANCE", "GOVERNANCE"):
        from blockxfer.errors import UsageError
        raise UsageError(f"BLOCKXFER_S3_LOCK_MODE={mode}: use COMPLIANCE or GOVERNANCE")
    return mode


def _when(unix: float) -> Any:
    from datetime import UTC, datetime
    return datetime.fromtimestamp(unix, tz=UTC)


def open_store(url: str, *, endpoint: str | None = None, volume: bool = False,
               ) -> tuple[Store, str | None, str | None]:
    """A Store for `s3://BUCKET/PREFIX[/VOLUME[@SNAP]]`; with `volume`, also the names."""
    loc = parse_url(url, volume=volume)
    objects = S3Objects(client_for(endpoint), loc.bucket)
    root = f"s3://{loc.bucket}" + (f"/{loc.prefix}" if loc.prefix else "")
    return Store(objects, loc.prefix, root), loc.volume, loc.snapshot
