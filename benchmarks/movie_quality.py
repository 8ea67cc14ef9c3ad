"""End-to-end clustering quality on a movie with a known cast: ``vcn process`` against the stock dlib chain.

The movie and its ground truth come from ``benchmarks/make_cast_movie.py`` (every face
on every frame: identity, box, shot). Each method runs from the video file alone, the
way its users run it:

- **Ours**: ``vcn process VIDEO`` on a fresh data folder (``VCN_HOME``, a new Dagster
  instance and warehouse), then ``vcn export`` for the detections with their tracks and
  the clusters (empty cluster: Unknown). A second row re-clusters the same movie with the
  pretrained model (``finetuned_model`` config ``enabled: false``): ``vcn process`` has no
  ``--no-finetune``, so this runs ``dagster asset materialize`` on the movie's three model
  assets with that config, as a user would from the CLI or the UI's launchpad, keeping the
  preprocessing of the first run.
- **The stock dlib chain** (``face_recognition`` 1.3): every ``--every``-th frame (5:
  4.8 per second at 24 fps), ``face_locations`` (HOG, upsampled once) and
  ``face_encodings`` (raw 128-d dlib descriptors, not normalised); detections linked
  greedily across consecutive sampled frames of one shot at IoU >= 0.3 (PySceneDetect's
  ContentDetector finds the shots); each track's mean descriptor; then average-linkage
  agglomerative clustering cut at 0.6, Chinese Whispers at 0.5 and DBSCAN at eps 0.5
  (``benchmarks/baselines.py``; DBSCAN's noise is Unknown).

Scoring, the same for every method: on each frame, detections are matched one to one
to ground-truth faces, best IoU first, at IoU >= 0.5. A track's identity is the majority
of its matched detections' identities; a track with no matched detection is a false
track, counted apart and left out of the clustering scores. Track purity is the share
of a track's detections that match its identity (unmatched detections count against
it). The clustering scores (WCP, PCR, BCubed, NMI, ...) are
``vcn.clustering.metrics.evaluate`` over the identified tracks (Unknown counts as a
singleton everywhere but PCR). Detection recall and precision are over the frames the
method ran its detector on. ``seconds`` is wall time from the video to the clusters:
``vcn process`` as a whole (start-up included); for the pretrained row, its
preprocessing stages (shots to crops) plus the re-clustering run; for the dlib chain,
shots, decoding, detection and descriptors, plus the clustering itself.

Results go to ``benchmarks/results/NAME.json`` and ``.md``; the raw outputs of each
method stay in ``benchmarks/work/NAME/`` (``--rescore`` scores them again without
running anything).

Usage::

    python benchmarks/make_cast_movie.py --out benchmarks/work/cast_6p.mp4
    python benchmarks/movie_quality.py --movie benchmarks/work/cast_6p.mp4 --name movie_quality_cast_6p
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from benchmarks.baselines import agglomerative, chinese_whispers, dbscan
from benchmarks.movie import RESULTS, STAGES, WORK
from vcn.clustering.metrics import evaluate

MOVIE_ID = "bench"
MATCH_IOU = 0.5
"""A detection shows a ground-truth face when their boxes overlap at least this much (the PASCAL VOC rule)."""
TRACK_IOU = 0.3
"""The dlib chain links a detection to one on the previous sampled frame at this IoU or more."""
HEIGHT_BINS = ((0, 60), (60, 100), (100, 1000))
"""True face heights (pixels) of the per-size detection recall: small (wide shots), medium, close-ups."""
PREPROCESS = STAGES[: STAGES.index("track_crops") + 1]
STOCK_CLUSTERINGS = (
    (
        "dlib chain + agglomerative (0.6)",
        "average linkage, Euclidean, cut at 0.6 (face_recognition tolerance)",
        lambda x: agglomerative(x, 0.6),
    ),
    (
        "dlib chain + Chinese Whispers (0.5)",
        "dlib.chinese_whispers on edges at distance < 0.5 (dlib's example)",
        lambda x: chinese_whispers(x, 0.5),
    ),
    (
        "dlib chain + DBSCAN (eps 0.5)",
        "scikit-learn DBSCAN, Euclidean, eps 0.5, min_samples 5; noise is Unknown",
        lambda x: dbscan(x, 0.5),
    ),
)


# --------------------------------------------------------------------------- ground truth and matching


@dataclass(frozen=True)
class Truth:
    """The movie's ground truth, per frame.

    Attributes:
        boxes: Per frame, an ``(n, 4)`` float array of ``x1, y1, x2, y2``.
        identities: Per frame, the ``n`` identities, in the order of ``boxes``.
        shots: Per frame, the ``n`` shot indices.
        cuts: First frame of every shot but the first.
    """

    boxes: list[np.ndarray]
    identities: list[list[str]]
    shots: list[list[int]]
    cuts: list[int]

    @classmethod
    def load(cls, path: Path) -> Truth:
        """Reads the JSON ``make_cast_movie.py`` writes beside the video."""
        record = json.loads(Path(path).read_text())
        frames = record["faces"]
        return cls(
            boxes=[np.array([f["box"] for f in faces], np.float64).reshape(-1, 4) for faces in frames],
            identities=[[f["identity"] for f in faces] for faces in frames],
            shots=[[f["shot"] for f in faces] for faces in frames],
            cuts=list(record["cuts"]),
        )

    @property
    def appearances(self) -> set[tuple[int, str]]:
        """Every (shot, identity) on screen: the fewest tracks a perfect tracker would make."""
        return {(s, i) for shots, ids in zip(self.shots, self.identities) for s, i in zip(shots, ids)}


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of every box in ``a`` (n, 4) with every box in ``b`` (m, 4): (n, m)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_boxes(detected: np.ndarray, truth: np.ndarray, threshold: float = MATCH_IOU) -> list[tuple[int, int]]:
    """One-to-one matches (detection index, truth index), best IoU first, each at ``threshold`` or more."""
    iou = box_iou(detected, truth)
    pairs = sorted(((-iou[i, j], i, j) for i, j in zip(*np.nonzero(iou >= threshold))))
    used_d, used_t, matches = set(), set(), []
    for _, i, j in pairs:
        if i not in used_d and j not in used_t:
            used_d.add(i)
            used_t.add(j)
            matches.append((int(i), int(j)))
    return matches


def detection_identities(detections: pl.DataFrame, truth: Truth, threshold: float = MATCH_IOU) -> list[str | None]:
    """The ground-truth identity each detection (row) shows, or None; one detection per face on a frame.

    Args:
        detections: ``frame, x1, y1, x2, y2`` (more columns are ignored).
        truth: The movie's ground truth.
        threshold: IoU needed to match.
    """
    out: list[str | None] = [None] * detections.height
    indexed = detections.with_row_index("_row").select("_row", "frame", "x1", "y1", "x2", "y2")
    for (frame,), rows in indexed.group_by("frame", maintain_order=True):
        if not 0 <= frame < len(truth.boxes):
            continue
        boxes = rows.select("x1", "y1", "x2", "y2").to_numpy()
        row_ids = rows["_row"].to_list()
        for i, j in match_boxes(boxes, truth.boxes[frame], threshold):
            out[row_ids[i]] = truth.identities[frame][j]
    return out


@dataclass(frozen=True)
class TrackTruth:
    """What a track shows, by the ground truth.

    Attributes:
        identity: The majority identity of its matched detections; None for a false track.
        detections: Its detections.
        matched: Its detections that match some ground-truth face.
        purity: Share of its detections that show ``identity`` (0 for a false track).
        identities: Distinct identities among its matched detections (2 or more: an identity switch).
    """

    identity: str | None
    detections: int
    matched: int
    purity: float
    identities: int


def _detected(exported: pl.DataFrame) -> pl.DataFrame:
    """The rows of ``vcn export``'s detections.csv where the detector ran (``detected`` 1): the boxes
    interpolated between a track's detections are not detections, and are scored as neither."""
    return exported.filter(pl.col("detected") == 1) if "detected" in exported.columns else exported


