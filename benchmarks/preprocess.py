"""Preprocessing speed and memory: frames/s per stage, realtime factor, peak RSS.

Runs the preprocessing as the platform does with its default settings (one
pass over the video for the shots, the frame index, the detections and their
aligned chips; then the tracks, and the crops from the chips) on each input,
each input in a fresh child process so that its peak resident memory is its
own, and writes ``benchmarks/results/preprocess.json`` and ``.md``.

Inputs: the Hamilton clip (640x360, 10 s) and 720p24 movies of 5 and 20
minutes built from real footage by ``benchmarks/make_movie.py`` (built on first
use under ``benchmarks/work/``, which git ignores).

Usage::

    python benchmarks/preprocess.py                 # hamilton, 5 and 20 minutes
    python benchmarks/preprocess.py --inputs hamilton 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
WORK = HERE / "work"
RESULTS = HERE / "results"
HAMILTON = REPO / "tests" / "data" / "hamilton_clip.mp4"


def run_one(video: Path) -> dict:
    """Runs the preprocessing on ``video`` in this process, as ``vcn process`` does, and returns the measurements.

    One pass over the video finds the shots, indexes the frames and detects the faces, cutting each
    detection's aligned chip (:class:`vcn.media.scan.MovieScan`); the tracks are linked and the crops
    taken from those chips. The pass's time is split as the platform splits it: detecting and cutting the
    chips is ``face_detections``, the rest (decoding, shot detection, frame index) ``shots``.
    """
    from resources import DetectorResource
    from vcn.faces.crops import ChipWriter, CropConfig, detections_key, track_crops_from_chips
    from vcn.faces.detection.video import appearance_matrix, detect_faces
    from vcn.faces.tracking import summarise_tracks, track_detections
    from vcn.identity.backbone import DEFAULT_BACKBONE, TEMPLATES
    from vcn.media import VideoReader, probe_video
    from vcn.media.frames import sample_stride
    from vcn.media.parallel import default_workers
    from vcn.media.scan import MovieScan
    from vcn.media.shots import ShotConfig

    peak = _PeakSampler()
    stages = {}
    info = probe_video(video)
    out = Path(tempfile.mkdtemp(prefix="vcn-bench-"))
    settings = DetectorResource()
    template = TEMPLATES[DEFAULT_BACKBONE]

    def record(name: str, seconds: float, frames: int) -> None:
        stages[name] = {"seconds": round(seconds, 3), "frames": frames, "frames_per_s": round(frames / max(seconds, 1e-9), 1)}

    detector = settings.create()
    reader = VideoReader(video, info=info, max_side=settings.max_side, keep_full=True, workers=default_workers())
    scan = MovieScan(reader, ShotConfig(), sample_stride(info.fps))
    t = time.perf_counter()
    with ChipWriter(out / "detection_chips.parquet", template) as chips:
        sampled = ((frame, shot, frame.time_s) for frame, shot in scan.sampled_frames())
        detections = detect_faces(sampled, reader, detector, batch_size=settings.batch_size, chips=chips)
        chips.detections = detections_key(detections)
    passing = time.perf_counter() - t
    frames = scan.frames
    n_sampled = int(frames["sampled"].sum())
    record("shots", scan.seconds, frames.height)
    record("face_detections", passing - scan.seconds, n_sampled)
    samples_per_s = n_sampled / max(float(frames["time_s"].max()), 1e-6)
    t = time.perf_counter()
    tracked = track_detections(detections, appearance_matrix(detections), samples_per_s).drop("appearance")
    tracks = summarise_tracks(tracked)
    record("face_tracks", time.perf_counter() - t, n_sampled)
    t = time.perf_counter()
    crops = track_crops_from_chips(
        out / "detection_chips.parquet", tracked, out / "track_crops.parquet", CropConfig(template=template)
    )
    record("track_crops", time.perf_counter() - t, crops.height)
    total = sum(s["seconds"] for s in stages.values())
    duration = float(frames["time_s"].max()) + 1.0 / info.fps
    peak.stop()
    return {
        "video": video.name,
        "resolution": f"{info.width}x{info.height}",
        "fps": round(info.fps, 3),
        "frames": frames.height,
        "decoded_frames": scan.frames_decoded,
        "duration_s": round(duration, 2),
        "shots": scan.shot_scan.shots.height,
        "detections": detections.height,
        "tracks": tracks.height,
        "crops": crops.height,
        "kept_crops": int((~crops["rejected"]).sum()) if crops.height else 0,
        "template": template,
        "decode_workers": reader.workers,
        "stages": stages,
        "total_s": round(total, 2),
        "realtime_factor": round(duration / total, 3),
        "peak_rss_mb": round(max(peak.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20, 1),
    }


class _PeakSampler:
    """Samples this process's RSS every 50 ms (ru_maxrss misses nothing but is per-process-lifetime)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _input(name: str) -> Path:
    if name == "hamilton":
        return HAMILTON
    minutes = float(name)
    path = WORK / f"movie_{name}min.mp4"
    if not path.exists():
        from benchmarks.make_movie import build_movie

        WORK.mkdir(parents=True, exist_ok=True)
        build_movie(path, minutes)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", nargs="+", default=["hamilton", "5", "20"], help="'hamilton' or movie lengths in minutes")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(Path(args.one))))
        return

    runs = []
    for name in args.inputs:
        video = _input(name)
        print(f"== {name}: {video}", flush=True)
        child = subprocess.run(
            [sys.executable, __file__, "--one", str(video)], capture_output=True, text=True, cwd=REPO, env=os.environ
        )
        if child.returncode != 0:
            sys.exit(f"benchmark of {video} failed:\n{child.stderr[-4000:]}")
        result = json.loads(child.stdout.strip().splitlines()[-1])
        result["input"] = name
        runs.append(result)
        print(json.dumps(result, indent=2), flush=True)

    machine = {
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    report = {"measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine, "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "preprocess.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "preprocess.md").write_text(_markdown(report))
    print(_markdown(report))


def _markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Preprocessing benchmark",
        "",
        f"Measured {report['measured_at']} on {m['cpu_count']} cores, {m['memory_gb']} GiB, Python {m['python']} "
        f"(load average at the end: {m['load_avg_at_end']}). Default settings: one pass over the video (decoded frames "
        "per frame in the table), detection at 8 samples/s, 640 px longer side, RetinaFace-MobileNet (ONNX Runtime, "
        f"CPU); crops every 0.25 s from the pass's chips, {report['runs'][0].get('template', 'dlib-150')} template. "
        "The pass's seconds are split as the platform splits them: detecting and cutting the chips are "
        "`face_detections`, the rest (decoding, shot detection, frame index) `shots`.",
        "",
        "| input | resolution | duration | decoded frames per frame | shots | faces | tracks | crops (kept) | total s | "
        "realtime factor | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['video']} | {r['resolution']}@{r['fps']} | {r['duration_s']} s | "
            f"{round(r['decoded_frames'] / r['frames'], 2) if r.get('decoded_frames') else '-'} | {r['shots']} | {r['detections']} | {r['tracks']} | "
            f"{r['crops']} ({r['kept_crops']}) | {r['total_s']} | {r['realtime_factor']}x | {r['peak_rss_mb']} |"
        )
    lines += ["", "Per stage (seconds, frames/s of the frames that stage handles):", "",
              "| input | " + " | ".join(report["runs"][0]["stages"]) + " |",
              "|---|" + "---|" * len(report["runs"][0]["stages"])]
    for r in report["runs"]:
        lines.append(f"| {r['video']} | " + " | ".join(f"{s['seconds']} s, {s['frames_per_s']} f/s" for s in r["stages"].values()) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
