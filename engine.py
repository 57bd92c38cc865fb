"""One training epoch, evaluation and the throughput measurement."""
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

import utils
from benchmark import time_inference


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stops before the weights are updated."""


def autocast(device, amp_dtype):
    """The single mixed-precision switch: autocast to amp_dtype, or plain fp32 when it is None."""
    return torch.autocast(device_type=device.type, dtype=amp_dtype or torch.bfloat16,
                          enabled=amp_dtype is not None)


def unwrap(model):
    """The bare network inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@dataclass
class Trainer:
    """What one optimisation step needs.

    Args:
        model: the network, DistributedDataParallel-wrapped in distributed runs.
        criterion: called as criterion(images, outputs, targets) (losses.DistillationLoss).
        optimizer: updates the model's parameters.
        scaler: torch.amp.GradScaler, enabled only for float16 autocast.
        device: where batches go.
        amp_dtype: autocast dtype, None for full precision.
        model_ema: timm ModelEmaV3 updated after every step, or None.
        mixup_fn: timm Mixup applied to every batch, or None.
        clip_grad: max gradient norm, or None for no clipping.
        print_freq: progress line every this many steps.
    """
    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: Optional[torch.dtype] = None
    model_ema: Optional[nn.Module] = None
    mixup_fn: Optional[object] = None
    clip_grad: Optional[float] = None
    print_freq: int = 10

    def step(self, images, targets, epoch, step):
        """Forward, backward and update on one batch; returns the loss value."""
        with autocast(self.device, self.amp_dtype):
            outputs = self.model(images)
            loss = self.criterion(images, outputs, targets)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(
                f'loss is {loss_value} at epoch {epoch}, step {step}; training stopped before this update. '
                'The last checkpoint holds the weights of the last completed epoch. Try a lower --lr, '
                '--clip-grad, or --no-amp.')
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip_grad is not None:
            # With float16 the gradients are still multiplied by the loss scale here; unscale first
            # so the threshold applies to the true gradient norm (no-op when the scaler is off).
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.model_ema is not None:
            self.model_ema.update(unwrap(self.model))
        return loss_value


def train_one_epoch(trainer, loader, epoch):
    """Train for one pass over loader; returns {'lr', 'loss'} averaged over all ranks."""
    trainer.model.train()
    trainer.criterion.train()
    logger = utils.MetricLogger()
    header = f'Epoch: [{epoch}]'
    batches = logger.log_every(loader, trainer.print_freq, header, trainer.device, loader.batch_size)
    for step, (images, targets) in enumerate(batches):
        images = images.to(trainer.device, non_blocking=True)
        targets = targets.to(trainer.device, non_blocking=True)
        if trainer.mixup_fn is not None:
            images, targets = trainer.mixup_fn(images, targets)
        loss_value = trainer.step(images, targets, epoch, step)
        logger.update(loss=loss_value, lr=trainer.optimizer.param_groups[0]['lr'])
    logger.synchronize_between_processes(trainer.device)
    utils.print_on_master(f'Averaged stats: {logger}')
    return {'lr': logger.meters['lr'].value, 'loss': logger.meters['loss'].global_avg}


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype=None, sum_across_ranks=False, print_freq=10):
    """Top-1/top-5 accuracy (in %) and mean cross-entropy over every image of loader.

    Counts are summed, not averaged, so with sum_across_ranks (each rank holding a disjoint shard,
    samplers.DistributedEvalSampler) the result equals a single-process evaluation exactly.
    Top-5 becomes top-k with k = min(5, num_classes).
    """
    model.eval()
    logger = utils.MetricLogger()
    loss_sum = correct1 = correct5 = count = 0.0
    for images, targets in logger.log_every(loader, print_freq, 'Test:', device, loader.batch_size):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, k)
        hits = top.eq(targets[:, None])  # (B, k): at most one True per row
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction='sum').item()
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        count += targets.shape[0]
    if sum_across_ranks:
        loss_sum, correct1, correct5, count = utils.all_reduce_sum([loss_sum, correct1, correct5, count], device)
    stats = {'acc1': 100 * correct1 / count, 'acc5': 100 * correct5 / count, 'loss': loss_sum / count,
             'num_images': int(count)}
    utils.print_on_master(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f}")
    return stats


def throughput(model, loader, device, amp_dtype=None, warmup=50, runs=30):
    """Images/s of the model on the first validation batch (official: 50 warm-up, 30 timed passes)."""
    images, _ = next(iter(loader))
    timing = time_inference(model, images.to(device), warmup=warmup, runs=runs, amp_dtype=amp_dtype)
    utils.print_on_master(f'throughput: {timing.median:.1f} images/s (median of {runs} runs, '
                          f'min {timing.min:.1f}, max {timing.max:.1f}; batch {images.shape[0]})')
    return timing
