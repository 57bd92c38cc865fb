"""Building blocks shared by every Twins model: patch embedding, MLP, positional encoding.

Tokens travel between modules as a contiguous (B, N, C) tensor with N = H * W in row-major
order. Viewing such a tensor as (B, H, W, C) and permuting it to (B, C, H, W) gives a
channels-last image without a copy, which is the layout the CPU and cuDNN convolution kernels
prefer; every convolution here is fed that view instead of a `.transpose().contiguous()` copy.

The CPU fast paths they call (`kernels.linear`, `kernels.mlp`, `kernels.conv2d`) live in
`kernels.py`. Attribute names (`proj`, `norm`, `fc1`, `fc2`, `proj.0`) follow the official
checkpoints.
"""
from typing import Tuple

import torch
from torch import nn

from . import kernels
from .kernels import (conv2d, low_precision_layer_norm, low_precision_layer_norm_applies,
                      map_to_tokens, mlp, mlp_applies, tokens_to_map)

Size = Tuple[int, int]


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters; the same results up to fp32 rounding) whose weight and
    bias gradients are summed in fp32 for bf16/fp16 inputs in CPU training, which PyTorch's CPU
    kernel sums in the input's precision (`kernels.low_precision_layer_norm`), and which at
    eager CPU fp32 inference runs the native kernel (`kernels.layer_norm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if low_precision_layer_norm_applies(x, self):
            return low_precision_layer_norm(x, self)
        if len(self.normalized_shape) == 1:
            return kernels.layer_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)


class Mlp(nn.Module):
    """Linear -> GELU (exact erf) -> dropout -> Linear -> dropout.

    Args:
        dim: input and output channels C.
        hidden_dim: hidden channels.
        drop: dropout probability after the activation and after the second Linear.
    Shapes: (..., C) -> (..., C).
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def uses_fast_path(self, x: torch.Tensor) -> bool:
        return (self.drop.p == 0.0 or not self.training) and mlp_applies(x, self.fc1, self.fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_fast_path(x):
            return mlp(x, self.fc1, self.fc2)
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: Conv2d(kernel = stride = patch_size), then LayerNorm.

    Pixels that do not fill a whole patch at the bottom or right are dropped, as in the official
    models.

    Args:
        in_chans: input channels.
        embed_dim: output channels C.
        patch_size: patch side p.
    Shapes: (B, in_chans, H, W) -> ((B, (H // p) * (W // p), C), (H // p, W // p)).
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = LayerNorm(embed_dim)  # eps 1e-5, as the official patch embedding

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Size]:
        if not (kernels.enabled(x) and kernels.chunked_applies(x)):
            return self._embed(x)  # also under torch.compile, whose inductor picks layouts
        # Eager CPU: the convolution takes a channels-last copy of the NCHW image. oneDNN's
        # convolution of the NCHW image took 4x longer (3 -> 64 channels, 4 x 4 patches, 32
        # images at 224: 14 ms against 3.5 ms with the copy), wrote an NCHW result that the
        # LayerNorm then copied to tokens, and in backward copied the (channels-last) token
        # gradient back to NCHW. The later stages' token maps are channels-last already.
        if not torch.is_grad_enabled() and x.shape[0] > 1:
            return self._forward_by_images(x)  # the copy chunk by chunk, into a reused buffer
        return self._embed(x.contiguous(memory_format=torch.channels_last))

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Size]:
        x = conv2d(x, self.proj)
        size = (x.shape[2], x.shape[3])
        return self._norm(x), size

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H', W') -> (B, H' * W', C); LayerNorm writes a contiguous result either way.
        return self.norm(x.flatten(2).transpose(1, 2))

    def _forward_by_images(self, x: torch.Tensor) -> Tuple[torch.Tensor, Size]:
        """`forward` a few images at a time (eager CPU inference): the channels-last copy of
        the image (in a reused buffer) and the convolution's output stay chunk-sized instead
        of being mapped fresh for the whole batch, and only the result is. The same
        operations on each image: the same values, up to the summation order oneDNN picks for
        the convolution at another batch size."""
        B, p = x.shape[0], self.patch_size
        tokens = max(1, (x.shape[2] // p) * (x.shape[3] // p))  # per image
        out, size = None, None
        for b0, b1 in kernels.chunks(B, max(1, kernels.CHUNK_ROWS // tokens)):
            image = x[b0:b1]
            b, c, h, w = image.shape
            # The channels-last copy goes to a reused buffer, viewed as a channels-last map.
            buf = kernels.scratch("patch_embed.image", b, h * w * c, image)
            y, size = self._embed(tokens_to_map(buf.view(b, h * w, c), (h, w)).copy_(image))
            # The result is pooled (`kernels.reusable_empty`), not mapped afresh every call.
            out = kernels.reusable_empty((B,) + y.shape[1:], y) if out is None else out
            out[b0:b1] = y
        return out, size


class PositionalEncodingGenerator(nn.Module):
    """PEG: a depth-wise k x k convolution over the token map, added residually.

    The convolution sits inside an `nn.Sequential` only so that its parameters are named
    `proj.0.*` as in the official checkpoints.

    Args:
        dim: channels C.
        kernel_size: odd kernel side (3 in every published model).
    Shapes: (B, N, C), (H, W) -> (B, N, C).
    """

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"PEG kernel size must be odd to keep the token map size, got {kernel_size}")
        self.proj = nn.Sequential(nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim))

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        if kernels.peg_applies(x, self.proj[0]):
            return kernels.peg(x, size, self.proj[0])  # CPU training
        if kernels.peg_inference_applies(x):
            return kernels.peg_inference(x, size, self.proj[0])
        feat = tokens_to_map(x, size)
        out = conv2d(feat, self.proj[0])
        # The convolution's output is fresh and not needed by its backward: add in place.
        out = out.add_(feat) if out.dtype == feat.dtype else out + feat
        return map_to_tokens(out)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability p."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    """Stochastic depth per sample (module form of `drop_path`). Shapes: any -> same."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"

