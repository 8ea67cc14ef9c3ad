"""The inbox sensor: every new video dropped in the inbox becomes a movie partition and a run."""

import json
from pathlib import Path

import dagster as dg

from resources import ArtifactStore
from vcn_assets.jobs import process_movie_job
from vcn_assets.partitions import movie_slug, movies
from vcn_assets.settings import Settings

#: File extensions the inbox picks up (others, like partial downloads, are ignored).
VIDEO_EXTENSIONS = {".mp4", ".mkv", ".mov", ".avi", ".m4v", ".webm", ".mpg", ".mpeg", ".ts", ".mxf", ".wmv", ".flv"}


def new_inbox_videos(inbox: Path, registered: dict[str, str]) -> list[tuple[str, Path]]:
    """(movie id, path) for each video in ``inbox`` not registered yet.

    Ids are slugs of the file names; a slug already taken by another file gets
    a numeric suffix, so two files never share a partition.
    """
    known_sources = {str(Path(s).resolve()) for s in registered.values()}
    taken = set(registered)
    found = []
    for path in sorted(p for p in inbox.iterdir() if p.is_file()) if inbox.is_dir() else []:
        if path.suffix.lower() not in VIDEO_EXTENSIONS or path.name.startswith("."):
            continue
        if str(path.resolve()) in known_sources:
            continue
        base = movie_slug(path.stem)
        key, n = base, 2
        while key in taken:
            key, n = f"{base}-{n}", n + 1
        taken.add(key)
        found.append((key, path.resolve()))
    return found


@dg.sensor(job=process_movie_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def inbox_sensor(context: dg.SensorEvaluationContext, store: ArtifactStore) -> dg.SensorResult | dg.SkipReason:
    """Registers each new video file in the inbox folder and requests its processing run."""
    inbox = Settings.from_env().inbox
    if not inbox.is_dir():
        return dg.SkipReason(f"inbox {inbox} does not exist")
    found = new_inbox_videos(inbox, store.registered_sources())
    if not found:
        return dg.SkipReason(f"no new videos in {inbox}")
    for key, path in found:
        store.register_movie(key, str(path))
        context.log.info(f"inbox: {path.name} -> movie {key}")
    keys = [key for key, _ in found]
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=key, run_key=f"inbox:{key}") for key in keys],
        dynamic_partitions_requests=[movies.build_add_request(keys)],
        cursor=json.dumps(sorted(keys)),
    )
