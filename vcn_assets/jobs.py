"""Jobs over the per-movie asset graph, selected from :data:`vcn_assets.artifacts.MOVIE_ASSETS`."""

from __future__ import annotations

import dagster as dg

from vcn_assets.artifacts import MODEL_ASSET_NAMES, MOVIE_ASSET_NAMES

#: Run tag that the instance's run queue limits (dagster.yaml: one such run at a time), so
#: that re-clustering every movie after a model update never floods the machine.
MODEL_POOL_TAG = {"vcn/pool": "models"}

#: Concurrency pool of the steps that use the accelerator (detection, finetuning, embedding): its limit
#: (`dagster instance concurrency set gpu N`, N = GPUs) caps them across all runs.
GPU_POOL = "gpu"

process_movie_job = dg.define_asset_job(
    name="process_movie",
    selection=dg.AssetSelection.assets(*MOVIE_ASSET_NAMES),
    description="Everything per movie: shots, frames, face detections, tracks, aligned crops, the finetuned model, "
    "embeddings, clusters.",
)

recluster_movie_job = dg.define_asset_job(
    name="recluster_movie",
    selection=dg.AssetSelection.assets(*MODEL_ASSET_NAMES),
    tags=MODEL_POOL_TAG,
    description="A movie's model-dependent assets again (finetuned model, embeddings, clusters) on the current base "
    "model; its preprocessing is kept. Launched after a model registration and by the weekly schedule.",
)
