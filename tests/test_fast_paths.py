"""Every fast path of the model package against a plain implementation written the obvious way.

The references below use only F.linear, F.conv2d, F.layer_norm, explicit softmax attention and
an explicit token-to-token mask for the windows, on small inputs with odd sizes, in fp32 and
under bf16 autocast (where the fast paths emulate bf16 kernels in fp32 on CPUs without them).
"""
import re
import threading

import pytest
import torch
import torch.nn.functional as F

import twins
from twins import kernels
from twins.attention import GlobalSubsampledAttention, LocallyGroupedAttention
from twins.layers import LayerNorm, Mlp, PatchEmbed, PositionalEncodingGenerator
from twins.model import Block

BF16_TOL = dict(atol=3e-2, rtol=3e-2)  # a few bf16 ulps of O(1) activations


def attention(q, k, v, allowed=None):
    """softmax(q k^T / sqrt(d) + mask) v on (..., N, d) tensors; `allowed` (N, M) bool."""
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


def split_heads(t, heads):
    B, N, C = t.shape
    return t.reshape(B, N, heads, C // heads).transpose(1, 2)  # (B, N, C) -> (B, h, N, d)


def merge_heads(t):
    B, h, N, d = t.shape
    return t.transpose(1, 2).reshape(B, N, h * d)  # (B, h, N, d) -> (B, N, C)


def reference_lsa(m: LocallyGroupedAttention, x, size):
    """Global attention restricted by a mask: token i sees token j iff they share a window."""
    H, W = size
    rows = torch.arange(H).repeat_interleave(W) // m.window_size
    cols = torch.arange(W).repeat(H) // m.window_size
    allowed = (rows[:, None] == rows[None]) & (cols[:, None] == cols[None])
    q, k, v = F.linear(x, m.qkv.weight, m.qkv.bias).chunk(3, dim=-1)
    out = attention(*(split_heads(t, m.num_heads) for t in (q, k, v)), allowed)
    return F.linear(merge_heads(out), m.proj.weight, m.proj.bias)


def reference_gsa(m: GlobalSubsampledAttention, x, size):
    B, N, C = x.shape
    src = x
    if m.sr is not None:
        image = x.transpose(1, 2).reshape(B, C, *size)  # plain NCHW, contiguous after reshape
        src = F.conv2d(image, m.sr.weight, m.sr.bias, stride=m.sr_ratio).flatten(2).transpose(1, 2)
        src = F.layer_norm(src, (C,), m.norm.weight, m.norm.bias, m.norm.eps)
    q = F.linear(x, m.q.weight, m.q.bias)
    k, v = F.linear(src, m.kv.weight, m.kv.bias).chunk(2, dim=-1)
    out = attention(*(split_heads(t, m.num_heads) for t in (q, k, v)))
    return F.linear(merge_heads(out), m.proj.weight, m.proj.bias)


def reference_mlp(m: Mlp, x):
    return F.linear(F.gelu(F.linear(x, m.fc1.weight, m.fc1.bias)), m.fc2.weight, m.fc2.bias)


def reference_peg(m: PositionalEncodingGenerator, x, size):
    B, N, C = x.shape
    conv = m.proj[0]
    image = x.transpose(1, 2).reshape(B, C, *size)
    out = F.conv2d(image, conv.weight, conv.bias, padding=conv.padding, groups=C) + image
    return out.flatten(2).transpose(1, 2)


def run(fn, precision, *args):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        return fn(*args)


def assert_matches(ours, ref, precision):
    assert ours.dtype == ref.dtype
    tol = BF16_TOL if precision == "bf16" else dict(atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ours.float(), ref.float(), **tol)


def assert_outputs_and_gradients_match(out, ref, inputs):
    """fp32 outputs, and the gradients of both with respect to `inputs` for one random
    upstream gradient, agree to fp32 rounding."""
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    grad = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


PRECISIONS = ["fp32", "bf16"]
SIZES = [(7, 7), (9, 13), (5, 3), (8, 12)]  # (8, 12): whole windows of 4, no padding


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("size", SIZES)
def test_locally_grouped_attention(precision, size):
    m = LocallyGroupedAttention(dim=12, num_heads=3, window_size=4).eval()
    x = torch.randn(2, size[0] * size[1], 12)
    assert_matches(run(m, precision, x, size), run(reference_lsa, precision, m, x, size), precision)


@pytest.mark.parametrize("size", [(8, 12), (7, 9)])
def test_locally_grouped_attention_gradients_equal_reference(size, chunk_rows):
    """Training through the chunked window kernel (or the padded path) against autograd."""
    m = LocallyGroupedAttention(dim=12, num_heads=3, window_size=4)
    x = torch.randn(2, size[0] * size[1], 12, requires_grad=True)
    params = [x] + list(m.parameters())
    assert_outputs_and_gradients_match(m(x, size), reference_lsa(m, x, size), params)


@pytest.mark.parametrize("sr_ratio", [1, 2])
@pytest.mark.parametrize("size", [(8, 12), (5, 3)])
def test_global_subsampled_attention_gradients_equal_reference(sr_ratio, size, chunk_rows):
    """Training through the query-chunked kernel against autograd on the plain formula."""
    m = GlobalSubsampledAttention(dim=12, num_heads=2, sr_ratio=sr_ratio)
    x = torch.randn(3, size[0] * size[1], 12, requires_grad=True)
    params = [x] + list(m.parameters())
    assert_outputs_and_gradients_match(m(x, size), reference_gsa(m, x, size), params)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("sr_ratio", [1, 2])
def test_global_subsampled_attention(precision, size, sr_ratio):
    m = GlobalSubsampledAttention(dim=12, num_heads=2, sr_ratio=sr_ratio).eval()
    x = torch.randn(2, size[0] * size[1], 12)
    assert_matches(run(m, precision, x, size), run(reference_gsa, precision, m, x, size), precision)


def test_attention_backward_chunks_are_bounded_in_elements():
    assert kernels.attention_backward_rows(256) == kernels.ATTENTION_BACKWARD_ELEMENTS // 256
    assert kernels.attention_backward_rows(8) == kernels.CHUNK_ROWS  # capped by the token chunk
    assert kernels.attention_backward_rows(10 ** 9) == 1


def test_window_attention_backward_in_element_bounded_chunks_equals_reference(monkeypatch):
    """The window attention backward split by its element bound (not CHUNK_ROWS, left as it
    is): 32 query tokens of 12 channels a chunk, so 2 of the 12 windows of 16 tokens per call
    of the flash backward."""
    monkeypatch.setattr(kernels, "ATTENTION_BACKWARD_ELEMENTS", 32 * 12)
    seen = count_flash_backward_images(monkeypatch)
    m = LocallyGroupedAttention(dim=12, num_heads=3, window_size=4)
    x = torch.randn(2, 96, 12, requires_grad=True)
    params = [x] + list(m.parameters())
    assert_outputs_and_gradients_match(m(x, (8, 12)), reference_lsa(m, x, (8, 12)), params)
    assert seen == [2] * 6, seen


@pytest.fixture(params=[2048, 5], ids=["one-chunk", "chunks-of-5"])
def chunk_rows(request, monkeypatch):
    """Run a test with the default chunk size and with tiny chunks (several, the last partial)."""
    monkeypatch.setattr(kernels, "CHUNK_ROWS", request.param)
    return request.param


@pytest.mark.parametrize("precision", PRECISIONS)
def test_mlp_chunked(precision, chunk_rows):
    m = Mlp(10, 24).eval()
    x = torch.randn(3, 7, 10) * 3  # wide range: both GELU tails
    assert_matches(run(m, precision, x), run(reference_mlp, precision, m, x), precision)


def test_mlp_chunked_gradients_equal_autograd(chunk_rows):
    m = Mlp(10, 24)
    x = torch.randn(3, 7, 10, requires_grad=True)
    params = (x, m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias)
    out = m(x)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, params, grad)
    ref = reference_mlp(m, x)
    want = torch.autograd.grad(ref, params, grad)
    torch.testing.assert_close(out, ref)
    for name, g, w in zip(["x", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"], got, want):
        torch.testing.assert_close(g, w, msg=name)


def test_mlp_chunked_bf16_gradients_close_to_native_autocast(chunk_rows, monkeypatch):
    m = Mlp(10, 24)
    x = torch.randn(3, 7, 10, requires_grad=True)

    def grads():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        return (out,) + torch.autograd.grad(out.float().square().sum(), (x, m.fc1.weight, m.fc2.weight))

    fast = grads()
    monkeypatch.setattr(kernels, "enabled", lambda x: False)
    monkeypatch.setattr(kernels, "emulated_autocast_dtype", lambda x: None)
    native = grads()
    assert fast[0].dtype == native[0].dtype == torch.bfloat16
    for f, n in zip(fast, native):
        torch.testing.assert_close(f.float(), n.float(), atol=5e-2, rtol=5e-2)


def test_scratch_buffers_are_reused_per_slot_and_mode():
    like = torch.zeros(1)
    a = kernels.scratch("test.a", 4, 6, like)
    assert kernels.scratch("test.a", 3, 5, like).data_ptr() == a.data_ptr()  # smaller: same memory
    assert kernels.scratch("test.b", 4, 6, like).data_ptr() != a.data_ptr()
    bigger = kernels.scratch("test.a", 8, 6, like)
    assert bigger.shape == (8, 6) and bigger.data_ptr() != a.data_ptr()
    with torch.inference_mode():  # inference tensors must not leak into autograd code
        inf = kernels.scratch("test.a", 4, 6, like)
        assert inf.is_inference() and inf.data_ptr() != bigger.data_ptr()
    assert not kernels.scratch("test.a", 4, 6, like).is_inference()


def pooled(shape, dtype=torch.float32):
    """The storages pooled for tensors of this size and dtype."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    return kernels._REUSABLE.storages.get((nbytes, torch.device("cpu")), [])


def test_reusable_buffers_are_handed_out_again_only_when_unreferenced():
    like, shape = torch.zeros(1), (13, 17, 3)  # a size no other test pools
    a = kernels.reusable_empty(shape, like)
    ptr = a.data_ptr()
    b = kernels.reusable_empty(shape, like)
    assert b.data_ptr() != ptr  # a is alive
    view = a[1:]
    del a
    assert kernels.reusable_empty(shape, like).data_ptr() not in (ptr, b.data_ptr())  # a view
    del view
    c = kernels.reusable_empty((17, 39), like, torch.int32)  # same bytes, another shape and dtype
    assert c.data_ptr() == ptr and c.shape == (17, 39) and c.dtype == torch.int32
    assert c._base is None and c.is_contiguous()  # not a view: in-place ops are safe in autograd
    assert len(pooled(shape)) == 3
    with kernels.allocate_plainly():
        del c
        d = kernels.reusable_empty(shape, like)
    assert len(pooled(shape)) == 3 and all(s.data_ptr() != d.data_ptr() for s in pooled(shape))
    assert kernels.reuse_enabled()


def in_fresh_thread(fn):
    """fn() in a thread of its own, whose pool of reusable buffers starts empty."""
    result = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join()
    assert result, "the thread raised"
    return result[0]


def test_reusable_buffers_of_sizes_no_longer_asked_for_are_released():
    like = torch.zeros(1)
    old, new = [(5, 6), (7, 8)], [(9, 10), (11, 12)]  # the sizes of two input sizes

    def steps(shapes, count):
        """Training steps that each ask for every size, twice for the first at once."""
        ptrs = set()
        for _ in range(count):
            a = kernels.reusable_empty(shapes[0], like)
            b = kernels.reusable_empty(shapes[0], like)
            c = kernels.reusable_empty(shapes[1], like)
            ptrs |= {a.data_ptr(), b.data_ptr(), c.data_ptr()}
            del a, b, c
        return ptrs

    def run():
        first = steps(old, 5)
        kept = steps(old, 5) == first and len(first) == 3  # the same three buffers throughout
        steps(new, 25)  # checked every 64 calls
        return kept, sorted(n // 4 for n, _ in kernels._REUSABLE.storages)

    kept, sizes = in_fresh_thread(run)
    assert kept
    assert sizes == [90, 132]  # only the new sizes' storages remain


def test_reusable_pool_remembers_released_sizes_within_a_bound(monkeypatch):
    """A released size keeps its last call (so that asking for it again measures the
    period), but beyond `_MAX_SIZES` the oldest released sizes are forgotten."""
    monkeypatch.setattr(kernels, "_MAX_SIZES", 40)
    like = torch.zeros(1)

    def run():
        for n in range(1, 101):  # 100 sizes, each asked for once and freed at once
            kernels.reusable_empty((n,), like)
        pool = kernels._REUSABLE
        return len(pool.last_call), max(k[0] for k in pool.last_call), len(pool.storages)

    remembered, newest, pooled_sizes = in_fresh_thread(run)
    assert 20 <= remembered <= 40 and newest == 400  # the latest size is among those kept
    assert pooled_sizes < 100  # the old sizes' storages were released


@pytest.mark.parametrize("checkpointing", [False, True])
def test_grad_checkpointed_blocks_allocate_plainly(checkpointing):
    """Checkpointing is for saving memory: its blocks keep no pooled buffers mapped."""
    model = twins.create_model("alt_gvt_micro", num_classes=5)
    model.set_grad_checkpointing(checkpointing)
    x = torch.randn(2, 3, 56, 56)

    def step():
        model(x).sum().backward()
        return dict(kernels._REUSABLE.storages)

    pooled = in_fresh_thread(step)
    assert (len(pooled) == 0) == checkpointing  # every kernel that pools runs inside a block


def test_two_forwards_before_one_backward_keep_their_saved_activations(monkeypatch):
    """Pooled buffers saved for backward are not reused by a second forward pass."""
    model = twins.create_model("alt_gvt_micro", num_classes=5)
    x1, x2 = torch.randn(2, 3, 56, 56), torch.randn(2, 3, 56, 56)

    def grads():
        model.zero_grad(set_to_none=True)
        (model(x1).square().sum() + model(x2).logsumexp(1).sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    fast = grads()
    monkeypatch.setattr(kernels, "enabled", lambda x: False)
    plain = grads()
    for n in plain:
        torch.testing.assert_close(fast[n], plain[n], atol=1e-5, rtol=1e-4, msg=n)


def inference_block(kind):
    """A small block in eval mode with LSA (windows of 4) or GSA (sub-sampling 1 or 2)."""
    window, sr = {"lsa": (4, 1), "gsa-sr1": (0, 1), "gsa-sr2": (0, 2)}[kind]
    return Block(12, num_heads=3, mlp_ratio=2, window_size=window, sr_ratio=sr).eval()


@pytest.mark.parametrize("kind", ["lsa", "gsa-sr1", "gsa-sr2"])
@pytest.mark.parametrize("size", [(8, 12), (5, 7), (9, 4)])
def test_block_inference_residual_branches_equal_plain(kind, size, chunk_rows, monkeypatch):
    """The chunked x + Attn(LN(x)) and x + MLP(LN(x)) of fp32 inference against plain modules."""
    block = inference_block(kind)
    for p in block.parameters():  # non-trivial LayerNorm affine and biases
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, size[0] * size[1], 12)
    with torch.inference_mode():
        assert kernels.inference_applies(x)
        fast = block(x, size)
        monkeypatch.setattr(kernels, "enabled", lambda x: False)
        assert not kernels.inference_applies(x)
        plain = block(x, size)
    torch.testing.assert_close(fast, plain, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["lsa", "gsa-sr1", "gsa-sr2"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_block_inference_leaves_its_input_untouched(kind, precision, chunk_rows):
    """The MLP branch adds into the attention branch's output in place; the block's input (a
    tensor the caller may still hold) must come out unchanged."""
    block = inference_block(kind)
    x = torch.randn(3, 8 * 12, 12)
    before = x.clone()
    with torch.inference_mode():
        assert kernels.inference_applies(x)
        out = run(block, precision, x, (8, 12))
    assert out.data_ptr() != x.data_ptr()
    assert torch.equal(x, before)


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "aten"])
def test_layer_norm_scratch_equals_layer_norm_and_reuses_its_buffer(use_native, chunk_rows,
                                                                    monkeypatch):
    """The native kernel's result, or without it F.layer_norm's bits, also a few rows at a time
    (chunks-of-5: 12 chunks). (Where no native build exists, a CPU other than x86, both cases
    check the PyTorch path.)"""
    from twins import native
    if not use_native:
        monkeypatch.setattr(native, "ops", lambda: None)
    ops = native.ops()
    assert ops is not None or not use_native or native.capability() is None, (
        "the native kernels failed to build")
    norm = torch.nn.LayerNorm(12)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x, y = torch.randn(3, 20, 12), torch.randn(3, 20, 12)

    def reference(t):
        want = F.layer_norm(t, (12,), norm.weight, norm.bias, norm.eps)
        if ops is None:
            return want
        out = torch.empty_like(t)
        ops.layer_norm_(t, norm.weight, norm.bias, norm.eps, out)
        torch.testing.assert_close(out, want)
        return out

    with torch.inference_mode():
        a = kernels.layer_norm_scratch(x, norm, "test.ln")
        torch.testing.assert_close(a, reference(x), atol=0, rtol=0)
        b = kernels.layer_norm_scratch(y, norm, "test.ln")
        assert b.data_ptr() == a.data_ptr()  # the same memory, now holding y's result
        torch.testing.assert_close(b, reference(y), atol=0, rtol=0)
    with torch.enable_grad():  # with autograd the result must be a tensor of its own
        c = kernels.layer_norm_scratch(x, norm, "test.ln")
        assert c.requires_grad and c.data_ptr() != a.data_ptr()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_patch_embed_by_images_equals_whole_batch(precision, chunk_rows):
    """At inference the patch embedding runs a few images at a time (one at a time with the
    tiny chunks); the result is that of the whole batch at once."""
    m = PatchEmbed(3, 8, 2).eval()
    torch.nn.init.normal_(m.norm.weight)
    torch.nn.init.normal_(m.norm.bias)
    images = torch.randn(5, 3, 9, 6)  # 4 x 3 = 12 tokens per image, the odd pixel row dropped
    with torch.inference_mode():
        chunked, size = run(m, precision, images)
    whole, whole_size = run(m, precision, images)  # with autograd: the whole batch at once
    assert size == whole_size == (4, 3)
    # oneDNN may pick another summation order for another batch size: equal to rounding.
    assert_matches(chunked, whole.detach(), precision)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_positional_encoding_generator(precision):
    m = PositionalEncodingGenerator(8).eval()
    x = torch.randn(2, 5 * 7, 8)
    assert_matches(run(m, precision, x, (5, 7)), run(reference_peg, precision, m, x, (5, 7)), precision)


def test_positional_encoding_generator_at_inference_by_images(chunk_rows):
    """fp32 inference convolves a few images at a time (one at a time with the tiny chunks)
    into a pooled result: the plain computation's values, x left untouched."""
    m = PositionalEncodingGenerator(8).eval()
    x = torch.randn(3, 5 * 7, 8)
    x_before = x.clone()
    with torch.inference_mode():
        assert kernels.peg_inference_applies(x)
        out = m(x, (5, 7))
    assert_matches(out, reference_peg(m, x, (5, 7)), "fp32")
    assert torch.equal(x, x_before)


def test_inference_outputs_come_from_the_pool_from_the_second_pass():
    """Eager fp32 inference writes the residual branches', PEG's and patch embedding's
    outputs into pooled storages: the first pass sizes the pool (and releases what it cannot
    know yet is needed again), every later pass reuses it without a new storage, and the
    logits are those of fresh allocations."""
    model = twins.create_model("alt_gvt_micro", num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)

    def passes():
        out, storages = [], []
        with torch.inference_mode():
            for _ in range(4):
                out.append(model(x))
                storages.append({s.data_ptr() for v in kernels._REUSABLE.storages.values()
                                 for s in v})
            with kernels.allocate_plainly():
                out.append(model(x))
        return out, storages

    out, storages = in_fresh_thread(passes)
    assert storages[1] and storages[1] == storages[2] == storages[3]
    for o in out[1:]:
        assert torch.equal(o, out[0])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_patch_embed_drops_partial_patches(precision):
    m = PatchEmbed(3, 8, 4).eval()
    image = torch.randn(2, 3, 13, 10)
    out, size = run(m, precision, image)

    def reference(image):
        tokens = F.conv2d(image, m.proj.weight, m.proj.bias, stride=4).flatten(2).transpose(1, 2)
        return F.layer_norm(tokens, (8,), m.norm.weight, m.norm.bias, m.norm.eps)
    assert size == (3, 2)
    assert_matches(out, run(reference, precision, image), precision)


@pytest.mark.parametrize("mode", ["train", "inference"])
def test_patch_embed_convolves_a_channels_last_image(mode):
    """The patch convolution takes a channels-last copy of the NCHW image (at inference, of
    each chunk of images); the output, and in training the weight and bias gradients, are
    those of the plain NCHW computation."""
    m = PatchEmbed(3, 8, 4).train(mode == "train")
    torch.nn.init.normal_(m.norm.weight)
    image = torch.randn(3, 3, 13, 10)
    seen = []
    hook = m.proj.register_forward_pre_hook(lambda mod, args: seen.append(
        args[0].is_contiguous(memory_format=torch.channels_last)))
    try:
        with torch.inference_mode(mode == "inference"):
            out, size = m(image)
    finally:
        hook.remove()
    assert seen == [True] and image.is_contiguous()  # the caller's image is left as it was
    tokens = F.conv2d(image, m.proj.weight, m.proj.bias, stride=4).flatten(2).transpose(1, 2)
    ref = F.layer_norm(tokens, (8,), m.norm.weight, m.norm.bias, m.norm.eps)
    assert size == (3, 2)
    if mode == "train":
        assert_outputs_and_gradients_match(out, ref, [m.proj.weight, m.proj.bias, m.norm.weight])
    else:
        torch.testing.assert_close(out, ref.detach(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("in_place", [False, True], ids=["out", "in-place"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_linear_into(in_place, with_bias, dtype):
    """residual + (x W^T + b) into out or into the residual itself; bf16 weights: the branch
    rounded to bf16 before the fp32 residual add, as `residual + layer(x)` under autocast."""
    x, weight = torch.randn(13, 6).to(dtype), torch.randn(5, 6).to(dtype)
    bias = torch.randn(5).to(dtype) if with_bias else None
    residual = torch.randn(13, 5)
    want = residual + F.linear(x, weight, bias).float()
    out = residual.clone() if in_place else torch.full_like(residual, float("nan"))
    got = kernels.residual_linear_into(x, weight, bias, out if in_place else residual, out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


def profiled(fn):
    """fn's result, and how often it ran each operator (profiled on the CPU)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, {event.key: event.count for event in prof.key_averages()}


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "sgemm"])
@pytest.mark.parametrize("features", [(9, 4), (6, 6), (4, 9)], ids=["down", "square", "up"])
def test_fp32_chunk_matmuls_run_onednn_where_it_applies(features, onednn, chunk_rows,
                                                        monkeypatch):
    """linear_chunk, linear_into, residual_linear_into and matmul_into (13 rows: several chunks
    of 5) equal F.linear and mm whichever kernel runs. With the switch on, oneDNN's matmul
    runs for linear_chunk on every shape and for the others on down projections (more input
    than output features), and sgemm for outputs of `ALWAYS_MAPPED_BYTES` or more. Each of
    oneDNN's fresh outputs is followed by holding glibc's heap at its top."""
    monkeypatch.setattr(kernels, "ONEDNN_MATMULS", onednn)
    held = []
    monkeypatch.setattr(kernels.host_memory, "hold_heap_top", lambda: held.append(1) or True)
    k, n = features
    x, weight, bias, residual = torch.randn(13, k), torch.randn(n, k), torch.randn(n), torch.randn(13, n)
    want = F.linear(x, weight, bias)
    out = torch.full((13, n), float("nan"))
    calls = {"linear_chunk": lambda: kernels.linear_chunk(x, weight, bias, out),
             "linear_into": lambda: kernels.linear_into(x, weight, bias, out),
             "residual_linear_into": lambda: kernels.residual_linear_into(x, weight, bias, residual, out),
             "matmul_into": lambda: kernels.matmul_into(x, weight.t(), out)}
    wants = {"linear_chunk": want, "linear_into": want, "residual_linear_into": residual + want,
             "matmul_into": x @ weight.t()}
    for name, call in calls.items():
        out.fill_(float("nan"))
        held.clear()
        got, ran = profiled(call)
        expect_onednn = onednn and (k > n or name == "linear_chunk")
        # linear_into & co. write into out; linear_chunk returns oneDNN's own output instead
        assert (got.data_ptr() == out.data_ptr()) != (name == "linear_chunk" and expect_onednn)
        torch.testing.assert_close(got, wants[name], rtol=1e-6, atol=1e-5, msg=name)
        assert ("mkldnn::_linear_pointwise" in ran) == expect_onednn, (name, ran)
        assert len(held) == (-(-13 // chunk_rows) if name == "matmul_into" else 1) * expect_onednn
        assert (not ran.keys() & {"aten::mm", "aten::addmm", "aten::addmm_"}) == expect_onednn, (name, ran)
    monkeypatch.setattr(kernels, "ALWAYS_MAPPED_BYTES", 13 * n * 4)  # this output's bytes
    for name in ("linear_chunk", "linear_into"):
        out.fill_(float("nan"))
        assert "mkldnn::_linear_pointwise" not in profiled(calls[name])[1], name
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "sgemm"])
@pytest.mark.parametrize("mode", ["inference", "train"])
def test_mlp_chunk_matmuls_run_onednn(mode, onednn, chunk_rows, monkeypatch):
    """The chunked MLP (fp32, 4 -> 16 -> 4) equals the plain one, values and gradients, and with
    the switch on runs oneDNN's matmul per chunk for fc2 and, at inference, fc1; in training
    also for the gradients of the GELU output and of the input. Off, none."""
    monkeypatch.setattr(kernels, "ONEDNN_MATMULS", onednn)
    m = Mlp(4, 16)
    x = torch.randn(3, 13, 4, requires_grad=mode == "train")
    grad = torch.randn(3, 13, 4)
    def run():
        with torch.inference_mode(mode == "inference"):
            out = kernels.mlp(x, m.fc1, m.fc2)
            return out, torch.autograd.grad(out, (x, m.fc1.weight), grad) if mode == "train" else ()
    (got, grads), calls = profiled(run)
    want = reference_mlp(m, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, torch.autograd.grad(want, (x, m.fc1.weight), grad) if grads else ()):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    chunks = -(-39 // min(chunk_rows, 39))
    per_chunk = {"inference": 2, "train": 3}[mode] if onednn else 0
    assert calls.get("mkldnn::_linear_pointwise", 0) == per_chunk * chunks, calls


def test_linear_gradients_equal_autograd():
    layer = torch.nn.Linear(6, 9)
    x = torch.randn(4, 5, 6, requires_grad=True)
    out = kernels.linear(x, layer)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, layer.weight, layer.bias), grad)
    ref_out = F.linear(x, layer.weight, layer.bias)
    want = torch.autograd.grad(ref_out, (x, layer.weight, layer.bias), grad)
    torch.testing.assert_close(out, ref_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_large_linear_outputs_come_from_the_pool(monkeypatch):
    """Training linears whose output is at least `ALWAYS_MAPPED_BYTES` write it into pooled
    memory, handed out again once free; smaller ones allocate afresh. Values and gradients
    are those of F.linear either way."""
    layer = torch.nn.Linear(6, 9)
    x = torch.randn(20, 6, requires_grad=True)
    monkeypatch.setattr(kernels, "ALWAYS_MAPPED_BYTES", 20 * 9 * 4)  # this output's bytes
    pooled_before = set(kernels._REUSABLE.storages)
    pointers = []
    for rows in (20, 20, 19):  # 19 rows: 36 bytes below the threshold
        out = kernels.linear(x[:rows], layer)
        pointers.append(out.data_ptr())
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, layer.weight, layer.bias), grad)
        ref = F.linear(x[:rows], layer.weight, layer.bias)
        want = torch.autograd.grad(ref, (x, layer.weight, layer.bias), grad)
        torch.testing.assert_close(out, ref)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
        del out
    assert pointers[1] == pointers[0]  # the same pooled memory again
    added = set(kernels._REUSABLE.storages) - pooled_before
    assert (19 * 9 * 4, torch.device("cpu")) not in added  # nothing pooled for the small one


def test_emulated_bf16_linear_rounds_like_a_bf16_kernel():
    """Under emulation the result is the fp32 product of bf16-rounded operands, rounded once."""
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.linear(x, layer)
    exact = F.linear(x.bfloat16().double(), layer.weight.bfloat16().double(),
                     layer.bias.bfloat16().double())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), exact, atol=0, rtol=2 ** -8)


@pytest.mark.parametrize("name", ["alt_gvt_micro", "pcpvt_micro"])
def test_whole_model_fast_equals_plain_forward_and_backward(name, monkeypatch):
    """Gradients of every parameter with the fast paths and with plain modules only."""
    model = twins.create_model(name, num_classes=7)
    images = torch.randn(2, 3, 45, 39)

    def grads():
        model.zero_grad(set_to_none=True)
        out = model(images)
        out.logsumexp(1).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fast_out, fast_grads = grads()
    monkeypatch.setattr(kernels, "enabled", lambda x: False)
    plain_out, plain_grads = grads()
    torch.testing.assert_close(fast_out, plain_out, atol=2e-5, rtol=1e-4)
    for n in plain_grads:
        torch.testing.assert_close(fast_grads[n], plain_grads[n], atol=1e-5, rtol=1e-4, msg=n)


def test_whole_model_bf16_close_to_native_autocast(monkeypatch):
    """The emulated bf16 path and torch's own bf16 kernels agree to bf16 precision."""
    model = twins.create_model("alt_gvt_micro", num_classes=7).eval()
    images = torch.randn(2, 3, 37, 41)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast = model(images)
        monkeypatch.setattr(kernels, "enabled", lambda x: False)
        monkeypatch.setattr(kernels, "emulated_autocast_dtype", lambda x: None)
        native = model(images)
    assert fast.dtype == native.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), native.float(), **BF16_TOL)


def compiled_in_one_graph(model, graphs):
    """`model` under torch.compile through AOTAutograd (the custom ops' shape functions, the
    casts around them), in one graph: `fullgraph` turns a break into an error that names it (a
    break splits the model into pieces that recompile for every stage width). The graph dynamo
    hands the backend is appended to `graphs`."""
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(graph, example_inputs):
        graphs.append(graph)
        return aot_eager(graph, example_inputs)
    torch._dynamo.reset()
    return torch.compile(model, backend=backend, fullgraph=True)


def graph_code(graph: torch.fx.GraphModule) -> str:
    """The code of a traced graph and of its subgraphs (checkpointed blocks are subgraphs)."""
    return "".join(g.code for g in graph.modules() if isinstance(g, torch.fx.GraphModule))


@pytest.mark.parametrize("name", ["alt_gvt_micro", "pcpvt_micro"])
@pytest.mark.parametrize("precision, bf16_kernels", [("fp32", None), ("bf16", "native"),
                                                     ("bf16", "emulated")])
def test_compiled_model_is_one_graph_equal_to_eager(name, precision, bf16_kernels, monkeypatch):
    """Under torch.compile the fast paths step aside without a graph break, on either kind of
    CPU (as `bf16_kernels` below, for bf16 only), and the compiled model gives the eager logits.
    Maps of 16, 8, 4, 2: whole windows of 4 (the custom op) but in the last (the plain path)."""
    if bf16_kernels is not None:
        monkeypatch.setitem(kernels._CPU_NATIVE, torch.bfloat16, bf16_kernels == "native")
    model = twins.create_model(name).eval()
    images = torch.randn(2, 3, 64, 64)
    graphs = []
    compiled = compiled_in_one_graph(model, graphs)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                enabled=precision == "bf16"):
        eager, graph = model(images), compiled(images)
    assert graph.dtype == eager.dtype
    torch.testing.assert_close(graph.float(), eager.float(), atol=1e-5, rtol=1e-5)
    # At inference the chunked residual branches stay whole in the graph, as custom ops, on
    # either kind of CPU.
    assert len(graphs) == 1
    code = graph_code(graphs[0])
    assert "twins.mlp_residual_" in code
    assert "twins.global_attention_residual" in code
    assert ("twins.window_attention_residual" in code) == name.startswith("alt_gvt")


def test_blocks_in_training_mode_take_the_plain_path_without_autograd(monkeypatch):
    """The chunked inference branches know no dropout or stochastic depth: a block in training
    mode under no_grad must not use them."""
    block = Block(12, num_heads=3, mlp_ratio=2, window_size=4, drop_path=0.5).train()
    x = torch.randn(2, 8 * 12, 12)
    for name in ("mlp_residual_", "window_attention_residual", "global_attention_residual"):
        monkeypatch.setattr(kernels, name, lambda *args: pytest.fail("inference branch used"))
    with torch.no_grad():
        torch.manual_seed(1)
        out = block(x, (8, 12))
    assert out.shape == x.shape


# ------------------------------------------------------------------ bf16 on either kind of CPU
@pytest.fixture(params=["native", "emulated"])
def bf16_kernels(request, monkeypatch):
    """Run a test as on a CPU with bf16 kernels (AVX512-BF16/AMX: the chunked kernels compute
    in bf16) and as on one without (AVX2: they compute in fp32 on rounded operands), whatever
    this machine is; torch's own bf16 kernels run on both, only slower on the second."""
    native = request.param == "native"
    monkeypatch.setitem(kernels._CPU_NATIVE, torch.bfloat16, native)
    return request.param


def test_compute_dtype_follows_autocast_and_the_cpu(bf16_kernels):
    x = torch.randn(2, 3)
    assert kernels.compute_dtype(x) == torch.float32
    assert kernels.compute_dtype(x.double()) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = torch.bfloat16 if bf16_kernels == "native" else torch.float32
        assert kernels.compute_dtype(x) == want
        assert kernels.operands(x, x)[0].dtype == want
        assert torch.equal(kernels.operands(x, x)[0].float(), x.bfloat16().float())
        assert (kernels.emulated_autocast_dtype(x) is None) == (bf16_kernels == "native")


def relative_close(got, want, tol=0.03, msg=""):
    """Max abs difference within tol of the reference's largest magnitude (bf16 gradients)."""
    scale = want.float().abs().max().item()
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol * scale, f"{msg}: max error {err:.3g} vs scale {scale:.3g}"


def autocast_grads(module, x, *args):
    """bf16-autocast output of module(x, *args) and the gradients of a fixed function of it
    with respect to x and every parameter."""
    params = [x] + list(module.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x, *args)
    loss = (out.float() * torch.linspace(-1, 1, out.shape[-1])).square().sum()
    return [out] + list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize("kind", ["mlp", "lsa", "gsa-sr1", "gsa-sr2"])
def test_bf16_training_kernels_close_to_torch_bf16(kind, bf16_kernels, chunk_rows, monkeypatch):
    """Forward and every gradient of the chunked kernels under bf16 autocast against the plain
    modules on torch's own bf16 kernels."""
    size = (8, 12)
    if kind == "mlp":
        m, args = Mlp(12, 40), ()
    elif kind == "lsa":
        m, args = LocallyGroupedAttention(12, num_heads=3, window_size=4), (size,)
    else:
        m, args = GlobalSubsampledAttention(12, num_heads=2, sr_ratio=int(kind[-1])), (size,)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, size[0] * size[1], 12, requires_grad=True)
    fast = autocast_grads(m, x, *args)
    monkeypatch.setattr(kernels, "enabled", lambda x: False)
    monkeypatch.setattr(kernels, "flash_attention_applies", lambda q: False)  # torch's own
    plain = autocast_grads(m, x, *args)
    assert fast[0].dtype == plain[0].dtype == torch.bfloat16
    names = ["out", "x"] + [n for n, _ in m.named_parameters()]
    for name, f, p in zip(names, fast, plain):
        assert f.dtype == p.dtype, name
        relative_close(f, p, msg=name)


@pytest.mark.parametrize("kind", ["lsa", "gsa-sr1", "gsa-sr2"])
@pytest.mark.parametrize("size", [(8, 12), (5, 7)])
def test_bf16_inference_residual_branches_equal_plain(kind, size, bf16_kernels, chunk_rows,
                                                      monkeypatch):
    """A whole block at bf16-autocast inference (the chunked residual branches, computing in
    bf16 or in fp32 on rounded operands) against the plain modules."""
    block = inference_block(kind)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, size[0] * size[1], 12).bfloat16()  # the bf16 residual stream of autocast
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.inference_applies(x)
        fast = block(x, size)
        monkeypatch.setattr(kernels, "enabled", lambda x: False)
        plain = block(x, size)
    assert fast.dtype == plain.dtype == torch.bfloat16
    relative_close(fast, plain, tol=0.02)


@pytest.mark.parametrize("kind", ["lsa", "gsa-sr1", "gsa-sr2"])
@pytest.mark.parametrize("stream", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_emulated_bf16_inference_rounds_where_the_plain_modules_do(kind, stream, chunk_rows,
                                                                    monkeypatch):
    """On a CPU without bf16 kernels the chunked residual branches compute in fp32 and round
    the LayerNorm, q/k/v, attention, GELU and projection outputs as the plain modules under
    emulated autocast do: the same bits, but for the rare element where the two fp32 attention
    kernels' last-bit difference flips a rounding (at most 0.2% measured; leaving out the
    attention's or fc2's rounding made 17% or more differ). The residual stream is bf16, as in the models, or fp32, whose
    sum shows every difference of the branch."""
    monkeypatch.setitem(kernels._CPU_NATIVE, torch.bfloat16, False)
    block = inference_block(kind)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 8 * 12, 12).to(stream)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.inference_applies(x) and kernels.emulated_autocast_dtype(x) is not None
        fast = block(x, (8, 12))
        monkeypatch.setattr(kernels, "enabled", lambda x: False)
        plain = block(x, (8, 12))
    assert fast.dtype == plain.dtype == stream
    differ = (fast != plain).float().mean().item()
    assert differ <= 0.01, f"{differ:.1%} of the outputs differ"
    relative_close(fast, plain, tol=0.01)


@pytest.mark.parametrize("name", ["alt_gvt_micro", "pcpvt_micro"])
def test_whole_model_bf16_training_close_to_torch_bf16(name, bf16_kernels, monkeypatch):
    """Logits and every parameter gradient of a bf16-autocast training step, fast paths against
    the plain modules on torch's bf16 kernels."""
    torch.manual_seed(0)
    model = twins.create_model(name, num_classes=7)
    images = torch.randn(2, 3, 64, 64)

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images)
        F.cross_entropy(out.float(), torch.tensor([1, 4])).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fast_out, fast_grads = step()
    # Both steps keep our LayerNorm: torch's CPU kernel sums its bf16 weight and bias
    # gradients in bf16 (see the LayerNorm tests below), which would be the error measured.
    layer_norm_applies = twins.layers.low_precision_layer_norm_applies
    monkeypatch.setattr(twins.layers, "low_precision_layer_norm_applies",
                        lambda x, norm: layer_norm_applies(x, norm) or x.dtype == torch.bfloat16)
    monkeypatch.setattr(kernels, "enabled", lambda x: False)
    monkeypatch.setattr(kernels, "flash_attention_applies", lambda q: False)  # torch's own
    plain_out, plain_grads = step()
    relative_close(fast_out, plain_out, tol=0.05, msg="logits")
    for n in plain_grads:
        relative_close(fast_grads[n], plain_grads[n], tol=0.1, msg=n)


# ------------------------------------------- the plain modules' attention in bf16 training
def token_major(*shape, dtype=torch.bfloat16):
    """A (B, H, L, D) tensor laid out as (B, L, H, D), as the modules' q/k/v views are."""
    B, H, L, D = shape
    return torch.randn(B, L, H, D, dtype=dtype).transpose(1, 2)


@pytest.mark.parametrize("layout", ["token-major", "contiguous"])
def test_flash_attention_op_passes_opcheck(layout):
    """Schema, fake (shape and stride) functions, autograd registration and AOT dispatch of the
    custom op, as torch.compile relies on them."""
    if layout == "token-major":
        q, k, v = token_major(2, 3, 10, 8), token_major(2, 3, 7, 8), token_major(2, 3, 7, 8)
    else:
        q, k, v = (torch.randn(2, 3, n, 8, dtype=torch.bfloat16) for n in (10, 7, 7))
    for t in (q, k, v):
        t.requires_grad_()
    results = torch.library.opcheck(kernels.flash_attention, (q, k, v))
    assert set(results.values()) == {"SUCCESS"}, results


def training_op_inputs(op: str, dtype: torch.dtype):
    """Odd-sized inputs of a training-kernel custom op (those that are tensors needing grad)."""
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_()
    if op == "mlp_train":  # 37 tokens, C 6 -> H 10 -> C_out 6
        return (t(37, 6), t(10, 6), t(10), t(6, 10), t(6), None, True)
    if op == "window_attention_train":  # 5 windows of 9 tokens, 2 heads of 4 channels
        return (t(45, 24), 9, 2, True)
    if op == "peg_train":  # 2 maps of 5 x 7 tokens, C 6, 3 x 3 kernel; x stays fp32
        return (t(2, 35, 6).float(), t(6, 1, 3, 3), t(6), 5, 7)
    # 2 images of 11 query tokens, C 8 in 2 heads, 3 key/value tokens
    return (t(2, 11, 8), t(8, 8), t(8), t(2, 2, 3, 4), t(2, 2, 3, 4), None, True)


@pytest.mark.parametrize("op", ["mlp_train", "window_attention_train",
                                "query_chunk_attention_train", "peg_train"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_ops_pass_opcheck(op, dtype):
    """Schema, fake (shape and stride) functions, autograd registration and AOT dispatch of the
    training kernels' custom ops, as torch.compile relies on them."""
    results = torch.library.opcheck(getattr(kernels, op), training_op_inputs(op, dtype))
    assert set(results.values()) == {"SUCCESS"}, results


def test_flash_attention_gradients_are_those_of_exact_attention():
    """Output and gradients of the op on bf16 q, k, v: fp32 attention on the same values,
    rounded to bf16, and torch's own bf16 kernel within bf16 precision."""
    q, k, v = token_major(2, 3, 10, 8), token_major(2, 3, 7, 8), token_major(2, 3, 7, 8)
    grad = token_major(2, 3, 10, 8)

    def run(fn, dtype):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*inputs)
        return [out] + list(torch.autograd.grad(out, inputs, grad.to(dtype)))
    ours = run(lambda *t: kernels.flash_attention(*t)[0], torch.bfloat16)
    exact = run(attention, torch.float32)
    torch_bf16 = run(F.scaled_dot_product_attention, torch.bfloat16)
    for name, o, e, t in zip(["out", "dq", "dk", "dv"], ours, exact, torch_bf16):
        assert o.dtype == torch.bfloat16 and o.shape == e.shape, name
        torch.testing.assert_close(o, e.bfloat16(), atol=1e-2, rtol=1e-2, msg=name)
        relative_close(o, t, msg=name)


def test_flash_attention_applies_to_bf16_autograd_on_cpus_with_bf16_kernels(bf16_kernels):
    q = torch.randn(1, 1, 4, 8, dtype=torch.bfloat16)
    assert kernels.flash_attention_applies(q) == (bf16_kernels == "native")
    assert not kernels.flash_attention_applies(q.float())
    with torch.no_grad():
        assert not kernels.flash_attention_applies(q)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_peg_training_op_equals_the_plain_computation(precision, bf16_kernels):
    """In CPU training the PEG is the `twins::peg_train` op, in fp32 and in bf16 where the CPU
    has bf16 kernels (else the plain module, emulating them); its output and gradients are
    those of the plain computation (the convolution on an NCHW copy of the map)."""
    m = PositionalEncodingGenerator(8)
    torch.nn.init.normal_(m.proj[0].bias)
    x = torch.randn(2, 5 * 7, 8, requires_grad=True)
    params = [x, m.proj[0].weight, m.proj[0].bias]
    out, ref = run(m, precision, x, (5, 7)), run(reference_peg, precision, m, x, (5, 7))
    uses_op = precision == "fp32" or bf16_kernels == "native"
    assert ("twins_peg_train" in type(out.grad_fn).__name__) == uses_op
    assert_matches(out, ref, precision)
    grad = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(ref, params, grad)):
        assert g.dtype == w.dtype
        if precision == "fp32":
            torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)
        else:
            relative_close(g, w, tol=0.01)


