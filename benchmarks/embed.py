"""Face embedding: speed and identity quality of our pipeline against dlib's own, and of every backbone.

Three questions, one script:

1. **Throughput.** Crops per second of dlib's ResNet descriptor ported to torch
   (through the backbone registry, ``vcn.identity.backbone.load_backbone("dlib-resnet")``)
   against dlib's C++ ``compute_face_descriptor`` on the same real 150 px chips.
   CPU: torch on 2 threads, batches of 32 and 128; dlib batched, per chip, and
   batched in 2 processes (the pip build of dlib has no BLAS and computes on
   one core, so 2 processes is the fair use of a 2-core machine). GPU, when
   torch sees one: bf16 autocast and fp32, batches of 512 and 1024. Every figure
   is the median of 3 timed runs after an untimed warm-up run; the machine may be
   shared, so each pass also records the cores other processes used, and is
   repeated after a quiet wait when they competed.
2. **Identity quality** on the CelebA DEV crops (``shared/data/celeba-faces``;
   research-licensed, read in place, never copied). Per image, two pipelines:

   - ours: RetinaFace (native resolution) -> the face matching the dataset's
     annotated box -> similarity alignment onto ``vcn.faces.align.DLIB_150`` -> the
     ported model;
   - dlib's: HOG detector (upsampled once; the annotated box when it finds no
     face there) -> 5-point shape predictor -> ``get_face_chip(150, 0.25)`` ->
     dlib's descriptor.

   Two crossed rows separate alignment from model: our chips through dlib's C++
   descriptor, and dlib's chips through the ported model. On the images both
   pipelines handled: verification ROC AUC and TAR at FAR 1e-3 / 1e-4 over all
   same-identity and all different-identity pairs (cosine similarity), and
   leave-one-out 1-nearest-neighbour identification accuracy.

3. **Every backbone** (``--backbones``; no dlib, no detector): each registry
   backbone, and the pair of them, on the same CelebA DEV crops, each face
   aligned from the dataset's own 5 landmarks (``faces.csv``) onto its backbone's
   template (``dlib-resnet``: ``DLIB_150``, 150 px; ``sface``: ``ARCFACE_112``,
   112 px). ``dlib-resnet+sface`` embeds each face with both, each on chips
   aligned for its own template, and concatenates the two unit vectors,
   renormalised (each half weighs the same). Two conditions:

   - *clean*: the 256 px crop as stored, aligned by :func:`vcn.faces.align.align_face`;
   - *face 24 px tall, then JPEG q30* (the default condition): the crop is
     downscaled (``cv2.INTER_AREA``) by ``s = 24 / h``, ``h`` the height of the
     dataset's face box (RetinaFace's, median 128 px), to ``round(256 s)`` px a
     side (about 48), so that the box is 24 px tall; upscaled back to 256 px
     (``cv2.INTER_LINEAR``); JPEG-encoded by OpenCV at quality 30 (its default
     4:2:0 chroma subsampling) and decoded; then aligned from the crop's own
     landmarks like a clean one. The round trip keeps the landmarks where they
     were (the two resizes' geometries, ``x' = (x + 0.5) s_x - 0.5`` with pixel
     centres on integers, cancel), so only the image loses detail. This
     reproduces the reference measurement's degraded figures to the last digit.
   - ``--jpeg-at small``: the same, but JPEG-encoded at the small size, as a
     video codec sees a small face in its frame, and aligned up to the chip
     from the landmarks scaled by that geometry. Much harsher: the face spans
     three 8 px JPEG blocks (one and a half 16 px chroma blocks), and at quality
     30 the blocks keep little detail; the embedders lose more to the JPEG here
     than to the downscale.

   Per condition and backbone: verification ROC AUC and TAR at FAR 1e-3 / 1e-4,
   leave-one-out 1-NN accuracy, as above, on all images. Speed: crops/s of each
   backbone through the registry's ``embed`` on real clean chips, on the CPU
   (torch, 2 threads, batch 64, fp32) and, when torch sees a GPU, on it (bf16
   autocast and fp32, batches of 512 and 1024); the pair runs its two networks
   one after the other, so its rate is derived, ``1 / (1/a + 1/b)``, not timed.
   With ``--gpu-only`` the quality passes run on the GPU instead, in its
   default bf16 autocast and in fp32, and the two are compared.

Outputs ``benchmarks/results/embed.json`` and ``embed.md`` (``embed_gpu.*``
with ``--gpu-only``; ``embed_backbones.*`` and ``embed_backbones_gpu.*`` with
``--backbones``) and prints the tables.

Usage, from the repository root::

    python benchmarks/embed.py                    # CPU + dlib (+ GPU when present), all DEV images
    python benchmarks/embed.py --per-identity 10  # first 10 images (by path) of each identity
    python benchmarks/embed.py --gpu-only         # GPU machine: our pipeline on the GPU only, no dlib
    python benchmarks/embed.py --backbones                 # every backbone, CPU (+ GPU when present)
    python benchmarks/embed.py --backbones sface           # one, or a comma list ("dlib-resnet+sface": the pair)
    python benchmarks/embed.py --backbones --jpeg-at small # JPEG at the face's small size (harsher)
    python benchmarks/embed.py --backbones --gpu-only      # GPU machine: every backbone on the GPU only

The full CPU run of the first two questions takes 11-15 minutes on 2 cores (more
when it waits for a quiet machine), most of it in dlib's descriptor; that of
``--backbones`` 12-14 minutes on 2 cores shared with other work (5 of them
timing, which retries when contended), the rest in the two embedding passes.
Where the crops lie elsewhere (a GPU machine), pass their folder with ``--data``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import inspect
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data" / "celeba-faces"
RESULTS = HERE / "results"

#: dlib's chip: 150 px with 25% padding around its 5-point shape, as its descriptor was trained.
CHIP_SIZE, CHIP_PADDING = 150, 0.25
#: dlib's HOG detector upsamples the image once (its examples' and face_recognition's setting):
#: its smallest face is ~80 px at native size, and upsampling finds smaller or harder ones.
HOG_UPSAMPLE = 1
CPU_THREADS = 2
CPU_BATCHES = (32, 128)
GPU_BATCHES = (512, 1024)
RUNS = 3
#: Chips per timed run: enough for several batches, small enough that dlib (~9/s on one core) stays affordable.
TORCH_CPU_CHIPS = 512
DLIB_CHIPS = 64
GPU_CHIPS = 4096
FARS = (1e-3, 1e-4)
#: A TAR at FAR f is reported only when at least this many negatives lie above its threshold.
MIN_NEGATIVES_ABOVE = 10


@dataclass(frozen=True)
class Face:
    """One annotated crop of the dataset: its file, identity, face box and 5 landmarks (crop pixels)."""

    path: str
    identity: int
    box: tuple[float, float, float, float]
    landmarks: tuple[tuple[float, float], ...]


# --- data -----------------------------------------------------------------------------------


def read_faces(data: Path, per_identity: int) -> list[Face]:
    """The dataset's annotated crops sorted by path, optionally the first ``per_identity`` of each identity."""
    with open(data / "faces.csv", newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: row["path"])
    taken: dict[int, int] = {}
    faces = []
    for row in rows:
        identity = int(row["identity"])
        if per_identity and taken.get(identity, 0) >= per_identity:
            continue
        taken[identity] = taken.get(identity, 0) + 1
        box = tuple(float(row[key]) for key in ("box_x1", "box_y1", "box_x2", "box_y2"))
        landmarks = tuple((float(row[f"lm_x{i}"]), float(row[f"lm_y{i}"])) for i in range(1, 6))
        faces.append(Face(row["path"], identity, box, landmarks))
    return faces


