"""Tests for engine.py: evaluation arithmetic, the optimisation step and one epoch."""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import engine


def logits_loader(logits, targets, batch_size=4):
    """Batches whose 'images' are the logits themselves, evaluated by nn.Identity."""
    return DataLoader(TensorDataset(logits, targets), batch_size=batch_size)


def test_evaluate_counts_top1_top5_and_mean_loss():
    torch.manual_seed(0)
    logits = torch.randn(11, 7)
    targets = torch.randint(0, 7, (11,))
    # Put the target of sample 0 at rank 5 (counts for top-5) and of sample 1 at rank 6 (does not).
    order = logits[0].argsort(descending=True)
    targets[0] = order[4]
    targets[1] = logits[1].argsort(descending=True)[5]
    stats = engine.evaluate(nn.Identity(), logits_loader(logits, targets), torch.device('cpu'))
    ranks = (logits > logits.gather(1, targets[:, None])).sum(1)  # 0 = predicted first
    assert stats['acc1'] == pytest.approx(100 * (ranks == 0).float().mean().item())
    assert stats['acc5'] == pytest.approx(100 * (ranks < 5).float().mean().item())
    assert ranks[0] == 4 and ranks[1] == 5
    assert stats['loss'] == pytest.approx(nn.functional.cross_entropy(logits, targets).item(), rel=1e-6)
    assert stats['num_images'] == 11


def test_evaluate_top5_with_fewer_than_five_classes(capsys):
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [1.0, 3.0, 0.0]])
    targets = torch.tensor([0, 0, 2])
    stats = engine.evaluate(nn.Identity(), logits_loader(logits, targets), torch.device('cpu'))
    assert stats['acc1'] == pytest.approx(100 / 3) and stats['acc5'] == 100.0
    assert f"* Acc@1 33.333 Acc@5 100.000 loss {stats['loss']:.3f}" in capsys.readouterr().out


class RecordingScaler:
    """Stands in for GradScaler and records the order of the calls the step makes."""

    def __init__(self, calls):
        self.calls = calls

    def scale(self, loss):
        self.calls.append('scale')
        return loss

    def unscale_(self, optimizer):
        self.calls.append('unscale')

    def step(self, optimizer):
        self.calls.append('step')
        optimizer.step()

    def update(self):
        self.calls.append('update')


def make_trainer(model, **kwargs):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    criterion = LossOnOutputs()
    scaler = kwargs.pop('scaler', torch.amp.GradScaler('cpu', enabled=False))
    return engine.Trainer(model, criterion, optimizer, scaler, torch.device('cpu'), **kwargs)


class LossOnOutputs(nn.Module):
    """criterion(images, outputs, targets) with the signature of losses.DistillationLoss."""

    def forward(self, images, outputs, targets):
        return nn.functional.cross_entropy(outputs.float(), targets)


def test_gradients_are_unscaled_before_clipping(monkeypatch):
    calls = []
    monkeypatch.setattr(nn.utils, 'clip_grad_norm_', lambda params, max_norm: calls.append(f'clip {max_norm}'))
    trainer = make_trainer(nn.Linear(4, 3), scaler=RecordingScaler(calls), clip_grad=5.0)
    trainer.step(torch.randn(2, 4), torch.tensor([0, 1]), epoch=0, step=0)
    assert calls == ['scale', 'unscale', 'clip 5.0', 'step', 'update']


def test_clipping_bounds_the_gradient_norm():
    model = nn.Linear(4, 3)
    trainer = make_trainer(model, clip_grad=1e-3)
    trainer.step(torch.randn(8, 4) * 100, torch.zeros(8, dtype=torch.long), epoch=0, step=0)
    norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert norm.item() == pytest.approx(1e-3, rel=1e-4)


def test_non_finite_loss_names_epoch_and_step_and_skips_update():
    model = nn.Linear(4, 3)
    before = [p.clone() for p in model.parameters()]
    trainer = make_trainer(model)
    with pytest.raises(engine.NonFiniteLossError, match='epoch 4, step 17'):
        trainer.step(torch.full((2, 4), float('nan')), torch.tensor([0, 1]), epoch=4, step=17)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


class DtypeProbe(nn.Module):
    """Linear layer that remembers the dtype of its output."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.seen = []

    def forward(self, x):
        out = self.linear(x)
        self.seen.append(out.dtype)
        return out


def test_bfloat16_amp_runs_the_forward_in_bfloat16_and_keeps_fp32_weights():
    model = DtypeProbe()
    trainer = make_trainer(model, amp_dtype=torch.bfloat16)
    trainer.step(torch.randn(2, 4), torch.tensor([0, 1]), epoch=0, step=0)
    make_trainer(model).step(torch.randn(2, 4), torch.tensor([0, 1]), epoch=0, step=0)
    assert model.seen == [torch.bfloat16, torch.float32]
    assert model.linear.weight.dtype == torch.float32


def test_train_one_epoch_averages_the_step_losses():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    data = DataLoader(TensorDataset(torch.randn(12, 4), torch.randint(0, 3, (12,))), batch_size=4)
    losses = []
    trainer = make_trainer(model, print_freq=1)
    real_step = trainer.step

    def recording_step(*args, **kwargs):
        losses.append(real_step(*args, **kwargs))
        return losses[-1]

    trainer.step = recording_step
    stats = engine.train_one_epoch(trainer, data, epoch=0)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert stats['loss'] == pytest.approx(sum(losses) / 3)
    assert stats['lr'] == 0.1
    assert losses[-1] < losses[0]  # SGD on a fixed set: the loss falls