def track_truths(detections: pl.DataFrame, truth: Truth, threshold: float = MATCH_IOU) -> dict[str, TrackTruth]:
    """Each track's identity by majority vote of its detections' matches.

    Args:
        detections: ``frame, x1, y1, x2, y2, track_id``; detections without a track (null
            ``track_id``) take part in the per-frame matching but belong to no track.
        truth: The movie's ground truth.
        threshold: IoU needed to match.

    Returns:
        Track id (as a string) -> :class:`TrackTruth`.
    """
    shown = detection_identities(detections, truth, threshold)
    votes: dict[str, list[str | None]] = {}
    for track, identity in zip(detections["track_id"].to_list(), shown):
        if track is not None:
            votes.setdefault(str(track), []).append(identity)
    out = {}
    for track, ids in votes.items():
        counts = Counter(i for i in ids if i is not None)
        # Ties go to the identity named first in sort order, so the result never depends on row order.
        identity = min(counts, key=lambda i: (-counts[i], i)) if counts else None
        out[track] = TrackTruth(
            identity=identity,
            detections=len(ids),
            matched=sum(counts.values()),
            purity=counts[identity] / len(ids) if identity else 0.0,
            identities=len(counts),
        )
    return out


def detection_scores(detections: pl.DataFrame, frames: Iterable[int], truth: Truth) -> dict:
    """Detection recall and precision over ``frames`` (the frames the detector ran on), at IoU >= 0.5.

    Recall is also given by true face height (``HEIGHT_BINS``, pixels), where detectors differ most.
    """
    frames = sorted(f for f in set(frames) if 0 <= f < len(truth.boxes))
    on = detections.filter(pl.col("frame").is_in(frames))
    by_frame = {f: rows.select("x1", "y1", "x2", "y2").to_numpy() for (f,), rows in on.group_by("frame")}
    heights, hits = [], []
    for f in frames:
        found = {j for _, j in match_boxes(by_frame.get(f, np.zeros((0, 4))), truth.boxes[f])}
        heights += (truth.boxes[f][:, 3] - truth.boxes[f][:, 1]).tolist()
        hits += [j in found for j in range(len(truth.boxes[f]))]
    heights, hits = np.array(heights), np.array(hits, bool)
    matched = int(hits.sum())
    by_height = {}
    for lo, hi in HEIGHT_BINS:
        inside = (heights >= lo) & (heights < hi)
        by_height[f"{lo}-{hi}"] = {
            "faces": int(inside.sum()),
            "recall": float(hits[inside].mean()) if inside.any() else None,
        }
    return {
        "frames": len(frames),
        "faces": len(hits),
        "detections": on.height,
        "matched": matched,
        "recall": matched / len(hits) if len(hits) else None,
        "precision": matched / on.height if on.height else None,
        "recall_by_face_height": by_height,
    }


