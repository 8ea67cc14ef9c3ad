"""Peer baselines as their users run them: face_recognition's descriptors, then the usual clusterings.

``benchmarks/cluster_quality.py`` runs the baselines on our own unit-length
track means, where their customary thresholds do not fit. Here they get the
input their users give them: ``face_recognition``'s (dlib's) chain on every
crop of a track dataset, with its defaults:

1. ``face_recognition.load_image_file`` (PIL, RGB);
2. ``face_recognition.face_locations(image)``: dlib's HOG detector, the image
   upsampled once; the largest face when it finds several, no descriptor for
   the crop when it finds none;
3. ``face_recognition.face_encodings(image, known_face_locations=[box])``:
   the 5-point shape predictor inside that box, dlib's 150 px chip, the ResNet
   descriptor with one jitter: a raw 128-d vector, not normalised.

A track's descriptor is the mean of its crops' raw descriptors, not
normalised either; a track with no crop described is left Unknown. The track
descriptors are clustered by every baseline of ``benchmarks/baselines.py``
(Chinese Whispers at 0.5, average linkage cut at 0.6, DBSCAN at eps 0.5,
HDBSCAN, FINCH, and average linkage told the true number of identities, which
uses ground truth). Noise (-1) of DBSCAN and HDBSCAN becomes Unknown, as in
``cluster_quality.py``. Labels are read only to score (``vcn.clustering.metrics``):
Unknown tracks count as singletons in WCP, NMI and BCubed and not as clusters
in PCR.

The descriptors of a track dataset are cached under ``benchmarks/work/peers/``
(git-ignored), keyed by the dataset's path, the size and modification time of
its files and the versions of the chain, so a rerun only clusters.

Reference figures in the datasets' PROVENANCE.md, WCP % / PCR / BCubed F %:
``dev-ep`` ("dlib ResNet track embeddings"), average linkage at 0.6: 80.0 / 0.93
/ 68.6; Chinese Whispers at 0.5: 67.7 / 0.80; HDBSCAN: 95.0 / 9.7 with 30 %
noise; at the true number of identities: 67.3 / 1.00. ``dev-mv``, from a chain
that takes the central face region of a crop where HOG finds nothing: average
linkage at 0.6: 51.2 / 0.47 / 55.6; Chinese Whispers at 0.5: 25.2 / 0.20 / 29.7;
HDBSCAN: 98.9 / 2.53 / 48.8 with 39.5 % noise; FINCH last partition: 37.7 / 0.20
/ 45.8; at the true number of identities: 66.7 / 1.00 / 66.5. This chain has no
such fallback (``face_recognition`` has none): its users get no descriptor from
a crop where HOG finds no face, so those figures are not its own.

Outputs ``benchmarks/results/NAME.json`` and ``.md`` and prints the table.

Usage, from the repository root::

    python benchmarks/peers.py --trackset ../shared/data/tracksets/dev-ep --name peers_dev_ep
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.baselines import BASELINES
from vcn.clustering.metrics import evaluate
from vcn.formats.trackset import TracksetError, read_trackset, read_trackset_labels
from vcn.stores.files import atomic_path

DEFAULT_TRACKSET = ROOT.parent / "shared" / "data" / "tracksets" / "dev-ep"
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / "work" / "peers"

DESCRIPTOR_DIM = 128
#: face_recognition's defaults, as its users call it; part of the cache key.
CHAIN = {"detector": "hog", "upsample": 1, "landmarks": "small", "num_jitters": 1, "face": "largest"}
#: Bump when the cache file's layout changes.
_CACHE_FORMAT = 1


@dataclass(frozen=True, eq=False)
class TrackDescriptors:
    """face_recognition's descriptors of a track dataset, per track.

    Attributes:
        track_ids: The tracks, in ``tracks.csv`` order.
        descriptors: ``(T, 128)`` float64 mean of each track's raw crop
            descriptors (not normalised); a row of NaN for a track none of
            whose crops gave a descriptor.
        crops: ``(T,)`` int64 crops per track in ``crops.csv``.
        crops_with_face: ``(T,)`` int64 crops per track where HOG found a face.
        seconds: Seconds the crop descriptors took when computed (also when
            read back from the cache).
        cached: Whether they were read from the cache.
    """

    track_ids: list[str]
    descriptors: np.ndarray
    crops: np.ndarray
    crops_with_face: np.ndarray
    seconds: float
    cached: bool

    @property
    def described(self) -> np.ndarray:
        """``(T,)`` bool: the tracks with a descriptor."""
        return self.crops_with_face > 0


@dataclass(frozen=True)
class PeerRow:
    """One peer clustering of a track dataset, scored against its labels (fractions, not percentages).

    Attributes:
        name: The baseline's name (``benchmarks.baselines.BASELINES``).
        description: Its settings.
        uses_ground_truth: Whether it was told the true number of identities.
        wcp: Weighted cluster purity, Unknown tracks as singletons.
        pcr: Predicted clusters / true identities, Unknown tracks excluded.
        bcubed_precision: BCubed precision, Unknown tracks as singletons.
        bcubed_recall: BCubed recall, Unknown tracks as singletons.
        bcubed_f: Their harmonic mean.
        nmi: Normalised mutual information, Unknown tracks as singletons.
        unknown_fraction: Tracks left Unknown (no descriptor, or noise).
        n_clusters: Clusters formed.
        seconds: Seconds of the clustering alone (descriptors not counted).
    """

    name: str
    description: str
    uses_ground_truth: bool
    wcp: float
    pcr: float
    bcubed_precision: float
    bcubed_recall: float
    bcubed_f: float
    nmi: float
    unknown_fraction: float
    n_clusters: int
    seconds: float

    def to_dict(self) -> dict[str, str | bool | int | float]:
        """The row as a flat dict of plain Python values (JSON-ready)."""
        return asdict(self)


def chain_settings() -> dict[str, str | int]:
    """face_recognition's settings used here and the installed versions of face_recognition and dlib."""
    from importlib.metadata import version

    import dlib

    return {**CHAIN, "face_recognition": version("face_recognition"), "dlib": dlib.__version__}


