"""Lineage and metrics bookkeeping shared by every asset."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterator

import dagster as dg
import polars as pl

from vcn import __version__
from vcn.warehouse import Warehouse, utcnow

CODE_VERSION = __version__


@dataclass
class StageRun:
    """What one asset materialisation did, filled in by the asset body."""

    asset: str
    movie_id: str
    started_at: datetime = field(default_factory=utcnow)
    frames: int | None = None
    items: int | None = None
    video_seconds: float | None = None
    artifact: str | None = None
    row_count: int | None = None
    details: dict = field(default_factory=dict)


@contextlib.contextmanager
def stage(context: dg.AssetExecutionContext, warehouse: Warehouse, asset: str) -> Iterator[StageRun]:
    """Times an asset body and, if it succeeds, records lineage and metrics."""
    run = StageRun(asset=asset, movie_id=context.partition_key)
    yield run
    finished = utcnow()
    warehouse.record_stage(
        asset=asset,
        movie_id=run.movie_id,
        run_id=context.run.run_id,
        code_version=CODE_VERSION,
        artifact=run.artifact,
        row_count=run.row_count,
        started_at=run.started_at,
        finished_at=finished,
        frames=run.frames,
        items=run.items,
        video_seconds=run.video_seconds,
        details=run.details,
    )
    run.details["seconds"] = (finished - run.started_at).total_seconds()


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
