"""From a movie file to aligned face-track crops: shots, frames, detections, tracks, crops.

Each asset reads its inputs from the artifact store, calls the core, writes its
Parquet file atomically, loads the warehouse table and returns metadata.
"""

import time
from typing import Iterator

import dagster as dg
import polars as pl
from pydantic import Field

from resources import ArtifactStore, BackboneResource, DetectorResource, MovieRegistry, WarehouseResource
from vcn.errors import VideoError
from vcn.faces.crops import (
    CHIP_KEY_COLUMNS,
    ChipWriter,
    CropConfig,
    chips_info,
    detections_key,
    track_crops_from_chips,
    write_track_crops,
)
from vcn.faces.detection.video import appearance_matrix, detect_faces, sampled_frames
from vcn.faces.filters import FilterConfig, movie_cuts, track_reject_reason
from vcn.faces.tracking import TrackerConfig, summarise_tracks, track_detections
from vcn.media import VideoReader
from vcn.media.frames import DEFAULT_DETECT_FPS, build_frame_index, read_frame_times, sample_stride
from vcn.media.scan import MovieScan, OnePassUnavailable
from vcn.media.shots import ShotConfig, ShotScan, scan_shots
from vcn.stores.warehouse import Warehouse
from vcn_assets import artifacts
from vcn_assets.assets.recording import CODE_VERSION, StageRun, movie_asset, preview, stage
from vcn_assets.jobs import GPU_POOL
from vcn_assets.partitions import movies

GROUP = "preprocess"


class ScanConfig(dg.Config):
    """Settings of the pass over the video: the shot detector, and how often faces are detected."""

    detector: str = Field(
        default="content", description="PySceneDetect detector: 'content' (HSV change) or 'adaptive'."
    )
    threshold: float | None = Field(default=None, description="Detector threshold; None uses PySceneDetect's default.")
    min_shot_s: float = Field(default=0.4, description="Shortest shot in seconds; closer cuts merge.")
    detect_fps: float = Field(
        default=DEFAULT_DETECT_FPS, description="Frames per second of video on which faces are detected."
    )

    def shot_config(self) -> ShotConfig:
        return ShotConfig(detector=self.detector, threshold=self.threshold, min_shot_s=self.min_shot_s)


class TracksConfig(dg.Config):
    max_age_s: float = Field(default=1.0, description="Seconds a track survives without a detection.")
    n_init: int = Field(default=2, description="Matches before a track is confirmed.")
    min_track_detections: int = Field(default=2, description="Shorter tracks are dropped as noise.")


class CropsConfig(dg.Config):
    template: str | None = Field(
        default=None,
        description="Alignment template of the crops ('dlib-150', 'arcface-112'); None: the base model's, so that "
        "its chips need no realignment.",
    )
    every_s: float = Field(default=0.25, description="Seconds between two crops of a track.")
    min_face_area: float | None = Field(
        default=None,
        description="A fixed smallest face box area (px of the original video); None judges each face against the "
        "movie's own faces (vcn.faces.filters).",
    )
    top_k: int = Field(default=5, description="Largest faces per frame that are kept.")
    min_sharpness: float | None = Field(
        default=None,
        description="A fixed smallest sharpness (variance of the Laplacian at 64 px) of an aligned crop; None judges "
        "each crop against the movie's own (vcn.faces.filters).",
    )


def _video(store: ArtifactStore, movie_id: str, **options) -> VideoReader:
    """A reader of the movie's video (an S3 source is read from its local copy; errors name the S3 object)."""
    from vcn.media.parallel import default_workers

    source = MovieRegistry(store).local_source(movie_id)
    options.setdefault("workers", default_workers())
    try:
        return VideoReader(source, **options)
    except VideoError as error:
        registered = MovieRegistry(store).source(movie_id)
        if registered == source:
            raise
        raise type(error)(registered, error.reason) from None


#: The assets one pass over the video makes, in order, and the name of the step (op) that makes them.
SCAN_ASSETS = ("shots", "frames", "face_detections")
SCAN_OP = "movie_scan"


