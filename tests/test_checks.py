"""Asset checks' own logic on small files (the e2e tests run them inside Dagster on the Hamilton clip)."""

from __future__ import annotations

import polars as pl

from vcn_assets.checks import crop_coverage


def test_crop_coverage_counts_tracks_without_crops_and_empty_images_batch_by_batch(tmp_path):
    tracks = pl.DataFrame({"track_id": [0, 1, 2, 3]})
    crops = pl.DataFrame(
        {"track_id": [0, 0, 1, 3, 3, 3], "image": [b"\xff\xd8a", b"\xff\xd8b", b"", b"\xff\xd8c", b"", b"\xff\xd8d"]}
    )
    path = tmp_path / "track_crops.parquet"
    crops.write_parquet(path, row_group_size=2)
    for batch_rows in (1, 2, 4096):
        assert crop_coverage(tracks, path, batch_rows=batch_rows) == (1, 2)  # track 2 has no crop
    crops.filter(pl.col("image").bin.size() > 0).write_parquet(path)
    assert crop_coverage(tracks, path) == (2, 0)  # track 1 lost its only crop too
    assert crop_coverage(tracks.filter(pl.col("track_id").is_in([0, 3])), path) == (0, 0)
