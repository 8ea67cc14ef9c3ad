"""A movie's kept crops read from its ``track_crops`` file, and the tables of their embeddings.

The embedding itself is :func:`vcn.pipeline.embed`, the same for a movie and a
track dataset; this module reads the chips it takes (in order, a chunk at a time,
or a chosen subset) and shapes what it gives into the movie's tables.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import polars as pl
import pyarrow as pa

from vcn.faces.crops import decode_jpeg
from vcn.stores.files import parquet_batches

#: Rows :func:`unit_track_means` converts to float64 at a time.
TRACK_MEAN_BLOCK = 8192

#: Rows of the crop-embeddings table; row ``i`` is row ``i`` of the .npy matrix.
#: ``quality`` is the crop's SER-FIQ quality (:func:`vcn.identity.quality.embed_and_score`),
#: null when the backbone cannot score it.
CROP_EMBEDDINGS_SCHEMA = {"crop_id": pl.Int64, "track_id": pl.Int64, "model_version": pl.String, "quality": pl.Float32}


def crop_embeddings_table(crops: pl.DataFrame, model_version: str, quality: np.ndarray | None) -> pl.DataFrame:
    """The crop-embeddings table (:data:`CROP_EMBEDDINGS_SCHEMA`) of embedded kept crops.

    Args:
        crops: ``crop_id`` and ``track_id`` of the crops (:func:`read_kept_crops`), in embedding order.
        model_version: Version of the weights that embedded them.
        quality: (N,) SER-FIQ quality of each crop, or None when not scored (a null column).
    """
    return pl.DataFrame(
        {
            "crop_id": crops["crop_id"],
            "track_id": crops["track_id"],
            "model_version": [model_version] * crops.height,
            "quality": quality if quality is not None else [None] * crops.height,
        },
        schema=CROP_EMBEDDINGS_SCHEMA,
    )


def read_kept_crops(crops_path: str | os.PathLike, template: str) -> pl.DataFrame:
    """``crop_id`` and ``track_id`` of the kept (not rejected) crops of a ``track_crops`` file, in file order.

    No image is read: a feature film's table is a few MB. The order is the one
    :func:`read_kept_chip_chunks` decodes them in, so row ``i`` here is chip ``i`` there.

    Raises:
        ValueError: The crops were aligned for another template than ``template``.
    """
    tables = []
    for batch in parquet_batches(crops_path, 65536, ["crop_id", "track_id", "rejected", "template"]):
        table = pl.from_arrow(batch).filter(~pl.col("rejected"))
        if not table.is_empty():
            _check_template(crops_path, table, template)
            tables.append(table.select("crop_id", "track_id"))
    return pl.concat(tables) if tables else pl.DataFrame(schema={"crop_id": pl.Int64, "track_id": pl.Int64})


def read_kept_chips(
    crops_path: str | os.PathLike, template: str, rows: np.ndarray | None = None
) -> tuple[pl.DataFrame, np.ndarray]:
    """The kept (not rejected) crops of a ``track_crops`` file, decoded, in file order: all, or those at ``rows``.

    The chips are 67 KB each at 150 px, so a caller that needs pixels of a long
    movie picks a bounded subset first (:func:`read_kept_crops`, then
    :func:`vcn.identity.selfsup.sampling.spread_crops`) and only those are decoded, into
    one array allocated once.

    Args:
        crops_path: A ``track_crops`` Parquet file.
        template: The alignment the caller expects.
        rows: Sorted, distinct positions among the kept crops (rows of
            :func:`read_kept_crops`); None: all of them.

    Returns:
        A table of ``crop_id`` and ``track_id`` of the crops read, and their
        (N, S, S, 3) uint8 RGB chips.

    Raises:
        ValueError: The crops were aligned for another template than
            ``template``, or ``rows`` are not sorted, distinct kept positions.
    """
    kept = read_kept_crops(crops_path, template)
    rows = np.arange(kept.height) if rows is None else np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1 or (len(rows) and (rows[0] < 0 or rows[-1] >= kept.height or (np.diff(rows) <= 0).any())):
        raise ValueError(f"rows must be sorted, distinct positions among the {kept.height} kept crops")
    table = kept[rows] if len(rows) < kept.height else kept
    chips: np.ndarray | None = None
    seen = done = 0  # kept crops passed, chips decoded
    for batch in parquet_batches(crops_path, 1024, ["rejected", "image"]):
        if done == len(rows):
            break
        kept_mask = ~batch.column("rejected").to_numpy(zero_copy_only=False)
        positions = seen + np.cumsum(kept_mask) - 1  # position of each kept row among the kept crops
        seen += int(kept_mask.sum())
        wanted = kept_mask & np.isin(positions, rows[done : done + len(batch)])
        for data in batch.column("image").filter(pa.array(wanted)).to_pylist():
            chip = decode_jpeg(data)
            if chips is None:
                chips = np.empty((len(rows), *chip.shape), np.uint8)
            chips[done] = chip
            done += 1
    return table, chips if chips is not None else np.zeros((0, 0, 0, 3), np.uint8)


def _check_template(crops_path: str | os.PathLike, table: pl.DataFrame, template: str) -> None:
    templates = set(table["template"].unique().to_list())
    if templates != {template}:
        raise ValueError(
            f"{crops_path}: crops are aligned for {sorted(templates)}, the backbone expects "
            f"{template!r}; re-materialise track_crops with template={template!r}"
        )


def read_kept_chip_chunks(crops_path: str | os.PathLike, template: str, size: int) -> Iterator[np.ndarray]:
    """The kept crops of a ``track_crops`` file, decoded, ``size`` at a time (the last chunk shorter), in file order.

    Only one chunk of chips is in memory at a time, so a feature-length movie
    goes through in constant memory.

    Raises:
        ValueError: The crops were aligned for another template than ``template``.
    """
    pending: list[np.ndarray] = []
    for batch in parquet_batches(crops_path, max(size, 64), ["rejected", "template", "image"]):
        table = pl.from_arrow(batch).filter(~pl.col("rejected"))
        if table.is_empty():
            continue
        _check_template(crops_path, table, template)
        pending.extend(decode_jpeg(data) for data in table["image"].to_list())
        while len(pending) >= size:
            yield np.stack(pending[:size])
            del pending[:size]
    if pending:
        yield np.stack(pending)


def track_means(crops: pl.DataFrame, matrix: np.ndarray, model_version: str) -> pl.DataFrame:
    """Per-track mean of crop embeddings, re-normalised, and mean crop quality.

    Returns:
        One row per track with kept crops: ``track_id, n_crops, model_version,
        quality`` (mean crop quality; null when the crops have none) and
        ``embedding``.
    """
    dim = matrix.shape[1] if matrix.ndim == 2 else 0
    schema = {
        "track_id": pl.Int64,
        "n_crops": pl.Int64,
        "model_version": pl.String,
        "quality": pl.Float32,
        "embedding": pl.Array(pl.Float32, dim),
    }
    if crops.is_empty():
        return pl.DataFrame(schema=schema)
    from vcn.identity.quality import track_quality

    track_ids = crops["track_id"].to_numpy()
    unique, inverse, counts = np.unique(track_ids, return_inverse=True, return_counts=True)
    means = unit_track_means(matrix, inverse, len(unique))
    quality = None
    if "quality" in crops.columns and crops["quality"].null_count() == 0:
        quality = track_quality(crops["quality"].to_numpy(), inverse, len(unique))
    return pl.DataFrame(
        {
            "track_id": unique,
            "n_crops": counts,
            "model_version": [model_version] * len(unique),
            "quality": quality if quality is not None else [None] * len(unique),
            "embedding": means,
        },
        schema=schema,
    )


def unit_track_means(embeddings: np.ndarray, crop_track: np.ndarray, n_tracks: int) -> np.ndarray:
    """(T, D) float32 mean of each track's crop embeddings, scaled to unit length.

    Args:
        embeddings: (N, D) crop embeddings.
        crop_track: (N,) track index of each crop, in ``0..n_tracks-1``.
        n_tracks: Number of tracks T.

    Returns:
        One row per track; a row of NaN for a track without crops, so that it
        cannot pass for a point of the embedding space.
    """
    dim = embeddings.shape[1]
    sums = np.zeros((n_tracks, dim), dtype=np.float64)
    # In float64 a block of rows at a time, in row order: the same sums as one pass, without a float64 copy
    # of the whole matrix (80 MB for a 2-hour film's 78,756 crops).
    for start in range(0, len(embeddings), TRACK_MEAN_BLOCK):
        stop = start + TRACK_MEAN_BLOCK
        np.add.at(sums, crop_track[start:stop], np.asarray(embeddings[start:stop], dtype=np.float64))
    counts = np.bincount(crop_track, minlength=n_tracks)
    # Crop embeddings are unit length, so a track's sum is zero only if they cancel exactly. In place: a
    # feature film's (T, D) float64 arrays are 16 MB each.
    sums /= np.maximum(np.linalg.norm(sums, axis=1), 1e-12)[:, None]
    sums[counts == 0] = np.nan
    return sums.astype(np.float32)
