"""Tests of the CPU view bank, the trunk/tail split, compute modes, collapse diagnostics and
finetuned checkpoints (real dlib backbone on the CPU, small random data)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from vcn.identity.models.dlib_resnet import DlibResNet
from vcn.identity.models.iresnet import IResNet, create_iresnet
from vcn.identity.selfsup.adapt import AdaptConfig
from vcn.identity.selfsup.bank import ViewBank, bank_crops, build_view_bank
from vcn.identity.selfsup.finetune import (
    COLLAPSE_RATIO,
    CollapseStats,
    ComputeMode,
    FinetuneError,
    collapse_stats,
    compute_mode,
    embedding_spread,
    finetune_movie,
    load_finetuned,
)
from vcn.identity.selfsup.trainer import TrainConfig, train_round


def _chips(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, 15, 15, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.repeat(np.repeat(coarse, 10, axis=1), 10, axis=2))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return _chips(24), np.repeat(np.arange(4), 6)


# --- trunk and tail ---------------------------------------------------------------


def test_dlib_trunk_then_tail_is_the_forward_pass(backbone, data):
    module = backbone.module
    x = backbone.preprocess(torch.from_numpy(data[0][:4]).permute(0, 3, 1, 2).float())
    with torch.no_grad():
        trunk = module.forward_trunk(x)
        assert tuple(trunk.shape) == (4, 128, 8, 8)
        assert torch.equal(module.forward_tail(trunk), module(x))


def test_iresnet_trunk_then_tail_is_the_forward_pass():
    model = create_iresnet("iresnet18").eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        trunk = model.forward_trunk(x)
        assert tuple(trunk.shape) == (2, 256, 14, 14)
        assert torch.equal(model.forward_tail(trunk), model(x))
    tail_parameters = {n for n, _ in model.named_parameters() if n.startswith(IResNet.last_stage_prefixes)}
    assert any(n.startswith("layer4") for n in tail_parameters)


# --- view bank --------------------------------------------------------------------


def test_bank_crops_keeps_everything_that_fits():
    tracks = np.repeat(np.arange(3), [5, 2, 9])
    assert np.array_equal(bank_crops(tracks, 4, 100, 16 * 4 * 100), np.arange(16))


def test_bank_crops_caps_long_tracks_evenly():
    tracks = np.repeat(np.arange(3), [5, 2, 9])
    kept = bank_crops(tracks, 2, 10, 8 * 2 * 10)  # room for 8 crops: caps of 3 -> 3 + 2 + 3
    counts = np.bincount(tracks[kept], minlength=3)
    assert counts.tolist() == [3, 2, 3]
    # Spread over the track: its first and last crops are among those kept.
    long_track = np.flatnonzero(tracks == 2)
    assert {long_track[0], long_track[-1]} <= set(kept.tolist())


def test_bank_crops_refuses_a_budget_below_one_crop_per_track():
    with pytest.raises(ValueError, match="at least"):
        bank_crops(np.arange(10), 4, 1000, 1000)


def test_bank_draw_gives_two_views_and_never_the_same_view_of_one_crop():
    features = torch.arange(5 * 3, dtype=torch.float16).reshape(5, 3, 1, 1, 1)
    bank = ViewBank(features=features, crops=np.arange(5))
    pairs = np.array([[0, 0], [1, 2], [3, 3], [4, 4]] * 50)
    drawn = bank.draw(pairs, torch.Generator().manual_seed(0), torch.device("cpu")).flatten()
    assert drawn.dtype == torch.float32 and drawn.shape == (400,)
    first, second = drawn[:200], drawn[200:]
    self_pair = torch.from_numpy(pairs[:, 0] == pairs[:, 1])
    assert torch.all(first[self_pair] != second[self_pair])
    assert torch.all(first // 3 == torch.from_numpy(pairs[:, 0])) and torch.all(second // 3 == torch.from_numpy(pairs[:, 1]))
    assert len(set(first.tolist())) > 5  # views vary


def test_bank_view_zero_reproduces_the_model_and_view_one_the_mirror(backbone, data):
    chips = data[0][:6]
    bank = build_view_bank(backbone, backbone.module, chips, n_views=3, seed=1, device=torch.device("cpu"))
    assert bank.features.dtype == torch.float16 and tuple(bank.features.shape[:2]) == (6, 3)
    with torch.no_grad():
        direct = backbone.module(backbone.preprocess(torch.from_numpy(chips).permute(0, 3, 1, 2).float()))
        mirrored = backbone.module(backbone.preprocess(torch.from_numpy(chips[:, :, ::-1].copy()).permute(0, 3, 1, 2).float()))
        from_bank = backbone.module.forward_tail(bank.features[:, 0].float())
        from_mirror = backbone.module.forward_tail(bank.features[:, 1].float())
    assert torch.allclose(from_bank, direct, atol=2e-3 * direct.abs().max())
    assert torch.allclose(from_mirror, mirrored, atol=2e-3 * mirrored.abs().max())
    again = build_view_bank(backbone, backbone.module, chips, n_views=3, seed=1, device=torch.device("cpu"))
    assert torch.equal(again.features, bank.features)


def test_view_bank_needs_a_frozen_trunk():
    with pytest.raises(ValidationError, match="view_bank"):
        TrainConfig(view_bank=4, trainable="all")


# --- training on the bank -----------------------------------------------------------

BANK_CONFIG = TrainConfig(
    seed=5, epochs_head_only=1, epochs_joint=1, batch_size=8, pairs_per_epoch=16, out_dim=256,
    trainable="last_stage", lr_backbone=1e-4, view_bank=3,
)


@pytest.fixture(scope="module")
def bank_result(backbone, data):
    chips, tracks = data
    return train_round(backbone, chips, tracks, None, BANK_CONFIG)


def test_bank_training_moves_the_last_stage_only(bank_result, backbone):
    original = backbone.module.state_dict()
    prefixes = DlibResNet.last_stage_prefixes
    changed = {n for n, v in bank_result.backbone.state_dict().items() if not torch.equal(v, original[n])}
    assert changed and all(n.startswith(prefixes) for n in changed)
    assert bank_result.bank_seconds > 0
    assert all(math.isfinite(v) for v in bank_result.loss_curve)


def test_bank_training_centres_the_head_on_the_movie(bank_result, backbone, data):
    with torch.no_grad():
        mean = backbone.module(backbone.preprocess(torch.from_numpy(data[0]).permute(0, 3, 1, 2).float())).mean(0)
    assert torch.allclose(bank_result.head.input_center, mean, atol=2e-3 * mean.abs().max())


def test_bank_training_is_reproducible(bank_result, backbone, data):
    again = train_round(backbone, data[0], data[1], None, BANK_CONFIG)
    assert again.loss_curve == bank_result.loss_curve
    for (name, a), b in zip(bank_result.backbone.state_dict().items(), again.backbone.state_dict().values()):
        assert torch.equal(a, b), name


# --- compute modes ------------------------------------------------------------------


def test_cpu_mode_is_the_budget():
    mode = compute_mode("cpu", n_crops=50_000)
    assert mode.name == "cpu-budget"
    train = mode.config.train
    assert train.view_bank > 0 and train.trainable == "last_stage" and train.pairs_per_epoch == 8192
    assert compute_mode("cpu", n_crops=300).config.train.pairs_per_epoch == 300
    assert "CPU" in mode.description


def test_cuda_mode_trains_everything():
    mode = compute_mode("cuda:0", n_crops=1000, seed=7)
    assert mode.name == "cuda-full"
    assert mode.config.train.trainable == "all" and mode.config.train.view_bank == 0
    assert mode.config.train.seed == 7 and mode.config.train.device == "cuda:0"


# --- collapse diagnostics -------------------------------------------------------------


def test_embedding_spread_of_known_sets():
    axes = np.eye(8)
    variance, rank = embedding_spread(np.concatenate([axes, -axes]))
    assert variance == pytest.approx(1.0) and rank == pytest.approx(8.0)
    variance, rank = embedding_spread(np.tile([[1.0, 0.0, 0.0]], (10, 1)))
    assert variance == pytest.approx(0.0) and rank == 0.0


def test_collapse_problems_name_each_failure():
    rng = np.random.default_rng(0)
    healthy = rng.normal(size=(200, 16))
    ok = collapse_stats(3.0, 4096, healthy, healthy)
    assert ok.problems() == [] and ok.loss_ratio == pytest.approx(3.0 / math.log(4096))
    stuck = collapse_stats(math.log(4096) * 0.99, 4096, healthy, healthy)
    assert len(stuck.problems()) == 1 and "ln K" in stuck.problems()[0]
    point = np.tile(healthy[:1], (200, 1)) + 1e-6 * rng.normal(size=(200, 16))
    collapsed = collapse_stats(3.0, 4096, point, healthy)
    # Collapse to a point shows in the variance (the rank of what noise is left is scale-free).
    assert any("variance" in p for p in collapsed.problems())
    line = np.outer(rng.normal(size=200), rng.normal(size=16)) + 1e-3 * rng.normal(size=(200, 16))
    assert any("rank" in p for p in collapse_stats(3.0, 4096, line, healthy).problems())


def test_a_loss_near_ln_k_after_a_few_steps_is_not_judged_stuck():
    """A clip of a few tracks trains a handful of steps: its loss cannot have left ln K yet, healthy or not."""
    from vcn.identity.selfsup.finetune import MIN_STEPS_TO_JUDGE_LOSS

    healthy = np.random.default_rng(0).normal(size=(200, 16))
    near = math.log(4096) * 0.985
    assert collapse_stats(near, 4096, healthy, healthy, steps=6).problems() == []
    assert len(collapse_stats(near, 4096, healthy, healthy, steps=MIN_STEPS_TO_JUDGE_LOSS).problems()) == 1
    assert len(collapse_stats(near, 4096, healthy, healthy).problems()) == 1  # steps unknown: judged
    assert collapse_stats(float("nan"), 4096, healthy, healthy, steps=6).problems()  # diverged: always a problem
    assert COLLAPSE_RATIO == 0.5


# --- the whole adaptation and its checkpoint -------------------------------------------

TINY = ComputeMode(
    "cpu-budget",
    AdaptConfig(
        max_rounds=2,
        train=TrainConfig(seed=0, epochs_head_only=1, epochs_joint=1, batch_size=8, pairs_per_epoch=16, out_dim=128,
                          view_bank=2, lr_backbone=1e-4),
    ),
    "tiny test budget",
)


@pytest.fixture(scope="module")
def finetuned(backbone, data):
    chips, tracks = data
    return finetune_movie(backbone, chips, tracks, 4, cannot_link=[(0, 1)], mode=TINY)


def test_finetune_movie_reports_what_it_did(finetuned, backbone, data):
    assert finetuned.base_version == backbone.version
    assert finetuned.version.startswith(backbone.version + "-ft-") and len(finetuned.version.split("-ft-")[1]) == 12
    assert finetuned.backbone.version == finetuned.version and finetuned.backbone.module is not backbone.module
    assert finetuned.mode == "cpu-budget" and finetuned.settings["train"]["view_bank"] == 2
    assert 1 <= len(finetuned.history.rounds) <= 2 and finetuned.history.pairs_per_second > 0
    assert finetuned.history.loss_curve == [v for r in finetuned.history.rounds for v in r.loss_curve]
    assert isinstance(finetuned.collapse, CollapseStats) and finetuned.collapse.ln_k == pytest.approx(math.log(128))
    assert finetuned.center.shape == (128,)
    # One pair on screen together is too few to compare it with the pretrained model: it stays.
    assert finetuned.check.crops == len(data[0]) and finetuned.check.tracks == 4
    assert not finetuned.check.judged and finetuned.check.negatives == 1 and finetuned.steps_aside is None


def test_an_adapted_model_no_better_than_the_pretrained_one_steps_aside(finetuned):
    from dataclasses import replace

    from vcn.identity.selfsup.separation import AdaptationCheck
    from vcn.pipeline import Adaptation

    assert Adaptation(finetuned, None).used is finetuned
    worse = replace(finetuned, check=AdaptationCheck(pretrained=0.30, finetuned=0.25, negatives=120, tracks=60, crops=240))
    assert worse.steps_aside.startswith("the finetuned model separates this movie's people no better")
    assert Adaptation(worse, None).used is None and Adaptation(None, "turned off").used is None


def test_sface_is_not_finetuned_on_a_cpu(data):
    import vcn
    from vcn.identity.backbone import NOT_FINETUNED_ON_CPU
    from vcn.pipeline import ChipArray, adapt

    sface = vcn.load_backbone("sface", device="cpu")
    chips = np.zeros((4, 112, 112, 3), np.uint8)
    adaptation = adapt(sface, ChipArray(chips, np.array([0, 0, 1, 1])), 2)
    assert adaptation.model is None and adaptation.skipped == f"not finetuned on a CPU: {NOT_FINETUNED_ON_CPU['sface']}"


def test_checkpoint_round_trip(finetuned, backbone, data, tmp_path):
    path = finetuned.save(tmp_path / "movie" / "model.safetensors")
    loaded = load_finetuned(path, backbone)
    assert loaded.version == finetuned.version and loaded.mode == finetuned.mode
    assert loaded.history == finetuned.history and loaded.collapse == finetuned.collapse
    assert loaded.check == finetuned.check and loaded.steps_aside == finetuned.steps_aside
    assert np.array_equal(loaded.logits(data[0]), finetuned.logits(data[0]))
    assert np.array_equal(loaded.backbone.embed(data[0]), finetuned.backbone.embed(data[0]))
    metric = loaded.loss_dissimilarity()
    assert metric.teacher_temperature == finetuned.teacher_temperature
    assert not list(tmp_path.rglob("*.partial*"))


def test_checkpoint_of_another_base_model_is_refused(finetuned, backbone, tmp_path):
    path = finetuned.save(tmp_path / "model.safetensors")
    import copy

    other = copy.copy(backbone)
    other.version = "dlib-resnet-v1-000000000000"
    with pytest.raises(FinetuneError, match="finetuned from"):
        load_finetuned(path, other)


def test_foreign_or_missing_checkpoint_is_refused(backbone, tmp_path):
    with pytest.raises(FinetuneError, match="no finetuned checkpoint"):
        load_finetuned(tmp_path / "absent.safetensors", backbone)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(FinetuneError, match="not a readable"):
        load_finetuned(junk, backbone)


def test_onnx_backbone_cannot_be_finetuned(data):
    class Runner:
        name = "onnx"
        module = None
        device = "cpu"

    with pytest.raises(ValueError, match="no torch module"):
        finetune_movie(Runner(), data[0], data[1], 4, mode=TINY)


def test_collapse_check_verdicts():
    from vcn_assets.checks import collapse_verdict

    stats = collapse_stats(9.69, 16384, np.eye(4), np.eye(4)).to_dict()
    passed, metadata = collapse_verdict({"enabled": True, "collapse": stats, "collapse_problems": ["loss stuck"]})
    assert not passed and metadata["problems"] == "loss stuck" and metadata["loss_ratio"] > 0.99
    assert collapse_verdict({"enabled": True, "collapse": stats, "collapse_problems": []})[0]
    assert not collapse_verdict({"enabled": True})[0]  # finetuned without diagnostics: not trusted
    passed, metadata = collapse_verdict({"enabled": False, "reason": "turned off"})
    assert passed and metadata == {"finetuned": False, "reason": "turned off"}