@dg.multi_asset(
    name=SCAN_OP,
    specs=[
        dg.AssetSpec(
            "shots", description="Shot boundaries (PySceneDetect); also records the movie's video facts.",
            group_name=GROUP, code_version=CODE_VERSION, kinds={"pyav", "parquet", "duckdb"},
        ),
        dg.AssetSpec(
            "frames", deps=["shots"],
            description="The frame index (time, key frame, shot of every frame) and the frames sampled for detection.",
            group_name=GROUP, code_version=CODE_VERSION, kinds={"parquet", "duckdb"},
        ),
        dg.AssetSpec(
            "face_detections", deps=["frames"],
            description="Face boxes, five landmarks and scores on every sampled frame; and, from the same decoded "
            "frames at full resolution, every detection's chip aligned for the base model's template "
            "(detection_chips.parquet).",
            group_name=GROUP, code_version=CODE_VERSION, kinds={"onnx", "parquet"},
        ),
    ],
    partitions_def=movies,
    can_subset=True,
    pool=GPU_POOL,
)
def movie_scan(
    context: dg.AssetExecutionContext,
    config: ScanConfig,
    store: ArtifactStore,
    warehouse: WarehouseResource,
    detector: DetectorResource,
    backbone: BackboneResource,
) -> Iterator[dg.MaterializeResult]:
    """Shots, the frame index and face detections, from one pass over the video when all three are wanted.

    The pass (:class:`vcn.media.scan.MovieScan`) decodes each frame once: the shot detector sees
    every frame, and the frames sampled for detection go on to the detector as soon as their shot's
    start is known; with several decoding processes each takes a segment of the movie. Each asset is
    still recorded as its own stage. A subset (one asset alone, say ``frames`` after its settings
    changed) runs each selected asset's own step, as does the whole where the pass cannot stand in
    for them (:class:`vcn.media.scan.OnePassUnavailable`: the adaptive shot detector with several
    decoding processes, a segment that does not decode exactly).
    """
    wanted = [name for name in SCAN_ASSETS if dg.AssetKey(name) in context.selected_asset_keys]
    wh = warehouse.get()
    if len(wanted) == len(SCAN_ASSETS):
        try:
            yield from _one_pass(context, config, store, wh, detector, backbone)
            return
        except OnePassUnavailable as exc:
            context.log.warning(f"{context.partition_key}: {exc}; finding the shots and faces in separate passes")
    if "shots" in wanted:
        yield _shots(context, config, store, wh)
    if "frames" in wanted:
        yield _frames(context, config, store, wh)
    if "face_detections" in wanted:
        yield _face_detections(context, store, wh, detector, backbone)


def _one_pass(
    context: dg.AssetExecutionContext,
    config: ScanConfig,
    store: ArtifactStore,
    wh: Warehouse,
    detector: DetectorResource,
    backbone: BackboneResource,
) -> list[dg.MaterializeResult]:
    """The three assets from one pass: the pass is the ``shots`` stage, less the detector's time, which is
    ``face_detections``'s."""
    template = backbone.template()
    with stage(context, wh, "shots") as shots_run:
        reader = _video(
            store, shots_run.movie_id, max_side=detector.max_side, keep_full=True,
            progress=shots_run.meter("frames decoded", "frames"),
        )
        scan = MovieScan(reader, config.shot_config(), sample_stride(reader.info.fps, config.detect_fps))
        model = detector.create()
        started = time.perf_counter()
        sampled = ((frame, shot, frame.time_s) for frame, shot in scan.sampled_frames())
        detections = _detect_with_chips(store, shots_run.movie_id, template, sampled, reader, model, detector)
        detecting_s = time.perf_counter() - started - scan.seconds
        shots_run.seconds_adjust = -detecting_s
        shots_run.details["one_pass"] = True
        shots_metadata = _record_shots(context, shots_run, store, wh, reader, scan.shot_scan)
        shots_run.frames_decoded = scan.frames_decoded
    results = [shots_run.result(shots_metadata, of_one_of_several=True)]
    with stage(context, wh, "frames") as run:
        metadata = _record_frames(run, store, wh, scan.frames, scan.stride)
    results.append(run.result(metadata, of_one_of_several=True))
    with stage(context, wh, "face_detections") as run:
        run.seconds_adjust = detecting_s
        run.details["one_pass"] = True
        metadata = _record_detections(run, store, wh, detections, scan.frames, model, detector, template)
    results.append(run.result(metadata, of_one_of_several=True))
    return results