def read_rgb(path: Path) -> np.ndarray:
    import cv2

    image = cv2.imread(str(path))
    if image is None:
        raise FileNotFoundError(f"cannot read {path}")
    return np.ascontiguousarray(image[:, :, ::-1])


def matching_face(boxes: np.ndarray, annotated: tuple[float, float, float, float]) -> int | None:
    """Index of the detection that is the annotated face, or None.

    A candidate's centre must lie inside the annotated box (robust to detectors
    that draw boxes differently: dlib's HOG boxes are square and tighter than
    RetinaFace's); among candidates the largest IoU with the annotated box wins.
    """
    if len(boxes) == 0:
        return None
    x1, y1, x2, y2 = annotated
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    inside = (cx >= x1) & (cx <= x2) & (cy >= y1) & (cy <= y2)
    if not inside.any():
        return None
    ix = np.clip(np.minimum(boxes[:, 2], x2) - np.maximum(boxes[:, 0], x1), 0, None)
    iy = np.clip(np.minimum(boxes[:, 3], y2) - np.maximum(boxes[:, 1], y1), 0, None)
    overlap = ix * iy
    union = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) + (x2 - x1) * (y2 - y1) - overlap
    iou = np.where(inside, overlap / np.maximum(union, 1e-9), -1.0)
    return int(np.argmax(iou))


# --- our pipeline ---------------------------------------------------------------------------


def load_embedder(device: str) -> tuple[Any, str]:
    """The ``dlib-resnet`` backbone from the registry, and how it was loaded (recorded in the report)."""
    from vcn import load_backbone

    return load_backbone("dlib-resnet", device=device), "vcn.identity.backbone.load_backbone('dlib-resnet')"


def embed(embedder: Any, chips: np.ndarray, batch: int) -> np.ndarray:
    """Embeddings of ``chips``, one ``embed`` call per ``batch`` chips (passed on as its batch size when it takes one)."""
    keyword = {"batch_size": batch} if "batch_size" in inspect.signature(embedder.embed).parameters else {}
    parts = [np.asarray(embedder.embed(chips[i : i + batch], **keyword)) for i in range(0, len(chips), batch)]
    return np.concatenate(parts).astype(np.float32, copy=False)


def our_chips(faces: list[Face], data: Path) -> tuple[np.ndarray, np.ndarray]:
    """RetinaFace + ``dlib-150`` alignment for every face: (N, 150, 150, 3) chips and a found mask."""
    from tqdm import tqdm

    from vcn.faces.align import align_faces, get_template
    from vcn.faces.detection import create_detector

    detector = create_detector("retinaface", max_side=None)
    template = get_template("dlib-150")
    chips = np.zeros((len(faces), template.size, template.size, 3), np.uint8)
    found = np.zeros(len(faces), bool)
    step = 32  # the crops are all 256x256: detect them in batches
    for start in tqdm(range(0, len(faces), step), desc="ours: detect + align", unit="batch", file=sys.stderr):
        group = faces[start : start + step]
        images = [read_rgb(data / face.path) for face in group]
        for offset, (face, image, detections) in enumerate(zip(group, images, detector.detect(images))):
            index = matching_face(detections.boxes, face.box)
            if index is not None:
                chips[start + offset] = align_faces(image, detections.landmarks[index : index + 1], template)[0]
                found[start + offset] = True
    return chips, found


# --- dlib's pipeline (worker processes: dlib computes on one core) --------------------------

_DLIB: dict[str, Any] = {}


def _dlib_init(with_detector: bool) -> None:
    """Load dlib's models once per worker process."""
    import importlib.util

    import dlib

    # face_recognition_models' __init__ imports the deprecated pkg_resources; locate its files without it.
    spec = importlib.util.find_spec("face_recognition_models")
    models = Path(next(iter(spec.submodule_search_locations))) / "models"
    _DLIB["descriptor"] = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
    if with_detector:
        _DLIB["detector"] = dlib.get_frontal_face_detector()
        _DLIB["predictor"] = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))


def _dlib_face(
    task: tuple[str, tuple[float, ...], np.ndarray | None],
) -> tuple[str, np.ndarray, np.ndarray, np.ndarray | None]:
    """dlib's pipeline on one image, plus dlib's descriptor of our chip of it.

    Returns:
        (how dlib placed the face: "hog" or "annotated box", dlib's chip, dlib's
        descriptor of it, dlib's descriptor of our chip or None).
    """
    import dlib

    path, box, ours = task
    image = read_rgb(Path(path))
    rects = _DLIB["detector"](image, HOG_UPSAMPLE)
    boxes = np.array([[r.left(), r.top(), r.right() + 1, r.bottom() + 1] for r in rects], np.float64).reshape(-1, 4)
    index = matching_face(boxes, box)
    if index is not None:
        rect, source = rects[index], "hog"
    else:
        rect, source = dlib.rectangle(*(round(v) for v in box)), "annotated box"
    chip = dlib.get_face_chip(image, _DLIB["predictor"](image, rect), size=CHIP_SIZE, padding=CHIP_PADDING)
    batch = [chip] if ours is None else [chip, ours]
    descriptors = np.array(_DLIB["descriptor"].compute_face_descriptor(batch), np.float32)
    return source, chip, descriptors[0], descriptors[1] if ours is not None else None


def _dlib_descriptors(chips: list[np.ndarray]) -> np.ndarray:
    return np.array(_DLIB["descriptor"].compute_face_descriptor(chips), np.float32)


