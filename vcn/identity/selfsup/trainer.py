"""One round of self-distillation finetuning of a face-ID backbone on one movie's crops.

The student is the backbone plus a fresh :class:`~vcn.identity.selfsup.head.ProjectionHead`;
the teacher is its exponential moving average (:mod:`vcn.identity.selfsup.ema`). Every step
takes a batch of positive pairs (:class:`~vcn.identity.selfsup.pairs.PairSampler`), makes one
augmented view of each side (:class:`~vcn.identity.selfsup.augment.FaceAugment`), and trains
the student to predict the teacher's centred, sharpened targets across the two views
(:class:`~vcn.identity.selfsup.loss.SelfDistillationLoss`). The first epochs train the head
alone on a frozen backbone, so that a random head does not push large gradients into
the pretrained weights; the remaining epochs train the head and a chosen part of the
backbone together (DESIGN.md section 2).

Progressive rounds (matching tracks between rounds) call :func:`train_round` once per
round with the round's matches.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from vcn.batching import AdaptiveBatch, map_batches
from vcn.identity.selfsup.augment import FaceAugment
from vcn.identity.selfsup.bank import (
    ViewBank,
    bank_crops,
    build_view_bank,
    tail_outputs,
    trunk_bytes_per_view,
)
from vcn.identity.selfsup.ema import make_teacher, momentum_schedule, update_teacher
from vcn.identity.selfsup.head import ProjectionHead
from vcn.identity.selfsup.loss import SelfDistillationLoss
from vcn.identity.selfsup.pairs import PairSampler

if TYPE_CHECKING:
    from vcn.identity.backbone import Backbone

log = logging.getLogger(__name__)

TrainablePart = Literal["none", "last_stage", "all"]


class TrainConfig(BaseModel):
    """Settings of one finetuning round.

    The defaults are our CPU-friendly reading of the paper (DESIGN.md section 2):
    a short per-movie run, head first, then the head with the backbone's last stage.
    On a GPU, ``trainable="all"`` and more epochs are affordable.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = Field(0, description="Seed of the head's initialisation, the pair sampler and the augmentations.")
    epochs_head_only: int = Field(
        1, ge=0, description="Epochs training the head alone on the frozen backbone, first (a random head's "
        "gradients would otherwise disturb the pretrained weights)."
    )
    epochs_joint: int = Field(
        2, ge=0, description="Epochs then training the head and the backbone's `trainable` part together."
    )
    pairs_per_epoch: int | None = Field(
        None, ge=1, description="Positive pairs per epoch; None: one per crop, so each crop is seen about twice."
    )
    batch_size: int = Field(
        64, ge=1, description="Pairs per optimiser step (two views each, through student and teacher). A step "
        "that runs out of GPU memory runs in smaller forward passes whose gradients add up to the same step."
    )
    lr_head: float = Field(1e-3, gt=0, description="AdamW learning rate of the projection head (fresh weights).")
    lr_backbone: float = Field(
        1e-5, gt=0, description="AdamW learning rate of the trainable backbone part: small, the weights are pretrained."
    )
    weight_decay: float = Field(
        0.04, ge=0, description="AdamW weight decay (DINO's starting value); biases and norm scales are not decayed."
    )
    out_dim: int = Field(
        16384, ge=1, description="K, the number of head prototypes (8192-65536 in the paper; 16384 is ample for a "
        "movie's cast and cheap on CPU)."
    )
    trainable: TrainablePart = Field(
        "last_stage", description="Backbone part trained in the joint epochs: 'none' (head only throughout), "
        "'last_stage' (the architecture's last_stage_prefixes) or 'all'. Parameters the model itself freezes stay frozen."
    )
    teacher_momentum: float = Field(
        0.996, ge=0, le=1, description="EMA momentum of the teacher at the first step; it rises on a cosine to 1."
    )
    student_temperature: float = Field(0.1, gt=0, description="tau_s of the loss (DINO, the paper).")
    teacher_temperature: float = Field(0.04, gt=0, description="tau_t of the loss (DINO, the paper); keep <= 0.07.")
    match_fraction: float = Field(
        0.5, ge=0, le=1, description="Share of pairs from a track with matches that take their second crop from a "
        "matched track (PairSampler)."
    )
    view_bank: int = Field(
        0, ge=0, description="0: augment every pair afresh and run the whole backbone (the paper's way, for GPUs). "
        "V > 0: run the frozen trunk once over V views of each crop (the chip, its mirror, V - 2 random "
        "augmentations) and train the last stage and head on those features (vcn.identity.selfsup.bank); needs "
        "trainable 'none' or 'last_stage', and is ~5x faster on a CPU."
    )
    max_bank_bytes: int = Field(
        2 * 2**30, ge=1, description="Memory budget of the view bank; a movie whose crops do not fit banks an even "
        "subset of each long track's crops."
    )
    device: str | None = Field(None, description="Compute device ('cpu', 'cuda', 'cuda:1'); None: the backbone's.")

    @model_validator(mode="after")
    def _bank_needs_frozen_trunk(self) -> TrainConfig:
        if self.view_bank and self.trainable == "all":
            raise ValueError("view_bank > 0 keeps the trunk frozen; use trainable 'none' or 'last_stage'")
        return self