def _shots(context: dg.AssetExecutionContext, config: ScanConfig, store: ArtifactStore, wh: Warehouse) -> dg.MaterializeResult:
    """The shots in a pass of their own."""
    with stage(context, wh, "shots") as run:
        reader = _video(store, run.movie_id, progress=run.meter("frames decoded", "frames"))
        metadata = _record_shots(context, run, store, wh, reader, scan_shots(reader, config.shot_config()))
    return run.result(metadata, of_one_of_several=True)


def _record_shots(
    context: dg.AssetExecutionContext, run: StageRun, store: ArtifactStore, wh: Warehouse, reader: VideoReader,
    scan: ShotScan,
) -> dict:
    """Writes the shots and the frame timing of the pass ``reader`` made; the asset's metadata."""
    table = scan.shots
    store.write_parquet(run.movie_id, artifacts.FRAME_TIMES, scan.frame_times)
    path = store.write_parquet(run.movie_id, artifacts.SHOTS, table)
    info = reader.info.as_dict() | {
        "decoded_frames": reader.report.frames,
        "decode_warnings": "; ".join(reader.report.warnings),
    }
    wh.replace_movie_rows("movies", run.movie_id, pl.DataFrame([info]))
    wh.replace_movie_rows("shots", run.movie_id, table)
    run.frames, run.items, run.row_count = reader.report.frames, table.height, table.height
    run.frames_decoded = reader.report.frames
    run.video_seconds = float(table["end_s"].max() or 0.0) if table.height else 0.0
    run.artifact = str(path)
    for warning in reader.report.warnings:
        context.log.warning(f"{run.movie_id}: {warning}")
    return {
        "shots": table.height,
        "frames": reader.report.frames,
        "width": reader.info.width,
        "height": reader.info.height,
        "fps": reader.info.fps,
        "rotation": reader.info.rotation,
        "decode_warnings": dg.MetadataValue.text("; ".join(reader.report.warnings) or "none"),
        "preview": preview(table),
    }


def _frames(context: dg.AssetExecutionContext, config: ScanConfig, store: ArtifactStore, wh: Warehouse) -> dg.MaterializeResult:
    """The frame index from the timing the shots pass recorded; only shots made by a release that kept none
    (no ``frame_times`` artifact) send it over the video again."""
    with stage(context, wh, "frames") as run:
        fps = wh.query("SELECT fps FROM movies WHERE movie_id = ?", [run.movie_id])
        if store.exists(run.movie_id, artifacts.FRAME_TIMES) and fps.height:
            frame_times = store.read_parquet(run.movie_id, artifacts.FRAME_TIMES)
            stride = sample_stride(float(fps["fps"][0] or 0.0), config.detect_fps)
        else:
            reader = _video(store, run.movie_id, progress=run.meter("frames decoded", "frames"))
            frame_times = read_frame_times(reader)
            stride = sample_stride(reader.info.fps, config.detect_fps)
            run.frames_decoded = reader.report.frames
        table = build_frame_index(frame_times, store.read_parquet(run.movie_id, artifacts.SHOTS), stride)
        metadata = _record_frames(run, store, wh, table, stride)
    return run.result(metadata, of_one_of_several=True)


def _record_frames(run: StageRun, store: ArtifactStore, wh: Warehouse, table: pl.DataFrame, stride: int) -> dict:
    """Writes the frame index; the asset's metadata."""
    path = store.write_parquet(run.movie_id, artifacts.FRAMES, table)
    wh.replace_movie_rows("frames", run.movie_id, table)
    sampled = int(table["sampled"].sum())
    run.frames, run.items, run.row_count, run.artifact = table.height, sampled, table.height, str(path)
    run.video_seconds = float(table["time_s"].max() or 0.0) if table.height else 0.0
    run.details["stride"] = stride
    return {"frames": table.height, "sampled_frames": sampled, "stride": stride}


def _face_detections(
    context: dg.AssetExecutionContext, store: ArtifactStore, wh: Warehouse, detector: DetectorResource,
    backbone: BackboneResource,
) -> dg.MaterializeResult:
    """The faces on the sampled frames of the frame index, in a pass of their own."""
    template = backbone.template()
    with stage(context, wh, "face_detections") as run:
        frame_table = store.read_parquet(run.movie_id, artifacts.FRAMES)
        reader = _video(
            store, run.movie_id, max_side=detector.max_side, keep_full=True, progress=run.meter("frames decoded", "frames")
        )
        model = detector.create()
        frames = sampled_frames(reader, frame_table)
        table = _detect_with_chips(store, run.movie_id, template, frames, reader, model, detector)
        run.frames_decoded = reader.report.frames
        metadata = _record_detections(run, store, wh, table, frame_table, model, detector, template)
    return run.result(metadata, of_one_of_several=True)


