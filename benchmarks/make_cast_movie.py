"""Render a synthetic movie whose every face has a known identity, for end-to-end clustering benchmarks.

The cast is ``--people`` CelebA identities of the DEV split (``shared/data/celeba-faces``),
chosen at random among those whose photos agree with each other (``identity_qa.csv``:
unflagged, median intra-identity cosine at least 0.55) and that have enough usable photos
(one face in the source, a source crop of at least 160 px, a near-frontal face, no black
padding inside the pasted region). The movie is cut like a TV episode:

- **Scenes and shots.** Scenes of 1-3 shots, shots of 2-6 s, every boundary a hard cut
  with a new background. A scene has a cast of 1-3 people; its shots show all of them, or
  (shot / reverse shot) one of them in close-up. Screen time follows the cast's billing:
  person ``k`` is drawn with weight ``0.6 ** k``, so the first two are main characters
  and the last ones minor characters seen in a few shots; everyone appears in at least
  three shots when the movie has that many.
- **Faces.** Every appearance (one person in one shot) shows one of the person's photos,
  never the one of their previous appearance, so the same person changes photo (pose,
  expression, lighting, hairstyle, age) at every cut, also between the shots of one scene.
  With ``--photos-per-appearance LO HI`` an appearance shows ``k`` different photos
  instead (``k`` uniform in ``[LO, HI]``, fewer when the person has fewer photos or the
  shot is too short for each to hold 0.5 s), in consecutive segments joined by 0.3-0.5 s
  crossfades at the same face box, as a track of a real person turning and talking
  changes pose and expression (the ``dev-mv`` trackset models the same). These draws
  have a random stream of their own: the option changes the photos shown and nothing
  else, and the default (``1 1``) renders the movie it always did. The photo is pasted through a feathered elliptical mask around its face box, mirrored
  half of the time, turned by up to 8 degrees, and moves and zooms smoothly over the shot
  (eased path, a slight bob and sway). Faces are 40-200 px tall at 720p (scaled with the
  height): close-ups, medium shots, and wide shots with small faces. Some appearances are
  blurred or get a colour/brightness change.
- **Shots.** Backgrounds are a tinted, blurred stretch of a photo of someone outside the
  cast (away from their face), or a gradient with soft blobs and shapes; the camera pans
  across them. Some shots are dim, warm or cool, some have film grain. People on screen
  together keep to their own third or half of the frame, so faces never overlap.

The video is H.264 (libx264 ``veryfast``, CRF 23, yuv420p, constant frame rate) with no
audio, encoded as frames are rendered. The JSON beside it holds the plan (cast with
their photos, shots with their appearances, each with the ``photos`` it shows and the
``fades`` between them) and the ground truth: for every frame, every visible face's
``identity``, ``box`` (``x1, y1, x2, y2`` in pixels: the photo's RetinaFace face box
carried through the paste; during a crossfade, the two photos' boxes blended by the same
weight) and ``shot`` (index into ``shots``). The same ``--seed`` gives the same plan and
frames.

CelebA is for non-commercial research only and shows real, identifiable people (see
``PROVENANCE.md`` beside the crops): write the movies under ``benchmarks/work/``, which
git ignores.

Usage::

    python benchmarks/make_cast_movie.py --out benchmarks/work/cast_6p.mp4   # 6 people, 150 s, 720p24
    python benchmarks/make_cast_movie.py --out benchmarks/work/cast_6p_mv.mp4 --photos-per-appearance 1 4
"""

from __future__ import annotations

import argparse
import bisect
import csv
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
from tqdm import tqdm

CELEBA = Path(__file__).resolve().parents[2] / "shared" / "data" / "celeba-faces"

