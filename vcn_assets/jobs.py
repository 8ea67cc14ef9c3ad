"""Jobs over the per-movie asset graph, selected from :data:`vcn_assets.artifacts.MOVIE_ASSETS`."""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg

from vcn_assets.artifacts import MODEL_ASSET_NAMES, MOVIE_ASSET_NAMES, stale_after_model_change

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


@dataclass(frozen=True)
class ReclusterRun:
    """The run that rebuilds one movie on a new base model: which job, and which of its assets.

    Attributes:
        job_name: ``recluster_movie``, or ``process_movie`` when the crops must be
            realigned first (the new model takes another template).
        assets: The assets to materialise, in order.
    """

    job_name: str
    assets: tuple[str, ...]

    @property
    def asset_selection(self) -> list[dg.AssetKey] | None:
        """The assets as a run's selection; None for the whole ``recluster_movie`` job."""
        return None if self.job_name == recluster_movie_job.name else [dg.AssetKey(name) for name in self.assets]


def recluster_run(crops_template: str | None, template: str) -> ReclusterRun:
    """The run that rebuilds a movie whose crops were aligned for ``crops_template`` on a base model taking ``template``."""
    assets = stale_after_model_change(crops_template, template)
    if assets == MODEL_ASSET_NAMES:
        return ReclusterRun(recluster_movie_job.name, assets)
    return ReclusterRun(process_movie_job.name, assets)