def score_method(
    tracks: Mapping[str, TrackTruth], clusters: Mapping[str, str | None], truth: Truth, detections: pl.DataFrame
) -> dict:
    """Clustering and tracking figures of one method.

    Args:
        tracks: :func:`track_truths` of the method's tracks.
        clusters: Track id -> cluster name, None for Unknown; must cover every identified track.
        truth: The movie's ground truth.
        detections: The method's detections with ``track_id`` (for the appearances its tracks cover).
    """
    labels = {t: tt.identity for t, tt in tracks.items() if tt.identity is not None}
    missing = [t for t in labels if t not in clusters]
    if missing:
        raise ValueError(f"no cluster row for {len(missing)} identified tracks, e.g. {missing[:5]}")
    scores = evaluate(labels, {t: clusters[t] for t in labels}).to_dict()
    identified = [tracks[t] for t in labels]
    n_detections = sum(tt.detections for tt in identified)
    per_identity: dict[str, Counter] = {}
    for track, identity in labels.items():
        per_identity.setdefault(identity, Counter())[clusters[track] if clusters[track] is not None else "Unknown"] += 1
    return {
        "tracks": len(tracks),
        "identified_tracks": len(labels),
        "false_tracks": len(tracks) - len(labels),
        "track_purity": sum(tt.purity * tt.detections for tt in identified) / n_detections if n_detections else None,
        "tracks_with_identity_switch": sum(tt.identities > 1 for tt in identified),
        "appearances": len(truth.appearances),
        "appearances_covered": _covered(detections, truth),
        **scores,
        "clusters_by_identity": {
            identity: dict(sorted(counts.items(), key=lambda kv: -kv[1]))
            for identity, counts in sorted(per_identity.items())
        },
    }


