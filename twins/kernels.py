"""CPU fast paths of the model, each equal to the plain modules it replaces.

Three facts about CPUs drive them (measured with `benchmark.py --profile`):

1. Fresh memory is expensive. PyTorch's CPU allocator has no cache: every large activation
   (above glibc's mmap threshold, at most 32 MiB) is mapped fresh and page-faulted in, and an
   operation that streams a 100 MB activation through memory runs at memory speed, not at
   matmul speed. The MLP, the window attention's backward, the global sub-sampled attention
   and (at inference) whole residual branches and the patch embedding therefore work through
   the tokens in chunks whose temporaries stay in cache and live in per-thread scratch buffers
   reused from call to call; at inference the MLP branch adds into the attention branch's
   output in place. In training, the full-size tensors these kernels allocate every step
   (outputs, saved activations, input gradients) come from a pool of storages, each reused
   once nothing refers to it any more (`reusable_empty`), and the MLP backward keeps glibc's
   heap from shrinking between steps (`host_memory.hold_heap_top`), which keeps the pages of
   the activations these kernels do not allocate too (inductor's, in a compiled step).
   (`benchmark.py` reports the memory each step faults in.)
2. `F.linear` runs as `addmm`, which first copies the broadcast bias into a fresh output and
   then accumulates the product into it. oneDNN's linear (`mkldnn::_linear_pointwise`, the op
   torch.compile's CPU backend emits) adds the bias inside the matmul, and on the Zen 4 CPU
   measured its fp32 matmul is faster than MKL's on the chunk shapes, on down projections
   even with a copy of its fresh output into place (`_onednn_output`). (oneDNN can fuse the
   exact-erf GELU too, but its erf epilogue is slower than a separate in-place GELU pass, and
   in bf16 it rounds differently from autocast.)
3. Low precision depends on the CPU. With bf16 instructions (AVX512-BF16, AMX) the chunked
   kernels compute in bf16 (`compute_dtype`): the same bf16 matmuls autocast would run, on
   chunk-sized operands, with parameter gradients summed in fp32; the flash-attention backward
   runs in fp32 on the exact bf16 operands, PyTorch's bf16 backward kernel being 4-6x slower
   on 49-token windows. Without them (AVX2), low-precision matmuls and convolutions fall back
   to generic loops 10-20x slower than fp32; there an autocast op is computed in fp32 on
   operands rounded to the autocast dtype, and its result rounded to that dtype: the numbers a
   native low-precision kernel gives (products of bf16/fp16 values are exact in fp32, and such
   kernels accumulate in fp32), at fp32 speed.

The fast paths run in eager mode on the CPU. Under torch.compile the inference residual
branches and the training kernels (MLP, window attention, global attention, PEG) run as custom ops
(inductor compiles the code around them and calls them); everything else, and everything
under tracing, export or on CUDA, is standard aten ops: on CUDA the caching allocator and the
standard kernels already do the right thing. Where PyTorch needs several element-wise passes
that one pass could do, a native kernel (`native.py`) does it if it could be built, and the
PyTorch passes run otherwise.
"""
import contextlib
import math
import threading
from typing import ContextManager, Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import host_memory, native


_MKLDNN = torch.backends.mkldnn.is_available()
# Whether this CPU has native low-precision kernels (a constant, so torch.compile can inline it).
_CPU_NATIVE = {torch.bfloat16: _MKLDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported(),
               torch.float16: _MKLDNN and torch.ops.mkldnn._is_mkldnn_fp16_supported()}

# Tokens per chunk of the chunked kernels. Their temporaries stay chunk-sized (8,192 x 4C
# floats: 8 MiB at C = 64) and live in reused buffers; the matmuls see tall operands and the
# loops few iterations. 2,048 kept the MLP's hidden chunk in cache, but whole steps measured
# 4-10% slower, in inference and training alike (alternating runs, SVT-S and PCPVT-S, fp32
# and bf16).
CHUNK_ROWS = 8192

# Query elements (tokens x channels) per chunk of the window attention backward, at most. The
# fp32 flash backward's operands (cast from bf16 in bf16 training) and the gradients it returns
# take about 32 bytes per element: 4 MiB a chunk, where CHUNK_ROWS tokens of 256 channels took
# 64 MiB, more than the L3 cache (32 MiB on the Zen 4 EPYC). Against chunks of CHUNK_ROWS
# tokens, SVT-S's window attention backward at batch 32 took 176 ms instead of 211 per bf16
# step (Zen 4, kernels timed alternately), and whole bf16 steps 1.011x as fast (paired median,
# alternating in one process); in fp32, where the operands are views rather than cast copies,
# 198-218 ms against 208-210, and whole steps 1.005x: no gain. The global attention's backward
# keeps chunks of CHUNK_ROWS tokens: there a chunk holds few (image, head) pairs, the flash
# kernel's unit of parallel work, and PCPVT-S's (one or two heads in the first stages) took
# 448 ms instead of 367 per bf16 step in chunks bounded so.
ATTENTION_BACKWARD_ELEMENTS = 2 ** 17


