"""Progressive self-supervised adaptation of a backbone to one movie (DESIGN.md section 2).

Rounds of :func:`~vcn.identity.selfsup.trainer.train_round`: round 1 trains on pairs of
crops of one track; after each round the crops are embedded with the finetuned
backbone, coarse Gaussian track matching (:func:`~vcn.identity.selfsup.matching.match_tracks`)
finds tracks that look like one person, and the next round also trains on pairs
across matched tracks, starting from the previous round's backbone. Matches only
make training pairs; nothing is merged here.

The rounds stop when the matches stop changing (another round would train on the
same pairs) or after ``max_rounds``. Labels, where they exist, only measure the
matches' precision for the logs.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from vcn.identity.selfsup.matching import TrackMatches, match_precision, match_tracks
from vcn.identity.selfsup.sampling import spread_crops
from vcn.identity.selfsup.trainer import (
    TrainConfig,
    TrainResult,
    prepare_bank,
    train_round,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vcn.identity.backbone import Backbone
    from vcn.identity.selfsup.bank import ViewBank
    from vcn.identity.selfsup.head import ProjectionHead

log = logging.getLogger(__name__)

#: Crops finetuning works on at most. Its memory grows with them: on a CPU the
#: decoded chips (67.5 KB each at 150 px) and their view bank (64 KiB for 4 views
#: of dlib's ResNet) take ~133 KB a crop, 1.1 GB at this cap. It is above the
#: ~6,800 crops of a 20-minute episode (the development set, which trains on all
#: of its crops, as before the cap); a longer movie gives it an even subset of
#: each track's crops, the lead actors' long tracks giving up the most, and a
#: feature film (~65,000 crops of ~16,000 tracks) one crop of each of its longest tracks.
MAX_CROPS = 8192


class AdaptConfig(BaseModel):
    """Settings of the progressive rounds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_rounds: int = Field(
        3, ge=1, description="Most training rounds (the paper runs 3-4); fewer when the matches settle earlier."
    )
    train: TrainConfig = Field(
        default_factory=TrainConfig, description="Settings of every round; round r (1-based) uses seed + r - 1."
    )
    pca_dim: int | None = Field(
        32, ge=1, description="Dimension of the PCA basis of the Gaussian track matching (None: full embedding)."
    )
    max_crops: int = Field(
        MAX_CROPS, ge=1, description="Most crops the rounds train and match on; a movie with more trains on an even "
        "subset of each track's crops (vcn.identity.selfsup.sampling.spread_crops), so that memory stays bounded on a feature "
        "film. See MAX_CROPS."
    )
    stable_jaccard: float = Field(
        0.99, gt=0, le=1, description="The matches count as unchanged when the Jaccard index of the new and the "
        "previous set of matched track pairs reaches this: at 0.99 at most 1 pair in 100 differs, and another "
        "round would train on practically the same pairs."
    )


@dataclass(frozen=True)
class AdaptRound:
    """What one round did.

    Attributes:
        loss_curve: Mean loss of each epoch of the round.
        n_matches: Matched track pairs the round trained with (0 in round 1).
        match_precision: Share of those pairs with one label on both tracks; None
            without labels or matches.
        seconds: Wall time of the round's training.
        pairs_per_second: Training throughput of the round.
    """

    loss_curve: list[float]
    n_matches: int
    match_precision: float | None
    seconds: float
    pairs_per_second: float


