"""Tests of the self-distillation components: projection head, loss, EMA teacher.

The loss, its centre, its temperature schedule and the pairwise loss matrix are
checked against a naive reference written here with Python loops over views,
samples and classes in float64; the head against its layout written out with
explicit matrix products; the EMA against a per-parameter update in numpy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from vcn.identity.selfsup.ema import make_teacher, momentum_schedule, update_teacher
from vcn.identity.selfsup.head import ProjectionHead
from vcn.identity.selfsup.loss import (
    SelfDistillationLoss,
    pairwise_loss_matrix,
    symmetric_loss,
)

# ---------------------------------------------------------------------------
# Naive references


def naive_softmax(row: list[float], temperature: float) -> list[float]:
    top = max(row)
    exps = [math.exp((v - top) / temperature) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def naive_cross_entropy(teacher_row: list[float], student_row: list[float], center: list[float], tau_s: float, tau_t: float) -> float:
    """-sum_k p_k log q_k with p = softmax((t - c)/tau_t), q = softmax(s/tau_s), one class at a time."""
    p = naive_softmax([t - c for t, c in zip(teacher_row, center, strict=True)], tau_t)
    q = naive_softmax(student_row, tau_s)
    return -sum(p[k] * math.log(q[k]) for k in range(len(p)))


def naive_loss(student: list[np.ndarray], teacher: list[np.ndarray], center: list[float], tau_s: float, tau_t: float) -> float:
    """Mean over teacher view i, student view j != i, and samples."""
    values = []
    for i, t_view in enumerate(teacher):
        for j, s_view in enumerate(student):
            if i == j:
                continue
            per_sample = [
                naive_cross_entropy(t_view[n].tolist(), s_view[n].tolist(), center, tau_s, tau_t) for n in range(len(t_view))
            ]
            values.append(sum(per_sample) / len(per_sample))
    return sum(values) / len(values)


def naive_center(center: list[float], teacher: list[np.ndarray], momentum: float) -> list[float]:
    rows = [row for view in teacher for row in view.tolist()]
    means = [sum(row[k] for row in rows) / len(rows) for k in range(len(center))]
    return [momentum * c + (1 - momentum) * m for c, m in zip(center, means, strict=True)]


def random_views(count: int, rows: int, classes: int, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(scale * rng.standard_normal((rows, classes))) for _ in range(count)]


def numpy_views(views: list[torch.Tensor]) -> list[np.ndarray]:
    return [v.detach().double().numpy() for v in views]


# ---------------------------------------------------------------------------
# Projection head


def reference_head(head: ProjectionHead, x: torch.Tensor) -> torch.Tensor:
    """The head's layout written out in float64: three linears with exact GELU, unit bottleneck, unit prototypes."""
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    h = x.double()
    for index, linear in enumerate(linears):
        h = h @ linear.weight.detach().double().T + linear.bias.detach().double()
        if index < len(linears) - 1:
            h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    h = h / h.norm(dim=1, keepdim=True)
    direction = head.last_layer.parametrizations.weight.original1.detach().double()
    gain = head.last_layer.parametrizations.weight.original0.detach().double()
    prototypes = gain * direction / direction.norm(dim=1, keepdim=True)
    return h @ prototypes.T


def test_head_defaults_and_forward_match_reference() -> None:
    torch.manual_seed(0)
    head = ProjectionHead(in_dim=64)
    assert head.out_dim == 16384
    x = torch.randn(5, 64)
    logits = head(x)
    assert logits.shape == (5, 16384)
    np.testing.assert_allclose(logits.detach().double().numpy(), reference_head(head, x).numpy(), atol=1e-5)
    # Unit bottleneck and unit prototypes: every logit is a cosine.
    assert logits.abs().max().item() <= 1 + 1e-5


def test_head_initialisation() -> None:
    head = ProjectionHead(in_dim=32, hidden_dim=512, bottleneck_dim=64, out_dim=1024, generator=torch.Generator().manual_seed(1))
    for module in head.mlp:
        if isinstance(module, nn.Linear):
            assert torch.count_nonzero(module.bias) == 0
            assert module.weight.std().item() == pytest.approx(0.02, rel=0.05)
            assert abs(module.weight.mean().item()) < 0.002
    gain = head.last_layer.parametrizations.weight.original0
    assert torch.equal(gain, torch.ones(1024, 1))
    np.testing.assert_allclose(head.last_layer.weight.detach().norm(dim=1).numpy(), 1.0, rtol=1e-5)