def crop_descriptor(image: np.ndarray) -> tuple[np.ndarray | None, int]:
    """face_recognition's descriptor of the largest face HOG finds in one RGB image.

    Args:
        image: ``(H, W, 3)`` uint8 RGB, as ``face_recognition.load_image_file`` gives.

    Returns:
        The raw ``(128,)`` float64 descriptor (``None`` when no face is found)
        and the number of faces found.
    """
    import face_recognition

    boxes = face_recognition.face_locations(image)  # (top, right, bottom, left), HOG, upsampled once
    if not boxes:
        return None, 0
    largest = max(boxes, key=lambda b: (b[2] - b[0]) * (b[1] - b[3]))
    (descriptor,) = face_recognition.face_encodings(image, known_face_locations=[largest])
    return np.asarray(descriptor, dtype=np.float64), len(boxes)


def track_means(crop_descriptors: np.ndarray, crop_track: np.ndarray, n_tracks: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of each track's crop descriptors, ignoring crops without one (NaN rows).

    Args:
        crop_descriptors: ``(N, D)`` raw descriptors, a NaN row for a crop without a face.
        crop_track: ``(N,)`` track index of each crop, in ``[0, n_tracks)``.
        n_tracks: Number of tracks.

    Returns:
        ``(n_tracks, D)`` float64 means (NaN rows for tracks with no descriptor)
        and ``(n_tracks,)`` int64 counts of the crops averaged.
    """
    has_face = ~np.isnan(crop_descriptors).any(axis=1)
    counts = np.bincount(crop_track[has_face], minlength=n_tracks).astype(np.int64)
    sums = np.zeros((n_tracks, crop_descriptors.shape[1]))
    np.add.at(sums, crop_track[has_face], crop_descriptors[has_face])
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, None]
    means[counts == 0] = np.nan
    return means, counts


def face_recognition_descriptors(
    trackset_dir: str | os.PathLike[str], cache_dir: str | os.PathLike[str] = CACHE
) -> TrackDescriptors:
    """face_recognition's track descriptors of a track dataset, from the cache when it is current.

    Every crop goes through :func:`crop_descriptor`; a crop file that does not
    exist (``read_trackset`` reports it) gives no descriptor. The cache file is
    named by the dataset's resolved path and a hash of its ``tracks.csv``,
    ``crops.csv`` and crop files (path, size, modification time) and of the
    chain's versions; computing a new one removes the dataset's stale ones.

    Args:
        trackset_dir: A track dataset in format v1.
        cache_dir: Folder of the cache files.

    Returns:
        The track descriptors.

    Raises:
        TracksetError: on a malformed dataset or a crop that is not a readable image.
    """
    trackset = read_trackset(trackset_dir)
    track_ids: list[str] = trackset.tracks["track_id"].to_list()
    index = {track_id: i for i, track_id in enumerate(track_ids)}
    crop_track = np.array([index[t] for t in trackset.crops["track_id"]], dtype=np.int64)
    paths = trackset.crop_paths()
    prefix, key = _cache_name(trackset.root, paths)
    cache_file = Path(cache_dir) / f"{prefix}-{key}.npz"

    cached = cache_file.is_file()
    if cached:
        with np.load(cache_file) as stored:
            crop_descriptors, seconds = stored["descriptors"], float(stored["seconds"])
    else:
        crop_descriptors, seconds = _describe_crops(paths)
        with atomic_path(cache_file) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, descriptors=crop_descriptors, seconds=seconds)
        for stale in Path(cache_dir).glob(f"{prefix}-*.npz"):
            if stale != cache_file:
                stale.unlink()
    if crop_descriptors.shape != (len(paths), DESCRIPTOR_DIM):
        raise ValueError(f"{cache_file}: holds {crop_descriptors.shape} descriptors for {len(paths)} crops")
    means, with_face = track_means(crop_descriptors, crop_track, len(track_ids))
    return TrackDescriptors(
        track_ids=track_ids,
        descriptors=means,
        crops=np.bincount(crop_track, minlength=len(track_ids)).astype(np.int64),
        crops_with_face=with_face,
        seconds=seconds,
        cached=cached,
    )


def peer_rows(
    trackset_dir: str | os.PathLike[str], labels: Mapping[str, str], cache_dir: str | os.PathLike[str] = CACHE
) -> list[PeerRow]:
    """Every baseline on face_recognition's track descriptors of a dataset, scored against ``labels``.

    Tracks without a descriptor are not clustered and count as Unknown, as do
    the noise tracks of DBSCAN and HDBSCAN. The oracle is told the number of
    distinct identities in ``labels`` (at most the number of tracks clustered).

    Args:
        trackset_dir: A track dataset in format v1.
        labels: Track id -> true identity, e.g. ``read_trackset_labels(trackset_dir)``.
        cache_dir: Folder of the descriptor cache (:func:`face_recognition_descriptors`).

    Returns:
        One row per baseline, in ``BASELINES`` order.
    """
    tracks = face_recognition_descriptors(trackset_dir, cache_dir)
    described = np.flatnonzero(tracks.described)
    x = tracks.descriptors[described]
    k_true = min(len(set(labels.values())), len(described))
    rows = []
    for baseline in BASELINES:
        predicted: dict[str, str | None] = dict.fromkeys(tracks.track_ids)
        started = time.perf_counter()
        if len(described):
            assignment = baseline.run(x, k_true)
            for i, cluster in zip(described, assignment):
                predicted[tracks.track_ids[i]] = None if cluster < 0 else str(int(cluster))
        seconds = time.perf_counter() - started
        scores = evaluate(labels, predicted)
        rows.append(
            PeerRow(
                name=baseline.name,
                description=baseline.description,
                uses_ground_truth=baseline.uses_ground_truth,
                wcp=scores.wcp,
                pcr=scores.pcr,
                bcubed_precision=scores.bcubed_precision,
                bcubed_recall=scores.bcubed_recall,
                bcubed_f=scores.bcubed_f,
                nmi=scores.nmi,
                unknown_fraction=scores.unknown_fraction,
                n_clusters=scores.n_clusters,
                seconds=seconds,
            )
        )
    return rows


def _describe_crops(paths: list[Path]) -> tuple[np.ndarray, float]:
    """``(N, 128)`` raw descriptors of the crops (NaN rows: no face or no file) and the seconds taken."""
    import face_recognition
    from tqdm import tqdm

    descriptors = np.full((len(paths), DESCRIPTOR_DIM), np.nan)
    started = time.perf_counter()
    for i, path in enumerate(tqdm(paths, desc="face_recognition: HOG + descriptor", unit="crop", file=sys.stderr)):
        if not path.is_file():
            continue
        try:
            image = face_recognition.load_image_file(path)
        except OSError as error:
            raise TracksetError(path, f"not a readable image ({error})") from error
        descriptor, _ = crop_descriptor(image)
        if descriptor is not None:
            descriptors[i] = descriptor
    return descriptors, time.perf_counter() - started


def _cache_name(root: Path, paths: list[Path]) -> tuple[str, str]:
    """(hash of the dataset's path, hash of its files' sizes and times and of the chain's versions)."""
    content = hashlib.sha256()
    content.update(json.dumps([_CACHE_FORMAT, chain_settings()], sort_keys=True).encode())
    for path in [root / "tracks.csv", root / "crops.csv", *paths]:
        try:
            stat = path.stat()
            signature = f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
        except FileNotFoundError:
            signature = f"{path.relative_to(root)}\0missing\n"
        content.update(signature.encode())
    where = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    return f"{root.name}-{where}", content.hexdigest()[:20]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trackset", type=Path, default=DEFAULT_TRACKSET)
    parser.add_argument("--name", help="stem of the results files in benchmarks/results/ (default: peers_<trackset>)")
    parser.add_argument("--cache-dir", type=Path, default=CACHE, help="descriptor cache folder")
    args = parser.parse_args(argv)
    if not (args.trackset / "labels.csv").is_file():
        parser.error(f"{args.trackset} has no labels.csv to score against")
    name = args.name or "peers_" + args.trackset.resolve().name.replace("-", "_")

    tracks = face_recognition_descriptors(args.trackset, args.cache_dir)
    labels = read_trackset_labels(args.trackset)
    rows = peer_rows(args.trackset, labels, args.cache_dir)
    trackset = args.trackset.resolve()

    result = {
        "trackset": str(trackset.relative_to(ROOT.parent)) if trackset.is_relative_to(ROOT.parent) else str(trackset),
        "n_tracks": len(tracks.track_ids),
        "n_crops": int(tracks.crops.sum()),
        "n_identities": len(set(labels.values())),
        "crops_with_face": int(tracks.crops_with_face.sum()),
        "tracks_with_face": int(tracks.described.sum()),
        "descriptor_seconds": round(tracks.seconds, 1),
        "descriptors_from_cache": tracks.cached,
        "chain": chain_settings(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": [{**row.to_dict(), "seconds": round(row.seconds, 3)} for row in rows],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    """The results as a markdown page: the setting, then one table row per peer."""
    chain = result["chain"]
    lines = [
        "# Peers as their users run them: face_recognition's descriptors, then the usual clusterings",
        "",
        (
            f"`benchmarks/peers.py` on `{result['trackset']}`: {result['n_tracks']} tracks, {result['n_crops']} "
            f"crops, {result['n_identities']} identities. Measured {result['measured_at']} on {result['machine']}."
        ),
        "",
        f"Descriptors: face_recognition {chain['face_recognition']} (dlib {chain['dlib']}) with its defaults: HOG "
        "detector upsampling once, the largest face of a crop, 5-point landmarks, one jitter; raw 128-d descriptors, "
        "each track the mean of its crops' (not normalised). "
        f"HOG found a face in {result['crops_with_face']} of {result['n_crops']} crops "
        f"({result['crops_with_face'] / result['n_crops'] * 100:.1f} %), in at least one crop of "
        f"{result['tracks_with_face']} of {result['n_tracks']} tracks; the others are Unknown. "
        f"Descriptors took {result['descriptor_seconds']} s on one process"
        + (" (read back from the cache)" if result["descriptors_from_cache"] else "")
        + ". Unknown tracks (no face, or noise) count as singletons in every figure but PCR. The peers' "
        "reference figures in the development sets' PROVENANCE.md come from a chain that, as dev-mv's describes it, "
        "takes the central face region of a crop where HOG finds nothing; face_recognition has no such fallback, "
        "and neither has this chain.",
        "",
        "| method | settings | WCP % | PCR | BCubed P % | BCubed R % | BCubed F % | NMI % | Unknown % | clusters | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        name = r["name"] + (" *" if r["uses_ground_truth"] else "")
        lines.append(
            f"| {name} | {r['description']} | {r['wcp'] * 100:.2f} | {r['pcr']:.3f} | "
            f"{r['bcubed_precision'] * 100:.2f} | {r['bcubed_recall'] * 100:.2f} | {r['bcubed_f'] * 100:.2f} | "
            f"{r['nmi'] * 100:.2f} | {r['unknown_fraction'] * 100:.1f} | {r['n_clusters']} | {r['seconds']:.2f} |"
        )
    lines += ["", "\\* uses the true number of identities (ground truth).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
