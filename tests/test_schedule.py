"""Schedules and losses against hand-computed values from the spec."""
import math

import pytest
import torch
import torch.nn.functional as F

from engine.train.losses import kd_loss, soft_labels
from engine.train.schedule import cosine_lr, make_plan, subnet_epsilon


def test_cosine_lr_hand_values():
    assert cosine_lr(0, 100, 0.1) == pytest.approx(0.1)
    assert cosine_lr(50, 100, 0.1) == pytest.approx(0.05)
    assert cosine_lr(100, 100, 0.1) == pytest.approx(0.0)
    assert cosine_lr(60, 100, 0.1) == pytest.approx(0.0345491503)    # 0.05 * (1 + cos(0.6 pi))


def test_deps_phases_and_epsilon_ramp():
    # E = 10, T = 6, W = 2, 10 steps per epoch: teacher on epochs [0, 4), ramp over steps [40, 60)
    plan = make_plan("deps", 10, 6, 2)
    assert [plan.phase(e) for e in (0, 3.9, 4, 9)] == ["teacher", "teacher", "shrink", "shrink"]
    epsilon = [subnet_epsilon(s, 10, plan, 1.0, 100, 0.1) for s in range(100)]
    assert epsilon[39] == 0.0 and epsilon[40] == 0.0
    # step 50: effective lr = lr(60) * 10/20 = 0.0172745751; ε = that / lr(50) = 0.3454915
    assert epsilon[50] == pytest.approx(0.3454915028)
    # step 45: effective = 0.0345491503 * 5/20; lr(45) = 0.05 * (1 + cos(0.45 pi)) = 0.0578217232
    assert epsilon[45] == pytest.approx(0.0345491503 * 0.25 / 0.0578217232)
    assert epsilon[60] == 1.0 and epsilon[99] == 1.0
    assert subnet_epsilon(70, 10, plan, 0.5, 100, 0.1) == 0.5


def test_baseline_plans():
    bignas = make_plan("bignas", 10, 6, 2)
    assert bignas.phase(0) == "shrink" and subnet_epsilon(0, 10, bignas, 1.0, 100, 0.1) == 1.0
    ofa = make_plan("ofa-ps", 10, 4, 0)
    assert [ofa.phase(e) for e in (3, 4, 5.9, 6, 8, 9.9)] == ["teacher", "kernel", "kernel", "depth", "width", "width"]
    comp = make_plan("compofa", 10, 4, 0)
    assert comp.sampler == "compound" and comp.phase(4) == "shrink"
    with pytest.raises(ValueError, match="method"):
        make_plan("nope", 10, 4, 0)
    with pytest.raises(ValueError, match="W"):
        make_plan("deps", 10, 4, 5)


def test_kd_loss_is_tau_squared_kl_plus_entropy():
    tau = 2.0
    student = torch.randn(5, 7, requires_grad=True)
    teacher = torch.randn(5, 7)
    targets = soft_labels(teacher, tau)
    loss = kd_loss(student, targets, tau)
    kl = F.kl_div(F.log_softmax(student / tau, -1), targets, reduction="batchmean") * tau ** 2
    entropy = -(targets * targets.log()).sum(-1).mean() * tau ** 2
    torch.testing.assert_close(loss, kl + entropy)
    g1, = torch.autograd.grad(loss, student)
    g2, = torch.autograd.grad(kl, student)
    torch.testing.assert_close(g1, g2)
    assert math.isclose(targets.sum(-1).mean().item(), 1.0, rel_tol=1e-6)