SHOT_SECONDS = (2.0, 6.0)
"""Range of shot lengths: 10-30 cuts a minute, the pace of an edited programme."""
SHOTS_PER_SCENE = ((1, 2, 3), (0.45, 0.35, 0.20))
PEOPLE_PER_SCENE = ((1, 2, 3), (0.35, 0.45, 0.20))
CLOSE_UP_PROBABILITY = 0.35
"""Chance that a later shot of a scene with several people shows one of them alone (reverse shot)."""
BILLING_DECAY = 0.6
"""Person k is drawn into scenes with weight BILLING_DECAY ** k: main, supporting, then minor characters."""
MIN_SHOTS = 3
"""Every person appears in at least this many shots (when the movie has that many)."""
FRAMINGS = {
    # name: (face height range as a fraction of the frame height, chance by number of people on screen 1, 2, 3)
    "close": ((0.19, 0.278), (0.45, 0.0, 0.0)),
    "medium": ((0.11, 0.19), (0.35, 0.75, 0.7)),
    "wide": ((0.056, 0.09), (0.20, 0.25, 0.3)),
}
"""Face heights 40-200 px at 720p; the zoom over a shot stays inside FACE_HEIGHT."""
FACE_HEIGHT = (40 / 720, 200 / 720)
MAX_ROTATION = 8.0
"""Degrees; RetinaFace and HOG both take faces turned this far in the image plane."""
MIRROR_PROBABILITY = 0.5
BLUR_PROBABILITY = 0.25
BLUR_SIGMA = (0.8, 2.2)
"""Gaussian blur of an appearance, in pixels at 720p."""
COLOUR_PROBABILITY = 0.4
LIGHTING_PROBABILITY = 0.3
GRAIN_PROBABILITY = 0.2
MASK_AXES = (0.78, 0.74)
"""Semi-axes of the pasted ellipse as fractions of the face box's width and height: the whole face,
its outline and a little hair, feathered by MASK_FEATHER face heights (Gaussian sigma)."""
MASK_FEATHER = 0.05
PHOTOS_PER_PERSON = 12
MIN_PHOTOS = 8
MIN_COHERENCE = 0.55
EXCLUDED_IDENTITIES = {"7393"}
"""7393 is the same person as held-out 7392 (PROVENANCE.md); kept out so that no one is cast twice."""
FADE_SECONDS = (0.3, 0.5)
"""Length of the crossfade from one photo of an appearance to the next, at the same face box: a head turning."""
MIN_HOLD_SECONDS = 0.5
"""Each photo of an appearance is on screen alone at least this long; short shots show fewer photos."""
PHOTO_STREAM = 1
"""Seeds the random stream of the photos beyond an appearance's first (with the movie's seed), apart from the
main stream, so that ``photos_per_appearance`` changes which photos are shown and nothing else."""


@dataclass(frozen=True)
class Photo:
    """One CelebA crop and its face box in crop pixels."""

    path: str
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class Person:
    """A cast member.

    Attributes:
        identity: CelebA identity id, the ground-truth label.
        billing: 0 for the lead; higher is less screen time.
        photos: The photos the movie shows of them.
    """

    identity: str
    billing: int
    photos: tuple[Photo, ...]


@dataclass(frozen=True)
class Appearance:
    """One person in one shot: which photos, how they are shown, where the face moves.

    Positions and heights are in output pixels; the path runs from ``start`` to ``end``
    over the shot with an ease-in-out, plus a bob of ``bob`` pixels. ``photos`` follow one
    another at the same face box: ``fades[i]`` is ``(first frame, frames)``, counted from the
    shot's start, of the crossfade from ``photos[i]`` to ``photos[i + 1]``.
    """

    identity: str
    photos: tuple[str, ...]
    fades: tuple[tuple[int, int], ...]
    mirrored: bool
    rotation: float
    blur: float
    colour: tuple[float, float, float]
    start: tuple[float, float]
    end: tuple[float, float]
    heights: tuple[float, float]
    bob: float
    bob_period: float
    phase: float

    def photo_at(self, k: int) -> tuple[int, float]:
        """The photo on screen at frame ``k`` of the shot (index into ``photos``), and the weight of the next one.

        The weight is 0 outside a crossfade and eases from 0 to 1 across it.
        """
        for index, (first, frames) in enumerate(self.fades):
            if k < first:
                return index, 0.0
            if k < first + frames:
                return index, 0.5 - 0.5 * math.cos(math.pi * (k - first + 1) / (frames + 1))
        return len(self.fades), 0.0


@dataclass(frozen=True)
class Shot:
    """One shot: frames ``start_frame .. start_frame + frames - 1``, its look and who is in it."""

    index: int
    scene: int
    start_frame: int
    frames: int
    background: str
    background_seed: int
    background_photo: str | None
    pan: float
    lighting: str | None
    lighting_gains: tuple[float, float, float]
    gamma: float
    grain: float
    appearances: tuple[Appearance, ...]


@dataclass(frozen=True)
class MoviePlan:
    """Everything needed to render the movie, frame by frame, deterministically."""

    width: int
    height: int
    fps: int
    frames: int
    seed: int
    photos_per_appearance: tuple[int, int]
    cast: tuple[Person, ...]
    shots: tuple[Shot, ...]

    def shot_at(self, frame: int) -> Shot:
        """The shot on screen at ``frame``."""
        if not 0 <= frame < self.frames:
            raise IndexError(f"frame {frame} outside the movie's {self.frames} frames")
        starts = [shot.start_frame for shot in self.shots]
        return self.shots[bisect.bisect_right(starts, frame) - 1]


# --------------------------------------------------------------------------- the cast


def _read_csv(name: str) -> list[dict[str, str]]:
    with open(CELEBA / name, newline="") as file:
        return list(csv.DictReader(file))


