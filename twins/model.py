"""The Twins network: one generic constructor for Twins-PCPVT and Twins-SVT (ALT-GVT).

A model is a stack of stages. Stage i embeds patches (Conv2d stride patch_sizes[i]) and runs
depths[i] pre-norm transformer blocks, with a positional encoding generator (PEG) after the
first block. With window_sizes[i] == 0 every block uses global sub-sampled attention (PCPVT);
otherwise even blocks use locally-grouped attention and odd blocks global sub-sampled
attention (SVT). Module and parameter names equal the official checkpoints' keys.
"""
import contextlib
import math
from typing import ContextManager, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import host_memory, kernels
from .attention import GlobalSubsampledAttention, LocallyGroupedAttention
from .layers import (DropPath, LayerNorm, Mlp, PatchEmbed, PositionalEncodingGenerator, Size,
                     tokens_to_map)


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x))).

    Args:
        dim: channels C.
        num_heads: attention heads.
        mlp_ratio: MLP hidden channels / C.
        window_size: LSA window side, or 0 for GSA.
        sr_ratio: GSA key/value sub-sampling ratio (unused by LSA).
        drop: dropout after the attention and MLP projections.
        attn_drop: dropout on attention probabilities.
        drop_path: stochastic-depth probability of this block.
        norm_eps: LayerNorm epsilon (1e-6 in the ImageNet models).
    Shapes: (B, N, C), (H, W) -> (B, N, C).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window_size: int = 0,
                 sr_ratio: int = 1, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=norm_eps)
        if window_size:
            self.attn = LocallyGroupedAttention(dim, num_heads, window_size, attn_drop, drop)
        else:
            self.attn = GlobalSubsampledAttention(dim, num_heads, sr_ratio, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        if not self.training and kernels.inference_applies(x):
            # CPU inference: each residual branch runs chunk by chunk in cache.
            # The attention branch returns a fresh tensor; the MLP branch adds into it in place.
            x = self.attn.forward_residual(x, size, self.norm1)
            mlp = self.mlp
            weights = kernels.operands(x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight,
                                        mlp.fc2.bias)
            kernels.mlp_residual_(x, self.norm2.weight, self.norm2.bias, self.norm2.eps,
                                  *weights, kernels.emulated_autocast_dtype(x))
            return x
        x = x + self.drop_path(self.attn(self.norm1(x), size))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _checkpointed(blk: Block, x: torch.Tensor, size: Size) -> torch.Tensor:
    """A gradient-checkpointed block, forward and recomputation: its CPU kernels allocate
    afresh (`kernels.allocate_plainly`) rather than keep pooled buffers mapped between blocks."""
    with kernels.allocate_plainly():
        return blk(x, size)


@contextlib.contextmanager
def _releasing_freed_memory() -> Iterator[None]:
    host_memory.release_freed_memory()
    yield


def _release_before_recomputing() -> Tuple[ContextManager, ContextManager]:
    """`checkpoint`'s context_fn for the first block of each stage on the CPU: nothing around
    the forward; the free pages of glibc's heap go back to the OS before the recomputation.

    By then the later blocks' backward has freed their activations and gradients into the heap,
    in sizes the stage's last recomputation and the previous stage cannot reuse; glibc would
    keep them resident under all that comes after. Releasing them here takes the peak resident
    memory of an SVT-B step at batch 32 from 3,238-3,561 MiB to 2,701-2,878 MiB, for about
    3% of the step's time (docs/throughput.md).
    """
    return contextlib.nullcontext(), _releasing_freed_memory()


def _per_stage(name: str, values: Sequence, num_stages: int) -> List:
    values = list(values)
    if len(values) != num_stages:
        raise ValueError(f"{name} has {len(values)} entries but the model has {num_stages} stages")
    return values


class Twins(nn.Module):
    """Twins-PCPVT / Twins-SVT image classifier and dense-prediction backbone.

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs; 0 gives a model without classifier (head = Identity).
        embed_dims: channels of each stage.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        mlp_ratios: MLP expansion per stage.
        window_sizes: LSA window side per stage; 0 means the stage uses GSA only (PCPVT).
        sr_ratios: GSA key/value sub-sampling ratio per stage.
        patch_sizes: patch-embedding stride per stage.
        peg_kernel_size: kernel side of the positional encoding generator.
        drop_rate: dropout after patch embedding and inside attention/MLP projections.
        attn_drop_rate: dropout on attention probabilities.
        drop_path_rate: stochastic depth of the last block; rises linearly from 0 over blocks.
        norm_eps: epsilon of the block and final LayerNorms.
        out_norms: add a LayerNorm (eps 1e-5) on each stage output for `forward_pyramid`, as
            mmsegmentation's SVT backbone (`norm_after_stage`).
    Shapes: forward (B, in_chans, H, W) -> (B, num_classes); any H, W >= the total stride.
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000,
                 embed_dims: Sequence[int] = (64, 128, 256, 512),
                 depths: Sequence[int] = (3, 4, 6, 3), num_heads: Sequence[int] = (1, 2, 4, 8),
                 mlp_ratios: Sequence[float] = (4, 4, 4, 4),
                 window_sizes: Sequence[int] = (0, 0, 0, 0),
                 sr_ratios: Sequence[int] = (8, 4, 2, 1), patch_sizes: Sequence[int] = (4, 2, 2, 2),
                 peg_kernel_size: int = 3, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_eps: float = 1e-6, out_norms: bool = False):
        super().__init__()
        S = len(embed_dims)
        depths = _per_stage("depths", depths, S)
        heads = _per_stage("num_heads", num_heads, S)
        mlp_ratios = _per_stage("mlp_ratios", mlp_ratios, S)
        windows = [w or 0 for w in _per_stage("window_sizes", window_sizes, S)]
        sr_ratios = _per_stage("sr_ratios", sr_ratios, S)
        self.patch_sizes = _per_stage("patch_sizes", patch_sizes, S)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dims = list(embed_dims)
        self.num_features = self.embed_dims[-1]
        self.grad_checkpointing = False

        in_dims = [in_chans] + self.embed_dims[:-1]
        self.patch_embeds = nn.ModuleList(
            PatchEmbed(in_dims[i], self.embed_dims[i], self.patch_sizes[i]) for i in range(S))
        self.pos_drops = nn.ModuleList(nn.Dropout(drop_rate) for _ in range(S))
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # any default device
        self.blocks = nn.ModuleList()
        for i in range(S):
            first = sum(depths[:i])
            self.blocks.append(nn.ModuleList(
                Block(self.embed_dims[i], heads[i], mlp_ratios[i],
                      window_size=windows[i] if j % 2 == 0 else 0, sr_ratio=sr_ratios[i],
                      drop=drop_rate, attn_drop=attn_drop_rate, drop_path=rates[first + j],
                      norm_eps=norm_eps)
                for j in range(depths[i])))
        # Official key name: pos_block.i.proj.0.*
        self.pos_block = nn.ModuleList(
            PositionalEncodingGenerator(d, peg_kernel_size) for d in self.embed_dims)
        self.out_norms = nn.ModuleList(LayerNorm(d) for d in self.embed_dims) if out_norms else None
        self.norm = LayerNorm(self.num_features, eps=norm_eps)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=d, reduction=math.prod(self.patch_sizes[:i + 1]), module=f"blocks.{i}")
            for i, d in enumerate(self.embed_dims)]
        self.apply(_init_weights)

    # ----------------------------------------------------------------------------- interface
    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """PEG parameters are exempt from weight decay, as in the official code."""
        return {"pos_block." + n for n, _ in self.pos_block.named_parameters()}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them (on the CPU,
        also returning glibc's free heap pages to the OS once per stage in backward)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier by a freshly initialised one (Identity when num_classes is 0)."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"Twins supports global_pool='avg' only, got {global_pool!r}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(_init_weights)

    # ------------------------------------------------------------------------------- forward
    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected a (B, {self.in_chans}, H, W) image batch, got shape {tuple(x.shape)}")
        H, W = x.shape[2:]
        for p in self.patch_sizes:
            H, W = H // p, W // p
        if H < 1 or W < 1:
            stride = math.prod(self.patch_sizes)
            raise ValueError(f"input {x.shape[2]}x{x.shape[3]} is smaller than the network's total "
                             f"stride {stride}: give at least {stride}x{stride} pixels")

    def _stage(self, i: int, x: torch.Tensor, size: Optional[Size]) -> Tuple[torch.Tensor, Size]:
        """Stage i: (B, N, C) tokens of the previous stage (or the image for i = 0) -> tokens."""
        if i > 0:
            x = tokens_to_map(x, size)  # (B, N, C) -> (B, C, H, W), channels-last view
        x, size = self.patch_embeds[i](x)
        x = self.pos_drops[i](x)
        # On the CPU, eager (a compiled checkpoint takes no context_fn).
        release = x.device.type == "cpu" and not torch.compiler.is_compiling()
        for j, blk in enumerate(self.blocks[i]):
            if self.grad_checkpointing and torch.is_grad_enabled():
                if j == 0 and release:
                    x = checkpoint(_checkpointed, blk, x, size, use_reentrant=False,
                                   context_fn=_release_before_recomputing)
                else:
                    x = checkpoint(_checkpointed, blk, x, size, use_reentrant=False)
            else:
                x = blk(x, size)
            if j == 0:
                x = self.pos_block[i](x, size)
        return x, size

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, N, C) normalised tokens of the last stage."""
        self._check_input(x)
        size = None
        for i in range(len(self.blocks)):
            x, size = self._stage(i, x, size)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, N, C) tokens -> (B, C) pooled features if pre_logits else (B, num_classes)."""
        x = x.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_pyramid(self, x: torch.Tensor,
                        out_indices: Sequence[int] = (0, 1, 2, 3)) -> List[torch.Tensor]:
        """Stage outputs for dense prediction.

        Args:
            x: (B, in_chans, H, W) images.
            out_indices: which stages to return (0-based); stages after the last are skipped.
        Returns:
            One (B, C_i, H_i, W_i) map per index at stride 4, 8, 16, 32 (for the default patch
            sizes), channels-last in memory, after the stage LayerNorm when `out_norms` is set.
        """
        self._check_input(x)
        wanted = sorted(set(out_indices))
        if not wanted or wanted[0] < 0 or wanted[-1] >= len(self.blocks):
            raise ValueError(f"out_indices must be within 0..{len(self.blocks) - 1}, got {tuple(out_indices)}")
        outs: Dict[int, torch.Tensor] = {}
        size = None
        for i in range(wanted[-1] + 1):
            x, size = self._stage(i, x, size)
            if i in wanted:
                y = self.out_norms[i](x) if self.out_norms is not None else x
                outs[i] = tokens_to_map(y, size)
        return [outs[i] for i in out_indices]


def _init_weights(m: nn.Module) -> None:
    """The official initialisation: truncated-normal Linear, He-normal (fan-out) convolutions."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