def attention_backward_rows(channels: int) -> int:
    """Query tokens per chunk of the window attention backward for `channels` channels."""
    return max(1, min(CHUNK_ROWS, ATTENTION_BACKWARD_ELEMENTS // channels))


def enabled(x: torch.Tensor) -> bool:
    """Whether the CPU fast paths apply to x (eager CPU; never under tracing or compile)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False  # checked first: torch.compile must not trace the checks below
    return x.device.type == "cpu" and _MKLDNN


def compute_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype the chunked kernels compute in for x, or None where they do not apply.

    fp32 for plain fp32 and under emulated autocast (they round like a low-precision kernel
    there); bf16 under bf16 autocast on a CPU with bf16 kernels (AVX512-BF16/AMX), where they
    run the same bf16 matmuls as autocast would, on chunk-sized operands. Under torch.compile
    the training kernels apply (custom ops, see below), where the CPU has native kernels for
    the dtype; not under export, whose graphs hold standard ops only.
    """
    if torch.compiler.is_compiling():
        if (torch.compiler.is_exporting() or x.device.type != "cpu" or not _MKLDNN
                or not torch.is_grad_enabled() or emulated_autocast_dtype(x) is not None):
            return None
        return _kernel_dtype(x)
    return _kernel_dtype(x) if enabled(x) else None


def _kernel_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """`compute_dtype` without the check that the fast paths are enabled."""
    if not torch.is_autocast_enabled("cpu"):
        return torch.float32 if x.dtype == torch.float32 else None
    dtype = torch.get_autocast_dtype("cpu")
    if not _CPU_NATIVE.get(dtype, True):
        return torch.float32  # emulated
    return dtype if dtype == torch.bfloat16 else None


def chunked_applies(x: torch.Tensor) -> bool:
    """Whether the chunked kernels take x (see `compute_dtype`)."""
    return compute_dtype(x) is not None


def operands(x: torch.Tensor,
             *tensors: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    """The tensors as the chunked kernels take them for input x: in the dtype they compute in
    (`compute_dtype`, also under torch.compile for the inference branches), rounded to the
    autocast dtype under emulation. Differentiable (casts, as autocast's own)."""
    rounding, dtype = emulated_autocast_dtype(x), _kernel_dtype(x)
    return tuple(None if t is None else _round_to(t, rounding).to(dtype) for t in tensors)


def emulated_autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The CPU autocast dtype when this CPU lacks native kernels for it (see above), else None."""
    if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return None
    dtype = torch.get_autocast_dtype("cpu")
    return None if _CPU_NATIVE.get(dtype, True) else dtype


def _round_to(t: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    """t rounded to `dtype` and held in fp32 (exact: fp32 represents every bf16/fp16 value)."""
    return t if t is None or dtype is None else t.to(dtype).float()


def _round_(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """Round an fp32 tensor to `dtype` in place (kept in fp32); no-op when dtype is None. One
    native pass where built (the same bits), else a cast there and back (also under
    torch.compile, which traces standard ops only). A tensor of `dtype` is returned as it is."""
    if dtype is None or t.dtype == dtype:
        return t
    native_applies = (t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"
                      and not torch.compiler.is_compiling())
    fused = native.ops() if native_applies else None
    if fused is None:
        return t.copy_(t.to(dtype))
    fused.round_(t, dtype)
    return t


_SCRATCH = threading.local()  # per thread: {(slot, device, dtype, inference mode): 1-D buffer}


def scratch(slot: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """A (rows, cols) buffer for chunk temporaries, reused by every later call with the same
    slot in this thread, so that they are not freshly mapped and page-faulted each time.

    Callers never return it or save it for backward; one slot serves one use at a time.
    """
    pool: Dict = _SCRATCH.__dict__.setdefault("pool", {})
    key = (slot, like.device, like.dtype, torch.is_inference_mode_enabled())
    buf = pool.get(key)
    if buf is None or buf.numel() < rows * cols:
        buf = pool[key] = like.new_empty(rows * cols)
    return buf[:rows * cols].view(rows, cols)


# The reference count of a storage (every tensor, view, saved tensor and gradient on it holds
# one); None where this PyTorch lacks it, and `reusable_empty` then allocates afresh.
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


class _Reusable(threading.local):
    """Per thread: the storages `reusable_empty` hands out, by (bytes, device); the call count
    at which each size was last asked for; and the period, the most calls seen between two
    asks for one size (a training step's worth, once training runs)."""

    def __init__(self):
        self.enabled = True  # False within `allocate_plainly`
        self.storages: Dict[Tuple[int, torch.device], list] = {}
        self.last_call: Dict[Tuple[int, torch.device], int] = {}
        self.calls = 0
        self.period = 0


_REUSABLE = _Reusable()


@contextlib.contextmanager
def allocate_plainly() -> Iterator[None]:
    """Within: `reusable_empty` allocates afresh, in this thread, also in the backward of what
    runs within. For gradient-checkpointed blocks, whose point is to hold no memory between
    blocks: the pooled buffers of every size would stay mapped."""
    pool = _REUSABLE
    before, pool.enabled = pool.enabled, False
    try:
        yield
    finally:
        pool.enabled = before


def pooling(reuse: bool) -> ContextManager:
    """Within: pooling as a training kernel's forward recorded it (`reuse`), for its backward,
    which runs outside `allocate_plainly`: there what it calls neither pools nor holds
    glibc's heap (`_onednn_linear`)."""
    return contextlib.nullcontext() if reuse else allocate_plainly()


def reuse_enabled() -> bool:
    """Whether `reusable_empty` pools in this thread now (see `allocate_plainly`); training
    kernels record it in forward for their backward."""
    return _REUSABLE.enabled


def reusable_empty(shape: Tuple[int, ...], like: torch.Tensor, dtype: Optional[torch.dtype] = None,
                   reuse: Optional[bool] = None) -> torch.Tensor:
    """`like.new_empty(shape, dtype=dtype)`, in memory that is already paged in when it can
    be: for the full-size tensors the training kernels allocate every step (their outputs,
    the activations they save, the input gradients of their backward), and the outputs of
    the inference residual branches, patch embedding and PEG.

    A caching allocator for these tensors, as CUDA's is for every tensor. Each storage stays
    in a per-thread pool and is handed out again only when the pool's reference is the last
    one: no tensor, view, saved tensor or gradient still uses it, so a buffer is never shared.
    The storages of sizes no longer asked for are released (`_release_stale`). With `reuse`
    False (default: `reuse_enabled()`) the tensor is allocated afresh.
    """
    dtype = like.dtype if dtype is None else dtype
    if _storage_use_count is None or not (reuse_enabled() if reuse is None else reuse):
        return like.new_empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    key = (nbytes, like.device)
    pool = _REUSABLE
    pool.calls += 1
    if key in pool.last_call:
        pool.period = max(pool.period, pool.calls - pool.last_call[key])
    pool.last_call[key] = pool.calls
    storages = pool.storages.setdefault(key, [])
    storage = next((s for s in storages if _storage_use_count(s._cdata) == 1), None)
    if storage is None or pool.calls % 64 == 0:  # a new storage, or now and then
        _release_stale(pool)
    if storage is None:
        storage = torch.empty(nbytes, dtype=torch.uint8, device=like.device).untyped_storage()
        storages.append(storage)
    return torch.empty(0, dtype=dtype, device=like.device).set_(storage, 0, shape)


def _release_stale(pool: _Reusable) -> None:
    """Release the free storages of sizes not asked for within the last two periods: the
    sizes of an earlier input size. (At one input size, every size is asked for once per
    step or more often, and once the period is known no storage is released.)

    A released size keeps its last call, so that asking for it again measures the period:
    at inference nothing stays busy, and the first pass releases each size before it is asked
    for again. Only beyond `_MAX_SIZES` sizes are the oldest released ones forgotten.
    """
    for key, call in list(pool.last_call.items()):
        if pool.calls - call <= 2 * pool.period:
            continue
        busy = [s for s in pool.storages.get(key, ()) if _storage_use_count(s._cdata) > 1]
        if busy:
            pool.storages[key] = busy
        else:
            pool.storages.pop(key, None)
    if len(pool.last_call) > _MAX_SIZES:
        released = sorted((k for k in pool.last_call if k not in pool.storages),
                          key=pool.last_call.get)
        for key in released[:len(pool.last_call) - _MAX_SIZES // 2]:
            del pool.last_call[key]


_MAX_SIZES = 1024  # sizes whose last call `_release_stale` keeps


# Whether fp32 chunk matmuls run oneDNN's matmul where it was measured faster than MKL's
# sgemm (`_onednn_output`; a switch for tools/inference_ab.py --compare onednn).
ONEDNN_MATMULS = True


def _onednn_output(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x W^T may run as oneDNN's matmul rather than MKL's sgemm (which `addmm` and
    `mm` run): in fp32 on the CPU, for an output below `ALWAYS_MAPPED_BYTES`, which oneDNN
    allocates and glibc then takes from its heap rather than from fresh pages. On SVT-S's and
    PCPVT-S's shapes, in chunks of 8,192 rows (Zen 4, where MKL does not run its AVX-512 code),
    sgemm took 0.99-1.14x as long as oneDNN's matmul, and 1.08-1.31x as long on the down
    projections even with oneDNN's fresh output copied into place afterwards. Not measured on
    an Intel CPU nor on an AVX2-only one."""
    return (ONEDNN_MATMULS and x.dtype == weight.dtype == torch.float32
            and x.device.type == "cpu" and _MKLDNN
            and x.shape[0] * weight.shape[0] * x.element_size() < ALWAYS_MAPPED_BYTES)


def _onednn_down_projection(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """`_onednn_output` for more input than output features (fc2, and the input gradients of
    fc1 and of the q/k/v projections), where oneDNN wins even with a copy of its output."""
    return weight.shape[1] > weight.shape[0] and _onednn_output(x, weight)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x W^T (+ b) (+ residual) by oneDNN's matmul, bias and residual in its epilogue, into a
    fresh output; then, where the pool is in use (not in checkpointed blocks, which give
    memory back instead), glibc's heap is held at its top (`host_memory.hold_heap_top`), so
    that later chunks and steps reuse the output's pages. Without that, glibc trimmed the heap
    and every fp32 SVT-S inference step page-faulted 196 MiB in afresh and ran 1.10x slower."""
    if residual is None:
        out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    else:
        out = torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    if reuse_enabled():
        host_memory.hold_heap_top()
    return out


def linear_chunk(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 buffer: torch.Tensor) -> torch.Tensor:
    """x W^T (+ b) for a 2-D chunk whose result the caller reads and lets go: oneDNN's fresh
    output where `_onednn_output` holds, else written into `buffer`. Taken by fc1 at inference
    (whole fp32 steps 1.02-1.03x as fast for SVT-S and PCPVT-S, level for SVT-B) and by the MLP
    backward for the gradient of the GELU output (fp32 training steps 1.01x and 1.02x); the
    q/k/v projections at inference gained nothing measurable and keep sgemm."""
    if _onednn_output(x, weight):
        return _onednn_linear(x, weight, bias)
    return linear_into(x, weight, bias, buffer)


def linear_into(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                out: torch.Tensor) -> torch.Tensor:
    """out = x W^T (+ b) for 2-D x, written into the given buffer (no fresh allocation but,
    for fp32 down projections, oneDNN's chunk-sized output: `_onednn_down_projection`)."""
    if _onednn_down_projection(x, weight):
        return out.copy_(_onednn_linear(x, weight, bias))
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def matmul_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = a @ b for 2-D a (M, K) and b (K, N): for a down projection (K > N) in fp32, by
    `linear_into` in chunks of CHUNK_ROWS rows (the input gradients of the q/k/v projections),
    else by one `mm`."""
    if not _onednn_down_projection(a[:CHUNK_ROWS], b.t()):
        return torch.mm(a, b, out=out)
    b_t = b.t().contiguous()
    for s, e in chunks(a.shape[0], CHUNK_ROWS):
        linear_into(a[s:e], b_t, None, out[s:e])
    return out


def residual_linear_into(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         residual: torch.Tensor, out: torch.Tensor,
                         rounding: Optional[torch.dtype] = None) -> torch.Tensor:
    """out = residual + (x W^T + b) for 2-D chunks, with no fresh allocation; `out` may be
    `residual` itself. With weights in a lower precision than the residual (bf16 autocast),
    or with `rounding` (emulated autocast), the branch is rounded to that dtype first, as
    `residual + layer(x)` under autocast."""
    if rounding is None and out.dtype == weight.dtype == residual.dtype:
        if _onednn_down_projection(x, weight):  # fc2: bias and residual in oneDNN's epilogue
            return out.copy_(_onednn_linear(x, weight, bias, residual))
        # out = residual + b, then the matmul accumulates into it: one pass over the chunk
        # besides the matmul, where the bias copy and a residual add took two (fp32 inference
        # 1-2% faster, SVT-S/L and PCPVT-S). Only the order of the sums differs.
        if bias is not None:
            torch.add(residual, bias, out=out)
        elif out.data_ptr() != residual.data_ptr():
            out.copy_(residual)
        return out.addmm_(x, weight.t())
    # Low precision: the branch goes to a scratch chunk first, computed in the weights' dtype
    # or rounded to `rounding` (emulated autocast).
    y = linear_into(x, weight, bias, scratch("residual.branch", x.shape[0], weight.shape[0], weight))
    return torch.add(residual, _round_(y, rounding), out=out)


def cast_chunk(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A chunk in the dtype of `like` (the compute dtype): a cache-sized copy when it differs."""
    return t if t.dtype == like.dtype else t.to(like.dtype)


def accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, with acc possibly of a wider dtype (fp32 sums of bf16 products)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    else:
        acc += torch.mm(a, b)


def chunks(total: int, step: int) -> Iterator[Tuple[int, int]]:
    """(start, end) of the fewest consecutive chunks of at most `step` items covering `total`,
    of equal size as far as possible (no small tail chunk for the matmuls)."""
    count = -(-total // step)
    size = -(-total // count) if count else 0
    return ((s, min(s + size, total)) for s in range(0, total, size or 1))


# ------------------------------------------------------------------------------------ linear
# glibc's malloc maps every block of this size or more afresh (32 MiB is the most its mmap
# threshold rises to on 64-bit), so each such tensor is page-faulted in anew every time it is
# allocated; smaller ones come from its heap, mostly paged in already.
ALWAYS_MAPPED_BYTES = 32 * 2 ** 20


class _OneDnnLinear(torch.autograd.Function):
    """y = x W^T + b for training: oneDNN's matmul with the bias in its epilogue, and the usual
    matmuls in backward. Takes 2-D fp32 x (M, K), W (N, K), b (N,) or None.

    Outputs of `ALWAYS_MAPPED_BYTES` or more come from the pool instead (`reusable_empty`,
    with the bias added by `addmm`): at batch 32, SVT-S's q/k/v projections of the first two
    stages (74 and 37 MiB; the first took 35 ms, now 16), which made its fp32 training step
    2.5% faster (alternating runs). Pooling the outputs of 16 MiB or more made it slower.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.has_bias, ctx.reuse = bias is not None, reuse_enabled()
        ctx.save_for_backward(x, weight)
        shape = (x.shape[0], weight.shape[0])
        if ctx.reuse and math.prod(shape) * x.element_size() >= ALWAYS_MAPPED_BYTES:
            return linear_into(x, weight, bias, reusable_empty(shape, x, reuse=True))
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            with pooling(ctx.reuse):
                grad_x = matmul_into(grad, weight, reusable_empty(x.shape, x, reuse=ctx.reuse))
        grad_w = grad.t() @ x if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """`layer(x)`; the fast path on CPUs.

    Same semantics as the plain module under autocast: the result has the autocast dtype.
    Shapes: (..., in_features) -> (..., out_features).
    """
    emulated = emulated_autocast_dtype(x)
    fast = enabled(x)
    if emulated is None and (not fast or x.dtype != torch.float32
                             or torch.is_autocast_enabled(x.device.type)):
        return layer(x)
    weight, bias = layer.weight, layer.bias
    x, weight, bias = _round_to(x, emulated), _round_to(weight, emulated), _round_to(bias, emulated)
    x2d = x.reshape(-1, x.shape[-1])  # (..., K) -> (M, K)
    with torch.autocast("cpu", enabled=False):
        if not fast:  # emulation under torch.compile / tracing: standard ops only
            out = F.linear(x2d, weight, bias)
        elif torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            out = _OneDnnLinear.apply(x2d, weight, bias)
        else:
            out = torch.ops.mkldnn._linear_pointwise(x2d, weight, bias, "none", [], "")
    out = out.view(*x.shape[:-1], out.shape[-1])
    return out if emulated is None else out.to(emulated)


# --------------------------------------------------------------------------------------- MLP
def _mlp_chunks(x, w1, b1, w2, b2, out, pre=None, rounding=None, norm=None,
                residual=False, act=None) -> None:
    """out = fc2(GELU(fc1(norm(x)))) (+ x) chunk by chunk, with chunk-sized temporaries.

    x (M, C); w1, b1, w2, b2 and (unless `residual`) out (M, C_out) in the compute dtype; `pre`
    and `act` (M, H) receive fc1's and the GELU's output when given (saved for backward), else
    chunk-sized buffers hold them. `rounding` rounds fc1's input (from `norm`) and output, the
    GELU and (with `residual`) fc2's output as bf16/fp16 autocast kernels would (None: no
    rounding). `norm` (the weight, bias and eps of a LayerNorm applied to each chunk first) and
    `residual` are for inference only; with `residual`, out may be x itself.
    """
    M, H = x.shape[0], w1.shape[0]
    rows = min(CHUNK_ROWS, M)
    hidden = scratch("mlp.hidden", rows, H, w1)  # the weights carry the compute dtype
    act_chunk = scratch("mlp.act", rows, H, w1) if pre is not None else hidden
    for s, e in chunks(M, CHUNK_ROWS):
        h = pre[s:e] if pre is not None else hidden[:e - s]
        g = act[s:e] if act is not None else act_chunk[:e - s]
        xs = x[s:e] if norm is None else _normed(x[s:e], norm, rounding, "mlp.normed")
        if pre is None and act is None:  # inference: fc1's output is read by the GELU only
            h = g = linear_chunk(cast_chunk(xs, w1), w1, b1, h)
        else:
            linear_into(cast_chunk(xs, w1), w1, b1, h)
        _round_(h, rounding)
        torch.ops.aten.gelu.out(h, out=g)
        _round_(g, rounding)
        if residual:
            residual_linear_into(g, w2, b2, x[s:e], out[s:e], rounding)
        else:
            linear_into(g, w2, b2, out[s:e])


# The training kernels (MLP, window attention, global sub-sampled attention, and the PEG
# further below) are custom ops with their backward registered (`torch.library`), in eager
# mode and under torch.compile alike: inductor compiles the code around them (LayerNorms,
# residual adds, layout copies) and calls them, rather than tracing their loops or replacing
# them by standard ops. Each forward op returns what its backward needs besides its inputs;
# `rounding` is the emulated autocast dtype (None where the CPU has native kernels, and always
# under torch.compile), and `reuse` whether full-size tensors come from the pool
# (`reusable_empty`; off in checkpointed blocks).


def _runs_training_op(*tensors: torch.Tensor) -> bool:
    """Whether a kernel runs as its training op for these inputs: under torch.compile (where
    `compute_dtype` applies the kernels with grad enabled only), or where autograd records
    an operation on one of them."""
    return torch.compiler.is_compiling() or (torch.is_grad_enabled()
                                             and any(t.requires_grad for t in tensors))


def _saved_outputs_only(ctx, outputs) -> None:
    """Mark outputs returned only for backward as such: no gradient flows into them, and
    backward gets None for them instead of zeros (filling a zero tensor of every saved
    activation cost 12% of an fp32 SVT-S training step)."""
    ctx.mark_non_differentiable(*outputs)
    ctx.set_materialize_grads(False)


@torch.library.custom_op("twins::mlp_train", mutates_args=())
def mlp_train(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
              b2: torch.Tensor, rounding: Optional[torch.dtype],
              reuse: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training form of `mlp`: out, fc1's output and, in bf16, the GELU's output (saved for
    backward at half the bytes: 3-6% faster steps measured on SVT-S and PCPVT-S, whose wider
    MLPs spend more on the GELU; in fp32 no gain, at twice the memory, so backward recomputes
    it chunk by chunk, in the native pass that also forms its gradient where that is built, and
    the third output is empty).

    Takes 2-D x (M, C), fc1 W1 (H, C), b1 (H,), fc2 W2 (C_out, H), b2 (C_out,), all in the
    compute dtype (fp32 or bf16). Returns (M, C_out), (M, H), (M, H) or (0, 0).
    """
    out = reusable_empty((x.shape[0], w2.shape[0]), x, reuse=reuse)
    pre = reusable_empty((x.shape[0], w1.shape[0]), x, reuse=reuse)
    act_shape = _mlp_act_shape(x, w1)
    act = reusable_empty(act_shape, x, reuse=reuse) if act_shape[0] else x.new_empty(act_shape)
    _mlp_chunks(x, w1, b1, w2, b2, out, pre, rounding, act=act if act.numel() else None)
    return out, pre, act


def _mlp_act_shape(x: torch.Tensor, w1: torch.Tensor) -> Tuple[int, int]:
    return (0, 0) if x.dtype == torch.float32 else (x.shape[0], w1.shape[0])


@mlp_train.register_fake
def _(x, w1, b1, w2, b2, rounding, reuse):
    return (x.new_empty(x.shape[0], w2.shape[0]), x.new_empty(x.shape[0], w1.shape[0]),
            x.new_empty(_mlp_act_shape(x, w1)))


@torch.library.custom_op("twins::mlp_train_backward", mutates_args=())
def mlp_train_backward(grad_out: torch.Tensor, x: torch.Tensor, w1: torch.Tensor,
                       w2: torch.Tensor, pre: torch.Tensor, act: torch.Tensor,
                       rounding: Optional[torch.dtype], reuse: bool
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                  torch.Tensor]:
    """Gradients of x, W1, b1, W2, b2 for `mlp_train`, a chunk of tokens at a time; parameter
    gradients are summed over chunks in fp32 (bf16 products, fp32 sums) and returned in the
    dtype of the weights. On the CPU, with the pool in use, it first holds glibc's heap at its
    top (`host_memory.hold_heap_top`): the first MLP backward of a step comes right after the
    forward, at the heap's largest."""
    if reuse and x.device.type == "cpu":
        host_memory.hold_heap_top()
    grad_out = grad_out.to(x.dtype).contiguous()
    M, H = pre.shape
    grad_h = scratch("mlp.grad_h", min(CHUNK_ROWS, M), H, x)
    grad_x = reusable_empty(x.shape, x, reuse=reuse)
    f32 = torch.float32
    grad_w1, grad_b1 = torch.zeros_like(w1, dtype=f32), w1.new_zeros(H, dtype=f32)
    grad_w2, grad_b2 = torch.zeros_like(w2, dtype=f32), grad_out.sum(0).float()
    recompute = not act.numel()  # fp32: the GELU output is recomputed, not saved
    # There one native pass (if built) recomputes it, turns dh into the gradient of fc1's
    # output and sums that into grad_b1, where PyTorch takes three.
    fused = native.ops() if recompute and rounding is None else None
    # dy @ w2 and dh @ w1 as linears (weights (H, C_out) and (C, H)), transposed once here
    w2_t, w1_t = w2.t().contiguous(), w1.t().contiguous()
    with pooling(reuse):  # checkpointed blocks: fresh outputs, no heap hold
        for s, e in chunks(M, CHUNK_ROWS):
            dy = grad_out[s:e]
            dh = linear_chunk(dy, w2_t, None, grad_h[:e - s])  # gradient of the GELU output
            g = scratch("mlp.act", e - s, H, x) if recompute else act[s:e]
            if fused is not None:
                fused.gelu_backward_(pre[s:e], dh, g, grad_b1)
            else:
                if recompute:
                    torch.ops.aten.gelu.out(pre[s:e], out=g)
                    _round_(g, rounding)
                torch.ops.aten.gelu_backward.grad_input(dh, pre[s:e], grad_input=dh)
                grad_b1 += dh.sum(0)  # reductions accumulate in fp32 whatever the dtype
            accumulate_mm(grad_w2, dy.t(), g)
            accumulate_mm(grad_w1, dh.t(), x[s:e])
            linear_into(dh, w1_t, None, grad_x[s:e])
    return (grad_x,) + tuple(g.to(w1.dtype) for g in (grad_w1, grad_b1, grad_w2, grad_b2))


@mlp_train_backward.register_fake
def _(grad_out, x, w1, w2, pre, act, rounding, reuse):
    return (torch.empty_like(x), torch.empty_like(w1), w1.new_empty(w1.shape[0]),
            torch.empty_like(w2), w2.new_empty(w2.shape[0]))


def _mlp_train_setup(ctx, inputs, output):
    x, w1, _, w2, _, ctx.rounding, ctx.reuse = inputs
    ctx.save_for_backward(x, w1, w2, output[1], output[2])
    _saved_outputs_only(ctx, output[1:])


def _mlp_train_grad(ctx, grad_out, grad_pre, grad_act):
    if grad_out is None:  # the output took no part in the loss
        return (None,) * 7
    return mlp_train_backward(grad_out, *ctx.saved_tensors, ctx.rounding, ctx.reuse) + (None, None)


mlp_train.register_autograd(_mlp_train_grad, setup_context=_mlp_train_setup)


def mlp_applies(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear) -> bool:
    """Whether `mlp` takes the chunked path for x (else callers use the plain modules)."""
    return fc1.bias is not None and fc2.bias is not None and chunked_applies(x)


def mlp(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear) -> torch.Tensor:
    """fc2(GELU(fc1(x))) on the CPU, chunked over tokens; see `mlp_applies`.

    Same semantics as the plain modules, under emulated autocast too (result in the autocast
    dtype). Shapes: (..., C) -> (..., C_out).
    """
    rounding = emulated_autocast_dtype(x)
    x2d, w1, b1, w2, b2 = operands(x, x.reshape(-1, x.shape[-1]), fc1.weight, fc1.bias,
                                   fc2.weight, fc2.bias)
    x2d = x2d.contiguous()  # (..., C) -> (M, C)
    with torch.autocast("cpu", enabled=False):
        if _runs_training_op(x2d, w1):
            out = mlp_train(x2d, w1, b1, w2, b2, rounding, reuse_enabled())[0]
        else:
            out = x2d.new_empty(x2d.shape[0], w2.shape[0])
            _mlp_chunks(x2d, w1, b1, w2, b2, out, rounding=rounding)
    out = out.view(*x.shape[:-1], out.shape[-1])
    return out if rounding is None else out.to(rounding)


# ------------------------------------------------------------------------- window attention
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _flash_backward(do, q, k, v, o, lse):
    """dq, dk, dv of the CPU flash attention, always computed by its fp32 kernel.

    The bf16 backward kernel runs 4-6x slower than the fp32 one on windows of 49 tokens (AMX
    machine, measured); bf16 operands are exact in fp32, and a bf16 kernel accumulates in fp32
    too. The gradients come back in fp32; callers round them where they store them.
    """
    if q.dtype != torch.float32:
        do, q, k, v, o = (t.float() for t in (do, q, k, v, o))
    B, H, L, _ = q.shape
    split = torch.get_num_threads() // (B * H)
    if B == 1 and split > 1 and L % split == 0 and L // split >= _MIN_SPLIT_QUERIES:
        return _flash_backward_split(do, q, k, v, o, lse, split)
    return _flash_backward_op(do, q, k, v, o, lse, 0.0, False)


# Queries per piece below which `_flash_backward` does not split one image's queries further.
_MIN_SPLIT_QUERIES = 256


def _flash_backward_split(do, q, k, v, o, lse, split: int):
    """`_flash_backward` of one image (B = 1) with its queries split into `split` pieces that
    the kernel sees as images of their own, each attending to the same keys and values: the
    kernel runs one thread per image and head, so a single-head chunk (PCPVT's first stage)
    would otherwise use one core. The pieces' key and value gradients are summed."""
    def pieces(t):  # (1, H, L, ...) -> (split, H, L / split, ...), a view
        return t[0].unflatten(1, (split, -1)).transpose(0, 1)

    keys, values = (t.expand(split, *t.shape[1:]).contiguous() for t in (k, v))
    dq, dk, dv = _flash_backward_op(pieces(do), pieces(q), keys, values, pieces(o), pieces(lse),
                                    0.0, False)
    return dq.transpose(0, 1).flatten(1, 2)[None], dk.sum(0, keepdim=True), dv.sum(0, keepdim=True)


def _token_major(t: torch.Tensor) -> torch.Tensor:
    """t (B, H, L, D) laid out as (B, L, H, D) in memory, the layout the CPU flash kernels
    write for such inputs (a copy only when t is laid out otherwise)."""
    if t.transpose(1, 2).is_contiguous():
        return t
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _token_major_like(t: torch.Tensor, dtype: Optional[torch.dtype] = None,
                      last: Optional[int] = None) -> torch.Tensor:
    B, H, L, D = t.shape
    return t.new_empty(B, L, H, D if last is None else last, dtype=dtype).transpose(1, 2)


@torch.library.custom_op("twins::flash_attention", mutates_args=())
def flash_attention(q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(hd)) v with the CPU flash kernel, and its fp32 log-sum-exp; the
    backward runs the fp32 kernel (`_flash_backward`). For bf16 training on the CPU, in eager
    mode and under torch.compile alike (the plain modules' attention; the chunked kernels call
    the same pieces themselves). Shapes: q (B, heads, L, hd), k, v (B, heads, M, hd) -> out
    (B, heads, L, hd) laid out as (B, L, heads, hd), lse (B, heads, L)."""
    out, lse = _flash(q, k, v)[:2]
    return _token_major(out), _token_major(lse.unsqueeze(-1)).squeeze(-1)


@flash_attention.register_fake
def _(q, k, v):
    return (_token_major_like(q, last=v.shape[-1]),
            _token_major_like(q, torch.float32, last=1).squeeze(-1))


@torch.library.custom_op("twins::flash_attention_backward", mutates_args=())
def flash_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                             v: torch.Tensor, out: torch.Tensor,
                             lse: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of `flash_attention` from the fp32 kernel, in the dtypes of q, k, v and laid
    out as (B, L, heads, hd)."""
    grads = _flash_backward(grad_out, q, k, v, out, lse)
    return tuple(_token_major(g.to(t.dtype)) for g, t in zip(grads, (q, k, v)))


@flash_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse):
    return tuple(_token_major_like(t) for t in (q, k, v))


def _flash_attention_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _flash_attention_grad(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    return flash_attention_backward(grad_out, q, k, v, out, lse)


flash_attention.register_autograd(_flash_attention_grad, setup_context=_flash_attention_setup)


def flash_attention_applies(q: torch.Tensor) -> bool:
    """Whether the plain modules' attention should run as `flash_attention`: bf16 autograd on
    a CPU with bf16 kernels, where PyTorch's own bf16 backward is the slow one."""
    if not torch.is_grad_enabled() or q.device.type != "cpu" or q.dtype != torch.bfloat16:
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_exporting():
        return False
    return _MKLDNN and _CPU_NATIVE[torch.bfloat16]


def to_windows(x: torch.Tensor, size: Tuple[int, int], window: int) -> torch.Tensor:
    """(B, H * W, C) tokens in row-major order -> (B * windows * ws * ws, C) in window order
    (window by window, each row-major): one copy. H, W multiples of `window`."""
    B, N, C = x.shape
    (H, W), ws = size, window
    return x.view(B, H // ws, ws, W // ws, ws, C).transpose(2, 3).reshape(-1, C)


def from_windows(t: torch.Tensor, size: Tuple[int, int], window: int) -> torch.Tensor:
    """Inverse of `to_windows`: (B * windows * ws * ws, C) -> (B, H * W, C), one copy."""
    (H, W), ws, C = size, window, t.shape[-1]
    B = t.shape[0] // (H * W)
    return t.view(B, H // ws, W // ws, ws, ws, C).transpose(2, 3).reshape(B, H * W, C)


def _window_heads(qkv: torch.Tensor, tokens: int, heads: int) -> Tuple[torch.Tensor, ...]:
    """q, k, v (windows, heads, tokens, hd): strided views of a (windows * tokens, 3C) qkv."""
    hd = qkv.shape[-1] // 3 // heads
    return qkv.view(-1, tokens, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)


@torch.library.custom_op("twins::window_attention_train", mutates_args=())
def window_attention_train(qkv: torch.Tensor, tokens: int, heads: int,
                           reuse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(hd)) v within windows, on a qkv projection already in window
    order: (windows * tokens, 3C) -> (windows * tokens, C), fp32 or bf16 (the compute dtype),
    and the fp32 log-sum-exp (windows, heads, tokens) for backward.

    q, k and v are strided views of qkv that the flash kernel reads in place, and its output
    is laid out (windows, tokens, heads, hd), which is (windows * tokens, C): nothing is
    gathered.
    """
    out, lse = _flash(*_window_heads(qkv, tokens, heads))[:2]
    # lse laid out (windows, tokens, heads), as the kernel writes it (a copy only if not).
    return (out.transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1] // 3),
            _token_major(lse.unsqueeze(-1)).squeeze(-1))


@window_attention_train.register_fake
def _(qkv, tokens, heads, reuse):
    q = _window_heads(qkv, tokens, heads)[0]
    return (qkv.new_empty(qkv.shape[0], qkv.shape[1] // 3),
            _token_major_like(q, torch.float32, last=1).squeeze(-1))


@torch.library.custom_op("twins::window_attention_train_backward", mutates_args=())
def window_attention_train_backward(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor,
                                    lse: torch.Tensor, tokens: int, heads: int,
                                    reuse: bool) -> torch.Tensor:
    """The qkv gradient of `window_attention_train`. Works a few windows (contiguous rows) at
    a time, so that the fp32 operands of the flash backward stay in cache, and writes dq, dk,
    dv straight into one qkv-shaped gradient."""
    L = tokens
    q, k, v = _window_heads(qkv, L, heads)
    nw, hd = q.shape[0], q.shape[-1]
    out = out.view(nw, L, heads, hd).transpose(1, 2)  # as the flash kernel returned it
    do = grad_out.to(qkv.dtype).reshape(nw, L, heads, hd).transpose(1, 2)
    grad_qkv = reusable_empty(qkv.shape, qkv, reuse=reuse)
    parts = grad_qkv.view(nw, L, 3, heads, hd).unbind(2)  # each (nw, L, heads, hd)
    for s, e in chunks(nw, max(1, attention_backward_rows(heads * hd) // L)):
        grads = _flash_backward(do[s:e], q[s:e], k[s:e], v[s:e], out[s:e], lse[s:e])
        for part, g in zip(parts, grads):
            part[s:e].copy_(g.transpose(1, 2))
    return grad_qkv


@window_attention_train_backward.register_fake
def _(grad_out, qkv, out, lse, tokens, heads, reuse):
    return torch.empty_like(qkv)


def _window_attention_setup(ctx, inputs, output):
    qkv, ctx.tokens, ctx.heads, ctx.reuse = inputs
    ctx.save_for_backward(qkv, *output)
    _saved_outputs_only(ctx, output[1:])


def _window_attention_grad(ctx, grad_out, grad_lse):
    if grad_out is None:
        return (None,) * 4
    qkv, out, lse = ctx.saved_tensors
    return (window_attention_train_backward(grad_out, qkv, out, lse, ctx.tokens, ctx.heads,
                                            ctx.reuse), None, None, None)


window_attention_train.register_autograd(_window_attention_grad,
                                         setup_context=_window_attention_setup)


def window_attention(qkv: torch.Tensor, tokens: int, heads: int) -> torch.Tensor:
    """Attention within each run of `tokens` rows of a (windows * tokens, 3C) q/k/v
    projection in window order (see `to_windows`); returns (windows * tokens, C) in the same
    order and dtype, the compute dtype (callers round for emulated autocast). CPU fast path."""
    return window_attention_train(qkv, tokens, heads, reuse_enabled())[0]


@torch.library.custom_op("twins::query_chunk_attention_train", mutates_args=())
def query_chunk_attention_train(x: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor,
                                k: torch.Tensor, v: torch.Tensor, rounding: Optional[torch.dtype],
                                reuse: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global sub-sampled attention from tokens: q = x Wq^T + bq in one matmul, then attended
    over the (few) keys/values and written out in token layout a chunk of query tokens at a
    time. (One matmul over all tokens runs 2-3x faster in bf16 than one per chunk of 64
    channels; the pool keeps q and its gradient from being paged in afresh.)

    Takes x (B, N, C) tokens, Wq (C, C), bq (C,), k, v (B, heads, N', hd), all in the compute
    dtype (fp32 or bf16); returns the (B, N, C) attention output before the output projection,
    and q (B, N, C) and the fp32 log-sum-exp (B, heads, N) for backward. `rounding` rounds q
    as an emulated-autocast linear would.
    """
    B, N, C = x.shape
    heads = k.shape[1]
    out = reusable_empty((B, N, C), x, reuse=reuse)
    lse = reusable_empty((B, heads, N), x, torch.float32, reuse=reuse)
    q = linear_into(x.view(B * N, C), wq, bq, reusable_empty((B * N, C), x, reuse=reuse))
    q = _round_(q, rounding).view(B, N, C)
    for b0, b1, t0, t1 in query_chunk_ranges(B, N):
        o, lse[b0:b1, :, t0:t1] = _flash(_heads(q[b0:b1, t0:t1], heads), k[b0:b1], v[b0:b1])
        _heads(out[b0:b1, t0:t1], heads).copy_(o)
    return out, q, lse


@query_chunk_attention_train.register_fake
def _(x, wq, bq, k, v, rounding, reuse):
    B, N, _ = x.shape
    return (torch.empty_like(x), torch.empty_like(x),
            x.new_empty(B, k.shape[1], N, dtype=torch.float32))


@torch.library.custom_op("twins::query_chunk_attention_train_backward", mutates_args=())
def query_chunk_attention_train_backward(
        grad_out: torch.Tensor, x: torch.Tensor, wq: torch.Tensor, q: torch.Tensor,
        k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, reuse: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of x, Wq, bq, k, v for `query_chunk_attention_train`: the q gradient is
    collected chunk by chunk, then the two matmuls it feeds run once, on all tokens. Sums over
    chunks are in fp32; the gradients come back in the dtypes of the inputs."""
    B, N, C = x.shape
    heads = k.shape[1]
    grad_out = grad_out.to(x.dtype).contiguous()
    f32 = torch.float32
    grad_q = reusable_empty(x.shape, x, reuse=reuse)
    grad_k, grad_v = torch.zeros_like(k, dtype=f32), torch.zeros_like(v, dtype=f32)
    k32, v32 = k.float(), v.float()  # once, not per chunk, for the fp32 backward kernel
    for b0, b1, t0, t1 in query_chunk_ranges(B, N):
        dq, dk, dv = _flash_backward(
            _heads(grad_out[b0:b1, t0:t1], heads), _heads(q[b0:b1, t0:t1], heads),
            k32[b0:b1], v32[b0:b1], _heads(out[b0:b1, t0:t1], heads),
            lse[b0:b1, :, t0:t1].contiguous())
        grad_k[b0:b1] += dk  # every query chunk contributes to its images' keys/values
        grad_v[b0:b1] += dv
        _heads(grad_q[b0:b1, t0:t1], heads).copy_(dq)  # rounded to the compute dtype
    grad_q, x = grad_q.view(B * N, C), x.view(B * N, C)
    grad_wq = (grad_q.t() @ x).to(wq.dtype)
    grad_bq = grad_q.sum(0, dtype=f32).to(wq.dtype)
    grad_x = torch.mm(grad_q, wq, out=reusable_empty(x.shape, x, reuse=reuse))
    return grad_x.view(B, N, C), grad_wq, grad_bq, grad_k.to(k.dtype), grad_v.to(v.dtype)


@query_chunk_attention_train_backward.register_fake
def _(grad_out, x, wq, q, k, v, out, lse, reuse):
    return (torch.empty_like(x), torch.empty_like(wq), wq.new_empty(wq.shape[0]),
            torch.empty_like(k), torch.empty_like(v))


def _query_chunk_setup(ctx, inputs, output):
    x, wq, _, k, v, _, ctx.reuse = inputs
    out, q, lse = output
    ctx.save_for_backward(x, wq, q, k, v, out, lse)
    _saved_outputs_only(ctx, (q, lse))


def _query_chunk_grad(ctx, grad_out, grad_q, grad_lse):
    if grad_out is None:
        return (None,) * 7
    grads = query_chunk_attention_train_backward(grad_out, *ctx.saved_tensors, ctx.reuse)
    return grads + (None, None)


query_chunk_attention_train.register_autograd(_query_chunk_grad, setup_context=_query_chunk_setup)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(n, t, C) tokens -> (n, heads, t, C / heads), a view."""
    n, tokens, C = t.shape
    return t.view(n, tokens, heads, C // heads).transpose(1, 2)


def query_chunk_ranges(B: int, N: int) -> Iterator[Tuple[int, int, int, int]]:
    """(b0, b1, t0, t1) of chunks of about CHUNK_ROWS query tokens: whole images, or a range
    of one image's tokens."""
    rows = min(N, CHUNK_ROWS)  # query tokens per chunk within an image
    per_chunk = max(1, CHUNK_ROWS // N)  # images per chunk
    for b0, b1 in chunks(B, per_chunk):
        for t0, t1 in chunks(N, rows):
            yield b0, b1, t0, t1


def query_chunks(x, wq, bq, heads, rounding=None):
    """(b0, b1, t0, t1, q) over `query_chunk_ranges`, q being the (n, heads, t, hd) queries
    of x[b0:b1, t0:t1], computed into a scratch buffer."""
    B, N, C = x.shape
    ranges = list(query_chunk_ranges(B, N))
    buf = scratch("gsa.q", max((b1 - b0) * (t1 - t0) for b0, b1, t0, t1 in ranges), C, wq)
    for b0, b1, t0, t1 in ranges:
        n, t = b1 - b0, t1 - t0
        q = linear_into(cast_chunk(x[b0:b1, t0:t1].reshape(n * t, C), wq), wq, bq, buf[:n * t])
        _round_(q, rounding)
        yield b0, b1, t0, t1, _heads(q.view(n, t, C), heads)


def query_chunk_attention(x: torch.Tensor, q_layer: nn.Linear, k: torch.Tensor,
                          v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v with q = q_layer(x), chunked over query tokens (see
    `query_chunk_attention_train`); CPU fast path (`chunked_applies`), q_layer with bias. The result
    has the dtype the plain modules would give. Shapes: x (B, N, C), k, v (B, heads, N', hd)
    -> (B, N, C)."""
    rounding = emulated_autocast_dtype(x)
    x, wq, bq, k, v = operands(x, x, q_layer.weight, q_layer.bias, k, v)
    with torch.autocast("cpu", enabled=False):
        out = query_chunk_attention_train(x.contiguous(), wq, bq, k, v, rounding,
                                          reuse_enabled())[0]
    return out if rounding is None else out.to(rounding)


# --------------------------------------------------------------- whole residual branches
# At inference a block is two residual branches, x + Attn(LN(x)) and x + MLP(LN(x)). Run chunk
# by chunk, each branch reads x once and writes its result once; everything in between (the
# LayerNorm, q/k/v, the 4C hidden activations) lives in cache-sized buffers. Each branch is a
# custom op, so that torch.compile keeps it whole: it compiles the code around the branches
# and calls these kernels, instead of tracing their loops or replacing them by standard ops.
# The weights come in already cast to the compute dtype (`operands`).


def inference_applies(x: torch.Tensor) -> bool:
    """Whether the chunked residual branches apply: CPU inference, eager or under
    torch.compile (not under export or TorchScript), in fp32 or under bf16 autocast (native or
    emulated, see `compute_dtype`)."""
    if torch.is_grad_enabled():
        return False
    if torch.compiler.is_compiling():  # torch.compile calls the ops; exporters get standard ops
        if torch.compiler.is_exporting() or x.device.type != "cpu" or not _MKLDNN:
            return False
    elif not enabled(x):
        return False
    return _kernel_dtype(x) is not None


def _layer_norm_without_autograd(x: torch.Tensor, weight: Optional[torch.Tensor],
                                 bias: Optional[torch.Tensor]) -> bool:
    """Whether the inference paths of the LayerNorm take x: eager CPU, fp32 and contiguous
    (non-empty) x, weight and bias, and no autograd through it (inference, or frozen inputs;
    training keeps ATen's kernels, see docs/throughput.md)."""
    if not (enabled(x) and x.dtype == torch.float32 and x.is_contiguous() and x.numel()
            and weight is not None and bias is not None
            and weight.dtype == bias.dtype == torch.float32
            and weight.is_contiguous() and bias.is_contiguous()):
        return False
    return not (torch.is_grad_enabled()
                and (x.requires_grad or weight.requires_grad or bias.requires_grad))


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float) -> torch.Tensor:
    """`F.layer_norm` over the last dimension. Without autograd on the eager CPU, fp32 rows go
    through the native kernel (`native.cpp`: the row moments in two passes instead of ATen's
    Welford updates, 1.6-2x as fast and as exact)."""
    if not _layer_norm_without_autograd(x, weight, bias) or native.ops() is None:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return layer_norm_into(x, weight, bias, eps, torch.empty_like(x))


def _normed(x: torch.Tensor, norm: Tuple[torch.Tensor, torch.Tensor, float],
            rounding: Optional[torch.dtype], slot: str) -> torch.Tensor:
    """LayerNorm (weight, bias, eps) of x, rounded to `rounding` as an emulated-autocast linear
    rounds its input (free for a bf16 x, whose LayerNorm is bf16 already). Where the inference
    paths take x (`_layer_norm_without_autograd`) it is written into the per-thread scratch
    buffer `slot` instead of freshly mapped memory, and overwritten by the next call with that
    slot: for temporaries that never leave the caller (a chunk's normalised tokens)."""
    weight, bias, eps = norm
    if not _layer_norm_without_autograd(x, weight, bias):
        return _round_(F.layer_norm(x, (x.shape[-1],), weight, bias, eps), rounding)
    out = scratch(slot, x.numel() // x.shape[-1], x.shape[-1], x).view(x.shape)
    return _round_(layer_norm_into(x, weight, bias, eps, out), rounding)


class _LowPrecisionLayerNorm(torch.autograd.Function):
    """LayerNorm of bf16/fp16 x with fp32 weight and bias for CPU training: PyTorch's forward
    and input gradient, with the weight and bias gradients summed in fp32.

    PyTorch's CPU kernel sums those two gradients over the rows in the input's precision, on
    one thread: at 100,352 bf16 rows (a first-stage LayerNorm at batch 32) its bias gradient
    came out 80% off and its weight gradient 20-30% (relative to the largest entry, against
    float64). Here fp32 copies of chunks of rows go through its fp32 kernel instead: errors
    of 1e-6, at about PyTorch's speed (0.4 ms slower on mid-sized LayerNorms, 0.6 ms faster
    on the largest).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        out, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        C = x.shape[-1]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.native_layer_norm_backward(
                grad, x, (C,), mean, rstd, weight, bias, [True, False, False])[0]
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_weight, grad_bias = _layer_norm_param_grads(
                grad.reshape(-1, C), x.reshape(-1, C), mean.reshape(-1, 1), rstd.reshape(-1, 1),
                weight, bias)
        return grad_x, grad_weight, grad_bias, None


def _layer_norm_param_grads(grad, x, mean, rstd, weight, bias):
    """The LayerNorm's weight and bias gradients for 2-D (M, C) grad and x, from fp32 copies
    of chunks of rows, summed in fp32."""
    M, C = x.shape
    step = max(1, 2 ** 20 // (4 * C))  # chunks of 1 MiB per fp32 copy (fastest, measured)
    rows = min(step, M)
    x32, grad32 = scratch("ln.x", rows, C, weight), scratch("ln.grad", rows, C, weight)
    grad_weight, grad_bias = torch.zeros_like(weight), torch.zeros_like(bias)
    for s, e in chunks(M, step):
        _, gw, gb = torch.ops.aten.native_layer_norm_backward(
            grad32[:e - s].copy_(grad[s:e]), x32[:e - s].copy_(x[s:e]), (C,), mean[s:e],
            rstd[s:e], weight, bias, [False, True, True])
        grad_weight += gw
        grad_bias += gb
    return grad_weight, grad_bias


def low_precision_layer_norm_applies(x: torch.Tensor, norm: nn.LayerNorm) -> bool:
    """Whether `low_precision_layer_norm` takes x: bf16/fp16 x under autograd on the CPU (eager),
    an fp32 weight and bias."""
    return (x.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()
            and norm.weight is not None and norm.bias is not None
            and norm.weight.dtype == torch.float32 and norm.bias.dtype == torch.float32
            and (x.requires_grad or norm.weight.requires_grad) and enabled(x))


def low_precision_layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """`norm(x)`, with fp32 sums for the weight and bias gradients (see
    `low_precision_layer_norm_applies`). Shapes: (..., C) -> (..., C)."""
    return _LowPrecisionLayerNorm.apply(x, norm.weight, norm.bias, norm.eps)


def _same_as_input(x: torch.Tensor, *args) -> torch.Tensor:
    """Shape/dtype function of the residual-branch ops for torch.compile's tracing."""
    return torch.empty_like(x)


def layer_norm_scratch(x: torch.Tensor, norm: nn.LayerNorm, slot: str,
                       rounding: Optional[torch.dtype] = None) -> torch.Tensor:
    """`norm(x)` (a LayerNorm over the last dimension) at eager CPU fp32 inference, in the
    scratch buffer `slot` and rounded to `rounding`: `_normed`."""
    return _normed(x, (norm.weight, norm.bias, norm.eps), rounding, slot)


def layer_norm_into(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                    out: torch.Tensor) -> torch.Tensor:
    """LayerNorm of x over its last dimension written into `out` (no gradient): x, weight,
    bias and out fp32 and contiguous, out of x's shape.

    The native kernel writes straight into `out`. Without it, a chunk of rows at a time:
    `native_layer_norm.out` computes into a temporary of its output's size and copies that
    into `out`, which for a whole first-stage map would be freshly mapped and page-faulted
    every call (37 MiB for SVT-B at batch 32). The rows are normalised independently, so the
    values are those of one call on all of them.
    """
    fused = native.ops()
    if fused is not None:
        fused.layer_norm_(x, weight, bias, eps, out)
        return out
    C = x.shape[-1]
    rows = x.numel() // C
    x2d, out2d = x.view(rows, C), out.view(rows, C)
    step = min(rows, CHUNK_ROWS)
    stats = scratch("layer_norm.stats", 2, step, x)
    for s, e in chunks(rows, step):
        torch.ops.aten.native_layer_norm.out(x2d[s:e], (C,), weight, bias, eps,
                                             out0=out2d[s:e], out1=stats[0, :e - s, None],
                                             out2=stats[1, :e - s, None])
    return out


@torch.library.custom_op("twins::mlp_residual_", mutates_args=("x",))
def mlp_residual_(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
                  w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                  rounding: Optional[torch.dtype]) -> None:
    """x += fc2(GELU(fc1(LN(x)))) in place at inference, chunked over tokens (see above): each
    chunk's branch is computed before the chunk is overwritten. fc weights in the compute
    dtype; `rounding` the emulated autocast dtype, or None; x (..., C) contiguous. For tensors
    the caller owns (a block's attention output)."""
    if not x.is_contiguous():
        raise ValueError("twins::mlp_residual_ updates x in place and needs it contiguous")
    x2d = x.view(-1, x.shape[-1])
    with torch.autocast("cpu", enabled=False):
        _mlp_chunks(x2d, w1, b1, w2, b2, x2d, rounding=rounding, norm=(ln_weight, ln_bias, eps),
                    residual=True)


@mlp_residual_.register_fake
def _(x, *args) -> None:
    return None


# Keys per query up to which the native kernel (`native.cpp`, attention over few keys) replaces
# SDPA at inference: on 49 keys (every 7 x 7 window, and the sub-sampled maps at 224 pixels)
# its first form was 1.2-1.4x as fast on SVT-S's windows, 1.0-1.1x on its 3,136-query
# first-stage map, level at about 200 keys and slower beyond (fp32, 2 threads, batch 32,
# alternating micro-benchmarks); the kernel now takes at most 64.
NATIVE_ATTENTION_KEYS = 64

# The dtypes the native kernel takes at inference. bf16 operands it converts to fp32 a task at
# a time and it rounds its output back once, where PyTorch's bf16 flash kernel also rounds the
# probabilities before multiplying them by v. On the Zen 4 EPYC (AVX512-BF16, no AMX) it ran
# 1.25-1.6x as fast as that kernel on 49-key windows and on sub-sampled maps of up to 196
# queries, level (0.95-1.06x) on maps of 784 and 3,136 queries. With AMX, PyTorch's bf16
# kernel may run its products on AMX tiles (oneDNN's brgemm); not measured against this one on
# such a CPU, so there bf16 keeps PyTorch's kernel (as it does where this PyTorch cannot tell).
_AMX = getattr(torch.cpu, "_is_amx_tile_supported", lambda: True)()
NATIVE_ATTENTION_DTYPES = (torch.float32,) + (() if _AMX else (torch.bfloat16,))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot: str) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v)` at inference, by the native kernel where it
    applies (`NATIVE_ATTENTION_DTYPES`, unit stride along the head channels, few keys); its
    output, like SDPA's on the CPU, is laid out token-major, (B, L, heads, hd) in memory, here
    in the scratch buffer `slot`. Shapes: q (B, heads, L, hd), k, v (B, heads, keys, hd) ->
    (B, heads, L, hd)."""
    fused = None
    if (q.dtype == k.dtype == v.dtype and q.dtype in NATIVE_ATTENTION_DTYPES
            and k.shape[-2] <= NATIVE_ATTENTION_KEYS
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1):
        fused = native.ops()
    if fused is None:
        return F.scaled_dot_product_attention(q, k, v)
    B, H, L, D = q.shape
    out = scratch(slot, B * L, H * D, q).view(B, L, H, D).transpose(1, 2)
    fused.attention_(q, k, v, out)
    return out


@torch.library.custom_op("twins::window_attention_residual", mutates_args=())
def window_attention_residual(x: torch.Tensor, height: int, width: int, window: int, heads: int,
                              ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
                              w_qkv: torch.Tensor, b_qkv: torch.Tensor, w_proj: torch.Tensor,
                              b_proj: torch.Tensor, rounding: Optional[torch.dtype]) -> torch.Tensor:
    """x + LSA(LN(x)) at inference for a map whose sides are multiples of `window`.

    Works through bands of whole window rows (ws token rows of one image), a few at a time.
    The normalised tokens are put in window order once, before the qkv projection; q, k and v
    are then strided views of its output that the attention kernel reads in place, and its
    output is already laid out for the output projection, whose result returns to token order
    in the residual add. Under emulated autocast (`rounding`) the LayerNorm, q/k/v, attention
    and projection outputs are rounded as autocast's kernels round them.
    Shapes: (B, height * width, C) -> the same, in the dtype of x.
    """
    B, N, C = x.shape
    ws = window
    band, wg, L = ws * width, width // ws, ws * ws  # tokens per band, windows per band, per window
    # (B, N, C) -> (bands, row in window, window, column in window, C), token order.
    bands = x.contiguous().view(B * (height // ws), ws, wg, ws, C)
    out = reusable_empty(bands.shape, bands)
    per_chunk = max(1, CHUNK_ROWS // band)
    rows = min(per_chunk, bands.shape[0]) * band
    win_buf = scratch("attn.windows", rows, C, w_qkv)
    qkv_buf = scratch("attn.qkv", rows, 3 * C, w_qkv)
    proj_buf = scratch("attn.proj", rows, C, w_qkv)
    with torch.autocast("cpu", enabled=False):
        for s, e in chunks(bands.shape[0], per_chunk):
            n = e - s
            tokens = bands[s:e]
            # Token order -> window order (n, window, row, column, C), in the compute dtype.
            win = win_buf[:n * band].view(n, wg, ws, ws, C)
            win.copy_(_normed(tokens, (ln_weight, ln_bias, eps), rounding, "attn.normed")
                      .permute(0, 2, 1, 3, 4))
            qkv = linear_into(win.view(n * band, C), w_qkv, b_qkv, qkv_buf[:n * band])
            q, k, v = _window_heads(_round_(qkv, rounding), L, heads)  # (n * wg, heads, L, hd)
            a = attend(q, k, v, "attn.out")  # stored as (n * wg, L, heads, hd)
            a = _round_(a.transpose(1, 2).reshape(n * band, C), rounding)
            y = _round_(linear_into(a, w_proj, b_proj, proj_buf[:n * band]), rounding)
            # x + branch, the branch taken from window order back to token order.
            torch.add(tokens, y.view(n, wg, ws, ws, C).permute(0, 2, 1, 3, 4), out=out[s:e])
    return out.view(B, N, C)


@torch.library.custom_op("twins::global_attention_residual", mutates_args=())
def global_attention_residual(x: torch.Tensor, normed: torch.Tensor, k: torch.Tensor,
                              v: torch.Tensor, w_q: torch.Tensor, b_q: torch.Tensor,
                              w_proj: torch.Tensor, b_proj: torch.Tensor,
                              rounding: Optional[torch.dtype]) -> torch.Tensor:
    """x + proj(softmax(q k^T / sqrt(hd)) v) with q = normed W_q^T + b_q, at inference.

    k, v (B, heads, N', hd) come from the whole (sub-sampled) map, in the compute dtype;
    queries, attention and the output projection run a few images (or part of one) at a time
    in cache. `normed` is rounded already under emulated autocast (`rounding`), which rounds q,
    the attention output and the projection here. Shapes: x, normed (B, N, C) -> (B, N, C), in
    the dtype of x.
    """
    B, N, C = x.shape
    x = x.contiguous()
    out = reusable_empty(x.shape, x)
    with torch.autocast("cpu", enabled=False):
        for b0, b1, t0, t1, q in query_chunks(normed, w_q, b_q, k.shape[1], rounding):
            n, t = b1 - b0, t1 - t0
            a = attend(q, k[b0:b1], v[b0:b1], "gsa.out")  # (n, heads, t, hd)
            # The kernel stores its output as (n, t, heads, hd): (n * t, C) is a view (a copy
            # only if some backend lays it out otherwise).
            a = _round_(a.transpose(1, 2).reshape(n * t, C), rounding)
            # Either whole images or part of one image: contiguous rows of x and out.
            residual_linear_into(a, w_proj, b_proj, x[b0:b1, t0:t1].reshape(n * t, C),
                                 out[b0:b1, t0:t1].view(n * t, C), rounding)
    return out


for _op in (window_attention_residual, global_attention_residual):
    _op.register_fake(_same_as_input)


# ------------------------------------------------------------------------------ convolution
def tokens_to_map(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
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


@torch.library.custom_op("twins::peg_train", mutates_args=())
def peg_train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, height: int,
              width: int) -> torch.Tensor:
    """The positional encoding generator in training: x + depthwise_conv(x) over the (H, W)
    token map, the convolution run channels-last in the dtype of its weight (fp32 or bf16,
    the compute dtype) and the sum in x's dtype, as `x + conv(x)` under autocast.

    An op with its backward (below) for torch.compile's sake: traced, the convolution's
    backward got its gradient in another layout than its channels-last input and ran 2.7x
    slower (the first two stages' PEGs: about 150 ms of a 2.8 s compiled fp32 SVT-S step,
    profiled). The op computes it on the channels-last map, as eager PyTorch does, and adds the
    residual's gradient into the input gradient in place, where autograd summed the two into
    fresh memory. Eager steps call it too (their speed unchanged, within the noise).

    Takes x (B, H * W, C), weight (C, 1, k, k) and bias (C,); returns (B, H * W, C).
    """
    feat = tokens_to_map(x, (height, width))
    out = F.conv2d(feat.to(weight.dtype), weight, bias, padding=weight.shape[-1] // 2,
                   groups=weight.shape[0])
    if out.dtype == x.dtype:  # fresh and not needed by backward: add in place
        return map_to_tokens(out.add_(feat))
    return torch.add(x, map_to_tokens(out))  # bf16 branch, sum in x's dtype


@peg_train.register_fake
def _(x, weight, bias, height, width):
    return torch.empty_like(x)


@torch.library.custom_op("twins::peg_train_backward", mutates_args=())
def peg_train_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                       height: int, width: int
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of x, the weight and the bias for `peg_train`."""
    size, C, k = (height, width), weight.shape[0], weight.shape[-1]
    grad_out = grad_out.contiguous()
    grad_map = tokens_to_map(grad_out, size)  # channels-last, like the forward's map
    grad_in, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad_map.to(weight.dtype), tokens_to_map(x, size).to(weight.dtype), weight, [C], [1, 1],
        [k // 2, k // 2], [1, 1], False, [0, 0], C, [True, True, True])
    if grad_in.dtype == grad_out.dtype:
        grad_x = map_to_tokens(grad_in.add_(grad_map))  # a view when grad_in is channels-last
    else:
        grad_x = torch.add(grad_out, map_to_tokens(grad_in))
    return grad_x, grad_w, grad_b


@peg_train_backward.register_fake
def _(grad_out, x, weight, height, width):
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0])


def _peg_train_setup(ctx, inputs, output):
    x, weight, _, ctx.height, ctx.width = inputs
    ctx.save_for_backward(x, weight)


def _peg_train_grad(ctx, grad_out):
    x, weight = ctx.saved_tensors
    return peg_train_backward(grad_out, x, weight, ctx.height, ctx.width) + (None, None)


peg_train.register_autograd(_peg_train_grad, setup_context=_peg_train_setup)


def peg_applies(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Whether `peg` takes x: CPU training with the kernels' native dtypes (see
    `compute_dtype`; not under emulated autocast), eager or compiled."""
    return (conv.bias is not None and chunked_applies(x) and emulated_autocast_dtype(x) is None
            and _runs_training_op(x, conv.weight))


def peg(x: torch.Tensor, size: Tuple[int, int], conv: nn.Conv2d) -> torch.Tensor:
    """x + conv(x) on the token map for a depth-wise, odd-sized, stride-1 `conv` (see
    `peg_applies`). Shapes: (B, H * W, C) -> (B, H * W, C)."""
    weight, bias = operands(x, conv.weight, conv.bias)
    with torch.autocast("cpu", enabled=False):
        return peg_train(x.contiguous(), weight, bias, size[0], size[1])


def peg_inference_applies(x: torch.Tensor) -> bool:
    """Whether `peg_inference` takes x: eager fp32 CPU inference (not under autocast)."""
    return (not torch.is_grad_enabled() and enabled(x) and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu"))


def peg_inference(x: torch.Tensor, size: Tuple[int, int], conv: nn.Conv2d) -> torch.Tensor:
    """x + conv(x) on the token map at inference, a few images at a time: the convolution's
    output stays chunk-sized and the sum goes to a pooled result (`reusable_empty`), where the
    whole batch's output was freshly mapped and page-faulted every call (37 MiB for SVT-B's
    first stage at batch 32). Shapes: (B, H * W, C) -> (B, H * W, C)."""
    x = x.contiguous()
    B, N, C = x.shape
    out = reusable_empty(x.shape, x)
    for b0, b1 in chunks(B, max(1, CHUNK_ROWS // N)):
        feat = tokens_to_map(x[b0:b1], size)
        torch.add(conv(feat), feat, out=tokens_to_map(out[b0:b1], size))
    return out


def conv2d(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """`conv(x)`, computed in fp32 on rounded operands under emulated CPU autocast (see above)."""
    emulated = emulated_autocast_dtype(x)
    if emulated is None:
        return conv(x)
    with torch.autocast("cpu", enabled=False):
        out = conv._conv_forward(_round_to(x, emulated), _round_to(conv.weight, emulated),
                                 _round_to(conv.bias, emulated))
    return out.to(emulated)
