"""The self-distillation loss (DINO's cross-entropy) and the dissimilarity it defines.

For a teacher view ``a`` and a student view ``b`` of one face, with head logits
``t(a)`` from the teacher and ``s(b)`` from the student,

    L(a -> b) = - sum_k softmax((t(a) - c) / tau_t)_k * log_softmax(s(b) / tau_s)_k

where ``c`` is the running mean of the teacher's logits (the centre). Centring keeps
one prototype from dominating; the low teacher temperature sharpens the targets so
they do not spread out to uniform. Together they prevent the two ways the
student/teacher pair can collapse. Only positive pairs are used, no negatives.

The same expression between two crops (the teacher role on one, the student role on
the other), symmetrised, is the learned dissimilarity of the clustering:
:func:`pairwise_loss_matrix` and :func:`symmetric_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def _check_temperature(name: str, value: float) -> float:
    value = float(value)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def _check_logits(name: str, logits: torch.Tensor, out_dim: int | None = None) -> None:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{name} must be an (N, K) tensor, got {shape}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {logits.dtype}")
    if out_dim is not None and logits.shape[1] != out_dim:
        raise ValueError(f"{name} has {logits.shape[1]} logits per row, expected {out_dim}")
    if not bool(torch.isfinite(logits).all()):
        raise FloatingPointError(f"{name} holds non-finite values (NaN or inf): training has diverged")


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Softmax in float32 at least: bf16/fp16 logits lose the targets' small probabilities."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def teacher_targets(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temperature: float) -> torch.Tensor:
    """The teacher's centred, sharpened target distributions ``softmax((t - c) / tau_t)``.

    Args:
        teacher_logits: (N, K) teacher logits.
        center: (K,) centre subtracted from every row.
        teacher_temperature: tau_t.

    Returns:
        (N, K) probabilities, detached from the graph (targets carry no gradient).
    """
    t = _at_least_float32(teacher_logits.detach())
    return F.softmax((t - center.to(t.dtype)) / teacher_temperature, dim=-1)


def student_log_probs(student_logits: torch.Tensor, student_temperature: float) -> torch.Tensor:
    """The student's log-probabilities ``log_softmax(s / tau_s)``, (N, K)."""
    return F.log_softmax(_at_least_float32(student_logits) / student_temperature, dim=-1)


