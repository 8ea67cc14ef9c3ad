"""Aligned face crops sampled along each track.

Crops are taken at a fixed time interval along every track, cut from the
full-resolution frame and aligned to the backbone's input template with a
similarity transform of the five landmarks. The detection pass cuts the chip of
every detection as it goes (:class:`ChipWriter`), so the crops are picked from
those chips (:func:`track_crops_from_chips`) without decoding the video again;
:func:`write_track_crops` decodes it for a template the chips were not cut for. Pixels go into the same Parquet
file as their metadata (JPEG bytes in the ``image`` column), written in row
groups as the video streams by, so memory stays flat in movie length and one
file per movie travels to S3 as well as to a local disk. The filters judge
every crop against the whole movie's (:func:`vcn.faces.filters.judge_crops`),
so their verdicts are written once the video has streamed by: the images go to
a file beside the output first, which is then copied row group by row group
with the verdicts filled in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vcn.faces.align import align_face, get_template
from vcn.faces.detection.video import LANDMARK_COLUMNS
from vcn.faces.filters import FilterConfig, face_rank_in_frame, judge_crops, sharpness
from vcn.media import VideoReader
from vcn.stores.files import parquet_batches

#: Schema of the ``track_crops`` table; ``image`` holds the aligned crop as JPEG.
CROPS_SCHEMA = {
    "crop_id": pl.Int64,
    "track_id": pl.Int64,
    "detection_id": pl.Int64,
    "frame": pl.Int64,
    "shot_id": pl.Int32,
    "time_s": pl.Float64,
    "face_area": pl.Float32,
    "frame_rank": pl.Int32,
    "sharpness": pl.Float32,
    "rejected": pl.Boolean,
    "reject_reason": pl.String,
    "template": pl.String,
    "image": pl.Binary,
}

#: The same schema for pyarrow's streaming Parquet writer.
_ARROW_SCHEMA = pl.DataFrame(schema=CROPS_SCHEMA).to_arrow().schema


@dataclass(frozen=True)
class CropConfig:
    """How crops are sampled and aligned.

    Attributes:
        template: Alignment template of the face-ID backbone (``dlib-150`` for
            the dlib ResNet, ``arcface-112`` for ArcFace-style models).
        every_s: Sampling interval along a track, in seconds of video.
        jpeg_quality: Quality of the stored crops (95 keeps them visually lossless).
        row_group: Crops per Parquet row group (bounds memory while writing).
        filters: The crop filters.
    """

    template: str = "dlib-150"
    every_s: float = 0.25
    jpeg_quality: int = 95
    row_group: int = 512
    filters: FilterConfig = field(default_factory=FilterConfig)


def select_crops(tracked: pl.DataFrame, every_s: float) -> pl.DataFrame:
    """Picks the detections to crop: per track, the first, then one each ``every_s`` seconds.

    Adds ``face_area`` and ``frame_rank`` (rank among all faces of its frame).
    """
    if tracked.is_empty():
        return tracked.with_columns(
            pl.lit(None, pl.Float32).alias("face_area"), pl.lit(None, pl.Int32).alias("frame_rank")
        )
    with_rank = (
        tracked.with_columns(
            ((pl.col("x2") - pl.col("x1")) * (pl.col("y2") - pl.col("y1"))).cast(pl.Float32).alias("face_area"),
            face_rank_in_frame(tracked).alias("frame_rank"),
        )
        .filter(pl.col("track_id").is_not_null())
        .sort("track_id", "frame")
    )
    keep = np.zeros(with_rank.height, dtype=bool)
    tracks = with_rank["track_id"].to_numpy()
    times = with_rank["time_s"].to_numpy()
    last_track, last_time = None, -np.inf
    for i in range(with_rank.height):
        if tracks[i] != last_track:
            last_track, last_time = tracks[i], -np.inf
        if times[i] - last_time >= every_s - 1e-6:
            keep[i] = True
            last_time = times[i]
    return with_rank.filter(pl.Series(keep))


#: Schema of a movie's detection chips: the aligned chip of every detection, cut in the detection pass
#: (:class:`ChipWriter`), so that the crops are taken from it instead of from another pass over the video.
CHIPS_SCHEMA = {
    "detection_id": pl.Int64,
    "sharpness": pl.Float32,
    "unalignable": pl.Boolean,
    "image": pl.Binary,
}
_CHIPS_ARROW_SCHEMA = pl.DataFrame(schema=CHIPS_SCHEMA).to_arrow().schema
#: Keys of the chips file's Parquet metadata: the template its chips are aligned for, and the
#: :func:`detections_key` of the detections they were cut at.
_TEMPLATE_KEY, _DETECTIONS_KEY = b"vcn.template", b"vcn.detections"
#: The detection columns a chip depends on.
CHIP_KEY_COLUMNS = ["detection_id", "frame", *LANDMARK_COLUMNS]


def detections_key(detections: pl.DataFrame) -> str:
    """A fingerprint of the detections whose chips a chips file holds (ids, frames, landmarks)."""
    import hashlib

    digest = hashlib.sha1()
    table = detections.select(CHIP_KEY_COLUMNS).sort("detection_id")
    for name in CHIP_KEY_COLUMNS:
        digest.update(table[name].to_numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ChipsInfo:
    """What a detection chips file was made for.

    Attributes:
        template: The alignment template of its chips.
        detections: :func:`detections_key` of the detections it was cut at (None: not finished).
    """

    template: str | None
    detections: str | None


def chips_info(path: str | os.PathLike) -> ChipsInfo:
    """The template and detections a chips file was made for."""
    metadata = pq.ParquetFile(str(path)).metadata.metadata or {}
    template, key = metadata.get(_TEMPLATE_KEY), metadata.get(_DETECTIONS_KEY)
    return ChipsInfo(
        template=None if template is None else template.decode(), detections=None if key is None else key.decode()
    )


def cut_chip(image: np.ndarray, landmarks: np.ndarray, template) -> tuple[np.ndarray, str | None, float]:
    """One face aligned from a full-resolution frame: (chip, reject reason, sharpness).

    Degenerate landmarks (all five at one spot) give a black chip, rejected as
    ``unalignable`` with sharpness 0, so the row stays visible.
    """
    try:
        chip = align_face(image, landmarks, template)
    except ValueError:
        return np.zeros((template.size, template.size, 3), np.uint8), "unalignable", 0.0
    return chip, None, sharpness(chip)


class ChipWriter:
    """Aligns and stores the chip of every detection as the detection pass goes by.

    Rows go to Parquet (:data:`CHIPS_SCHEMA`) a row group at a time, so memory
    stays flat in movie length; the file's metadata names the template.

    Args:
        path: The file to write.
        template: Name of the alignment template (:func:`vcn.faces.align.get_template`).
        jpeg_quality: As :attr:`CropConfig.jpeg_quality` (the crops copy these bytes).
        row_group: Chips per row group.
    """

    def __init__(self, path: str | os.PathLike, template: str, jpeg_quality: int = 95, row_group: int = 512) -> None:
        self.template = get_template(template)
        self.jpeg_quality = jpeg_quality
        self.row_group = row_group
        self._writer = pq.ParquetWriter(str(path), _CHIPS_ARROW_SCHEMA, compression="zstd")
        self._writer.add_key_value_metadata({_TEMPLATE_KEY: self.template.name.encode()})
        self._buffer: dict[str, list] = {name: [] for name in CHIPS_SCHEMA}
        self.count = 0
        #: :func:`detections_key` of the detections, set by the caller once they are known; written at close.
        self.detections: str | None = None

    def add(self, image: np.ndarray, detection_ids: np.ndarray, landmarks: np.ndarray) -> None:
        """The chips of one frame's detections: ``image`` at full resolution, ``landmarks`` (n, 5, 2) in its pixels."""
        for detection_id, points in zip(np.asarray(detection_ids).tolist(), landmarks):
            chip, reason, sharp = cut_chip(image, points, self.template)
            self._buffer["detection_id"].append(int(detection_id))
            self._buffer["sharpness"].append(sharp)
            self._buffer["unalignable"].append(reason is not None)
            self._buffer["image"].append(encode_jpeg(chip, self.jpeg_quality))
            self.count += 1
        if len(self._buffer["detection_id"]) >= self.row_group:
            self._flush()

    def close(self) -> None:
        self._flush()
        if self.detections is not None:
            self._writer.add_key_value_metadata({_DETECTIONS_KEY: self.detections.encode()})
        self._writer.close()

    def _flush(self) -> None:
        if self._buffer["detection_id"]:
            self._writer.write_table(pa.table(self._buffer, schema=_CHIPS_ARROW_SCHEMA))
            for values in self._buffer.values():
                values.clear()

    def __enter__(self) -> ChipWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_track_crops(
    reader: VideoReader,
    tracked: pl.DataFrame,
    out_path: str | os.PathLike,
    config: CropConfig = CropConfig(),
) -> pl.DataFrame:
    """Decodes the frames that hold selected crops, aligns, filters and writes them.

    Args:
        reader: A full-resolution reader of the movie (``max_side=None``).
        tracked: The tracked detections table (``face_tracks`` output).
        out_path: Parquet file to write (:data:`CROPS_SCHEMA`).
        config: Sampling, alignment and filter settings.

    Returns:
        The crops table without the ``image`` column.
    """
    if reader.max_side is not None:
        raise ValueError("crops must be cut from full-resolution frames (reader.max_side=None)")
    template = get_template(config.template)
    chosen = select_crops(tracked, config.every_s).sort("frame", "track_id")
    by_frame: dict[int, list[int]] = {}
    for i, f in enumerate(chosen["frame"].to_list()):
        by_frame.setdefault(f, []).append(i)
    landmarks = chosen.select(LANDMARK_COLUMNS).to_numpy().reshape(-1, 5, 2)

    def pieces():
        if not by_frame:
            return
        for frame in reader.frames(want=by_frame.__contains__):
            if frame.image is None:
                continue
            for i in by_frame[frame.index]:
                chip, reason, sharp = cut_chip(frame.image, landmarks[i], template)
                yield i, reason, sharp, encode_jpeg(chip, config.jpeg_quality)

    return _write_crops(chosen, pieces(), out_path, config, template.name)


