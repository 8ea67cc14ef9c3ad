"""Where a face-ID checkpoint comes from: a local file, or an S3 object cached on this machine.

:func:`fetch_checkpoint` turns the checkpoint a user named (a path or an
``s3://bucket/key`` URI) into a local file, and raises a :class:`CheckpointError`
that says what to fix when it cannot. S3 objects are read through
:class:`~vcn.stores.objectstore.S3Objects`, like every other object of the
platform, into :func:`model_cache_dir`, keyed by URI and ETag: an unchanged object
is downloaded once, a replaced one again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

from vcn.errors import VcnError
from vcn.stores.objectstore import (
    S3Objects,
    StorageError,
    StorageNotFoundError,
    is_s3_uri,
    s3_client,
)

log = logging.getLogger(__name__)


class CheckpointError(VcnError):
    """A backbone checkpoint cannot be used: missing, unreachable, unreadable or of another architecture.

    Attributes:
        checkpoint: The checkpoint as the caller named it (path or ``s3://`` URI), or None.
        reason: What is wrong with it.
    """

    def __init__(self, checkpoint: object, reason: str) -> None:
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.reason = reason
        super().__init__(reason if checkpoint is None else f"checkpoint {self.checkpoint}: {reason}")


class CheckpointNotFoundError(CheckpointError):
    """The checkpoint file, S3 bucket or S3 object does not exist."""


def model_cache_dir() -> Path:
    """Folder for downloaded and converted model files.

    ``$VCN_MODEL_CACHE``, else ``$XDG_CACHE_HOME/vcn/models`` (``~/.cache/vcn/models``).
    """
    if os.environ.get("VCN_MODEL_CACHE"):
        return Path(os.environ["VCN_MODEL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vcn" / "models"


def fetch_checkpoint(checkpoint: str | os.PathLike, s3: Any | None = None) -> Path:
    """The local file of a checkpoint: the path itself, or the cached copy of an S3 object.

    Args:
        checkpoint: A local path or an ``s3://bucket/key`` URI.
        s3: The boto3 S3 client that reads an ``s3://`` checkpoint; None: one from the
            standard AWS environment (:func:`vcn.stores.objectstore.s3_client`).

    Raises:
        CheckpointNotFoundError: No such file, bucket or object.
        CheckpointError: S3 refuses (credentials, permissions) or cannot be reached.
    """
    text = os.fspath(checkpoint)
    if is_s3_uri(text):
        return _fetch_s3(text, s3 if s3 is not None else s3_client())
    path = Path(text).expanduser()
    if not path.exists():
        raise CheckpointNotFoundError(text, "no such file")
    if not path.is_file():
        raise CheckpointError(text, "not a regular file")
    return path


def _fetch_s3(uri: str, client: Any) -> Path:
    """The cached copy of the object ``uri``, downloaded when this ETag of it is not cached yet."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or not key or key.endswith("/"):
        raise CheckpointError(uri, "not an s3://bucket/key URI of one object")
    objects = S3Objects(client, bucket)
    try:
        etag = objects.etag(key)
    except StorageError:
        etag = None  # a HEAD response has no body to explain an error: the download below says what is wrong
    if etag is not None and (cached := _cached(uri, etag)).is_file():
        return cached

    # Downloaded under a name of its own, then filed under the ETag of what was downloaded.
    incoming = model_cache_dir() / "s3" / ".incoming" / f"{uuid.uuid4().hex}-{PurePosixPath(key).name}"
    try:
        target = _cached(uri, objects.download(key, incoming))
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(incoming, target)
    except StorageNotFoundError as error:
        raise CheckpointNotFoundError(uri, error.reason) from error
    except StorageError as error:
        raise CheckpointError(uri, error.reason) from error
    except OSError as error:
        raise CheckpointError(uri, f"download failed: {error}") from error
    finally:
        incoming.unlink(missing_ok=True)
    log.info("downloaded %s (%d bytes) to %s", uri, target.stat().st_size, target)
    return target


def _cached(uri: str, etag: str) -> Path:
    """Where version ``etag`` of the object ``uri`` is cached."""
    slot = hashlib.sha256(f"{uri}\n{etag}".encode()).hexdigest()[:16]
    return model_cache_dir() / "s3" / slot / PurePosixPath(uri).name
