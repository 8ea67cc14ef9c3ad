"""Face-track quality: which tracks are too poor to be clustered (they become Unknown).

Quality follows SER-FIQ (Terhörst et al., CVPR 2020): a face whose embedding is
stable when random units of the network are dropped is one the network is sure
about; a blurred, occluded or non-face crop gives embeddings that scatter. Per
crop, the last layer of the backbone runs on ``passes`` dropout-perturbed copies
of the trunk's features (the trunk runs once), and the quality is
``2 * sigmoid(-mean pairwise distance)`` of the unit-length results, in (0, 1],
higher is better. A track's quality is the mean over its crops.

Each crop has its own dropout masks (a track's quality then averages over many
more of them than the passes of one crop), drawn from the seeded generator one
crop at a time in crop order: a crop's quality does not depend on how the crops
are batched, nor on a batch halved after running out of GPU memory. The CPU and
CUDA generators differ, so the two devices agree in distribution, not value by value.

Tracks whose quality is a low-side outlier of the movie, below
``median - 3 * spread``, are low quality: they take no part in building the
clusters (nor in the movie's cut), so a poor track can neither found a cluster
nor bridge two people's; afterwards each joins the cluster it is within the cut
of, or stays Unknown (:func:`vcn.clustering.linkage.attach_to_clusters`; under
the paper's fallback rule they stay Unknown). With SFace the screen flags 6-10 %
of the tracks of the labelled episodes, and their identifiability varies: the
nearest track of a flagged track is its own person's 60 % of the time on dev-ep
but 98 % on the validation BBT episode, where leaving all 60 Unknown cost 9.2
BCubed F points (``benchmarks/results/cluster_rules.md``). The spread is the
median absolute deviation (MAD) of the movie's track qualities (as DESIGN.md has it, not
rescaled to a normal standard deviation, which would cut 1.48x further out),
but never less than the scatter of one track's own crops in the same units:
:func:`within_track_scatter` (the pooled within-track standard deviation)
times 0.6745, a normal distribution's MAD per standard deviation. The crops of
one track show one face in one shot, yet their qualities scatter with pose,
expression and motion; a track whose mean lies less than ``3 * 0.6745 = 2``
such standard deviations below the movie's median is no lower than an ordinary
track's own worse crops, and that says nothing about the track. The cut adapts
to each movie: nothing to tune.

The floor matters in small movies, whose few track qualities can agree far
more closely than crops do. Measured on the Hamilton test clip (dlib ResNet
finetuned on the clip): with eight scored tracks, seven of them within
0.479-0.4825, the MAD was 0.0007 and ``median - 3 MAD`` cut 0.0021 below the
median, less than one standard deviation of one track's crops (pooled 0.0032;
0.0011-0.0049 per track); the floor puts the cut 0.0065 below. Now that
the crop filters keep ten of its tracks, the MAD is 0.0012 and the crops
scatter by 0.0034, so the cut lies 0.0070 below the median (0.4712; MAD alone:
0.4746). The pianist's sharp profile close-up (0.4675; three of its four crops,
0.464-0.468, are the clip's three lowest of 57) stays below it: no floor drawn
from the noise of the estimate keeps a track whose crops score below nearly
every other crop of the movie. On the labelled development episode (600
tracks, 6,785 crops, pretrained model) the MAD, 0.0030, exceeds the floor
(0.6745 x 0.0030 = 0.0020): the cut is median - 3 MAD, as before, and leaves
the same 20 of 600 tracks Unknown (3.3 %; the rescaled cut would leave 3).
Those are the most degraded: their track means find a track of the same person
as nearest neighbour 55 % of the time, against 74-97 % for the tracks above
the lowest 50. On the two rendered cast movies (60 tracks each) the floor does
not bind either (2 and 3 tracks Unknown, as before).
``benchmarks/results/cluster_quality.md`` has the clustering with and without
the screen.
"""

from __future__ import annotations

import numpy as np

from vcn.batching import map_batches
from vcn.identity.backbone import Backbone
from vcn.memory import HEAP_REUSED_MAX_BLOCK