@dataclass
class AdaptResult:
    """The adapted model and the history of the rounds.

    Attributes:
        final: The last round's :class:`~vcn.identity.selfsup.trainer.TrainResult`
            (student backbone and head, EMA teacher, centre, settings).
        rounds: One entry per round run.
        matches: The last matches found: those the last round trained with, or,
            when the rounds stopped as stable, the practically unchanged set found
            after it; None when only round 1 ran.
        stopped: Why the rounds ended: ``"stable"`` (matches unchanged) or ``"max_rounds"``.
        bank_seconds: Wall time of building the view bank, shared by all rounds (0 without).
        seconds: Wall time of the whole adaptation.
        crops: Crops the rounds trained on: all given, or ``max_crops`` of them.
    """

    final: TrainResult
    rounds: list[AdaptRound] = field(default_factory=list)
    matches: TrackMatches | None = None
    stopped: str = "max_rounds"
    bank_seconds: float = 0.0
    seconds: float = 0.0
    crops: int = 0

    @property
    def backbone(self) -> nn.Module:
        """The finetuned student backbone (eval mode)."""
        return self.final.backbone

    @property
    def head(self) -> ProjectionHead:
        """The last round's student projection head (eval mode)."""
        return self.final.head

    @property
    def center(self) -> torch.Tensor:
        """(K,) centre of the teacher logits after the last round."""
        return self.final.center

    @property
    def pairs_per_second(self) -> float:
        """Training throughput over all rounds."""
        seconds = sum(r.seconds for r in self.rounds)
        pairs = sum(r.pairs_per_second * r.seconds for r in self.rounds)
        return pairs / seconds if seconds > 0 else float("inf")


def adapt(
    backbone: Backbone,
    chips: np.ndarray,
    crop_track: np.ndarray,
    n_tracks: int,
    *,
    cannot_link: np.ndarray | Sequence[tuple[int, int]] | None = None,
    config: AdaptConfig | None = None,
    labels: Sequence | np.ndarray | None = None,
    progress: Callable[[int, int, int, float], None] | None = None,
) -> AdaptResult:
    """Adapt a copy of ``backbone`` to one movie's crops in progressive rounds.

    Each round after the first starts from the previous round's finetuned
    backbone but with a fresh projection head, teacher and centre:
    :func:`~vcn.identity.selfsup.trainer.train_round` builds those itself and takes no
    initial head. Its head-only epochs re-fit the new head before the backbone moves.

    Args:
        backbone: A :class:`vcn.identity.backbone.Backbone` with a torch module; never modified.
        chips: (N, S, S, 3) uint8 RGB chips aligned for the backbone; more than
            ``config.max_crops`` are cut to an even subset of each track's.
        crop_track: (N,) track index of each chip, in ``0..n_tracks-1``.
        n_tracks: Number of tracks T.
        cannot_link: (P, 2) track pairs that must never match (on screen together).
        config: Settings; :class:`AdaptConfig` defaults if None.
        labels: (T,) identity of each track, a diagnostic only: it sets
            :attr:`AdaptRound.match_precision` and the logs, nothing else.
        progress: Called after each epoch with (round, epoch, epochs of the round,
            mean loss); rounds are 1-based, epochs 0-based.

    Returns:
        The adapted model and the rounds' history.

    Raises:
        ValueError: On bad inputs (see :func:`~vcn.identity.selfsup.trainer.train_round`,
            :func:`~vcn.identity.selfsup.matching.match_tracks`) or labels of the wrong length.
        FloatingPointError: If training diverges.
    """
    config = config or AdaptConfig()
    started = time.perf_counter()
    crop_track = np.asarray(crop_track)
    if labels is not None and len(labels) != n_tracks:
        raise ValueError(f"labels must give one identity per track ({n_tracks}), got {len(labels)}")
    if crop_track.shape != (len(chips),):
        raise ValueError(f"crop_track must hold one track id per chip ({len(chips)}), got shape {crop_track.shape}")
    # Bounded memory: at most max_crops crops, an even subset of each track's (a caller that
    # decodes chips picks the same subset first with spread_crops and decodes only those).
    sample = spread_crops(crop_track, config.max_crops)
    if len(sample) < len(crop_track):
        log.info("finetuning on %d of the movie's %d crops (max_crops)", len(sample), len(crop_track))
        chips, crop_track = chips[sample], crop_track[sample]

    # With a view bank the trunk never trains: bank its views once for all rounds.
    bank = prepare_bank(backbone, chips, crop_track, config.train) if config.train.view_bank else None
    bank_seconds = time.perf_counter() - started
    current = backbone
    matches: TrackMatches | None = None
    rounds: list[AdaptRound] = []
    stopped = "max_rounds"
    result: TrainResult | None = None
    for number in range(1, config.max_rounds + 1):
        # Train on same-track pairs, plus matched-track pairs after round 1.
        train_config = config.train.model_copy(update={"seed": config.train.seed + number - 1})
        precision = _precision(matches, labels)

        def report(epoch: int, epochs: int, loss: float, number: int = number) -> None:
            if progress is not None:
                progress(number, epoch, epochs, loss)

        result = train_round(
            current, chips, crop_track, matches.as_dict() if matches is not None else None, train_config, report,
            bank=bank,
        )
        rounds.append(
            AdaptRound(
                loss_curve=list(result.loss_curve),
                n_matches=len(matches) if matches is not None else 0,
                match_precision=precision,
                seconds=result.seconds,
                pairs_per_second=result.pairs_per_second,
            )
        )
        log.info(
            "round %d/%d: %d matched pairs (precision %s), final loss %.4f, %.1f s",
            number, config.max_rounds, rounds[-1].n_matches, _format(precision),
            result.loss_curve[-1] if result.loss_curve else float("nan"), result.seconds,
        )
        if number == config.max_rounds:
            break

        # Match tracks in the finetuned embedding space, for the next round's pairs.
        # train_round returns its student frozen: the next round starts from a copy with the caller's flags.
        current = with_module(backbone, result.backbone)
        if bank is not None:
            embeddings, embedded_track = _bank_embeddings(current.module, bank), crop_track[bank.crops]
        else:
            embeddings, embedded_track = current.embed(chips), crop_track
        found = match_tracks(embeddings, embedded_track, n_tracks, cannot_link=cannot_link, pca_dim=config.pca_dim)
        similarity = _jaccard(matches, found)
        log.info(
            "after round %d: %d matched pairs (precision %s), Jaccard %.3f with the previous matches",
            number, len(found), _format(_precision(found, labels)), similarity,
        )
        matches = found
        if similarity >= config.stable_jaccard:
            stopped = "stable"
            break
    assert result is not None  # max_rounds >= 1
    return AdaptResult(
        final=result, rounds=rounds, matches=matches, stopped=stopped, bank_seconds=bank_seconds,
        seconds=time.perf_counter() - started, crops=len(crop_track),
    )


