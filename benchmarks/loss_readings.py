"""Readings of the finetuned loss metric, rescored on saved logits: why it falls below cosine, and what closes the gap.

Reads the dumps of ``benchmarks/cluster_quality.py --dump`` made with finetuning
(``STEM.npz``: embeddings, qualities, tracks, labels, on-screen-together pairs;
``STEM_loss.npz``: the finetuned head's logits of the crops, its centre and
temperatures) and clusters each episode with the default pipeline
(:func:`vcn.pipeline.cluster`: quality screen, cannot-link, negative cut) under:

- the finetuned model's cosine, and the pretrained model's (references);
- the loss metric as the method states it (``--similarity loss`` until this
  benchmark, :class:`~vcn.identity.selfsup.loss_metric.LossDissimilarity`): the
  symmetrised cross-entropy between one crop's centred, sharpened target
  (teacher temperature, 0.04) and the other's prediction (student temperature, 0.1),
  averaged over crop pairs;
- the same minus each track's own loss: a track is its crops' mean factors, and
  two tracks' distance loses the mean of their own mean pair losses
  (``S(A, B) - (S(A, A) + S(B, B)) / 2``), so a track whose crops all give sharp
  (or all flat) predictions is no nearer to (or farther from) everyone;
- that, with the targets at the student's temperature: then a crop's loss to a
  crop with the same logits is its entropy, the least loss it can have, and the
  excess over a track's own loss is a divergence between the two tracks'
  predictions. This is what ``--similarity loss`` clusters by now
  (:class:`~vcn.identity.selfsup.loss_metric.LossDivergence`).

Mechanism columns: the negative cut assumes that tracks on screen together are as far
apart as any two people's tracks. For each reading, the share of *all* different-person
track pairs (labels) closer than the on-screen-together pairs' 0.05 / 0.1 / 0.25
quantiles (equal to those quantiles when the assumption holds), and the share of
same-person track pairs closer (TAR).

Usage::

    python benchmarks/loss_readings.py benchmarks/work/dumps/mv_sface_ft benchmarks/work/dumps/ep_sface_ft
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.adaptation_check import closer_shares  # noqa: E402
from benchmarks.cluster_rules import _scores, write_results  # noqa: E402
from vcn.identity.embeddings import unit_track_means  # noqa: E402
from vcn.clustering.dissimilarity import Factors  # noqa: E402
from vcn.identity.selfsup.loss_metric import LossDissimilarity, LossDivergence, LossSample  # noqa: E402
from vcn.identity.selfsup.separation import FALSE_MERGE_RATES  # noqa: E402
from vcn.pipeline import Embedded, cluster  # noqa: E402

class TrackExcessLoss(LossDivergence):
    """The loss metric minus each track's own mean pair loss, with the targets at the teacher's temperature.

    :class:`~vcn.identity.selfsup.loss_metric.LossDivergence` (its representative) on the factors of the loss as
    written: the excess without the change of temperature.
    """

    name = "loss-track-excess"

    def factors(self, outputs: np.ndarray) -> Factors:
        return self.paper_form().factors(outputs)


def track_distances(metric: LossDissimilarity, sample: LossSample, crop_track: np.ndarray, n: int) -> np.ndarray:
    """(n, n) distances between the tracks' representatives under ``metric`` (the linkage's first level)."""
    factors = metric.factors(sample.logits)
    rows = crop_track[sample.rows]
    counts = np.maximum(np.bincount(rows, minlength=n), 1)[:, None]
    mean_u, mean_v = np.zeros((n, factors.u.shape[1])), np.zeros((n, factors.v.shape[1]))
    np.add.at(mean_u, rows, factors.u)
    np.add.at(mean_v, rows, factors.v)
    u, v = metric.representative(mean_u / counts, mean_v / counts)
    return factors.offset + 0.5 * (u @ v.T + v @ u.T)


def evaluate(stem: Path) -> list[dict]:
    data = np.load(stem.with_name(stem.name + ".npz"))
    sample = LossSample.load(stem.with_name(stem.name + "_loss.npz"))
    crop_track, labels, pairs = data["crop_track"], data["labels"], data["cannot_link"]
    n = len(labels)
    has = np.bincount(crop_track, minlength=n) > 0
    trained = sample.metric
    rows = []

    def row(name: str, embedded: Embedded, similarity: str, distances: np.ndarray) -> None:
        result = cluster(embedded, n, similarity=similarity, cannot_link=pairs, quality_screen=True)
        r = {"dump": stem.name, "reading": name, **_scores(labels, result.labels),
             **closer_shares(distances, labels, pairs, has)}
        print(r, flush=True)
        rows.append(r)

    for key, name in (("pretrained", "pretrained + cosine"), ("finetuned", "finetuned + cosine")):
        quality = data["quality"] if key == "pretrained" else data["finetuned_quality"]
        means = np.nan_to_num(unit_track_means(data[key], crop_track, n))
        row(name, Embedded(crop_track, data[key], quality, key), "cosine", 1.0 - means @ means.T)
    tau_s, tau_t = trained.student_temperature, trained.teacher_temperature
    readings = (
        (f"loss, as the method states it (tau_t {tau_t:g}, tau_s {tau_s:g})", LossDissimilarity),
        (f"loss minus each track's own (tau_t {tau_t:g}, tau_s {tau_s:g})", TrackExcessLoss),
        (f"loss minus each track's own, targets at the student's temperature (tau_t {tau_s:g}, tau_s {tau_s:g}; "
         "--similarity loss)", LossDivergence),
    )
    for name, kind in readings:
        metric = kind(trained.center, tau_s, tau_t)
        embedded = Embedded(crop_track, data["finetuned"], data["finetuned_quality"], sample.model_version,
                            loss=dataclasses.replace(sample, metric=metric))
        row(name, embedded, "loss", track_distances(metric, sample, crop_track, n))
    return rows


def markdown(result: dict) -> str:
    q = " / ".join(f"{x:g}" for x in FALSE_MERGE_RATES)
    lines = [
        "# Readings of the finetuned loss metric",
        "",
        f"`benchmarks/loss_readings.py`, measured {result['measured_at']} on {result['machine']}, on the dumps of "
        "`benchmarks/cluster_quality.py --dump` (SFace, CPU-budget finetuning, loss metric on every crop). "
        "Clustering: the default pipeline (quality screen, cannot-link, negative cut). Different-person closer: the "
        f"share of all different-person track pairs closer than the on-screen-together pairs' {q} quantiles (the "
        f"negative cut assumes {q}); same-person closer: the same for same-person pairs (TAR).",
        "",
        "| dump | reading | WCP % | PCR | BCubed F % | NMI % | different-person closer | same-person closer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['dump']} | {r['reading']} | {r['wcp']} | {r['pcr']} | {r['bcubed_f']} | {r['nmi']} | "
                     f"{r['fmr']} | {r['tar']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stems", nargs="+", type=Path, help="dump paths without .npz (STEM.npz and STEM_loss.npz)")
    parser.add_argument("--name", default="loss_readings", help="stem of the results files")
    args = parser.parse_args(argv)
    write_results(args.name, {"rows": [r for stem in args.stems for r in evaluate(stem)]}, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
