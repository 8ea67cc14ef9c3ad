"""The DuckDB warehouse: per-movie result tables, lineage and stage metrics.

DuckDB lets one process open a database file for writing at a time. Every write
here takes an exclusive file lock beside the database first, opens the
connection, writes in one transaction and closes, so any number of pipeline
processes can share the file; a process that finds DuckDB's own lock held (an
analyst's read-only session) retries for a while before giving up with a clear
error. Readers open read-only connections.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from vcn.clustering.cannot_link import positions_on_screen_together
from vcn.clustering.identities import UNKNOWN, Edit, add_edit, cluster_table

log = logging.getLogger(__name__)

#: Per-movie result tables the pipeline maintains (rows keyed by ``movie_id``).
RESULT_TABLES = (
    "movies",
    "shots",
    "frames",
    "detections",
    "tracks",
    "track_crops",
    "track_embeddings",
    "face_clusters",
)

#: Result tables keyed by ``(movie_id, model_version)``: a run replaces the rows of
#: its own model version only, so the results of earlier models stay queryable.
VERSIONED_TABLES = frozenset({"face_clusters"})

_DDL = """
CREATE TABLE IF NOT EXISTS lineage (
    asset VARCHAR NOT NULL,
    movie_id VARCHAR,
    run_id VARCHAR NOT NULL,
    code_version VARCHAR,
    artifact VARCHAR,
    row_count BIGINT,
    started_at TIMESTAMPTZ,
    finished_at TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS models (
    version VARCHAR PRIMARY KEY,
    name VARCHAR NOT NULL,
    checkpoint VARCHAR,
    dim INTEGER,
    input_size INTEGER,
    template VARCHAR,
    registered_at TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS cluster_edits (
    edit_id VARCHAR PRIMARY KEY,
    movie_id VARCHAR NOT NULL,
    action VARCHAR NOT NULL,
    tracks BIGINT[] NOT NULL,
    name VARCHAR,
    note VARCHAR,
    created_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS stage_metrics (
    movie_id VARCHAR,
    asset VARCHAR NOT NULL,
    run_id VARCHAR NOT NULL,
    seconds DOUBLE,
    frames BIGINT,
    frames_per_s DOUBLE,
    items BIGINT,
    realtime_factor DOUBLE,
    details JSON,
    recorded_at TIMESTAMPTZ,
    frames_decoded BIGINT
);
"""


#: The analysts' views: name -> (tables they read, SELECT). Created (again) by every
#: write once their tables exist, so they always follow the current schema. The
#: README documents each, with example queries.
VIEWS: dict[str, tuple[tuple[str, ...], str]] = {
    # The movie's most recent clustering (whatever model version made it).
    "latest_clusters": (
        ("face_clusters",),
        """
        SELECT * FROM face_clusters fc
        WHERE fc.run_id = (SELECT arg_max(f.run_id, f.clustered_at) FROM face_clusters f WHERE f.movie_id = fc.movie_id)
        """,
    ),
    # Every track with its cluster (null: Unknown or not clustered yet), times and thumbnail.
    "track_clusters": (
        ("tracks", "face_clusters"),
        """
        SELECT t.movie_id, t.track_id, c.cluster, c.name, t.shot_id, t.start_frame, t.end_frame, t.start_s, t.end_s,
               t.end_s - t.start_s AS duration_s, t.n_detections, c.quality, c.low_quality, c.unknown_reason, c.thumbnail,
               c.model_version, c.run_id, c.clustered_at
        FROM tracks t LEFT JOIN latest_clusters c ON c.movie_id = t.movie_id AND c.track_id = t.track_id
        """,
    ),
    # One row per person (cluster) and movie: tracks, screen time, first and last appearance.
    "people": (
        ("tracks", "face_clusters"),
        """
        SELECT movie_id, cluster, any_value(name) AS name, count(*) AS tracks, sum(duration_s) AS screen_time_s,
               min(start_s) AS first_seen_s, max(end_s) AS last_seen_s,
               arg_max(thumbnail, quality) AS thumbnail, any_value(model_version) AS model_version
        FROM track_clusters WHERE cluster IS NOT NULL GROUP BY movie_id, cluster
        """,
    ),
    # Per movie, asset and run: the stage's figures (the latest run first).
    "stage_runs": (
        ("stage_metrics",),
        """
        SELECT movie_id, asset, run_id, seconds, frames, frames_decoded, frames_per_s, items, realtime_factor,
               details, recorded_at
        FROM stage_metrics ORDER BY recorded_at DESC
        """,
    ),
    # From model version to run to clusters: every clustering ever made, with its base model.
    "clustering_lineage": (
        ("face_clusters", "models"),
        """
        SELECT fc.movie_id, fc.model_version,
               coalesce(m.version, regexp_extract(fc.model_version, '^(.*)-ft-[0-9a-f]{12}$', 1)) AS base_model_version,
               fc.model_version LIKE '%-ft-%' AS finetuned, fc.run_id, min(fc.clustered_at) AS clustered_at,
               count(*) AS tracks, count(DISTINCT fc.cluster) AS clusters, count(*) - count(fc.cluster) AS unknown
        FROM face_clusters fc LEFT JOIN models m ON m.version = fc.model_version
        GROUP BY ALL ORDER BY clustered_at DESC
        """,
    ),
}


#: Columns a release added to a result table, as (table, column, SQL type): added (null in the
#: existing rows) after every write that finds them missing (a warehouse written by an older
#: release), whatever it wrote, so that the views that read them bind before the asset that
#: fills them runs again.
ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("face_clusters", "unknown_reason", "VARCHAR"),
    ("stage_metrics", "frames_decoded", "BIGINT"),
)


#: The share of the machine's memory (or of its cgroup's limit, if lower) that DuckDB may use. The stages
#: that write the warehouse hold the movie's own tables in the same process, so DuckDB's default (80 %)
#: would let one big query push them out.
DUCKDB_MEMORY_SHARE = 0.25


def machine_memory_bytes() -> int:
    """The memory this process can use: the machine's, or its cgroup's limit where that is lower."""
    import psutil

    total = int(psutil.virtual_memory().total)
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            return int(text)
    return total


@functools.cache
def duckdb_settings() -> dict[str, str]:
    """DuckDB's ``memory_limit`` and ``threads`` for this machine (:data:`DUCKDB_MEMORY_SHARE`, usable cores),
    read once per process (every connection uses them)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    mebibytes = max(256, int(machine_memory_bytes() * DUCKDB_MEMORY_SHARE) // 2**20)
    return {"memory_limit": f"{mebibytes}MiB", "threads": str(max(1, cores))}


class WarehouseBusyError(RuntimeError):
    """The database stayed locked by another process for longer than the timeout."""


@dataclass(frozen=True)
class Warehouse:
    """A DuckDB file with the platform's tables.

    Args:
        path: The database file; created with its tables on first write.
        lock_timeout_s: How long a writer waits for other processes.
    """

    path: str
    lock_timeout_s: float = 300.0

    @contextlib.contextmanager
    def writer(self) -> Iterator[Any]:
        """An exclusive read-write connection inside one transaction."""
        import duckdb

        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout_s
        with open(self.path + ".lock", "a+") as lock_file:
            while True:
                try:
                    fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise WarehouseBusyError(
                            f"{self.path}: another writer held the warehouse for {self.lock_timeout_s:.0f} s"
                        )
                    time.sleep(0.05)
            try:
                con = self._connect(duckdb, deadline, read_only=False)
                try:
                    con.execute(_DDL)
                    _add_release_columns(con)
                    con.execute("BEGIN TRANSACTION")
                    try:
                        yield con
                    except BaseException:
                        con.execute("ROLLBACK")
                        raise
                    con.execute("COMMIT")
                    _add_release_columns(con)
                    _create_views(con)
                finally:
                    con.close()
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def reader(self) -> Iterator[Any]:
        """A read-only connection (fails clearly when the database does not exist yet)."""
        import duckdb

        if not Path(self.path).exists():
            raise FileNotFoundError(f"{self.path}: no warehouse yet; process a movie first")
        con = self._connect(duckdb, time.monotonic() + self.lock_timeout_s, read_only=True)
        try:
            yield con
        finally:
            con.close()

    def _connect(self, duckdb, deadline: float, read_only: bool):
        delay = 0.05
        while True:
            try:
                return duckdb.connect(self.path, read_only=read_only, config=dict(duckdb_settings()))
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                    raise WarehouseBusyError(f"{self.path}: {exc}") from exc
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def replace_movie_rows(
        self, table: str, movie_id: str, rows: pl.DataFrame, *, model_version: str | None = None
    ) -> None:
        """Replaces ``table``'s rows of one movie with ``rows`` in one transaction.

        Columns that ``rows`` has and the table lacks (a newer release's output in
        an older warehouse) are added to the table first, null in its other rows.

        Args:
            table: One of :data:`RESULT_TABLES`.
            movie_id: The movie whose rows are replaced; written into ``movie_id``.
            rows: The new rows, with or without a ``movie_id`` column.
            model_version: Required for, and only for, :data:`VERSIONED_TABLES`:
                only that version's rows of the movie are replaced, and it is
                written into ``model_version``.

        Raises:
            ValueError: An unknown table, or ``model_version`` missing for a
                versioned table or given for another.
        """
        if table not in RESULT_TABLES:
            raise ValueError(f"unknown result table {table!r}; known: {', '.join(RESULT_TABLES)}")
        versioned = table in VERSIONED_TABLES
        if versioned and not model_version:
            raise ValueError(f"table {table!r} is kept per model version; pass model_version")
        if not versioned and model_version is not None:
            raise ValueError(
                f"table {table!r} is not kept per model version; model_version applies to {sorted(VERSIONED_TABLES)}"
            )
        stamped = [pl.lit(movie_id, pl.String).alias("movie_id")]
        if versioned:
            stamped.append(pl.lit(model_version, pl.String).alias("model_version"))
        incoming = rows.with_columns(stamped)
        incoming = incoming.select("movie_id", *[c for c in incoming.columns if c != "movie_id"])
        with self.writer() as con:
            con.register("incoming", incoming.to_arrow())
            con.execute(f"CREATE TABLE IF NOT EXISTS {table} AS SELECT * FROM incoming LIMIT 0")
            _add_missing_columns(con, table, "incoming")
            if versioned:
                con.execute(f"DELETE FROM {table} WHERE movie_id = ? AND model_version = ?", [movie_id, model_version])
            else:
                con.execute(f"DELETE FROM {table} WHERE movie_id = ?", [movie_id])
            con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM incoming")
            con.unregister("incoming")

    def record_stage(
        self,
        *,
        asset: str,
        movie_id: str | None,
        run_id: str,
        code_version: str,
        artifact: str | None,
        row_count: int | None,
        started_at: datetime,
        finished_at: datetime,
        seconds: float | None = None,
        frames: int | None = None,
        frames_decoded: int | None = None,
        items: int | None = None,
        video_seconds: float | None = None,
        details: dict | None = None,
    ) -> None:
        """Appends one lineage row and one stage-metrics row; ``seconds`` defaults to the time from start to finish."""
        if seconds is None:
            seconds = (finished_at - started_at).total_seconds()
        fps = frames / seconds if frames and seconds > 0 else None
        realtime = video_seconds / seconds if video_seconds and seconds > 0 else None
        with self.writer() as con:
            con.execute(
                "INSERT INTO lineage VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [asset, movie_id, run_id, code_version, artifact, row_count, started_at, finished_at],
            )
            con.execute(
                "INSERT INTO stage_metrics (movie_id, asset, run_id, seconds, frames, frames_per_s, items, "
                "realtime_factor, details, recorded_at, frames_decoded) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    movie_id,
                    asset,
                    run_id,
                    seconds,
                    frames,
                    fps,
                    items,
                    realtime,
                    json.dumps(details or {}),
                    finished_at,
                    frames_decoded,
                ],
            )

    def record_model(
        self, *, version: str, name: str, checkpoint: str | None, dim: int, input_size: int, template: str
    ) -> None:
        """Adds a face-ID model version to the ``models`` table (first registration time is kept)."""
        with self.writer() as con:
            con.execute(
                "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (version) DO NOTHING",
                [version, name, checkpoint, dim, input_size, template, utcnow()],
            )

    def latest_clustering_run(self, movie_id: str) -> str | None:
        """Run id of the movie's most recent clustering, or None."""
        if not Path(self.path).exists():
            return None
        with self.reader() as con:
            if not _has_columns(con, "face_clusters", set()):
                return None
            row = con.execute(
                "SELECT arg_max(run_id, clustered_at) FROM face_clusters WHERE movie_id = $1", [movie_id]
            ).fetchone()
        return row[0] if row else None

    def latest_clusters(self, movie_id: str) -> dict[int, int]:
        """Track id -> automatic cluster id of the movie's most recent clustering (any model version); Unknown absent.

        Empty when the movie was never clustered (or there is no warehouse yet).
        """
        if not Path(self.path).exists():
            return {}
        with self.reader() as con:
            if not _has_columns(con, "face_clusters", set()):
                return {}
            # The automatic ids (before analysts' edits, which every run applies again on top).
            column = "auto_cluster" if _has_columns(con, "face_clusters", {"auto_cluster"}) else "cluster"
            rows = con.execute(
                f"""
                SELECT track_id, {column} FROM face_clusters
                WHERE movie_id = $1 AND {column} IS NOT NULL AND run_id = (
                    SELECT arg_max(run_id, clustered_at) FROM face_clusters WHERE movie_id = $1
                )
                """,
                [movie_id],
            ).fetchall()
        return {int(track): int(cluster) for track, cluster in rows}

    def cluster_edits(self, movie_id: str) -> list[Edit]:
        """The analysts' edits of a movie, oldest first; none without a warehouse."""
        if not Path(self.path).exists():
            return []
        with self.reader() as con:
            return _edits(con, movie_id) if _has_columns(con, "cluster_edits", set()) else []

    def add_cluster_edit(
        self, movie_id: str, action: str, tracks: list[int], name: str | None = None, note: str | None = None
    ) -> list[str]:
        """Records an analyst's edit and applies all the movie's edits to its latest clustering, in one transaction.

        Pipeline runs never touch ``cluster_edits``; every later clustering applies
        them again (``face_clusters``), so the edit lasts. What the edits do is
        :func:`vcn.clustering.identities.add_edit`'s.

        Returns:
            Edits that could not be applied now, one line each.

        Raises:
            ValueError: An unknown action or a name edit without a name, the
                movie has no clustering, a named track is not one of its
                tracks, or the new edit itself cannot be applied (a merge of
                tracks on screen together, tracks all Unknown).
        """
        new = Edit(action, tuple(tracks), name)
        with self.writer() as con:
            latest = (
                con.sql(
                    """
                SELECT track_id, auto_cluster, run_id FROM face_clusters
                WHERE movie_id = $1 AND run_id = (SELECT arg_max(run_id, clustered_at) FROM face_clusters WHERE movie_id = $1)
                ORDER BY track_id
                """,
                    params=[movie_id],
                ).pl()
                if _has_columns(con, "face_clusters", {"auto_cluster"})
                else None
            )
            if latest is None or latest.is_empty():
                raise ValueError(f"movie {movie_id!r} has no clustering to edit; process it first")
            track_ids = latest["track_id"].to_numpy()
            tracks_table = con.sql(
                "SELECT track_id, shot_id, start_frame, end_frame FROM tracks WHERE movie_id = $1 ORDER BY track_id",
                params=[movie_id],
            ).pl()
            labels, names, skipped = add_edit(
                track_ids,
                latest["auto_cluster"].fill_null(UNKNOWN).to_numpy(),
                _edits(con, movie_id),
                new,
                positions_on_screen_together(tracks_table, track_ids),
            )
            con.execute(
                "INSERT INTO cluster_edits VALUES (?, ?, ?, ?, ?, ?, ?)",
                [uuid.uuid4().hex, movie_id, action, list(new.tracks), name, note, utcnow()],
            )
            con.register("edited", cluster_table(track_ids, labels, names).to_arrow())
            con.execute(
                """
                UPDATE face_clusters SET cluster = edited.cluster, name = edited.name FROM edited
                WHERE face_clusters.movie_id = $1 AND face_clusters.run_id = $2 AND face_clusters.track_id = edited.track_id
                """,
                [movie_id, latest["run_id"][0]],
            )
            con.unregister("edited")
        return skipped

    def query(self, sql: str, params: list | None = None) -> pl.DataFrame:
        """Runs a read-only query and returns the result as a polars frame."""
        with self.reader() as con:
            return con.sql(sql, params=params or None).pl()


def _create_views(con: Any) -> None:
    """(Re)creates each of :data:`VIEWS` whose tables exist, each in its own statement after the data commit.

    A view that does not bind (a warehouse written by an older release, whose
    tables lack a column until the asset that adds it runs again) is left as it
    was, with a warning: views never cost a write.
    """
    import duckdb

    tables = {
        row[0]
        for row in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE'"
        ).fetchall()
    }
    for name, (needs, select) in VIEWS.items():
        if set(needs) <= tables:
            try:
                con.execute(f"CREATE OR REPLACE VIEW {name} AS {select}")
            except duckdb.Error as exc:
                log.warning("warehouse view %s not (re)created: %s", name, exc)


def _edits(con: Any, movie_id: str) -> list[Edit]:
    """The movie's rows of ``cluster_edits`` as :class:`vcn.clustering.identities.Edit`, oldest first."""
    rows = con.execute(
        "SELECT action, tracks, name FROM cluster_edits WHERE movie_id = $1 ORDER BY created_at, edit_id", [movie_id]
    ).fetchall()
    return [Edit(action, tuple(tracks), name) for action, tracks, name in rows]


def _has_columns(con: Any, table: str, columns: set[str]) -> bool:
    """Whether ``table`` exists with (at least) ``columns``; an empty set asks only whether it exists."""
    found = {
        row[0]
        for row in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table]
        ).fetchall()
    }
    return bool(found) and columns <= found


def _add_release_columns(con: Any) -> None:
    """Adds :data:`ADDED_COLUMNS` to those of their tables that exist and lack them."""
    for table, column, kind in ADDED_COLUMNS:
        if _has_columns(con, table, set()) and not _has_columns(con, table, {column}):
            con.execute(f'ALTER TABLE {table} ADD COLUMN "{column}" {kind}')


def _add_missing_columns(con: Any, table: str, source: str) -> None:
    """Adds to ``table`` the columns of ``source`` it lacks, with their types."""
    have = {row[0] for row in con.execute(f"DESCRIBE {table}").fetchall()}
    for name, kind, *_ in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall():
        if name not in have:
            con.execute(f'ALTER TABLE {table} ADD COLUMN "{name}" {kind}')


def utcnow() -> datetime:
    return datetime.now(UTC)