def _bank_embeddings(module: nn.Module, bank: ViewBank) -> np.ndarray:
    """Unit-length embeddings of the banked crops as they are (view 0), through ``module``'s tail."""
    from vcn.identity.selfsup.bank import tail_outputs

    out = tail_outputs(module, bank).cpu().numpy()
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def with_module(backbone: Backbone, module: nn.Module, version: str | None = None) -> Backbone:
    """A shallow copy of ``backbone`` running a copy of ``module`` (with ``backbone.module``'s trainable
    flags, name by name), under ``version`` if given."""
    trainable = {name for name, p in backbone.module.named_parameters() if p.requires_grad}
    module = copy.deepcopy(module)
    for name, p in module.named_parameters():
        p.requires_grad_(name in trainable)
    out = copy.copy(backbone)
    out.module = module
    out.device = str(next(module.parameters()).device)
    if version is not None:
        out.version = version
    return out


def _jaccard(previous: TrackMatches | None, found: TrackMatches) -> float:
    """Jaccard index of two sets of track pairs; 1 for two empty sets (nothing changed)."""
    a = set(map(tuple, previous.pairs.tolist())) if previous is not None else set()
    b = set(map(tuple, found.pairs.tolist()))
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def _precision(matches: TrackMatches | None, labels: Sequence | np.ndarray | None) -> float | None:
    if labels is None or matches is None or len(matches) == 0:
        return None
    return match_precision(matches.pairs, labels)


def _format(precision: float | None) -> str:
    return "n/a" if precision is None else f"{precision:.3f}"
