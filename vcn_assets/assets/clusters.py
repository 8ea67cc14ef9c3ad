"""Tracks grouped by identity: the parameter-free clustering and its report."""

import base64
import time

import dagster as dg
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from resources import ArtifactStore, ClusteringResource, WarehouseResource
from vcn.clustering.cannot_link import on_screen_together
from vcn.clustering.identities import apply_edits, stable_cluster_ids
from vcn.clustering.parameter_free import UNKNOWN
from vcn.clustering.report import (
    ClusterReport,
    contact_sheet_tracks,
    write_cluster_report,
)
from vcn.faces.crops import decode_jpeg, encode_jpeg
from vcn.faces.filters import track_reject_reason
from vcn.pipeline import Embedded, cluster, track_rows
from vcn.stores.files import parquet_batches
from vcn.stores.warehouse import utcnow
from vcn_assets import artifacts
from vcn_assets.assets.models import read_tracks, track_embeddings
from vcn_assets.assets.preprocess import face_tracks
from vcn_assets.assets.recording import movie_asset, preview, stage

#: Columns of ``face_clusters`` (Parquet and warehouse); ``cluster`` null = Unknown, and then
#: ``unknown_reason`` says why (:func:`unknown_reasons`).
FACE_CLUSTERS_SCHEMA = {
    "movie_id": pl.String,
    "track_id": pl.Int64,
    "cluster": pl.Int64,
    "name": pl.String,
    "auto_cluster": pl.Int64,
    "quality": pl.Float32,
    "low_quality": pl.Boolean,
    "unknown_reason": pl.String,
    "model_version": pl.String,
    "run_id": pl.String,
    "clustered_at": pl.Datetime("us", "UTC"),
    "thumbnail": pl.String,
}

#: Contact sheets up to this size are shown inline in the asset's metadata.
_INLINE_PREVIEW_BYTES = 300_000


class ClustersConfig(dg.Config):
    cannot_link: bool = Field(
        default=True,
        description=(
            "Never put two tracks that are on screen together (same shot, overlapping frames) in one cluster: "
            "two faces in one frame are two people. Off reproduces the paper's clustering exactly."
        ),
    )


