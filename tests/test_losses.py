"""Tests for losses.py against hand-written formulas."""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from losses import DistillationLoss, build_criterion


class FixedTeacher(nn.Module):
    """Returns fixed logits whatever the input; counts its calls and has one parameter."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.scale = nn.Parameter(torch.ones(()))
        self.calls = 0

    def forward(self, inputs):
        self.calls += 1
        return self.logits * self.scale


STUDENT = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
TEACHER = torch.tensor([[0.0, 3.0, 0.0], [1.0, 0.0, 2.0]])
LABELS = torch.tensor([0, 1])
INPUTS = torch.zeros(2, 3, 4, 4)


def explicit_kl(student, teacher, tau):
    """sum over batch and classes of p_t * (log p_t - log p_s) at temperature tau."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        s_norm = sum(math.exp(v / tau) for v in s_row)
        t_norm = sum(math.exp(v / tau) for v in t_row)
        for s, t in zip(s_row, t_row):
            p_t, p_s = math.exp(t / tau) / t_norm, math.exp(s / tau) / s_norm
            total += p_t * (math.log(p_t) - math.log(p_s))
    return total


@pytest.mark.parametrize('tau', [1.0, 3.0])
def test_soft_distillation_matches_formula(tau):
    criterion = DistillationLoss(nn.CrossEntropyLoss(), FixedTeacher(TEACHER), 'soft', alpha=0.25, tau=tau)
    base = F.cross_entropy(STUDENT, LABELS).item()
    distill = explicit_kl(STUDENT, TEACHER, tau) * tau * tau / STUDENT.numel()
    loss = criterion(INPUTS, STUDENT, LABELS)
    assert loss.item() == pytest.approx(0.75 * base + 0.25 * distill, rel=1e-5)


def test_soft_distillation_is_zero_when_student_equals_teacher():
    criterion = DistillationLoss(nn.CrossEntropyLoss(), FixedTeacher(TEACHER), 'soft', alpha=1.0, tau=2.0)
    assert criterion(INPUTS, TEACHER.clone(), LABELS).item() == pytest.approx(0.0, abs=1e-7)


def test_hard_distillation_uses_teacher_argmax():
    criterion = DistillationLoss(nn.CrossEntropyLoss(), FixedTeacher(TEACHER), 'hard', alpha=0.5, tau=1.0)
    # Teacher argmax is [1, 2]; -log softmax of the student at those classes, averaged.
    log_probs = torch.log_softmax(STUDENT, dim=1)
    hard = -(log_probs[0, 1] + log_probs[1, 2]).item() / 2
    base = -(log_probs[0, 0] + log_probs[1, 1]).item() / 2
    assert criterion(INPUTS, STUDENT, LABELS).item() == pytest.approx(0.5 * base + 0.5 * hard, rel=1e-6)


def test_tuple_output_splits_class_and_distillation_heads():
    criterion = DistillationLoss(nn.CrossEntropyLoss(), FixedTeacher(TEACHER), 'hard', alpha=0.5, tau=1.0)
    class_logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])  # right on labels
    expected = 0.5 * F.cross_entropy(class_logits, LABELS) + 0.5 * F.cross_entropy(STUDENT, torch.tensor([1, 2]))
    assert criterion(INPUTS, (class_logits, STUDENT), LABELS).item() == pytest.approx(expected.item(), rel=1e-6)


def test_none_returns_base_loss_without_running_teacher():
    teacher = FixedTeacher(TEACHER)
    criterion = DistillationLoss(nn.CrossEntropyLoss(), teacher, 'none', alpha=0.5, tau=1.0)
    loss = criterion(INPUTS, (STUDENT, TEACHER), LABELS)
    assert loss.item() == pytest.approx(F.cross_entropy(STUDENT, LABELS).item())
    assert teacher.calls == 0
    assert DistillationLoss(nn.CrossEntropyLoss(), None, 'none', 0.5, 1.0)(INPUTS, STUDENT, LABELS) == loss


def test_gradient_reaches_student_only_and_teacher_stays_in_eval():
    teacher = FixedTeacher(TEACHER)
    teacher.train()
    criterion = DistillationLoss(nn.CrossEntropyLoss(), teacher, 'soft', alpha=0.5, tau=1.0)
    assert not teacher.training
    criterion.train()
    assert not teacher.training
    student = STUDENT.clone().requires_grad_()
    criterion(INPUTS, student, LABELS).backward()
    assert student.grad.abs().sum() > 0
    assert teacher.scale.grad is None


def test_invalid_configuration_is_explained():
    with pytest.raises(ValueError, match="unknown distillation_type 'medium'"):
        DistillationLoss(nn.CrossEntropyLoss(), None, 'medium', 0.5, 1.0)
    with pytest.raises(ValueError, match="'soft' needs a teacher model"):
        DistillationLoss(nn.CrossEntropyLoss(), None, 'soft', 0.5, 1.0)


def test_build_criterion_choices_and_values():
    one_hot = F.one_hot(LABELS, 3).float()
    soft = build_criterion(argparse.Namespace(smoothing=0.1), mixup_active=True)
    assert isinstance(soft, SoftTargetCrossEntropy)
    assert soft(STUDENT, one_hot).item() == pytest.approx(F.cross_entropy(STUDENT, LABELS).item())

    smooth = build_criterion(argparse.Namespace(smoothing=0.1), mixup_active=False)
    assert isinstance(smooth, LabelSmoothingCrossEntropy)
    # 0.9 * NLL + 0.1 * mean over classes of -log p.
    log_probs = torch.log_softmax(STUDENT, dim=1)
    expected = (0.9 * -log_probs.gather(1, LABELS[:, None]).squeeze(1) - 0.1 * log_probs.mean(dim=1)).mean()
    assert smooth(STUDENT, LABELS).item() == pytest.approx(expected.item(), rel=1e-6)

    plain = build_criterion(argparse.Namespace(smoothing=0.0), mixup_active=False)
    assert type(plain) is nn.CrossEntropyLoss
