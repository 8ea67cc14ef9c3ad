"""The DuckDB warehouse: replace-by-movie, lineage, metrics, one writer at a time."""

from __future__ import annotations

import multiprocessing as mp
from datetime import timedelta

import polars as pl
import pytest

from vcn.stores.warehouse import Warehouse, WarehouseBusyError, utcnow


def test_replace_movie_rows_is_idempotent_and_per_movie(tmp_path):
    wh = Warehouse(str(tmp_path / "w.duckdb"))
    a = pl.DataFrame({"shot_id": [0, 1], "start_frame": [0, 10]})
    wh.replace_movie_rows("shots", "a", a)
    wh.replace_movie_rows("shots", "b", a.head(1))
    wh.replace_movie_rows("shots", "a", a)
    counts = wh.query("SELECT movie_id, count(*) AS n FROM shots GROUP BY movie_id ORDER BY movie_id")
    assert counts.rows() == [("a", 2), ("b", 1)]
    assert wh.query("SELECT * FROM shots LIMIT 1").columns[0] == "movie_id"


def test_versioned_table_replaces_only_its_model_version(tmp_path):
    wh = Warehouse(str(tmp_path / "w.duckdb"))
    rows = pl.DataFrame(
        {"track_id": [0, 1, 2], "cluster": [0, 0, None]}, schema={"track_id": pl.Int64, "cluster": pl.Int64}
    )
    wh.replace_movie_rows("face_clusters", "a", rows, model_version="v1")
    wh.replace_movie_rows("face_clusters", "a", rows.head(2), model_version="v2")
    wh.replace_movie_rows("face_clusters", "b", rows, model_version="v1")
    # Re-clustering movie a with v1 replaces a's v1 rows only.
    wh.replace_movie_rows(
        "face_clusters", "a", rows.with_columns(pl.lit(1, pl.Int64).alias("cluster")), model_version="v1"
    )
    counts = wh.query(
        "SELECT movie_id, model_version, count(*), sum(cluster) FROM face_clusters GROUP BY 1, 2 ORDER BY 1, 2"
    )
    assert counts.rows() == [("a", "v1", 3, 3), ("a", "v2", 2, 0), ("b", "v1", 3, 0)]
    # The version is stamped on the rows, whatever they said.
    wh.replace_movie_rows(
        "face_clusters", "c", rows.with_columns(pl.lit("other").alias("model_version")), model_version="v3"
    )
    assert wh.query("SELECT DISTINCT model_version FROM face_clusters WHERE movie_id = 'c'").item() == "v3"


def test_model_version_is_required_exactly_for_versioned_tables(tmp_path):
    wh = Warehouse(str(tmp_path / "w.duckdb"))
    with pytest.raises(ValueError, match="pass model_version"):
        wh.replace_movie_rows("face_clusters", "a", pl.DataFrame({"track_id": [0]}))
    with pytest.raises(ValueError, match="not kept per model version"):
        wh.replace_movie_rows("shots", "a", pl.DataFrame({"shot_id": [0]}), model_version="v1")


def test_new_columns_are_added_to_an_existing_table(tmp_path):
    wh = Warehouse(str(tmp_path / "w.duckdb"))
    wh.replace_movie_rows("track_embeddings", "old", pl.DataFrame({"track_id": [0, 1]}))
    wh.replace_movie_rows(
        "track_embeddings",
        "new",
        pl.DataFrame({"track_id": [0], "quality": [0.5]}, schema={"track_id": pl.Int64, "quality": pl.Float32}),
    )
    rows = wh.query("SELECT movie_id, track_id, quality FROM track_embeddings ORDER BY movie_id, track_id")
    assert rows.rows() == [("new", 0, 0.5), ("old", 0, None), ("old", 1, None)]
    assert rows.schema["quality"] == pl.Float32


def test_unknown_table_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown result table"):
        Warehouse(str(tmp_path / "w.duckdb")).replace_movie_rows("users; DROP", "a", pl.DataFrame({"x": [1]}))


def test_a_failed_write_changes_nothing(tmp_path):
    wh = Warehouse(str(tmp_path / "w.duckdb"))
    wh.replace_movie_rows("shots", "a", pl.DataFrame({"shot_id": [0, 1]}))
    with pytest.raises(RuntimeError), wh.writer() as con:
        con.execute("DELETE FROM shots")
        raise RuntimeError("crash mid-write")
    assert wh.query("SELECT count(*) FROM shots").item() == 2