@pytest.mark.parametrize("name", ["alt_gvt_micro", "pcpvt_micro"])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_compiled_training_keeps_the_kernels_and_matches_eager(name, precision,
                                                               grad_checkpointing, monkeypatch):
    """Under torch.compile a training step calls the chunked training kernels as custom ops,
    in one graph (the MLP, the attention on whole windows, the global attention), with the
    logits and gradients of the eager step; with gradient checkpointing too, whose blocks
    allocate plainly (traced into the graph)."""
    monkeypatch.setitem(kernels._CPU_NATIVE, torch.bfloat16, True)
    # Both sides with PyTorch's LayerNorm (eager sums bf16 LayerNorm parameter gradients in
    # fp32 itself; in a compiled graph LayerNorm is the backend's).
    monkeypatch.setattr(twins.layers, "low_precision_layer_norm_applies", lambda x, norm: False)
    torch.manual_seed(0)
    model = twins.create_model(name, num_classes=7)
    model.set_grad_checkpointing(grad_checkpointing)
    # Maps of 16, 8, 4, 2: whole windows of 4 but the last. Channels-last, as eager hands the
    # first convolution its images, so that both sides run the same convolution: on CPUs
    # without bf16 instructions oneDNN's bf16 convolutions of NCHW and NHWC images round
    # differently (1 bf16 ulp); with them they agree.
    images = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    bf16 = precision == "bf16"

    def step(m):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = m(images)
        F.cross_entropy(out.float(), torch.tensor([1, 4])).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    graphs = []
    compiled_out, compiled_grads = step(compiled_in_one_graph(model, graphs))
    eager_out, eager_grads = step(model)
    assert len(graphs) == 1
    code = graph_code(graphs[0])
    assert all(f"twins.{op}" in code for op in ("mlp_train", "query_chunk_attention_train",
                                                 "peg_train"))
    assert ("twins.window_attention_train" in code) == name.startswith("alt_gvt")
    # The last argument, `reuse`: no pooled buffers in checkpointed blocks.
    calls = re.findall(r"twins\.(?!peg)\w+_train\.default\(([^)]*)\)", code)
    assert {c.rsplit(",", 1)[1].strip() for c in calls} == {str(not grad_checkpointing)}
    torch.testing.assert_close(compiled_out, eager_out, atol=1e-6, rtol=1e-6)
    for n in eager_grads:
        torch.testing.assert_close(compiled_grads[n], eager_grads[n], atol=1e-6, rtol=1e-5, msg=n)