def _usable_photos() -> dict[str, list[Photo]]:
    """Photos of every CelebA DEV identity that paste well, by identity (no pixels read yet)."""
    meta = {row["path"]: row for row in _read_csv("crops_meta.csv")}
    photos: dict[str, list[Photo]] = {}
    for row in _read_csv("faces.csv"):
        source = meta[row["path"]]
        box = tuple(float(row[k]) for k in ("box_x1", "box_y1", "box_x2", "box_y2"))
        eye_l, eye_r, nose = ((float(row[f"lm_x{i}"]), float(row[f"lm_y{i}"])) for i in (1, 2, 3))
        eye_distance = math.dist(eye_l, eye_r)
        turned = abs(nose[0] - (eye_l[0] + eye_r[0]) / 2) / max(eye_distance, 1e-6)
        if (
            float(row["score"]) >= 0.95
            and int(source["n_faces_ge_0.8"]) == 1
            and float(source["crop_side_src_px"]) >= 160
            and eye_distance >= 0.3 * (box[2] - box[0])
            and turned <= 0.3
        ):
            photos.setdefault(row["identity"], []).append(Photo(row["path"], box))
    return photos


def _clean_inside_mask(photo: Photo) -> bool:
    """Whether the pasted region of the photo is free of the crop's black padding."""
    image = cv2.imread(str(CELEBA / photo.path))
    mask = _mask(image.shape[:2], photo.box, feather=0.0) > 0.5
    black = image.max(axis=2) < 10
    return bool(black[mask].mean() < 0.01)


def choose_cast(people: int, rng: np.random.Generator) -> tuple[tuple[Person, ...], list[Photo]]:
    """Draws the cast, and the photos of everyone else (for backgrounds).

    Raises:
        ValueError: when the data holds fewer suitable identities than ``people``.
    """
    qa = {row["identity"]: row for row in _read_csv("identity_qa.csv")}
    photos = _usable_photos()
    coherent = sorted(
        i
        for i in photos
        if i in qa
        and not qa[i]["flag"]
        and i not in EXCLUDED_IDENTITIES
        and float(qa[i]["mfn_median_intra_cos"]) >= MIN_COHERENCE
    )
    cast: list[Person] = []
    for identity in rng.permutation(coherent):
        clean = [p for p in photos[identity] if _clean_inside_mask(p)]
        if len(clean) < MIN_PHOTOS:
            continue
        picked = rng.choice(len(clean), size=min(PHOTOS_PER_PERSON, len(clean)), replace=False)
        cast.append(Person(str(identity), len(cast), tuple(clean[i] for i in sorted(picked))))
        if len(cast) == people:
            break
    if len(cast) < people:
        raise ValueError(f"only {len(cast)} CelebA identities have {MIN_PHOTOS} clean photos; asked for {people}")
    cast_ids = {person.identity for person in cast}
    others = [p for identity, ps in sorted(photos.items()) if identity not in cast_ids for p in ps]
    return tuple(cast), others


# --------------------------------------------------------------------------- the plan


