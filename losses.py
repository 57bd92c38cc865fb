"""Training criteria: the base classification loss and DeiT's knowledge-distillation wrapper."""
import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

DISTILLATION_TYPES = ('none', 'soft', 'hard')


def build_criterion(args, mixup_active):
    """The base loss for the training labels.

    Mixup/CutMix produce soft label vectors that already include label smoothing, so they need
    SoftTargetCrossEntropy; otherwise labels are class indices, smoothed when args.smoothing > 0.
    """
    if mixup_active:
        return SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


class DistillationLoss(nn.Module):
    """Base loss plus DeiT's distillation from a fixed teacher.

    loss = (1 - alpha) * base_criterion(class_logits, labels) + alpha * distillation term, with
    - 'soft': KL(teacher || student) of the softmaxes at temperature tau, summed, times tau^2 and
      divided by the number of logits (batch * classes), as DeiT;
    - 'hard': cross-entropy of the student to the teacher's argmax class;
    - 'none': only the base loss (alpha is ignored and the teacher is not run).

    The model's output may be a tuple (class_logits, distillation_logits), as from DeiT's
    distillation token, or a single logits tensor. Twins has no distillation token, so a single
    tensor serves as both the class and the distillation output.

    Args:
        base_criterion: loss on (class_logits, labels); labels may be indices or soft targets.
        teacher_model: maps the input batch to logits (B, num_classes); None when type is 'none'.
        distillation_type: 'none', 'soft' or 'hard'.
        alpha: weight of the distillation term, in [0, 1].
        tau: softmax temperature for 'soft'.

    forward(inputs (B, 3, H, W), outputs (B, K) or a tuple of two, labels) -> scalar loss.
    """

    def __init__(self, base_criterion, teacher_model, distillation_type, alpha, tau):
        super().__init__()
        if distillation_type not in DISTILLATION_TYPES:
            raise ValueError(f'unknown distillation_type {distillation_type!r}; '
                             f'choose one of {DISTILLATION_TYPES}.')
        if distillation_type != 'none' and teacher_model is None:
            raise ValueError(f'distillation_type {distillation_type!r} needs a teacher model; '
                             'pass --teacher-model and --teacher-path, or use --distillation-type none.')
        self.base_criterion = base_criterion
        self.teacher_model = teacher_model
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau
        if teacher_model is not None:
            teacher_model.eval()

    def train(self, mode=True):
        """Switch the base criterion only: the teacher stays in eval mode so its targets are fixed."""
        super().train(mode)
        if self.teacher_model is not None:
            self.teacher_model.eval()
        return self

    def forward(self, inputs, outputs, labels):
        class_logits, distill_logits = outputs if isinstance(outputs, tuple) else (outputs, outputs)
        base_loss = self.base_criterion(class_logits, labels)
        if self.distillation_type == 'none':
            return base_loss

        with torch.no_grad():
            teacher_logits = self.teacher_model(inputs)
        if self.distillation_type == 'soft':
            tau = self.tau
            distill_loss = F.kl_div(
                F.log_softmax(distill_logits / tau, dim=1),
                F.log_softmax(teacher_logits / tau, dim=1),
                reduction='sum', log_target=True,
            ) * (tau * tau) / distill_logits.numel()
        else:
            distill_loss = F.cross_entropy(distill_logits, teacher_logits.argmax(dim=1))
        return base_loss * (1 - self.alpha) + distill_loss * self.alpha
