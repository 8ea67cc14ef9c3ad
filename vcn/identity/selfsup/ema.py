"""The teacher: an exponential moving average (EMA) of the student's weights.

The teacher is never trained by gradient; after every optimiser step its
parameters move towards the student's, ``theta_t <- m theta_t + (1 - m) theta_s``,
with the momentum ``m`` rising on a cosine from 0.996 to 1 over training (DINO).
A slowly moving teacher gives stable targets and, as an ensemble of past students,
better ones than the student itself.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    """A deep copy of ``student`` whose parameters require no gradient.

    The copy keeps the student's train/eval mode; the trainer chooses the
    teacher's mode (buffers such as batch-norm statistics are copied from the
    student by :func:`update_teacher` anyway).
    """
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher


def _check_matched(kind: str, student: list[tuple[str, torch.Tensor]], teacher: list[tuple[str, torch.Tensor]]) -> None:
    student_names = [name for name, _ in student]
    teacher_names = [name for name, _ in teacher]
    if student_names != teacher_names:
        missing = sorted(set(student_names) ^ set(teacher_names))
        raise ValueError(f"student and teacher {kind} differ: {missing[:5] or 'same names in another order'}")
    for (name, s), (_, t) in zip(student, teacher, strict=True):
        if s.shape != t.shape or s.dtype != t.dtype or s.device != t.device:
            raise ValueError(
                f"student and teacher {kind} {name!r} differ: {tuple(s.shape)} {s.dtype} {s.device} "
                f"vs {tuple(t.shape)} {t.dtype} {t.device}"
            )


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """One EMA step of the teacher's parameters; its buffers are copied from the student.

    ``theta_t <- m theta_t + (1 - m) theta_s`` for every parameter, in place, with
    fused multi-tensor (foreach) operations. Every parameter is averaged, frozen
    ones included (they stay equal to the student's); to average only part of a
    model (the head in head-only epochs, to save time on CPU), pass the submodules.

    Args:
        student: The trained model.
        teacher: Its copy from :func:`make_teacher`, same structure, dtypes and device.
        momentum: ``m`` in [0, 1]; 1 leaves the teacher's parameters unchanged.

    Raises:
        ValueError: If ``momentum`` is out of range or the two models differ in structure.
    """
    momentum = float(momentum)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    student_params = list(student.named_parameters())
    teacher_params = list(teacher.named_parameters())
    student_buffers = list(student.named_buffers())
    teacher_buffers = list(teacher.named_buffers())
    _check_matched("parameters", student_params, teacher_params)
    _check_matched("buffers", student_buffers, teacher_buffers)

    targets = [t for _, t in teacher_params]
    sources = [s for _, s in student_params]
    if targets:
        torch._foreach_mul_(targets, momentum)
        torch._foreach_add_(targets, sources, alpha=1.0 - momentum)
    for (_, s), (_, t) in zip(student_buffers, teacher_buffers, strict=True):
        t.copy_(s)


def momentum_schedule(total_steps: int, base: float = 0.996, final: float = 1.0) -> np.ndarray:
    """Teacher momentum per optimiser step: a half cosine from ``base`` to ``final``.

    ``m[i] = final - (final - base) * (1 + cos(pi * i / (total_steps - 1))) / 2``, so
    ``m[0] = base`` and ``m[-1] = final`` exactly (DINO's schedule stops one step short
    of ``final``).

    Tuning advice: DINO uses base 0.996 with batches of 1024; with small batches
    (a few hundred pairs) and short per-movie runs a lower base (0.99) lets the
    teacher keep up with the student; ending at 1 freezes the teacher as training
    converges.

    Args:
        total_steps: Number of optimiser steps (one value each).
        base: Momentum at the first step, in [0, 1].
        final: Momentum at the last step, in [0, 1].

    Returns:
        (total_steps,) float64 momenta.

    Raises:
        ValueError: If ``total_steps`` < 1 or a momentum is outside [0, 1].
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int | np.integer) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    for name, value in (("base", base), ("final", final)):
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name} momentum must be in [0, 1], got {value!r}")
    if total_steps == 1:
        return np.array([float(base)])
    progress = np.arange(total_steps) / (total_steps - 1)
    schedule = final - (final - base) * (1.0 + np.cos(math.pi * progress)) / 2.0
    schedule[0], schedule[-1] = base, final  # exact endpoints, free of rounding
    return schedule