def _covered(detections: pl.DataFrame, truth: Truth) -> int:
    """How many ground-truth appearances (shot, identity) have a tracked detection matching them."""
    shown = detection_identities(detections, truth)
    seen = set()
    for frame, track, identity in zip(detections["frame"].to_list(), detections["track_id"].to_list(), shown):
        if identity is not None and track is not None:
            shots = truth.shots[frame]
            seen.add((shots[truth.identities[frame].index(identity)], identity))
    return len(seen)


# --------------------------------------------------------------------------- ours


def _vcn(*args: str, home: Path, log: Path) -> float:
    """Runs the ``vcn`` command (the console script beside this interpreter) on ``home``; its wall seconds."""
    env = {**os.environ, "VCN_HOME": str(home)}
    env.pop("DAGSTER_HOME", None)
    command = [str(Path(sys.executable).with_name("vcn")), *args]
    return _run(command, env, log)


def _run(command: list[str], env: dict, log: Path) -> float:
    started = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        code = subprocess.run(command, check=False, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"{' '.join(command)} failed with exit code {code}; see {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - started


def run_ours(video: Path, work: Path, backbone: str | None = None) -> None:
    """``vcn process`` (after registering ``backbone``, when given, as a user who keeps another base model does)
    then, on the same data folder, the pretrained re-clustering; exports both into ``work``."""
    from vcn.stores.warehouse import Warehouse

    home = work / "vcn_home"
    shutil.rmtree(home, ignore_errors=True)
    log = work / "vcn.log"
    log.unlink(missing_ok=True)
    if backbone:
        _vcn("model", "register", "--name", backbone, home=home, log=log)
    wall = _vcn("process", str(video), "--movie-id", MOVIE_ID, home=home, log=log)
    _vcn("export", MOVIE_ID, "--out", str(work / "ours_finetuned"), home=home, log=log)
    wh = Warehouse(str(home / "warehouse.duckdb"))
    stages, runs = _stage_seconds(wh)
    sampled = wh.query("SELECT frame FROM frames WHERE movie_id = $1 AND sampled ORDER BY frame", [MOVIE_ID])
    shots = wh.query("SELECT count(*) FROM shots WHERE movie_id = $1", [MOVIE_ID]).item()
    sampled.write_csv(work / "ours_sampled_frames.csv")

    # The same movie clustered with the pretrained model: the three model assets again, finetuning off.
    env = {**os.environ, "VCN_HOME": str(home), "DAGSTER_HOME": str(home / "dagster")}
    config = {"ops": {"finetuned_model": {"config": {"enabled": False}}}}
    command = [
        str(Path(sys.executable).with_name("dagster")),
        "asset",
        "materialize",
        "-m",
        "vcn_assets.definitions",
        "--select",
        "finetuned_model,track_embeddings,face_clusters",
        "--partition",
        MOVIE_ID,
        "--config-json",
        json.dumps(config),
    ]
    recluster = _run(command, env, log)
    _vcn("export", MOVIE_ID, "--out", str(work / "ours_pretrained"), home=home, log=log)
    recluster_stages, _ = _stage_seconds(wh, skip_runs=runs)
    model = wh.query(
        "SELECT model_version, finetuned FROM clustering_lineage WHERE movie_id = $1 ORDER BY clustered_at", [MOVIE_ID]
    ).rows()
    meta = {
        "process_wall_s": round(wall, 1),
        "recluster_wall_s": round(recluster, 1),
        "stages_s": stages,
        "recluster_stages_s": recluster_stages,
        "shots_detected": shots,
        "clusterings": [{"model_version": v, "finetuned": f} for v, f in model],
    }
    (work / "ours.json").write_text(json.dumps(meta, indent=2))


def _stage_seconds(wh, skip_runs: set[str] = frozenset()) -> tuple[dict[str, float], set[str]]:
    """Seconds of each stage on the movie (its latest run outside ``skip_runs``), and every run id seen."""
    rows = wh.query(
        "SELECT asset, run_id, seconds FROM stage_metrics WHERE movie_id = $1 ORDER BY recorded_at", [MOVIE_ID]
    ).rows()
    stages = {asset: round(seconds, 2) for asset, run, seconds in rows if run not in skip_runs}
    return stages, {run for _, run, _ in rows}


def embedding_spread(home: Path, tracks: Mapping[str, TrackTruth]) -> dict:
    """How far apart our latest crop embeddings of the movie are (cosine dissimilarity, medians).

    ``within_track`` is the mean over a track's crop pairs: the merge threshold our clustering
    gives a one-track cluster. ``same_person`` and ``different_people`` compare track means.
    A track that shows one still photo varies little, so when ``within_track`` is far below
    ``same_person``, one-track clusters stay apart.
    """
    folder = home / "artifacts" / "movies" / MOVIE_ID
    crops = pl.read_parquet(folder / "crop_embeddings.parquet", columns=["track_id", "model_version"])
    embeddings = np.load(folder / "crop_embeddings.npy").astype(np.float64)
    track_of = crops["track_id"].to_numpy()
    ids = [t for t in np.unique(track_of) if tracks.get(str(t)) and tracks[str(t)].identity]
    within, means = [], []
    for t in ids:
        e = embeddings[track_of == t]
        if len(e) > 1:
            within.append(float((1 - e @ e.T)[np.triu_indices(len(e), 1)].mean()))
        mean = e.mean(axis=0)
        means.append(mean / np.linalg.norm(mean))
    dissimilarity = 1 - np.array(means) @ np.array(means).T
    person = np.array([tracks[str(t)].identity for t in ids])
    upper = np.triu(np.ones_like(dissimilarity, bool), 1)
    same = upper & (person[:, None] == person[None, :])
    return {
        "model_version": crops["model_version"][0],
        "within_track": float(np.median(within)),
        "same_person": float(np.median(dissimilarity[same])),
        "different_people": float(np.median(dissimilarity[upper & ~same])),
    }


def dump_embeddings(home: Path, tracks: Mapping[str, TrackTruth], path: Path) -> None:
    """Our latest crop embeddings of the movie saved as ``benchmarks/cluster_quality.py --dump`` saves a track
    set's (``pretrained``, ``quality``, ``crop_track``, ``cannot_link``, ``labels``), so the benchmarks that read
    those dumps (``group_cut.py``, ``cut_levers.py``, ...) read the movie too.

    Rows are the movie's tracks in ``track_id`` order; ``labels`` is each track's identity by
    :func:`track_truths` ("" for a false track, scored as no one's); ``cannot_link`` is the product's
    on-screen-together pairs, as positions.
    """
    from vcn.clustering.cannot_link import positions_on_screen_together
    from vcn.pipeline import track_rows

    folder = home / "artifacts" / "movies" / MOVIE_ID
    table = pl.read_parquet(folder / "tracks.parquet").sort("track_id")
    track_ids = table["track_id"].to_numpy()
    crops = pl.read_parquet(folder / "crop_embeddings.parquet", columns=["track_id", "quality"])
    labels = [tracks[str(t)].identity if str(t) in tracks and tracks[str(t)].identity else "" for t in track_ids]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        pretrained=np.load(folder / "crop_embeddings.npy").astype(np.float32),
        quality=crops["quality"].to_numpy().astype(np.float32),
        crop_track=track_rows(track_ids, crops["track_id"].to_numpy()),
        cannot_link=positions_on_screen_together(table, track_ids),
        labels=np.array(labels),
    )


