"""The movie registry: which video each movie partition stands for, and what identified its content.

Every registration, by the inbox sensor or by ``vcn process``, writes the same
record (:class:`MovieRecord`, kept as ``movies/<movie>/movie.json`` in the artifact
store), so that processing a movie again can tell an unchanged video (keep what
is done) from a changed one (redo everything).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from resources.artifact_store import ArtifactStore
from vcn.stores.objectstore import is_s3_uri, split_s3_uri
from vcn_assets import artifacts

#: What identifies the content of a video without reading it: ``size`` and ``mtime_ns`` of a
#: file, the ``etag`` of an S3 object.
VideoStamp = dict[str, int | str]


@dataclass(frozen=True)
class MovieRecord:
    """A registered movie: its partition key, its video, and the stamp of that video when registered."""

    movie_id: str
    #: A local path or an s3:// URI.
    source: str
    #: None in records written before stamps were kept: then the video counts as changed.
    stamp: VideoStamp | None


@dataclass(frozen=True)
class MovieRegistry:
    """The registered movies of an artifact store, and local copies of their videos."""

    store: ArtifactStore

    def register(self, movie_id: str, source: str) -> MovieRecord:
        """Records that ``movie_id`` stands for the video ``source`` as it is now; returns the record."""
        record = MovieRecord(movie_id, str(source), self.stamp(str(source)))
        with self.store.writing(movie_id, artifacts.MOVIE_RECORD) as tmp:
            tmp.write_text(json.dumps(asdict(record), indent=2))
        return record

    def record(self, movie_id: str) -> MovieRecord | None:
        """The record of ``movie_id``, or None when it is not registered."""
        data = self.store.read_json(movie_id, artifacts.MOVIE_RECORD)
        return None if data is None else MovieRecord(data["movie_id"], data["source"], data.get("stamp"))

    def source(self, movie_id: str) -> str:
        """The video registered for ``movie_id``: a local path or an s3:// URI."""
        record = self.record(movie_id)
        if record is None:
            raise FileNotFoundError(
                f"movie {movie_id!r} is not registered (no {self.store.uri(movie_id, artifacts.MOVIE_RECORD)}); "
                "add it with `vcn process VIDEO` or the inbox"
            )
        return record.source

    def local_source(self, movie_id: str) -> str:
        """A local file of the movie's video: the registered path, or its S3 object downloaded into the cache."""
        source = self.source(movie_id)
        return str(self.fetch(movie_id, source)) if is_s3_uri(source) else source

    def fetch(self, movie_id: str, uri: str) -> Path:
        """The S3 video ``uri`` of a movie as a local file in the store's cache, downloaded only when it changed."""
        local = Path(self.store.base_dir) / "sources" / movie_id / PurePosixPath(uri).name
        path = self.store.cached_copy(uri, local)
        if path is None:
            raise FileNotFoundError(f"{uri}: no such video in S3 (movie {movie_id!r})")
        return path

    def sources(self) -> dict[str, str]:
        """Video source of every registered movie, by movie id."""
        records = (self.record(movie_id) for movie_id in self.store.movie_ids())
        return {record.movie_id: record.source for record in records if record is not None}

    def stamp(self, source: str) -> VideoStamp:
        """What identifies the content of the video ``source`` now, without reading it: size and mtime, or ETag."""
        if is_s3_uri(source):
            bucket, key = split_s3_uri(source)
            return {"etag": self.store.s3_objects(bucket).etag(key)}
        stat = os.stat(source)
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
