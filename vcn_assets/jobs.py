"""Jobs over the per-movie asset graph."""

from __future__ import annotations

import dagster as dg

preprocess_job = dg.define_asset_job(
    name="preprocess_movie",
    selection=dg.AssetSelection.groups("preprocess"),
    description="Shots, frames, face detections, tracks and aligned crops of one movie.",
)