def _default_label(meta: dict) -> str:
    """The default run's row name: its base model, and whether its clusters came from a finetuned model."""
    first = (meta.get("clusterings") or [{}])[0]
    version = first.get("model_version") or ""
    base = version.split("-ft-")[0].rsplit("-", 1)[0] if version else "default model"
    if first.get("finetuned", True):
        return f"vcn process (finetuned, default; {base})"
    return f"vcn process (default; {base}, not finetuned)"


def _ours_rows(work: Path, truth: Truth) -> list[dict]:
    meta = json.loads((work / "ours.json").read_text())
    sampled = pl.read_csv(work / "ours_sampled_frames.csv")["frame"].to_list()
    # What `vcn process` would take with finetuning off: its own wall time, with the model stages of the re-run
    # in place of its own (the re-run's wall time is mostly the Dagster CLI starting a process per step).
    model_stages = [s for s in STAGES if s not in PREPROCESS]
    pretrained_s = (
        meta["process_wall_s"]
        - sum(meta["stages_s"].get(s, 0.0) for s in model_stages)
        + sum(meta["recluster_stages_s"].get(s, 0.0) for s in model_stages)
    )
    rows = []
    for folder, method, settings, seconds in (
        ("ours_finetuned", _default_label(meta), "every asset, default settings", meta["process_wall_s"]),
        (
            "ours_pretrained",
            "vcn process, pretrained (finetuning off)",
            (
                "same preprocessing, then finetuned_model with enabled: false, embeddings and clusters (dagster asset "
                "materialize); seconds: vcn process's wall time with these three stages' times in place of its own"
            ),
            pretrained_s,
        ),
    ):
        detections = _detected(pl.read_csv(work / folder / "detections.csv"))
        clusters = pl.read_csv(work / folder / "clusters.csv", schema_overrides={"cluster": pl.String})
        predicted = {str(t): c for t, c in clusters.select("track_id", "cluster").iter_rows()}
        tracks = track_truths(detections, truth)
        rows.append(
            {
                "method": method,
                "settings": settings,
                "seconds": round(seconds, 1),
                "shots_detected": meta["shots_detected"],
                "detection": detection_scores(detections, sampled, truth),
                **score_method(tracks, predicted, truth, detections.filter(pl.col("track_id").is_not_null())),
            }
        )
    return rows


