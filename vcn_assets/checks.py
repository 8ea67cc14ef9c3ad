"""Asset checks: invariants of the per-movie outputs, verified after each materialisation."""

import dagster as dg
import polars as pl

from resources import ArtifactStore, WarehouseResource
from vcn.clustering.cannot_link import on_screen_together
from vcn.stores.files import parquet_batches
from vcn_assets import artifacts
from vcn_assets.assets.clusters import face_clusters
from vcn_assets.assets.models import finetuned_model, read_tracks
from vcn_assets.assets.preprocess import face_tracks, track_crops


@dg.asset_check(asset=face_tracks, blocking=True, description="Every track lies inside one shot: no track crosses a cut.")
def tracks_within_shots(context: dg.AssetCheckExecutionContext, store: ArtifactStore) -> dg.AssetCheckResult:
    movie_id = context.partition_key if context.has_partition_key else None
    tracks = store.read_parquet(movie_id, artifacts.TRACKS)
    shots = store.read_parquet(movie_id, artifacts.SHOTS)
    joined = tracks.join(shots.select("shot_id", pl.col("start_frame").alias("s0"), pl.col("end_frame").alias("s1")), on="shot_id", how="left")
    bad = joined.filter(pl.col("s0").is_null() | (pl.col("start_frame") < pl.col("s0")) | (pl.col("end_frame") > pl.col("s1")))
    return dg.AssetCheckResult(passed=bad.is_empty(), metadata={"tracks": tracks.height, "crossing_tracks": bad.height})


@dg.asset_check(asset=track_crops, description="Every track has crops, and the crop file holds one image per row.")
def crops_cover_tracks(context: dg.AssetCheckExecutionContext, store: ArtifactStore) -> dg.AssetCheckResult:
    movie_id = context.partition_key
    tracks = store.read_parquet(movie_id, artifacts.TRACKS, columns=["track_id"])
    missing, empty_images = crop_coverage(tracks, store.local(movie_id, artifacts.CROPS))
    return dg.AssetCheckResult(
        passed=missing == 0 and empty_images == 0,
        metadata={"tracks_without_crops": missing, "empty_images": empty_images},
    )


def crop_coverage(tracks: pl.DataFrame, crops_path, batch_rows: int = 4096) -> tuple[int, int]:
    """(tracks without any crop row, crop rows with an empty image) of a ``track_crops`` file.

    A feature film's crops are gigabytes of JPEG: the file is read a batch of rows at
    a time and only track ids and a count are kept.
    """
    covered, empty_images = set(), 0
    for batch in parquet_batches(crops_path, batch_rows, ["track_id", "image"]):
        crops = pl.from_arrow(batch)
        covered.update(crops["track_id"].unique().to_list())
        empty_images += crops.filter(pl.col("image").bin.size() == 0).height
    return tracks.filter(~pl.col("track_id").is_in(list(covered))).height, empty_images


@dg.asset_check(
    asset=face_clusters,
    blocking=True,
    description="With cannot-link on, no cluster holds two tracks that are on screen together (same shot, overlapping frames).",
)
def clusters_respect_cannot_link(context: dg.AssetCheckExecutionContext, store: ArtifactStore) -> dg.AssetCheckResult:
    movie_id = context.partition_key
    tracks = read_tracks(store, movie_id)
    clusters = store.read_parquet(movie_id, artifacts.FACE_CLUSTERS, columns=["track_id", "cluster"])
    cluster = tracks.join(clusters, on="track_id", how="left")["cluster"].to_numpy()
    pairs = on_screen_together(tracks)
    # Unknown tracks are NaN here, and NaN equals nothing: they never count.
    together = int((cluster[pairs[:, 0]] == cluster[pairs[:, 1]]).sum())
    enforced = _cannot_link_was_on(context, movie_id)
    return dg.AssetCheckResult(
        passed=not enforced or together == 0,
        metadata={"cannot_link": enforced, "on_screen_together_pairs": len(pairs), "pairs_in_one_cluster": together},
    )


@dg.asset_check(
    asset=face_clusters,
    blocking=True,
    description="Every track of face_tracks has exactly one row, in the Parquet file and in the warehouse (for its model version).",
)
def clusters_cover_tracks(
    context: dg.AssetCheckExecutionContext, store: ArtifactStore, warehouse: WarehouseResource
) -> dg.AssetCheckResult:
    movie_id = context.partition_key
    tracks = store.read_parquet(movie_id, artifacts.TRACKS, columns=["track_id"])
    clusters = store.read_parquet(movie_id, artifacts.FACE_CLUSTERS, columns=["track_id", "model_version"])
    versions = clusters["model_version"].unique().to_list()
    rows = warehouse.get().query(
        "SELECT track_id FROM face_clusters WHERE movie_id = $1 AND model_version = $2", [movie_id, versions[0] if versions else ""]
    )
    problems = {}
    for where, table in (("parquet", clusters), ("warehouse", rows)):
        counts = tracks.join(table.group_by("track_id").len(), on="track_id", how="left").fill_null(0)
        problems[f"{where}_missing"] = counts.filter(pl.col("len") == 0).height
        problems[f"{where}_repeated"] = counts.filter(pl.col("len") > 1).height
        problems[f"{where}_unknown_tracks"] = table.join(tracks, on="track_id", how="anti").height
    return dg.AssetCheckResult(
        passed=not any(problems.values()) and len(versions) <= 1,
        metadata={"tracks": tracks.height, "model_versions": len(versions), **problems},
    )


@dg.asset_check(
    asset=finetuned_model,
    blocking=True,
    description="Self-distillation did not collapse: the loss left ln K, and the embeddings' variance and effective "
    "rank stayed above half the pretrained model's on the same crops. A collapsed model never embeds the movie.",
)
def finetune_not_collapsed(context: dg.AssetCheckExecutionContext, store: ArtifactStore) -> dg.AssetCheckResult:
    record = store.read_json(context.partition_key, artifacts.FINETUNED_MODEL)
    passed, metadata = collapse_verdict(record)
    return dg.AssetCheckResult(passed=passed, metadata=metadata)


def collapse_verdict(record: dict) -> tuple[bool, dict]:
    """Whether a movie's finetuned-model record (finetuned_model.json) shows no collapse, and what to show."""
    if not record.get("enabled"):
        return True, {"finetuned": False, "reason": record.get("reason", "")}
    stats = record.get("collapse")
    if not stats:
        return False, {"finetuned": True, "problems": "no collapse diagnostics were recorded"}
    problems = record.get("collapse_problems") or []
    metadata = {"finetuned": True, **{k: round(float(v), 4) for k, v in stats.items() if v is not None}}
    return not problems, {**metadata, "problems": "; ".join(problems) or "none"}


def _cannot_link_was_on(context: dg.AssetCheckExecutionContext, movie_id: str) -> bool:
    """Whether the latest materialisation of the movie's face_clusters enforced cannot-link (assumed on if unknown)."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=face_clusters.key, asset_partitions=[movie_id]), limit=1
    ).records
    if not records or records[0].asset_materialization is None:
        return True
    value = records[0].asset_materialization.metadata.get("cannot_link")
    return True if value is None else bool(value.value)


checks = [
    tracks_within_shots,
    crops_cover_tracks,
    finetune_not_collapsed,
    clusters_respect_cannot_link,
    clusters_cover_tracks,
]
