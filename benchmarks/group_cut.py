"""The group cut swept: merges of two clusters of several tracks each held to a lower quantile.

Reads the dumps of ``benchmarks/cluster_quality.py --dump`` and clusters every embedding set
in them (pretrained, and finetuned when present) with the product's default pipeline
(:func:`vcn.pipeline.cluster`: quality screen, cannot-link, negative cut), once without the
group cut (every merge at the lower quartile, the rule before it) and then over a grid of
:data:`vcn.clustering.linkage.GROUP_SIZE` and :data:`~vcn.clustering.linkage.GROUP_QUANTILE`
(set on the module for the run). Labels are read only to score.

Usage::

    python benchmarks/group_cut.py benchmarks/work/dumps/mv_sface_ft.npz benchmarks/work/dumps/ep_sface_ft.npz \
        benchmarks/work/dumps/bbt_sface_ft.npz benchmarks/work/dumps/buffymv_sface_ft.npz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vcn.clustering.linkage as linkage  # noqa: E402
from benchmarks.cluster_rules import _scores, dump_sets, write_results  # noqa: E402
from vcn.pipeline import Embedded, cluster  # noqa: E402

SIZES = (3, 5, 8, 12)
QUANTILES = (0.05, 0.1, 0.15)


def _run(data, key: str, quality: str, size: int | None, quantile: float | None) -> dict:
    defaults = linkage.GROUP_SIZE, linkage.GROUP_QUANTILE
    try:
        # No group cut: the group quantile at the quartile makes the group cut the cut itself.
        linkage.GROUP_SIZE = defaults[0] if size is None else size
        linkage.GROUP_QUANTILE = linkage.NEGATIVE_QUANTILE if quantile is None else quantile
        n = len(data["labels"])
        result = cluster(Embedded(data["crop_track"], data[key], data[quality], key), n, similarity="cosine",
                         cannot_link=data["cannot_link"], quality_screen=True)
    finally:
        linkage.GROUP_SIZE, linkage.GROUP_QUANTILE = defaults
    return _scores(data["labels"], result.labels)


def evaluate(path: Path) -> list[dict]:
    data = dict(np.load(path))
    rows = []
    for key, quality in dump_sets(data):
        row = {"dump": path.stem, "embeddings": key, "without": _run(data, key, quality, None, None),
               "default": _run(data, key, quality, linkage.GROUP_SIZE, linkage.GROUP_QUANTILE),
               "grid": {f"{size}/{q:g}": _run(data, key, quality, size, q) for size in SIZES for q in QUANTILES}}
        print(path.stem, key, row["without"], row["default"], flush=True)
        rows.append(row)
    return rows


def _cell(s: dict) -> str:
    return f"{s['wcp']:.1f} / {s['pcr']:.3f} / {s['bcubed_f']:.1f}"


def markdown(result: dict) -> str:
    lines = [
        "# The group cut: merges of two clusters of several tracks each at a lower quantile",
        "",
        f"`benchmarks/group_cut.py`, measured {result['measured_at']} on {result['machine']}, on the dumps of "
        "`benchmarks/cluster_quality.py --dump`. The product's default clustering (quality screen, cannot-link, "
        "negative cut at the lower quartile of the on-screen-together distances) without the group cut, with it "
        f"(GROUP_SIZE {result['default'][0]}, GROUP_QUANTILE {result['default'][1]:g}), and over the grid. "
        "WCP % / PCR / BCubed F %.",
        "",
        "| dump | embeddings | without | default |",
        "|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['dump']} | {r['embeddings']} | {_cell(r['without'])} | {_cell(r['default'])} |")
    keys = list(result["rows"][0]["grid"]) if result["rows"] else []
    lines += ["", "Grid, BCubed F % (PCR), by group size / group quantile:", "",
              "| dump | embeddings | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in result["rows"]:
        cells = [f"{r['grid'][k]['bcubed_f']:.1f} ({r['grid'][k]['pcr']:.2f})" for k in keys]
        lines.append(f"| {r['dump']} | {r['embeddings']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dumps", nargs="+", type=Path, help="files from cluster_quality.py --dump")
    parser.add_argument("--name", default="group_cut", help="stem of the results files")
    args = parser.parse_args(argv)
    rows = [row for path in args.dumps for row in evaluate(path)]
    write_results(args.name, {"dumps": [p.name for p in args.dumps],
                              "default": [linkage.GROUP_SIZE, linkage.GROUP_QUANTILE], "rows": rows}, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