class SelfDistillationLoss(nn.Module):
    """Cross-entropy between centred, sharpened teacher targets and student predictions.

    Every view of a batch is a (N, K) logit tensor whose row ``n`` comes from the same
    positive group (two crops of one track, or crops of matched tracks). The loss is
    the mean of ``L(teacher view i -> student view j)`` over all pairs ``i != j`` (a
    view is never its own target) and over the N rows. With two views, the two
    crops of each pair, this is the symmetrised ``(L(a -> b) + L(b -> a)) / 2``.
    Views beyond the teacher's (DINO's local crops) are student-only: list the
    teacher's views first in ``student_logits`` too.

    After each call the centre moves towards the batch mean of the teacher logits
    (over all teacher views and rows): ``c <- m c + (1 - m) mean(t)``. DINO
    all-reduces that mean across processes; we train on one device, so the batch
    mean is local.

    Tuning advice:
        - ``student_temperature`` 0.1 and ``teacher_temperature`` 0.04 are DINO's and
          the paper's. A teacher temperature above ~0.07 lets the targets go uniform
          (the loss sticks at ln K); lower sharpens them further.
        - If training collapses early, warm the teacher temperature: start at
          ``warmup_teacher_temperature`` 0.04 and rise to a final value <= 0.07 over
          ``warmup_epochs`` (DINO: 30 epochs); our per-movie runs are a few epochs,
          so the default is a constant 0.04.
        - ``center_momentum`` 0.9: higher makes the centre slower and the guard
          against one dominant prototype weaker on a drifting teacher.

    Args:
        out_dim: Number of logits K.
        student_temperature: tau_s.
        teacher_temperature: Final tau_t, reached at ``warmup_epochs``.
        warmup_teacher_temperature: tau_t at epoch 0.
        warmup_epochs: Epochs of linear warm-up of tau_t; 0 for a constant tau_t.
        center_momentum: Momentum m of the centre's moving average, in [0, 1).

    Raises:
        ValueError: If an argument is out of range.
    """

    center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.04,
        warmup_teacher_temperature: float = 0.04,
        warmup_epochs: int = 0,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if isinstance(out_dim, bool) or not isinstance(out_dim, int) or out_dim < 1:
            raise ValueError(f"out_dim must be a positive integer, got {out_dim!r}")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be a non-negative integer, got {warmup_epochs!r}")
        if not 0.0 <= float(center_momentum) < 1.0:
            raise ValueError(f"center_momentum must be in [0, 1), got {center_momentum!r}")
        self.out_dim = out_dim
        self.student_temperature = _check_temperature("student_temperature", student_temperature)
        self.teacher_temperature = _check_temperature("teacher_temperature", teacher_temperature)
        self.warmup_teacher_temperature = _check_temperature("warmup_teacher_temperature", warmup_teacher_temperature)
        self.warmup_epochs = warmup_epochs
        self.center_momentum = float(center_momentum)
        # tau_t for epochs 0 .. warmup_epochs, linear from the warm-up value to the final one.
        self.teacher_temperature_schedule = np.linspace(
            self.warmup_teacher_temperature, self.teacher_temperature, warmup_epochs + 1
        )
        self.register_buffer("center", torch.zeros(out_dim))

    def teacher_temperature_at(self, epoch: int) -> float:
        """tau_t at ``epoch`` (0-based): linear warm-up, then constant.

        Raises:
            ValueError: If ``epoch`` is negative.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        return float(self.teacher_temperature_schedule[min(epoch, self.warmup_epochs)])

    def forward(
        self,
        student_logits: Sequence[torch.Tensor],
        teacher_logits: Sequence[torch.Tensor],
        epoch: int,
    ) -> torch.Tensor:
        """Mean loss over all (teacher view i, student view j != i) pairs; updates the centre.

        Args:
            student_logits: Student logits, one (N, K) tensor per view.
            teacher_logits: Teacher logits, one (N, K) tensor per view; view ``i``
                here is view ``i`` of ``student_logits``.
            epoch: Current epoch (0-based), for the teacher temperature.

        Returns:
            Scalar loss; gradients reach the student logits only.

        Raises:
            ValueError: If the views are missing, of mismatched shapes, or leave no pair.
            FloatingPointError: If a logit or the loss is not finite.
        """
        if len(teacher_logits) < 1 or len(student_logits) < 2:
            raise ValueError(
                f"need at least 1 teacher view and 2 student views, got {len(teacher_logits)} and {len(student_logits)}"
            )
        if len(teacher_logits) > len(student_logits):
            raise ValueError(
                f"more teacher views ({len(teacher_logits)}) than student views ({len(student_logits)}): "
                "every teacher view must also be a student view"
            )
        for kind, views in (("student", student_logits), ("teacher", teacher_logits)):
            for i, view in enumerate(views):
                _check_logits(f"{kind}_logits[{i}]", view, self.out_dim)
        rows = {len(view) for view in (*student_logits, *teacher_logits)}
        if len(rows) != 1 or 0 in rows:
            raise ValueError(f"every view must have the same, non-zero number of rows, got {sorted(rows)}")

        tau_t = self.teacher_temperature_at(epoch)
        targets = [teacher_targets(t, self.center, tau_t) for t in teacher_logits]
        log_probs = [student_log_probs(s, self.student_temperature) for s in student_logits]

        total = torch.zeros((), dtype=log_probs[0].dtype, device=log_probs[0].device)
        terms = 0
        for i, target in enumerate(targets):
            for j, log_prob in enumerate(log_probs):
                if i == j:
                    continue
                total = total - (target * log_prob).sum(dim=-1).mean()
                terms += 1
        loss = total / terms
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(f"self-distillation loss is not finite ({loss.item()})")

        self.update_center(teacher_logits)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_logits: Sequence[torch.Tensor]) -> None:
        """Move the centre towards the batch mean of the teacher logits (one device, no all-reduce)."""
        batch = torch.cat([t.detach() for t in teacher_logits]).mean(dim=0)
        self.center.mul_(self.center_momentum).add_(batch.to(self.center.dtype), alpha=1.0 - self.center_momentum)


def pairwise_loss_matrix(
    teacher_logits_a: torch.Tensor,
    student_logits_b: torch.Tensor,
    center: torch.Tensor,
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.04,
) -> torch.Tensor:
    """All one-way losses ``L(a_i -> b_j)``: the teacher role on crops a, the student role on b.

    ``M[i, j] = - softmax((t(a_i) - c) / tau_t) . log_softmax(s(b_j) / tau_s)``, the
    loss the student would pay to predict the teacher's target for ``a_i`` from
    ``b_j``. It is not symmetric and its diagonal is not zero (for a = b it is the
    cross-entropy of a crop with itself); see :func:`symmetric_loss`. Pass the
    trained loss's ``center`` and final temperatures.

    Args:
        teacher_logits_a: (Na, K) logits of crops a (from the teacher, or the
            finetuned student standing in for it).
        student_logits_b: (Nb, K) logits of crops b.
        center: (K,) centre of the teacher logits.
        student_temperature: tau_s.
        teacher_temperature: tau_t.

    Returns:
        (Na, Nb) losses, non-negative.

    Raises:
        ValueError: On shapes that do not agree or a non-positive temperature.
        FloatingPointError: On non-finite logits or centre.
    """
    _check_logits("teacher_logits_a", teacher_logits_a)
    _check_logits("student_logits_b", student_logits_b, teacher_logits_a.shape[1])
    if center.shape != (teacher_logits_a.shape[1],):
        raise ValueError(f"center must have shape ({teacher_logits_a.shape[1]},), got {tuple(center.shape)}")
    if not bool(torch.isfinite(center).all()):
        raise FloatingPointError("center holds non-finite values")
    tau_s = _check_temperature("student_temperature", student_temperature)
    tau_t = _check_temperature("teacher_temperature", teacher_temperature)
    targets = teacher_targets(teacher_logits_a, center, tau_t)
    log_probs = student_log_probs(student_logits_b, tau_s)
    return -targets @ log_probs.to(targets.dtype).T


def symmetric_loss(
    student_logits_a: torch.Tensor,
    teacher_logits_a: torch.Tensor,
    student_logits_b: torch.Tensor,
    teacher_logits_b: torch.Tensor,
    center: torch.Tensor,
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.04,
) -> torch.Tensor:
    """The learned dissimilarity ``D[i, j] = (L(a_i -> b_j) + L(b_j -> a_i)) / 2``.

    For the clustering, pass the finetuned student's logits in both roles (or the
    teacher's as ``teacher_logits_*``) and the same crops as a and b for the
    all-pairs matrix of one set. ``D`` is bilinear in per-crop factors (targets and
    negative log-probabilities), so set-to-set means reduce to mean factors
    (see :mod:`vcn.clustering.dissimilarity`).

    Args:
        student_logits_a: (Na, K) student logits of crops a.
        teacher_logits_a: (Na, K) teacher logits of crops a.
        student_logits_b: (Nb, K) student logits of crops b.
        teacher_logits_b: (Nb, K) teacher logits of crops b.
        center: (K,) centre of the teacher logits.
        student_temperature: tau_s.
        teacher_temperature: tau_t.

    Returns:
        (Na, Nb) symmetrised losses.

    Raises:
        ValueError: On shapes that do not agree.
        FloatingPointError: On non-finite logits or centre.
    """
    if student_logits_a.shape != teacher_logits_a.shape or student_logits_b.shape != teacher_logits_b.shape:
        raise ValueError(
            "student and teacher logits of one set of crops must have one shape, got "
            f"{tuple(student_logits_a.shape)}/{tuple(teacher_logits_a.shape)} and "
            f"{tuple(student_logits_b.shape)}/{tuple(teacher_logits_b.shape)}"
        )
    forward = pairwise_loss_matrix(teacher_logits_a, student_logits_b, center, student_temperature, teacher_temperature)
    backward = pairwise_loss_matrix(teacher_logits_b, student_logits_a, center, student_temperature, teacher_temperature)
    return 0.5 * (forward + backward.T)
