"""Where per-movie artifacts live: a folder per movie, locally or in S3, files written atomically."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import polars as pl
from pydantic import Field, PrivateAttr

from vcn.stores.files import atomic_path
from vcn.stores.objectstore import S3Objects, is_s3_uri, s3_client, split_s3_uri


class ArtifactStore(dg.ConfigurableResource):
    """Per-movie artifact folders and the model store, on the local filesystem or in S3.

    Local (``storage_uri`` unset): ``base_dir/movies/<movie>/<name>`` and
    ``base_dir/models/<name>``. S3 (``storage_uri`` = ``s3://bucket/prefix``): the
    same names as keys under the prefix, with ``base_dir`` as this machine's
    cache of them; every write goes to S3 first, every read checks the object's
    ETag and downloads only what changed, so machines sharing the bucket see
    each other's results.

    Every file is written under a temporary name and moved into place (uploaded
    as one object, which S3 shows only once complete) only when complete, so a
    failed or killed run leaves the previous good file (or nothing), never a
    partial file under the real name.
    """

    base_dir: str = Field(description="Local root of the artifacts; with S3 storage, this machine's cache of them.")
    storage_uri: str | None = Field(
        default=None, description="s3://bucket/prefix to keep the artifacts in S3; None: the local base_dir."
    )
    s3_endpoint_url: str | None = Field(default=None, description="S3 endpoint; None: AWS_ENDPOINT_URL or AWS itself.")
    s3_region: str | None = Field(default=None, description="S3 region; None: AWS_REGION / AWS_DEFAULT_REGION.")

    _objects: S3Objects | None = PrivateAttr(default=None)

    # --- where things are ---------------------------------------------------------------

    @property
    def remote(self) -> S3Objects | None:
        """The S3 objects behind this store (the bucket checked on first use), or None for local storage."""
        if self.storage_uri is None:
            return None
        if self._objects is None:
            if not is_s3_uri(self.storage_uri):
                raise ValueError(f"storage {self.storage_uri!r}: only s3://bucket/prefix URIs are supported")
            bucket, prefix = split_s3_uri(self.storage_uri)
            objects = S3Objects(s3_client(self.s3_endpoint_url, self.s3_region), bucket, prefix)
            objects.check()
            self._objects = objects
        return self._objects

    def check(self) -> None:
        """Raises a clear error now if the storage cannot be used (missing bucket, rejected credentials)."""
        if self.remote is None:
            Path(self.base_dir).mkdir(parents=True, exist_ok=True)

    def movie_dir(self, movie_id: str) -> Path:
        return Path(self.base_dir) / "movies" / movie_id

    def path(self, movie_id: str, name: str) -> Path:
        """Local path of artifact ``name`` of a movie (with S3 storage, its place in the cache; may not exist)."""
        return self.movie_dir(movie_id) / name

    def uri(self, movie_id: str, name: str) -> str:
        """Where the artifact lives, for people and metadata: a local path or an s3:// URI."""
        return self.remote.uri(_movie_key(movie_id, name)) if self.remote else str(self.path(movie_id, name))

    def exists(self, movie_id: str, name: str) -> bool:
        if self.remote:
            return self.remote.etag(_movie_key(movie_id, name)) is not None
        return self.path(movie_id, name).exists()

    def local(self, movie_id: str, name: str) -> Path:
        """A local file with the artifact's current content (downloaded into the cache when it changed in S3)."""
        path = self._fetch(_movie_key(movie_id, name), self.path(movie_id, name))
        if path is None:
            raise FileNotFoundError(
                f"{self.uri(movie_id, name)}: artifact {name!r} of movie {movie_id!r} is missing; materialise it first"
            )
        return path

    def model_path(self, name: str) -> Path:
        """Local path of a model-store artifact (not tied to a movie; with S3 storage, its cache place)."""
        return Path(self.base_dir) / "models" / name

    def model_uri(self, name: str) -> str:
        return self.remote.uri(_model_key(name)) if self.remote else str(self.model_path(name))

    def local_model(self, name: str) -> Path:
        path = self._fetch(_model_key(name), self.model_path(name))
        if path is None:
            raise FileNotFoundError(f"{self.model_uri(name)}: model artifact {name!r} is missing")
        return path

    # --- writing ------------------------------------------------------------------------

    def writing(self, movie_id: str, name: str) -> contextlib.AbstractContextManager[Path]:
        """Yields a temporary path to write; moves it into place (and into S3) on success only."""
        return self._writing(_movie_key(movie_id, name), self.path(movie_id, name))

    def writing_model(self, name: str) -> contextlib.AbstractContextManager[Path]:
        return self._writing(_model_key(name), self.model_path(name))

    def publish_dir(self, movie_id: str, name: str) -> None:
        """Uploads every file of a folder artifact written in place locally (a report); nothing to do locally."""
        if self.remote is None:
            return
        folder = self.path(movie_id, name)
        for file in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            key = _movie_key(movie_id, f"{name}/{file.relative_to(folder).as_posix()}")
            _remember(file, self.remote.upload(file, key))

    def write_parquet(self, movie_id: str, name: str, frame: pl.DataFrame) -> str:
        """Writes a table; returns where it lives."""
        with self.writing(movie_id, name) as tmp:
            frame.write_parquet(tmp, compression="zstd")
        return self.uri(movie_id, name)

    def write_model_json(self, name: str, data: dict) -> str:
        with self.writing_model(name) as tmp:
            tmp.write_text(json.dumps(data, indent=2))
        return self.model_uri(name)

    def read_model_json(self, name: str) -> dict | None:
        """A JSON record of the model store, or None when there is none."""
        return self._read_json(_model_key(name), self.model_path(name))

    def read_parquet(self, movie_id: str, name: str, columns: list[str] | None = None) -> pl.DataFrame:
        return pl.read_parquet(self.local(movie_id, name), columns=columns)

    def read_json(self, movie_id: str, name: str) -> dict | None:
        """A JSON artifact of a movie, or None when there is none."""
        return self._read_json(_movie_key(movie_id, name), self.path(movie_id, name))

    # --- listing and other objects ------------------------------------------------------

    def movie_ids(self) -> list[str]:
        """Every movie with a folder in the store, sorted."""
        if self.remote:
            return sorted(self.remote.folders("movies"))
        root = Path(self.base_dir) / "movies"
        return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []

    def s3_objects(self, bucket: str, prefix: str = "") -> S3Objects:
        """Objects under ``s3://bucket/prefix`` (an inbox, a video), reached with this store's S3 client and settings."""
        client = self.remote.client if self.remote is not None else s3_client(self.s3_endpoint_url, self.s3_region)
        return S3Objects(client, bucket, prefix)

    def cached_copy(self, uri: str, local: Path) -> Path | None:
        """``local`` holding the current content of the S3 object ``uri`` (downloaded only when it changed), or
        None when there is no such object."""
        bucket, key = split_s3_uri(uri)
        return _synced(self.s3_objects(bucket), key, local)

    # --- internals ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _writing(self, key: str, final: Path) -> Iterator[Path]:
        etag = None
        with atomic_path(final, suffix=".partial") as tmp:
            yield tmp
            if self.remote:  # S3 first: if the upload fails, the cache keeps the old file too
                etag = self.remote.upload(tmp, key)
        if etag is not None:
            _remember(final, etag)

    def _read_json(self, key: str, local: Path) -> dict | None:
        """A small JSON record, read straight from S3 (always current) or from the local file."""
        if self.remote:
            data = self.remote.get_bytes(key)
        else:
            data = local.read_bytes() if local.exists() else None
        return None if data is None else json.loads(data)

    def _fetch(self, key: str, local: Path) -> Path | None:
        if self.remote is None:
            return local if local.exists() else None
        return _synced(self.remote, key, local)


def _movie_key(movie_id: str, name: str) -> str:
    return f"movies/{movie_id}/{name}"


def _model_key(name: str) -> str:
    return f"models/{name}"


def _etag_file(local: Path) -> Path:
    return local.with_name(f".{local.name}.etag")


def _remember(local: Path, etag: str) -> None:
    with atomic_path(_etag_file(local)) as tmp:
        tmp.write_text(etag)


def _synced(objects: S3Objects, key: str, local: Path) -> Path | None:
    """``local`` holding the current content of object ``key`` (downloaded if it changed), or None if it is gone."""
    etag = objects.etag(key)
    if etag is None:
        return None
    marker = _etag_file(local)
    if local.exists() and marker.exists() and marker.read_text() == etag:
        return local
    _remember(local, objects.download(key, local))
    return local
