"""Asset checks: invariants of the per-movie outputs, verified after each materialisation."""

import dagster as dg
import polars as pl

from resources import ArtifactStore
from vcn_assets.assets.preprocess import face_tracks, track_crops
from vcn_assets.partitions import movies


@dg.asset_check(asset=face_tracks, blocking=True, description="Every track lies inside one shot: no track crosses a cut.")
def tracks_within_shots(context: dg.AssetCheckExecutionContext, store: ArtifactStore) -> dg.AssetCheckResult:
    movie_id = context.partition_key if context.has_partition_key else None
    tracks = store.read_parquet(movie_id, "tracks.parquet")
    shots = store.read_parquet(movie_id, "shots.parquet")
    joined = tracks.join(shots.select("shot_id", pl.col("start_frame").alias("s0"), pl.col("end_frame").alias("s1")), on="shot_id", how="left")
    bad = joined.filter(pl.col("s0").is_null() | (pl.col("start_frame") < pl.col("s0")) | (pl.col("end_frame") > pl.col("s1")))
    return dg.AssetCheckResult(passed=bad.is_empty(), metadata={"tracks": tracks.height, "crossing_tracks": bad.height})


@dg.asset_check(asset=track_crops, description="Every track has crops, and the crop file holds one image per row.")
def crops_cover_tracks(context: dg.AssetCheckExecutionContext, store: ArtifactStore) -> dg.AssetCheckResult:
    movie_id = context.partition_key
    tracks = store.read_parquet(movie_id, "tracks.parquet", columns=["track_id"])
    crops = store.read_parquet(movie_id, "track_crops.parquet", columns=["track_id", "image"])
    missing = tracks.join(crops.select("track_id").unique(), on="track_id", how="anti")
    empty_images = crops.filter(pl.col("image").bin.size() == 0).height if crops.height else 0
    return dg.AssetCheckResult(
        passed=missing.is_empty() and empty_images == 0,
        metadata={"tracks_without_crops": missing.height, "empty_images": empty_images},
    )


checks = [tracks_within_shots, crops_cover_tracks]
