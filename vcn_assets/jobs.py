"""Jobs over the per-movie asset graph."""

from __future__ import annotations

import dagster as dg

process_movie_job = dg.define_asset_job(
    name="process_movie",
    selection=dg.AssetSelection.groups("preprocess") | dg.AssetSelection.assets("finetuned_model", "track_embeddings", "face_clusters"),
    description="Everything per movie: shots, frames, face detections, tracks, aligned crops, the finetuned model, "
    "embeddings, clusters.",
)