#: Stochastic passes per crop (SER-FIQ uses 100; the estimate is stable from ~30).
PASSES = 100
#: Dropout probability on the trunk's features (SER-FIQ's 0.5).
DROPOUT = 0.5
#: Outliers lie this many median absolute deviations below the median.
OUTLIER_MADS = 3.0
#: A normal distribution's median absolute deviation per standard deviation (Phi^-1(3/4)).
NORMAL_MAD_PER_SD = 0.6745


def supports_quality(backbone: Backbone) -> bool:
    """Whether the backbone can give stochastic passes (a torch model with a separable head)."""
    module = backbone.module
    return module is not None and hasattr(module, "forward_features") and hasattr(module, "forward_head")


#: Upper bound on the elements of one batch of perturbed features (passes x chips x
#: feature size): 4M float32, 16 MiB, half the largest block the embedding loop's
#: heap keeps (:func:`vcn.memory.heap_reused`). SFace's 50,176 flattened features
#: and iresnet's 25,088 take one chip (100 passes, 19 and 10 MiB) at a time; dlib's
#: 256 take 163. One chip at a time runs as fast as six (SFace, 2-core CPU).
_MAX_PERTURBED_ELEMENTS = HEAP_REUSED_MAX_BLOCK // 8


def embed_and_score(
    backbone: Backbone,
    chips: np.ndarray,
    *,
    passes: int = PASSES,
    dropout: float = DROPOUT,
    batch_size: int = 128,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and SER-FIQ-style quality of aligned chips, from one trunk pass.

    The embedding is the head on the unperturbed features, the same as
    :meth:`vcn.identity.backbone.Backbone.embed` gives (under bf16 autocast on CUDA, as there).

    Args:
        backbone: A torch backbone (:func:`supports_quality`).
        chips: (N, S, S, 3) uint8 RGB chips aligned for the backbone.
        passes: Dropout-perturbed runs of the head per chip.
        dropout: Probability of dropping each feature.
        batch_size: Chips per trunk pass; halved and retried on running out of
            device memory (:mod:`vcn.batching`). The results do not depend on it.
        seed: Seeds the dropout masks: the same chips in the same order give
            the same qualities on one device.

    Returns:
        (N, dim) float32 unit-length embeddings and (N,) float32 quality in (0, 1].

    Raises:
        TypeError: The backbone has no separable head (e.g. an ONNX model).
        ValueError: Bad chips or parameters.
    """
    import torch

    if not supports_quality(backbone):
        raise TypeError(f"backbone {backbone.name!r} cannot give stochastic passes; quality needs a torch backbone")
    if passes < 2:
        raise ValueError(f"passes must be at least 2, got {passes}")
    if not 0.0 < dropout < 1.0:
        raise ValueError(f"dropout must be in (0, 1), got {dropout}")
    size = backbone.input_size
    if not isinstance(chips, np.ndarray) or chips.dtype != np.uint8 or chips.ndim != 4 or chips.shape[1:] != (size, size, 3):
        raise ValueError(f"chips must be a uint8 array of shape (N, {size}, {size}, 3), got {getattr(chips, 'shape', None)}")
    if len(chips) == 0:
        return np.zeros((0, backbone.dim), np.float32), np.zeros(0, np.float32)

    module = backbone.module
    device = torch.device(backbone.device)
    generator = torch.Generator(device=device).manual_seed(seed)
    # One noise buffer for the whole call, reused by every chunk of every batch. A fresh one per
    # chunk (120 MiB for SFace) is a fresh mapping from the C allocator each time, whose every page
    # the kernel faulted in and zeroed again (a quarter of embedding's page faults with SFace).
    noise_buffer: list[torch.Tensor] = []

    def noise_for(rows: int, d: int) -> torch.Tensor:
        if not noise_buffer or noise_buffer[0].shape[0] < rows or noise_buffer[0].shape[2] != d:
            noise_buffer[:] = [torch.empty((rows, passes, d), device=device)]
        return noise_buffer[0][:rows]

    def score(part: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # A failed attempt (out of memory) rewinds the generator, so that its retry draws the same masks.
        state = generator.get_state()
        try:
            batch = torch.from_numpy(np.ascontiguousarray(part)).to(device)
            features = module.forward_features(backbone.preprocess(batch.permute(0, 3, 1, 2).float()))
            embeddings = torch.nn.functional.normalize(module.forward_head(features).float(), dim=1).cpu()
            n, d = features.shape
            step = max(1, _MAX_PERTURBED_ELEMENTS // (passes * d))
            qualities = []
            for first in range(0, n, step):
                chunk = features[first : first + step]
                # One chip's masks per draw: the same masks for a chip whatever the batch around it.
                noise = noise_for(min(step, n), d)[: len(chunk)]
                for row in noise:
                    row.uniform_(generator=generator)
                # The masked, rescaled copies built in place in the noise buffer (no temporaries: with
                # SFace's 50,176 features they would cost more than the head): keep * (x / (1 - p)) is
                # bit for bit x * keep / (1 - p), since keep is 0 or 1.
                perturbed = noise.ge_(dropout).mul_((chunk.float() / (1.0 - dropout))[:, None, :]).reshape(-1, d)
                # One head run on all passes of these chips: (m * passes, d) masked copies.
                stochastic = torch.nn.functional.normalize(module.forward_head(perturbed).float(), dim=1)
                stochastic = stochastic.reshape(len(chunk), passes, -1)
                mean_distance = torch.cdist(stochastic, stochastic).sum(dim=(1, 2)) / (passes * (passes - 1))
                qualities.append((2.0 * torch.sigmoid(-mean_distance)).cpu())
        except BaseException:
            generator.set_state(state)
            raise
        return embeddings, torch.cat(qualities)

    was_training = module.training
    module.eval()
    try:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=backbone.dtype == "bfloat16"),
        ):
            parts = map_batches(score, chips, batch_size, f"quality passes of {backbone.name}")
    finally:
        module.train(was_training)
    embeddings, qualities = zip(*parts)
    return torch.cat(embeddings).numpy().astype(np.float32), torch.cat(qualities).numpy().astype(np.float32)


def track_quality(crop_quality: np.ndarray, crop_track: np.ndarray, n_tracks: int) -> np.ndarray:
    """(T,) mean crop quality per track; NaN for a track without crops."""
    crop_track = np.asarray(crop_track, dtype=np.int64)
    counts = np.bincount(crop_track, minlength=n_tracks)
    sums = np.bincount(crop_track, weights=np.asarray(crop_quality, dtype=np.float64), minlength=n_tracks)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


def within_track_scatter(crop_quality: np.ndarray, crop_track: np.ndarray) -> float:
    """Pooled standard deviation of crop quality within tracks: how much one track's crops scatter.

    ``sqrt(sum over tracks of the squared deviations from the track's mean /
    sum over tracks of (crops - 1))``, over tracks with two crops or more; 0
    when there are none (nothing to measure the scatter by).
    """
    quality = np.asarray(crop_quality, dtype=np.float64)
    track = np.asarray(crop_track, dtype=np.int64)
    if len(quality) == 0:
        return 0.0
    n = np.bincount(track)
    means = np.bincount(track, weights=quality) / np.maximum(n, 1)
    squares = float(((quality - means[track]) ** 2).sum())
    dof = int((n - 1)[n > 1].sum())
    return float(np.sqrt(squares / dof)) if dof > 0 else 0.0


def low_quality_tracks(quality: np.ndarray, *, crop_scatter: float = 0.0) -> tuple[np.ndarray, float]:
    """Tracks whose quality is a low-side outlier of the movie.

    Args:
        quality: (T,) per-track quality; NaN entries (no crops) are not judged.
        crop_scatter: :func:`within_track_scatter` of the movie's crops, the
            noise floor of the spread (see the module docstring); 0 leaves the
            spread to the MAD alone.

    Returns:
        (T,) bool mask of outliers, and the cut ``median - 3 * max(MAD, 0.6745 *
        crop_scatter)`` (-inf when fewer than 3 tracks have a quality: no spread to judge by).
    """
    quality = np.asarray(quality, dtype=np.float64)
    known = np.isfinite(quality)
    if known.sum() < 3:
        return np.zeros(len(quality), dtype=bool), float("-inf")
    median = float(np.median(quality[known]))
    mad = float(np.median(np.abs(quality[known] - median)))
    spread = max(mad, NORMAL_MAD_PER_SD * float(crop_scatter))
    cut = median - OUTLIER_MADS * spread
    return known & (quality < cut), cut