def test_head_initialisation_is_seeded() -> None:
    def params(head: ProjectionHead) -> list[torch.Tensor]:
        return [p.detach().clone() for p in head.parameters()]

    small = {"in_dim": 8, "hidden_dim": 16, "bottleneck_dim": 8, "out_dim": 32}
    first = params(ProjectionHead(**small, generator=torch.Generator().manual_seed(3)))
    same = params(ProjectionHead(**small, generator=torch.Generator().manual_seed(3)))
    other = params(ProjectionHead(**small, generator=torch.Generator().manual_seed(4)))
    assert all(torch.equal(a, b) for a, b in zip(first, same, strict=True))
    assert not torch.equal(first[0], other[0])
    torch.manual_seed(5)
    global_first = params(ProjectionHead(**small))
    torch.manual_seed(5)
    global_same = params(ProjectionHead(**small))
    assert all(torch.equal(a, b) for a, b in zip(global_first, global_same, strict=True))


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_head_last_layer_gain_frozen_or_trained(norm_last_layer: bool) -> None:
    torch.manual_seed(0)
    head = ProjectionHead(in_dim=8, hidden_dim=16, bottleneck_dim=8, out_dim=32, norm_last_layer=norm_last_layer)
    gain = head.last_layer.parametrizations.weight.original0
    direction = head.last_layer.parametrizations.weight.original1
    assert gain.requires_grad is not norm_last_layer
    head(torch.randn(4, 8)).pow(2).sum().backward()
    assert direction.grad is not None and direction.grad.abs().sum() > 0
    assert (gain.grad is None) is norm_last_layer


