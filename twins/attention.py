"""The two spatial attentions of Twins.

- `LocallyGroupedAttention` (LSA): self-attention inside non-overlapping ws x ws windows.
- `GlobalSubsampledAttention` (GSA): every token queries keys and values computed from the
  token map sub-sampled by a strided convolution (plain global attention when sr_ratio is 1).

Both use `F.scaled_dot_product_attention`, which picks the fused kernel the device has, and lay
tensors out so that each attention costs exactly one gather copy in and one copy out. Parameter
names (`qkv`, `q`, `kv`, `sr`, `norm`, `proj`) follow the official checkpoints.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .kernels import conv2d, emulated_autocast_dtype, linear
from .layers import LayerNorm, map_to_tokens, tokens_to_map

Size = Tuple[int, int]


def _check_heads(dim: int, num_heads: int) -> int:
    if dim % num_heads:
        raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
    return dim // num_heads


def _window_key_mask(size: Size, window: int, batch: int, device: torch.device) -> torch.Tensor:
    """Which keys of each window are real tokens rather than padding.

    Returns:
        (batch * windows, 1, 1, window * window) bool mask, True where the key is real.
    """
    H, W = size
    hg, wg = -(-H // window), -(-W // window)
    real = torch.zeros(hg * window, wg * window, dtype=torch.bool, device=device)
    real[:H, :W] = True
    # (hg * ws, wg * ws) -> (hg * wg, ws * ws): the key order inside each window.
    real = real.view(hg, window, wg, window).transpose(1, 2).reshape(hg * wg, window * window)
    return real.repeat(batch, 1).view(batch * hg * wg, 1, 1, window * window)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
              dropout_p: float) -> torch.Tensor:
    """`F.scaled_dot_product_attention` on (..., N, hd) q and (..., M, hd) k, v.

    Under CPU autocast on a CPU without bf16/fp16 kernels (see `kernels`) the fused kernel
    runs in fp32 on the (already rounded) low-precision q, k, v and its output is rounded back,
    instead of the generic low-precision loops.
    """
    emulated = emulated_autocast_dtype(q)
    if emulated is None:
        if mask is None and dropout_p == 0.0 and kernels.flash_attention_applies(q):
            return kernels.flash_attention(q, k, v)[0]  # same forward, fp32-kernel backward
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                             dropout_p=dropout_p)
    return out.to(emulated)


class LocallyGroupedAttention(nn.Module):
    """LSA: multi-head self-attention within non-overlapping windows.

    Any H, W works: the q/k/v maps are padded at the bottom/right to whole windows, padded keys
    are masked out of the softmax, and padded queries are cropped away, so each real token
    attends exactly to the real tokens of its window. (The official segmentation code meant to
    do this but its mask is silently empty when only one side needs padding.)

    Args:
        dim: channels C.
        num_heads: attention heads; C must be divisible by it.
        window_size: window side ws.
        attn_drop: dropout on attention probabilities.
        proj_drop: dropout after the output projection.
    Shapes: (B, N, C), (H, W) -> (B, N, C).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = _check_heads(dim, num_heads)
        self.window_size = window_size
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        B, N, C = x.shape
        H, W = size
        ws, heads, hd = self.window_size, self.num_heads, self.head_dim
        pad_h, pad_w = -H % ws, -W % ws
        if (kernels.chunked_applies(x) and not (pad_h or pad_w)
                and not (self.training and self.attn_drop)):
            # CPU: the tokens go to window order once, before the qkv projection, and back
            # once after the output projection (`kernels.window_attention`); in fp32 under
            # emulated autocast, with the result rounded back as SDPA's would be.
            qkv = linear(kernels.to_windows(x, size, ws), self.qkv)
            out = kernels.window_attention(qkv.to(kernels.compute_dtype(x)), ws * ws, heads)
            out = linear(out.to(qkv.dtype), self.proj)
            return self.proj_drop(kernels.from_windows(out, size, ws))
        if not (isinstance(H, int) and isinstance(W, int)):
            return self._forward_symbolic(x, size)  # exporting with dynamic sizes
        # The Linear runs on the contiguous tokens; padding happens after it, on q/k/v.
        qkv = linear(x, self.qkv).view(B, H, W, 3 * C)
        if pad_h or pad_w:
            qkv = F.pad(qkv, (0, 0, 0, pad_w, 0, pad_h))
        hg, wg = (H + pad_h) // ws, (W + pad_w) // ws
        # (B, hg*ws, wg*ws, 3C) -> (3, B*hg*wg, ws*ws, heads, hd): the single gather copy in;
        # q, k, v are (B*hg*wg, heads, ws*ws, hd) views of it, laid out token-major.
        qkv = qkv.view(B, hg, ws, wg, ws, 3, heads, hd).permute(5, 0, 1, 3, 2, 4, 6, 7)
        q, k, v = qkv.reshape(3, B * hg * wg, ws * ws, heads, hd).transpose(2, 3).unbind(0)
        mask = _window_key_mask(size, ws, B, x.device) if pad_h or pad_w else None
        out = attention(q, k, v, mask, self.attn_drop if self.training else 0.0)
        # (B*hg*wg, heads, ws*ws, hd) -> (B, hg*ws, wg*ws, C): the single copy out (the
        # kernels write their output token-major for token-major queries, so the first
        # reshape is a view).
        out = out.transpose(1, 2).reshape(B, hg, wg, ws, ws, C).permute(0, 1, 3, 2, 4, 5)
        out = out.reshape(B, hg * ws, wg * ws, C)
        if pad_h or pad_w:
            out = out[:, :H, :W].reshape(B, N, C)
        else:
            out = out.view(B, N, C)
        return self.proj_drop(linear(out, self.proj))

    def _forward_symbolic(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        """`forward` for symbolic H, W: torch.export or ONNX export with dynamic sizes.

        One graph must serve every size, so nothing may depend on the sizes' values, nor on
        whether the window grid is a single window: `view` on a symbolic size and
        broadcasting over one ask exactly that. So the image and window indices are
        computed on flat 1-D ranges, and the tokens are gathered into window order (a padded
        position takes its image's first token, and is masked as a key) and gathered back
        from the windows' output; every view merges or splits static sizes only.
        """
        B, N, C = x.shape
        H, W = size
        ws, heads, hd = self.window_size, self.num_heads, self.head_dim
        hg, wg = (H + ws - 1) // ws, (W + ws - 1) // ws  # windows per column and per row
        L = ws * ws  # tokens per window
        ML = hg * wg * L  # window positions per image
        # Position g of the windows: image b, window n (row-major over the grid), place p in
        # it; token row r and column c.
        g = torch.arange(B * ML, device=x.device)
        b = torch.div(g, ML, rounding_mode="floor")
        n, p = (g - b * ML) // L, g % L
        i = torch.div(n, wg, rounding_mode="floor")
        r, c = i * ws + p // ws, (n - i * wg) * ws + p % ws
        real = (r < H) & (c < W)
        token = b * N + torch.where(real, r * W + c, 0)
        # (B*windows*L, 3C) -> (3, B*windows, heads, L, hd)
        qkv = linear(x, self.qkv).view(B * N, 3 * C)[token]
        q, k, v = qkv.view(-1, L, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        mask = real.view(-1, L)[:, None, None, :]
        out = attention(q, k, v, mask, self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).clone(memory_format=torch.contiguous_format).view(-1, C)
        # Token t of image b is at position b*ML + (window, place in it) of the output.
        t = torch.arange(B * N, device=x.device)
        b = torch.div(t, N, rounding_mode="floor")
        h = torch.div(t - b * N, W, rounding_mode="floor")
        w = t - b * N - h * W
        place = b * ML + ((h // ws) * wg + w // ws) * L + (h % ws) * ws + w % ws
        return self.proj_drop(linear(out[place].view(B, N, C), self.proj))

    def forward_residual(self, x: torch.Tensor, size: Size, norm: nn.LayerNorm) -> torch.Tensor:
        """x + self(norm(x), size) at CPU inference (`kernels.inference_applies`), chunked in
        cache (`kernels.window_attention_residual`); maps that need padding take the plain
        path."""
        H, W = size
        ws = self.window_size
        if H % ws or W % ws:
            return x + self(norm(x), size)
        weights = kernels.operands(x, self.qkv.weight, self.qkv.bias, self.proj.weight,
                                    self.proj.bias)
        return kernels.window_attention_residual(x, H, W, ws, self.num_heads, norm.weight,
                                                 norm.bias, norm.eps, *weights,
                                                 kernels.emulated_autocast_dtype(x))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, window_size={self.window_size}"


class GlobalSubsampledAttention(nn.Module):
    """GSA: queries from every token, keys/values from a sub-sampled token map.

    With sr_ratio > 1 the map is reduced by Conv2d(kernel = stride = sr_ratio) and LayerNorm
    (eps 1e-5) before the kv projection; rows/columns that do not fill a whole sr x sr cell are
    dropped by the convolution, as in the official models. With sr_ratio 1 it is full global
    attention and has no `sr`/`norm` parameters.

    Args:
        dim: channels C.
        num_heads: attention heads; C must be divisible by it.
        sr_ratio: sub-sampling ratio of the key/value map.
        attn_drop: dropout on attention probabilities.
        proj_drop: dropout after the output projection.
    Shapes: (B, N, C), (H, W) -> (B, N, C).
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = _check_heads(dim, num_heads)
        self.sr_ratio = sr_ratio
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr: Optional[nn.Conv2d] = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm: Optional[nn.LayerNorm] = LayerNorm(dim)
        else:
            self.sr = None
            self.norm = None

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        B, N, C = x.shape
        heads, hd = self.num_heads, self.head_dim
        k, v = self._keys_values(x, size)
        if (kernels.chunked_applies(x) and self.q.bias is not None
                and not (self.training and self.attn_drop)):
            # CPU: queries computed and attended a chunk at a time (`kernels.query_chunk_attention`).
            return self.proj_drop(linear(kernels.query_chunk_attention(x, self.q, k, v), self.proj))
        # (B, N, C) -> (B, heads, N, hd), a strided view that SDPA reads without a copy.
        q = linear(x, self.q).view(B, N, heads, hd).transpose(1, 2)
        out = attention(q, k, v, None, self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, heads, N, hd) -> (B, N, C)
        return self.proj_drop(linear(out, self.proj))

    def _keys_values(self, x: torch.Tensor, size: Size) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, N, C) tokens -> k, v, each (B, heads, N', hd) strided views of the kv output."""
        B, _, C = x.shape
        src = x
        if self.sr is not None:
            src = self.norm(map_to_tokens(conv2d(tokens_to_map(x, size), self.sr)))  # (B, N', C)
        # (B, N', 2C) -> (2, B, heads, N', hd)
        kv = linear(src, self.kv).view(B, -1, 2, self.num_heads, self.head_dim)
        return kv.permute(2, 0, 3, 1, 4).unbind(0)

    def forward_residual(self, x: torch.Tensor, size: Size, norm: nn.LayerNorm) -> torch.Tensor:
        """x + self(norm(x), size) at CPU inference (`kernels.inference_applies`).

        Keys and values come from the whole (sub-sampled) map first; queries, attention and
        the output projection then run chunk by chunk (`kernels.global_attention_residual`).
        """
        rounding = kernels.emulated_autocast_dtype(x)
        normed = kernels.layer_norm_scratch(x, norm, "gsa.normed", rounding)  # dies with this call
        # k, v and the weights in the compute dtype.
        operands = kernels.operands(x, *self._keys_values(normed, size), self.q.weight,
                                    self.q.bias, self.proj.weight, self.proj.bias)
        return kernels.global_attention_residual(x, normed, *operands, rounding)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, sr_ratio={self.sr_ratio}"