def test_inductor_compiled_training_step_matches_eager(monkeypatch, tmp_path):
    """The same with inductor, torch.compile's default backend, which checks the layout of
    every custom op's output against the op's fake function and lays out the tensors around
    the ops itself: an fp32 training step gives the eager step's logits and gradients. A cache
    of its own: inductor's on-disk cache does not notice a change in a custom op's fake
    function. Two stages of alt_gvt_micro's kind, since inductor compiles each kernel of every
    stage width with the C++ compiler (a second each): maps of 12 (whole windows of 4, global
    attention over a sub-sampled map) and 6 (partial windows, global attention unsampled)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    model = twins.create_model("alt_gvt_micro", num_classes=7, embed_dims=(32, 64),
                               depths=(2, 2), num_heads=(1, 2), mlp_ratios=(2, 2),
                               window_sizes=(4, 4), sr_ratios=(2, 1), patch_sizes=(4, 2))
    images = torch.randn(2, 3, 48, 48)

    def step(m):
        model.zero_grad(set_to_none=True)
        out = m(images)
        F.cross_entropy(out, torch.tensor([1, 4])).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    compiled_out, compiled_grads = step(torch.compile(model))
    eager_out, eager_grads = step(model)
    # Inductor computes the LayerNorms, adds and the head in its own order: fp32 rounding.
    torch.testing.assert_close(compiled_out, eager_out, atol=1e-5, rtol=1e-5)
    for n in eager_grads:
        torch.testing.assert_close(compiled_grads[n], eager_grads[n], atol=1e-5, rtol=1e-4, msg=n)


def count_flash_backward_images(monkeypatch):
    """The batch size of q in each call of the flash backward kernel, as a list that fills."""
    calls, kernel = [], kernels._flash_backward_op

    def counted(*args):
        calls.append(args[1].shape[0])
        return kernel(*args)
    monkeypatch.setattr(kernels, "_flash_backward_op", counted)
    return calls


@pytest.mark.parametrize("threads, pieces", [(1, 1), (2, 2), (3, 3), (4, 4)])
def test_flash_backward_splits_one_image_for_the_threads_and_gives_the_same_gradients(
        threads, pieces, monkeypatch):
    """A single image and head (PCPVT's first stage) is cut into one piece of queries per
    thread; the gradients are those of the whole, the key/value ones summed over pieces."""
    L = 6 * kernels._MIN_SPLIT_QUERIES
    q = token_major(1, 1, L, 16, dtype=torch.float32)
    k, v = torch.randn(1, 1, 7, 16), torch.randn(1, 1, 7, 16)
    out, lse = kernels._flash(q, k, v)[:2]
    do = torch.randn_like(out)
    want = kernels._flash_backward_op(do, q, k, v, out, lse, 0.0, False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    calls = count_flash_backward_images(monkeypatch)
    got = kernels._flash_backward(do, q, k, v, out, lse)
    assert calls == [pieces]
    for name, g, w in zip(["dq", "dk", "dv"], got, want):
        assert g.shape == w.shape, name
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=name)


def test_flash_backward_does_not_split_several_images_heads_or_short_chunks(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    calls = count_flash_backward_images(monkeypatch)
    n = kernels._MIN_SPLIT_QUERIES
    for shape in [(2, 1, 2 * n), (1, 2, 2 * n), (1, 1, 2 * n - 2), (1, 1, 2 * n + 1)]:
        q = token_major(*shape, 16, dtype=torch.float32)
        k, v = torch.randn(shape[0], shape[1], 7, 16), torch.randn(shape[0], shape[1], 7, 16)
        out, lse = kernels._flash(q, k, v)[:2]
        kernels._flash_backward(torch.randn_like(out), q, k, v, out, lse)
    assert calls == [2, 1, 1, 1]


# --------------------------------------------------------------- LayerNorm in bf16 training
def test_layer_norm_sums_bf16_weight_and_bias_gradients_in_fp32(chunk_rows):
    """Output and input gradient are PyTorch's; the weight and bias gradients are those of
    float64 arithmetic on the same bf16 values (PyTorch's CPU kernel sums them in bf16)."""
    norm = LayerNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    x = (torch.randn(3, 401, 16) * 3 + 1).bfloat16().requires_grad_()
    grad = (torch.randn(3, 401, 16) * 0.01 + 0.002).bfloat16()  # a mean: long sums grow
    out = norm(x)
    assert out.grad_fn.name().startswith("_LowPrecisionLayerNorm")
    out.backward(grad)
    plain = torch.nn.LayerNorm(16, eps=1e-6)
    plain.load_state_dict(norm.state_dict())
    x_plain = x.detach().clone().requires_grad_()
    plain_out = plain(x_plain)
    plain_out.backward(grad)
    assert torch.equal(out, plain_out) and torch.equal(x.grad, x_plain.grad)
    exact = torch.nn.LayerNorm(16, eps=1e-6).double()
    exact.load_state_dict(norm.state_dict())
    exact(x.detach().double()).backward(grad.double())
    for name, ours, want in [("weight", norm.weight.grad, exact.weight.grad),
                             ("bias", norm.bias.grad, exact.bias.grad)]:
        assert ours.dtype == torch.float32
        assert (ours.double() - want).abs().max() <= 1e-5 * want.abs().max(), name


def test_layer_norm_takes_the_plain_path_in_fp32_and_without_autograd():
    norm = LayerNorm(8)
    for x, grad in [(torch.randn(2, 5, 8, requires_grad=True), True),
                    (torch.randn(2, 5, 8).bfloat16(), False)]:
        with torch.set_grad_enabled(grad):
            out = norm(x)
        assert out.grad_fn is None or not out.grad_fn.name().startswith("_LowPrecision")
        torch.testing.assert_close(out, F.layer_norm(x, (8,), norm.weight, norm.bias, norm.eps))