def test_head_rejects_bad_input() -> None:
    head = ProjectionHead(in_dim=8, hidden_dim=16, bottleneck_dim=8, out_dim=32)
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        head(torch.randn(4, 9))
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        head(torch.randn(8))
    with pytest.raises(ValueError, match="floating"):
        head(torch.ones(4, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="out_dim"):
        ProjectionHead(in_dim=8, out_dim=0)


# ---------------------------------------------------------------------------
# Self-distillation loss

K = 7
ROWS = 4


def test_loss_and_center_match_naive_reference_over_steps() -> None:
    criterion = SelfDistillationLoss(K, student_temperature=0.1, teacher_temperature=0.04, center_momentum=0.9)
    center = [0.0] * K
    for step in range(3):
        student = random_views(3, ROWS, K, seed=10 * step, scale=2.0)
        teacher = random_views(2, ROWS, K, seed=10 * step + 5, scale=2.0)
        expected = naive_loss(numpy_views(student), numpy_views(teacher), center, 0.1, 0.04)
        loss = criterion(student, teacher, epoch=0)
        assert loss.item() == pytest.approx(expected, rel=1e-5)
        center = naive_center(center, numpy_views(teacher), 0.9)
        np.testing.assert_allclose(criterion.center.double().numpy(), center, rtol=1e-6, atol=1e-7)


def test_teacher_temperature_schedule() -> None:
    criterion = SelfDistillationLoss(K, teacher_temperature=0.07, warmup_teacher_temperature=0.04, warmup_epochs=5)
    for epoch in range(9):
        expected = 0.04 + (0.07 - 0.04) * min(epoch, 5) / 5
        assert criterion.teacher_temperature_at(epoch) == pytest.approx(expected, abs=1e-15)
    assert SelfDistillationLoss(K).teacher_temperature_at(100) == pytest.approx(0.04)
    with pytest.raises(ValueError, match="epoch"):
        criterion.teacher_temperature_at(-1)

    # The loss uses the epoch's temperature.
    student, teacher = random_views(2, ROWS, K, seed=1), random_views(2, ROWS, K, seed=2)
    expected = naive_loss(numpy_views(student), numpy_views(teacher), [0.0] * K, 0.1, 0.04 + 0.03 * 2 / 5)
    assert criterion(student, teacher, epoch=2).item() == pytest.approx(expected, rel=1e-6)


def test_two_views_loss_is_mean_symmetric_loss_of_the_pairs() -> None:
    criterion = SelfDistillationLoss(K)
    criterion.center.copy_(torch.linspace(-0.2, 0.3, K))
    center = criterion.center.clone()
    (s_a, s_b), (t_a, t_b) = random_views(2, ROWS, K, seed=3), random_views(2, ROWS, K, seed=4)
    loss = criterion([s_a, s_b], [t_a, t_b], epoch=0)
    matrix = symmetric_loss(s_a, t_a, s_b, t_b, center)
    assert loss.item() == pytest.approx(torch.diagonal(matrix).mean().item(), rel=1e-6)


def test_pairwise_and_symmetric_matrices_match_naive_reference() -> None:
    rng = np.random.default_rng(7)
    t_a, s_a = (torch.from_numpy(rng.standard_normal((3, K))) for _ in range(2))
    t_b, s_b = (torch.from_numpy(rng.standard_normal((5, K))) for _ in range(2))
    center = torch.from_numpy(0.1 * rng.standard_normal(K))
    c = center.tolist()

    forward = pairwise_loss_matrix(t_a, s_b, center, student_temperature=0.1, teacher_temperature=0.05)
    assert forward.shape == (3, 5)
    for i in range(3):
        for j in range(5):
            expected = naive_cross_entropy(t_a[i].tolist(), s_b[j].tolist(), c, 0.1, 0.05)
            assert forward[i, j].item() == pytest.approx(expected, rel=1e-9)

    both = symmetric_loss(s_a, t_a, s_b, t_b, center, student_temperature=0.1, teacher_temperature=0.05)
    for i in range(3):
        for j in range(5):
            a_to_b = naive_cross_entropy(t_a[i].tolist(), s_b[j].tolist(), c, 0.1, 0.05)
            b_to_a = naive_cross_entropy(t_b[j].tolist(), s_a[i].tolist(), c, 0.1, 0.05)
            assert both[i, j].item() == pytest.approx((a_to_b + b_to_a) / 2, rel=1e-9)

    within = symmetric_loss(s_a, t_a, s_a, t_a, center)
    np.testing.assert_allclose(within.numpy(), within.T.numpy(), rtol=1e-12)


def test_gradients_reach_the_student_only_and_match_the_analytic_gradient() -> None:
    tau_s, tau_t = 0.1, 0.04
    criterion = SelfDistillationLoss(K, student_temperature=tau_s, teacher_temperature=tau_t)
    student = [v.requires_grad_() for v in random_views(2, ROWS, K, seed=8)]
    teacher = [v.requires_grad_() for v in random_views(2, ROWS, K, seed=9)]
    criterion(student, teacher, epoch=0).backward()
    assert all(t.grad is None for t in teacher)
    # d/ds_j of the mean over the 2 terms (i != j) and ROWS samples: (q_j - p_i) / (tau_s * ROWS * 2).
    for j, view in enumerate(student):
        i = 1 - j
        for n in range(ROWS):
            q = naive_softmax(view[n].tolist(), tau_s)
            p = naive_softmax(teacher[i][n].tolist(), tau_t)
            expected = [(q[k] - p[k]) / (tau_s * ROWS * 2) for k in range(K)]
            np.testing.assert_allclose(view.grad[n].numpy(), expected, rtol=1e-6, atol=1e-12)


def test_collapsed_uniform_outputs_give_ln_k() -> None:
    criterion = SelfDistillationLoss(K)
    for value in (0.0, 3.0):
        views = [torch.full((ROWS, K), value) for _ in range(2)]
        assert criterion(views, views, epoch=0).item() == pytest.approx(math.log(K), rel=1e-6)


def test_non_finite_logits_or_loss_raise_and_leave_the_center() -> None:
    criterion = SelfDistillationLoss(K)
    good = random_views(2, ROWS, K, seed=11)
    bad_student = [good[0], good[1].clone()]
    bad_student[1][0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="student_logits\\[1\\]"):
        criterion(bad_student, good, epoch=0)
    bad_teacher = [good[0].clone(), good[1]]
    bad_teacher[0][2, 3] = float("inf")
    with pytest.raises(FloatingPointError, match="teacher_logits\\[0\\]"):
        criterion(good, bad_teacher, epoch=0)
    # Finite but huge float32 logits overflow once divided by the temperature.
    huge = [torch.full((ROWS, K), 3e38, dtype=torch.float32) for _ in range(2)]
    huge[0][:, 0] = -3e38
    with pytest.raises(FloatingPointError, match="not finite"):
        criterion(huge, huge, epoch=0)
    assert torch.count_nonzero(criterion.center) == 0
    with pytest.raises(FloatingPointError):
        pairwise_loss_matrix(bad_teacher[0], good[0], criterion.center)


def test_loss_rejects_bad_views_and_settings() -> None:
    criterion = SelfDistillationLoss(K)
    views = random_views(2, ROWS, K, seed=12)
    with pytest.raises(ValueError, match="2 student views"):
        criterion(views[:1], views[:1], epoch=0)
    with pytest.raises(ValueError, match="expected 7"):
        criterion(views, random_views(2, ROWS, K + 1, seed=0), epoch=0)
    with pytest.raises(ValueError, match="same, non-zero number of rows"):
        criterion(views, random_views(2, ROWS + 1, K, seed=0), epoch=0)
    with pytest.raises(ValueError, match="more teacher views"):
        criterion(views, random_views(3, ROWS, K, seed=0), epoch=0)
    with pytest.raises(ValueError, match="center"):
        pairwise_loss_matrix(views[0], views[1], torch.zeros(K + 1))
    with pytest.raises(ValueError, match="teacher_temperature"):
        SelfDistillationLoss(K, teacher_temperature=0.0)
    with pytest.raises(ValueError, match="center_momentum"):
        SelfDistillationLoss(K, center_momentum=1.0)


# ---------------------------------------------------------------------------
# EMA teacher


def small_student(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), ProjectionHead(in_dim=8, hidden_dim=16, bottleneck_dim=8, out_dim=32)
    )