def plan_movie(
    people: int = 6,
    seconds: float = 150.0,
    height: int = 720,
    fps: int = 24,
    seed: int = 0,
    photos_per_appearance: tuple[int, int] = (1, 1),
) -> MoviePlan:
    """Draws the cast, the edit and every appearance of a movie.

    Args:
        people: Cast size (at least 1).
        seconds: Length of the movie.
        height: Frame height (even); the width is 16:9 of it.
        fps: Constant frame rate.
        seed: Seed of every random choice; the same seed gives the same plan.
        photos_per_appearance: ``(lo, hi)``: each appearance shows a uniform number of different photos in
            ``[lo, hi]``, one after the other; ``(1, 1)``, one still photo per appearance, is the original
            movie. Another range changes only the photos: the same seed gives the same edit, the same
            people in each shot and the same paths.

    Returns:
        The plan; :class:`Renderer` turns it into frames.
    """
    if height % 2:
        raise ValueError(f"height must be even for yuv420p, got {height}")
    if people < 1:
        raise ValueError(f"people must be at least 1, got {people}")
    lo, hi = photos_per_appearance
    if not 1 <= lo <= hi:
        raise ValueError(f"photos_per_appearance must be 1 <= lo <= hi, got {photos_per_appearance}")
    width = round(height * 16 / 9 / 2) * 2
    total = round(seconds * fps)
    if total < 1:
        raise ValueError(f"seconds must give at least one frame, got {seconds}")
    rng = np.random.default_rng(seed)
    photo_rng = np.random.default_rng((seed, PHOTO_STREAM))
    cast, others = choose_cast(people, rng)

    # The edit: shot lengths, grouped into scenes.
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(min(max(round(rng.uniform(*SHOT_SECONDS) * fps), 1), total - sum(lengths)))
    scenes: list[int] = []
    while len(scenes) < len(lengths):
        size = int(rng.choice(SHOTS_PER_SCENE[0], p=SHOTS_PER_SCENE[1]))
        scenes += [len(set(scenes))] * size
    scenes = scenes[: len(lengths)]

    # Who is in each shot: a cast per scene, drawn by billing; later shots of a scene may show one of them.
    weights = np.array([BILLING_DECAY**person.billing for person in cast])
    members: list[list[int]] = []
    scene_cast: list[int] = []
    for k, scene in enumerate(scenes):
        if k == 0 or scene != scenes[k - 1]:
            n = min(int(rng.choice(PEOPLE_PER_SCENE[0], p=PEOPLE_PER_SCENE[1])), len(cast))
            scene_cast = [int(i) for i in rng.choice(len(cast), size=n, replace=False, p=weights / weights.sum())]
            members.append(list(scene_cast))
        elif len(scene_cast) > 1 and rng.random() < CLOSE_UP_PROBABILITY:
            members.append([scene_cast[int(rng.integers(len(scene_cast)))]])
        else:
            members.append(list(scene_cast))
    # Minor characters get at least MIN_SHOTS shots: join shots that have room, least crowded first.
    for person in range(len(cast)):
        room = sorted(
            (k for k in range(len(members)) if person not in members[k] and len(members[k]) < 3),
            key=lambda k: (len(members[k]), rng.random()),
        )
        missing = MIN_SHOTS - sum(person in m for m in members)
        for k in room[: max(missing, 0)]:
            members[k].append(person)

    shots: list[Shot] = []
    last_photo: dict[str, str] = {}
    start = 0
    for index, (frames, scene, who) in enumerate(zip(lengths, scenes, members)):
        appearances = _appearances(
            [cast[i] for i in who], frames, fps, width, height, rng, last_photo, photos_per_appearance, photo_rng
        )
        kind = "photo" if rng.random() < 0.5 else "gradient"
        background_photo = others[int(rng.integers(len(others)))].path if kind == "photo" else None
        lighting = str(rng.choice(["dim", "warm", "cool"])) if rng.random() < LIGHTING_PROBABILITY else None
        gains, gamma = _lighting(lighting, rng)
        shots.append(
            Shot(
                index=index,
                scene=scene,
                start_frame=start,
                frames=frames,
                background=kind,
                background_seed=int(rng.integers(2**31)),
                background_photo=background_photo,
                pan=round(float(rng.uniform(-0.06, 0.06) * width), 1),
                lighting=lighting,
                lighting_gains=gains,
                gamma=gamma,
                grain=round(float(rng.uniform(2, 6)), 2) if rng.random() < GRAIN_PROBABILITY else 0.0,
                appearances=tuple(appearances),
            )
        )
        start += frames
    return MoviePlan(width, height, fps, total, seed, (lo, hi), cast, tuple(shots))


def _appearances(
    people: list[Person],
    frames: int,
    fps: int,
    width: int,
    height: int,
    rng: np.random.Generator,
    last_photo: dict[str, str],
    photos_per_appearance: tuple[int, int],
    photo_rng: np.random.Generator,
) -> list[Appearance]:
    """Where and how each person of a shot is shown; each keeps to a slot of the frame's width.

    ``rng`` draws everything of the original movie; ``photo_rng`` only the photos after each appearance's
    first and their timing.
    """
    n = len(people)
    names = list(FRAMINGS)
    framing = names[int(rng.choice(len(names), p=[FRAMINGS[f][1][n - 1] for f in names]))]
    lo, hi = FRAMINGS[framing][0]
    slots = rng.permutation(n)
    out = []
    for person, slot in zip(people, slots):
        h0 = rng.uniform(lo, hi) * height
        h1 = float(np.clip(h0 * rng.uniform(0.85, 1.2), FACE_HEIGHT[0] * height, FACE_HEIGHT[1] * height))
        reach = 0.7 * max(h0, h1)  # half the pasted ellipse's width, and more, keeps the face inside its slot
        x_lo, x_hi = slot * width / n + reach, (slot + 1) * width / n - reach
        y_lo, y_hi = max(0.28 * height, reach), min(0.6 * height, height - reach)
        start, end = ((_uniform(rng, x_lo, x_hi), _uniform(rng, y_lo, y_hi)) for _ in range(2))
        # Drift at most 8 % of the width and 3 % of the height over a shot.
        end = (
            float(np.clip(end[0], start[0] - 0.08 * width, start[0] + 0.08 * width)),
            float(np.clip(end[1], start[1] - 0.03 * height, start[1] + 0.03 * height)),
        )
        choices = [p for p in person.photos if p.path != last_photo.get(person.identity)]
        photo = choices[int(rng.integers(len(choices)))]
        photos, fades = _photo_segments(person, photo, frames, fps, photos_per_appearance, photo_rng)
        last_photo[person.identity] = photos[-1]
        colour = (1.0, 1.0, 1.0)
        if rng.random() < COLOUR_PROBABILITY:
            colour = tuple(round(float(rng.uniform(0.75, 1.2) * rng.uniform(0.88, 1.12)), 3) for _ in range(3))
        out.append(
            Appearance(
                identity=person.identity,
                photos=photos,
                fades=fades,
                mirrored=bool(rng.random() < MIRROR_PROBABILITY),
                rotation=round(float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)), 2),
                blur=round(float(rng.uniform(*BLUR_SIGMA) * height / 720), 2)
                if rng.random() < BLUR_PROBABILITY
                else 0.0,
                colour=colour,
                start=(round(start[0], 1), round(start[1], 1)),
                end=(round(end[0], 1), round(end[1], 1)),
                heights=(round(h0, 1), round(h1, 1)),
                bob=round(float(rng.uniform(0.002, 0.008) * height), 2),
                bob_period=round(float(rng.uniform(1.0, 3.0) * fps), 1),
                phase=round(float(rng.uniform(0, 2 * np.pi)), 3),
            )
        )
    return out