def _detect_with_chips(
    store: ArtifactStore, movie_id: str, template: str, frames: Iterator, reader: VideoReader, model,
    detector: DetectorResource,
) -> pl.DataFrame:
    """The faces on ``frames`` (frame, shot id, time), each detection's chip going to the movie's detection chips."""
    with store.writing(movie_id, artifacts.DETECTION_CHIPS) as chips_path:
        with ChipWriter(chips_path, template) as chips:
            table = detect_faces(frames, reader, model, batch_size=detector.batch_size, chips=chips)
            chips.detections = detections_key(table)
    return table


def _record_detections(
    run: StageRun, store: ArtifactStore, wh: Warehouse, table: pl.DataFrame, frame_table: pl.DataFrame, model,
    detector: DetectorResource, template: str,
) -> dict:
    """Writes the detections; the asset's metadata."""
    path = store.write_parquet(run.movie_id, artifacts.DETECTIONS, table)
    sampled = int(frame_table["sampled"].sum())
    run.frames, run.items, run.row_count, run.artifact = sampled, table.height, table.height, str(path)
    run.video_seconds = float(frame_table["time_s"].max() or 0.0) if frame_table.height else 0.0
    runs_on = getattr(model, "active_providers", None)
    run.details |= {"detector": model.name, "max_side": detector.max_side, "runs_on": runs_on, "chips_template": template}
    return {
        "detections": table.height,
        "frames_searched": sampled,
        "frames_with_faces": table["frame"].n_unique() if table.height else 0,
        "detector": model.name,
        "detector_runs_on": ", ".join(runs_on) if runs_on else "-",
        "preview": preview(table.drop("appearance")),
    }


