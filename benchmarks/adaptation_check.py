"""Does the label-free adaptation check pick the model that clusters better? Measured on saved embeddings.

Reads the ``.npz`` files of ``benchmarks/cluster_quality.py --dump`` that hold both the
pretrained and the finetuned embeddings of an episode's crops, and reports per file:

- the check as the pipeline runs it (``vcn.identity.selfsup.separation.check_adaptation``
  on the crops finetuning trained on: every crop up to ``MAX_CROPS``, an even share
  of each track's beyond), and which model it keeps;
- what the labels say: the true share of same-person track pairs closer than the
  different-person quantiles (TAR at those false-merge rates) for each model, and each
  model's clustering by the default pipeline (``cluster_movie``: quality screen,
  cannot-link, negative cut), WCP % / PCR / BCubed F %.

Usage::

    python benchmarks/adaptation_check.py benchmarks/work/dumps/ep_dlib.npz benchmarks/work/dumps/ep_sface.npz ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cluster_rules import _scores, write_results
from vcn.clustering.parameter_free import cluster_movie
from vcn.identity.embeddings import unit_track_means
from vcn.identity.selfsup.adapt import MAX_CROPS
from vcn.identity.selfsup.sampling import spread_crops
from vcn.identity.selfsup.separation import FALSE_MERGE_RATES, check_adaptation


def closer_shares(distances: np.ndarray, labels: np.ndarray, pairs: np.ndarray, has: np.ndarray) -> dict:
    """Shares of different-person (``fmr``) and same-person (``tar``) track pairs closer than the on-screen-together
    pairs' :data:`FALSE_MERGE_RATES` quantiles, from (T, T) track ``distances`` (labels used; tracks without
    ``has`` or without a label left out)."""
    upper = np.triu_indices(len(labels), 1)
    ok = has[upper[0]] & has[upper[1]] & (labels[upper[0]] != "") & (labels[upper[1]] != "")
    same = (labels[upper[0]] == labels[upper[1]])[ok]
    values = distances[upper][ok]
    cuts = [np.quantile(distances[pairs[:, 0], pairs[:, 1]], f) for f in FALSE_MERGE_RATES]
    return {"fmr": [round(float((values[~same] < c).mean()), 4) for c in cuts],
            "tar": [round(float((values[same] < c).mean()), 4) for c in cuts]}


def true_recall(embeddings: np.ndarray, crop_track: np.ndarray, labels: np.ndarray, pairs: np.ndarray) -> list[float]:
    """Share of same-person track pairs closer than the on-screen-together quantiles (labels used)."""
    means = unit_track_means(embeddings, crop_track, len(labels))
    has = np.isfinite(means).all(axis=1)
    means = np.nan_to_num(means)
    return closer_shares(1.0 - means @ means.T, labels, pairs, has)["tar"]


def default_scores(embeddings: np.ndarray, crop_track: np.ndarray, labels: np.ndarray, pairs: np.ndarray,
                   quality: np.ndarray) -> dict:
    """The default pipeline's clustering of a dump's crops (``cluster_movie``: quality screen, cannot-link, negative
    cut), scored against the labels: WCP % / PCR / BCubed F % / NMI % / Unknown %."""
    result = cluster_movie(embeddings, crop_track, len(labels), cannot_link=pairs, crop_quality=quality)
    return _scores(labels, result.labels)


def evaluate(path: Path) -> dict:
    data = np.load(path)
    crop_track, pairs, labels = data["crop_track"], data["cannot_link"], data["labels"]
    rows = spread_crops(crop_track, MAX_CROPS)
    check = check_adaptation(data["pretrained"][rows], data["finetuned"][rows], crop_track[rows], pairs)
    row = {"dump": path.stem, "check": check.to_dict()}
    for key, quality in (("pretrained", "quality"), ("finetuned", "finetuned_quality")):
        row[key] = {"tar": true_recall(data[key], crop_track, labels, pairs),
                    **default_scores(data[key], crop_track, labels, pairs, data[quality])}
    better = "finetuned" if row["finetuned"]["bcubed_f"] > row["pretrained"]["bcubed_f"] else "pretrained"
    row["kept"] = "finetuned" if check.keeps_finetuned else "pretrained"
    row["better_by_labels"] = better
    return row


def markdown(result: dict) -> str:
    rates = " / ".join(f"{f:g}" for f in FALSE_MERGE_RATES)
    lines = [
        "# The label-free adaptation check on saved embeddings",
        "",
        f"`benchmarks/adaptation_check.py`, measured {result['measured_at']} on {result['machine']}. Separation: "
        f"the share of track pairs closer than the on-screen-together distance quantiles {rates}, averaged "
        "(no labels). TAR: the true share of same-person track pairs closer than those quantiles (labels). "
        "Clustering: the default pipeline, WCP % / PCR / BCubed F %.",
        "",
        "| dump | separation pretrained | separation finetuned | check keeps | TAR pretrained | TAR finetuned | "
        "pretrained clusters | finetuned clusters | better by BCubed F |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        c, p, f = r["check"], r["pretrained"], r["finetuned"]
        lines.append(
            f"| {r['dump']} | {c['pretrained']} | {c['finetuned']} | {r['kept']} | {p['tar']} | {f['tar']} | "
            f"{p['wcp']} / {p['pcr']} / {p['bcubed_f']} | {f['wcp']} / {f['pcr']} / {f['bcubed_f']} | "
            f"{r['better_by_labels']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dumps", nargs="+", type=Path, help="files from cluster_quality.py --dump (with finetuning)")
    parser.add_argument("--name", default="adaptation_check", help="stem of the results files")
    args = parser.parse_args(argv)
    rows = [evaluate(path) for path in args.dumps if "finetuned" in np.load(path).files]
    write_results(args.name, {"rows": rows}, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
