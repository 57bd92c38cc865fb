"""FLOP counting with fvcore, comparable to the figures published for the official models.

The official models compute attention as two explicit matmuls, which fvcore counts; ours call
`F.scaled_dot_product_attention`, which fvcore does not know. `count_flops` registers a handle
that counts exactly those two matmuls (one multiply-add = one FLOP, fvcore's convention), so the
totals match the official models' fvcore figures.
"""
import math
from typing import Any, List

import torch
from torch import nn


def _shape(value: Any) -> List[int]:
    return list(value.type().sizes())


def _sdpa_flops(inputs: List[Any], outputs: List[Any]) -> int:
    """q (..., L, E), k (..., S, E), v (..., S, Ev): L*S*E for q @ k^T plus L*S*Ev for attn @ v."""
    q, k, v = (_shape(t) for t in inputs[:3])
    batch = math.prod(q[:-2])
    L, E = q[-2:]
    S, Ev = k[-2], v[-1]
    return batch * L * S * (E + Ev)


def count_flops(model: nn.Module, height: int = 224, width: int = 224) -> int:
    """fvcore FLOPs of one forward pass of a (1, 3, height, width) image in eval mode."""
    from fvcore.nn import FlopCountAnalysis  # optional dependency, only for this count

    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        image = torch.zeros(1, 3, height, width, device=device)
        analysis = FlopCountAnalysis(model, image)
        analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flops)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        return int(analysis.total())
    finally:
        model.train(was_training)
