"""CPU/GPU agreement of every heavy stage: detection, embedding, quality, logits, finetuning, clustering.

Runs each stage the way the product runs it on the CPU and on CUDA over the same
small real inputs, the sampled frames of ``tests/data/hamilton_clip.mp4`` and the
face crops of its tracks, and compares what comes out:

========== ======================================== ==================================================
stage      GPU path                                 figures (tolerance)
========== ======================================== ==================================================
detection  RetinaFace, ONNX Runtime's CUDA provider faces matched by IoU: min IoU (>= 0.95), max score
           or, without it, the graph run by torch   and landmark differences (<= 0.01, <= 1 px)
embedding  the backbone under bf16 autocast        min cosine to the CPU's float32 (>= 0.999)
quality    the same, SER-FIQ passes                 max abs difference (<= 0.03), Unknown tracks
                                                    (reported)
logits     one finetuned model on both devices      max abs difference (<= 0.005), loss-metric
                                                    matrix max relative difference (reported)
finetuning whole backbone and head, bf16 autocast   loss curve max relative difference (<= 0.05),
           (the trainer's CUDA path), same seed     min cosine of the finetuned embeddings (>= 0.99)
clustering loss-metric rounds' products in torch  equal partitions from each device's embeddings
                                                    and from each device's logits of one model
========== ======================================== ==================================================

The quality passes draw their dropout masks from each device's own random
generator, so CPU and CUDA qualities agree as two seeds do (on the 6,785 crops
of the development episode two draws differ by at most 0.0103), and a track at
the Unknown cut may fall either side: that verdict is reported, not gated.
bf16 training is another computation than float32 training, so the two
finetuned models are compared by their loss and embeddings; the partitions they
give are reported without a tolerance either.

Writes ``benchmarks/results/gpu_check.json`` and ``.md`` and exits with status 1
when a figure is beyond its tolerance. Without a CUDA GPU (or with
``--cpu-only``) it compares the CPU with itself and says so: that checks the
script and the run-to-run determinism, not a GPU, and compares the torch engine
of the detector on the CPU with ONNX Runtime.

Usage, from the repository root::

    python benchmarks/gpu_check.py              # CUDA against the CPU
    python benchmarks/gpu_check.py --cpu-only   # the CPU against itself
    python benchmarks/gpu_check.py --backbone dlib-resnet --name gpu_check_dlib   # another base model
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vcn.identity.backbone import DEFAULT_BACKBONE  # noqa: E402  (imports no torch)

RESULTS = ROOT / "benchmarks" / "results"
HAMILTON = ROOT / "tests" / "data" / "hamilton_clip.mp4"
#: Crops per track, evenly spaced over it: enough for the track statistics, few enough for a short CPU run.
CROPS_PER_TRACK = 6
#: The short finetuning run both devices do: one head-only and one joint epoch of two steps.
FINETUNE_PAIRS, FINETUNE_BATCH, FINETUNE_OUT_DIM = 32, 16, 4096
#: Detections scoring this close to the detector's threshold may be kept on one device and not the other.
SCORE_MARGIN = 0.02


@dataclass
class Figure:
    """One compared number: its value, its bound (None: reported only) and whether it holds."""

    stage: str
    name: str
    value: Any
    tolerance: str | None
    ok: bool | None

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "figure": self.name, "value": self.value, "tolerance": self.tolerance,
                "ok": self.ok}


def at_most(stage: str, name: str, value: float, bound: float) -> Figure:
    return Figure(stage, name, _rounded(value), f"<= {bound}", bool(value <= bound))


def at_least(stage: str, name: str, value: float, bound: float) -> Figure:
    return Figure(stage, name, _rounded(value), f">= {bound}", bool(value >= bound))


def _rounded(value: float) -> int | float:
    return value if isinstance(value, int) else round(float(value), 6)


def equal(stage: str, name: str, same: bool, gated: bool = True) -> Figure:
    return Figure(stage, name, "equal" if same else "different", "equal" if gated else None, same if gated else None)


class Timer:
    """Seconds per (stage, device)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, key: str, work: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        out = work()
        self.seconds[key] = round(self.seconds.get(key, 0.0) + time.perf_counter() - started, 2)
        return out