def perturb(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # the frozen prototype gain stays at 1, as under training
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    model.train()(torch.randn(16, 6, generator=generator))  # moves the batch-norm statistics


def test_update_teacher_matches_naive_per_parameter_update() -> None:
    student = small_student(0)
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    for step, momentum in enumerate((0.9, 0.996, 0.5)):
        perturb(student, seed=step)
        expected = {
            name: momentum * t.detach().double().numpy() + (1 - momentum) * s.detach().double().numpy()
            for (name, s), (_, t) in zip(student.named_parameters(), teacher.named_parameters(), strict=True)
        }
        update_teacher(student, teacher, momentum)
        for name, t in teacher.named_parameters():
            np.testing.assert_allclose(t.detach().double().numpy(), expected[name], rtol=1e-6, atol=1e-7, err_msg=name)
        for (name, s), (_, t) in zip(student.named_buffers(), teacher.named_buffers(), strict=True):
            assert torch.equal(s, t), name
    # The frozen prototype gain stays at 1 in the teacher.
    assert torch.equal(teacher[3].last_layer.parametrizations.weight.original0, torch.ones(32, 1))


def test_update_teacher_momentum_endpoints() -> None:
    student = small_student(1)
    teacher = make_teacher(student)
    before = [p.clone() for p in teacher.parameters()]
    perturb(student, seed=5)
    update_teacher(student, teacher, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))
    update_teacher(student, teacher, 0.0)
    student.eval(), teacher.eval()
    x = torch.randn(3, 6)
    np.testing.assert_allclose(teacher(x).detach().numpy(), student(x).detach().numpy(), rtol=1e-6, atol=1e-7)


def test_teacher_gets_no_gradients() -> None:
    student = small_student(2)
    teacher = make_teacher(student)
    x = torch.randn(8, 6)
    criterion = SelfDistillationLoss(32)
    criterion([student(x), student(x + 0.1)], [teacher(x), teacher(x + 0.1)], epoch=0).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_update_teacher_rejects_mismatches() -> None:
    student = small_student(3)
    with pytest.raises(ValueError, match="parameters differ"):
        update_teacher(student, nn.Linear(6, 8), 0.9)
    with pytest.raises(ValueError, match="momentum"):
        update_teacher(student, make_teacher(student), 1.5)
    other = make_teacher(student).double()
    with pytest.raises(ValueError, match="float64"):
        update_teacher(student, other, 0.9)


def test_momentum_schedule() -> None:
    schedule = momentum_schedule(101, base=0.996, final=1.0)
    assert schedule.shape == (101,)
    assert schedule[0] == 0.996 and schedule[-1] == 1.0
    assert np.all(np.diff(schedule) >= 0)
    assert schedule[50] == pytest.approx((0.996 + 1.0) / 2, abs=1e-12)
    # Cosine: slow at both ends, fastest in the middle.
    steps = np.diff(schedule)
    assert steps[0] < steps[50] and steps[-1] < steps[50]
    np.testing.assert_array_equal(momentum_schedule(1), [0.996])
    for bad in ({"total_steps": 0}, {"total_steps": 10, "base": -0.1}, {"total_steps": 10, "final": 1.1}):
        with pytest.raises(ValueError):
            momentum_schedule(**bad)
