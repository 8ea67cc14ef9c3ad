"""The ``vcn`` command line.

``vcn process VIDEO`` registers a movie and materialises its asset graph in this
process on the local Dagster instance; ``vcn ui`` serves the Dagster UI on the
same instance; ``vcn sql`` queries the warehouse read-only; ``vcn export``
writes results for other tools. ``vcn cluster-tracks DIR`` clusters the tracks of
a track dataset (format v1) and ``vcn evaluate`` scores a prediction against labels.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from vcn.errors import VcnError, VideoError
from vcn.stores.files import atomic_path
from vcn_assets import artifacts

if TYPE_CHECKING:
    from vcn.cluster_tracks import TracksetClustering

EXIT_BAD_INPUT = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vcn", description="VideoClusterNet: group the faces of a movie by identity.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("process", help="register a video as a movie partition and materialise its assets")
    p.add_argument("video", help="path of the video file")
    p.add_argument("--movie-id", help="partition key (default: a slug of the file name)")
    p.add_argument(
        "--force", action="store_true",
        help="recompute every asset (default: keep the assets that are current and resume from the first that is not)",
    )

    u = sub.add_parser("ui", help="start the Dagster UI (webserver and daemon) on this code location")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=3000)

    q = sub.add_parser("sql", help="run a read-only SQL query on the DuckDB warehouse")
    q.add_argument("query")
    q.add_argument("--format", choices=["table", "csv", "json"], default="table")

    e = sub.add_parser(
        "export",
        help="write a movie's results as CSV files: detections.csv (a box on every frame of every track; detected "
        "0 where it is interpolated between two detections) and clusters.csv (a cluster per track)",
    )
    e.add_argument("movie_id")
    e.add_argument("--out", required=True, help="output folder")

    pv = sub.add_parser(
        "preview",
        help="render the movie (at most 720p) with each track's box and its cluster's number or analyst name",
    )
    pv.add_argument("movie_id")
    pv.add_argument("--out", required=True, metavar="FILE.mp4", help="the video to write (H.264 in MP4)")

    c = sub.add_parser(
        "cluster-tracks",
        help="cluster the face tracks of a track dataset (format v1) by identity",
        description="Cluster the face tracks of a track dataset (shared/formats/trackset-v1.md: tracks.csv, "
        "crops.csv) and write one track_id,cluster row per track; an empty cluster is a track left Unknown. "
        "labels.csv, if present, is never read by the clustering.",
    )
    c.add_argument("directory", metavar="DIR", help="track dataset folder (tracks.csv, crops.csv)")
    c.add_argument("--out", required=True, metavar="PRED_CSV", help="prediction CSV to write (track_id,cluster)")
    c.add_argument(
        "--no-cannot-link",
        action="store_true",
        help="let tracks on screen together (same shot, overlapping frames) share a cluster, as the paper does",
    )
    c.add_argument(
        "--report",
        metavar="REPORT_DIR",
        help="also write the cluster report (contact sheet, embedding plot, HTML) into this folder; if the dataset "
        "has a labels.csv, its identities colour the report only, after clustering, never the clustering itself",
    )
    c.add_argument("--device", choices=["cpu", "cuda"], help="where the face-ID model runs (default: cuda if available)")
    c.add_argument(
        "--similarity",
        choices=["loss", "cosine"],
        help="how crops are compared: cosine between the (finetuned) embeddings (default), or the finetuned "
        "model's own loss, the paper's metric, read as a divergence between tracks (see the README)",
    )
    c.add_argument(
        "--no-finetune",
        action="store_true",
        help="cluster with the pretrained model, without adapting it to the dataset first (implies cosine)",
    )
    c.add_argument("--seed", type=int, default=0, help="seed of the finetuning (default 0); same seed, same result on CPU")
    c.add_argument("--backbone", help="base face-ID model: dlib-resnet, sface, iresnet18/34/50/100, onnx (default: a new "
                   "install's)")
    c.add_argument("--checkpoint", help="its weights, a path or s3:// URI (needed for iresnet and onnx)")

    v = sub.add_parser("evaluate", help="score a track clustering against ground-truth labels (WCP, PCR, BCubed, ...)")
    v.add_argument("labels", help="ground truth CSV: track_id,identity")
    v.add_argument("pred", help="prediction CSV: track_id,cluster (empty cluster = Unknown)")
    v.add_argument("--json", metavar="OUT_JSON", help="also write the scores as JSON to this file")
    v.add_argument("--format", choices=["table", "json"], default="table", help="what to print on stdout")

    mo = sub.add_parser("model", help="the base face-ID model: register a new one, list them, re-cluster after a change")
    mact = mo.add_subparsers(dest="action", required=True)
    reg = mact.add_parser("register", help="make a model the base model of every movie (their clusters go stale)")
    reg.add_argument("--name", help="backbone: dlib-resnet, sface, iresnet18/34/50/100, onnx (default: a new install's)")
    reg.add_argument("--checkpoint", help="weights: a path or s3:// URI (dlib-resnet: its .dat or a state dict)")
    mact.add_parser("list", help="registered models, the current one last")
    mact.add_parser("recluster", help="re-cluster now, in this process, every movie clustered with an older base model")

    lab = sub.add_parser(
        "label",
        help="name, merge or split a movie's clusters; kept in their own table, applied by every later clustering",
    )
    what = lab.add_subparsers(dest="action", required=True)
    n = what.add_parser("name", help="give a cluster (person) a name")
    n.add_argument("movie_id")
    n.add_argument("cluster", type=int)
    n.add_argument("name")
    m = what.add_parser("merge", help="these clusters are one person")
    m.add_argument("movie_id")
    m.add_argument("clusters", type=int, nargs="+", metavar="CLUSTER")
    sp = what.add_parser("split", help="these tracks are one person, apart from the rest of their clusters")
    sp.add_argument("movie_id")
    sp.add_argument("tracks", type=int, nargs="+", metavar="TRACK")
    ls = what.add_parser("list", help="the movie's edits, oldest first")
    ls.add_argument("movie_id")
    for parser_ in (n, m, sp):
        parser_.add_argument("--note", help="why (stored with the edit)")

    args = parser.parse_args(argv)
    try:
        return {
            "process": _process,
            "ui": _ui,
            "sql": _sql,
            "export": _export,
            "preview": _preview,
            "cluster-tracks": _cluster_tracks,
            "evaluate": _evaluate,
            "label": _label,
            "model": _model,
        }[args.command](args)
    except (VcnError, OSError, ValueError) as exc:
        print(f"vcn {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _process(args: argparse.Namespace) -> int:
    from vcn.media import probe_video
    from vcn.stores.objectstore import is_s3_uri
    from vcn_assets.partitions import movie_slug, validate_movie_id
    from vcn_assets.settings import Settings

    remote = is_s3_uri(args.video)
    video = PurePosixPath(args.video[len("s3://"):]) if remote else Path(args.video)
    movie_id = validate_movie_id(args.movie_id) if args.movie_id else movie_slug(video.stem)
    if not remote:
        info = probe_video(video)  # refuse bad input before anything is registered
    settings = Settings.from_env().prepare()

    import dagster as dg

    from resources import MovieRegistry
    from vcn import progress
    from vcn.stores.warehouse import Warehouse
    from vcn_assets.assets.models import base_model
    from vcn_assets.assets.recording import CODE_VERSION
    from vcn_assets.definitions import build_definitions
    from vcn_assets.jobs import process_movie_job
    from vcn_assets.partitions import movies
    from vcn_assets.resume import fail_orphaned_runs, plan, process_tags

    defs = build_definitions(settings)
    resources = defs.resources
    store = resources["store"]
    store.check()  # a missing bucket or rejected credentials stop here, before anything is written
    registry = MovieRegistry(store)
    source = args.video if remote else str(video.resolve())
    if remote:
        try:
            info = probe_video(registry.fetch(movie_id, source))
        except VideoError as error:  # name the object, not its copy in the cache
            raise type(error)(source, error.reason) from None
    previous = registry.record(movie_id)
    if previous and previous.source != source:
        raise ValueError(f"movie id {movie_id!r} is already registered for {previous.source}; pass another --movie-id")
    record = registry.register(movie_id, source)

    started = time.monotonic()
    log_config = {"loggers": {"console": {"config": {"log_level": os.environ.get("VCN_LOG_LEVEL", "WARNING")}}}}
    with settings.instance() as instance:
        for run_id in fail_orphaned_runs(instance, movie_id):
            print(f"run {run_id} of movie {movie_id!r} was interrupted (its process is gone): marked as failed")
        if store.read_model_json(artifacts.BASE_MODEL) is None:
            print("registering the base face-ID model")
            first = dg.materialize([base_model], instance=instance, resources=resources, raise_on_error=False, run_config=log_config)
            if not first.success:
                return _report_failure(first)
        if not instance.has_dynamic_partition(movies.name, movie_id):
            instance.add_dynamic_partitions(movies.name, [movie_id])
        print(f"processing {video} as movie {movie_id!r} ({info.width}x{info.height}, {info.fps:.3f} fps, {info.duration_s:.1f} s)")
        changed = previous is not None and previous.stamp != record.stamp
        todo = plan(instance, store, movie_id, code_version=CODE_VERSION, template=resources["backbone"].template(),
                    video_changed=changed, force=args.force)
        if todo.kept:
            print(f"kept (current): {', '.join(todo.kept)}" + (f"; resuming at {todo.run[0]}: {todo.reason}" if todo.run else ""))
        if not todo.run:
            print("every asset of the movie is current; --force recomputes them")
            run_id = Warehouse(str(settings.warehouse)).latest_clustering_run(movie_id)
        else:
            # The job the inbox launches, on the assets that are not current (and their checks); its stages
            # show their progress here too (bars on a terminal, else a line every 30 s).
            with progress.console(progress.console_sinks()):
                result = defs.resolve_job_def(process_movie_job.name).execute_in_process(
                    run_config=log_config,
                    instance=instance,
                    partition_key=movie_id,
                    raise_on_error=False,
                    asset_selection=[dg.AssetKey(name) for name in todo.run],
                    tags=process_tags(),
                )
            if not result.success:
                return _report_failure(result)
            run_id = result.run_id
    _print_summary(settings, movie_id, run_id, time.monotonic() - started)
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
    from vcn.stores.warehouse import Warehouse

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
    clusters = wh.query(
        "SELECT cluster, count(*) AS n FROM face_clusters WHERE movie_id = $1 AND run_id = $2 GROUP BY cluster ORDER BY n DESC, cluster",
        [movie_id, run_id],
    )
    sizes = clusters.filter(clusters["cluster"].is_not_null())["n"].to_list()
    unknown = int(clusters.filter(clusters["cluster"].is_null())["n"].sum())
    print(
        f"movie {movie_id}: {counts['shots']} shots, {counts['faces']} faces, {counts['tracks']} tracks, "
        f"{counts['crops']} crops ({counts['kept_crops']} kept), embedded with {counts['model_version']}"
    )
    finetuned = wh.query(
        "SELECT details FROM stage_metrics WHERE run_id = $1 AND asset = 'finetuned_model'", [run_id]
    )
    if finetuned.height:
        details = json.loads(finetuned["details"][0]) if isinstance(finetuned["details"][0], str) else finetuned["details"][0]
        if details.get("enabled"):
            print(f"finetuned {details['base_version']} -> {details['version']} ({details.get('mode')})")
        else:
            print("not finetuned: the pretrained model embedded the crops")
    shown = ", ".join(map(str, sizes[:20])) + (f", ... ({len(sizes) - 20} more)" if len(sizes) > 20 else "")
    print(f"clusters: {len(sizes)} (tracks per cluster, largest first: {shown or '-'}); Unknown: {unknown} tracks")
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
    # Its own session, so that a stop reaches Dagster's webserver, daemon and code servers together.
    child = subprocess.Popen(command, cwd=settings.dagster_home, start_new_session=True)
    return _supervise(child)


#: Seconds ``vcn ui`` gives Dagster to stop its webserver and daemon after SIGTERM or Ctrl-C before killing
#: them: their graceful shutdown can take a minute on a loaded 2-core machine, and a stop must take seconds.
UI_STOP_GRACE_S = 6.0


def _supervise(child: subprocess.Popen) -> int:
    """Waits for ``child`` (the leader of its own process group); on SIGTERM or SIGINT stops the whole group:
    SIGTERM first, SIGKILL after :data:`UI_STOP_GRACE_S`. Returns the child's exit code, 0 after a requested stop."""
    import signal

    import psutil

    requested: list[float] = []
    # Dagster's code servers may run in sessions of their own: every descendant is stopped, not only the group.
    descendants: list[psutil.Process] = []

    def stop(signum, frame) -> None:
        if not requested:
            requested.append(time.monotonic())
            try:
                descendants.extend(psutil.Process(child.pid).children(recursive=True))
            except psutil.Error:
                pass
            _signal_group(child.pid, signal.SIGTERM)
            for process in descendants:
                _signal_process(process, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                code = child.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if requested and time.monotonic() - requested[0] > UI_STOP_GRACE_S:
                    _signal_group(child.pid, signal.SIGKILL)
    finally:
        # Whatever the group still holds (a daemon or code server outliving its parent) goes with it.
        _signal_group(child.pid, signal.SIGKILL)
        for process in descendants:
            _signal_process(process, signal.SIGKILL)
        psutil.wait_procs(descendants, timeout=2)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if requested:
        print("vcn ui: stopped")
        return 0
    return code


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_process(process, sig: int) -> None:
    """Signals a :class:`psutil.Process` unless it is gone (psutil checks that its pid was not reused)."""
    import psutil

    try:
        process.send_signal(sig)
    except psutil.Error:
        pass


def _sql(args: argparse.Namespace) -> int:
    import duckdb

    from vcn.stores.warehouse import Warehouse
    from vcn_assets.settings import Settings

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


def _movie_results(movie_id: str):
    """(artifact store, tracked detections, latest clustering) of a processed movie."""
    from vcn_assets.definitions import build_resources
    from vcn_assets.settings import Settings

    store = build_resources(Settings.from_env())["store"]
    return (
        store,
        store.read_parquet(movie_id, artifacts.TRACKED_DETECTIONS),
        store.read_parquet(movie_id, artifacts.FACE_CLUSTERS),
    )


def _export(args: argparse.Namespace) -> int:
    import polars as pl

    from vcn.faces.tracking import boxes_every_frame

    _, tracked, clusters = _movie_results(args.movie_id)
    # The latest clustering of the movie (its current model version); an empty cluster is Unknown, and
    # unknown_reason says why (empty for a clustering made before the column existed).
    if "unknown_reason" not in clusters.columns:
        clusters = clusters.with_columns(pl.lit(None, pl.String).alias("unknown_reason"))
    clusters = clusters.select("track_id", "cluster", "unknown_reason").sort("track_id")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Every frame of every track: detected 1 where the detector ran, 0 where the box is interpolated.
    detections = boxes_every_frame(tracked).select(
        "frame",
        *[pl.col(c).round(2) for c in ("x1", "y1", "x2", "y2")],
        pl.col("score").round(4),
        "track_id",
        "detected",
    )
    n_detected = int(detections["detected"].sum())
    for name, table, what in (
        ("detections.csv", detections, f"boxes, {n_detected} of them detected, the rest interpolated"),
        ("clusters.csv", clusters, "tracks"),
    ):
        target = out / name
        with atomic_path(target, suffix=".partial") as temporary:
            table.write_csv(temporary)
        print(f"wrote {target} ({table.height} {what})")
    return 0


def _preview(args: argparse.Namespace) -> int:
    from vcn.faces.tracking import boxes_every_frame
    from vcn.media.preview import TrackLabel, render_preview
    from vcn.progress import Progress, console_sinks
    from resources import MovieRegistry

    store, tracked, clusters = _movie_results(args.movie_id)
    names = clusters["name"] if "name" in clusters.columns else [None] * clusters.height
    labels = {
        int(track): TrackLabel(None if cluster is None else int(cluster), name)
        for track, cluster, name in zip(clusters["track_id"], clusters["cluster"], names)
    }
    source = MovieRegistry(store).local_source(args.movie_id)
    print(f"rendering {args.movie_id} from {source} ...")
    with Progress("preview", console_sinks()).meter("frames rendered", "frames") as meter:
        report = render_preview(source, args.out, boxes_every_frame(tracked), labels, progress=meter)
    print(
        f"wrote {report.path} ({report.frames} frames, {report.width}x{report.height}, "
        f"{report.boxes_drawn} boxes)"
    )
    return 0


def _cluster_tracks(args: argparse.Namespace) -> int:
    import logging

    from vcn.cluster_tracks import cluster_trackset
    from vcn.formats.trackset import write_predictions

    if os.environ.get("VCN_LOG_LEVEL"):  # e.g. INFO for progress; warnings show without it
        logging.basicConfig(level=os.environ["VCN_LOG_LEVEL"], format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the path of the CSV file to write")

    # Nothing is written before the clustering has succeeded.
    backbone = None
    if args.backbone or args.checkpoint:
        from vcn.identity.backbone import DEFAULT_BACKBONE, load_backbone

        backbone = load_backbone(args.backbone or DEFAULT_BACKBONE, args.checkpoint, device=args.device)
    result = cluster_trackset(
        args.directory, backbone=backbone, cannot_link=not args.no_cannot_link, device=args.device,
        finetune=not args.no_finetune, similarity=args.similarity or "cosine", seed=args.seed,
    )
    for problem in result.problems:
        print(f"vcn cluster-tracks: warning: track {problem.track_id!r} left Unknown: {problem.reason}", file=sys.stderr)
    write_predictions(out, result.track_ids, result.clusters)

    n_problem = len(result.problem_track_ids)
    methods = ", ".join(f"{count} {method}" for method, count in result.crops_by_method.items())
    steps = ", ".join(f"{step} {seconds:.2f}" for step, seconds in result.timings.items())
    print(
        f"{len(result.track_ids)} tracks: {len(result.track_ids) - result.n_unknown} in {result.n_clusters} clusters, "
        f"{result.n_unknown} Unknown ({result.n_low_quality} low quality, {n_problem} with problems)"
    )
    print(f"{result.n_crops} crops aligned: {methods}")
    print(
        f"model {result.model_version}, {result.dissimilarity} dissimilarity, "
        f"cannot-link {'off' if args.no_cannot_link else 'on'}"
    )
    if result.finetuned:
        ft = result.finetuned
        final_loss = ft.collapse.final_loss if ft.collapse else float("nan")
        print(
            f"finetuned {ft.base_version} -> {ft.version} ({ft.mode}): {len(ft.history.rounds)} round(s), "
            f"{ft.history.pairs_per_second:.0f} pairs/s, final loss {final_loss:.3f}"
        )
        for problem in ft.collapse.problems() if ft.collapse else []:
            print(f"vcn cluster-tracks: warning: finetuning may have collapsed: {problem}", file=sys.stderr)
        if ft.steps_aside and result.model_version != ft.version:
            print(f"the pretrained model embedded the crops: {ft.steps_aside}")
    elif result.not_finetuned and not args.no_finetune:
        print(f"not finetuned: {result.not_finetuned}")
    print(f"seconds: {steps} (total {sum(result.timings.values()):.2f})")
    print(f"wrote {out}")
    if args.report:
        _write_trackset_report(Path(args.directory), Path(args.report), result)
    return 0


def _write_trackset_report(directory: Path, out_dir: Path, result: TracksetClustering) -> None:
    """The cluster report of the tracks that took part; labels.csv only colours it."""
    from vcn.clustering.report import write_cluster_report
    from vcn.formats.trackset import LABELS_FILE, TracksetError, read_trackset_labels

    labels = None
    if (directory / LABELS_FILE).is_file():
        try:
            labels = read_trackset_labels(directory)
        except TracksetError as exc:
            print(f"vcn cluster-tracks: warning: report without identities: {exc}", file=sys.stderr)
    shown = [i for i, has in enumerate(result.has_crops) if has]
    report = write_cluster_report(
        out_dir,
        title=directory.resolve().name,
        track_ids=[result.track_ids[i] for i in shown],
        clusters=[result.clusters[i] for i in shown],
        thumbnails=result.thumbnails,
        embeddings=result.embeddings[shown],
        identities=None if labels is None else [labels.get(result.track_ids[i], "(no label)") for i in shown],
    )
    left_out = len(result.track_ids) - len(shown)
    note = f" ({left_out} problem tracks without crops not shown)" if left_out else ""
    print(f"wrote report {report.html}{note}")


def _model(args: argparse.Namespace) -> int:
    import dagster as dg

    from resources import BackboneResource
    from vcn.stores.warehouse import Warehouse
    from vcn_assets.assets.models import base_model
    from vcn_assets.definitions import build_definitions
    from vcn_assets.jobs import MODEL_POOL_TAG, recluster_run
    from vcn_assets.partitions import movies
    from vcn_assets.resume import crops_template
    from vcn_assets.sensors import stale_movies
    from vcn_assets.settings import Settings

    settings = Settings.from_env().prepare()
    defs = build_definitions(settings)
    resources = defs.resources
    store = resources["store"]
    if args.action == "list":
        print(Warehouse(str(settings.warehouse)).query("SELECT * FROM models ORDER BY registered_at"))
        current = store.read_model_json(artifacts.BASE_MODEL)
        print(f"current base model: {current['version'] if current else 'none registered'}")
        return 0
    log_config = {"loggers": {"console": {"config": {"log_level": os.environ.get("VCN_LOG_LEVEL", "WARNING")}}}}
    with settings.instance() as instance:
        movie_ids = instance.get_dynamic_partitions(movies.name)
        if args.action == "register":
            before = store.read_model_json(artifacts.BASE_MODEL)
            from vcn.identity.backbone import DEFAULT_BACKBONE

            backbone = BackboneResource(
                name=args.name or DEFAULT_BACKBONE, checkpoint=args.checkpoint, registry=resources["backbone"].registry
            )
            backbone.load()  # refuse a bad checkpoint before anything is recorded
            result = dg.materialize(
                [base_model], instance=instance, resources={**resources, "backbone": backbone}, raise_on_error=False,
                run_config=log_config,
            )
            if not result.success:
                return _report_failure(result)
            after = store.read_model_json(artifacts.BASE_MODEL)
            _, stale = stale_movies(store, resources["warehouse"], movie_ids)
            was = before["version"] if before else "none"
            print(f"registered {after['name']} {after['version']} as the base model (was {was})")
            print(f"{len(stale)} movie(s) clustered with an older model: {', '.join(stale) or '-'}; the model_update "
                  "sensor re-clusters them (vcn ui), or run `vcn model recluster` now")
            return 0
        # recluster: the runs the model_update sensor would request, executed here one after the other
        version, stale = stale_movies(store, resources["warehouse"], movie_ids)
        if not stale:
            print(f"every clustered movie is on base model {version}")
            return 0
        template = store.read_model_json(artifacts.BASE_MODEL)["template"]
        for movie_id in stale:
            started = time.monotonic()
            run = recluster_run(crops_template(instance, movie_id), template)
            if run.asset_selection is not None:
                print(f"{movie_id}: the new model takes {template} crops; realigning them first")
            result = defs.resolve_job_def(run.job_name).execute_in_process(
                run_config=log_config, instance=instance, partition_key=movie_id, raise_on_error=False,
                asset_selection=run.asset_selection, tags={**MODEL_POOL_TAG, "vcn/base_model": version},
            )
            if not result.success:
                return _report_failure(result)
            print(f"re-clustered {movie_id} on {version} in {time.monotonic() - started:.1f} s (run {result.run_id})")
    return 0


def _label(args: argparse.Namespace) -> int:
    from vcn.stores.warehouse import Warehouse
    from vcn_assets.settings import Settings

    wh = Warehouse(str(Settings.from_env().warehouse))
    if args.action == "list":
        edits = wh.query(
            "SELECT created_at, action, tracks, name, note FROM cluster_edits WHERE movie_id = $1 ORDER BY created_at",
            [args.movie_id],
        )
        print(edits if edits.height else f"movie {args.movie_id!r} has no edits")
        return 0
    if args.action == "split":
        tracks = args.tracks
    else:
        clusters = [args.cluster] if args.action == "name" else args.clusters
        if args.action == "merge" and len(set(clusters)) < 2:
            raise ValueError("merge needs at least two different clusters")
        found = wh.query(
            "SELECT cluster, list(track_id ORDER BY track_id) AS tracks FROM latest_clusters "
            "WHERE movie_id = $1 AND cluster IN (SELECT unnest($2::BIGINT[])) GROUP BY cluster",
            [args.movie_id, clusters],
        )
        missing = sorted(set(clusters) - set(found["cluster"].to_list()))
        if missing:
            raise ValueError(f"movie {args.movie_id!r} has no clusters {missing} in its latest clustering")
        tracks = sorted(t for ts in found["tracks"].to_list() for t in ts)
    skipped = wh.add_cluster_edit(args.movie_id, args.action, tracks, getattr(args, "name", None), args.note)
    for line in skipped:
        print(f"vcn label: warning: an earlier edit no longer applies: {line}", file=sys.stderr)
    people = wh.query(
        "SELECT cluster, name, tracks FROM people WHERE movie_id = $1 ORDER BY tracks DESC, cluster", [args.movie_id]
    )
    print(f"{args.action} recorded for movie {args.movie_id!r} ({len(tracks)} tracks); its people now:")
    print(people)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from vcn.clustering.metrics import evaluate_files, format_table

    scores = evaluate_files(args.labels, args.pred)
    text = json.dumps(scores.to_dict(), indent=2) + "\n"
    if args.json:
        with atomic_path(args.json) as temporary:
            temporary.write_text(text, encoding="utf-8")
    sys.stdout.write(text if args.format == "json" else format_table(scores) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