# --------------------------------------------------------------------------- the stock dlib chain


def link_tracks(frames: list[int], boxes: list[np.ndarray], shot_of: Mapping[int, int]) -> list[np.ndarray]:
    """Greedy IoU tracking: each sampled frame's boxes continue the tracks of the previous sampled frame of its shot.

    Args:
        frames: Sampled frame numbers, increasing.
        boxes: Per sampled frame, ``(n, 4)`` boxes.
        shot_of: Frame -> shot; tracks never cross shots.

    Returns:
        Per sampled frame, the ``(n,)`` int track ids of its boxes (0, 1, ... in order of first appearance).
    """
    ids: list[np.ndarray] = []
    next_id = 0
    for k, (frame, current) in enumerate(zip(frames, boxes)):
        assigned = np.full(len(current), -1, np.int64)
        if k and shot_of[frames[k - 1]] == shot_of[frame]:
            for i, j in match_boxes(current, boxes[k - 1], TRACK_IOU):
                assigned[i] = ids[k - 1][j]
        for i in np.flatnonzero(assigned < 0):
            assigned[i] = next_id
            next_id += 1
        ids.append(assigned)
    return ids


def run_stock(video: Path, work: Path, every: int) -> None:
    """The face_recognition chain on every ``every``-th frame; detections, tracks and descriptors into ``work``."""
    import av
    import face_recognition
    from scenedetect import ContentDetector, detect
    from tqdm import tqdm

    started = time.perf_counter()
    scenes = detect(str(video), ContentDetector())
    starts = [0] + [scene[0].frame_num for scene in scenes[1:]]
    shots_s = time.perf_counter() - started

    frames, boxes, descriptors = [], [], []
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(tqdm(container.decode(stream), total=stream.frames or None, desc="dlib chain")):
            if index % every:
                continue
            rgb = frame.to_ndarray(format="rgb24")
            locations = face_recognition.face_locations(rgb, number_of_times_to_upsample=1, model="hog")
            encodings = face_recognition.face_encodings(rgb, known_face_locations=locations)
            frames.append(index)
            boxes.append(
                np.array([(left, top, right, bottom) for top, right, bottom, left in locations], np.float64).reshape(
                    -1, 4
                )
            )
            descriptors.append(np.array(encodings, np.float64).reshape(-1, 128))
    shot_of = {f: int(np.searchsorted(starts, f, side="right")) - 1 for f in frames}
    track_ids = link_tracks(frames, boxes, shot_of)
    table = pl.DataFrame(
        {
            "frame": np.repeat(frames, [len(b) for b in boxes]).astype(np.int64),
            "x1": np.concatenate(boxes)[:, 0],
            "y1": np.concatenate(boxes)[:, 1],
            "x2": np.concatenate(boxes)[:, 2],
            "y2": np.concatenate(boxes)[:, 3],
            "track_id": np.concatenate(track_ids),
        }
    )
    table.write_csv(work / "stock_detections.csv")
    np.save(work / "stock_descriptors.npy", np.concatenate(descriptors))
    meta = {
        "every": every,
        "sampled_frames": frames,
        "shots_detected": len(starts),
        "shots_s": round(shots_s, 1),
        "pipeline_s": round(time.perf_counter() - started, 1),
    }
    (work / "stock.json").write_text(json.dumps(meta))


