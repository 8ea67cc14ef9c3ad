"""The one pipeline (vcn.pipeline): the same aligned chips give the same model, embeddings,
quality, loss-metric logits and clusters whether they come from a movie's track_crops file or
from a track dataset's chips in memory (real dlib backbone on the CPU, small synthetic chips)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import vcn.identity.selfsup.finetune as finetune
import vcn.identity.selfsup.loss_metric as loss_metric
import vcn.pipeline as pipeline
from vcn.faces.crops import encode_jpeg
from vcn.identity.embeddings import read_kept_chips
from vcn.identity.selfsup.adapt import AdaptConfig
from vcn.identity.selfsup.finetune import ComputeMode
from vcn.identity.selfsup.loss_metric import LossSample
from vcn.identity.selfsup.trainer import TrainConfig
from vcn.pipeline import ChipArray, CropFile, adapt, check_similarity, cluster, embed

#: 4 people, 7 tracks of 6 crops; tracks 0 and 1 (one person) and 2 and 4 are on screen together.
PEOPLE = [0, 0, 1, 1, 2, 3, 3]
CROPS_PER_TRACK = 6
CANNOT_LINK = np.array([[0, 1], [2, 4]])
#: The movie's track ids (tracks.parquet, sorted): not 0..T-1, so that the lookup is exercised.
TRACK_IDS = np.array([3, 8, 11, 20, 21, 40, 57])


def _people(n: int) -> np.ndarray:
    """One coarse random 150 px face per person."""
    coarse = np.random.default_rng(0).integers(0, 256, (n, 15, 15, 3), dtype=np.uint8)
    return coarse.repeat(10, axis=1).repeat(10, axis=2)


@pytest.fixture(scope="module")
def movie(tmp_path_factory) -> tuple[CropFile, ChipArray]:
    """A track_crops file with rejected crops among the kept ones (row groups of 5), and its kept chips in memory."""
    rng = np.random.default_rng(1)
    faces = _people(4).astype(np.int16)
    rows = []
    for track, person in enumerate(PEOPLE):
        for _ in range(CROPS_PER_TRACK):
            chip = np.clip(faces[person] + rng.normal(0, 12, faces[person].shape), 0, 255).astype(np.uint8)
            rows.append((TRACK_IDS[track], False, chip))
            if rng.uniform() < 0.25:  # a rejected crop of the same track: never embedded
                rows.append((TRACK_IDS[track], True, rng.integers(0, 256, chip.shape, dtype=np.uint8)))
    path = tmp_path_factory.mktemp("movie") / "track_crops.parquet"
    table = pa.table({
        "crop_id": pa.array(np.arange(len(rows)) + 1000, pa.int64()),
        "track_id": pa.array([int(r[0]) for r in rows], pa.int64()),
        "rejected": pa.array([r[1] for r in rows]),
        "template": pa.array(["dlib-150"] * len(rows)),
        "image": pa.array([encode_jpeg(r[2], 90) for r in rows], pa.binary()),
    })
    pq.write_table(table, path, row_group_size=5)
    source = CropFile.open(path, "dlib-150", TRACK_IDS)
    # The track dataset's road: the same pixels, aligned already, held in memory.
    _, chips = read_kept_chips(path, "dlib-150")
    in_memory = ChipArray(chips, np.repeat(np.arange(len(PEOPLE)), CROPS_PER_TRACK))
    assert np.array_equal(source.crop_track, in_memory.crop_track)
    return source, in_memory


#: A finetuning budget for tests: seconds, not minutes.
TINY = ComputeMode(
    "cpu-budget",
    AdaptConfig(
        max_rounds=2,
        train=TrainConfig(seed=0, epochs_head_only=1, epochs_joint=1, batch_size=8, pairs_per_epoch=16, out_dim=128,
                          view_bank=2, lr_backbone=1e-4),
    ),
    "tiny test budget",
)


@pytest.fixture
def small_chunks_and_cap(monkeypatch):
    """Chunks of 8 chips and a loss sample of at most 16 crops (both cut across tracks and chunks); a tiny budget."""
    monkeypatch.setattr(pipeline, "CHUNK_SIZE", 8)
    monkeypatch.setattr(loss_metric, "MAX_CROPS", 16)
    monkeypatch.setattr(finetune, "compute_mode", lambda device, n_crops, seed=0: TINY)


def test_both_roads_give_the_same_model_embeddings_and_clusters(backbone, movie, small_chunks_and_cap, tmp_path):
    from_file, in_memory = movie
    n_tracks = len(PEOPLE)
    runs = []
    for source in (from_file, in_memory):
        adaptation = adapt(backbone, source, n_tracks, cannot_link=CANNOT_LINK, seed=0)
        model = adaptation.model
        embedded = embed(model.backbone, source, loss_metric=model)
        by_cosine = cluster(embedded, n_tracks, cannot_link=CANNOT_LINK)
        by_loss = cluster(embedded, n_tracks, similarity="loss", cannot_link=CANNOT_LINK)
        runs.append((model, embedded, by_cosine, by_loss))
    (model_a, a, cos_a, loss_a), (model_b, b, cos_b, loss_b) = runs

    assert model_a.version == model_b.version  # the same chips trained the same weights
    assert np.array_equal(a.embeddings, b.embeddings) and np.array_equal(a.quality, b.quality)
    assert np.array_equal(a.loss.rows, b.loss.rows) and np.array_equal(a.loss.logits, b.loss.logits)
    assert 0 < len(a.loss.rows) <= 16 < len(a.crop_track)  # a bounded sample, every track in it
    assert set(a.crop_track[a.loss.rows].tolist()) == set(range(n_tracks))
    for x, y in ((cos_a, cos_b), (loss_a, loss_b)):
        assert np.array_equal(x.labels, y.labels) and np.array_equal(x.low_quality, y.low_quality)
    assert cos_a.dissimilarity == "cosine" and loss_a.dissimilarity == "loss"
    assert cos_a.n_clusters >= 2
    for first, second in CANNOT_LINK:
        assert cos_a.labels[first] < 0 or cos_a.labels[first] != cos_a.labels[second]

    # The movie keeps the loss sample between its assets: read back, it clusters the same.
    a.loss.save(tmp_path / "loss_sample.npz")
    stored = pipeline.Embedded(a.crop_track, a.embeddings, a.quality, a.model_version,
                               LossSample.load(tmp_path / "loss_sample.npz"))
    again = cluster(stored, n_tracks, similarity="loss", cannot_link=CANNOT_LINK)
    assert np.array_equal(again.labels, loss_a.labels)


def test_the_loss_metric_needs_a_finetuned_model(backbone, movie):
    _, in_memory = movie
    with pytest.raises(ValueError, match="needs the finetuned model"):
        check_similarity("loss", finetune=False)
    with pytest.raises(ValueError, match="similarity must be one of"):
        check_similarity("euclid", finetune=True)
    skipped = adapt(backbone, in_memory, len(PEOPLE), enabled=False)
    assert skipped.model is None and "turned off" in skipped.skipped
    # Without a finetuned model's logits, the loss clustering is the cosine one, and says so.
    embedded = embed(backbone, in_memory, quality=False)
    assert embedded.loss is None and embedded.quality is None
    by_loss = cluster(embedded, len(PEOPLE), similarity="loss")
    by_cosine = cluster(embedded, len(PEOPLE))
    assert by_loss.dissimilarity == "cosine" and np.array_equal(by_loss.labels, by_cosine.labels)


def test_a_cpu_embeds_at_most_cpu_batch_size_chips_a_pass(backbone, movie, monkeypatch):
    import vcn.identity.quality as quality

    _, in_memory = movie
    seen = []
    real = quality.embed_and_score

    def spy(model, chips, *, batch_size, **kwargs):
        seen.append(batch_size)
        return real(model, chips, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(quality, "embed_and_score", spy)
    capped = embed(backbone, in_memory, batch_size=256)
    assert seen and set(seen) == {pipeline.CPU_BATCH_SIZE}
    # The batch changes what the chips give by float rounding at most (the convolutions' summation order).
    embeddings, scores = real(backbone, in_memory.chips, batch_size=len(in_memory.chips))
    np.testing.assert_allclose(capped.embeddings, embeddings, atol=1e-5)
    np.testing.assert_allclose(capped.quality, scores, atol=1e-5)


def test_a_source_with_another_number_of_chips_than_crops_is_refused(backbone, movie, monkeypatch):
    monkeypatch.setattr(pipeline, "CHUNK_SIZE", 8)
    _, in_memory = movie
    short = ChipArray(in_memory.chips[:-3], in_memory.crop_track)
    with pytest.raises(ValueError, match=f"gave {len(in_memory.chips) - 3} chips for {len(in_memory.chips)} crops"):
        embed(backbone, short, quality=False)
    long = ChipArray(np.concatenate([in_memory.chips, in_memory.chips[:9]]), in_memory.crop_track)
    with pytest.raises(ValueError, match=f"more chips than its {len(in_memory.chips)} crops"):
        embed(backbone, long, quality=False)
