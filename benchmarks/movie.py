"""End to end on long movies: per-stage time, realtime factor, peak RSS (overall and per stage) and peak GPU memory.

Each movie runs through the product's own path, ``vcn process`` (every asset,
finetuning included, on a fresh Dagster instance and warehouse), in a child
process of its own so that its peak memory is its own. Its RSS is sampled every
0.2 s and each sample is put down to the Dagster step running at that moment
(from the run's step start and end events), which gives each stage's peak; what
runs outside the asset steps (asset checks, start-up, the summary) is "other".
A stage's peak includes what earlier stages left allocated. The movies are built
from real footage by ``benchmarks/make_movie.py``: an edit of ``--base-minutes``
(at most 20 by default) is encoded once and, for longer movies, repeated by
stream copy up to the asked length, which takes seconds instead of an encode
of hours of video. A repeated edit has the same faces again, so it is a fair
test of speed and memory, not of clustering quality.

Results go to ``benchmarks/results/movie_<cpu|gpu>.json`` and ``.md`` (one
file per kind of machine, so a GPU run does not replace the CPU figures).

Usage::

    python benchmarks/movie.py --minutes 5 20                 # 720p24, this machine
    python benchmarks/movie.py --minutes 120 --height 1080    # a feature film (benchmarks/gpu.sh)
    python benchmarks/movie.py --minutes 5 --backbone sface   # another base model, registered first
                                                              # (results: movie_cpu_sface.*)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from vcn_assets.assets.preprocess import SCAN_OP  # noqa: E402
WORK = HERE / "work"
RESULTS = HERE / "results"
STAGES = ("shots", "frames", "face_detections", "face_tracks", "track_crops", "finetuned_model", "track_embeddings", "face_clusters")
#: The Dagster steps whose peak RSS is reported: one pass makes the first three stages in one step (SCAN_OP);
#: runs of releases before it had a step for each.
PEAK_STEPS = (*STAGES[:3], SCAN_OP, *STAGES[3:])


def movie_path(minutes: float, height: int, base_minutes: float) -> Path:
    """The test movie of that length and height, built (or looped from a shorter edit) on first use."""
    path = WORK / _movie_name(minutes, height)
    if path.exists():
        return path
    from benchmarks.make_movie import build_movie

    WORK.mkdir(parents=True, exist_ok=True)
    base_len = min(minutes, base_minutes)
    base = WORK / _movie_name(base_len, height)
    if not base.exists():
        print(f"building {base.name} ({base_len:g} min of edited real footage)", flush=True)
        build_movie(base, base_len, height=height)
    if base_len == minutes:
        return base
    print(f"looping {base.name} to {minutes:g} min by stream copy", flush=True)
    loop_movie(base, path, minutes * 60)
    return path


def _movie_name(minutes: float, height: int) -> str:
    """The file name; 720p movies share their name (and file) with benchmarks/preprocess.py's."""
    return f"movie_{minutes:g}min.mp4" if height == 720 else f"movie_{minutes:g}min_{height}p.mp4"


