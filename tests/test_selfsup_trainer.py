"""Tests of one self-distillation finetuning round on the real dlib backbone (CPU, small).

32 random chips in 4 tracks, K = 256, batches of 16 pairs, 32 pairs per epoch: each
round is a few optimiser steps, enough to check what moves, what stays, and that a
seed fixes everything.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vcn.identity.models.dlib_resnet import DlibResNet
from vcn.identity.selfsup import trainer as trainer_module
from vcn.identity.selfsup.trainer import (
    TrainConfig,
    backbone_part,
    train_round,
)

CONFIG = TrainConfig(
    seed=3, epochs_head_only=1, epochs_joint=1, batch_size=16, pairs_per_epoch=32, out_dim=256, trainable="last_stage",
    lr_backbone=1e-4,
)


def _in_last_stage(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in DlibResNet.last_stage_prefixes)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    # Smooth random "faces": a coarse random image upsampled, so the chips have structure.
    coarse = rng.integers(0, 256, (32, 15, 15, 3), dtype=np.uint8)
    chips = np.repeat(np.repeat(coarse, 10, axis=1), 10, axis=2)
    return np.ascontiguousarray(chips), np.repeat(np.arange(4), 8)


@pytest.fixture(scope="module")
def original(backbone) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in backbone.module.state_dict().items()}


@pytest.fixture(scope="module")
def result(backbone, data, original):
    chips, tracks = data
    seen = []
    out = train_round(backbone, chips, tracks, None, CONFIG, progress=lambda e, n, loss: seen.append((e, n, loss)))
    out.progress_calls = seen
    return out


def test_loss_curve_is_finite_and_reported(result):
    assert len(result.loss_curve) == 2
    assert all(math.isfinite(v) and v > 0 for v in result.loss_curve)
    assert [(e, n) for e, n, _ in result.progress_calls] == [(0, 2), (1, 2)]
    assert result.pairs_per_second > 0 and result.seconds > 0
    assert result.device == "cpu"
    assert result.center.shape == (256,) and torch.isfinite(result.center).all()


def test_joint_epochs_change_only_the_last_stage(result, original):
    trained = {n.removeprefix("backbone.") for n in result.trained_parameters if n.startswith("backbone.")}
    assert trained and all(_in_last_stage(n) for n in trained)
    assert any(n.startswith("head.") for n in result.trained_parameters)
    for name, value in result.backbone.state_dict().items():
        if name in trained:
            assert not torch.equal(value, original[name]), f"{name} did not train"
        else:
            assert torch.equal(value, original[name]), f"frozen {name} changed"


def test_callers_backbone_is_untouched(result, backbone, original):
    assert result.backbone is not backbone.module
    for name, value in backbone.module.state_dict().items():
        assert torch.equal(value, original[name]), name
    assert not backbone.module.training


def test_teacher_is_a_close_but_distinct_average(result, original):
    student = dict(result.backbone.named_parameters()) | {f"head.{k}": v for k, v in result.head.named_parameters()}
    teacher = dict(result.teacher.backbone.named_parameters()) | {
        f"head.{k}": v for k, v in result.teacher.head.named_parameters()
    }
    differs = [n for n in student if not torch.equal(student[n], teacher[n])]
    assert any(n.startswith("head.") for n in differs)
    assert any(n.startswith("blocks.") for n in differs)
    flat = lambda params, names: torch.cat([params[n].flatten() for n in names])  # noqa: E731
    s, t = flat(student, student), flat(teacher, student)
    assert (s - t).norm() / s.norm() < 0.05
    # The teacher lags: an average of past students has moved less from the pretrained weights.
    trained = [n for n in differs if not n.startswith("head.")]
    start = torch.cat([original[n].flatten() for n in trained])
    assert (flat(teacher, trained) - start).norm() < (flat(student, trained) - start).norm()


def test_head_only_epochs_leave_the_backbone_unchanged(backbone, data, original):
    chips, tracks = data
    config = CONFIG.model_copy(update={"epochs_joint": 0, "pairs_per_epoch": 16})
    out = train_round(backbone, chips, tracks, None, config)
    assert all(n.startswith("head.") for n in out.trained_parameters)
    for name, value in out.backbone.state_dict().items():
        assert torch.equal(value, original[name]), name
    for name, value in out.teacher.backbone.state_dict().items():
        assert torch.equal(value, original[name]), name


def test_same_seed_same_round(backbone, data, result):
    chips, tracks = data
    again = train_round(backbone, chips, tracks, None, CONFIG)
    assert again.loss_curve == result.loss_curve
    for (name, a), b in zip(again.backbone.state_dict().items(), result.backbone.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_matches_are_accepted(backbone, data):
    chips, tracks = data
    config = CONFIG.model_copy(update={"epochs_head_only": 1, "epochs_joint": 0, "pairs_per_epoch": 16})
    out = train_round(backbone, chips, tracks, {0: [1], 1: [0]}, config)
    assert len(out.loss_curve) == 1 and math.isfinite(out.loss_curve[0])


def test_non_finite_loss_names_epoch_and_step(backbone, data, monkeypatch):
    chips, tracks = data

    def nan_loss(self, student_logits, teacher_logits, epoch):
        return student_logits[0].sum() * float("nan")

    monkeypatch.setattr(trainer_module.SelfDistillationLoss, "forward", nan_loss)
    with pytest.raises(FloatingPointError, match=r"epoch 0, step 0"):
        train_round(backbone, chips, tracks, None, CONFIG)


def test_bad_inputs_are_rejected(backbone, data):
    chips, tracks = data
    with pytest.raises(ValueError, match="uint8"):
        train_round(backbone, chips.astype(np.float32), tracks, None, CONFIG)
    with pytest.raises(ValueError, match="one track id per chip"):
        train_round(backbone, chips, tracks[:-1], None, CONFIG)


def test_backbone_parts(backbone):
    from vcn.identity.models.iresnet import create_iresnet

    module = backbone.module
    assert backbone_part(module, "none") == []
    assert backbone_part(module, "all") == [n for n, _ in module.named_parameters()]
    last = backbone_part(module, "last_stage")
    assert "fc.weight" in last and "blocks.12.conv1.weight" in last and "blocks.9.conv1.weight" in last
    assert "blocks.8.conv1.weight" not in last and "stem_conv.weight" not in last
    iresnet_last = backbone_part(create_iresnet("iresnet18"), "last_stage")
    assert {n.split(".")[0] for n in iresnet_last} == {"layer4", "bn2", "fc", "features"}
    assert "features.weight" not in iresnet_last  # InsightFace keeps that scale frozen at 1
    with pytest.raises(ValueError, match="no known last stage"):
        backbone_part(torch.nn.Linear(2, 2), "last_stage")
