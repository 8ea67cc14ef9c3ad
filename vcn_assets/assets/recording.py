"""What every per-movie asset shares: its decorator, lineage and metrics bookkeeping, its metadata's tail."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterator, Sequence

import dagster as dg
import polars as pl

from vcn import __version__
from vcn.memory import release_freed_memory
from vcn.progress import LogLines, Progress, console_now
from vcn.stores.warehouse import Warehouse, utcnow
from vcn_assets.partitions import movies

CODE_VERSION = __version__
#: Seconds between two progress lines of one loop in the Dagster run log.
RUN_LOG_PROGRESS_EVERY_S = 60.0


@dataclass
class StageRun:
    """What one asset materialisation did, filled in by the asset body."""

    asset: str
    movie_id: str
    started_at: datetime = field(default_factory=utcnow)
    frames: int | None = None
    #: Frames the stage decoded from the video (0: it read none), summed over its passes.
    frames_decoded: int = 0
    items: int | None = None
    video_seconds: float | None = None
    artifact: str | None = None
    row_count: int | None = None
    details: dict = field(default_factory=dict)
    progress: Progress | None = None
    #: Seconds added to the body's wall time where one body does several stages' work: the one pass
    #: over the video gives the detector's time to ``face_detections`` and takes it from ``shots``.
    seconds_adjust: float = 0.0

    def meter(self, what: str, unit: str):
        """A :class:`vcn.progress.Meter` of the stage's long loop (a ``progress(done, total)`` callback)."""
        return self.progress.meter(what, unit)

    @property
    def seconds(self) -> float:
        """Wall seconds of the asset body (set when the body has finished)."""
        return self.details["seconds"]

    def result(self, metadata: dict, data_version: str | None = None, *, of_one_of_several: bool = False) -> dg.MaterializeResult:
        """The asset's result: ``metadata`` plus what every stage shows (its seconds, and where its artifact is).

        ``of_one_of_several``: the body materialises several assets (a multi-asset), so the result names its own.
        """
        tail = {"seconds": round(self.seconds, 3)}
        if self.artifact is not None:
            tail["path"] = dg.MetadataValue.path(self.artifact)
        return dg.MaterializeResult(
            asset_key=dg.AssetKey(self.asset) if of_one_of_several else None,
            metadata={**metadata, **tail},
            data_version=None if data_version is None else dg.DataVersion(data_version),
        )


def movie_asset(*, group: str, kinds: set[str], deps: Sequence = (), pool: str | None = None, **options):
    """``dg.asset`` for a per-movie asset: partitioned by movie, versioned with the code, in ``group``."""
    return dg.asset(
        partitions_def=movies, group_name=group, code_version=CODE_VERSION, deps=list(deps), kinds=kinds, pool=pool,
        **options,
    )


@contextlib.contextmanager
def stage(context: dg.AssetExecutionContext, warehouse: Warehouse, asset: str) -> Iterator[StageRun]:
    """Times an asset body and, if it succeeds, records lineage and metrics.

    It starts by handing what earlier stages of the process freed back to the system
    (:func:`vcn.memory.release_freed_memory`). Its meters (:meth:`StageRun.meter`) report to the run log every :data:`RUN_LOG_PROGRESS_EVERY_S`
    seconds, and to the console of ``vcn process`` (:func:`vcn.progress.console`).
    """
    release_freed_memory()  # what earlier stages of this process freed, before this one allocates
    run = StageRun(asset=asset, movie_id=context.partition_key)
    run.progress = Progress(asset, [LogLines(context.log.info, every_s=RUN_LOG_PROGRESS_EVERY_S), *console_now()])
    try:
        yield run
    except BaseException:
        run.progress.close(stopped=True)
        raise
    run.progress.close()
    finished = utcnow()
    seconds = (finished - run.started_at).total_seconds() + run.seconds_adjust
    warehouse.record_stage(
        asset=asset,
        movie_id=run.movie_id,
        run_id=context.run.run_id,
        code_version=CODE_VERSION,
        artifact=run.artifact,
        row_count=run.row_count,
        started_at=run.started_at,
        finished_at=finished,
        seconds=seconds,
        frames=run.frames,
        frames_decoded=run.frames_decoded,
        items=run.items,
        video_seconds=run.video_seconds,
        details=run.details,
    )
    run.details["seconds"] = seconds


def preview(frame: pl.DataFrame, rows: int = 10) -> dg.MetadataValue:
    """A small Markdown table of the first rows, for the asset's metadata."""
    shown = frame.head(rows)
    if shown.is_empty():
        return dg.MetadataValue.md("_empty_")
    header = "| " + " | ".join(shown.columns) + " |\n|" + "---|" * len(shown.columns) + "\n"
    body = "".join("| " + " | ".join(_fmt(v) for v in row) + " |\n" for row in shown.iter_rows())
    return dg.MetadataValue.md(header + body)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
