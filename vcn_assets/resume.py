"""Resuming a movie's processing where it stopped.

A run that was killed (power cut, out of memory, Ctrl-C twice) leaves every
asset it finished materialised and nothing visible of the one it was writing
(artifacts are renamed or uploaded into place only when complete). Processing
the movie again starts at the first asset that is not current:

- never materialised for this movie, or its artifact is gone from the store;
- materialised by other code (the asset's code version changed);
- older than the asset before it, or (an asset of the face-ID model) than the
  registered base model;
- or the video itself changed since it was registered (its stamp in the movie
  registry, :class:`resources.MovieRegistry`): then everything is redone.

Runs this process starts carry their host and process id, so a later call can
mark a run whose process is gone as failed instead of leaving it "started"
forever in the instance.
"""

import os
import socket
from dataclasses import dataclass

import dagster as dg

from resources import ArtifactStore
from vcn_assets import artifacts

HOST_TAG, PID_TAG = "vcn/host", "vcn/pid"


@dataclass(frozen=True)
class ResumePlan:
    """Which assets of a movie are current (kept) and which run now, and why the first of those runs."""

    kept: list[str]
    run: list[str]
    reason: str


def plan(instance: dg.DagsterInstance, store: ArtifactStore, movie_id: str, *, code_version: str,
         template: str | None = None, video_changed: bool = False, force: bool = False) -> ResumePlan:
    """The assets of ``movie_id`` (:data:`artifacts.MOVIE_ASSETS`) to materialise now so that all are current,
    keeping the finished ones; ``template`` is the base model's alignment template."""
    names = list(artifacts.MOVIE_ASSET_NAMES)
    if force:
        return ResumePlan([], names, "--force")
    if video_changed:
        return ResumePlan([], names, "the video changed since it was registered")
    base = instance.get_latest_materialization_event(dg.AssetKey("base_model"))
    previous_time = 0.0
    for i, asset in enumerate(artifacts.MOVIE_ASSETS):
        name = asset.name
        record = _latest(instance, name, movie_id)
        if record is None:
            reason = f"{name} was never materialised" if i else "first run"
        elif (record.asset_materialization.tags or {}).get("dagster/code_version") != code_version:
            reason = f"{name} was made by another code version"
        elif record.timestamp < previous_time:
            reason = f"{name} is older than {names[i - 1]}"
        elif asset.model_dependent and base is not None and record.timestamp < base.timestamp:
            reason = "a new base model was registered"
        elif asset.template_dependent and template is not None and _template(record) not in (None, template):
            reason = f"{name} was aligned for {_template(record)}, the base model takes {template}"
        elif not store.exists(movie_id, asset.artifact):
            reason = f"{store.uri(movie_id, asset.artifact)} is missing"
        else:
            previous_time = record.timestamp
            continue
        return ResumePlan(names[:i], names[i:], reason)
    return ResumePlan(names, [], "every asset is current")


def crops_template(instance: dg.DagsterInstance, movie_id: str) -> str | None:
    """The template the movie's latest crops were aligned for, or None when unknown."""
    record = _latest(instance, "track_crops", movie_id)
    return None if record is None else _template(record)


def _template(record) -> str | None:
    entry = (record.asset_materialization.metadata or {}).get("template")
    return None if entry is None else str(entry.value)


def _latest(instance: dg.DagsterInstance, asset: str, movie_id: str):
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[movie_id]), limit=1
    ).records
    return records[0].event_log_entry if records else None


def process_tags() -> dict[str, str]:
    """Tags that tie a run to this process, for :func:`fail_orphaned_runs`."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def fail_orphaned_runs(instance: dg.DagsterInstance, movie_id: str) -> list[str]:
    """Marks as failed this movie's runs that are still "started" although their process on this host is gone."""
    host = socket.gethostname()
    runs = instance.get_runs(
        filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED], tags={HOST_TAG: host, "dagster/partition": movie_id})
    )
    failed = []
    for run in runs:
        pid = int(run.tags.get(PID_TAG, "0"))
        if pid and not _alive(pid):
            instance.report_run_failed(run, f"process {pid} on {host} ended without finishing the run (killed?)")
            failed.append(run.run_id)
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
