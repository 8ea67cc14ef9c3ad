"""Sensors and schedules: the inbox (every new video, in a folder or under an S3 prefix, becomes a movie
partition and a run), re-clustering after a base model update, and the weekly full re-cluster."""

import json
from pathlib import Path, PurePosixPath

import dagster as dg
import duckdb

from resources import ArtifactStore, MovieRegistry, WarehouseResource
from vcn.stores.objectstore import S3Objects, is_s3_uri, split_s3_uri
from vcn_assets import artifacts
from vcn_assets.jobs import MODEL_POOL_TAG, process_movie_job, recluster_movie_job, recluster_run
from vcn_assets.partitions import movie_slug, movies
from vcn_assets.resume import crops_template
from vcn_assets.settings import Settings

#: File extensions the inbox picks up (others, like partial downloads, are ignored).
VIDEO_EXTENSIONS = {".mp4", ".mkv", ".mov", ".avi", ".m4v", ".webm", ".mpg", ".mpeg", ".ts", ".mxf", ".wmv", ".flv"}


def new_inbox_videos(inbox: Path, registered: dict[str, str]) -> list[tuple[str, str]]:
    """(movie id, path) for each video file in the folder ``inbox`` not registered yet."""
    files = sorted(p.resolve() for p in inbox.iterdir() if p.is_file()) if inbox.is_dir() else []
    known = {s if is_s3_uri(s) else str(Path(s).resolve()) for s in registered.values()}
    return _new_movies([(p.name, str(p)) for p in files], known, set(registered))


def new_s3_videos(inbox: S3Objects, registered: dict[str, str]) -> list[tuple[str, str]]:
    """(movie id, s3:// URI) for each video object directly under the S3 prefix ``inbox`` not registered yet."""
    names = sorted(n for n in inbox.names() if "/" not in n)
    return _new_movies([(n, inbox.uri(n)) for n in names], set(registered.values()), set(registered))


def _new_movies(candidates: list[tuple[str, str]], known: set[str], taken: set[str]) -> list[tuple[str, str]]:
    """(movie id, source) of the candidate (file name, source) pairs that are videos not registered yet.

    Ids are slugs of the file names; a slug already taken by another file gets
    a numeric suffix, so two files never share a partition.
    """
    found = []
    for name, source in candidates:
        path = PurePosixPath(name)
        if path.suffix.lower() not in VIDEO_EXTENSIONS or name.startswith(".") or source in known:
            continue
        base = movie_slug(path.stem)
        key, n = base, 2
        while key in taken:
            key, n = f"{base}-{n}", n + 1
        taken.add(key)
        found.append((key, source))
    return found


@dg.sensor(job=process_movie_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def inbox_sensor(context: dg.SensorEvaluationContext, store: ArtifactStore) -> dg.SensorResult | dg.SkipReason:
    """Registers each new video in the inbox (a folder, or an S3 prefix) and requests its processing run.

    The movie record is the one ``vcn process`` writes (:meth:`MovieRegistry.register`), stamp included, so
    that processing the movie again with ``vcn process`` keeps what its run made.
    """
    settings = Settings.from_env()
    registry = MovieRegistry(store)
    if settings.inbox_uri:
        bucket, prefix = split_s3_uri(settings.inbox_uri)
        inbox: str | Path = settings.inbox_uri
        found = new_s3_videos(store.s3_objects(bucket, prefix), registry.sources())
    else:
        inbox = settings.inbox
        if not inbox.is_dir():
            return dg.SkipReason(f"inbox {inbox} does not exist")
        found = new_inbox_videos(inbox, registry.sources())
    if not found:
        return dg.SkipReason(f"no new videos in {inbox}")
    for key, source in found:
        registry.register(key, source)
        context.log.info(f"inbox: {source} -> movie {key}")
    keys = [key for key, _ in found]
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=key, run_key=f"inbox:{key}") for key in keys],
        dynamic_partitions_requests=[movies.build_add_request(keys)],
        cursor=json.dumps(sorted(keys)),
    )


def stale_movies(store: ArtifactStore, warehouse: WarehouseResource, movie_ids: list[str]) -> tuple[str | None, list[str]]:
    """The registered base model version, and the clustered movies whose latest clustering used another one.

    Movies never clustered are left to their processing run.
    """

    registered = store.read_model_json(artifacts.BASE_MODEL)
    if registered is None or not movie_ids:
        return None if registered is None else registered["version"], []
    version = registered["version"]
    wh = warehouse.get()
    try:
        latest = wh.query(
            "SELECT movie_id, arg_max(base_model_version, clustered_at) AS base FROM clustering_lineage GROUP BY movie_id"
        )
    except (FileNotFoundError, duckdb.CatalogException):  # no warehouse, or no clustering yet: nothing is stale
        return version, []
    base_of = dict(latest.iter_rows())
    return version, [m for m in movie_ids if m in base_of and base_of[m] != version]


@dg.sensor(
    jobs=[recluster_movie_job, process_movie_job], minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING
)
def model_update_sensor(
    context: dg.SensorEvaluationContext, store: ArtifactStore, warehouse: WarehouseResource
) -> dg.SensorResult | dg.SkipReason:
    """After a new base model is registered, re-clusters every movie clustered with an older one.

    The finetuned model, embeddings and clusters of each such movie are rebuilt
    (job ``recluster_movie``, one run per movie, at most one at a time through
    the run queue's ``vcn/pool`` limit), and its crops before them when the new
    model takes another alignment template (``process_movie`` on those assets);
    the older clusters stay in the warehouse under their own model version.
    """
    version, stale = stale_movies(store, warehouse, context.instance.get_dynamic_partitions(movies.name))
    if version is None:
        return dg.SkipReason("no base model is registered yet")
    if not stale:
        return dg.SkipReason(f"every clustered movie is on base model {version}")
    context.log.info(f"base model {version}: re-clustering {len(stale)} movie(s): {', '.join(stale)}")
    template = store.read_model_json(artifacts.BASE_MODEL)["template"]
    requests = []
    for movie_id in stale:
        run = recluster_run(crops_template(context.instance, movie_id), template)
        requests.append(
            dg.RunRequest(
                partition_key=movie_id, run_key=f"model:{version}:{movie_id}", job_name=run.job_name,
                asset_selection=run.asset_selection, tags={**MODEL_POOL_TAG, "vcn/base_model": version},
            )
        )
    return dg.SensorResult(run_requests=requests)


@dg.schedule(job=recluster_movie_job, cron_schedule="0 3 * * 0", default_status=dg.DefaultScheduleStatus.STOPPED)
def weekly_recluster(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest] | dg.SkipReason:
    """Every Sunday at 03:00, re-clusters every movie (off by default: turn it on in the UI)."""
    keys = context.instance.get_dynamic_partitions(movies.name)
    if not keys:
        return dg.SkipReason("no movies yet")
    stamp = context.scheduled_execution_time.strftime("%Y%m%dT%H%M")
    return [dg.RunRequest(partition_key=m, run_key=f"weekly:{stamp}:{m}", tags=MODEL_POOL_TAG) for m in keys]