def test_record_stage_writes_lineage_and_metrics(tmp_path):
    wh = Warehouse(str(tmp_path / "w.duckdb"))
    t0 = utcnow()
    wh.record_stage(
        asset="frames",
        movie_id="a",
        run_id="r1",
        code_version="0.1.0",
        artifact="/x.parquet",
        row_count=100,
        started_at=t0,
        finished_at=t0 + timedelta(seconds=2),
        frames=100,
        frames_decoded=120,
        items=25,
        video_seconds=4.0,
    )
    lineage = wh.query("SELECT asset, movie_id, run_id, code_version, row_count FROM lineage")
    assert lineage.rows() == [("frames", "a", "r1", "0.1.0", 100)]
    m = wh.query("SELECT seconds, frames_per_s, realtime_factor, items, frames_decoded FROM stage_metrics").row(0)
    assert m == pytest.approx((2.0, 50.0, 2.0, 25, 120))


def test_stage_metrics_of_an_older_release_gain_frames_decoded(tmp_path):
    import duckdb

    path = str(tmp_path / "old.duckdb")
    con = duckdb.connect(path)
    con.execute(
        "CREATE TABLE stage_metrics (movie_id VARCHAR, asset VARCHAR NOT NULL, run_id VARCHAR NOT NULL, seconds DOUBLE, "
        "frames BIGINT, frames_per_s DOUBLE, items BIGINT, realtime_factor DOUBLE, details JSON, recorded_at TIMESTAMPTZ)"
    )
    con.execute("INSERT INTO stage_metrics VALUES ('a', 'shots', 'r0', 1, 10, 10, 1, 1, '{}', now())")
    con.close()
    wh = Warehouse(path)
    t0 = utcnow()
    wh.record_stage(
        asset="shots", movie_id="a", run_id="r1", code_version="0.2.0", artifact=None, row_count=1,
        started_at=t0, finished_at=t0 + timedelta(seconds=1), frames=10, frames_decoded=10,
    )
    rows = wh.query("SELECT run_id, frames_decoded FROM stage_runs ORDER BY run_id").rows()
    assert rows == [("r0", None), ("r1", 10)]


def test_reader_before_any_write_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no warehouse yet"):
        Warehouse(str(tmp_path / "none.duckdb")).query("SELECT 1")


def _writer_process(path: str, movie: str, rounds: int) -> None:
    wh = Warehouse(path)
    for i in range(rounds):
        wh.replace_movie_rows("tracks", movie, pl.DataFrame({"track_id": list(range(i + 1))}))


def test_concurrent_writer_processes_serialise(tmp_path):
    path = str(tmp_path / "w.duckdb")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer_process, args=(path, f"m{i}", 15)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    counts = Warehouse(path).query("SELECT movie_id, count(*) FROM tracks GROUP BY 1 ORDER BY 1")
    assert counts.rows() == [("m0", 15), ("m1", 15), ("m2", 15)]


def test_writer_gives_up_with_a_clear_error_when_the_lock_is_held(tmp_path):
    import fcntl

    path = str(tmp_path / "w.duckdb")
    with open(path + ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_busy_writer, args=(path, q))
        p.start()
        p.join(60)
    assert "another writer" in q.get(timeout=5)


def _busy_writer(path: str, q) -> None:
    try:
        Warehouse(path, lock_timeout_s=0.5).replace_movie_rows("shots", "a", pl.DataFrame({"x": [1]}))
        q.put("no error")
    except WarehouseBusyError as exc:
        q.put(str(exc))


def _tracks(n: int, fps_offset: float = 0.0) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "track_id": list(range(n)),
            "shot_id": [0] * n,
            "start_frame": [10 * i for i in range(n)],
            "end_frame": [10 * i + 9 for i in range(n)],
            "start_s": [0.4 * i + fps_offset for i in range(n)],
            "end_s": [0.4 * i + 0.4 + fps_offset for i in range(n)],
            "n_detections": [4] * n,
        }
    )


def _clusters(clusters: list[int | None], run_id: str, at_minutes: int) -> pl.DataFrame:
    n = len(clusters)
    return pl.DataFrame(
        {
            "track_id": list(range(n)),
            "cluster": clusters,
            "name": [None] * n,
            "auto_cluster": clusters,
            "quality": [0.5 + 0.01 * i for i in range(n)],
            "low_quality": [False] * n,
            "run_id": [run_id] * n,
            "clustered_at": [utcnow() + timedelta(minutes=at_minutes)] * n,
            "thumbnail": [f"/thumbs/{i}.jpg" for i in range(n)],
        },
        schema_overrides={"cluster": pl.Int64, "auto_cluster": pl.Int64, "name": pl.String},
    )


