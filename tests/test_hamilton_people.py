"""The Hamilton clip's named people, labelled by eye: none of them may vanish from the clustering.

``tests/data/hamilton_people.json`` anchors each person to tracks by (frame, face box
centre). The clip is small (14 tracks) and soft (640x360): the crop filters and the
quality screen judge it against itself, so that each named person keeps a track
that is clustered, and every track left Unknown says why.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import hamilton_artifact, processed_hamilton
from vcn.faces.filters import REASONS
from vcn.stores.warehouse import Warehouse
from vcn_assets.cli import main

pytestmark = pytest.mark.slow

PEOPLE = Path(__file__).parent / "data" / "hamilton_people.json"
#: What an Unknown track's reason may say (vcn_assets.assets.clusters.unknown_reasons).
UNKNOWN_REASONS = {"low_quality", "not_clustered", *(f"no_kept_crops: {r}" for r in (*REASONS, "no_crops"))}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    yield from processed_hamilton(tmp_path_factory)


def _tracks_of_people(home: Path) -> dict[str, set[int]]:
    """Each labelled person's tracks: the tracks of the detections whose boxes hold the person's anchors."""
    detections = pl.read_parquet(hamilton_artifact(home, "face_tracks.parquet")).filter(pl.col("track_id").is_not_null())
    people = json.loads(PEOPLE.read_text())["people"]
    found: dict[str, set[int]] = {}
    for person, entry in people.items():
        tracks = set()
        for anchor in entry["anchors"]:
            x, y = anchor["x"], anchor["y"]
            hits = detections.filter(
                (pl.col("frame") == anchor["frame"])
                & (pl.col("x1") <= x)
                & (x <= pl.col("x2"))
                & (pl.col("y1") <= y)
                & (y <= pl.col("y2"))
            )
            assert hits.height >= 1, f"{person}: no tracked face at {anchor}"
            # Nested boxes: the one whose centre is nearest the anchor.
            centre = ((pl.col("x1") + pl.col("x2")) / 2 - x) ** 2 + ((pl.col("y1") + pl.col("y2")) / 2 - y) ** 2
            tracks.add(int(hits.sort(centre)["track_id"][0]))
        found[person] = tracks
    return found


def test_the_labels_name_distinct_tracks(env):
    people = _tracks_of_people(env)
    assert len(people) == 4
    every = [t for tracks in people.values() for t in tracks]
    assert len(every) == len(set(every)), people


def test_every_named_person_has_a_clustered_track(env):
    clusters = pl.read_parquet(hamilton_artifact(env, "face_clusters.parquet"))
    cluster_of = dict(zip(clusters["track_id"].to_list(), clusters["cluster"].to_list()))
    reason_of = dict(zip(clusters["track_id"].to_list(), clusters["unknown_reason"].to_list()))
    for person, tracks in _tracks_of_people(env).items():
        clustered = [t for t in tracks if cluster_of[t] is not None]
        assert clustered, f"{person}: every track Unknown ({ {t: reason_of[t] for t in tracks} })"


def test_every_unknown_track_says_why(env):
    clusters = pl.read_parquet(hamilton_artifact(env, "face_clusters.parquet"))
    unknown = clusters.filter(pl.col("cluster").is_null())
    assert unknown.height > 0  # the clip's dark, defocused audience faces
    assert unknown["unknown_reason"].null_count() == 0
    assert set(unknown["unknown_reason"].to_list()) <= UNKNOWN_REASONS
    assert clusters.filter(pl.col("cluster").is_not_null())["unknown_reason"].null_count() == len(
        clusters.filter(pl.col("cluster").is_not_null())
    )
    # A track without kept crops is Unknown for that reason, named after its crops' rejections.
    kept = pl.read_parquet(hamilton_artifact(env, "track_crops.parquet"), columns=["track_id", "rejected"]).filter(
        ~pl.col("rejected")
    )
    without = unknown.filter(~pl.col("track_id").is_in(kept["track_id"].unique().to_list()))
    assert all(r.startswith("no_kept_crops: ") for r in without["unknown_reason"].to_list())
    assert (unknown.filter(pl.col("low_quality"))["unknown_reason"] == "low_quality").all()

    # The same in the warehouse (the table and the analysts' track view), the export and the asset's metadata.
    wh = Warehouse(str(env / "warehouse.duckdb"))
    stored = wh.query(
        "SELECT track_id, unknown_reason FROM track_clusters WHERE movie_id = 'hamilton' ORDER BY track_id"
    )
    assert stored.rows() == clusters.sort("track_id").select("track_id", "unknown_reason").rows()
    out = env / "export"
    assert main(["export", "hamilton", "--out", str(out)]) == 0
    with open(out / "clusters.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {int(r["track_id"]): r["unknown_reason"] or None for r in rows} == dict(
        zip(clusters["track_id"].to_list(), clusters["unknown_reason"].to_list())
    )
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        (record,) = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("face_clusters"), asset_partitions=["hamilton"]), limit=1
        ).records
    counts = record.asset_materialization.metadata["unknown_reasons"].value
    assert counts == dict(unknown["unknown_reason"].value_counts().iter_rows())


def test_the_crop_filters_judged_the_clip_against_itself(env):
    """The soft 360p clip keeps every track that shows a face worth clustering, by its best crops if need be."""
    crops = pl.read_parquet(
        hamilton_artifact(env, "track_crops.parquet"), columns=["track_id", "face_area", "sharpness", "rejected"]
    )
    people = _tracks_of_people(env)
    kept = set(crops.filter(~pl.col("rejected"))["track_id"].to_list())
    assert all(people_tracks <= kept for people_tracks in people.values()), people
    # The pianist at the piano: a face about 28 px tall, under the old fixed 40 x 40 px, kept.
    far = crops.filter(pl.col("track_id").is_in(list(people["pianist"])) & (pl.col("face_area") < 1600))
    assert far.height > 0 and not far["rejected"].all()


@pytest.mark.xfail(
    strict=False,
    reason="the pianist, 33 px tall and soft at the piano, then a large profile close-up, is two clusters: "
    "SFace puts his two tracks 0.66 apart (cosine), as far as the closest two people on screen together "
    "in the clip",
)
def test_each_named_person_is_one_cluster_of_their_own(env):
    clusters = pl.read_parquet(hamilton_artifact(env, "face_clusters.parquet"))
    cluster_of = dict(zip(clusters["track_id"].to_list(), clusters["cluster"].to_list()))
    people = _tracks_of_people(env)
    own = {}
    for person, tracks in people.items():
        ids = {cluster_of[t] for t in tracks if cluster_of[t] is not None}
        assert len(ids) == 1, f"{person}: tracks {sorted(tracks)} in clusters {ids}"
        own[person] = ids.pop()
    assert len(set(own.values())) == len(own), own