def _photo_segments(
    person: Person,
    first: Photo,
    frames: int,
    fps: int,
    photos_per_appearance: tuple[int, int],
    rng: np.random.Generator,
) -> tuple[tuple[str, ...], tuple[tuple[int, int], ...]]:
    """The photos of one appearance, ``first`` and then others of the person, and the crossfades between them.

    Each photo holds alone at least MIN_HOLD_SECONDS, each crossfade lasts FADE_SECONDS; the time left over
    goes to the photos in random shares, so segments differ in length.
    """
    hold = max(round(MIN_HOLD_SECONDS * fps), 1)
    fade_lo, fade_hi = (max(round(s * fps), 1) for s in FADE_SECONDS)
    fits = 1 + max(frames - hold, 0) // (hold + fade_hi)
    k = min(int(rng.integers(photos_per_appearance[0], photos_per_appearance[1] + 1)), len(person.photos), fits)
    others = [p for p in person.photos if p.path != first.path]
    photos = (first.path, *(others[int(i)].path for i in rng.choice(len(others), size=k - 1, replace=False)))
    if k == 1:
        return photos, ()
    fade_frames = [int(rng.integers(fade_lo, fade_hi + 1)) for _ in range(k - 1)]
    spare = frames - k * hold - sum(fade_frames)
    holds = [hold + int(spare * share) for share in rng.dirichlet(np.ones(k))]
    fades, first_frame = [], 0
    for length, fade in zip(holds, fade_frames):
        first_frame += length
        fades.append((first_frame, fade))
        first_frame += fade
    return photos, tuple(fades)


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """A uniform draw in [lo, hi], or the middle when the range is empty."""
    return float(rng.uniform(lo, hi)) if hi > lo else (lo + hi) / 2


def _lighting(kind: str | None, rng: np.random.Generator) -> tuple[tuple[float, float, float], float]:
    """Per-channel gains and gamma of a shot's lighting."""
    if kind == "dim":
        gain = float(rng.uniform(0.55, 0.8))
        return (gain, gain, gain), round(float(rng.uniform(1.2, 1.6)), 3)
    if kind == "warm":
        return (1.1, 1.0, round(float(rng.uniform(0.72, 0.85)), 3)), 1.0
    if kind == "cool":
        return (round(float(rng.uniform(0.8, 0.9)), 3), 0.97, 1.1), 1.0
    return (1.0, 1.0, 1.0), 1.0


# --------------------------------------------------------------------------- rendering