def track_crops_from_chips(
    chips_path: str | os.PathLike,
    tracked: pl.DataFrame,
    out_path: str | os.PathLike,
    config: CropConfig = CropConfig(),
) -> pl.DataFrame:
    """The crops of :func:`write_track_crops`, taken from the detection pass's chips instead of the video.

    The chips were cut from the same full-resolution frames at the same landmarks
    and encoded at the same quality, so the file holds the same crops, byte for byte.

    Args:
        chips_path: The movie's detection chips (:class:`ChipWriter`), aligned for ``config.template``.
        tracked: The tracked detections table (``face_tracks`` output).
        out_path: Parquet file to write (:data:`CROPS_SCHEMA`).
        config: Sampling, alignment and filter settings.

    Raises:
        ValueError: The chips are aligned for another template, or lack a chosen detection.
    """
    template = get_template(config.template)
    found = chips_info(chips_path).template
    if found != template.name:
        raise ValueError(f"{chips_path}: the detection chips are aligned for {found!r}, the crops for {template.name!r}")
    chosen = select_crops(tracked, config.every_s).sort("frame", "track_id")
    row_of = dict(zip(chosen["detection_id"].to_list(), range(chosen.height)))
    wanted = pa.array(list(row_of), type=pa.int64())

    def pieces():
        # Chips and chosen crops both run in frame order; the crops of one frame come in track order.
        waiting: dict[int, tuple] = {}
        next_row = 0
        columns = ["detection_id", "sharpness", "unalignable", "image"]
        for batch in parquet_batches(chips_path, config.row_group, columns):
            batch = batch.filter(pc.is_in(batch.column("detection_id"), value_set=wanted))
            ids, sharp, unalignable, images = (batch.column(c).to_pylist() for c in columns)
            for detection_id, s, bad, image in zip(ids, sharp, unalignable, images):
                waiting[row_of[detection_id]] = ("unalignable" if bad else None, s, image)
            while next_row in waiting:
                yield (next_row, *waiting.pop(next_row))
                next_row += 1
        if next_row < chosen.height:
            raise ValueError(
                f"{chips_path}: the detection chips lack {chosen.height - next_row} of the {chosen.height} crops' "
                "detections"
            )

    return _write_crops(chosen, pieces(), out_path, config, template.name)