@movie_asset(group="clusters", deps=[track_embeddings, face_tracks], kinds={"numpy", "parquet", "duckdb"})
def face_clusters(
    context: dg.AssetExecutionContext,
    config: ClustersConfig,
    clustering: ClusteringResource,
    store: ArtifactStore,
    warehouse: WarehouseResource,
) -> dg.MaterializeResult:
    """One cluster (identity) per track, or Unknown for low-quality tracks and tracks without kept crops.

    Every Unknown track says why in ``unknown_reason`` (:func:`unknown_reasons`),
    and the metadata counts the Unknown tracks per reason.

    Crops are compared as the ``clustering`` resource says: by cosine between
    their embeddings, or by the finetuned loss metric on the logits that
    ``track_embeddings`` kept. The warehouse keeps the assignments of every
    model version: a run replaces only the rows of its own (movie, model version).
    """
    wh = warehouse.get()
    with stage(context, wh, "face_clusters") as run:
        movie_id = run.movie_id
        tracks = read_tracks(store, movie_id)
        track_ids = tracks["track_id"].to_numpy()
        embedded = _stored_embeddings(store, movie_id, track_ids, clustering.similarity == "loss")
        pairs = on_screen_together(tracks)

        started = time.perf_counter()
        result = cluster(
            embedded,
            len(track_ids),
            similarity=clustering.similarity,
            cannot_link=pairs if config.cannot_link else None,
        )
        cluster_seconds = time.perf_counter() - started
        compared = len(embedded.loss.rows) if result.dissimilarity == "loss" else len(embedded.crop_track)

        # Keep the cluster ids of the movie's previous clustering where the clusters match.
        previous = wh.latest_clusters(movie_id)
        automatic = stable_cluster_ids(track_ids, result.labels, previous)
        # Then the analysts' edits (vcn label), which no clustering overwrites.
        labels, names, skipped = apply_edits(track_ids, automatic, wh.cluster_edits(movie_id), pairs)
        for line in skipped:
            context.log.warning(f"analyst edit not applied: {line}")
        model_version = embedded.model_version
        n = len(track_ids)
        table = pl.DataFrame(
            {
                "movie_id": [movie_id] * n,
                "track_id": track_ids,
                "cluster": labels,
                "name": [names.get(int(c)) for c in labels.tolist()],
                "auto_cluster": automatic,
                "quality": result.track_quality.astype(np.float32),
                "low_quality": result.low_quality,
                "unknown_reason": unknown_reasons(result.unknown_reason, track_ids, _crop_verdicts(store, movie_id)),
                "model_version": [model_version] * n,
                "run_id": [context.run.run_id] * n,
                "clustered_at": [utcnow()] * n,
                "thumbnail": [None] * n,
            },
            schema=FACE_CLUSTERS_SCHEMA,
        ).with_columns(
            pl.when(pl.col("cluster") != UNKNOWN).then(pl.col("cluster")).alias("cluster"),
            pl.when(pl.col("auto_cluster") != UNKNOWN).then(pl.col("auto_cluster")).alias("auto_cluster"),
            pl.col("quality").fill_nan(None),
        )
        report, thumbnails = _write_report(store, movie_id, table)
        table = table.with_columns(
            pl.col("track_id").replace_strict(thumbnails, default=None, return_dtype=pl.String).alias("thumbnail")
        )
        path = store.write_parquet(movie_id, artifacts.FACE_CLUSTERS, table)
        wh.replace_movie_rows("face_clusters", movie_id, table, model_version=model_version)

        sizes = table["cluster"].drop_nulls().value_counts(sort=True)["count"].to_list()
        why = table["unknown_reason"].drop_nulls().value_counts(sort=True).rows()
        run.items, run.row_count, run.artifact = table.height, table.height, str(path)
        run.details = {
            "model_version": model_version,
            "cannot_link": config.cannot_link,
            "dissimilarity": result.dissimilarity,
            "crops_compared": compared,
            "ids_kept_from_previous_run": len(set(automatic[automatic != UNKNOWN].tolist()) & set(previous.values())),
            "analyst_edits_skipped": len(skipped),
            "n_clusters": len(sizes),
            "n_unknown": result.n_unknown,
            "unknown_reasons": dict(why),
            "rule": result.clustering.rule,
            "cut": result.clustering.cut,
            "group_cut": result.clustering.group_cut,
            "same_person_reach": result.clustering.same_person_reach,
            "rounds": result.clustering.rounds,
            "low_quality_joined": result.clustering.attached,
        }
    cut = result.quality_cut if np.isfinite(result.quality_cut) else None
    return run.result(
        {
            "n_tracks": table.height,
            "n_clusters": len(sizes),
            "n_unknown": result.n_unknown,
            "n_low_quality": int(result.low_quality.sum()),
            "low_quality_joined": result.clustering.attached,
            "unknown_reasons": dg.MetadataValue.json(dict(why)),
            "quality_cut": cut,
            "rule": result.clustering.rule,
            "cut": result.clustering.cut,
            "group_cut": result.clustering.group_cut,
            "same_person_reach": result.clustering.same_person_reach,
            "rounds": result.clustering.rounds,
            "blocked_merges": result.clustering.blocked_merges,
            "cannot_link": config.cannot_link,
            "on_screen_together_pairs": len(pairs),
            "cluster_sizes": dg.MetadataValue.json(sizes[:20]),
            "ids_kept_from_previous_run": run.details["ids_kept_from_previous_run"],
            "dissimilarity": result.dissimilarity,
            "crops_compared": compared,
            "model_version": model_version,
            "cluster_seconds": round(cluster_seconds, 3),
            "report": dg.MetadataValue.path(store.uri(movie_id, f"{artifacts.CLUSTER_REPORT}/{report.html.name}")),
            "contact_sheet": dg.MetadataValue.path(
                store.uri(movie_id, f"{artifacts.CLUSTER_REPORT}/{report.contact_sheet.name}")
            ),
            "embedding_plot": dg.MetadataValue.path(
                store.uri(movie_id, f"{artifacts.CLUSTER_REPORT}/{report.embedding_plot.name}")
            ),
            "report_preview": _report_preview(report),
            "preview": preview(table.select("track_id", "cluster", "quality", "unknown_reason")),
        }
    )