@contextlib.contextmanager
def dlib_pool(with_detector: bool) -> Iterator[Any]:
    """One dlib worker process per CPU thread we allow ourselves (spawned: no forked torch or ONNX state)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(CPU_THREADS, _dlib_init, (with_detector,)) as pool:
        yield pool


def dlib_pipeline(
    faces: list[Face], data: Path, ours: np.ndarray, found: np.ndarray
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """dlib's pipeline on every face, in parallel.

    Returns:
        Per face how dlib placed it, dlib's chips, dlib's descriptors of them and
        of our chips (L2-normalised; zeros where we found no face).
    """
    from tqdm import tqdm

    tasks = [(str(data / f.path), f.box, ours[i] if found[i] else None) for i, f in enumerate(faces)]
    sources, chips = [], np.zeros((len(faces), CHIP_SIZE, CHIP_SIZE, 3), np.uint8)
    on_dlib, on_ours = np.zeros((len(faces), 128), np.float32), np.zeros((len(faces), 128), np.float32)
    with dlib_pool(with_detector=True) as pool:
        results = pool.imap(_dlib_face, tasks, chunksize=8)
        for i, (source, chip, descriptor, ours_descriptor) in enumerate(
            tqdm(results, total=len(tasks), desc="dlib: detect + chip + 2 descriptors", file=sys.stderr)
        ):
            sources.append(source)
            chips[i], on_dlib[i] = chip, descriptor
            if ours_descriptor is not None:
                on_ours[i] = ours_descriptor
    return sources, chips, _unit(on_dlib), _unit(on_ours)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# --- metrics --------------------------------------------------------------------------------


def verification(embeddings: np.ndarray, identities: np.ndarray) -> dict[str, Any]:
    """ROC AUC and TAR at fixed FARs of cosine similarity over all pairs of distinct images.

    AUC is the Mann-Whitney statistic from average ranks (ties count one half).
    TAR at FAR f: the share of same-identity pairs scoring above the similarity
    exceeded by ``floor(f * negatives)`` different-identity pairs.
    """
    from scipy.stats import rankdata

    similarity = embeddings @ embeddings.T
    first, second = np.triu_indices(len(embeddings), 1)
    scores = similarity[first, second].astype(np.float64)
    same = identities[first] == identities[second]
    positives, negatives = scores[same], scores[~same]
    n_pos, n_neg = len(positives), len(negatives)
    ranks = rankdata(scores)
    auc = (ranks[same].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)

    descending = np.sort(negatives)[::-1]
    tar = {}
    for far in FARS:
        above = math.floor(far * n_neg)
        if above < MIN_NEGATIVES_ABOVE:
            tar[f"{far:g}"] = None
            continue
        threshold = descending[above]
        tar[f"{far:g}"] = {
            "tar": float((positives > threshold).mean()),
            "threshold": float(threshold),
            "far": float((negatives > threshold).mean()),
        }
    return {"auc": float(auc), "tar_at_far": tar, "same_pairs": n_pos, "different_pairs": n_neg}


def identification(embeddings: np.ndarray, identities: np.ndarray) -> dict[str, Any]:
    """Leave-one-out 1-nearest-neighbour accuracy (cosine) over images whose identity has another image."""
    similarity = embeddings @ embeddings.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = similarity.argmax(axis=1)
    _, inverse, counts = np.unique(identities, return_inverse=True, return_counts=True)
    eligible = counts[inverse] >= 2
    correct = identities[nearest] == identities
    return {"nn1_accuracy": float(correct[eligible].mean()), "queries": int(eligible.sum())}


def quality_table(rows: dict[str, np.ndarray], identities: np.ndarray, subset: np.ndarray) -> dict[str, Any]:
    """Verification and identification of every embedding row on the images in ``subset``."""
    ids = identities[subset]
    return {
        "images": int(subset.sum()),
        "identities": len(np.unique(ids)),
        "rows": {name: {**verification(x[subset], ids), **identification(x[subset], ids)} for name, x in rows.items()},
    }


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """How close two sets of unit embeddings of the same chips are."""
    cosine = (a * b).sum(axis=1)
    return {
        "max_abs_diff": float(np.abs(a - b).max()),
        "min_cosine": float(cosine.min()),
        "median_cosine": float(np.median(cosine)),
    }


# --- throughput -----------------------------------------------------------------------------


#: Other work on the machine above this many cores during a timed pass marks it contended.
CONTENDED_CORES = 0.25
#: Passes of a measurement tried before its contended figures are kept as they are.
ATTEMPTS = 3


def machine_busy_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot, from /proc/stat; steal counts as neither."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def process_ticks(pids: list[int]) -> int:
    """CPU ticks (user + system, all threads) that the processes ``pids`` have used."""
    total = 0
    for pid in pids:
        # Fields after the parenthesised command name; utime and stime are the 12th and 13th of them.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total


def other_cores(since: tuple[int, int, int], pids: list[int]) -> float:
    """Cores kept busy, since ``since`` (from :func:`cpu_snapshot`), by processes other than ``pids``."""
    busy, total = machine_busy_ticks()
    ours = process_ticks(pids)
    return ((busy - since[0]) - (ours - since[2])) / max(total - since[1], 1) * (os.cpu_count() or 1)


def cpu_snapshot(pids: list[int]) -> tuple[int, int, int]:
    return (*machine_busy_ticks(), process_ticks(pids))


def wait_for_quiet(limit_s: float = 60.0) -> None:
    """Wait, at most ``limit_s``, until other work keeps under :data:`CONTENDED_CORES` cores busy."""
    deadline = time.perf_counter() + limit_s
    while time.perf_counter() < deadline:
        since = cpu_snapshot([os.getpid()])
        time.sleep(2.0)
        busy = other_cores(since, [os.getpid()])
        if busy < CONTENDED_CORES:
            return
        print(f"  waiting for a quiet machine: other work keeps {busy:.2f} cores busy", file=sys.stderr)


def timed_runs(
    work: Callable[[], object], chips: int, sync: Callable[[], None] = lambda: None, pids: list[int] | None = None
) -> dict[str, Any]:
    """Crops/s of ``work`` (one pass over ``chips`` chips): an untimed warm-up, then the median of :data:`RUNS`.

    The machine is shared with other sessions, so each timed pass also measures
    how many cores other processes than ``pids`` (default: this one) kept busy;
    when that exceeds :data:`CONTENDED_CORES` the pass is repeated after waiting
    for a quiet machine, up to :data:`ATTEMPTS` times, and the least contended kept.
    """
    pids = pids or [os.getpid()]
    work()
    sync()
    best: dict[str, Any] | None = None
    for attempt in range(1, ATTEMPTS + 1):
        seconds = []
        since = cpu_snapshot(pids)
        for _ in range(RUNS):
            start = time.perf_counter()
            work()
            sync()
            seconds.append(time.perf_counter() - start)
        measured = {
            "chips": chips,
            "run_seconds": [round(s, 4) for s in seconds],
            "crops_per_s": round(chips / float(np.median(seconds)), 1),
            "own_cores": round((process_ticks(pids) - since[2]) / os.sysconf("SC_CLK_TCK") / sum(seconds), 2),
            "other_cores": round(other_cores(since, pids), 2),
        }
        if best is None or measured["other_cores"] < best["other_cores"]:
            best = measured
        best["attempts"] = attempt
        if measured["other_cores"] < CONTENDED_CORES or attempt == ATTEMPTS:
            break
        print(f"  contended ({measured['other_cores']:.2f} other cores); waiting, then again", file=sys.stderr)
        wait_for_quiet()
    return best


def cpu_throughput(embedder: Any, chips: np.ndarray) -> list[dict[str, Any]]:
    """The ported model (2 threads) and dlib's descriptor (batched, per chip, 2 processes) on the CPU."""
    import psutil
    import torch

    results = []
    torch_chips, dlib_chips = chips[:TORCH_CPU_CHIPS], list(chips[:DLIB_CHIPS])
    for batch in CPU_BATCHES:
        print(f"throughput: ported model, CPU, batch {batch}", file=sys.stderr)
        measured = timed_runs(functools.partial(embed, embedder, torch_chips, batch), len(torch_chips))
        results.append(
            {
                "engine": "ported model (torch)",
                "device": "cpu",
                "precision": "fp32",
                "batch": batch,
                "workers": f"{torch.get_num_threads()} threads",
                **measured,
            }
        )

    _dlib_init(with_detector=False)
    descriptor = _DLIB["descriptor"]
    print("throughput: dlib, batched", file=sys.stderr)
    measured = timed_runs(lambda: descriptor.compute_face_descriptor(dlib_chips), len(dlib_chips))
    results.append(
        {
            "engine": "dlib C++",
            "device": "cpu",
            "precision": "fp32",
            "batch": len(dlib_chips),
            "workers": "1 process",
            **measured,
        }
    )
    print("throughput: dlib, per chip", file=sys.stderr)
    measured = timed_runs(lambda: [descriptor.compute_face_descriptor(c) for c in dlib_chips], len(dlib_chips))
    results.append(
        {"engine": "dlib C++", "device": "cpu", "precision": "fp32", "batch": 1, "workers": "1 process", **measured}
    )
    print(f"throughput: dlib, batched, {CPU_THREADS} processes", file=sys.stderr)
    halves = [dlib_chips[i::CPU_THREADS] for i in range(CPU_THREADS)]
    with dlib_pool(with_detector=False) as pool:
        workers = [os.getpid(), *(child.pid for child in psutil.Process().children())]
        measured = timed_runs(lambda: pool.map(_dlib_descriptors, halves), len(dlib_chips), pids=workers)
    results.append(
        {
            "engine": "dlib C++",
            "device": "cpu",
            "precision": "fp32",
            "batch": len(halves[0]),
            "workers": f"{CPU_THREADS} processes",
            **measured,
        }
    )
    return results


