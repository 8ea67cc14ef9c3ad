"""Where a face stops carrying identity: the measurement behind the crop filters' absolute floors.

The crop filters (:mod:`vcn.faces.filters`) judge a crop against the movie it is
in, with two absolute floors below which no movie can make a face worth
clustering, and two ceilings above which no movie makes a face too small or too
blurred. This script measures both on real faces, with the default backbone
(dlib's ResNet, ported) and the pipeline's own alignment and sharpness measure:

- **size**: each CelebA DEV crop (``shared/data/celeba-faces``, the dataset's
  RetinaFace box and landmarks) is downscaled (``cv2.INTER_AREA``, the
  anti-aliased downscale of a camera or a video scaler) so that its face box is
  ``h`` px tall, then aligned from the exactly scaled landmarks up to the 150 px
  chip, as the crops stage aligns a small face of a frame;
- **blur**: the full-size crop is blurred with a Gaussian of standard deviation
  ``f * h0`` (``h0`` the face box's height), then aligned.

Per condition: the median :func:`vcn.faces.filters.sharpness` of the chips; the
fraction of faces whose embedding stays within dlib's same-person distance (0.6,
dlib's documented decision threshold) of the same face's clean embedding; and
leave-one-out 1-nearest-neighbour identification against the other faces' clean
embeddings. Writes ``benchmarks/results/filter_floors.{json,md}``.

    python benchmarks/filter_floors.py [--per-identity 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.embed import DATA, read_faces, read_rgb

RESULTS = ROOT / "benchmarks" / "results"
#: Face box heights (px) of the size condition.
HEIGHTS = (8, 10, 12, 14, 16, 18, 20, 24, 28, 32, 40, 48, 64)
#: Blur standard deviations, as fractions of the face box's height.
BLURS = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.10, 0.12, 0.16)
#: dlib's documented decision threshold: two faces closer than this are the same person.
SAME_PERSON = 0.6


def main() -> None:
    import cv2
    from tqdm import tqdm

    import vcn
    from vcn.faces.align import align_face, get_template
    from vcn.faces.filters import sharpness

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-identity", type=int, default=4, help="faces per identity (default %(default)s)")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()

    faces = read_faces(args.data, args.per_identity)
    template = get_template("dlib-150")
    conditions = ["clean", *(f"h{h}" for h in HEIGHTS), *(f"blur{f}" for f in BLURS)]
    chips = {c: np.zeros((len(faces), template.size, template.size, 3), np.uint8) for c in conditions}
    for i, face in enumerate(tqdm(faces, desc="degrade + align", unit="face", file=sys.stderr)):
        image = read_rgb(args.data / face.path)
        landmarks = np.array(face.landmarks)
        box_h = face.box[3] - face.box[1]
        chips["clean"][i] = align_face(image, landmarks, template)
        height, width = image.shape[:2]
        for h in HEIGHTS:
            scale = h / box_h
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            ratio = np.array([size[0] / width, size[1] / height])
            chips[f"h{h}"][i] = align_face(small, (landmarks + 0.5) * ratio - 0.5, template)
        for f in BLURS:
            blurred = cv2.GaussianBlur(image, (0, 0), f * box_h)
            chips[f"blur{f}"][i] = align_face(blurred, landmarks, template)

    backbone = vcn.load_backbone("dlib-resnet", device="cpu")
    started = time.perf_counter()
    embeddings = {c: backbone.embed(chips[c]) for c in tqdm(conditions, desc="embed", file=sys.stderr)}
    seconds = time.perf_counter() - started
    identity = np.array([face.identity for face in faces])
    clean = embeddings["clean"]

    rows = []
    for c in conditions:
        e = embeddings[c]
        to_self = np.linalg.norm(e - clean, axis=1)
        similarity = e @ clean.T
        np.fill_diagonal(similarity, -np.inf)  # leave the face's own clean embedding out
        nearest = identity[similarity.argmax(axis=1)] == identity
        sharp = np.array([sharpness(chip) for chip in chips[c]])
        rows.append(
            {
                "condition": c,
                "median_sharpness": float(np.median(sharp)),
                "sharpness_p10": float(np.percentile(sharp, 10)),
                "sharpness_p90": float(np.percentile(sharp, 90)),
                "median_distance_to_clean": float(np.median(to_self)),
                "same_person_as_clean": float((to_self < SAME_PERSON).mean()),
                "nn_accuracy": float(nearest.mean()),
            }
        )
    result = {
        "faces": len(faces),
        "identities": len(set(identity.tolist())),
        "median_box_height": float(np.median([f.box[3] - f.box[1] for f in faces])),
        "embed_seconds": round(seconds, 1),
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "filter_floors.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Where a face stops carrying identity (crop filter floors)",
        "",
        (
            f"`benchmarks/filter_floors.py`: {result['faces']} CelebA DEV faces ({result['identities']} people, "
            f"face box median {result['median_box_height']:.0f} px tall), dlib ResNet (ported), `dlib-150` chips "
            "aligned from the dataset's landmarks. `hN`: the image downscaled (INTER_AREA) so that the face box is "
            "N px tall, aligned up to the chip; `blurF`: Gaussian blur of sigma F x box height at full size. "
            f"Same person as clean: the embedding within dlib's same-person distance {SAME_PERSON} of the same "
            "face's clean embedding. 1-NN: leave-one-out identification against the other faces' clean embeddings."
        ),
        "",
        "| condition | sharpness median (p10-p90) | distance to clean | same person as clean | 1-NN |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['condition']} | {row['median_sharpness']:.1f} ({row['sharpness_p10']:.1f}-{row['sharpness_p90']:.1f}) "
            f"| {row['median_distance_to_clean']:.3f} | {row['same_person_as_clean']:.3f} | {row['nn_accuracy']:.3f} |"
        )
    (RESULTS / "filter_floors.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