def _write_crops(chosen: pl.DataFrame, pieces, out_path: str | os.PathLike, config: CropConfig, template: str) -> pl.DataFrame:
    """Writes the crops (``pieces``: (row of ``chosen``, reject reason, sharpness, JPEG) in crop order), judges
    them against the movie's own and writes the verdicts; returns the table without images."""
    cols = {
        c: chosen[c].to_numpy()
        for c in ("track_id", "detection_id", "frame", "shot_id", "time_s", "face_area", "frame_rank")
    }
    meta: dict[str, list] = {name: [] for name in CROPS_SCHEMA if name != "image"}
    buffer: dict[str, list] = {name: [] for name in CROPS_SCHEMA}
    out_path = Path(out_path)
    unjudged = out_path.with_name(out_path.name + ".unjudged")
    writer = pq.ParquetWriter(str(unjudged), _ARROW_SCHEMA, compression="zstd")
    try:
        try:
            for i, reason, sharp, jpeg in pieces:
                row = {
                    "crop_id": len(meta["crop_id"]),
                    "track_id": int(cols["track_id"][i]),
                    "detection_id": int(cols["detection_id"][i]),
                    "frame": int(cols["frame"][i]),
                    "shot_id": int(cols["shot_id"][i]),
                    "time_s": float(cols["time_s"][i]),
                    "face_area": float(cols["face_area"][i]),
                    "frame_rank": int(cols["frame_rank"][i]),
                    "sharpness": sharp,
                    "rejected": reason is not None,
                    "reject_reason": reason,
                    "template": template,
                }
                for k, v in row.items():
                    meta[k].append(v)
                    buffer[k].append(v)
                buffer["image"].append(jpeg)
                if len(buffer["crop_id"]) >= config.row_group:
                    _flush(writer, buffer)
            _flush(writer, buffer)
        finally:
            writer.close()
        # Judge every crop against the movie's, then write the verdicts beside the images.
        table = pl.DataFrame(meta, schema={k: v for k, v in CROPS_SCHEMA.items() if k != "image"})
        reasons = judge_crops(table, config.filters)
        table = table.with_columns(
            pl.Series("reject_reason", reasons, dtype=pl.String),
            pl.Series("rejected", [r is not None for r in reasons], dtype=pl.Boolean),
        )
        _write_verdicts(unjudged, out_path, table, config.row_group)
    finally:
        unjudged.unlink(missing_ok=True)
    return table