def test_views_give_people_tracks_and_lineage_of_the_latest_clustering(tmp_path):
    wh = Warehouse(str(tmp_path / "w.duckdb"))
    wh.record_model(
        version="base-v1", name="dlib-resnet", checkpoint=None, dim=128, input_size=150, template="dlib-150"
    )
    wh.replace_movie_rows("tracks", "a", _tracks(4))
    # An older clustering by the base model, then a newer one by its finetuned version.
    wh.replace_movie_rows("face_clusters", "a", _clusters([0, 0, 0, 0], "r1", 0), model_version="base-v1")
    wh.replace_movie_rows(
        "face_clusters", "a", _clusters([0, 1, 0, None], "r2", 5), model_version="base-v1-ft-0123456789ab"
    )

    tracks = wh.query("SELECT track_id, cluster, duration_s, thumbnail, run_id FROM track_clusters ORDER BY track_id")
    assert tracks["cluster"].to_list() == [0, 1, 0, None] and set(tracks["run_id"]) == {"r2"}
    assert tracks["duration_s"].to_list() == pytest.approx([0.4] * 4)
    people = wh.query(
        "SELECT cluster, tracks, screen_time_s, first_seen_s, last_seen_s, thumbnail FROM people ORDER BY cluster"
    )
    assert people["cluster"].to_list() == [0, 1] and people["tracks"].to_list() == [2, 1]
    assert people["screen_time_s"].to_list() == pytest.approx([0.8, 0.4])
    assert people["first_seen_s"].to_list() == pytest.approx([0.0, 0.4])
    assert people["last_seen_s"].to_list() == pytest.approx([1.2, 0.8])
    assert people["thumbnail"].to_list() == ["/thumbs/2.jpg", "/thumbs/1.jpg"]  # the best-quality track's
    lineage = wh.query(
        "SELECT model_version, base_model_version, finetuned, run_id, tracks, clusters, unknown FROM clustering_lineage"
    )
    assert lineage.rows() == [
        ("base-v1-ft-0123456789ab", "base-v1", True, "r2", 4, 2, 1),
        ("base-v1", "base-v1", False, "r1", 4, 1, 0),
    ]
    assert wh.query("SELECT count(*) FROM stage_runs").item() == 0


def test_views_wait_for_their_tables_and_never_cost_a_write(tmp_path):
    wh = Warehouse(str(tmp_path / "w.duckdb"))
    wh.replace_movie_rows("tracks", "a", _tracks(2))  # no face_clusters yet: no cluster views, no error
    views = wh.query("SELECT table_name FROM information_schema.tables WHERE table_type = 'VIEW'")[
        "table_name"
    ].to_list()
    assert "people" not in views and "stage_runs" in views
    # A face_clusters table from an older release (no thumbnail column): the write still lands.
    old = pl.DataFrame({"track_id": [0], "cluster": [0], "run_id": ["r"], "clustered_at": [utcnow()]})
    wh.replace_movie_rows("face_clusters", "a", old, model_version="v0")
    assert wh.query("SELECT count(*) FROM face_clusters").item() == 1


def test_a_warehouse_without_unknown_reasons_gains_the_column_at_its_next_write(tmp_path):
    """A DuckDB file written before ``unknown_reason`` existed: any write adds it, and the track view shows it."""
    import duckdb

    path = str(tmp_path / "w.duckdb")
    wh = Warehouse(path)
    wh.replace_movie_rows("tracks", "old", _tracks(2))
    old = _clusters([0, None], "r0", 0)
    wh.replace_movie_rows("face_clusters", "old", old, model_version="v0")
    with duckdb.connect(path) as con:  # as an older release left it: no unknown_reason column
        con.execute("DROP VIEW IF EXISTS people")
        con.execute("DROP VIEW IF EXISTS track_clusters")
        con.execute("ALTER TABLE face_clusters DROP COLUMN unknown_reason")
    # A write that does not touch face_clusters (another movie's tracks) adds the column, so the views bind.
    wh.replace_movie_rows("tracks", "new", _tracks(1))
    rows = wh.query(
        "SELECT track_id, cluster, unknown_reason FROM track_clusters WHERE movie_id = 'old' ORDER BY track_id"
    )
    assert rows.rows() == [(0, 0, None), (1, None, None)]
    assert wh.query("SELECT count(*) FROM people").item() == 1
    # A new clustering writes its reasons beside the old rows.
    new = _clusters([0, None], "r1", 5).with_columns(pl.Series("unknown_reason", [None, "low_quality"], pl.String))
    wh.replace_movie_rows("face_clusters", "old", new, model_version="v1")
    rows = wh.query("SELECT track_id, unknown_reason FROM track_clusters WHERE movie_id = 'old' ORDER BY track_id")
    assert rows.rows() == [(0, None), (1, "low_quality")]
    assert wh.query("SELECT count(*) FROM face_clusters WHERE unknown_reason IS NULL").item() == 3