def _stock_rows(work: Path, truth: Truth) -> list[dict]:
    meta = json.loads((work / "stock.json").read_text())
    detections = pl.read_csv(work / "stock_detections.csv")
    descriptors = np.load(work / "stock_descriptors.npy")
    track_of = detections["track_id"].to_numpy()
    order = np.unique(track_of)
    # Each track's mean raw descriptor, as face_recognition users average a person's encodings.
    means = np.stack([descriptors[track_of == t].mean(axis=0) for t in order])
    tracks = track_truths(detections, truth)
    detection = detection_scores(detections, meta["sampled_frames"], truth)
    rows = []
    for method, settings, cluster in STOCK_CLUSTERINGS:
        started = time.perf_counter()
        labels = cluster(means)
        seconds = time.perf_counter() - started
        predicted = {str(t): (str(c) if c >= 0 else None) for t, c in zip(order, labels)}
        rows.append(
            {
                "method": method,
                "settings": f"every {meta['every']}th frame, HOG upsample 1, IoU {TRACK_IOU} tracker, raw track means; "
                + settings,
                "seconds": round(meta["pipeline_s"] + seconds, 1),
                "shots_detected": meta["shots_detected"],
                "detection": detection,
                **score_method(tracks, predicted, truth, detections),
            }
        )
    return rows


