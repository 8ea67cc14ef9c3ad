"""The ``vcn`` command line.

``vcn process VIDEO`` registers a movie and materialises its asset graph in this
process on the local Dagster instance; ``vcn ui`` serves the Dagster UI on the
same instance; ``vcn sql`` queries the warehouse read-only; ``vcn export``
writes results for other tools.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from vcn.errors import VcnError

EXIT_BAD_INPUT = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vcn", description="VideoClusterNet: group the faces of a movie by identity.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("process", help="register a video as a movie partition and materialise its assets")
    p.add_argument("video", help="path of the video file")
    p.add_argument("--movie-id", help="partition key (default: a slug of the file name)")

    u = sub.add_parser("ui", help="start the Dagster UI (webserver and daemon) on this code location")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=3000)

    q = sub.add_parser("sql", help="run a read-only SQL query on the DuckDB warehouse")
    q.add_argument("query")
    q.add_argument("--format", choices=["table", "csv", "json"], default="table")

    e = sub.add_parser("export", help="write a movie's results as CSV files")
    e.add_argument("movie_id")
    e.add_argument("--out", required=True, help="output folder")

    args = parser.parse_args(argv)
    try:
        return {"process": _process, "ui": _ui, "sql": _sql, "export": _export}[args.command](args)
    except (VcnError, FileNotFoundError, ValueError) as exc:
        print(f"vcn {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _process(args: argparse.Namespace) -> int:
    from vcn.video import probe_video
    from vcn_assets.partitions import movie_slug, validate_movie_id
    from vcn_assets.settings import Settings

    video = Path(args.video)
    info = probe_video(video)  # refuse bad input before anything is registered
    movie_id = validate_movie_id(args.movie_id) if args.movie_id else movie_slug(video.stem)
    settings = Settings.from_env().prepare()

    import dagster as dg

    from vcn_assets.assets.models import BASE_MODEL_FILE, base_model, track_embeddings
    from vcn_assets.assets.preprocess import preprocess_assets
    from vcn_assets.checks import checks
    from vcn_assets.definitions import build_resources
    from vcn_assets.partitions import movies

    resources = build_resources(settings)
    store = resources["store"]
    registered = store.registered_sources().get(movie_id)
    if registered and Path(registered).resolve() != video.resolve():
        raise ValueError(f"movie id {movie_id!r} is already registered for {registered}; pass another --movie-id")
    store.register_movie(movie_id, str(video.resolve()))

    started = time.monotonic()
    log_config = {"loggers": {"console": {"config": {"log_level": os.environ.get("VCN_LOG_LEVEL", "WARNING")}}}}
    with dg.DagsterInstance.get() as instance:
        if store.read_model_json(BASE_MODEL_FILE) is None:
            print("registering the base face-ID model")
            first = dg.materialize([base_model], instance=instance, resources=resources, raise_on_error=False, run_config=log_config)
            if not first.success:
                return _report_failure(first)
        if not instance.has_dynamic_partition(movies.name, movie_id):
            instance.add_dynamic_partitions(movies.name, [movie_id])
        print(f"processing {video} as movie {movie_id!r} ({info.width}x{info.height}, {info.fps:.3f} fps, {info.duration_s:.1f} s)")
        result = dg.materialize(
            [*preprocess_assets, track_embeddings, *checks],
            partition_key=movie_id,
            instance=instance,
            resources=resources,
            raise_on_error=False,
            run_config=log_config,
        )
    if not result.success:
        return _report_failure(result)
    _print_summary(settings, movie_id, result.run_id, time.monotonic() - started)
    return 0


def _report_failure(result) -> int:
    failure = next((e for e in result.all_events if e.is_step_failure), None)
    message = _failure_message(failure.step_failure_data.error) if failure else "see the run log"
    print(f"vcn process: run {result.run_id} failed: {message}", file=sys.stderr)
    return 1


def _failure_message(error) -> str:
    """The innermost cause of a step failure: what went wrong, not where Dagster caught it."""
    if error is None:
        return "see the run log"
    while error.cause is not None:
        error = error.cause
    return error.message.strip()


def _print_summary(settings, movie_id: str, run_id: str, wall_s: float) -> None:
    from vcn.warehouse import Warehouse

    wh = Warehouse(str(settings.warehouse))
    counts = wh.query(
        """
        SELECT
          (SELECT count(*) FROM shots WHERE movie_id = $1) AS shots,
          (SELECT count(*) FROM detections WHERE movie_id = $1) AS faces,
          (SELECT count(*) FROM tracks WHERE movie_id = $1) AS tracks,
          (SELECT count(*) FROM track_crops WHERE movie_id = $1) AS crops,
          (SELECT count(*) FROM track_crops WHERE movie_id = $1 AND NOT rejected) AS kept_crops,
          (SELECT any_value(model_version) FROM track_embeddings WHERE movie_id = $1) AS model_version
        """,
        [movie_id],
    ).row(0, named=True)
    stages = wh.query(
        "SELECT asset, seconds, frames_per_s, realtime_factor FROM stage_metrics WHERE run_id = $1 ORDER BY recorded_at",
        [run_id],
    )
    print(
        f"movie {movie_id}: {counts['shots']} shots, {counts['faces']} faces, {counts['tracks']} tracks, "
        f"{counts['crops']} crops ({counts['kept_crops']} kept), embedded with {counts['model_version']}"
    )
    for asset, seconds, fps, realtime in stages.iter_rows():
        rate = f"{fps:8.1f} frames/s" if fps else " " * 17
        rt = f"{realtime:6.2f}x realtime" if realtime else ""
        print(f"  {asset:<16} {seconds:7.2f} s  {rate}  {rt}")
    print(f"  total            {wall_s:7.2f} s   (run {run_id})")
    print(f"warehouse: {settings.warehouse}")


def _ui(args: argparse.Namespace) -> int:
    from vcn_assets.settings import REPO_ROOT, Settings

    settings = Settings.from_env().prepare()
    command = [
        sys.executable, "-m", "dagster", "dev",
        "-w", str(REPO_ROOT / "workspace.yaml"),
        "--host", args.host, "--port", str(args.port),
    ]
    print(f"Dagster UI on http://{args.host}:{args.port} (instance {os.environ['DAGSTER_HOME']})")
    return subprocess.call(command, cwd=settings.dagster_home)


def _sql(args: argparse.Namespace) -> int:
    from vcn.warehouse import Warehouse
    from vcn_assets.settings import Settings

    import duckdb

    try:
        table = Warehouse(str(Settings.from_env().warehouse)).query(args.query)
    except duckdb.Error as exc:
        print(f"vcn sql: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.format == "csv":
        sys.stdout.write(table.write_csv())
    elif args.format == "json":
        sys.stdout.write(table.write_json() + "\n")
    else:
        import polars as pl

        with pl.Config(tbl_rows=200, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=200):
            print(table)
    return 0


def _export(args: argparse.Namespace) -> int:
    import polars as pl

    from vcn_assets.settings import Settings
    from resources import ArtifactStore

    store = ArtifactStore(base_dir=str(Settings.from_env().artifacts))
    tracked = store.read_parquet(args.movie_id, "face_tracks.parquet")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = tracked.sort("frame", "detection_id").select(
        "frame",
        *[pl.col(c).round(2) for c in ("x1", "y1", "x2", "y2")],
        pl.col("score").round(4),
        "track_id",
    )
    target = out / "detections.csv"
    tmp = out / ".detections.csv.partial"
    table.write_csv(tmp)
    os.replace(tmp, target)
    print(f"wrote {target} ({table.height} detections)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
