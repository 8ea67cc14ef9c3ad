"""Clustering quality on a labelled track dataset: our clustering against what users pick instead.

Every method clusters the same tracks from the same pretrained embeddings
(RetinaFace on each loose crop, dlib-150 alignment, the dlib ResNet ported to
torch). Our clustering works on the crops (the pipeline of ``vcn.pipeline``, as
``vcn cluster-tracks`` and a movie run it); the baselines (``benchmarks/baselines.py``) take
each track's unit-length mean embedding, with their customary defaults. Labels are
read only to score (``vcn.clustering.metrics``): Unknown tracks count as singletons in WCP,
NMI, BCubed and pairwise figures, and not as clusters in PCR.

Rows: ours on the pretrained model with cosine (quality screen + cannot-link;
without cannot-link, the paper's setting; without the quality screen), ours
after adapting the backbone to the episode (``vcn.pipeline.adapt``, the compute
mode of the machine) with cosine and with the finetuned loss metric (the paper's
ablation), then the baselines on the pretrained track means and again on the
finetuned ones; the last baseline of each set uses the true number of identities.

Outputs ``benchmarks/results/cluster_quality.json`` and ``.md`` (``--name`` changes the
stem) and prints the table.

Usage, from the repository root::

    python benchmarks/cluster_quality.py                      # ../shared/data/tracksets/dev-ep
    python benchmarks/cluster_quality.py --trackset DIR
    # a validation episode from benchmarks/make_trackset.py, pretrained rows only:
    python benchmarks/cluster_quality.py --trackset benchmarks/work/val/buffy_s05e04 --no-finetune \
        --scale-tracks 0 --name cluster_quality_val_buffy_s05e04

About 15 minutes on 2 CPU cores for dev-ep (600 tracks, 6,785 crops), most of it
finetuning, embedding and quality passes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.baselines import BASELINES  # noqa: E402
from vcn.cluster_tracks import align_trackset  # noqa: E402
from vcn.clustering.cannot_link import on_screen_together  # noqa: E402
from vcn.clustering.metrics import evaluate  # noqa: E402
from vcn.clustering.parameter_free import UNKNOWN, cluster_movie  # noqa: E402
from vcn.formats.trackset import read_trackset_labels  # noqa: E402
from vcn.identity.backbone import DEFAULT_BACKBONE, load_backbone  # noqa: E402
from vcn.identity.embeddings import unit_track_means  # noqa: E402
from vcn.pipeline import adapt, cluster, embed  # noqa: E402

DEFAULT_TRACKSET = ROOT.parent / "shared" / "data" / "tracksets" / "dev-ep"
RESULTS = ROOT / "benchmarks" / "results"


def scale_check(n_tracks: int = 5000, people: int = 60, seed: int = 0) -> dict:
    """Seconds to cluster a synthetic movie of ``n_tracks`` tracks (3-29 crops each, 128-d).

    People are random unit directions; tracks scatter around their person and
    crops around their track, so that the procedure runs many rounds (as on a
    real movie, where the main character's tracks join a few per round).
    Every other track is on screen with the next one (cannot-link).
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(people, 128))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    person = rng.integers(0, people, n_tracks)
    crop_track = np.repeat(np.arange(n_tracks), rng.integers(3, 30, n_tracks))
    tracks = centres[person] + rng.normal(scale=0.015, size=(n_tracks, 128))
    x = (tracks[crop_track] + rng.normal(scale=0.02, size=(len(crop_track), 128))).astype(np.float32)
    pairs = np.stack([np.arange(0, n_tracks - 1, 2), np.arange(1, n_tracks, 2)], axis=1)
    started = time.perf_counter()
    result = cluster_movie(x, crop_track, n_tracks, cannot_link=pairs)
    seconds = time.perf_counter() - started
    return {"n_tracks": n_tracks, "n_crops": int(len(x)), "people": people, "seconds": round(seconds, 2),
            "clusters": result.n_clusters, "rounds": result.clustering.rounds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trackset", type=Path, default=DEFAULT_TRACKSET)
    parser.add_argument("--scale-tracks", type=int, default=5000, help="tracks of the synthetic speed check (0: skip)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the finetuning")
    parser.add_argument("--no-finetune", action="store_true", help="pretrained rows and baselines only (minutes, not a quarter hour)")
    parser.add_argument("--name", default="cluster_quality", help="stem of the results files in benchmarks/results/")
    parser.add_argument("--dump", type=Path, help="also save the crop embeddings, qualities, tracks and labels here (.npz), and with finetuning the loss metric's logits beside it (<stem>_loss.npz)")
    parser.add_argument("--backbone", default=None, help="base model by registry name (default: a new install's)")
    args = parser.parse_args(argv)
    if not (args.trackset / "labels.csv").is_file():
        parser.error(f"{args.trackset} has no labels.csv to score against")

    # The same reading, alignment, embedding and quality as `vcn cluster-tracks`, once.
    backbone = load_backbone(args.backbone or DEFAULT_BACKBONE, device="cpu")
    aligned = align_trackset(args.trackset, backbone=backbone)
    started = time.perf_counter()
    data = embed(aligned.backbone, aligned.chips)
    timings = {**aligned.timings, "embed": time.perf_counter() - started}
    track_ids = aligned.track_ids
    labels = read_trackset_labels(args.trackset)
    n_ids = len(set(labels.values()))
    n_tracks = len(track_ids)
    cannot_link = on_screen_together(aligned.tracks)

    rows = []

    def score(name: str, description: str, uses_gt: bool, assignment: np.ndarray, seconds: float) -> None:
        predicted = {t: (None if a == UNKNOWN else str(int(a))) for t, a in zip(track_ids, assignment)}
        scores = evaluate(labels, predicted).to_dict()
        rows.append({"method": name, "settings": description, "uses_ground_truth": uses_gt,
                     "seconds": round(seconds, 3), **scores})
        print(f"{name:45s} WCP {scores['wcp'] * 100:6.2f}  PCR {scores['pcr']:.3f}  "
              f"BCubed F {scores['bcubed_f'] * 100:6.2f}  Unknown {scores['unknown_fraction'] * 100:5.1f}%", flush=True)

    def ours(name: str, description: str, embedded, use_cannot_link: bool, use_quality: bool, loss: bool) -> None:
        started = time.perf_counter()
        result = cluster(
            embedded, n_tracks, similarity="loss" if loss else "cosine",
            cannot_link=cannot_link if use_cannot_link else None, quality_screen=use_quality,
        )
        score(name, description, False, result.labels, time.perf_counter() - started)

    ours("Pretrained + cosine", "ours, quality screen + cannot-link, no finetuning (--no-finetune)", data, True, True, False)
    ours("Pretrained + cosine, no cannot-link", "quality screen, paper's setting", data, False, True, False)
    ours("Pretrained + cosine, no quality screen", "cannot-link", data, True, False, False)

    # The method: adapt the backbone to the episode (the CPU budget mode here), then cluster.
    tuned = finetune = None
    if not args.no_finetune:
        adaptation = adapt(aligned.backbone, aligned.chips, n_tracks, cannot_link=cannot_link, seed=args.seed,
                           cpu_anyway=True)
        ft = adaptation.model
        started = time.perf_counter()
        # The loss metric on every crop (no cap): the method as measured, whatever the episode's length.
        tuned = embed(ft.backbone, aligned.chips, loss_metric=ft, max_loss_crops=len(aligned.chips.crop_track))
        tuned_timings = {"finetune": adaptation.seconds, "embed": time.perf_counter() - started}
        history = ft.history
        finetune = {
            "version": ft.version, "mode": ft.mode, "rounds": len(history.rounds),
            "stopped": history.stopped, "matched_track_pairs": history.n_matches,
            "match_precision": [r.match_precision for r in history.rounds],
            "loss_curves": [[round(v, 4) for v in r.loss_curve] for r in history.rounds],
            "pairs_per_second_cpu": round(history.pairs_per_second, 1),
            "round_pairs_per_second_cpu": [round(r.pairs_per_second, 1) for r in history.rounds],
            "bank_seconds": round(history.bank_seconds, 1),
            "finetune_seconds": round(tuned_timings["finetune"], 1),
            "collapse": ft.collapse.to_dict() if ft.collapse else None,
            "check": ft.check.to_dict() if ft.check else None,
            "stepped_aside": ft.steps_aside,
            "timings_s": {k: round(v, 2) for k, v in tuned_timings.items()},
        }
        print(f"finetuning: {finetune}", flush=True)
        ours("Finetuned + cosine", f"quality screen + cannot-link, {ft.mode}", tuned, True, True, False)
        ours("Finetuned + loss metric", f"the method: quality screen + cannot-link, {ft.mode}", tuned, True, True, True)
        ours("Finetuned + loss metric, no cannot-link", "quality screen, paper's setting", tuned, False, True, True)

    # Tracks without crops (problem tracks) sit at the origin for the baselines. They run on the
    # pretrained track means, and again on the finetuned ones (a fair match for the finetuned rows).
    for embedded, suffix in ((data, ""), (tuned, ", finetuned embeddings")) if tuned else ((data, ""),):
        means = np.nan_to_num(unit_track_means(embedded.embeddings, embedded.crop_track, n_tracks))
        for baseline in BASELINES:
            started = time.perf_counter()
            assignment = baseline.run(means, n_ids)
            score(baseline.name + suffix, baseline.description, baseline.uses_ground_truth, assignment,
                  time.perf_counter() - started)

    if args.dump:
        extra = {} if tuned is None else {"finetuned": tuned.embeddings, "finetuned_quality": tuned.quality}
        np.savez(args.dump, pretrained=data.embeddings, quality=data.quality, crop_track=data.crop_track,
                 cannot_link=cannot_link, labels=np.array([labels.get(t, "") for t in track_ids]), **extra)
        if tuned is not None and tuned.loss is not None:
            # The loss metric's head logits, centre and temperatures, to rescore it without finetuning again.
            tuned.loss.save(args.dump.with_name(args.dump.stem + "_loss.npz"))

    scale = scale_check(args.scale_tracks) if args.scale_tracks else None
    if scale:
        print(f"speed: {scale}", flush=True)
    result = {
        "scale": scale,
        "trackset": str(args.trackset.resolve().relative_to(ROOT.parent)) if args.trackset.resolve().is_relative_to(ROOT.parent) else str(args.trackset),
        "n_tracks": n_tracks,
        "n_crops": int(len(data.crop_track)),
        "n_identities": n_ids,
        "crops_by_alignment": aligned.crops_by_method,
        "model_version": data.model_version,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "finetune": finetune,
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores",
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    lines = [
        "# Clustering quality on a labelled track dataset",
        "",
        f"`benchmarks/cluster_quality.py` on `{result['trackset']}`: {result['n_tracks']} tracks, "
        f"{result['n_crops']} crops, {result['n_identities']} identities; pretrained embeddings "
        f"`{result['model_version']}`, "
        + (f"finetuned `{result['finetune']['version']}` ({result['finetune']['mode']})" if result["finetune"] else "no finetuning")
        + f". Measured {result['measured_at']} on "
        f"{result['machine']}. Unknown tracks count as singletons in every figure but PCR. The baselines "
        "cluster the pretrained track means, then (rows marked 'finetuned embeddings') the finetuned ones.",
        "",
        "| method | settings | WCP % | PCR | BCubed P % | BCubed R % | BCubed F % | pairwise F % | NMI % | Unknown % | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        name = r["method"] + (" *" if r["uses_ground_truth"] else "")
        lines.append(
            f"| {name} | {r['settings']} | {r['wcp'] * 100:.2f} | {r['pcr']:.3f} | {r['bcubed_precision'] * 100:.2f} | "
            f"{r['bcubed_recall'] * 100:.2f} | {r['bcubed_f'] * 100:.2f} | {r['pairwise_f'] * 100:.2f} | "
            f"{r['nmi'] * 100:.2f} | {r['unknown_fraction'] * 100:.1f} | {r['seconds']:.2f} |"
        )
    lines += [
        "",
        "\\* uses the true number of identities (ground truth).",
        "",
        f"Crops by alignment method: {result['crops_by_alignment']}. "
        f"Pipeline seconds: {result['timings_s']}.",
        "",
    ]
    ft = result["finetune"]
    lines += [] if not ft else [
        f"Finetuning ({ft['mode']}): {ft['rounds']} round(s), stopped by {ft['stopped']}, "
        f"{ft['matched_track_pairs']} matched track pairs (precision per round {ft['match_precision']}); "
        f"loss per epoch {ft['loss_curves']}; training {ft['pairs_per_second_cpu']} pairs/s on the CPU "
        f"(per round {ft['round_pairs_per_second_cpu']}); view bank {ft['bank_seconds']} s; finetuning "
        f"{ft['finetune_seconds']} s in all; steps {ft['timings_s']}. Collapse diagnostics: {ft['collapse']}.",
        "",
        f"Label-free adaptation check (`vcn.identity.selfsup.separation`): {ft.get('check')}. "
        + (f"The default pipeline clusters with the pretrained model (the 'Pretrained + cosine' row): {ft['stepped_aside']}."
           if ft.get("stepped_aside") else "The default pipeline clusters with the finetuned model (the 'Finetuned + cosine' row)."),
        "",
    ]
    if result.get("scale"):
        sc = result["scale"]
        lines += [
            f"Speed: a synthetic movie of {sc['n_tracks']:,} tracks ({sc['n_crops']:,} crops, {sc['people']} people) "
            f"clusters in {sc['seconds']} s ({sc['rounds']} rounds, {sc['clusters']} clusters).",
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