def _write_verdicts(source: Path, out_path: Path, table: pl.DataFrame, row_group: int) -> None:
    """Copies ``source`` (written in crop id order) to ``out_path`` with ``table``'s verdict columns."""
    rejected = table["rejected"].to_arrow()
    reasons = table["reject_reason"].to_arrow()
    names = _ARROW_SCHEMA.names
    with pq.ParquetWriter(str(out_path), _ARROW_SCHEMA, compression="zstd") as writer:
        done = 0
        for batch in parquet_batches(source, row_group):
            part = pa.Table.from_batches([batch])
            n = part.num_rows
            part = part.set_column(names.index("rejected"), "rejected", rejected.slice(done, n))
            part = part.set_column(names.index("reject_reason"), "reject_reason", reasons.slice(done, n))
            writer.write_table(part.cast(_ARROW_SCHEMA))
            done += n


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return data.tobytes()


def decode_jpeg(data: bytes) -> np.ndarray:
    """RGB uint8 image from JPEG bytes."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("not a decodable image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_crop_images(path: str | os.PathLike, crop_ids: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Crop ids and (N, S, S, 3) uint8 RGB images from a ``track_crops`` file, in file order.

    The file is streamed in batches and only the wanted crops are kept, so picking
    a few thumbnails from a feature film's crops does not load all its images.
    """
    wanted = None if crop_ids is None else pa.array(crop_ids, type=pa.int64())
    ids: list[np.ndarray] = []
    images: list[np.ndarray] = []
    for batch in parquet_batches(path, 1024, ["crop_id", "image"]):
        if wanted is not None:
            batch = batch.filter(pc.is_in(batch.column("crop_id"), value_set=wanted))
        if batch.num_rows == 0:
            continue
        ids.append(batch.column("crop_id").to_numpy())
        images.extend(decode_jpeg(b) for b in batch.column("image").to_pylist())
    crop_id_array = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    if not images:
        return crop_id_array, np.zeros((0, 0, 0, 3), np.uint8)
    return crop_id_array, np.stack(images)


def _flush(writer: pq.ParquetWriter, buffer: dict[str, list]) -> None:
    if not buffer["crop_id"]:
        return
    writer.write_table(pa.table({k: buffer[k] for k in _ARROW_SCHEMA.names}, schema=_ARROW_SCHEMA))
    for v in buffer.values():
        v.clear()
