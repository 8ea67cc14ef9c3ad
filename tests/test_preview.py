"""Frame-accurate boxes (every frame of every track) and the preview video drawn from them."""

from __future__ import annotations

import av
import numpy as np
import polars as pl
import pytest

from tests.conftest import HAMILTON
from vcn.faces.tracking import FRAME_BOXES_SCHEMA, boxes_every_frame
from vcn.media.preview import PALETTE, UNKNOWN_COLOUR, TrackLabel, preview_max_side, render_preview


def _tracked(rows: list[tuple[int, int | None, float]]) -> pl.DataFrame:
    """(frame, track_id, x1) rows with 40 x 50 boxes."""
    return pl.DataFrame(
        {
            "frame": [r[0] for r in rows],
            "track_id": [r[1] for r in rows],
            "x1": [r[2] for r in rows],
            "y1": [10.0] * len(rows),
            "x2": [r[2] + 40 for r in rows],
            "y2": [60.0] * len(rows),
            "score": [0.9] * len(rows),
        },
        schema_overrides={"track_id": pl.Int64},
    )


def test_every_frame_of_a_track_gets_a_box_interpolated_between_detections():
    boxes = boxes_every_frame(_tracked([(0, 0, 100.0), (4, 0, 140.0), (8, 0, 140.0), (2, None, 300.0), (4, 1, 0.0)]))
    assert boxes.schema == pl.Schema(FRAME_BOXES_SCHEMA)
    track = boxes.filter(pl.col("track_id") == 0)
    assert track["frame"].to_list() == list(range(9))
    assert track["detected"].to_list() == [1, 0, 0, 0, 1, 0, 0, 0, 1]
    assert track["x1"].to_list() == [100, 110, 120, 130, 140, 140, 140, 140, 140]
    assert track.filter(pl.col("detected") == 0)["score"].null_count() == 6
    # A one-detection track and an untracked detection stay as they are; rows go by frame, untracked last.
    assert boxes.filter(pl.col("track_id") == 1).height == 1
    assert boxes.filter(pl.col("track_id").is_null())["frame"].to_list() == [2]
    assert boxes["frame"].to_list() == sorted(boxes["frame"].to_list())
    assert boxes.filter(pl.col("frame") == 4)["track_id"].to_list() == [0, 1]


def test_boxes_every_frame_names_a_missing_column():
    with pytest.raises(ValueError, match="track_id"):
        boxes_every_frame(_tracked([(0, 0, 1.0)]).drop("track_id"))


def test_labels_and_the_720_line_limit():
    assert TrackLabel(3, "Alice").text == "Alice" and TrackLabel(3).text == "#3" and TrackLabel(None).text == "Unknown"
    assert TrackLabel(None).colour == UNKNOWN_COLOUR and TrackLabel(len(PALETTE) + 1).colour == PALETTE[1]
    assert preview_max_side(1920, 1080) == 1280  # 1080p -> 720p
    assert preview_max_side(1080, 1920) == 720  # portrait: 720 lines tall
    assert preview_max_side(640, 360) == 640  # never enlarged


def test_the_preview_decodes_back_frame_by_frame_with_its_boxes(tmp_path):
    """The Hamilton clip (275 frames, 640x360) with one track's box on frames 10-200, in cluster 3's colour."""
    rows = [(f, 0, 200.0) for f in range(10, 201, 10)]
    tracked = _tracked(rows).with_columns(pl.col("y1") + 100, pl.col("y2") + 150)  # 40 x 100 at (200, 110)
    out = tmp_path / "preview.mp4"
    report = render_preview(HAMILTON, out, boxes_every_frame(tracked), {0: TrackLabel(3, "Alice")})
    assert report.frames == 275 and (report.width, report.height) == (640, 360)
    assert report.boxes_drawn == 191
    assert not list(tmp_path.glob(".*partial*"))  # written in place, nothing left beside it

    colour = np.array(PALETTE[3], dtype=float)
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.width, stream.height) == ("h264", 640, 360)
        near = []
        for index, frame in enumerate(container.decode(stream)):
            image = frame.to_ndarray(format="rgb24").astype(float)
            edge = image[160:200, 199:202].reshape(-1, 3).mean(axis=0)  # the box's left side
            near.append(bool(np.abs(edge - colour).max() < 40))
    assert index + 1 == 275
    assert all(near[10:201]) and not any(near[:10]) and not any(near[201:])
