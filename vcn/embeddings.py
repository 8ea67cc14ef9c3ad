"""Embedding the kept crops of a movie with a face-ID backbone, and per-track means."""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from vcn.crops import decode_jpeg

#: Rows of the crop-embeddings table; row ``i`` is row ``i`` of the .npy matrix.
CROP_EMBEDDINGS_SCHEMA = {"crop_id": pl.Int64, "track_id": pl.Int64, "model_version": pl.String}


class Embedder(Protocol):
    version: str
    template: str
    input_size: int
    dim: int

    def embed(self, chips: np.ndarray, batch_size: int = 256) -> np.ndarray: ...


def embed_crops(crops_path: str | os.PathLike, backbone: Embedder, batch_size: int = 256) -> tuple[pl.DataFrame, np.ndarray]:
    """Embeds every kept crop of a ``track_crops`` file, streaming it in row groups.

    Returns:
        The crop-embeddings table (:data:`CROP_EMBEDDINGS_SCHEMA`) and the (N, D)
        float32 matrix of L2-normalised embeddings in the same row order.

    Raises:
        ValueError: the crops were aligned for another template than the backbone's.
    """
    ids: list[int] = []
    tracks: list[int] = []
    parts: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    source = pq.ParquetFile(str(crops_path))
    for batch in source.iter_batches(batch_size=max(batch_size, 64), columns=["crop_id", "track_id", "rejected", "template", "image"]):
        table = pl.from_arrow(batch).filter(~pl.col("rejected"))
        if table.is_empty():
            continue
        templates = set(table["template"].unique().to_list())
        if templates != {backbone.template}:
            raise ValueError(
                f"{crops_path}: crops are aligned for {sorted(templates)}, the backbone expects "
                f"{backbone.template!r}; re-materialise track_crops with template={backbone.template!r}"
            )
        ids.extend(table["crop_id"].to_list())
        tracks.extend(table["track_id"].to_list())
        pending.extend(decode_jpeg(b) for b in table["image"].to_list())
        if len(pending) >= batch_size:
            parts.append(backbone.embed(np.stack(pending), batch_size=batch_size))
            pending = []
    if pending:
        parts.append(backbone.embed(np.stack(pending), batch_size=batch_size))
    matrix = np.concatenate(parts) if parts else np.zeros((0, backbone.dim), np.float32)
    table = pl.DataFrame(
        {"crop_id": ids, "track_id": tracks, "model_version": [backbone.version] * len(ids)},
        schema=CROP_EMBEDDINGS_SCHEMA,
    )
    return table, matrix.astype(np.float32, copy=False)


def track_means(crops: pl.DataFrame, matrix: np.ndarray, model_version: str) -> pl.DataFrame:
    """Per-track mean of crop embeddings, re-normalised: one row per track with kept crops."""
    dim = matrix.shape[1] if matrix.ndim == 2 else 0
    schema = {
        "track_id": pl.Int64,
        "n_crops": pl.Int64,
        "model_version": pl.String,
        "embedding": pl.Array(pl.Float32, dim),
    }
    if crops.is_empty():
        return pl.DataFrame(schema=schema)
    track_ids = crops["track_id"].to_numpy()
    unique, inverse, counts = np.unique(track_ids, return_inverse=True, return_counts=True)
    sums = np.zeros((len(unique), dim), np.float64)
    np.add.at(sums, inverse, matrix)
    means = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return pl.DataFrame(
        {
            "track_id": unique,
            "n_crops": counts,
            "model_version": [model_version] * len(unique),
            "embedding": means.astype(np.float32),
        },
        schema=schema,
    )
