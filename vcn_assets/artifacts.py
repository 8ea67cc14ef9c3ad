"""A movie's assets in pipeline order, and the name of every artifact they keep in the store.

This is the one place that spells them: the jobs, resuming, the CLI and the
checks take the order and the names from here. Per-movie artifacts live at
``movies/<movie>/<name>`` of the artifact store, model-store artifacts at
``models/<name>`` (:class:`resources.ArtifactStore`).
"""

from __future__ import annotations

from dataclasses import dataclass

# --- per movie ----------------------------------------------------------------------------

#: The video a movie partition stands for, and what identified its content when registered.
MOVIE_RECORD = "movie.json"
SHOTS = "shots.parquet"
#: Every frame's timestamp and key-frame flag, from the shots pass: the frame index is built from it, not
#: from another pass over the video.
FRAME_TIMES = "frame_times.parquet"
FRAMES = "frames.parquet"
#: Detections as the detector gave them (with appearance vectors for tracking).
DETECTIONS = "face_detections.parquet"
#: The aligned chip of every detection (JPEG), cut in the detection pass for the base model's template:
#: the crops are picked from it without another pass over the video.
DETECTION_CHIPS = "detection_chips.parquet"
#: Detections with their track id: what ``vcn export`` writes out.
TRACKED_DETECTIONS = "face_tracks.parquet"
#: One row per track (shot, first and last frame, detections).
TRACKS = "tracks.parquet"
#: Aligned crops along each track (JPEG), kept or rejected with a reason.
CROPS = "track_crops.parquet"
#: Which model embeds the movie: the finetuned checkpoint and how it was made, or why not.
FINETUNED_MODEL = "finetuned_model.json"
CROP_EMBEDDINGS = "crop_embeddings.parquet"
#: Row ``i`` is the embedding of row ``i`` of :data:`CROP_EMBEDDINGS`.
CROP_EMBEDDING_MATRIX = "crop_embeddings.npy"
TRACK_EMBEDDINGS = "track_embeddings.parquet"
#: Head logits of a bounded sample of the kept crops and the finetuned loss metric
#: (:class:`vcn.identity.selfsup.loss_metric.LossSample`); only when clustering by the loss.
LOSS_SAMPLE = "loss_sample.npz"
FACE_CLUSTERS = "face_clusters.parquet"
#: Folder of the cluster report (contact sheet, embedding plot, HTML page).
CLUSTER_REPORT = "clusters_report"
#: Folder of one JPEG per track, ``<track_id>.jpg``.
THUMBNAILS = "thumbnails"

# --- model store --------------------------------------------------------------------------

#: The registered base model (name, version, checkpoint), the model registry's record.
BASE_MODEL = "base_model.json"


def finetuned_checkpoint(movie_id: str, version: str) -> str:
    """Model-store name of a movie's finetuned checkpoint."""
    return f"finetuned/{movie_id}/{version}.safetensors"


# --- the movie's assets, in order ---------------------------------------------------------


@dataclass(frozen=True)
class MovieAsset:
    """One per-movie asset: its name (the Dagster asset key) and the artifact whose presence shows it complete."""

    name: str
    artifact: str
    #: Whether it depends on the face-ID model (rebuilt when a new base model is registered).
    model_dependent: bool = False
    #: Whether it is made for the base model's alignment template (rebuilt when a new base
    #: model takes another one); its materialisation records the template in its metadata.
    template_dependent: bool = False


#: Every per-movie asset in pipeline order.
MOVIE_ASSETS: tuple[MovieAsset, ...] = (
    MovieAsset("shots", SHOTS),
    MovieAsset("frames", FRAMES),
    MovieAsset("face_detections", DETECTIONS),
    MovieAsset("face_tracks", TRACKS),
    MovieAsset("track_crops", CROPS, template_dependent=True),
    MovieAsset("finetuned_model", FINETUNED_MODEL, model_dependent=True),
    MovieAsset("track_embeddings", TRACK_EMBEDDINGS, model_dependent=True),
    MovieAsset("face_clusters", FACE_CLUSTERS, model_dependent=True),
)

#: Names of :data:`MOVIE_ASSETS`, in order.
MOVIE_ASSET_NAMES: tuple[str, ...] = tuple(asset.name for asset in MOVIE_ASSETS)
#: The assets that a new base model makes stale, in order.
MODEL_ASSET_NAMES: tuple[str, ...] = tuple(asset.name for asset in MOVIE_ASSETS if asset.model_dependent)


def stale_after_model_change(crops_template: str | None, template: str) -> tuple[str, ...]:
    """The assets of a movie to rebuild on a new base model, in order.

    Args:
        crops_template: The template the movie's crops were aligned for (None: unknown).
        template: The new base model's.

    Returns:
        The model-dependent assets, and before them the template-dependent ones
        when the new model takes another template than the crops were made for.
    """
    realign = crops_template is not None and crops_template != template
    return tuple(a.name for a in MOVIE_ASSETS if a.model_dependent or (realign and a.template_dependent))