def loop_movie(source: Path, out: Path, seconds: float) -> Path:
    """Repeats ``source`` back to back, copying its packets (no re-encode), until ``seconds`` of video."""
    import av

    partial = out.with_suffix(".partial.mp4")
    with av.open(str(source)) as src, av.open(str(partial), "w") as dst:
        stream = src.streams.video[0]
        out_stream = dst.add_stream_from_template(stream)
        tb = stream.time_base
        packets = [p for p in src.demux(stream) if p.dts is not None]
        step = max(p.pts + (p.duration or 0) for p in packets)  # one loop's length in stream ticks
        loops = int(-(-seconds // float(step * tb)))
        limit = round(Fraction(seconds) / tb)
        for k in range(loops):
            for p in packets:
                pts, dts = p.pts + k * step, p.dts + k * step
                if pts >= limit:
                    continue
                copy = av.Packet(bytes(p))
                copy.pts, copy.dts, copy.duration = pts, dts, p.duration
                copy.is_keyframe = p.is_keyframe
                copy.stream = out_stream
                copy.time_base = tb
                dst.mux(copy)
    partial.replace(out)
    return out


def run_one(video: Path, backbone: str | None = None) -> dict:
    """``vcn process`` of ``video`` in this process, on a fresh data folder; the measurements.

    ``backbone`` is registered first (``vcn model register --name``), as a user picks a base model;
    None keeps a new install's default.
    """
    home = Path(tempfile.mkdtemp(prefix="vcn-movie-bench-"))
    os.environ["VCN_HOME"] = str(home)
    os.environ.pop("DAGSTER_HOME", None)
    from vcn.media import probe_video
    from vcn.stores.warehouse import Warehouse
    from vcn_assets.cli import main

    info = probe_video(video)
    if backbone is not None and main(["model", "register", "--name", backbone]) != 0:
        raise SystemExit(f"vcn model register --name {backbone} failed")
    sampler = _PeakSampler()
    started = time.perf_counter()
    code = main(["process", str(video), "--movie-id", "bench"])
    wall = time.perf_counter() - started
    sampler.stop()
    if code != 0:
        raise SystemExit(f"vcn process failed with exit code {code}")
    stage_peaks = _stage_peaks(sampler.samples, _step_intervals())
    wh = Warehouse(str(home / "warehouse.duckdb"))
    metrics = wh.query(
        "SELECT asset, seconds, details, frames_decoded FROM stage_metrics WHERE movie_id = 'bench' ORDER BY recorded_at"
    )
    stages = {a: round(s, 1) for a, s, _, _ in metrics.iter_rows()}
    decoded = {a: int(n or 0) for a, _, _, n in metrics.iter_rows()}
    finetune = next((json.loads(d) if isinstance(d, str) else d for a, _, d, _ in metrics.iter_rows() if a == "finetuned_model"), {})
    movie_frames = wh.query("SELECT count(*) FROM frames WHERE movie_id = 'bench'").item()
    counts = wh.query(
        "SELECT (SELECT count(*) FROM tracks WHERE movie_id = 'bench') AS tracks, "
        "(SELECT count(*) FROM track_crops WHERE movie_id = 'bench' AND NOT rejected) AS kept_crops, "
        "(SELECT count(DISTINCT cluster) FROM face_clusters WHERE movie_id = 'bench') AS clusters"
    ).row(0, named=True)
    gpu_peak = _torch_gpu_peak_mb()
    shutil.rmtree(home, ignore_errors=True)
    return {
        "video": video.name,
        "backbone": backbone,
        "resolution": f"{info.width}x{info.height}",
        "fps": round(info.fps, 3),
        "duration_s": round(info.duration_s, 1),
        **counts,
        "finetune_mode": finetune.get("mode"),
        "finetune_crops": finetune.get("finetune_crops"),
        "stages_s": stages,
        "frames_decoded": decoded,
        "decoded_per_frame": round(sum(decoded.values()) / movie_frames, 3) if movie_frames else None,
        "wall_s": round(wall, 1),
        "realtime_factor": round(info.duration_s / wall, 3),
        "peak_rss_mb": round(sampler.peak_rss / 2**20, 1),
        "stage_peak_rss_mb": stage_peaks,
        "peak_gpu_mb": max(gpu_peak, sampler.peak_gpu_mb) if (gpu_peak or sampler.peak_gpu_mb) else None,
    }


def _step_intervals() -> list[tuple[str, float, float]]:
    """(step key, start, end) in Unix seconds of every step of every run of the (fresh) Dagster instance."""
    import dagster as dg

    ends = {dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE}
    intervals = []
    with dg.DagsterInstance.get() as instance:
        for run in instance.get_runs():
            started: dict[str, float] = {}
            for entry in instance.all_logs(run.run_id, of_type={dg.DagsterEventType.STEP_START, *ends}):
                if entry.dagster_event.event_type == dg.DagsterEventType.STEP_START:
                    started[entry.step_key] = entry.timestamp
                elif entry.step_key in started:
                    intervals.append((entry.step_key, started.pop(entry.step_key), entry.timestamp))
    return intervals


def _stage_peaks(samples: list[tuple[float, int]], intervals: list[tuple[str, float, float]]) -> dict[str, float]:
    """Peak RSS in MB of each step (``PEAK_STEPS``), and of everything else as ``other``, from timed RSS samples."""
    peaks: dict[str, float] = {}
    for at, rss in samples:
        step = next((key for key, start, end in intervals if start <= at <= end), None)
        name = step if step in PEAK_STEPS else "other"
        peaks[name] = max(peaks.get(name, 0.0), round(rss / 2**20, 1))
    return {name: peaks[name] for name in (*PEAK_STEPS, "other") if name in peaks}


def _torch_gpu_peak_mb() -> float:
    try:
        import torch
    except ImportError:
        return 0.0
    return round(torch.cuda.max_memory_reserved() / 2**20, 1) if torch.cuda.is_available() else 0.0


class _PeakSampler:
    """Samples this process's RSS (and its GPU memory through nvidia-smi, when there is one) every 0.2 s.

    Attributes:
        samples: (Unix time, RSS bytes) of every sample, for the per-stage peaks.
    """

    def __init__(self) -> None:
        self.peak_rss = 0
        self.samples: list[tuple[float, int]] = []
        self.peak_gpu_mb = 0.0
        self._proc = psutil.Process()
        self._smi = shutil.which("nvidia-smi")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last_smi = 0.0
        while not self._stop.is_set():
            rss = self._proc.memory_info().rss
            self.samples.append((time.time(), rss))
            self.peak_rss = max(self.peak_rss, rss)
            if self._smi and time.monotonic() - last_smi > 1.0:
                last_smi = time.monotonic()
                self.peak_gpu_mb = max(self.peak_gpu_mb, self._gpu_mb())
            time.sleep(0.2)

    def _gpu_mb(self) -> float:
        out = subprocess.run(
            [self._smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10,
        ).stdout
        used = [float(m) for pid, m in (line.split(",") for line in out.strip().splitlines() if "," in line)
                if int(pid) == os.getpid()]
        return sum(used)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", nargs="+", type=float, default=[5, 20], help="movie lengths in minutes")
    parser.add_argument("--height", type=int, default=720, help="frame height (16:9, 24 fps)")
    parser.add_argument("--base-minutes", type=float, default=20, help="longest edit encoded; longer movies loop it")
    parser.add_argument("--backbone", help="base model registered before processing (default: a new install's)")
    parser.add_argument("--note", help="a remark on this invocation's runs, printed with them (e.g. what ran beside them)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(Path(args.one), args.backbone)))
        return

    import torch

    kind = "gpu" if torch.cuda.is_available() else "cpu"
    runs = []
    for minutes in args.minutes:
        video = movie_path(minutes, args.height, args.base_minutes)
        print(f"== {video.name}", flush=True)
        command = [sys.executable, __file__, "--one", str(video), *(["--backbone", args.backbone] if args.backbone else [])]
        child = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        if child.returncode != 0:
            sys.exit(f"benchmark of {video} failed:\n{child.stdout[-2000:]}\n{child.stderr[-4000:]}")
        result = json.loads(child.stdout.strip().splitlines()[-1])
        if args.note:
            result["note"] = args.note
        runs.append(result)
        print(json.dumps(result, indent=2), flush=True)

    machine = {
        "kind": kind,
        "gpu": torch.cuda.get_device_name(0) if kind == "gpu" else None,
        "cpu_count": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
    }
    from vcn.identity.backbone import DEFAULT_BACKBONE

    report = {
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "backbone": args.backbone or DEFAULT_BACKBONE,
        "runs": runs,
    }
    stem = f"movie_{kind}" + (f"_{args.backbone}" if args.backbone else "")
    RESULTS.mkdir(exist_ok=True)
    report["runs"] = _merged_runs(RESULTS / f"{stem}.json", report)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(_markdown(report))
    print(_markdown(report))


def _merged_runs(path: Path, report: dict) -> list[dict]:
    """This invocation's runs, plus the earlier runs of other movies in ``path`` made on the same machine with the
    same base model (each keeps its own ``measured_at``), shortest movie first."""
    runs = {r["video"]: r | {"measured_at": report["measured_at"]} for r in report["runs"]}
    if path.exists():
        earlier = json.loads(path.read_text())
        if _same_machine(earlier.get("machine"), report["machine"]) and earlier.get("backbone") == report["backbone"]:
            for r in earlier["runs"]:
                runs.setdefault(r["video"], r | {"measured_at": r.get("measured_at", earlier["measured_at"])})
    return sorted(runs.values(), key=lambda r: r["duration_s"])


def _same_machine(a: dict | None, b: dict) -> bool:
    """The same kind of machine: all alike but the memory the system reports, which moves by a few MiB between boots."""
    if not a:
        return False
    alike = {k: v for k, v in a.items() if k != "memory_gb"} == {k: v for k, v in b.items() if k != "memory_gb"}
    return alike and abs(a.get("memory_gb", 0) - b.get("memory_gb", 0)) <= 0.5


def _markdown(report: dict) -> str:
    m = report["machine"]
    where = m["gpu"] or "no GPU"
    lines = [
        f"# End-to-end movie benchmark ({m['kind'].upper()})",
        "",
        f"Measured {', '.join(sorted({r.get('measured_at', report['measured_at']) for r in report['runs']}))} on {where}, {m['cpu_count']} cores, {m['memory_gb']} GiB, Python {m['python']}: "
        f"`vcn process` with default settings (the finetuning step included) on a fresh instance and warehouse; "
        f"base model `{report.get('backbone', 'dlib-resnet')}`"
        + (" (not finetuned where it ran: finetune mode None)." if all(r.get("finetune_mode") is None for r in report["runs"])
           else "."),
        "",
        "| movie | resolution | duration s | tracks | kept crops | clusters | finetune mode | finetune crops | wall s | "
        "realtime factor | peak RSS MB | peak GPU MB | decoded frames per frame |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['video']} | {r['resolution']}@{r['fps']} | {r['duration_s']} | {r['tracks']} | {r['kept_crops']} | "
            f"{r['clusters']} | {r['finetune_mode']} | {r.get('finetune_crops') or '-'} | {r['wall_s']} | {r['realtime_factor']}x | {r['peak_rss_mb']} | "
            f"{r['peak_gpu_mb'] if r['peak_gpu_mb'] is not None else '-'} | {r.get('decoded_per_frame') or '-'} |"
        )
    lines += [
        "",
        "Decoded frames per frame: the frames all stages together decoded from the video (`stage_metrics.frames_decoded`) "
        "over the movie's frames; '-' where the stages did not record it yet.",
    ]
    noted = [r for r in report["runs"] if r.get("note")]
    if noted:
        lines += ["", "Notes:", "", *(f"- {r['video']} ({r['measured_at']}): {r['note']}" for r in noted)]
    lines += ["", "Seconds per stage:", "", "| movie | " + " | ".join(STAGES) + " |", "|---|" + "---|" * len(STAGES)]
    for r in report["runs"]:
        lines.append(f"| {r['video']} | " + " | ".join(str(r["stages_s"].get(s, "-")) for s in STAGES) + " |")
    columns = (*PEAK_STEPS, "other")
    lines += [
        "", f"Peak RSS MB per step (a step's peak includes what earlier steps left allocated; {SCAN_OP}: the one pass "
        "for shots, frames and face_detections, which earlier releases ran as three steps; other: asset checks, "
        "start-up, summary):", "", "| movie | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns),
    ]
    for r in report["runs"]:
        peaks = r.get("stage_peak_rss_mb", {})
        lines.append(f"| {r['video']} | " + " | ".join(str(peaks.get(s, "-")) for s in columns) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