# --- inputs ---------------------------------------------------------------------------------


def sampled_frames(video: Path):
    """The reader, frames table and the sampled frames' RGB images, as the pipeline samples them."""
    from vcn.media import VideoReader, probe_video
    from vcn.media.frames import build_frame_index, sample_stride
    from vcn.media.shots import scan_shots

    info = probe_video(video)
    reader = VideoReader(video, info=info)
    scan = scan_shots(reader)
    shots = scan.shots
    stride = sample_stride(info.fps)
    frames = build_frame_index(scan.frame_times, shots, stride)
    wanted = set(frames.filter(frames["sampled"])["frame"].to_list())
    images = {f.index: f.image for f in reader.frames(want=wanted.__contains__) if f.image is not None}
    return reader, frames, images, info.fps / stride


def crops_of_tracks(detections, images: dict[int, np.ndarray], samples_per_s: float, template_name: str):
    """The movie's tracks as the clustering takes them, from the CPU's detections.

    Returns:
        Aligned chips of up to :data:`CROPS_PER_TRACK` detections per track, each
        chip's track index (0..T-1), T, and the (P, 2) track index pairs on screen
        together (the cannot-link constraints).
    """
    from vcn.clustering.cannot_link import on_screen_together
    from vcn.faces.align import align_face, get_template
    from vcn.faces.detection.video import LANDMARK_COLUMNS, appearance_matrix
    from vcn.faces.tracking import summarise_tracks, track_detections

    tracked = track_detections(detections, appearance_matrix(detections), samples_per_s)
    tracked = tracked.filter(tracked["track_id"].is_not_null())
    tracks = summarise_tracks(tracked)
    index = {track: i for i, track in enumerate(tracks["track_id"].to_list())}
    template = get_template(template_name)
    chips, crop_track = [], []
    for track, i in index.items():
        rows = tracked.filter(tracked["track_id"] == track)
        for row_index in np.unique(np.linspace(0, rows.height - 1, min(rows.height, CROPS_PER_TRACK)).astype(int)):
            row = rows.row(int(row_index), named=True)
            landmarks = np.array([row[c] for c in LANDMARK_COLUMNS], dtype=np.float32).reshape(5, 2)
            chips.append(align_face(images[row["frame"]], landmarks, template))
            crop_track.append(i)
    return np.stack(chips), np.asarray(crop_track, dtype=np.int64), len(index), on_screen_together(tracks)


# --- comparisons ----------------------------------------------------------------------------


def compare_detections(reference, other, threshold: float) -> list[Figure]:
    """Match each frame's faces by IoU (greedily, best score first) and compare the matched pairs."""
    import polars as pl

    from vcn.faces.detection.video import LANDMARK_COLUMNS

    sure = threshold + SCORE_MARGIN
    ious, score_diffs, landmark_diffs = [], [], []
    unmatched = 0
    for frame in sorted(set(reference["frame"].to_list()) | set(other["frame"].to_list())):
        a, b = (table.filter(pl.col("frame") == frame) for table in (reference, other))
        a_scores, b_scores = a["score"].to_numpy(), b["score"].to_numpy()
        a_points, b_points = a.select(LANDMARK_COLUMNS).to_numpy(), b.select(LANDMARK_COLUMNS).to_numpy()
        iou = box_iou(a.select("x1", "y1", "x2", "y2").to_numpy(), b.select("x1", "y1", "x2", "y2").to_numpy())
        matched: set[int] = set()
        for i in np.argsort(-a_scores):
            j = int(np.argmax(iou[i])) if len(b_scores) else -1
            if j < 0 or j in matched or iou[i, j] < 0.5:
                unmatched += int(a_scores[i] >= sure)
                continue
            matched.add(j)
            ious.append(iou[i, j])
            score_diffs.append(abs(a_scores[i] - b_scores[j]))
            landmark_diffs.append(np.abs(a_points[i] - b_points[j]).max())
        unmatched += sum(int(b_scores[j] >= sure) for j in range(len(b_scores)) if j not in matched)
    return [
        Figure("detection", "faces (cpu / other)", f"{reference.height} / {other.height}", None, None),
        at_most("detection", f"unmatched faces scoring >= threshold + {SCORE_MARGIN}", unmatched, 0),
        at_least("detection", "min IoU of matched faces", min(ious, default=1.0), 0.95),
        at_most("detection", "max score difference", max(score_diffs, default=0.0), 0.01),
        at_most("detection", "max landmark difference (px)", max(landmark_diffs, default=0.0), 1.0),
    ]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) intersection over union of ``x1, y1, x2, y2`` boxes."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    area_a, area_b = (np.prod(x[:, 2:] - x[:, :2], axis=1) for x in (a, b))
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest cosine between matching rows of two sets of unit-length embeddings."""
    return float((a.astype(np.float64) * b).sum(axis=1).min())


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two labelings group the items alike (label names aside; Unknown must match as such)."""
    from vcn.clustering.parameter_free import UNKNOWN

    def canonical(labels: np.ndarray) -> list[int]:
        names: dict[int, int] = {}
        return [UNKNOWN if x == UNKNOWN else names.setdefault(int(x), len(names)) for x in labels]

    return canonical(np.asarray(a)) == canonical(np.asarray(b))


