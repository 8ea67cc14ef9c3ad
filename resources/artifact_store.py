"""Where per-movie artifacts live: one folder per movie, files written atomically."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import dagster as dg
from pydantic import Field
import polars as pl

from vcn.files import atomic_path


class ArtifactStore(dg.ConfigurableResource):
    """Per-movie artifact folders on the local filesystem.

    Every file is written under a temporary name and renamed into place only
    when complete, so a failed or killed run leaves the previous good file (or
    nothing), never a partial file under the real name.
    """

    base_dir: str = Field(description="Root folder of the artifacts; one sub-folder per movie.")

    def movie_dir(self, movie_id: str) -> Path:
        return Path(self.base_dir) / "movies" / movie_id

    def path(self, movie_id: str, name: str) -> Path:
        """Final path of artifact ``name`` of a movie (may not exist yet)."""
        return self.movie_dir(movie_id) / name

    def exists(self, movie_id: str, name: str) -> bool:
        return self.path(movie_id, name).exists()

    def model_path(self, name: str) -> Path:
        """Final path of a model-registry artifact (not tied to a movie)."""
        return Path(self.base_dir) / "models" / name

    def writing(self, movie_id: str, name: str) -> contextlib.AbstractContextManager[Path]:
        """Yields a temporary path to write; renames it into place on success only."""
        return self._writing(self.path(movie_id, name))

    def write_model_json(self, name: str, data: dict) -> Path:
        with self._writing(self.model_path(name)) as tmp:
            tmp.write_text(json.dumps(data, indent=2))
        return self.model_path(name)

    def read_model_json(self, name: str) -> dict | None:
        path = self.model_path(name)
        return json.loads(path.read_text()) if path.exists() else None

    def _writing(self, final: Path) -> contextlib.AbstractContextManager[Path]:
        return atomic_path(final, suffix=".partial")

    def write_parquet(self, movie_id: str, name: str, frame: pl.DataFrame) -> Path:
        with self.writing(movie_id, name) as tmp:
            frame.write_parquet(tmp, compression="zstd")
        return self.path(movie_id, name)

    def read_parquet(self, movie_id: str, name: str, columns: list[str] | None = None) -> pl.DataFrame:
        path = self.path(movie_id, name)
        if not path.exists():
            raise FileNotFoundError(f"{path}: artifact {name!r} of movie {movie_id!r} is missing; materialise it first")
        return pl.read_parquet(path, columns=columns)

    def register_movie(self, movie_id: str, source: str) -> None:
        """Records which video file a movie partition stands for."""
        with self.writing(movie_id, "movie.json") as tmp:
            tmp.write_text(json.dumps({"movie_id": movie_id, "source": str(source)}, indent=2))

    def movie_source(self, movie_id: str) -> str:
        """The video file registered for ``movie_id``."""
        path = self.path(movie_id, "movie.json")
        if not path.exists():
            raise FileNotFoundError(
                f"movie {movie_id!r} is not registered (no {path}); add it with `vcn process VIDEO` or the inbox"
            )
        return json.loads(path.read_text())["source"]

    def registered_sources(self) -> dict[str, str]:
        """Video source of every registered movie, by movie id."""
        root = Path(self.base_dir) / "movies"
        out = {}
        for meta in sorted(root.glob("*/movie.json")):
            data = json.loads(meta.read_text())
            out[data["movie_id"]] = data["source"]
        return out