def gpu_throughput(embedder: Any, chips: np.ndarray) -> list[dict[str, Any]]:
    """The ported model on the GPU through the registry: bf16 autocast and fp32, large batches."""
    import torch

    tiled = np.resize(chips, (GPU_CHIPS, *chips.shape[1:]))  # repeats the real chips up to GPU_CHIPS
    results = []
    for precision in ("bf16", "fp32"):
        for batch in GPU_BATCHES:
            print(f"throughput: ported model, GPU, {precision}, batch {batch}", file=sys.stderr)
            with gpu_precision(embedder, precision):
                measured = timed_runs(
                    functools.partial(embed, embedder, tiled, batch), GPU_CHIPS, torch.cuda.synchronize
                )
            results.append(
                {
                    "engine": "ported model (torch)",
                    "device": "cuda",
                    "precision": precision,
                    "batch": batch,
                    "workers": "1 GPU",
                    **measured,
                    "distinct_chips": len(chips),
                }
            )
    return results


@contextlib.contextmanager
def gpu_precision(embedder: Any, precision: str) -> Iterator[None]:
    """Run ``embedder`` in ``precision`` ("bf16": CUDA autocast, "fp32": none) by its ``dtype`` attribute.

    The registry's ``embed`` opens its own ``torch.autocast(enabled=dtype == "bfloat16")``,
    which overrides any autocast around the call, so precision is chosen through ``dtype``.
    """
    before = embedder.dtype
    embedder.dtype = {"bf16": "bfloat16", "fp32": "float32"}[precision]
    try:
        yield
    finally:
        embedder.dtype = before


# --- report ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import cv2
    import onnxruntime
    import psutil
    import torch

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    facts: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": onnxruntime.__version__,
        "opencv": cv2.__version__,
        "numpy": np.__version__,
    }
    with contextlib.suppress(ImportError):
        import dlib

        facts["dlib"] = {
            "version": dlib.__version__,
            "blas": bool(dlib.DLIB_USE_BLAS),
            "cuda": bool(dlib.DLIB_USE_CUDA),
        }
    if torch.cuda.is_available():
        facts["gpu"] = {
            "name": torch.cuda.get_device_name(0),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
        }
    return facts


ROW_LABELS = {
    "dlib": ("dlib HOG + 5-point shape", "get_face_chip(150, 0.25)", "dlib C++"),
    "ours": ("RetinaFace", "DLIB_150 similarity", "ported model (CPU)"),
    "our chips + dlib descriptor": ("RetinaFace", "DLIB_150 similarity", "dlib C++"),
    "dlib chips + ported model": ("dlib HOG + 5-point shape", "get_face_chip(150, 0.25)", "ported model (CPU)"),
    "ours, cuda fp32": ("RetinaFace", "DLIB_150 similarity", "ported model (CUDA fp32)"),
    "ours, cuda bf16": ("RetinaFace", "DLIB_150 similarity", "ported model (CUDA bf16 autocast)"),
}


def measured_on(report: dict[str, Any]) -> str:
    """The sentence saying when, on what and how long."""
    m = report["machine"]
    return (
        f"Measured {report['date_utc']} on {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, "
        f"Python {m['python']}, torch {m['torch']} ({report['cpu_threads']} CPU threads)"
        + (
            f", dlib {m['dlib']['version']} (BLAS: {m['dlib']['blas']}, CUDA: {m['dlib']['cuda']})"
            if "dlib" in m
            else ""
        )
        + (
            f", GPU {m['gpu']['name']} (CUDA {m['gpu']['cuda']}, cuDNN TF32 allowed: {m['gpu']['cudnn_allow_tf32']})"
            if "gpu" in m
            else ""
        )
        + f". Load average (1, 5, 15 min) at the start {m['load_average_start']}, at the end {m['load_average_end']}."
        + f" Total {report['timings_s']['total']:.0f} s."
    )


def contention_note(contended: list[str]) -> str:
    """How the timings dealt with a shared machine, and which stayed contended."""
    return (
        "This machine is shared with other sessions. Each timing pass measured the cores other processes kept "
        f"busy (last column) and was repeated after a quiet wait when that reached {CONTENDED_CORES} "
        f"(up to {ATTEMPTS} tries, least contended kept). "
        + (
            f"Still contended, so read as lower bounds: {'; '.join(contended)}."
            if contended
            else "No CPU row was contended."
        )
    )


GPU_TIMING_NOTE = (
    "GPU timings go through the registry's embed: uint8 chips in, host-to-device copy and normalised float32 out "
    "included; precision set by the backbone's dtype (bf16 = its CUDA autocast); fp32 means cuDNN's default "
    "(TF32 allowed, see machine facts)."
)


def to_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Embedding benchmark" + (" (GPU)" if report["gpu_only"] else ""),
        "",
        measured_on(report),
        "",
        f"Command: `{report['commands']['this_run']}`. Embedder: {report['embedder']} (version {report['embedder_version']}).",
        "",
        "## Throughput (crops/s, median of 3 runs after a warm-up, same real 150 px chips)",
        "",
        "| engine | device | precision | batch | workers | chips per run | crops/s | own cores | other work, cores |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["throughput"]:
        lines.append(
            f"| {r['engine']} | {r['device']} | {r['precision']} | {r['batch']} | {r['workers']} | "
            f"{r['chips']} | {r['crops_per_s']:.1f} | {r['own_cores']:.2f} | {r['other_cores']:.2f} |"
        )
    q = report["quality"]
    lines += [
        "",
        "## Identity quality, CelebA DEV crops",
        "",
        f"Images: {q['subset']}. {q['images_total']} images of {q['identities_total']} identities; "
        f"our detector found the annotated face in {q['ours_found']}"
        + (
            f"; dlib's HOG found it in {q['dlib_hog']} and used the annotated box for the other {q['dlib_box_fallback']}"
            if "dlib_hog" in q
            else ""
        )
        + ". Pairs: all same-identity and all different-identity pairs; cosine similarity.",
        "",
    ]
    common_title = "Images our pipeline handled" if report["gpu_only"] else "Images both pipelines handled"
    for key, title in (("common", common_title), ("hog_found", "Only images where dlib's HOG found the face itself")):
        if key not in q:
            continue
        table = q[key]
        lines += [
            f"**{title}**: {table['images']} images, {table['identities']} identities.",
            "",
            "| pipeline | detector + landmarks | chip | descriptor | AUC | TAR@FAR=1e-3 | TAR@FAR=1e-4 | 1-NN acc | same / diff pairs |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in table["rows"].items():
            tars = [r["tar_at_far"][f"{f:g}"] for f in FARS]
            tars = [f"{t['tar']:.4f}" if t else "n/a" for t in tars]
            detector, chip, descriptor = ROW_LABELS[name]
            lines.append(
                f"| {name} | {detector} | {chip} | {descriptor} | {r['auc']:.4f} | {tars[0]} | {tars[1]} | "
                f"{r['nn1_accuracy']:.4f} | {r['same_pairs']} / {r['different_pairs']} |"
            )
        lines.append("")
    if report.get("agreement"):
        lines.append(
            "Agreement of embeddings of the same chips (unit vectors): "
            + "; ".join(
                f"{k}: max abs diff {v['max_abs_diff']:.2g}, min cosine {v['min_cosine']:.9f}"
                for k, v in report["agreement"].items()
            )
            + "."
        )
        lines.append("")
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {note}" for note in report["notes"]] + [""]
    lines.append("Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings_s"].items()) + ".")
    return "\n".join(lines) + "\n"