def loss_matrix(logits: np.ndarray, metric) -> np.ndarray:
    """The symmetrised loss between every two crops (what the clustering averages)."""
    factors = metric.factors(logits)
    every = np.arange(len(logits))
    return factors.between(every, every)


# --- the check ------------------------------------------------------------------------------


def run(cpu_only: bool, backbone: str) -> dict[str, Any]:
    import onnxruntime
    import torch

    import vcn
    from vcn.clustering.parameter_free import UNKNOWN, cluster_movie
    from vcn.faces.detection import create_detector
    from vcn.faces.detection.video import detect_video_faces
    from vcn.identity.quality import embed_and_score, low_quality_tracks, track_quality
    from vcn.identity.selfsup.adapt import AdaptConfig, with_module
    from vcn.identity.selfsup.finetune import ComputeMode, finetune_movie
    from vcn.identity.selfsup.trainer import TrainConfig

    cuda = torch.cuda.is_available() and not cpu_only
    # The two sides: the CPU, and CUDA (or the CPU again); timings and figures name them so.
    other = "cuda" if cuda else "cpu again"
    timer = Timer()
    figures: list[Figure] = []

    # Inputs: the pipeline's sampled frames, then the CPU's detections, tracks and aligned crops.
    reader, frames, images, samples_per_s = timer("inputs", lambda: sampled_frames(HAMILTON))
    cpu_detector = create_detector("retinaface", providers=["CPUExecutionProvider"])
    reference = timer("detection cpu", lambda: detect_video_faces(reader, frames, cpu_detector))
    # The other side: ONNX Runtime's CUDA provider where this build has it, else the graph run by torch.
    if cuda and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        detector = create_detector("retinaface", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    elif cuda:
        detector = create_detector("retinaface", engine="torch", device="cuda")
    else:
        detector = create_detector("retinaface", providers=["CPUExecutionProvider"])
    detected = timer(f"detection {other}", lambda: detect_video_faces(reader, frames, detector))
    figures += compare_detections(reference, detected, cpu_detector.score_threshold)
    figures.append(Figure("detection", "runs on (other)", ", ".join(detector.active_providers), None, None))
    if not cuda:
        torch_detector = create_detector("retinaface", engine="torch", device="cpu")
        detected = timer("detection torch cpu", lambda: detect_video_faces(reader, frames, torch_detector))
        figures += [Figure(f.stage + " (torch engine)", f.name, f.value, f.tolerance, f.ok)
                    for f in compare_detections(reference, detected, cpu_detector.score_threshold)]

    backbones = {"cpu": vcn.load_backbone(backbone, device="cpu"),
                 other: vcn.load_backbone(backbone, device="cuda" if cuda else "cpu")}
    chips, crop_track, n_tracks, cannot_link = crops_of_tracks(
        reference, images, samples_per_s, backbones["cpu"].template
    )

    def cluster(outputs: np.ndarray, dissimilarity=None, device: str | None = None) -> np.ndarray:
        return cluster_movie(outputs, crop_track, n_tracks, cannot_link=cannot_link, dissimilarity=dissimilarity,
                             device=device).labels

    # Embedding and quality passes (one trunk pass gives both), each device at its own precision.
    embedded = {
        side: timer(f"embedding+quality {side}", lambda b=backbone: embed_and_score(b, chips))
        for side, backbone in backbones.items()
    }
    (cpu_embeddings, cpu_quality), (other_embeddings, other_quality) = embedded.values()
    figures.append(at_least(
        "embedding", f"min cosine, {other} {backbones[other].dtype} vs cpu float32",
        min_cosine(cpu_embeddings, other_embeddings), 0.999,
    ))
    figures.append(at_most("quality", "max abs difference", np.abs(cpu_quality - other_quality).max(), 0.03))
    unknown = [low_quality_tracks(track_quality(q, crop_track, n_tracks))[0] for q in (cpu_quality, other_quality)]
    figures.append(equal("quality", "low-quality (Unknown) tracks", bool((unknown[0] == unknown[1]).all()),
                         gated=False))
    cosine_labels = [cluster(e) for e in (cpu_embeddings, other_embeddings)]
    figures.append(equal("clustering", "partition, cosine on each side's embeddings", same_partition(*cosine_labels)))

    # A short finetuning run on each device, with the same seed and settings.
    def finetune(side: str):
        config = TrainConfig(
            seed=0, trainable="all", view_bank=0, epochs_head_only=1, epochs_joint=1, batch_size=FINETUNE_BATCH,
            pairs_per_epoch=FINETUNE_PAIRS, out_dim=FINETUNE_OUT_DIM, device=backbones[side].device,
        )
        mode = ComputeMode("gpu-check", AdaptConfig(max_rounds=1, train=config), "gpu_check's short run")
        return finetune_movie(backbones[side], chips, crop_track, n_tracks, mode=mode,
                              pretrained_embeddings=embedded[side][0])

    tuned = {side: timer(f"finetuning {side}", lambda s=side: finetune(s)) for side in backbones}
    curves = [np.asarray(t.history.rounds[0].loss_curve) for t in tuned.values()]
    figures.append(Figure("finetuning", "loss curves (cpu / other)",
                          " / ".join(", ".join(f"{v:.4f}" for v in c) for c in curves), None, None))
    figures.append(at_most("finetuning", "loss curve max relative difference",
                           np.abs(curves[0] - curves[1]).max() / np.abs(curves[0]).max(), 0.05))
    tuned_embeddings = [t.backbone.embed(chips) for t in tuned.values()]
    figures.append(at_least("finetuning", "min cosine of the finetuned embeddings", min_cosine(*tuned_embeddings),
                            0.99))
    own_labels = [cluster(t.logits(chips), t.loss_dissimilarity()) for t in tuned.values()]
    figures.append(equal("finetuning", "partition, loss metric of each side's own model",
                         same_partition(*own_labels), gated=False))

    # One model (the CPU's) on both devices: its logits, the loss metric and the clustering on it.
    model = tuned["cpu"]
    moved = copy.copy(model)
    module = copy.deepcopy(model.backbone.module).to(backbones[other].device)
    moved.backbone = with_module(backbones[other], module, model.version)
    moved.head = copy.deepcopy(model.head)
    logits = [timer(f"logits {side}", lambda m=m: m.logits(chips)) for side, m in (("cpu", model), (other, moved))]
    figures.append(at_most("logits", "max abs difference", np.abs(logits[0] - logits[1]).max(), 0.005))
    metric = model.loss_dissimilarity()
    matrices = [loss_matrix(lg, metric) for lg in logits]
    relative = np.abs(matrices[0] - matrices[1]).max() / np.abs(matrices[0]).max()
    figures.append(Figure("logits", "loss-metric matrix max relative difference", round(float(relative), 6), None,
                          None))
    # The CPU clusters in numpy, the other side with the merge rounds' products on its torch device.
    loss_labels = [cluster(logits[0], metric), cluster(logits[1], metric, "cuda" if cuda else "cpu")]
    figures.append(equal("clustering", "partition, loss metric of one model on each side (products on its device)",
                         same_partition(*loss_labels)))

    return {
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/gpu_check.py" + (" --cpu-only" if cpu_only else ""),
        "comparison": "cuda vs cpu" if cuda else "cpu vs cpu (no CUDA GPU used: a check of the script, not of a GPU)",
        "machine": machine(torch),
        "inputs": {
            "video": str(HAMILTON.relative_to(ROOT)),
            "sampled_frames": len(images),
            "detections": reference.height,
            "tracks": n_tracks,
            "tracks_on_screen_together": len(cannot_link),
            "crops": len(chips),
            "clusters_cosine_cpu": len(set(cosine_labels[0].tolist()) - {UNKNOWN}),
        },
        "figures": [f.as_dict() for f in figures],
        "seconds": timer.seconds,
        "ok": all(f.ok is not False for f in figures),
    }


def machine(torch) -> dict[str, Any]:
    import onnxruntime

    facts = {
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
    }
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["cuda"] = torch.version.cuda
    return facts


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    gpu = f", GPU {m['gpu']} (CUDA {m['cuda']})" if "gpu" in m else ", no GPU"
    i = report["inputs"]
    lines = [
        "# CPU/GPU agreement check",
        "",
        f"Base model `{report.get('backbone', 'dlib-resnet')}`. "
        f"Measured {report['measured_at']}: **{report['comparison']}**. {m['cpu_count']} cores ({m['cpu']}){gpu}, "
        f"Python {m['python']}, torch {m['torch']}, onnxruntime {m['onnxruntime']} "
        f"(providers: {', '.join(m['onnxruntime_providers'])}).",
        "",
        f"Command: `{report['command']}`. Inputs: "
        f"{i['sampled_frames']} sampled frames of `{i['video']}`, {i['detections']} faces, {i['tracks']} tracks "
        f"({i['tracks_on_screen_together']} pairs on screen together: cannot-link), {i['crops']} aligned crops "
        f"(up to {CROPS_PER_TRACK} per track), {i['clusters_cosine_cpu']} clusters (cosine, CPU); short finetuning: "
        f"1 head-only and 1 joint epoch of {FINETUNE_PAIRS} pairs in batches of {FINETUNE_BATCH}, "
        f"K = {FINETUNE_OUT_DIM}, whole backbone.",
        "",
        f"**Verdict: {'all figures within tolerance' if report['ok'] else 'DISAGREEMENT beyond tolerance'}.**",
        "",
        "| stage | figure | value | tolerance | ok |",
        "|---|---|---|---|---|",
    ]
    for f in report["figures"]:
        verdict = {True: "yes", False: "**NO**", None: "reported"}[f["ok"]]
        lines.append(f"| {f['stage']} | {f['figure']} | {f['value']} | {f['tolerance'] or ''} | {verdict} |")
    lines += [
        "",
        "Seconds: " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()) + ".",
        "",
        "Notes:",
        "",
        "- Each device runs at the precision the product picks for it: float32 on the CPU, bf16 autocast for the "
        "torch models on CUDA (the logits pass runs in float32 on both).",
        "- The quality passes draw their dropout masks from each device's own generator: the qualities agree as "
        "two seeds do, and the Unknown verdict, which a track at the cut may flip, is reported, not gated.",
        "- The two finetuned models come from different arithmetic (bf16 on CUDA), so their partitions are "
        "reported, not gated; their loss curves and embeddings are.",
        "- The clustering itself runs in numpy on the CPU on both sides; what differs is its input.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-only", action="store_true", help="compare the CPU with itself even where CUDA is")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, help="base model checked (default: a new install's)")
    parser.add_argument("--name", default="gpu_check", help="stem of the results files in benchmarks/results/")
    args = parser.parse_args()
    started = time.perf_counter()
    report = run(args.cpu_only, args.backbone)
    report["backbone"] = args.backbone
    report["seconds"]["total"] = round(time.perf_counter() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