def unknown_reasons(reasons: np.ndarray, track_ids: np.ndarray, crops: pl.DataFrame) -> list[str | None]:
    """Why each Unknown track is Unknown, for analysts; None for a clustered track.

    ``low_quality``: a low-side quality outlier of the movie
    (:func:`vcn.identity.quality.low_quality_tracks`). ``no_kept_crops: <reason>``:
    the crop filters kept none of its crops, with the reason most of them got
    (``small_face``, ``not_top_k``, ``blurry``, ``unalignable``;
    :func:`vcn.faces.filters.track_reject_reason`), or ``no_crops`` when it has
    none (``not_embedded``: kept crops that were not embedded, which a current
    ``track_embeddings`` never leaves). ``not_clustered``: left out by the merge
    procedure otherwise.

    Args:
        reasons: (T,) :attr:`vcn.clustering.parameter_free.MovieClusters.unknown_reason`.
        track_ids: (T,) the tracks' ids.
        crops: ``track_id, reject_reason`` of the movie's crops.
    """
    per_track = dict(crops.group_by("track_id").agg(pl.col("reject_reason")).iter_rows())
    out: list[str | None] = []
    for track, reason in zip(np.asarray(track_ids).tolist(), np.asarray(reasons, dtype=object).tolist()):
        if reason == "no_kept_crops":
            reason = f"no_kept_crops: {track_reject_reason(per_track.get(track, [])) or 'not_embedded'}"
        out.append(reason)
    return out


def _crop_verdicts(store: ArtifactStore, movie_id: str) -> pl.DataFrame:
    """``track_id, reject_reason`` of every crop of the movie."""
    return store.read_parquet(movie_id, artifacts.CROPS, columns=["track_id", "reject_reason"])


def _stored_embeddings(store: ArtifactStore, movie_id: str, track_ids: np.ndarray, loss: bool) -> Embedded:
    """What ``track_embeddings`` stored, as the clustering takes it; with the loss sample when ``loss``.

    The loss sample is read only when the movie has a finetuned model (without
    one the clustering falls back to cosine, and says so).

    Raises:
        ValueError: The stored embeddings do not fit the tracks, or the loss
            sample is missing or from another model: re-materialise track_embeddings.
    """
    from vcn.identity.selfsup.loss_metric import LossSample

    crops = store.read_parquet(movie_id, artifacts.CROP_EMBEDDINGS)
    model_version = _model_version(store, crops)
    try:
        crop_track = track_rows(track_ids, crops["track_id"].to_numpy())
    except ValueError as error:
        raise ValueError(f"{movie_id}: {error}; re-materialise track_embeddings") from None
    sample = None
    record = store.read_json(movie_id, artifacts.FINETUNED_MODEL) or {}
    if loss and crops.height and record.get("enabled"):
        if not store.exists(movie_id, artifacts.LOSS_SAMPLE):
            raise ValueError(
                f"{movie_id}: no loss-metric logits; re-materialise track_embeddings with similarity 'loss'"
            )
        sample = LossSample.load(store.local(movie_id, artifacts.LOSS_SAMPLE))
        if sample.model_version != model_version or (len(sample.rows) and sample.rows[-1] >= crops.height):
            raise ValueError(
                f"{movie_id}: the loss-metric logits come from {sample.model_version}, the crop embeddings from "
                f"{model_version}; re-materialise track_embeddings"
            )
    return Embedded(
        crop_track=crop_track,
        embeddings=np.load(store.local(movie_id, artifacts.CROP_EMBEDDING_MATRIX)),
        quality=crops["quality"].to_numpy() if crops.height and crops["quality"].null_count() == 0 else None,
        model_version=model_version,
        loss=sample,
    )


