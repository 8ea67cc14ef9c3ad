"""Objects in an S3 bucket under a prefix: the platform's remote storage.

A thin layer over a boto3 S3 client that speaks in keys relative to one
``s3://bucket/prefix`` location and turns S3's error codes into errors that say
what to fix (a missing bucket, rejected credentials, an unreachable endpoint).
Uploads are single objects that appear only once complete (S3 makes a PUT, and a
multipart upload, visible atomically), and downloads land under a temporary
name that is renamed into place, so neither side ever sees a partial file.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from vcn.errors import VcnError

#: S3 error codes that mean the credentials, not the request, are wrong.
CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "InvalidClientTokenId"}
)
#: S3 error codes (and bare HTTP statuses of HEAD requests) for a missing object.
MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
#: Attempts per request (boto's "standard" retry mode: throttling and transient errors are retried).
MAX_ATTEMPTS = 5
_CHUNK = 8 << 20


class StorageError(VcnError):
    """The remote storage refused or failed an operation."""

    def __init__(self, uri: str, reason: str) -> None:
        self.uri = uri
        self.reason = reason
        super().__init__(f"{uri}: {reason}")


class StorageNotFoundError(StorageError):
    """The bucket or the object does not exist."""


def is_s3_uri(text: str | os.PathLike[str] | None) -> bool:
    return isinstance(text, str) and text.startswith("s3://")


def s3_client(endpoint_url: str | None = None, region: str | None = None) -> Any:
    """A boto3 S3 client: the one factory behind every S3 access of the platform.

    A fresh boto3 session reads the standard AWS environment now (credentials from
    the environment, a profile or an instance role; ``AWS_ENDPOINT_URL`` for MinIO
    and the like), not as it was at the first call in this process.

    Args:
        endpoint_url: S3 endpoint; None: ``AWS_ENDPOINT_URL`` or AWS itself.
        region: S3 region; None: ``AWS_REGION`` / ``AWS_DEFAULT_REGION``.
    """
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"})
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> (``bucket``, ``some/prefix``)."""
    if not is_s3_uri(uri):
        raise ValueError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or "/" in bucket:
        raise ValueError(f"{uri!r}: no bucket name after s3://")
    return bucket, key.strip("/")


def s3_error_reason(error: Exception, bucket: str, key: str | None = None) -> tuple[str, bool]:
    """What an S3 ``ClientError`` means for the user, and whether it means "not found"."""
    code = str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))
    if code == "NoSuchBucket":
        return f"bucket {bucket!r} does not exist: create it or fix the storage URI", True
    if code in MISSING_CODES:
        return (f"no object {key!r} in bucket {bucket!r}" if key else f"bucket {bucket!r} does not exist"), True
    if code in CREDENTIAL_CODES:
        return (
            f"S3 rejected the credentials ({code}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE",
            False,
        )
    if code in ("AccessDenied", "403", "Forbidden"):
        return f"access denied to bucket {bucket!r}: the credentials lack the permission for this request", False
    return f"S3 error {code or 'unknown'}: {error}", False


@dataclass
class S3Objects:
    """Objects under ``s3://bucket/prefix``, addressed by keys relative to the prefix."""

    client: Any
    bucket: str
    prefix: str = ""

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def uri(self, name: str = "") -> str:
        return f"s3://{self.bucket}/{self.key(name)}" if name or self.prefix else f"s3://{self.bucket}"

    def check(self) -> None:
        """Raises a :class:`StorageError` unless the bucket exists and these credentials may use it."""
        # A listing, not HEAD: S3 explains an error only in a response body, which HEAD lacks.
        with self._translated(""):
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.key(""), MaxKeys=1)

    def etag(self, name: str) -> str | None:
        """The object's ETag, or None when there is no such object."""
        try:
            with self._translated(name):
                return self.client.head_object(Bucket=self.bucket, Key=self.key(name))["ETag"].strip('"')
        except StorageNotFoundError:
            return None

    def upload(self, path: Path, name: str) -> str:
        """Uploads a file as object ``name``; returns its ETag."""
        with self._translated(name):
            self.client.upload_file(str(path), self.bucket, self.key(name))
            return self.client.head_object(Bucket=self.bucket, Key=self.key(name))["ETag"].strip('"')

    def get_bytes(self, name: str) -> bytes | None:
        """The object's content, or None when there is no such object."""
        try:
            with self._translated(name):
                return self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"].read()
        except StorageNotFoundError:
            return None

    def download(self, name: str, target: Path) -> str:
        """Downloads object ``name`` to ``target`` (atomically); returns the ETag of what was downloaded."""
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.download")
        try:
            with self._translated(name):
                # One GET: the ETag returned and the bytes written come from the same version.
                response = self.client.get_object(Bucket=self.bucket, Key=self.key(name))
                body = response["Body"]
                with contextlib.closing(body), open(partial, "wb") as handle:
                    for chunk in body.iter_chunks(_CHUNK):
                        handle.write(chunk)
            if partial.stat().st_size != response["ContentLength"]:
                raise StorageError(self.uri(name), f"download ended after {partial.stat().st_size} of {response['ContentLength']} bytes")
            os.replace(partial, target)
            etag = response["ETag"].strip('"')
        finally:
            partial.unlink(missing_ok=True)
        return etag

    def names(self, under: str = "") -> Iterator[str]:
        """Names (relative to the prefix) of every object below ``under``."""
        start = self.key(under.rstrip("/") + "/") if under else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        with self._translated(under):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                for item in page.get("Contents", []):
                    yield item["Key"][strip:]

    def folders(self, under: str) -> list[str]:
        """Names of the immediate sub-folders of ``under``."""
        start = self.key(under.rstrip("/") + "/")
        found = []
        with self._translated(under):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start, Delimiter="/"):
                found += [PurePosixPath(p["Prefix"]).name for p in page.get("CommonPrefixes", [])]
        return found

    @contextlib.contextmanager
    def _translated(self, name: str) -> Iterator[None]:
        """Re-raises boto's errors as :class:`StorageError` naming the object and what to fix."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        uri = self.uri(name)
        try:
            yield
        except ClientError as error:
            reason, missing = s3_error_reason(error, self.bucket, self.key(name) if name else None)
            raise (StorageNotFoundError if missing else StorageError)(uri, reason) from error
        except NoCredentialsError as error:
            raise StorageError(uri, "no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)") from error
        except BotoCoreError as error:  # endpoint unreachable, bad configuration
            raise StorageError(uri, f"cannot reach S3: {error}") from error
        except Exception as error:  # boto3's transfer manager wraps client errors in its own
            cause = error.__cause__ or error.__context__
            if isinstance(cause, (ClientError, BotoCoreError)) and not isinstance(error, StorageError):
                reason = s3_error_reason(cause, self.bucket, self.key(name))[0] if isinstance(cause, ClientError) else str(cause)
                raise StorageError(uri, reason) from error
            raise