def test_readers_run_while_another_process_writes(tmp_path):
    path = str(tmp_path / "w.duckdb")
    wh = Warehouse(path)
    wh.replace_movie_rows("tracks", "m-first", _tracks(3))
    ctx = mp.get_context("spawn")
    writer = ctx.Process(target=_writer_process, args=(path, "m-new", 40))
    writer.start()
    seen = []
    while writer.is_alive():
        seen.append(wh.query("SELECT count(*) FROM tracks").item())
    writer.join(120)
    assert writer.exitcode == 0
    assert seen and min(seen) >= 3 and seen == sorted(seen)  # every read saw a committed state, never less
    assert wh.query("SELECT count(*) FROM tracks WHERE movie_id = 'm-new'").item() == 40


def test_an_analyst_edit_is_recorded_and_applied_to_the_latest_clustering(tmp_path):
    wh = Warehouse(str(tmp_path / "w.duckdb"))
    with pytest.raises(ValueError, match="no clustering to edit"):
        wh.add_cluster_edit("a", "merge", [0, 1])
    tracks = _tracks(4).with_columns(pl.Series("end_frame", [9, 25, 29, 39]))  # tracks 1 and 2 overlap
    wh.replace_movie_rows("tracks", "a", tracks)
    wh.replace_movie_rows("face_clusters", "a", _clusters([0, 1, 2, None], "r1", 0), model_version="v1")

    def state():
        return wh.query("SELECT track_id, cluster, name FROM face_clusters ORDER BY track_id").rows()

    assert wh.add_cluster_edit("a", "merge", [0, 1], note="same man") == []
    assert wh.add_cluster_edit("a", "name", [1], "Ann") == []
    assert state() == [(0, 0, "Ann"), (1, 0, "Ann"), (2, 2, None), (3, None, None)]
    with pytest.raises(ValueError, match="on screen together"):
        wh.add_cluster_edit("a", "merge", [1, 2])
    with pytest.raises(ValueError, match=r"no tracks \[7\]"):
        wh.add_cluster_edit("a", "split", [7])
    with pytest.raises(ValueError, match="unknown edit action"):
        wh.add_cluster_edit("a", "rename", [1], "Bo")
    assert [(e.action, e.tracks, e.name) for e in wh.cluster_edits("a")] == [
        ("merge", (0, 1), None),
        ("name", (1,), "Ann"),
    ]
    assert state() == [(0, 0, "Ann"), (1, 0, "Ann"), (2, 2, None), (3, None, None)]


def test_connections_take_memory_limit_and_threads_from_the_machine(tmp_path):
    import os

    from vcn.stores.warehouse import DUCKDB_MEMORY_SHARE, duckdb_settings, machine_memory_bytes

    settings = duckdb_settings()
    assert settings["threads"] == str(len(os.sched_getaffinity(0)))
    mebibytes = int(machine_memory_bytes() * DUCKDB_MEMORY_SHARE) // 2**20
    assert settings["memory_limit"] == f"{mebibytes}MiB"
    wh = Warehouse(str(tmp_path / "w.duckdb"))
    with wh.writer() as con:
        limit, threads = con.execute("SELECT current_setting('memory_limit'), current_setting('threads')").fetchone()
    # DuckDB reports the limit in its own units, to a tenth (of a GiB, here).
    reported = float(limit.split()[0]) * {"MiB": 1, "GiB": 1024}[limit.split()[1]]
    assert abs(reported - mebibytes) <= 103
    assert threads == int(settings["threads"])
    with wh.reader() as con:
        assert con.execute("SELECT current_setting('threads')").fetchone()[0] == int(settings["threads"])
