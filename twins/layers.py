"""Building blocks shared by every Twins model: patch embedding, MLP, positional encoding.

Tokens travel between modules as a contiguous (B, N, C) tensor with N = H * W in row-major
order. Viewing such a tensor as (B, H, W, C) and permuting it to (B, C, H, W) gives a
channels-last image without a copy, which is the layout the CPU and cuDNN convolution kernels
prefer; every convolution here is fed that view instead of a `.transpose().contiguous()` copy.

The CPU fast paths (`linear`, `conv2d`) live here too; see their docstrings. Attribute names
(`proj`, `norm`, `fc1`, `fc2`, `proj.0`) follow the official checkpoints.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

Size = Tuple[int, int]


def tokens_to_map(x: torch.Tensor, size: Size) -> torch.Tensor:
    """View tokens as an image, without copying.

    Args:
        x: (B, N, C) tokens, contiguous, N = H * W.
        size: (H, W).
    Returns:
        (B, C, H, W) tensor in channels-last memory format (a view of x).
    """
    B, N, C = x.shape
    H, W = size
    return x.view(B, H, W, C).permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W), same memory


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H * W, C); free when x is channels-last, one copy otherwise."""
    return x.flatten(2).transpose(1, 2).contiguous()


# ------------------------------------------------------------------------------ fast paths
# Two facts about CPUs drive these helpers (measured with benchmark.py --profile):
# 1. `F.linear` runs as `addmm`, which first copies the broadcast bias into the output and then
#    accumulates the product into it: a full extra pass over the output. oneDNN's linear
#    (`mkldnn::_linear_pointwise`, the op torch.compile's CPU backend emits) adds the bias and,
#    optionally, the exact-erf GELU inside the matmul epilogue instead.
# 2. On CPUs without bf16/fp16 instructions (AVX2), low-precision matmuls and convolutions fall
#    back to generic loops 10-20x slower than fp32. There an autocast op is computed in fp32 on
#    operands rounded to the autocast dtype, and its result rounded to that dtype: the same
#    numbers a native low-precision kernel gives (products of bf16/fp16 values are exact in
#    fp32, and such kernels accumulate in fp32), at fp32 speed.


def _cpu_has_native_kernels(probe: str) -> bool:
    return torch.backends.mkldnn.is_available() and getattr(torch.ops.mkldnn, probe)()


# Whether this CPU has native low-precision kernels (a constant, so torch.compile can inline it).
_CPU_NATIVE = {torch.bfloat16: _cpu_has_native_kernels("_is_mkldnn_bf16_supported"),
               torch.float16: _cpu_has_native_kernels("_is_mkldnn_fp16_supported")}


def emulated_autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The CPU autocast dtype when this CPU lacks native kernels for it (see above), else None."""
    if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return None
    dtype = torch.get_autocast_dtype("cpu")
    return None if _CPU_NATIVE.get(dtype, True) else dtype


def _round_to(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """t rounded to `dtype` and held in fp32 (exact: fp32 represents every bf16/fp16 value)."""
    return None if t is None else t.to(dtype).float()


def _use_onednn_linear(x: torch.Tensor) -> bool:
    """Eager CPU only: tracers, exporters and torch.compile must see the standard aten::linear."""
    return (x.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and not (torch.compiler.is_compiling() or torch.jit.is_tracing()
                     or torch.jit.is_scripting()))


class _OneDnnLinear(torch.autograd.Function):
    """y = act(x W^T + b) for training: oneDNN's matmul with the bias in its epilogue, the
    exact-erf GELU (optional) after it, and the usual matmuls in backward.

    Takes 2-D fp32 x (M, K), W (N, K), b (N,) or None; `gelu` selects the exact-erf GELU.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, gelu: bool):
        out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        ctx.gelu, ctx.has_bias = gelu, bias is not None
        ctx.save_for_backward(x, weight, out if gelu else None)  # GELU backward needs its input
        return F.gelu(out) if gelu else out

    @staticmethod
    def backward(ctx, grad):
        x, weight, pre_act = ctx.saved_tensors
        if ctx.gelu:
            grad = torch.ops.aten.gelu_backward(grad, pre_act)
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_w = grad.t() @ x if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def linear(x: torch.Tensor, layer: nn.Linear, gelu: bool = False) -> torch.Tensor:
    """`layer(x)`, followed by the exact-erf GELU when `gelu`; the fast path on CPUs.

    Same semantics as the plain modules under autocast: the result has the autocast dtype.
    Shapes: (..., in_features) -> (..., out_features).
    """
    emulated = emulated_autocast_dtype(x)
    onednn = _use_onednn_linear(x)
    if emulated is None and (not onednn or x.dtype != torch.float32
                             or torch.is_autocast_enabled(x.device.type)):
        out = layer(x)
        return F.gelu(out) if gelu else out
    weight, bias = layer.weight, layer.bias
    if emulated is not None:
        x, weight, bias = _round_to(x, emulated), _round_to(weight, emulated), _round_to(bias, emulated)
    x2d = x.reshape(-1, x.shape[-1])  # (..., K) -> (M, K)
    with torch.autocast("cpu", enabled=False):
        if not onednn:  # emulation under torch.compile / tracing: standard ops only
            out = F.linear(x2d, weight, bias)
            out = F.gelu(out) if gelu else out
        elif torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            out = _OneDnnLinear.apply(x2d, weight, bias, gelu)
        else:  # inference: GELU fused into the matmul epilogue
            out = torch.ops.mkldnn._linear_pointwise(x2d, weight, bias, "gelu" if gelu else "none",
                                                     [], "none" if gelu else "")
    out = out.view(*x.shape[:-1], out.shape[-1])
    return out if emulated is None else out.to(emulated)


def conv2d(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """`conv(x)`, computed in fp32 on rounded operands under emulated CPU autocast (see above)."""
    emulated = emulated_autocast_dtype(x)
    if emulated is None:
        return conv(x)
    with torch.autocast("cpu", enabled=False):
        out = conv._conv_forward(_round_to(x, emulated), _round_to(conv.weight, emulated),
                                 _round_to(conv.bias, emulated))
    return out.to(emulated)


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
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fc1 and the GELU run as one fused op where the backend has it (see `linear`).
        hidden = linear(x, self.fc1, gelu=True)
        return self.drop(linear(self.drop(hidden), self.fc2))


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
        self.norm = nn.LayerNorm(embed_dim)  # eps 1e-5, as the official patch embedding

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Size]:
        x = conv2d(x, self.proj)
        size = (x.shape[2], x.shape[3])
        # (B, C, H', W') -> (B, H' * W', C); LayerNorm writes a contiguous result either way.
        return self.norm(x.flatten(2).transpose(1, 2)), size


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
        feat = tokens_to_map(x, size)
        return map_to_tokens(conv2d(feat, self.proj[0]) + feat)


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