@dataclass
class TrainResult:
    """What a round of finetuning produced.

    Attributes:
        backbone: The finetuned student backbone (a copy; the caller's is untouched),
            in eval mode, on ``device``.
        head: The student's projection head, in eval mode.
        teacher: The EMA teacher, a module with ``.backbone`` and ``.head``, in eval mode.
        center: (K,) centre of the teacher logits at the end, for the loss metric.
        loss_curve: Mean loss of each epoch, head-only epochs first.
        pairs_per_second: Training throughput over the whole round.
        seconds: Wall time of the round's training steps.
        bank_seconds: Wall time of building the view bank (0 without one).
        device: Where it ran.
        trained_parameters: Names (``backbone.*``, ``head.*``) of the student
            parameters that the joint epochs trained.
        config: The settings used.
    """

    backbone: nn.Module
    head: ProjectionHead
    teacher: nn.Module
    center: torch.Tensor
    loss_curve: list[float]
    pairs_per_second: float
    seconds: float
    device: str
    trained_parameters: list[str]
    config: TrainConfig
    bank_seconds: float = 0.0


class Tail(nn.Module):
    """The part of a backbone after its trunk (``forward_tail``), for training on banked trunk features.

    It holds the whole backbone, so its parameter names are the backbone's with a
    ``module.`` prefix, and the backbone it finetunes is :attr:`module`.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, trunk: torch.Tensor) -> torch.Tensor:
        return self.module.forward_tail(trunk)


class Student(nn.Module):
    """Backbone then projection head: chips (preprocessed) in, K logits out."""

    def __init__(self, backbone: nn.Module, head: ProjectionHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def backbone_part(module: nn.Module, part: TrainablePart) -> list[str]:
    """Names of the parameters of ``module`` in ``part`` that the model leaves trainable.

    Raises:
        ValueError: For an unknown part, or 'last_stage' on an architecture without a
            known last stage.
    """
    names = [name for name, p in module.named_parameters() if p.requires_grad]
    if part == "none":
        return []
    if part == "all":
        return names
    if part != "last_stage":
        raise ValueError(f"trainable part must be 'none', 'last_stage' or 'all', got {part!r}")
    prefixes = getattr(module, "last_stage_prefixes", None)
    if prefixes is None:
        raise ValueError(
            f"no known last stage for {type(module).__name__}; use trainable='all' or 'none', "
            "or give the architecture its last_stage_prefixes (vcn.identity.models.split.SplitNetwork)"
        )
    return [n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)]


def prepare_bank(
    backbone: Backbone,
    chips: np.ndarray,
    crop_track: np.ndarray,
    config: TrainConfig,
    module: nn.Module | None = None,
) -> ViewBank:
    """The view bank ``config`` asks for: ``config.view_bank`` views of the crops that fit its budget.

    Args:
        module: The model whose trunk to run; default ``backbone.module``.
    """
    module = module if module is not None else backbone.module
    device = torch.device(config.device or backbone.device)
    per_view = trunk_bytes_per_view(backbone, module)
    banked = bank_crops(crop_track, config.view_bank, per_view, config.max_bank_bytes)
    return build_view_bank(
        backbone, module, chips, n_views=config.view_bank, seed=config.seed, device=device, crops=banked
    )


def _param_groups(named: Sequence[tuple[str, nn.Parameter]], lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: weights decayed, biases and per-channel scales (1-d) not (DINO)."""
    decay = [p for _, p in named if p.ndim > 1]
    no_decay = [p for _, p in named if p.ndim <= 1]
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def train_round(
    backbone: Backbone,
    chips: np.ndarray,
    crop_track: np.ndarray,
    matches: Mapping[int, Sequence[int]] | None = None,
    config: TrainConfig | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    bank: ViewBank | None = None,
) -> TrainResult:
    """Finetune a copy of ``backbone`` by self-distillation on one movie's crops.

    Args:
        backbone: A :class:`vcn.identity.backbone.Backbone` with a torch module; its module is
            deep-copied, never modified.
        chips: (N, S, S, 3) uint8 RGB chips aligned for the backbone (S = input_size).
        crop_track: (N,) integer track id of each chip.
        matches: Track id to matched track ids (later rounds), or None (round 1).
        config: Settings; :class:`TrainConfig` defaults if None.
        progress: Called after each epoch with (epoch, number of epochs, mean loss).
        bank: With ``config.view_bank``, a bank built earlier from the same trunk
            (:func:`prepare_bank`; progressive rounds reuse one, as the trunk never
            trains in this mode); built here when None.

    Returns:
        The finetuned student, teacher and the round's statistics.

    Raises:
        ValueError: On chips or tracks of the wrong shape or type, a backbone without a
            torch module, or a trainable part that leaves nothing to train.
        FloatingPointError: If the loss is not finite, naming the epoch and step.
    """
    config = config or TrainConfig()
    if getattr(backbone, "module", None) is None:
        raise ValueError(f"backbone {backbone!r} has no torch module to finetune")
    size = backbone.input_size
    if not (isinstance(chips, np.ndarray) and chips.dtype == np.uint8 and chips.shape[1:] == (size, size, 3)):
        shape = getattr(chips, "shape", None)
        raise ValueError(f"chips must be a uint8 array of shape (N, {size}, {size}, 3), got {shape}")
    crop_track = np.asarray(crop_track)
    if crop_track.shape != (len(chips),):
        raise ValueError(f"crop_track must hold one track id per chip ({len(chips)}), got shape {crop_track.shape}")

    device = torch.device(config.device or backbone.device)
    use_bf16 = device.type == "cuda"

    # Student: a copy of the backbone plus a seeded, fresh head; teacher: its copy.
    head_generator = torch.Generator().manual_seed(config.seed)
    head = ProjectionHead(backbone.dim, out_dim=config.out_dim, generator=head_generator)
    module = copy.deepcopy(backbone.module).to(device)
    joint_names = backbone_part(module, config.trainable)
    if config.trainable != "none" and not joint_names:
        raise ValueError(f"trainable={config.trainable!r} leaves no backbone parameter to train")
    joint = set(joint_names)
    backbone_params = [(n, p) for n, p in module.named_parameters() if n in joint]
    view_generator = torch.Generator().manual_seed(config.seed)
    bank_seconds = 0.0
    if config.view_bank:
        # The trunk stays frozen: run it once over V views of each crop, train on its output.
        if bank is None:
            started = time.perf_counter()
            bank = prepare_bank(backbone, chips, crop_track, config, module=module)
            bank_seconds = time.perf_counter() - started
        elif bank.n_views != config.view_bank or bank.crops.max(initial=-1) >= len(chips):
            raise ValueError(f"the view bank ({bank.n_views} views) does not fit these chips and settings")
        crop_track = crop_track[bank.crops]
        student = Student(Tail(module), head).to(device)
        outputs = tail_outputs(module, bank)
    else:
        bank = None
        student = Student(module, head).to(device)
        sample = np.unique(np.linspace(0, len(chips) - 1, min(len(chips), 2048)).astype(np.int64))
        with torch.inference_mode():
            outputs = torch.cat(map_batches(
                lambda rows: module(backbone.preprocess(torch.from_numpy(chips[rows]).to(device)
                                                        .permute(0, 3, 1, 2).float())),
                sample, 256, "finetuning: embedding the movie's crops",
            ))
    # Centre the head's input on the movie's mean backbone output (see ProjectionHead).
    head.input_center.copy_(outputs.float().mean(dim=0))
    head_params = [(n, p) for n, p in student.head.named_parameters() if p.requires_grad]
    student.backbone.requires_grad_(False)
    # Batch norms keep their running statistics throughout: a movie's small batches
    # would drift them from the pretrained ones. Their scales and shifts still train.
    student.backbone.eval()
    student.head.train()
    teacher = make_teacher(student).eval()

    criterion = SelfDistillationLoss(
        config.out_dim,
        student_temperature=config.student_temperature,
        teacher_temperature=config.teacher_temperature,
    ).to(device)
    optimizer = torch.optim.AdamW(
        _param_groups(head_params, config.lr_head, config.weight_decay)
        + _param_groups(backbone_params, config.lr_backbone, config.weight_decay)
    )
    sampler = PairSampler(crop_track, matches, seed=config.seed, match_fraction=config.match_fraction)
    augment = FaceAugment()

    n_pairs = config.pairs_per_epoch or sampler.n_crops
    steps_per_epoch = math.ceil(n_pairs / config.batch_size)
    epochs = config.epochs_head_only + config.epochs_joint
    momenta = momentum_schedule(max(1, epochs * steps_per_epoch), base=config.teacher_momentum)

    def views(batch: np.ndarray) -> torch.Tensor:
        """The student's input for both sides of a batch of pairs, first sides then second sides."""
        if bank is not None:
            return bank.draw(batch, view_generator, device)
        x = torch.from_numpy(chips[np.concatenate([batch[:, 0], batch[:, 1]])]).to(device).permute(0, 3, 1, 2)
        return backbone.preprocess(augment(x.float(), view_generator))

    # Pairs per forward pass: the whole batch, fewer if it runs out of device memory.
    micro_batch = AdaptiveBatch(config.batch_size, f"finetuning {backbone.name}")

    def accumulate(x: torch.Tensor, center: torch.Tensor, epoch: int, backbone_frozen: bool, size: int) -> float:
        """The gradients of one step's loss over ``x`` (both views of B pairs), ``size`` pairs at a time.

        The batch loss is the mean over its pairs, so it is the size-weighted mean
        of the micro-batches' losses and its gradient the sum of theirs: the step
        is the same, up to round-off, however the batch is split. Every
        micro-batch is scored against the step's ``center``, which then moves
        once on the teacher logits of the whole batch.

        Returns:
            The batch loss.

        Raises:
            FloatingPointError: If a loss is not finite.
        """
        optimizer.zero_grad(set_to_none=True)
        first, second = x.chunk(2)
        n_pairs = len(first)
        total = 0.0
        teacher_sides: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for start in range(0, n_pairs, size):
            part = torch.cat([first[start : start + size], second[start : start + size]])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                if backbone_frozen:
                    # The teacher's backbone is the student's while the backbone is frozen
                    # (only the heads are averaged then): embed once, for both heads.
                    with torch.no_grad():
                        features = student.backbone(part)
                    student_logits = student.head(features)
                    with torch.no_grad():
                        teacher_logits = teacher.head(features)
                else:
                    student_logits = student(part)
                    with torch.no_grad():
                        teacher_logits = teacher(part)
            criterion.center.copy_(center)
            loss = criterion(student_logits.chunk(2), teacher_logits.chunk(2), epoch)
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(f"self-distillation loss is {loss.item()}")
            weight = len(part) / len(x)
            (loss * weight).backward()
            total += loss.item() * weight
            for side, logits in zip(teacher_sides, teacher_logits.detach().chunk(2)):
                side.append(logits)
        criterion.center.copy_(center)
        criterion.update_center([torch.cat(side) for side in teacher_sides])
        return total

    log.info(
        "finetuning %s on %d crops of %d tracks (%d matched) on %s: %d head-only + %d joint epochs of %d steps, "
        "trainable %r (%d backbone tensors)",
        backbone.name,
        sampler.n_crops, sampler.n_tracks, sampler.n_matched_tracks, device, config.epochs_head_only,
        config.epochs_joint, steps_per_epoch, config.trainable, len(backbone_params),
    )
    loss_curve: list[float] = []
    step = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        backbone_frozen = epoch < config.epochs_head_only or not backbone_params
        if epoch == config.epochs_head_only:
            for _, p in backbone_params:
                p.requires_grad_(True)
        pairs = sampler.epoch(n_pairs)
        losses = []
        for batch_step in range(steps_per_epoch):
            batch = pairs[batch_step * config.batch_size : (batch_step + 1) * config.batch_size]
            # Two views: an augmented copy of each side of every pair.
            x = views(batch)
            center = criterion.center.clone()
            try:
                loss = micro_batch.run(lambda size: accumulate(x, center, epoch, backbone_frozen, size))
            except FloatingPointError as error:
                raise FloatingPointError(f"epoch {epoch}, step {batch_step}: {error}") from error

            # Student step, then the teacher follows it.
            optimizer.step()
            update_teacher(
                student.head if backbone_frozen else student,
                teacher.head if backbone_frozen else teacher,
                float(momenta[step]),
            )
            losses.append(loss)
            step += 1
        loss_curve.append(float(np.mean(losses)))
        phase = "head" if backbone_frozen else "joint"
        log.info("epoch %d/%d (%s): loss %.4f", epoch + 1, epochs, phase, loss_curve[-1])
        if progress is not None:
            progress(epoch, epochs, loss_curve[-1])
    seconds = time.perf_counter() - start

    student.requires_grad_(False)
    student.eval()
    trained = [f"head.{n}" for n, _ in head_params]
    if config.epochs_joint:
        trained = [f"backbone.{n}" for n, _ in backbone_params] + trained
    return TrainResult(
        backbone=module,
        head=student.head,
        teacher=teacher,
        center=criterion.center.detach().clone(),
        loss_curve=loss_curve,
        pairs_per_second=epochs * n_pairs / seconds if seconds > 0 else float("inf"),
        seconds=seconds,
        device=str(device),
        trained_parameters=trained,
        config=config,
        bank_seconds=bank_seconds,
    )