# --------------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    movie = report["movie"]
    lo, hi = movie["photos_per_appearance"]
    photos = "one still photo per appearance" if hi == 1 else f"{lo}-{hi} photos per appearance, crossfading"
    lines = [
        "# End-to-end clustering quality on a movie with a known cast",
        "",
        (
            f"`benchmarks/movie_quality.py` on `{movie['video']}` ({movie['width']}x{movie['height']} at {movie['fps']} fps, "
            f"{movie['seconds']:g} s, {movie['shots']} shots, {movie['people']} people, "
            f"{movie['appearances']} appearances (person x shot), {movie['faces']} face boxes; rendered by "
            f"`benchmarks/make_cast_movie.py`, seed {movie['seed']}, {photos}). Measured {report['measured_at']} on "
            f"{report['machine']}. Tracks are identified by majority vote of their detections' ground-truth matches "
            f"(IoU >= {MATCH_IOU}); tracks matching nothing are false tracks, left out of the clustering scores; "
            "Unknown tracks count as singletons in every figure but PCR."
        ),
        "",
        (
            "| method | tracks | identified tracks | false tracks | WCP % | PCR | BCubed F % | NMI % | Unknown % | "
            "track purity % | det. recall % | det. precision % | s |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        d = r["detection"]
        lines.append(
            f"| {r['method']} | {r['tracks']} | {r['identified_tracks']} | {r['false_tracks']} | {100 * r['wcp']:.2f} | "
            f"{r['pcr']:.3f} | {100 * r['bcubed_f']:.2f} | {100 * r['nmi']:.2f} | {100 * r['unknown_fraction']:.1f} | "
            f"{_pct(r['track_purity'])} | {_pct(d['recall'])} | {_pct(d['precision'])} | {r['seconds']} |"
        )
    lines += ["", "Settings, and what else each row measured:", ""]
    for r in report["rows"]:
        d = r["detection"]
        lines.append(
            f"- **{r['method']}**: {r['settings']}. {r['n_clusters']} clusters for {r['n_identities']} people; "
            f"BCubed P/R {100 * r['bcubed_precision']:.1f} / {100 * r['bcubed_recall']:.1f} %; "
            f"{r['appearances_covered']} of {r['appearances']} appearances tracked; "
            f"{r['tracks_with_identity_switch']} tracks switch identity; {r['shots_detected']} shots found; "
            f"detections on {d['frames']} frames: {d['matched']} of {d['faces']} faces found, "
            f"{d['detections'] - d['matched']} false detections."
        )
    bins = [f"{lo}-{hi}" for lo, hi in HEIGHT_BINS]
    lines += ["", "Detection recall % by true face height (pixels; faces on the frames each detector ran on):", ""]
    lines += ["| method | " + " | ".join(f"{b} px" for b in bins) + " |", "|---|" + "---|" * len(bins)]
    for r in report["rows"]:
        by_height = r["detection"]["recall_by_face_height"]
        cells = [f"{_pct(by_height[b]['recall'])} ({by_height[b]['faces']})" for b in bins]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    spread = report["embedding_spread"]
    lines += [
        "",
        (
            f"Our crop embeddings ({spread['model_version']}), median cosine dissimilarity: within a track "
            f"{spread['within_track']:.4f} (a one-track cluster's merge threshold), between tracks of one person "
            f"{spread['same_person']:.4f}, between people {spread['different_people']:.4f}."
        ),
    ]
    lines += ["", "Where each person's tracks went (cluster: tracks):", ""]
    people = report["movie"]["cast"]
    lines += ["| person | shots | " + " | ".join(r["method"] for r in report["rows"]) + " |"]
    lines += ["|---|---|" + "---|" * len(report["rows"])]
    for person in people:
        cells = []
        for r in report["rows"]:
            counts = r["clusters_by_identity"].get(person["identity"], {})
            cells.append(", ".join(f"{c}: {n}" for c, n in counts.items()) or "-")
        lines.append(f"| {person['identity']} | {person['shots']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--movie", type=Path, required=True, help="video from make_cast_movie.py (its .json beside it)")
    parser.add_argument("--name", required=True, help="results name: benchmarks/results/NAME.json and .md")
    parser.add_argument("--every", type=int, default=5, help="the dlib chain runs on every Nth frame (default 5)")
    parser.add_argument("--backbone", help="base model registered before processing (default: a new install's)")
    parser.add_argument(
        "--rescore", action="store_true", help="score the raw outputs of an earlier run in benchmarks/work/NAME again"
    )
    parser.add_argument(
        "--dump",
        type=Path,
        help="also save our pretrained crop embeddings, qualities, tracks and their identities here (.npz, the format "
        "of cluster_quality.py --dump)",
    )
    parser.add_argument(
        "--ours-only",
        action="store_true",
        help="run our pipeline again and keep the dlib chain's raw outputs of an earlier run (they do not depend on "
        "this repository's code)",
    )
    args = parser.parse_args(argv)

    video = args.movie.resolve()
    record = json.loads(video.with_suffix(".json").read_text())
    truth = Truth.load(video.with_suffix(".json"))
    work = WORK / args.name
    work.mkdir(parents=True, exist_ok=True)
    if not args.rescore:
        print(f"== vcn process {video.name}", flush=True)
        run_ours(video, work, args.backbone)
        if not args.ours_only:
            print(f"== dlib chain on every {args.every}th frame", flush=True)
            run_stock(video, work, args.every)

    rows = _ours_rows(work, truth) + _stock_rows(work, truth)
    if args.dump:
        pretrained_tracks = track_truths(_detected(pl.read_csv(work / "ours_pretrained" / "detections.csv")), truth)
        dump_embeddings(work / "vcn_home", pretrained_tracks, args.dump)
    report = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "movie": {
            "video": str(video.relative_to(REPO.parent)) if video.is_relative_to(REPO.parent) else str(video),
            "width": record["width"],
            "height": record["height"],
            "fps": record["fps"],
            "seconds": record["frames"] / record["fps"],
            "seed": record["seed"],
            # Movies rendered before the option existed show one photo per appearance.
            "photos_per_appearance": record.get("photos_per_appearance", [1, 1]),
            "shots": len(record["shots"]),
            "people": len(record["cast"]),
            "appearances": len(truth.appearances),
            "faces": sum(len(b) for b in truth.boxes),
            "cast": [{k: p[k] for k in ("identity", "billing", "shots", "screen_frames")} for p in record["cast"]],
        },
        "ours": json.loads((work / "ours.json").read_text()),
        # The data folder's latest embeddings are the pretrained re-run's.
        "embedding_spread": embedding_spread(
            work / "vcn_home", track_truths(_detected(pl.read_csv(work / "ours_pretrained" / "detections.csv")), truth)
        ),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