# --- every backbone (--backbones) -----------------------------------------------------------

#: The study's default: each backbone with packaged weights, and the two together.
BACKBONES = ("dlib-resnet", "sface", "dlib-resnet+sface")
CLEAN, DEGRADED = "clean", "face 24 px tall, then JPEG q30"
#: The degraded condition: the face box this many pixels tall, then a JPEG of this quality.
DEGRADED_FACE_PX = 24
DEGRADED_JPEG_QUALITY = 30
#: Where the degraded image is JPEG-encoded (``--jpeg-at``): "crop" (the default condition) upscales
#: the small image back to the crop's 256 px first; "small" encodes it at its ~48 px, as a video
#: codec sees a small face in a frame.
JPEG_AT = {
    "crop": (
        f"the crop downscaled (INTER_AREA) so that its face box is {DEGRADED_FACE_PX} px tall, upscaled back to "
        f"256 px (INTER_LINEAR), JPEG quality {DEGRADED_JPEG_QUALITY} (OpenCV, 4:2:0) at that size, aligned from "
        "the crop's landmarks"
    ),
    "small": (
        f"the crop downscaled (INTER_AREA) so that its face box is {DEGRADED_FACE_PX} px tall (about 48 px a side), "
        f"JPEG quality {DEGRADED_JPEG_QUALITY} (OpenCV, 4:2:0) at that size, aligned up to the chip from the "
        "exactly scaled landmarks"
    ),
}
#: Every backbone is timed on the CPU at one batch size, the one a CPU deployment would use,
#: over this many real chips per run (2 batches; SFace runs ~17-25/s on 2 busy cores).
BACKBONE_CPU_BATCH = 64
BACKBONE_CPU_CHIPS = 128
#: Chips per embedding call in the quality passes: the unit of their progress bar.
QUALITY_CHUNK = 512
#: The reference measurement's table (made with ONNX Runtime before the port): condition -> backbone -> (AUC, TAR@FAR 1e-3, 1-NN accuracy).
REFERENCE = {
    CLEAN: {
        "dlib-resnet": (0.9954, 0.834, 0.968),
        "sface": (0.9878, 0.916, 0.982),
        "dlib-resnet+sface": (0.9924, 0.927, 0.982),
    },
    DEGRADED: {
        "dlib-resnet": (0.9556, 0.231, 0.763),
        "sface": (0.9656, 0.483, 0.919),
        "dlib-resnet+sface": (0.9731, 0.501, 0.928),
    },
}


def parse_backbones(text: str) -> list[list[str]]:
    """``"dlib-resnet,sface,dlib-resnet+sface"`` -> ``[["dlib-resnet"], ["sface"], ["dlib-resnet", "sface"]]``."""
    from vcn.identity.backbone import KNOWN_BACKBONES

    combos = [[part.strip() for part in item.split("+")] for item in text.split(",") if item.strip()]
    unknown = sorted({part for combo in combos for part in combo} - set(KNOWN_BACKBONES))
    if not combos or unknown:
        raise SystemExit(
            f"--backbones: unknown {', '.join(unknown) or 'nothing given'}; known: {', '.join(KNOWN_BACKBONES)}"
        )
    return combos