@movie_asset(group=GROUP, deps=["face_detections"], kinds={"parquet", "duckdb"})
def face_tracks(
    context: dg.AssetExecutionContext, config: TracksConfig, store: ArtifactStore, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    """Detections linked into tracks inside each shot (Deep SORT); a track never crosses a cut."""
    wh = warehouse.get()
    with stage(context, wh, "face_tracks") as run:
        detections = store.read_parquet(run.movie_id, artifacts.DETECTIONS)
        frame_table = store.read_parquet(run.movie_id, artifacts.FRAMES, columns=["frame", "time_s", "sampled"])
        samples_per_s = _sampling_rate(frame_table)
        tracked = track_detections(
            detections,
            appearance_matrix(detections),
            samples_per_s,
            TrackerConfig(
                max_age_s=config.max_age_s, n_init=config.n_init, min_track_detections=config.min_track_detections
            ),
        ).drop("appearance")
        tracks = summarise_tracks(tracked)
        path = store.write_parquet(run.movie_id, artifacts.TRACKED_DETECTIONS, tracked)
        store.write_parquet(run.movie_id, artifacts.TRACKS, tracks)
        wh.replace_movie_rows("detections", run.movie_id, tracked)
        wh.replace_movie_rows("tracks", run.movie_id, tracks)
        run.items, run.row_count, run.artifact = tracks.height, tracked.height, str(path)
        run.frames = int(frame_table["sampled"].sum())
        run.video_seconds = float(frame_table["time_s"].max() or 0.0) if frame_table.height else 0.0
    untracked = tracked["track_id"].null_count() if tracked.height else 0
    return run.result(
        {
            "tracks": tracks.height,
            "tracked_detections": tracked.height - untracked,
            "untracked_detections": untracked,
            "median_track_length": float(tracks["n_detections"].median() or 0) if tracks.height else 0.0,
            "preview": preview(tracks),
        }
    )


@movie_asset(group=GROUP, deps=[face_tracks], kinds={"pyav", "parquet", "duckdb"})
def track_crops(
    context: dg.AssetExecutionContext,
    config: CropsConfig,
    backbone: BackboneResource,
    store: ArtifactStore,
    warehouse: WarehouseResource,
) -> dg.MaterializeResult:
    """Aligned face crops sampled along each track (for the base model's template), with the crop filters' verdicts.

    The filters judge each crop against the movie's own crops; a track whose
    crops all fail keeps its best few unless none is worth clustering
    (:mod:`vcn.faces.filters`).
    """
    wh = warehouse.get()
    template = config.template or backbone.template()
    with stage(context, wh, "track_crops") as run:
        tracked = store.read_parquet(run.movie_id, artifacts.TRACKED_DETECTIONS)
        filters = FilterConfig(
            min_face_area=config.min_face_area, top_k=config.top_k, min_sharpness=config.min_sharpness
        )
        crop_config = CropConfig(template=template, every_s=config.every_s, filters=filters)
        chips_path, why_not = _detection_chips(store, run.movie_id, template)
        with store.writing(run.movie_id, artifacts.CROPS) as tmp:
            if chips_path is not None:
                crops = track_crops_from_chips(chips_path, tracked, tmp, crop_config)
            else:
                context.log.info(f"{run.movie_id}: cutting the crops from the video: {why_not}")
                reader = _video(store, run.movie_id, progress=run.meter("frames decoded", "frames"))
                crops = write_track_crops(reader, tracked, tmp, crop_config)
                run.frames_decoded = reader.report.frames
        path = store.uri(run.movie_id, artifacts.CROPS)
        wh.replace_movie_rows("track_crops", run.movie_id, crops)
        kept = int((~crops["rejected"]).sum()) if crops.height else 0
        run.items, run.row_count, run.artifact = crops.height, crops.height, str(path)
        run.frames = crops["frame"].n_unique() if crops.height else 0
        cuts = movie_cuts(crops, filters)
        run.details = {
            "kept": kept,
            "template": template,
            "cut_from": "detection chips" if chips_path is not None else "video",
            "min_face_height": round(cuts.min_face_height, 2),
            "min_sharpness": round(cuts.min_sharpness, 2),
        }
    reasons = crops.group_by("reject_reason").len().drop_nulls() if crops.height else pl.DataFrame()
    # Tracks that kept only crops failing a cut (their best), and tracks left without a kept crop, by reason.
    fails_cut = (pl.col("face_area").sqrt() < cuts.min_face_height) | (pl.col("sharpness") < cuts.min_sharpness)
    by_track = crops.group_by("track_id").agg(
        (~pl.col("rejected") & ~fails_cut).any().alias("passes"),
        (~pl.col("rejected")).any().alias("kept"),
        pl.col("reject_reason"),
    )
    dropped: dict[str, int] = {}
    for row in by_track.filter(~pl.col("kept")).iter_rows(named=True):
        reason = track_reject_reason(row["reject_reason"])
        dropped[reason] = dropped.get(reason, 0) + 1
    return run.result(
        {
            "crops": crops.height,
            "kept": kept,
            "rejected": crops.height - kept,
            **{f"rejected_{r}": int(n) for r, n in reasons.iter_rows()},
            "tracks_with_kept_crops": crops.filter(~pl.col("rejected"))["track_id"].n_unique() if kept else 0,
            "tracks_kept_by_their_best_crops": by_track.filter(pl.col("kept") & ~pl.col("passes")).height,
            **{f"tracks_without_kept_crops_{r}": n for r, n in sorted(dropped.items())},
            "min_face_height_px": round(cuts.min_face_height, 2),
            "min_sharpness": round(cuts.min_sharpness, 2),
            "template": template,
        }
    )


def _detection_chips(store: ArtifactStore, movie_id: str, template: str):
    """(local path, None) of the movie's detection chips when they serve crops for ``template``; else (None, why)."""
    if not store.exists(movie_id, artifacts.DETECTION_CHIPS):
        return None, "its detections were found without chips (an earlier release)"
    path = store.local(movie_id, artifacts.DETECTION_CHIPS)
    info = chips_info(path)
    if info.template != template:
        return None, f"its detection chips are aligned for {info.template}, the crops for {template}"
    detections = store.read_parquet(movie_id, artifacts.DETECTIONS, columns=CHIP_KEY_COLUMNS)
    if info.detections != detections_key(detections):
        return None, "its detection chips were cut at other detections than the stored ones"
    return path, None


def _sampling_rate(frame_table: pl.DataFrame) -> float:
    """Detection samples per second of video."""
    duration = float(frame_table["time_s"].max() or 0.0) if frame_table.height else 0.0
    sampled = int(frame_table["sampled"].sum()) if frame_table.height else 0
    return sampled / duration if duration > 0 and sampled > 1 else DEFAULT_DETECT_FPS


preprocess_assets = [movie_scan, face_tracks, track_crops]