def _mask(shape: tuple[int, int], box: tuple[float, float, float, float], feather: float = MASK_FEATHER) -> np.ndarray:
    """Float32 alpha in [0, 1] of the pasted ellipse around ``box`` in an image of ``shape``."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    mask = np.zeros(shape, np.float32)
    centre = (round((x1 + x2) / 2 * 16), round(((y1 + y2) / 2 - 0.06 * h) * 16))
    axes = (round(MASK_AXES[0] * w * 16), round(MASK_AXES[1] * h * 16))
    cv2.ellipse(mask, centre, axes, 0, 0, 360, 1.0, thickness=-1, lineType=cv2.LINE_AA, shift=4)
    if feather > 0:
        mask = cv2.GaussianBlur(mask, (0, 0), feather * h)
    return mask


class _Sprite:
    """A photo of an appearance prepared once: mirrored, recoloured, scaled near its on-screen size, blurred, masked."""

    def __init__(self, appearance: Appearance, photo: str, box: tuple[float, float, float, float]) -> None:
        image = cv2.cvtColor(cv2.imread(str(CELEBA / photo)), cv2.COLOR_BGR2RGB)
        x1, y1, x2, y2 = box
        if appearance.mirrored:
            image = image[:, ::-1]
            x1, x2 = image.shape[1] - x2, image.shape[1] - x1
        image = np.clip(image.astype(np.float32) * np.array(appearance.colour, np.float32), 0, 255)
        # Resample once to the largest on-screen size, so that the per-frame warp never shrinks by much (no aliasing).
        scale = max(appearance.heights) / (y2 - y1)
        size = max(round(image.shape[1] * scale), 1), max(round(image.shape[0] * scale), 1)
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
        self.box = (x1 * scale, y1 * scale, x2 * scale, y2 * scale)
        if appearance.blur > 0:
            image = cv2.GaussianBlur(image, (0, 0), appearance.blur)
        self.mask = _mask(image.shape[:2], self.box)
        rows, cols = np.nonzero(self.mask > 1e-3)
        self.corners = np.array(
            [
                [cols.min(), rows.min()],
                [cols.max() + 1, rows.min()],
                [cols.min(), rows.max() + 1],
                [cols.max() + 1, rows.max() + 1],
            ],
            np.float64,
        )
        self.image = image
        self.appearance = appearance

    def pose(self, t: float, k: int) -> tuple[np.ndarray, tuple[float, float, float, float]]:
        """The sprite-to-frame affine map at shot progress ``t`` (frame ``k`` of the shot), and the face box."""
        a = self.appearance
        ease = 0.5 - 0.5 * math.cos(math.pi * t)
        wave = math.sin(2 * math.pi * k / a.bob_period + a.phase)
        cx = a.start[0] + (a.end[0] - a.start[0]) * ease + a.bob * wave
        cy = a.start[1] + (a.end[1] - a.start[1]) * ease + 0.5 * a.bob * math.cos(2 * math.pi * k / a.bob_period)
        h = a.heights[0] * (a.heights[1] / a.heights[0]) ** ease
        x1, y1, x2, y2 = self.box
        r = h / (y2 - y1)
        angle = math.radians(a.rotation + 1.5 * wave)
        cos, sin = r * math.cos(angle), r * math.sin(angle)
        sx, sy = (x1 + x2) / 2, (y1 + y2) / 2
        matrix = np.array([[cos, -sin, cx - cos * sx + sin * sy], [sin, cos, cy - sin * sx - cos * sy]])
        w = (x2 - x1) * r
        return matrix, (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)

    def region(self, matrix: np.ndarray, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """The frame pixels ``x0, y0, x1, y1`` that the mask covers under ``matrix``, inside a frame of ``shape``."""
        mapped = self.corners @ matrix[:, :2].T + matrix[:, 2]
        x0, y0 = np.floor(mapped.min(axis=0)).astype(int)
        x1, y1 = np.ceil(mapped.max(axis=0)).astype(int)
        return max(x0, 0), max(y0, 0), min(x1, shape[1]), min(y1, shape[0])

    def warp(self, matrix: np.ndarray, region: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """The sprite and its alpha (float32, ``(h, w, 3)`` and ``(h, w, 1)``) on the frame pixels of ``region``."""
        x0, y0, x1, y1 = region
        local = matrix.copy()
        local[:, 2] -= (x0, y0)
        size = (x1 - x0, y1 - y0)
        image = cv2.warpAffine(self.image, local, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        alpha = cv2.warpAffine(self.mask, local, size, flags=cv2.INTER_LINEAR, borderValue=0)[..., None]
        return image, alpha

    def paste(self, frame: np.ndarray, matrix: np.ndarray) -> None:
        """Alpha-blends the sprite into ``frame`` (float32 RGB) in place."""
        x0, y0, x1, y1 = region = self.region(matrix, frame.shape)
        if x1 <= x0 or y1 <= y0:
            return
        image, alpha = self.warp(matrix, region)
        roi = frame[y0:y1, x0:x1]
        roi += alpha * (image - roi)


def _crossfade(frame: np.ndarray, layers: list[tuple[_Sprite, np.ndarray, float]]) -> None:
    """Pastes the weighted mix of sprites (sprite, matrix, weight; weights summing to 1) into ``frame`` in place.

    Colours and alphas mix premultiplied, so that where both photos cover the frame it shows their mix
    alone, without the background showing through half way.
    """
    regions = [sprite.region(matrix, frame.shape) for sprite, matrix, _ in layers]
    regions = [r for r in regions if r[2] > r[0] and r[3] > r[1]]
    if not regions:
        return
    x0, y0 = min(r[0] for r in regions), min(r[1] for r in regions)
    x1, y1 = max(r[2] for r in regions), max(r[3] for r in regions)
    colour = np.zeros((y1 - y0, x1 - x0, 3), np.float32)
    cover = np.zeros((y1 - y0, x1 - x0, 1), np.float32)
    for sprite, matrix, weight in layers:
        image, alpha = sprite.warp(matrix, (x0, y0, x1, y1))
        colour += weight * alpha * image
        cover += weight * alpha
    roi = frame[y0:y1, x0:x1]
    roi *= 1 - cover
    roi += colour


class Renderer:
    """Renders a :class:`MoviePlan` frame by frame (fastest in order: each shot's assets are built once)."""

    def __init__(self, plan: MoviePlan) -> None:
        self.plan = plan
        self._boxes = {photo.path: photo.box for person in plan.cast for photo in person.photos}
        self._shot: int | None = None
        self._background: np.ndarray | None = None
        self._sprites: list[list[_Sprite]] = []
        self._lut: np.ndarray | None = None
        self._grain: list[np.ndarray] = []

    def _enter(self, shot: Shot) -> None:
        if self._shot == shot.index:
            return
        self._shot = shot.index
        self._background = self.background(shot)
        self._sprites = [[_Sprite(a, photo, self._boxes[photo]) for photo in a.photos] for a in shot.appearances]
        levels = np.arange(256, dtype=np.float64) / 255
        self._lut = np.stack(
            [np.clip(255 * gain * levels**shot.gamma, 0, 255) for gain in shot.lighting_gains], axis=1
        ).astype(np.uint8)[:, None, :]
        rng = np.random.default_rng(shot.background_seed + 1)
        h, w = self.plan.height, self.plan.width
        self._grain = (
            [(rng.normal(0, shot.grain, (h, w, 1))).astype(np.float32) for _ in range(4)] if shot.grain else []
        )

    def background(self, shot: Shot) -> np.ndarray:
        """The shot's background, float32 RGB, ``abs(pan)`` pixels wider than the frame."""
        h, w = self.plan.height, self.plan.width + math.ceil(abs(shot.pan))
        rng = np.random.default_rng(shot.background_seed)
        # A gradient between two muted colours at a random angle.
        colours = rng.uniform(40, 190, (2, 1)) + rng.uniform(-35, 35, (2, 3))
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        ramp = (xs / w - 0.5) * math.cos(angle) + (ys / h - 0.5) * math.sin(angle)
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
        image = colours[0] + ramp[..., None] * (colours[1] - colours[0])
        if shot.background == "photo":
            image = 0.3 * image + 0.7 * self._photo_backdrop(shot.background_photo, (w, h), rng)
        else:
            blobs = cv2.resize(rng.normal(0, 15, (5, 9, 3)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
            image = image + blobs
            for _ in range(int(rng.integers(3, 7))):  # furniture: doors, windows, shelves
                x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
                x1, y1 = x0 + int(rng.integers(w // 20, w // 4)), y0 + int(rng.integers(h // 10, h // 2))
                image[y0:y1, x0:x1] = 0.5 * image[y0:y1, x0:x1] + 0.5 * (image[y0:y1, x0:x1] + rng.uniform(-50, 50, 3))
            image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), h / 150)
        return np.clip(image, 0, 255).astype(np.float32)

    def _photo_backdrop(self, path: str, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """A stretch of someone else's photo beside their face, enlarged, blurred beyond recognition, tinted."""
        image = cv2.cvtColor(cv2.imread(str(CELEBA / path)), cv2.COLOR_BGR2RGB).astype(np.float32)
        # Keep the widest strip left or right of the face box (the crop centres the face, about 94 px wide).
        side = int(rng.integers(2))
        strip = image[:, :70] if side == 0 else image[:, -70:]
        if strip.max(axis=2).mean() < 20:  # black padding: use the other side
            strip = image[:, -70:] if side == 0 else image[:, :70]
        backdrop = cv2.resize(strip, size, interpolation=cv2.INTER_CUBIC)
        backdrop = cv2.GaussianBlur(backdrop, (0, 0), size[1] / 60)
        return backdrop * rng.uniform(0.7, 1.2, 3).astype(np.float32)

    def frame(self, index: int) -> tuple[np.ndarray, list[dict]]:
        """Frame ``index`` as uint8 RGB (H, W, 3), and its faces: ``identity``, ``box`` and ``shot``."""
        shot = self.plan.shot_at(index)
        self._enter(shot)
        k = index - shot.start_frame
        t = k / max(shot.frames - 1, 1)
        offset = round(abs(shot.pan) * (t if shot.pan > 0 else 1 - t))
        frame = self._background[:, offset : offset + self.plan.width].copy()
        faces = []
        for appearance, sprites in zip(shot.appearances, self._sprites):
            photo, weight = appearance.photo_at(k)
            matrix, box = sprites[photo].pose(t, k)
            if weight:
                # A crossfade to the next photo, at the same face box; the truth box blends by the same weight.
                matrix_next, box_next = sprites[photo + 1].pose(t, k)
                _crossfade(frame, [(sprites[photo], matrix, 1 - weight), (sprites[photo + 1], matrix_next, weight)])
                box = tuple((1 - weight) * a + weight * b for a, b in zip(box, box_next))
            else:
                sprites[photo].paste(frame, matrix)
            faces.append({"identity": appearance.identity, "box": [round(v, 1) for v in box], "shot": shot.index})
        if self._grain:
            frame += self._grain[k % len(self._grain)]
        out = np.clip(frame, 0, 255).astype(np.uint8)
        if shot.lighting:
            out = cv2.LUT(out, self._lut)
        return out, faces


# --------------------------------------------------------------------------- the movie


def build_cast_movie(
    out: Path,
    people: int = 6,
    seconds: float = 150.0,
    height: int = 720,
    fps: int = 24,
    seed: int = 0,
    photos_per_appearance: tuple[int, int] = (1, 1),
) -> Path:
    """Renders the movie of :func:`plan_movie` to ``out`` and its ground truth to ``out.with_suffix(".json")``.

    Args:
        out: Output ``.mp4``.
        people, seconds, height, fps, seed, photos_per_appearance: As in :func:`plan_movie`.

    Returns:
        ``out``.
    """
    out = Path(out)
    plan = plan_movie(people, seconds, height, fps, seed, photos_per_appearance)
    renderer = Renderer(plan)
    truth: list[list[dict]] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.mp4")
    with av.open(str(partial), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "23"})
        stream.width, stream.height, stream.pix_fmt = plan.width, plan.height, "yuv420p"
        for index in tqdm(range(plan.frames), unit="frame", desc=out.name):
            rgb, faces = renderer.frame(index)
            truth.append(faces)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
            frame.pts, frame.time_base = index, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    partial.replace(out)

    record = {
        "width": plan.width,
        "height": plan.height,
        "fps": fps,
        "frames": plan.frames,
        "seed": seed,
        "photos_per_appearance": list(plan.photos_per_appearance),
        "cuts": [shot.start_frame for shot in plan.shots[1:]],
        "cast": [
            {
                "identity": p.identity,
                "billing": p.billing,
                "shots": sum(any(a.identity == p.identity for a in s.appearances) for s in plan.shots),
                "screen_frames": sum(
                    s.frames for s in plan.shots if any(a.identity == p.identity for a in s.appearances)
                ),
                "photos": [photo.path for photo in p.photos],
            }
            for p in plan.cast
        ],
        "shots": [asdict(shot) for shot in plan.shots],
        "faces": truth,
    }
    out.with_suffix(".json").write_text(json.dumps(record, separators=(",", ":")))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/work/cast_6p.mp4"), help="output .mp4, under benchmarks/work/"
    )
    parser.add_argument("--people", type=int, default=6, help="cast size")
    parser.add_argument("--seconds", type=float, default=150.0, help="length of the movie")
    parser.add_argument("--height", type=int, default=720, help="frame height; width is 16:9")
    parser.add_argument("--fps", type=int, default=24, help="frame rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the cast, the edit and every appearance")
    parser.add_argument(
        "--photos-per-appearance",
        type=int,
        nargs=2,
        default=(1, 1),
        metavar=("LO", "HI"),
        help="each appearance shows LO to HI different photos of its person, crossfading at the same box (default 1 1)",
    )
    args = parser.parse_args(argv)

    started = time.perf_counter()
    out = build_cast_movie(
        args.out, args.people, args.seconds, args.height, args.fps, args.seed, tuple(args.photos_per_appearance)
    )
    record = json.loads(out.with_suffix(".json").read_text())
    faces = sum(len(f) for f in record["faces"])
    cast = ", ".join(f"{p['identity']} ({p['shots']} shots)" for p in record["cast"])
    shown = Counter(len(a["photos"]) for shot in record["shots"] for a in shot["appearances"])
    photos = ", ".join(f"{n} with {k}" for k, n in sorted(shown.items()))
    print(
        f"{out}: {record['frames']} frames {record['width']}x{record['height']} at {record['fps']} fps, "
        f"{len(record['shots'])} shots, {faces} faces; cast {cast}; appearances by photos shown: {photos}; "
        f"{out.stat().st_size / 1e6:.1f} MB, built in {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