def _model_version(store: ArtifactStore, crops: pl.DataFrame) -> str:
    """The model version of the crop embeddings; the registered base model's when no crop was kept."""
    versions = crops["model_version"].unique().to_list()
    if len(versions) > 1:
        raise ValueError(f"crop embeddings mix model versions {sorted(versions)}; re-materialise track_embeddings")
    if versions:
        return versions[0]
    registered = store.read_model_json(artifacts.BASE_MODEL)
    if registered is None:
        raise FileNotFoundError("no base model is registered; materialise base_model first")
    return registered["version"]


def _write_report(store: ArtifactStore, movie_id: str, table: pl.DataFrame) -> tuple[ClusterReport, dict[int, str]]:
    """The cluster report of the tracks that have kept crops (the others have no face to show).

    Each track is shown by its middle kept crop and placed by its mean embedding;
    that crop is also written as ``thumbnails/<track_id>.jpg`` for the warehouse.

    Returns:
        The report, and the thumbnail path of each track that has one.
    """
    means = store.read_parquet(movie_id, artifacts.TRACK_EMBEDDINGS, columns=["track_id", "embedding"])
    shown = means.join(table.select("track_id", "cluster"), on="track_id", how="inner").sort("track_id")
    crops_path = store.local(movie_id, artifacts.CROPS)
    middle = (
        pl.read_parquet(crops_path, columns=["crop_id", "track_id", "frame", "rejected"])
        .filter(~pl.col("rejected"))
        .sort("track_id", "frame", "crop_id")
        .group_by("track_id", maintain_order=True)
        .agg(pl.col("crop_id").get(pl.len() // 2))
    )
    dim = means["embedding"].dtype.shape[0] if means.height else 1
    embeddings = shown["embedding"].to_numpy().reshape(-1, dim) if shown.height else np.zeros((0, dim), np.float32)
    track_ids = shown["track_id"].to_list()
    clusters = [None if c is None else str(c) for c in shown["cluster"].to_list()]
    # One crop image at a time: every track's thumbnail is written as it is decoded, and
    # only those on the contact sheet (a bounded number) are kept for it.
    on_sheet = set(contact_sheet_tracks(track_ids, clusters, embeddings))
    track_of = dict(zip(middle["crop_id"].to_list(), middle["track_id"].to_list()))
    thumbnails, paths = {}, {}
    wanted = pa.array(middle["crop_id"].to_list(), type=pa.int64())
    for batch in parquet_batches(crops_path, 256, ["crop_id", "image"]):
        batch = batch.filter(pc.is_in(batch.column("crop_id"), value_set=wanted))
        for crop_id, data in zip(batch.column("crop_id").to_pylist(), batch.column("image").to_pylist()):
            track, image = track_of[crop_id], decode_jpeg(data)
            name = f"{artifacts.THUMBNAILS}/{track}.jpg"
            with store.writing(movie_id, name) as tmp:
                tmp.write_bytes(encode_jpeg(image, 90))
            paths[int(track)] = store.uri(movie_id, name)
            if track in on_sheet:
                thumbnails[track] = image
    report = write_cluster_report(
        store.path(movie_id, artifacts.CLUSTER_REPORT),
        title=movie_id,
        track_ids=track_ids,
        clusters=clusters,
        thumbnails=thumbnails,
        embeddings=embeddings,
    )
    store.publish_dir(movie_id, artifacts.CLUSTER_REPORT)
    return report, paths


def _report_preview(report: ClusterReport) -> dg.MetadataValue:
    """The contact sheet inline when small enough to embed, else where it is."""
    data = report.contact_sheet.read_bytes()
    if len(data) > _INLINE_PREVIEW_BYTES:
        return dg.MetadataValue.md(
            f"Contact sheet: `{report.contact_sheet}` ({len(data) // 1000} KB); report: `{report.html}`"
        )
    encoded = base64.b64encode(data).decode("ascii")
    return dg.MetadataValue.md(f"![contact sheet](data:image/png;base64,{encoded})\n\nReport: `{report.html}`")


cluster_assets = [face_clusters]
