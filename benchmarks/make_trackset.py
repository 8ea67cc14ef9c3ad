"""Builds a labelled track dataset (format v1) for validating the clustering away from dev-ep.

The clustering's rules were developed on ``shared/data/tracksets/dev-ep``; figures
measured only there may flatter them. This tool renders more episodes of the same
kind from faces dev-ep does not use, so a change can be checked on people and
episode structures it was not tuned on:

- Structure: a real episode's face tracks (``shared/data/tv-tracks``: BBT S01 or
  Buffy S05): which character each track shows, its frames, its shot (from the
  episode's cut list), and so which tracks are on screen together. Background
  characters ("unknown") are left out.
- Faces: each character becomes a CelebA identity of the DEV split
  (``shared/data/celeba-faces``) that dev-ep does not use and whose photos agree
  with each other (identity_qa.csv), main characters the identities with the
  most photos.
- Pixels: each track renders one source photo of its identity as one crop every
  5 frames (3-40 crops), 128 px with the face about 60 px wide, with smooth drift
  of position, scale, rotation and brightness, and per-track degradations drawn
  at random: mirror image, motion blur, defocus, low resolution, a partial
  occluder, side light, a colour cast, JPEG artefacts and noise.
- ``--views 4``: an episode of dev-mv's kind instead: a track of n crops shows
  min(4, n // 4) different photos of its person in consecutive segments (dev-mv's
  rule, read from its render log), under the track's one set of degradations,
  with identities that neither dev-ep nor dev-mv uses. With
  ``--views 1`` (the default) the crops are what they were before the option
  existed, draw for draw.

Research-licensed data: the output is for benchmarks only (under
``benchmarks/work/``, never in the package).

Usage::

    python benchmarks/make_trackset.py --episode bbt_s01e02 --max-tracks 600 --seed 1 OUT_DIR
    python benchmarks/make_trackset.py --episode buffy_s05e04 --views 4 --seed 2 OUT_DIR   # dev-mv's kind
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
CROP = 128
STEP = 5


def _dev_identities(episodes: tuple[str, ...] = ("dev-ep",)) -> set[str]:
    used: set[str] = set()
    for episode in episodes:
        meta = json.loads((SHARED / "tracksets" / episode / "_meta" / "dataset.json").read_text())
        used |= set(meta["identities"]) | set(meta.get("excluded_flagged_identities", ()))
    return used


def _candidates(min_images: int, episodes: tuple[str, ...] = ("dev-ep",)) -> list[tuple[str, list[str]]]:
    """CelebA identities not used by the given development episodes, unflagged, most photos first:
    (identity, photo paths)."""
    used = _dev_identities(episodes)
    flagged = {row["identity"] for row in csv.DictReader(open(SHARED / "celeba-faces" / "identity_qa.csv")) if row["flag"]}
    photos: dict[str, list[str]] = {}
    for row in csv.DictReader(open(SHARED / "celeba-faces" / "faces.csv")):
        photos.setdefault(row["identity"], []).append(row["path"])
    ids = [i for i, p in photos.items() if i not in used and i not in flagged and len(p) >= min_images]
    return sorted(((i, photos[i]) for i in ids), key=lambda item: (-len(item[1]), item[0]))


def _shots(episode: str) -> np.ndarray:
    lines = (SHARED / "tv-tracks" / "shots" / f"{episode}.videvents").read_text().split("\n")[1:]
    return np.array(sorted(int(line.split()[0]) for line in lines if line.strip()), dtype=np.int64)


#: Crops per photo, when a track shows several (as in dev-mv: a track of n crops shows min(4, n // 4) photos).
CROPS_PER_VIEW = 4


def _view_segments(n: int, max_views: int) -> np.ndarray:
    """(n,) which of the track's photos each crop shows: min(max_views, n // CROPS_PER_VIEW) consecutive segments."""
    views = max(1, min(max_views, n // CROPS_PER_VIEW))
    return np.minimum(np.arange(n) * views // n, views - 1)


def _render_track(
    photo: np.ndarray | list[np.ndarray], n: int, rng: np.random.Generator, segment: np.ndarray | None = None
) -> list[np.ndarray]:
    """``n`` degraded 128 px crops of 256 px source photos, drifting smoothly; crop k shows photo ``segment[k]``."""
    photos = photo if isinstance(photo, list) else [photo]
    segment = np.zeros(n, dtype=np.int64) if segment is None else segment
    flip = rng.random() < 0.5
    motion = rng.uniform(3, 9) if rng.random() < 0.33 else 0.0
    defocus = rng.uniform(1.0, 2.0) if rng.random() < 0.28 else 0.0
    lowres = rng.uniform(22, 40) if rng.random() < 0.4 else 0.0
    occluder = rng.uniform(0.1, 0.3) if rng.random() < 0.25 else 0.0
    side = rng.random() < 0.55
    cast = rng.uniform(0.85, 1.15, size=3) if rng.random() < 0.6 else np.ones(3)
    quality = int(rng.integers(30, 90))
    noise = rng.uniform(1.5, 6.0)
    rot0 = rng.normal(0, 6)
    bases = [cv2.flip(p, 1) if flip else p for p in photos]
    drift = np.cumsum(rng.normal(0, 1, size=(n, 4)), axis=0) * [1.5, 1.5, 0.015, 1.0]
    brightness = 1 + np.cumsum(rng.normal(0, 0.02, size=n))
    occ_side = rng.integers(4)
    out = []
    for k in range(n):
        dx, dy, ds, dr = drift[k]
        matrix = cv2.getRotationMatrix2D((128, 128), rot0 + dr, 0.5 * (1 + ds))
        matrix[:, 2] += [dx - 64, dy - 64]
        img = cv2.warpAffine(bases[segment[k]], matrix, (CROP, CROP), borderMode=cv2.BORDER_REFLECT).astype(np.float32)
        if lowres:
            small = max(8, int(CROP * lowres / 64))
            img = cv2.resize(cv2.resize(img, (small, small), interpolation=cv2.INTER_AREA), (CROP, CROP))
        if defocus:
            img = cv2.GaussianBlur(img, (0, 0), defocus)
        if motion:
            size = int(round(motion))
            kernel = np.zeros((size, size), np.float32)
            kernel[size // 2, :] = 1 / size
            img = cv2.filter2D(img, -1, kernel)
        if side:
            ramp = np.linspace(0.55, 1.15, CROP, dtype=np.float32)
            img *= ramp[None, :, None] if flip else ramp[None, ::-1, None]
        img *= brightness[k] * cast[None, None, :]
        if occluder:
            side_len = int(CROP * 0.5 * np.sqrt(occluder) * 2)
            x0, y0 = [(20, 70), (64, 70), (40, 80), (30, 20)][occ_side]
            img[y0 : y0 + side_len // 2, x0 : x0 + side_len] = 90
        img += rng.normal(0, noise, size=img.shape)
        img = np.clip(img, 0, 255).astype(np.uint8)
        ok, data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
        out.append(data)
    return out


def build(episode: str, out: Path, max_tracks: int, seed: int, min_images: int = 8, views: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    data = np.load(SHARED / "tv-tracks" / f"{episode}.npz")
    rows, labels, track_ids = data["det_track_frame_xywh"], data["track_label_orig"], data["track_id"]
    first = {int(t): int(f) for t, f in zip(*np.unique(rows[:, 0], return_index=True))}
    spans = {}
    for t in track_ids:
        frames = rows[rows[:, 0] == t, 1]
        spans[int(t)] = (int(frames.min()), int(frames.max()))
    keep = [int(t) for t, label in zip(track_ids, labels) if label != "unknown"][:max_tracks]
    del first
    characters: dict[str, int] = {}
    for t, label in zip(track_ids, labels):
        if int(t) in keep:
            characters[label] = characters.get(label, 0) + 1
    ranked = sorted(characters, key=lambda c: -characters[c])
    # An episode of dev-mv's kind leaves dev-mv's people out too (the default keeps its draws as they were).
    candidates = _candidates(min_images, ("dev-ep",) if views == 1 else ("dev-ep", "dev-mv"))
    order = rng.permutation(len(candidates))
    pool = sorted((candidates[i] for i in order[: len(ranked)]), key=lambda item: -len(item[1]))
    if len(pool) < len(ranked):
        raise SystemExit(f"{episode} has {len(ranked)} characters, only {len(pool)} unused identities")
    cast = {character: pool[i] for i, character in enumerate(ranked)}
    cuts = _shots(episode)
    out.mkdir(parents=True, exist_ok=True)
    (out / "crops").mkdir(exist_ok=True)
    label = dict(zip(track_ids.tolist(), labels.tolist()))
    photo_cache: dict[str, np.ndarray] = {}
    tracks_rows, crop_rows, label_rows = [], [], []
    shown = np.zeros(5, dtype=np.int64)  # tracks by the number of photos they show
    for t in keep:
        start, end = spans[t]
        identity, photos = cast[label[t]]
        path = photos[int(rng.integers(len(photos)))]
        if path not in photo_cache:
            photo_cache[path] = cv2.imread(str(SHARED / "celeba-faces" / path))
        frames = list(range(start, end + 1, STEP))
        if len(frames) < 3:
            frames = sorted({start, (start + end) // 2, end}) if end - start >= 2 else [start, start + 1, start + 2]
        frames = frames[:40]
        sources, segment = [path], None
        if views > 1:
            segment = _view_segments(len(frames), views)
            others = [p for p in photos if p != path]
            extra = rng.choice(len(others), size=min(int(segment.max()), len(others)), replace=False)
            sources += [others[i] for i in extra]
            segment = np.minimum(segment, len(sources) - 1)
            for p in sources:
                if p not in photo_cache:
                    photo_cache[p] = cv2.imread(str(SHARED / "celeba-faces" / p))
        shown[len(sources)] += 1
        name = f"t{len(tracks_rows):04d}"
        shot = int(np.searchsorted(cuts, start, side="right"))
        tracks_rows.append((name, f"s{shot:04d}", frames[0], frames[-1]))
        label_rows.append((name, identity))
        (out / "crops" / name).mkdir(exist_ok=True)
        for frame, data_ in zip(frames, _render_track([photo_cache[p] for p in sources], len(frames), rng, segment)):
            rel = f"crops/{name}/{frame:06d}.jpg"
            (out / rel).write_bytes(data_.tobytes())
            crop_rows.append((name, frame, rel))
    for file, header, body in (
        ("tracks.csv", ("track_id", "shot_id", "start_frame", "end_frame"), tracks_rows),
        ("crops.csv", ("track_id", "frame", "path"), crop_rows),
        ("labels.csv", ("track_id", "identity"), label_rows),
    ):
        with open(out / file, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(body)
    summary = {
        "episode": episode, "seed": seed, "views": views, "tracks": len(tracks_rows), "crops": len(crop_rows),
        "identities": {cast[c][0]: characters[c] for c in ranked},
        "tracks_by_photos": {str(k): int(shown[k]) for k in range(1, 5) if shown[k]},
    }
    (out / "PROVENANCE.md").write_text(
        "# Validation track dataset (format v1), research data: benchmarks only\n\n"
        f"Made by benchmarks/make_trackset.py from {episode}'s track structure and CelebA DEV faces "
        "that dev-ep does not use (non-commercial research use only).\n\n```\n" + json.dumps(summary, indent=2) + "\n```\n"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--episode", default="bbt_s01e02")
    parser.add_argument("--max-tracks", type=int, default=600)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--views", type=int, default=1, choices=range(1, 5),
                        help="most photos a track shows (4: an episode of dev-mv's kind)")
    args = parser.parse_args(argv)
    print(json.dumps(build(args.episode, args.out, args.max_tracks, args.seed, views=args.views)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