def degrade(image: np.ndarray, face: Face, jpeg_at: str = "crop") -> tuple[np.ndarray, np.ndarray]:
    """The crop with its face box :data:`DEGRADED_FACE_PX` tall, through JPEG; and the face's landmarks on it.

    Downscaled with ``cv2.INTER_AREA`` (the anti-aliased downscale a camera or a
    video scaler approximates); with ``jpeg_at="crop"`` upscaled back to the
    crop's size (``cv2.INTER_LINEAR``); JPEG-encoded by OpenCV at
    :data:`DEGRADED_JPEG_QUALITY` and decoded. The landmarks follow the resizes
    exactly (pixel centres on integers, as :mod:`vcn.faces.align` and
    ``cv2.resize`` both take them), so after the round trip they are the crop's own.
    """
    import cv2

    height, width = image.shape[:2]
    scale = DEGRADED_FACE_PX / (face.box[3] - face.box[1])
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    if jpeg_at == "crop":
        small, size = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR), (width, height)
    ok, encoded = cv2.imencode(".jpg", small[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, DEGRADED_JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"OpenCV could not JPEG-encode {face.path} at {size}")
    degraded = np.ascontiguousarray(cv2.imdecode(encoded, cv2.IMREAD_COLOR)[:, :, ::-1])
    ratio = np.array([size[0] / width, size[1] / height])
    return degraded, (np.array(face.landmarks) + 0.5) * ratio - 0.5


def landmark_chips(
    faces: list[Face], data: Path, templates: list[str], jpeg_at: str
) -> dict[str, dict[str, np.ndarray]]:
    """Chips of every face aligned from the dataset's landmarks: condition -> template name -> (N, S, S, 3)."""
    from tqdm import tqdm

    from vcn.faces.align import align_face, get_template

    shapes = {name: get_template(name) for name in templates}
    chips = {
        c: {n: np.zeros((len(faces), t.size, t.size, 3), np.uint8) for n, t in shapes.items()}
        for c in (CLEAN, DEGRADED)
    }
    for i, face in enumerate(tqdm(faces, desc="align clean + degraded", unit="face", file=sys.stderr)):
        image = read_rgb(data / face.path)
        small, small_landmarks = degrade(image, face, jpeg_at)
        for name, template in shapes.items():
            chips[CLEAN][name][i] = align_face(image, np.array(face.landmarks), template)
            chips[DEGRADED][name][i] = align_face(small, small_landmarks, template)
    return chips


def embed_all(backbone: Any, chips: np.ndarray, batch: int, label: str) -> np.ndarray:
    """Embeddings of many chips, with a progress bar."""
    from tqdm import tqdm

    starts = range(0, len(chips), QUALITY_CHUNK)
    parts = [
        embed(backbone, chips[i : i + QUALITY_CHUNK], batch)
        for i in tqdm(starts, desc=label, unit="chunk", file=sys.stderr)
    ]
    return np.concatenate(parts)


def backbone_speed(models: dict[str, Any], chips: dict[str, np.ndarray], device: str) -> list[dict[str, Any]]:
    """Crops/s of each backbone through the registry's ``embed``: CPU fp32 at batch 64, or GPU bf16/fp32 at large batches."""
    import torch

    rows = []
    for name, model in models.items():
        real = chips[model.template]
        if device == "cpu":
            settings = [("fp32", BACKBONE_CPU_BATCH)]
            work_chips, sync, workers = real[:BACKBONE_CPU_CHIPS], (lambda: None), f"{torch.get_num_threads()} threads"
        else:
            settings = [(p, b) for p in ("bf16", "fp32") for b in GPU_BATCHES]
            work_chips, sync, workers = np.resize(real, (GPU_CHIPS, *real.shape[1:])), torch.cuda.synchronize, "1 GPU"
        for precision, batch in settings:
            print(f"throughput: {name}, {device}, {precision}, batch {batch}", file=sys.stderr)
            with gpu_precision(model, precision) if device != "cpu" else contextlib.nullcontext():
                measured = timed_runs(functools.partial(embed, model, work_chips, batch), len(work_chips), sync)
            rows.append(
                {
                    "backbone": name,
                    "chip": f"{model.template} ({model.input_size} px)",
                    "device": device,
                    "precision": precision,
                    "batch": batch,
                    "workers": workers,
                    **measured,
                    "distinct_chips": min(len(real), len(work_chips)),
                }
            )
    return rows


def pair_speed(rows: list[dict[str, Any]], combos: list[list[str]]) -> list[dict[str, Any]]:
    """The rate of each combination, ``1 / sum(1 / rate)`` of its parts at the same device, precision and batch."""
    derived = []
    for combo in (c for c in combos if len(c) > 1):
        for row in (r for r in rows if r["backbone"] == combo[0]):
            same = {
                r["backbone"]: r
                for r in rows
                if (r["device"], r["precision"], r["batch"]) == (row["device"], row["precision"], row["batch"])
            }
            rate = 1.0 / sum(1.0 / same[part]["crops_per_s"] for part in combo)
            derived.append(
                {
                    "backbone": "+".join(combo),
                    "chip": " + ".join(same[p]["chip"] for p in combo),
                    "device": row["device"],
                    "precision": row["precision"],
                    "batch": row["batch"],
                    "workers": row["workers"],
                    "chips": None,
                    "crops_per_s": round(rate, 1),
                    "own_cores": None,
                    "other_cores": max(same[p]["other_cores"] for p in combo),
                    "derived": "1 / sum(1 / rate of each part)",
                }
            )
    return derived


def backbone_study(args: argparse.Namespace) -> None:
    """Quality (clean and degraded) and speed of every backbone asked for; writes ``embed_backbones[_gpu].*``."""
    import torch

    from vcn import load_backbone

    torch.set_num_threads(CPU_THREADS)
    cuda = torch.cuda.is_available()
    if args.gpu_only and not cuda:
        sys.exit("--gpu-only: torch sees no CUDA device")
    combos = parse_backbones(args.backbones)
    singles = list(dict.fromkeys(part for combo in combos for part in combo))
    started = time.perf_counter()
    load_start = [round(v, 2) for v in os.getloadavg()]
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.perf_counter() - since, 1)
        return time.perf_counter()

    # The CPU path names its device: it never touches CUDA, even on a GPU machine.
    devices = (["cuda"] if cuda else []) if args.gpu_only else ["cpu", *(["cuda"] if cuda else [])]
    models = {device: {name: load_backbone(name, device=device) for name in singles} for device in devices}
    templates = list(dict.fromkeys(model.template for model in models[devices[0]].values()))
    faces = read_faces(args.data, args.per_identity)
    identities = np.array([f.identity for f in faces])
    t = time.perf_counter()
    chips = landmark_chips(faces, args.data, templates, args.jpeg_at)
    t = lap("align", t)

    # Speed first: it is short, and the machine is shared.
    speed: list[dict[str, Any]] = []
    for device in devices:
        speed += backbone_speed(models[device], chips[CLEAN], device)
        t = lap(f"throughput_{device}", t)
    speed += pair_speed(speed, combos)

    # Quality on the CPU in fp32, or with --gpu-only on the GPU in its default bf16 and in fp32.
    settings = [("cuda", "bf16"), ("cuda", "fp32")] if args.gpu_only else [("cpu", "fp32")]
    everyone = np.ones(len(faces), bool)
    quality: dict[str, Any] = {}
    agreements: dict[str, Any] = {}
    embeddings: dict[tuple[str, str, str], np.ndarray] = {}
    for device, precision in settings:
        setting = f"{device} {precision}"
        batch = BACKBONE_CPU_BATCH if device == "cpu" else GPU_BATCHES[0]
        for condition in (CLEAN, DEGRADED):
            for name, model in models[device].items():
                with gpu_precision(model, precision) if device != "cpu" else contextlib.nullcontext():
                    label = f"{name}, {condition}, {setting}"
                    embeddings[name, condition, setting] = embed_all(
                        model, chips[condition][model.template], batch, label
                    )
            rows = {
                "+".join(combo): _unit(np.concatenate([embeddings[p, condition, setting] for p in combo], axis=1))
                for combo in combos
            }
            quality.setdefault(setting, {})[condition] = quality_table(rows, identities, everyone)
        t = lap(f"quality_{device}_{precision}", t)
    if args.gpu_only:
        for name in singles:
            for condition in (CLEAN, DEGRADED):
                agreements[f"{name}, {condition}: cuda bf16 vs fp32"] = agreement(
                    embeddings[name, condition, "cuda bf16"], embeddings[name, condition, "cuda fp32"]
                )
    timings["total"] = round(time.perf_counter() - started, 1)

    any_models = models[devices[0]]
    report = {
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "gpu_only": args.gpu_only,
        "commands": {
            "this_run": shlex.join(["python", "benchmarks/embed.py", *sys.argv[1:]]),
            "python": sys.executable,
            "cpu": "python benchmarks/embed.py --backbones" + (" --jpeg-at small" if args.jpeg_at == "small" else ""),
            "gpu": "python benchmarks/embed.py --backbones --gpu-only"
            + (" --jpeg-at small" if args.jpeg_at == "small" else ""),
        },
        "machine": {
            **machine(),
            "load_average_start": load_start,
            "load_average_end": [round(v, 2) for v in os.getloadavg()],
        },
        "cpu_threads": CPU_THREADS,
        "backbones": {
            name: {"version": m.version, "template": m.template, "input_size": m.input_size, "dim": m.dim}
            for name, m in any_models.items()
        },
        "combinations": ["+".join(combo) for combo in combos],
        "settings": {
            "alignment": "vcn.faces.align.align_face from faces.csv's 5 landmarks (no detector)",
            "combination": "each part's unit embedding on its own template's chips, concatenated, renormalised",
            "degraded": {
                "face_box_height_px": DEGRADED_FACE_PX,
                "jpeg_quality": DEGRADED_JPEG_QUALITY,
                "jpeg_at": args.jpeg_at,
                "how": JPEG_AT[args.jpeg_at],
            },
            "cpu_batch": BACKBONE_CPU_BATCH,
            "cpu_chips_per_run": BACKBONE_CPU_CHIPS,
            "gpu_batches": GPU_BATCHES,
            "gpu_chips_per_run": GPU_CHIPS,
            "runs": RUNS,
            "fars": FARS,
        },
        "images": {
            "subset": f"first {args.per_identity} per identity (by path)" if args.per_identity else "all DEV images",
            "images": len(faces),
            "identities": len(np.unique(identities)),
        },
        "throughput": speed,
        "quality": quality,
        "agreement": agreements,
        "reference": REFERENCE,
        "notes": backbone_notes(args, speed),
        "timings_s": timings,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "embed_backbones" + ("_jpeg_small" if args.jpeg_at == "small" else "") + ("_gpu" if args.gpu_only else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = backbones_markdown(report)
    (RESULTS / f"{stem}.md").write_text(markdown)
    print(markdown)
    print(f"wrote {RESULTS / f'{stem}.json'} and {stem}.md", file=sys.stderr)


def _tar(row: dict[str, Any], far: str) -> str:
    return f"{row['tar_at_far'][far]['tar']:.3f}" if row["tar_at_far"][far] else "n/a"


def backbones_markdown(report: dict[str, Any]) -> str:
    images = report["images"]
    lines = [
        "# Embedding benchmark: every backbone" + (" (GPU)" if report["gpu_only"] else ""),
        "",
        measured_on(report),
        "",
        f"Command: `{report['commands']['this_run']}`. Backbones (registry): "
        + "; ".join(
            f"{n} {b['version']} on {b['template']} {b['input_size']} px chips" for n, b in report["backbones"].items()
        )
        + ".",
        "",
        "## Identity quality, CelebA DEV crops, aligned from the dataset's landmarks",
        "",
        (
            f"Images: {images['subset']}, {images['images']} of {images['identities']} identities. All same-identity "
            f"and all different-identity pairs, cosine similarity. Degraded: {report['settings']['degraded']['how']}. "
            "Each cell: AUC / TAR@FAR=1e-3 / leave-one-out 1-NN accuracy."
        ),
        "",
    ]
    for setting, by_condition in report["quality"].items():
        lines += [f"**{setting}**", "", f"| backbone | {CLEAN} | {DEGRADED} |", "|---|---|---|"]
        for name in by_condition[CLEAN]["rows"]:
            cells = [by_condition[c]["rows"][name] for c in (CLEAN, DEGRADED)]
            lines.append(
                f"| {name} | "
                + " | ".join(f"{r['auc']:.4f} / {_tar(r, '0.001')} / {r['nn1_accuracy']:.3f}" for r in cells)
                + " |"
            )
        lines += [
            "",
            "| backbone | condition | AUC | TAR@FAR=1e-3 | TAR@FAR=1e-4 | 1-NN acc | same / diff pairs |",
            "|---|---|---|---|---|---|---|",
        ]
        for condition, table in by_condition.items():
            for name, r in table["rows"].items():
                lines.append(
                    f"| {name} | {condition} | {r['auc']:.4f} | {_tar(r, '0.001')} | {_tar(r, '0.0001')} | "
                    f"{r['nn1_accuracy']:.4f} | {r['same_pairs']} / {r['different_pairs']} |"
                )
        lines.append("")
    lines += [
        "Reference figures for comparison (measured earlier with ONNX Runtime) (same images and pairs; its degraded condition is `--jpeg-at crop`):",
        "",
        f"| backbone | {CLEAN} | {DEGRADED} |",
        "|---|---|---|",
    ]
    for name in report["reference"][CLEAN]:
        lines.append(
            f"| {name} | "
            + " | ".join(" / ".join(f"{v:g}" for v in report["reference"][c][name]) for c in (CLEAN, DEGRADED))
            + " |"
        )
    lines += [
        "",
        f"## Throughput (crops/s through the registry's embed, median of {RUNS} runs after a warm-up, real clean chips)",
        "",
        "| backbone | chip | device | precision | batch | workers | chips per run | crops/s | own cores | other work, cores |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["throughput"]:
        derived = "derived" in r
        lines.append(
            f"| {r['backbone']} | {r['chip']} | {r['device']} | {r['precision']} | {r['batch']} | {r['workers']} | "
            f"{'derived' if derived else r['chips']} | {r['crops_per_s']:.1f} | "
            f"{'' if derived else format(r['own_cores'], '.2f')} | {r['other_cores']:.2f} |"
        )
    lines.append("")
    if report.get("agreement"):
        lines.append(
            "Agreement of embeddings of the same chips (unit vectors): "
            + "; ".join(
                f"{k}: max abs diff {v['max_abs_diff']:.2g}, min cosine {v['min_cosine']:.6f}"
                for k, v in report["agreement"].items()
            )
            + "."
        )
        lines.append("")
    lines += ["## Notes", ""] + [f"- {note}" for note in report["notes"]] + [""]
    lines.append("Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings_s"].items()) + ".")
    return "\n".join(lines) + "\n"


def backbone_notes(args: argparse.Namespace, throughput: list[dict[str, Any]]) -> list[str]:
    """What a reader needs to interpret the backbone figures fairly."""
    out = [
        (
            "No detector runs here: every chip is aligned from faces.csv's landmarks (RetinaFace-MobileNet0.25 on the "
            "source images). Degraded chips are aligned from the same landmarks (scaled with the image where it stays "
            "small), so the figures measure the embedders' robustness to a small, compressed face, not a landmarker's "
            "on it; a real 24 px face would also be aligned less well."
        ),
        "Some CelebA identities mix several people (e.g. 7319, see identity_qa.csv); every row sees the same labels.",
        (
            "A combination runs its networks one after the other on its own chips, so its crops/s is derived from its "
            "parts' (1 / sum of 1 / rate) rather than timed; its other-work figure is the worst of its parts'."
        ),
    ]
    if args.jpeg_at == "small":
        out.append(
            "JPEG at the small size is harsher than the default condition (--jpeg-at crop, JPEG after upscaling back to "
            "256 px): a 24 px face spans three 8 px JPEG blocks, and quality 30 keeps little detail in each."
        )
    if not args.gpu_only:
        contended = [
            f"{r['backbone']} batch {r['batch']}"
            for r in throughput
            if r["device"] == "cpu" and "derived" not in r and r["other_cores"] >= CONTENDED_CORES
        ]
        out.append(contention_note(contended))
    if any(r["device"] == "cuda" for r in throughput):
        out.append(GPU_TIMING_NOTE)
    return out


# --- main -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-identity", type=int, default=0, help="first N images (by path) per identity; 0: all")
    parser.add_argument(
        "--gpu-only",
        action="store_true",
        help="skip the CPU and dlib measurements; write embed_gpu.* (embed_backbones_gpu.* with --backbones)",
    )
    parser.add_argument(
        "--backbones",
        nargs="?",
        const=",".join(BACKBONES),
        metavar="NAMES",
        help="instead of the dlib comparison, every backbone clean and degraded: comma-separated "
        "registry names, 'a+b' for a concatenated pair (default with the flag: %(const)s); "
        "write embed_backbones.*",
    )
    parser.add_argument(
        "--jpeg-at",
        choices=tuple(JPEG_AT),
        default="crop",
        help="--backbones: JPEG the degraded image at the crop's size (the default condition) or at its small size "
        "(harsher; writes embed_backbones_jpeg_small*)",
    )
    parser.add_argument("--data", type=Path, default=DATA, help="the CelebA DEV crops (default: %(default)s)")
    args = parser.parse_args()
    if not (args.data / "faces.csv").is_file():
        sys.exit(f"{args.data}/faces.csv not found: the shared CelebA DEV crops are needed")
    if args.per_identity == 1:
        sys.exit("--per-identity 1 leaves no same-identity pairs: use 0 (all) or at least 2")
    if args.backbones is not None:
        backbone_study(args)
        return

    import torch

    torch.set_num_threads(CPU_THREADS)
    cuda = torch.cuda.is_available()
    if args.gpu_only and not cuda:
        sys.exit("--gpu-only: torch sees no CUDA device")
    started = time.perf_counter()
    load_start = [round(v, 2) for v in os.getloadavg()]
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.perf_counter() - since, 1)
        return time.perf_counter()

    faces = read_faces(args.data, args.per_identity)
    identities = np.array([f.identity for f in faces])
    t = time.perf_counter()
    chips, found = our_chips(faces, args.data)
    t = lap("ours_detect_align", t)

    # Speed first: it is short and the machine is shared, so it should not wait behind the long dlib pass.
    timing_chips = chips[found]
    throughput: list[dict[str, Any]] = []
    embedder_cpu = embedder_gpu = None
    if not args.gpu_only:
        embedder_cpu, embedder_source = load_embedder("cpu")
        throughput += cpu_throughput(embedder_cpu, timing_chips)
        t = lap("throughput_cpu", t)
    if cuda:
        embedder_gpu, embedder_source_gpu = load_embedder("cuda")
        throughput += gpu_throughput(embedder_gpu, timing_chips)
        t = lap("throughput_cuda", t)
        if args.gpu_only:
            embedder_source = embedder_source_gpu

    rows: dict[str, np.ndarray] = {}
    quality: dict[str, Any] = {
        "subset": f"first {args.per_identity} per identity (by path)" if args.per_identity else "all DEV images",
        "images_total": len(faces),
        "identities_total": len(np.unique(identities)),
        "ours_found": int(found.sum()),
        "ours_failures": int((~found).sum()),
    }
    agreements: dict[str, Any] = {}
    if not args.gpu_only:
        rows["ours"] = embed(embedder_cpu, chips, CPU_BATCHES[-1])
        t = lap("ours_embed_cpu", t)
        sources, dlib_chips, on_dlib, on_ours = dlib_pipeline(faces, args.data, chips, found)
        t = lap("dlib_pipeline_2_processes", t)
        rows["dlib"] = on_dlib
        rows["our chips + dlib descriptor"] = on_ours
        rows["dlib chips + ported model"] = embed(embedder_cpu, dlib_chips, CPU_BATCHES[-1])
        t = lap("ported_model_on_dlib_chips", t)
        hog = np.array([s == "hog" for s in sources])
        # dlib's pipeline never fails outright: where HOG misses, the annotated box stands in.
        quality.update({"dlib_hog": int(hog.sum()), "dlib_box_fallback": int((~hog).sum()), "dlib_failures": 0})
        agreements = {
            "ported model vs dlib C++, dlib chips": agreement(rows["dlib chips + ported model"], on_dlib),
            "ported model vs dlib C++, our chips": agreement(rows["ours"][found], on_ours[found]),
        }
    if cuda:
        for precision in ("fp32", "bf16"):
            with gpu_precision(embedder_gpu, precision):
                rows[f"ours, cuda {precision}"] = embed(embedder_gpu, chips, GPU_BATCHES[0])
        agreements["cuda bf16 vs fp32, our chips"] = agreement(
            rows["ours, cuda bf16"][found], rows["ours, cuda fp32"][found]
        )
        t = lap("ours_embed_cuda", t)

    # Both pipelines handled an image when each produced a chip: ours where it found the face, dlib's always.
    quality["common"] = quality_table(rows, identities, found)
    if "dlib_hog" in quality:
        quality["hog_found"] = quality_table(rows, identities, found & hog)
    t = lap("metrics", t)
    timings["total"] = round(time.perf_counter() - started, 1)

    embedder = embedder_cpu if embedder_cpu is not None else embedder_gpu
    report = {
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "gpu_only": args.gpu_only,
        "commands": {
            "this_run": shlex.join(["python", "benchmarks/embed.py", *sys.argv[1:]]),
            "python": sys.executable,
            "cpu": "python benchmarks/embed.py",
            "gpu": "python benchmarks/embed.py --gpu-only",
        },
        "machine": {
            **machine(),
            "load_average_start": load_start,
            "load_average_end": [round(v, 2) for v in os.getloadavg()],
        },
        "cpu_threads": CPU_THREADS,
        "embedder": embedder_source,
        "embedder_version": getattr(embedder, "version", None),
        "embedder_dtype_default": {
            "cpu": getattr(embedder_cpu, "dtype", None),
            "cuda": getattr(embedder_gpu, "dtype", None),
        },
        "settings": {
            "chip": {"size": CHIP_SIZE, "dlib_padding": CHIP_PADDING, "our_template": "dlib-150"},
            "hog_upsample": HOG_UPSAMPLE,
            "our_detector": "create_detector('retinaface', max_side=None), score >= 0.8",
            "face_choice": "detection whose box centre lies in the annotated box, largest IoU with it",
            "runs": RUNS,
            "fars": FARS,
        },
        "throughput": throughput,
        "quality": quality,
        "agreement": agreements,
        "notes": notes(args, throughput),
        "timings_s": timings,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "embed_gpu" if args.gpu_only else "embed"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = to_markdown(report)
    (RESULTS / f"{stem}.md").write_text(markdown)
    print(markdown)
    print(f"wrote {RESULTS / f'{stem}.json'} and {stem}.md", file=sys.stderr)


def notes(args: argparse.Namespace, throughput: list[dict[str, Any]]) -> list[str]:
    """What a reader needs to interpret the numbers fairly."""
    out = [
        (
            "The dataset's crops and boxes were made with the same RetinaFace-MobileNet0.25 weights as our detector "
            "(on the source images, before cropping), so finding the face favours our pipeline."
        ),
        "Some CelebA identities mix several people (e.g. 7319, see identity_qa.csv); every row sees the same labels.",
    ]
    if not args.gpu_only:
        out.append(
            "dlib's pipeline is given the annotated box where HOG misses, so no image is lost to it; the second "
            "table drops those images. It ran in 2 worker processes (one per core) to fit the time, which does "
            "not change its results."
        )
        dlib_ = {r["workers"] + str(r["batch"]): r["crops_per_s"] for r in throughput if r["engine"] == "dlib C++"}
        contended = [
            f"{r['engine']} batch {r['batch']} ({r['workers']})"
            for r in throughput
            if r["device"] == "cpu" and r["other_cores"] >= CONTENDED_CORES
        ]
        out.append(contention_note(contended))
        out.append(
            "dlib's pip build has no BLAS and computes on one core (CPU time = wall time), hence the 2-process row; "
            f"a BLAS build of dlib would be faster. Best dlib figure here: {max(dlib_.values()):.1f} crops/s."
        )
    if any(r["device"] == "cuda" for r in throughput):
        out.append(GPU_TIMING_NOTE)
    return out


if __name__ == "__main__":
    main()
