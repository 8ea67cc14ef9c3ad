"""Adapting the backbone to one movie as the product runs it: compute mode, checkpoint, collapse checks.

:func:`finetune_movie` picks how to train from where it runs (:func:`compute_mode`),
runs the progressive rounds (:func:`vcn.identity.selfsup.adapt.adapt`) and returns a
:class:`FinetunedModel`: the finetuned backbone (ready to embed, with its own
version for lineage), the projection head and centre that define the loss
metric, what was done and how it went (settings, and a :class:`FinetuneHistory` of
loss curves and throughput) and the collapse diagnostics (:class:`CollapseStats`). :meth:`FinetunedModel.save`
writes it as one safetensors file; :func:`load_finetuned` reads it back on top
of the base backbone it was trained from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vcn.batching import map_batches
from vcn.errors import VcnError
from vcn.identity.selfsup.adapt import (
    MAX_CROPS,
    AdaptConfig,
    AdaptResult,
    AdaptRound,
    adapt,
    with_module,
)
from vcn.identity.selfsup.sampling import spread_crops
from vcn.identity.selfsup.separation import AdaptationCheck, check_adaptation
from vcn.identity.selfsup.trainer import TrainConfig

if TYPE_CHECKING:
    import torch

    from vcn.identity.backbone import Backbone
    from vcn.identity.selfsup.head import ProjectionHead
    from vcn.identity.selfsup.loss_metric import LossDivergence

log = logging.getLogger(__name__)

#: Format tag of finetuned checkpoints; bump it if their layout changes.
CHECKPOINT_FORMAT = "vcn-finetuned-1"

#: Pairs per epoch on a CPU at most: with the view bank (~190 pairs/s in head-only
#: epochs, ~70 in joint ones on 2 cores for dlib's ResNet) two rounds of one
#: head-only and two joint epochs take ~9 minutes, so that a 600-track episode
#: (~6,800 crops) stays under 15 minutes end to end.
CPU_PAIRS_PER_EPOCH = 8192

#: A loss above this share of ln K means the student still predicts a uniform
#: distribution: training never left its starting point, or collapsed to uniform.
STUCK_LOSS_RATIO = 0.98
#: The stuck-loss rule judges only runs of at least this many optimizer steps: before that the
#: loss has not had the steps to leave ln K, healthy or not (a 10-second clip trains 6 steps and
#: ends at 0.966-0.985 ln K across seeds; a 600-track episode's first epoch, 106 steps, averages 0.74).
MIN_STEPS_TO_JUDGE_LOSS = 50
#: The finetuned embeddings count as collapsed when their total variance or their
#: effective rank falls below this share of the pretrained model's on the same crops.
COLLAPSE_RATIO = 0.5


class FinetuneError(VcnError):
    """A finetuned checkpoint that cannot be used (wrong file, other base model)."""


@dataclass(frozen=True)
class ComputeMode:
    """How a movie is finetuned where it runs.

    Attributes:
        name: ``"cuda-full"`` or ``"cpu-budget"``.
        config: The settings of the progressive rounds.
        description: One line for logs and metadata.
    """

    name: str
    config: AdaptConfig
    description: str


def compute_mode(device: str, n_crops: int, seed: int = 0) -> ComputeMode:
    """The finetuning settings for ``device`` (chosen automatically; logged and stored by callers).

    * CUDA: the paper's way: the whole backbone trains, every pair freshly
      augmented, bf16 autocast, up to 3 rounds of 1 head-only and 4 joint epochs.
    * CPU: a budget: the trunk stays frozen and is run once over 4 views of each
      crop (:mod:`vcn.identity.selfsup.bank`); the last stage and the head train, up to 2
      rounds of 1 head-only and 2 joint epochs of at most
      :data:`CPU_PAIRS_PER_EPOCH` pairs.

    Both train on at most :data:`~vcn.identity.selfsup.adapt.MAX_CROPS` of the movie's
    crops (an even subset of each track's beyond), so that memory stays bounded.
    """
    if str(device).startswith("cuda"):
        config = AdaptConfig(
            max_rounds=3,
            train=TrainConfig(
                seed=seed, trainable="all", view_bank=0, epochs_head_only=1, epochs_joint=4, batch_size=256,
                device=str(device),
            ),
        )
        return ComputeMode("cuda-full", config, "CUDA: whole backbone and head, bf16, up to 3 rounds of 1+4 epochs")
    pairs = max(1, min(int(n_crops), CPU_PAIRS_PER_EPOCH))
    config = AdaptConfig(
        max_rounds=2,
        train=TrainConfig(
            seed=seed, trainable="last_stage", view_bank=4, epochs_head_only=1, epochs_joint=2, batch_size=64,
            pairs_per_epoch=pairs, device=str(device),
        ),
    )
    return ComputeMode(
        "cpu-budget",
        config,
        f"CPU budget: frozen trunk over a bank of 4 views per crop, last stage and head trained, up to 2 rounds "
        f"of 1+2 epochs of {pairs} pairs",
    )


@dataclass(frozen=True)
class CollapseStats:
    """Whether self-distillation collapsed, from the loss and the embeddings.

    Attributes:
        final_loss: Mean loss of the last epoch.
        ln_k: ln K, the loss of a uniform prediction over K prototypes.
        embedding_variance: Total variance of the finetuned unit embeddings of
            the movie's crops (1 - |mean|^2; 0 when all are one point).
        pretrained_variance: The same of the pretrained embeddings.
        effective_rank: exp of the entropy of the normalised singular values of
            the centred finetuned embeddings (1 when they lie on a line).
        pretrained_effective_rank: The same of the pretrained embeddings.
        steps: Optimizer steps of the run (None: not recorded, as in older checkpoints).
    """

    final_loss: float
    ln_k: float
    embedding_variance: float
    pretrained_variance: float
    effective_rank: float
    pretrained_effective_rank: float
    steps: int | None = None

    @property
    def loss_ratio(self) -> float:
        return self.final_loss / self.ln_k

    def problems(self) -> list[str]:
        """What looks collapsed, in words; empty when nothing does."""
        found = []
        judged = self.steps is None or self.steps >= MIN_STEPS_TO_JUDGE_LOSS
        if not math.isfinite(self.final_loss) or (judged and self.loss_ratio >= STUCK_LOSS_RATIO):
            found.append(
                f"loss {self.final_loss:.3f} is stuck near ln K = {self.ln_k:.3f} (ratio {self.loss_ratio:.3f} >= "
                f"{STUCK_LOSS_RATIO}): the student predicts a uniform distribution"
            )
        if self.embedding_variance < COLLAPSE_RATIO * self.pretrained_variance:
            found.append(
                f"embedding variance {self.embedding_variance:.4f} fell below {COLLAPSE_RATIO} x the pretrained "
                f"model's {self.pretrained_variance:.4f}"
            )
        if self.effective_rank < COLLAPSE_RATIO * self.pretrained_effective_rank:
            found.append(
                f"effective rank {self.effective_rank:.1f} fell below {COLLAPSE_RATIO} x the pretrained model's "
                f"{self.pretrained_effective_rank:.1f}"
            )
        return found

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "loss_ratio": self.loss_ratio}


def embedding_spread(embeddings: np.ndarray) -> tuple[float, float]:
    """(total variance, effective rank) of unit embeddings (rows); (0, 0) for fewer than two."""
    x = np.asarray(embeddings, dtype=np.float64)
    if len(x) < 2:
        return 0.0, 0.0
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    centred = x - x.mean(axis=0)
    variance = float((centred**2).sum(axis=1).mean())
    singular = np.linalg.svd(centred, compute_uv=False)
    total = singular.sum()
    if total <= 0:
        return variance, 0.0
    p = singular / total
    p = p[p > 0]
    return variance, float(np.exp(-(p * np.log(p)).sum()))


def collapse_stats(
    final_loss: float, out_dim: int, finetuned: np.ndarray, pretrained: np.ndarray, steps: int | None = None
) -> CollapseStats:
    """:class:`CollapseStats` of a finetuning run from its last loss, its optimizer steps and both models'
    embeddings of the same crops."""
    variance, rank = embedding_spread(finetuned)
    base_variance, base_rank = embedding_spread(pretrained)
    return CollapseStats(
        final_loss=float(final_loss),
        ln_k=math.log(out_dim),
        embedding_variance=variance,
        pretrained_variance=base_variance,
        effective_rank=rank,
        pretrained_effective_rank=base_rank,
        steps=steps,
    )


@dataclass(frozen=True)
class FinetuneHistory:
    """What a finetuning run did and how fast, as stored with its checkpoint.

    Attributes:
        rounds: One entry per progressive round (loss curve, matches, precision, seconds, pairs/s).
        stopped: Why the rounds ended: ``"stable"`` (matches unchanged) or ``"max_rounds"``.
        n_matches: Track pairs matched in the last matching.
        crops: Crops the rounds trained on.
        bank_seconds: Wall time of building the view bank (0 without one).
        seconds: Wall time of the whole adaptation.
        pairs_per_second: Mean training throughput over the rounds.
        device: Where it trained.
    """

    rounds: tuple[AdaptRound, ...]
    stopped: str
    n_matches: int
    crops: int
    bank_seconds: float
    seconds: float
    pairs_per_second: float
    device: str

    @property
    def loss_curve(self) -> list[float]:
        """Mean loss of every epoch, all rounds in order."""
        return [loss for r in self.rounds for loss in r.loss_curve]

    def to_dict(self) -> dict:
        """Plain JSON-ready form, the layout of the checkpoint's ``history`` metadata."""
        return {**asdict(self), "rounds": [asdict(r) for r in self.rounds]}

    @classmethod
    def from_dict(cls, data: dict) -> FinetuneHistory:
        """The inverse of :meth:`to_dict`."""
        return cls(**{**data, "rounds": tuple(AdaptRound(**r) for r in data["rounds"])})


@dataclass(eq=False)
class FinetunedModel:
    """A backbone adapted to one movie, with the head and centre of its loss metric.

    Attributes:
        backbone: The finetuned backbone, ready to embed (its own :attr:`version`).
        head: The student's projection head (eval mode, on the CPU).
        center: (K,) centre of the teacher logits at the end of training.
        student_temperature: tau_s of training.
        teacher_temperature: Final tau_t of training.
        base_version: Version of the pretrained backbone it started from.
        version: ``<base version>-ft-<first 12 hex of the sha256 of its weights>``.
        mode: Name of the :class:`ComputeMode`.
        settings: The :class:`~vcn.identity.selfsup.adapt.AdaptConfig` used, as a dict.
        history: What the rounds did and how fast; None for a model assembled by hand, not trained.
        collapse: Collapse diagnostics, when computed.
        check: The label-free comparison with the pretrained model on the same crops
            (:mod:`vcn.identity.selfsup.separation`), when computed.
    """

    backbone: Backbone
    head: ProjectionHead
    center: np.ndarray
    student_temperature: float
    teacher_temperature: float
    base_version: str
    version: str
    mode: str
    settings: dict
    history: FinetuneHistory | None = None
    collapse: CollapseStats | None = None
    check: AdaptationCheck | None = None

    @property
    def steps_aside(self) -> str | None:
        """Why the movie is embedded by the pretrained model instead of this one; None when this one is used."""
        return None if self.check is None else self.check.reason()

    def loss_dissimilarity(self) -> LossDivergence:
        """The finetuned loss between sets of crops, for :func:`vcn.clustering.parameter_free.cluster_movie`."""
        from vcn.identity.selfsup.loss_metric import LossDivergence

        return LossDivergence(self.center, self.student_temperature, self.teacher_temperature)

    def logits(self, chips: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """(N, K) head logits of aligned chips through the finetuned student.

        ``batch_size`` chips per forward pass, halved and retried when a batch
        runs out of device memory (:mod:`vcn.batching`); the logits do not
        depend on it beyond round-off.

        Raises:
            ValueError: On chips that are not a 4-d uint8 RGB array, or ``batch_size`` < 1.
            FloatingPointError: If the model gives non-finite logits.
        """
        from vcn.identity.selfsup.loss_metric import crop_logits

        def forward(part: np.ndarray) -> np.ndarray:
            return crop_logits(
                self.backbone.module, self.head, self.backbone.preprocess, part, self.backbone.device, batch_size
            )

        batched = isinstance(chips, np.ndarray) and chips.ndim == 4
        parts = map_batches(forward, chips, batch_size, f"logits of {self.version}") if batched else []
        # No chips, or no array of chips: crop_logits gives the empty result or says what is wrong.
        return np.concatenate(parts) if parts else forward(chips)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the checkpoint (weights of backbone and head, centre, metadata) atomically."""
        import torch
        from safetensors.torch import save_file

        from vcn.stores.files import atomic_path

        path = Path(path)
        tensors = _state(self.backbone.module, self.head)
        tensors["center"] = torch.as_tensor(np.asarray(self.center, dtype=np.float32))
        metadata = {
            "format": CHECKPOINT_FORMAT,
            "version": self.version,
            "base_version": self.base_version,
            "backbone": self.backbone.name,
            "mode": self.mode,
            "head": json.dumps({"in_dim": self.head.in_dim, "out_dim": self.head.out_dim,
                                "hidden_dim": self.head.mlp[0].out_features,
                                "bottleneck_dim": self.head.mlp[-1].out_features}),
            "temperatures": json.dumps([self.student_temperature, self.teacher_temperature]),
            "settings": json.dumps(self.settings),
            "history": json.dumps(self.history.to_dict() if self.history else None),
            "collapse": json.dumps(self.collapse.to_dict() if self.collapse else None),
            "check": json.dumps(self.check.to_dict() if self.check else None),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".partial") as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path


def load_finetuned(path: str | os.PathLike[str], base: Backbone) -> FinetunedModel:
    """Read a checkpoint written by :meth:`FinetunedModel.save` onto its base backbone.

    Raises:
        FinetuneError: The file is missing, not a finetuned checkpoint, or was
            trained from another base model than ``base``.
    """
    from safetensors import safe_open

    from vcn.identity.selfsup.head import ProjectionHead

    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"{path}: no finetuned checkpoint there")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:  # safetensors raises its own types for a foreign or truncated file
        raise FinetuneError(f"{path}: not a readable safetensors file ({error})") from error
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise FinetuneError(f"{path}: not a finetuned checkpoint (format {metadata.get('format')!r})")
    if metadata["base_version"] != base.version:
        raise FinetuneError(
            f"{path} was finetuned from {metadata['base_version']}, not from the backbone given ({base.version})"
        )
    dims = json.loads(metadata["head"])
    head = ProjectionHead(dims["in_dim"], hidden_dim=dims["hidden_dim"], bottleneck_dim=dims["bottleneck_dim"],
                          out_dim=dims["out_dim"])
    tuned = with_module(base, base.module, metadata["version"])
    try:
        tuned.module.load_state_dict({k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")})
        head.load_state_dict({k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")})
    except RuntimeError as error:
        raise FinetuneError(f"{path}: weights do not fit {base.name}: {error}") from error
    student_t, teacher_t = json.loads(metadata["temperatures"])
    history = json.loads(metadata.get("history") or "null")
    collapse = json.loads(metadata.get("collapse") or "null")
    if collapse:
        collapse.pop("loss_ratio", None)
    check = json.loads(metadata.get("check") or "null")
    return FinetunedModel(
        backbone=tuned,
        head=head.eval(),
        center=tensors["center"].numpy().astype(np.float64),
        student_temperature=float(student_t),
        teacher_temperature=float(teacher_t),
        base_version=metadata["base_version"],
        version=metadata["version"],
        mode=metadata["mode"],
        settings=json.loads(metadata["settings"]),
        history=FinetuneHistory.from_dict(history) if history else None,
        collapse=CollapseStats(**collapse) if collapse else None,
        check=AdaptationCheck.from_dict(check) if check else None,
    )


def finetune_movie(
    backbone: Backbone,
    chips: np.ndarray,
    crop_track: np.ndarray,
    n_tracks: int,
    *,
    cannot_link: np.ndarray | Sequence[tuple[int, int]] | None = None,
    seed: int = 0,
    mode: ComputeMode | None = None,
    labels: Sequence | np.ndarray | None = None,
    progress: Callable[[int, int, int, float], None] | None = None,
    pretrained_embeddings: np.ndarray | None = None,
) -> FinetunedModel:
    """Adapt ``backbone`` to one movie's crops, check the result for collapse and compare it with the pretrained model.

    Args:
        backbone: The pretrained backbone (a torch module); never modified.
        chips: (N, S, S, 3) uint8 RGB chips aligned for it. Training uses at most
            the mode's ``max_crops`` of them (:attr:`~vcn.identity.selfsup.adapt.AdaptConfig.max_crops`), so a
            caller with a long movie picks them first
            (:func:`~vcn.identity.selfsup.sampling.spread_crops`) and decodes only those.
        crop_track: (N,) track index of each chip, ``0..n_tracks-1``.
        n_tracks: Number of tracks.
        cannot_link: Track pairs on screen together (never matched).
        seed: Seed of everything random; the same seed gives the same model on a CPU.
        mode: Settings; by default :func:`compute_mode` for the backbone's device.
        labels: Per-track identities, a diagnostic only (match precision in the logs).
        progress: As :func:`vcn.identity.selfsup.adapt.adapt`.
        pretrained_embeddings: (N, D) pretrained embeddings of ``chips`` when the
            caller has them (for the collapse statistics); computed otherwise.

    Returns:
        The finetuned model, with :attr:`FinetunedModel.collapse` and :attr:`FinetunedModel.check` set.

    Raises:
        ValueError: On bad inputs, or a backbone without a torch module.
        FloatingPointError: If training diverges.
    """
    if getattr(backbone, "module", None) is None:
        raise ValueError(f"backbone {backbone.name!r} has no torch module to finetune (ONNX models only run)")
    mode = mode or compute_mode(backbone.device, len(chips), seed)
    log.info("finetuning mode %s: %s", mode.name, mode.description)
    result: AdaptResult = adapt(
        backbone, chips, crop_track, n_tracks, cannot_link=cannot_link, config=mode.config, labels=labels,
        progress=progress,
    )
    head = result.head.cpu().eval()
    version = f"{backbone.version}-ft-{_digest(_state(result.backbone, head))}"
    tuned = with_module(backbone, result.backbone.eval(), version)

    # Collapse diagnostics and the label-free check against the pretrained model, on the same crops: all
    # those it trained on (track means of a few crops each are too noisy for the check: on a 600-track
    # episode 3 crops per track reversed a 0.003 difference that all 11 per track gave).
    sample = spread_crops(crop_track, MAX_CROPS)
    subset = chips if len(sample) == len(chips) else chips[sample]  # no copy of up to 8,192 chips when all fit
    base_embeddings = (
        pretrained_embeddings[sample] if pretrained_embeddings is not None else backbone.embed(subset)
    )
    tuned_embeddings = tuned.embed(subset)
    last_loss = result.rounds[-1].loss_curve[-1] if result.rounds[-1].loss_curve else float("nan")
    train = mode.config.train
    steps_per_epoch = math.ceil((train.pairs_per_epoch or result.crops) / train.batch_size)
    steps = sum(len(r.loss_curve) for r in result.rounds) * steps_per_epoch
    collapse = collapse_stats(last_loss, head.out_dim, tuned_embeddings, base_embeddings, steps)
    for problem in collapse.problems():
        log.warning("finetuning may have collapsed: %s", problem)
    check = check_adaptation(base_embeddings, tuned_embeddings, np.asarray(crop_track)[sample], cannot_link)
    if check.reason():
        log.warning("the pretrained model is used: %s", check.reason())

    history = FinetuneHistory(
        rounds=tuple(result.rounds),
        stopped=result.stopped,
        n_matches=len(result.matches) if result.matches is not None else 0,
        crops=result.crops,
        bank_seconds=result.bank_seconds,
        seconds=result.seconds,
        pairs_per_second=result.pairs_per_second,
        device=str(result.final.device),
    )
    return FinetunedModel(
        backbone=tuned,
        head=head,
        center=result.center.detach().cpu().numpy().astype(np.float64),
        student_temperature=result.final.config.student_temperature,
        teacher_temperature=result.final.config.teacher_temperature,
        base_version=backbone.version,
        version=version,
        mode=mode.name,
        settings=mode.config.model_dump(),
        history=history,
        collapse=collapse,
        check=check,
    )


def _state(module: torch.nn.Module, head: torch.nn.Module) -> dict[str, torch.Tensor]:
    tensors = {f"backbone.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    tensors.update({f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()})
    return tensors


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    sha = hashlib.sha256()
    for key in sorted(tensors):
        sha.update(key.encode())
        sha.update(tensors[key].float().numpy().tobytes())
    return sha.hexdigest()[:12]
