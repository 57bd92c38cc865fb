"""The native CPU kernels (twins/native.cpp) against float64 references, their use by the MLP's
backward and by inference attention, and the PyTorch fallback when they cannot be built or are
turned off."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from twins import kernels, native
from twins.layers import Mlp


def native_ops():
    """The built operators; on an x86 CPU with AVX2 and a C++ compiler they must build."""
    if native.capability() is None:
        pytest.skip("the native kernels are built for x86 CPUs with AVX2 or AVX-512 only")
    assert shutil.which("c++") or shutil.which("g++"), "no C++ compiler on this machine"
    ops = native.ops()
    assert ops is not None, "the native kernels failed to build (see the warning above)"
    return ops


@pytest.mark.parametrize("rows, hidden", [(1, 16), (131, 67), (300, 256), (64, 5)],
                         ids=["one-row", "odd", "wide", "narrower-than-a-vector"])
def test_gelu_backward_matches_float64(rows, hidden):
    ops = native_ops()
    torch.manual_seed(0)
    pre = torch.randn(rows, hidden) * 3  # both tails of the GELU
    pre[0, :3] = torch.tensor([0.0, -9.0, 9.0])[: min(3, hidden)]
    grad = torch.randn(rows, hidden)
    act = torch.full_like(pre, float("nan"))
    grad_bias = torch.full((hidden,), 0.5)  # accumulated into, not overwritten
    want_act = torch.nn.functional.gelu(pre.double())
    want_grad = torch.ops.aten.gelu_backward(grad.double(), pre.double())
    want_bias = 0.5 + want_grad.sum(0)

    got = grad.clone()
    ops.gelu_backward_(pre, got, act, grad_bias)

    # The erf is accurate to 1.5e-7 (PyTorch's own CPU GELU kernels: about 1e-6 here).
    torch.testing.assert_close(act.double(), want_act, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.double(), want_grad, atol=2e-6, rtol=0)
    torch.testing.assert_close(grad_bias.double(), want_bias, atol=1e-5, rtol=1e-6)


def test_gelu_backward_rejects_what_it_does_not_handle():
    ops = native_ops()
    a = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="contiguous fp32 CPU tensors, not BFloat16"):
        ops.gelu_backward_(a.bfloat16(), a.bfloat16(), a.bfloat16(), torch.zeros(8))
    with pytest.raises(RuntimeError, match="contiguous fp32"):
        ops.gelu_backward_(a.t().contiguous().t(), a.clone(), a.clone(), torch.zeros(8))
    with pytest.raises(RuntimeError, match="one shape"):
        ops.gelu_backward_(a, a[:2].clone(), a.clone(), torch.zeros(8))
    with pytest.raises(RuntimeError, match=r"\(H,\)"):
        ops.gelu_backward_(a, a.clone(), a.clone(), torch.zeros(7))


LAYER_NORM_SHAPES = [(1, 16), (131, 67), (300, 256), (64, 5), (9, 1)]
LAYER_NORM_IDS = ["one-row", "odd", "wide", "narrower-than-a-vector", "one-channel"]


def layer_norm_inputs(rows, channels, seed=0):
    """x with rows of large mean and small spread (where one-pass moments lose digits) and a
    constant row (variance 0), weight and bias."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, channels, generator=gen) * 0.5 + 40 * torch.randn(rows, 1, generator=gen)
    x[0] = 3.0
    return x, torch.randn(channels, generator=gen), torch.randn(channels, generator=gen)


def assert_as_exact(got: torch.Tensor, aten: torch.Tensor, want: torch.Tensor) -> None:
    """got's largest error against float64 `want` is at most three times that of PyTorch's
    fp32 kernel (`aten`), or 1e-6 of want's largest entry (where ATen's is about 0)."""
    error = (got.double() - want).abs().max().item()
    bound = max(3 * (aten.double() - want).abs().max().item(), 1e-6 * want.abs().max().item())
    assert error <= bound, f"error {error:.3g} against float64, ATen's x 3: {bound:.3g}"


@pytest.mark.parametrize("rows, channels", LAYER_NORM_SHAPES, ids=LAYER_NORM_IDS)
def test_layer_norm_matches_float64(rows, channels):
    ops = native_ops()
    x, weight, bias = layer_norm_inputs(rows, channels)
    eps = 1e-6
    want = torch.nn.functional.layer_norm(x.double(), (channels,), weight.double(),
                                          bias.double(), eps)
    out = torch.full_like(x, float("nan"))
    ops.layer_norm_(x, weight, bias, eps, out)
    # As exact as PyTorch's fp32 kernel (whose error here comes from the rows' large means).
    aten = torch.nn.functional.layer_norm(x, (channels,), weight, bias, eps)
    assert_as_exact(out, aten, want)
    assert torch.equal(out[0], bias)  # the constant row: its mean exactly, so the bias
    y = x.clone()
    ops.layer_norm_(y, weight, bias, eps, y)  # in place: the same values
    assert torch.equal(y, out)


def test_layer_norm_rejects_what_it_does_not_handle():
    ops = native_ops()
    x, w, b = torch.randn(4, 8), torch.randn(8), torch.randn(8)
    with pytest.raises(RuntimeError, match="contiguous fp32 CPU tensors, not BFloat16"):
        ops.layer_norm_(x.bfloat16(), w, b, 1e-6, x.bfloat16())
    with pytest.raises(RuntimeError, match="contiguous fp32"):
        ops.layer_norm_(x.t().contiguous().t(), w, b, 1e-6, x.clone())
    with pytest.raises(RuntimeError, match="one shape"):
        ops.layer_norm_(x, w, b, 1e-6, x[:2].clone())
    with pytest.raises(RuntimeError, match=r"\(C,\)"):
        ops.layer_norm_(x, w[:7], b, 1e-6, x.clone())


def test_layer_norm_module_takes_the_native_kernel_at_inference(monkeypatch):
    """`twins.layers.LayerNorm` (every LayerNorm of the models) runs the native kernel at eager
    fp32 inference, with the values of PyTorch's; training, a non-contiguous input and a bf16
    one take PyTorch's kernels."""
    from twins.layers import LayerNorm
    counting = _Counting(native_ops())
    monkeypatch.setattr(native, "ops", lambda: counting)
    torch.manual_seed(0)
    norm = LayerNorm(37, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 11, 37) * 3
    want = torch.nn.functional.layer_norm(x, (37,), norm.weight, norm.bias, 1e-6)
    with torch.inference_mode():
        torch.testing.assert_close(norm(x), want, atol=1e-5, rtol=1e-5)
    assert counting.calls == {"layer_norm_": 1}
    x.requires_grad_()
    norm(x).sum().backward()  # training
    with torch.no_grad():
        norm(x.transpose(0, 1))  # not contiguous
        norm(x.bfloat16())
    assert counting.calls == {"layer_norm_": 1}
    assert x.grad is not None and norm.weight.grad is not None


ROUNDINGS = [torch.bfloat16, torch.float16]


def values_to_round(n: int) -> torch.Tensor:
    """n fp32 values over the cases of a rounding, in mixed order: magnitudes from fp32's
    subnormals to its largest (beyond fp16's range, subnormal in either type), exact ties
    of bf16 and of fp16 (the dropped bits exactly half a step), random dropped bits, and the
    special values."""
    torch.manual_seed(0)
    x = torch.randn(n) * torch.logspace(-45, 38, n)[torch.randperm(n)]
    bits = x.view(torch.int32)
    part = torch.randperm(n)[: 3 * (n // 4)].view(3, -1)
    bits[part[0]] = bits[part[0]] & ~0xFFFF | 0x8000  # bf16 ties, either parity of the last bit
    bits[part[1]] = (torch.randn(part.shape[1]).view(torch.int32) & ~0x1FFF) | 0x1000  # fp16's
    bits[part[2]] |= torch.randint(0, 2 ** 16, (part.shape[1],), dtype=torch.int32)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40,
                             -3e-39, 6e-8, 3e-5, 65520.0, 70000.0, 3.4e38, 1.00390625])
    x[: min(n, len(specials))] = specials[:n]
    return x


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """got and want hold the same fp32 bits, but for NaN payloads (NaN where want has NaN)."""
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))


@pytest.mark.parametrize("dtype", ROUNDINGS, ids=["bf16", "fp16"])
@pytest.mark.parametrize("n", [1, 13, 40, 100_003], ids=["one", "tail-only", "vectors+tail",
                                                           "several-tasks"])
def test_round_gives_the_bits_of_torchs_casts(dtype, n):
    ops = native_ops()
    x = values_to_round(n)
    want = x.to(dtype).float()
    got = x.clone()
    ops.round_(got, dtype)
    assert_same_bits(got, want)


def test_round_rejects_what_it_does_not_handle():
    ops = native_ops()
    a = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="contiguous fp32 CPU tensor, not BFloat16"):
        ops.round_(a.bfloat16(), torch.bfloat16)
    with pytest.raises(RuntimeError, match="contiguous fp32"):
        ops.round_(a.t(), torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16 or float16, not Double"):
        ops.round_(a, torch.float64)


@pytest.mark.parametrize("dtype", ROUNDINGS, ids=["bf16", "fp16"])
def test_emulated_rounding_takes_the_native_pass_where_it_can(dtype, monkeypatch):
    """`kernels._round_` gives the same bits with the native pass (contiguous tensors) and with
    PyTorch's casts (strided ones, or no native kernels)."""
    counting = _Counting(native_ops())
    monkeypatch.setattr(native, "ops", lambda: counting)
    x = values_to_round(3 * 1000).view(3, 1000)
    want = x.to(dtype).float()
    contiguous, strided = x.clone(), x.t().contiguous().t()  # column-major
    assert kernels._round_(contiguous, dtype) is contiguous
    assert kernels._round_(strided, dtype) is strided
    assert counting.calls == {"round_": 1}
    monkeypatch.setattr(native, "ops", lambda: None)
    plain = x.clone()
    kernels._round_(plain, dtype)
    for t in (contiguous, strided, plain):
        assert_same_bits(t, want)
    bits = x.view(torch.int32).clone()
    assert kernels._round_(x, None) is x and torch.equal(x.view(torch.int32), bits)  # untouched


class _Counting:
    """The native operators, counting the calls of each."""

    def __init__(self, ops):
        self.ops, self.calls = ops, {}

    def __getattr__(self, name):
        op = getattr(self.ops, name)

        def counted(*args):
            self.calls[name] = self.calls.get(name, 0) + 1
            return op(*args)
        return counted


def token_major_qkv(B, H, L, keys, D, seed=0):
    """q (B, H, L, D) and k, v (B, H, keys, D) as the inference kernels pass them: strided
    views of token-major (B, tokens, heads, D) tensors."""
    torch.manual_seed(seed)
    q = (torch.randn(B, L, H, D) * 2).transpose(1, 2)  # scores spread enough to test the softmax
    k, v = (torch.randn(2, B, keys, H, D)).transpose(2, 3).unbind(0)
    return q, k, v


def exact_attention(q, k, v):
    return torch.softmax(q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5,
                         -1) @ v.double()


@pytest.mark.parametrize("B, H, L, keys, D", [
    (2, 3, 13, 49, 32),   # a 7 x 7 window: keys not a whole number of vectors
    (4, 2, 49, 49, 64),   # PCPVT's head width
    (1, 2, 5, 7, 12),     # head channels past the last whole vector, fewer queries than a tile
    (3, 1, 1, 1, 8),      # one query, one key
    (2, 2, 600, 17, 16),  # several blocks of queries per head, the last one short
    (1, 1, 9, 64, 40),
    (2, 2, 21, 40, 24),   # three 16-float score vectors (five of 8)
    (1, 3, 530, 33, 32),  # query blocks packing their head's keys once per thread
], ids=["window", "hd64", "tails", "single", "query-blocks", "64-keys", "40-keys", "33-keys"])
def test_attention_matches_float64(B, H, L, keys, D):
    ops = native_ops()
    q, k, v = token_major_qkv(B, H, L, keys, D)
    out = torch.full((B, L, H, D), float("nan")).transpose(1, 2)  # token-major, as SDPA's
    ops.attention_(q, k, v, out)
    want = exact_attention(q, k, v)
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=1e-5)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, sdpa, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("B, H, L, keys, D", [
    (2, 3, 13, 49, 32),   # a 7 x 7 window
    (1, 2, 5, 7, 12),     # head channels past the last whole vector of bf16 and of fp32
    (2, 2, 600, 17, 16),  # several blocks of queries per head, the last one short
    (1, 3, 530, 33, 40),  # query blocks reusing their head's converted keys and values
], ids=["window", "tails", "query-blocks", "33-keys"])
def test_bf16_attention_is_the_fp32_kernel_rounded_once(B, H, L, keys, D):
    """bf16 operands: exactly the fp32 kernel's output on the same (bf16-valued) operands,
    rounded to bf16 once; so within one bf16 rounding of exact attention."""
    ops = native_ops()
    q, k, v = (t.bfloat16() for t in token_major_qkv(B, H, L, keys, D))
    out = torch.full((B, L, H, D), float("nan"), dtype=torch.bfloat16).transpose(1, 2)
    ops.attention_(q, k, v, out)
    in_fp32 = torch.empty(B, L, H, D).transpose(1, 2)
    ops.attention_(q.float(), k.float(), v.float(), in_fp32)
    assert torch.equal(out, in_fp32.bfloat16())
    want = exact_attention(q, k, v)
    torch.testing.assert_close(out.double(), want, atol=1e-6, rtol=2 ** -8)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_attention_gives_nan_where_exact_softmax_does(bad):
    """A query row with a NaN or infinite entry has a NaN output row (its scores' softmax is
    NaN in exact arithmetic too: inf - inf), and leaves the other rows alone; a bad key entry
    gives NaN wherever exact arithmetic does. (The fast exp clamps its input and would
    otherwise turn NaN into numbers.)"""
    ops = native_ops()
    q, k, v = token_major_qkv(2, 2, 13, 49, 32)
    q[1, 0, 5, 3] = bad
    out = torch.empty_like(q)
    ops.attention_(q, k, v, out)
    nan_rows = torch.zeros(2, 2, 13, dtype=torch.bool)
    nan_rows[1, 0, 5] = True
    assert torch.isnan(out[nan_rows]).all()
    torch.testing.assert_close(out[~nan_rows].double(), exact_attention(q, k, v)[~nan_rows],
                               atol=2e-6, rtol=1e-5)
    k[0, 1, 7, 0] = bad
    ops.attention_(q, k, v, out)
    want = exact_attention(q, k, v)
    assert torch.isnan(want[0, 1]).any()
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=1e-5, equal_nan=True)


def test_attention_rejects_what_it_does_not_handle():
    ops = native_ops()
    q, k, v = token_major_qkv(2, 2, 5, 7, 8)
    out = torch.empty_like(q)
    many = token_major_qkv(1, 1, 3, 65, 8)
    with pytest.raises(RuntimeError, match="handles up to 64 keys, not 65"):
        ops.attention_(*many, torch.empty_like(many[0]))
    with pytest.raises(RuntimeError, match="4-D CPU tensors of one dtype"):
        ops.attention_(q.bfloat16(), k, v, out)
    with pytest.raises(RuntimeError, match="takes fp32 or bf16 tensors, not Half"):
        ops.attention_(*(t.half() for t in (q, k, v, out)))
    with pytest.raises(RuntimeError, match="unit stride along the last dimension"):
        ops.attention_(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, out)
    with pytest.raises(RuntimeError, match="do not match"):
        ops.attention_(q, k, v[:, :, :6], out)
    with pytest.raises(RuntimeError, match="do not match"):
        ops.attention_(q, k, v, out[:, :, :4])


@pytest.mark.parametrize("native_bf16", [True, False], ids=["bf16-native", "bf16-sdpa"])
def test_inference_attention_takes_the_native_kernel_for_few_keys(native_bf16, monkeypatch):
    """`kernels.attend`: the native kernel for the dtypes of NATIVE_ATTENTION_DTYPES (fp32, and
    bf16 on CPUs without AMX) with up to NATIVE_ATTENTION_KEYS keys, SDPA otherwise (more keys,
    other dtypes, no native kernels), the same attention either way."""
    counting = _Counting(native_ops())
    monkeypatch.setattr(native, "ops", lambda: counting)
    monkeypatch.setattr(kernels, "NATIVE_ATTENTION_DTYPES",
                        (torch.float32, torch.bfloat16) if native_bf16 else (torch.float32,))
    few = token_major_qkv(2, 2, 11, kernels.NATIVE_ATTENTION_KEYS, 32)
    many = token_major_qkv(2, 2, 11, kernels.NATIVE_ATTENTION_KEYS + 1, 32)
    with torch.inference_mode():
        got = kernels.attend(*few, "test.attn")
        assert counting.calls == {"attention_": 1}
        assert got.transpose(1, 2).is_contiguous()  # token-major: (B, L, H * D) is a view
        torch.testing.assert_close(got.double(), exact_attention(*few), atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(kernels.attend(*many, "test.attn").double(),
                                   exact_attention(*many), atol=2e-6, rtol=1e-5)
        assert counting.calls == {"attention_": 1}  # more keys: SDPA
        bf16 = kernels.attend(*(t.bfloat16() for t in few), "test.attn")
        assert bf16.dtype == torch.bfloat16 and bf16.transpose(1, 2).is_contiguous()
        assert counting.calls == {"attention_": 2 if native_bf16 else 1}
        torch.testing.assert_close(bf16.double(), exact_attention(*few), atol=1e-2, rtol=2 ** -7)
        kernels.attend(*(t.half() for t in few), "test.attn")
        assert counting.calls == {"attention_": 2 if native_bf16 else 1}  # fp16: SDPA
        monkeypatch.setattr(native, "ops", lambda: None)
        torch.testing.assert_close(kernels.attend(*few, "test.attn"), got, atol=2e-6, rtol=1e-5)


def test_native_bf16_attention_only_without_amx():
    """bf16 attention at inference takes the native kernel only on CPUs without AMX tiles."""
    assert torch.float32 in kernels.NATIVE_ATTENTION_DTYPES
    assert (torch.bfloat16 in kernels.NATIVE_ATTENTION_DTYPES) != torch.cpu._is_amx_tile_supported()
    assert kernels._AMX == torch.cpu._is_amx_tile_supported()


@pytest.mark.parametrize("chunk_rows", [2048, 5], ids=["one-chunk", "chunks-of-5"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-emulated"])
def test_mlp_gradients_with_and_without_native_kernels(precision, chunk_rows, monkeypatch):
    """fp32; and bf16 autocast, as on a CPU with bf16 kernels (the MLP computes in bf16 and saves
    the GELU output) and as on one without (it rounds like autocast in fp32), where the PyTorch
    passes run in both cases."""
    counting = _Counting(native_ops())
    if precision.startswith("bf16"):
        monkeypatch.setitem(kernels._CPU_NATIVE, torch.bfloat16, precision == "bf16")
    monkeypatch.setattr(kernels, "CHUNK_ROWS", chunk_rows)
    torch.manual_seed(0)
    m = Mlp(10, 36)
    x = (torch.randn(3, 7, 10) * 3).requires_grad_()
    params = (x, m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias)
    grad = torch.randn(3, 7, 10)

    def grads():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "fp32"):
            out = m(x)
        return torch.autograd.grad(out, params, grad.to(out.dtype))

    monkeypatch.setattr(native, "ops", lambda: counting)
    fused = grads()
    monkeypatch.setattr(native, "ops", lambda: None)
    plain = grads()
    tol = dict(atol=1e-5, rtol=1e-5) if precision == "fp32" else dict(atol=3e-2, rtol=3e-2)
    for name, f, p in zip(["x", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"], fused, plain):
        torch.testing.assert_close(f, p, **tol, msg=name)
    # One call per chunk of tokens in fp32, none in bf16.
    calls = -(-21 // chunk_rows) if precision == "fp32" else 0
    assert counting.calls.get("gelu_backward_", 0) == calls


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("TWINS_NATIVE", "0")
    monkeypatch.setattr(native, "_build", lambda: pytest.fail("built although turned off"))
    assert native.ops() is None


def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(**kwargs):  # what torch.utils.cpp_extension raises (shortened)
        raise RuntimeError("Error building extension 'twins_native_avx512': [1/2] c++ -c "
                           "native.cpp -o native.o\nFAILED: native.o\n/bin/sh: 1: c++: not found"
                           "\nninja: build stopped: subcommand failed.")

    monkeypatch.delenv("TWINS_NATIVE", raising=False)
    monkeypatch.setattr(native, "capability", lambda: "AVX2")  # a build is tried, whatever CPU
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setitem(native._state, "tried", False)
    monkeypatch.setitem(native._state, "ops", None)
    with pytest.warns(RuntimeWarning, match=r"\(RuntimeError: /bin/sh: 1: c\+\+: not found;"):
        assert native.ops() is None
    assert native.ops() is None  # tried once: no second build, no second warning

    m = Mlp(6, 12)  # the MLP trains on the PyTorch path
    x = torch.randn(2, 5, 6, requires_grad=True)
    m(x).sum().backward()
    assert torch.isfinite(x.grad).all() and m.fc1.bias.grad.abs().sum() > 0


def test_a_build_failure_is_told_by_its_first_error_line():
    compile_error = ("Error building extension 'twins_native_avx512': [1/2] c++ -c native.cpp\n"
                     "FAILED: native.o\n"
                     "native.cpp:5:10: fatal error: ATen/Parallel.h: No such file or directory\n"
                     "compilation terminated.\n"
                     "ninja: build stopped: subcommand failed.")
    assert native._reason(compile_error) == (
        "native.cpp:5:10: fatal error: ATen/Parallel.h: No such file or directory")
    assert native._reason("something else\nwent wrong\n") == "went wrong"
    assert native._reason("") == "no message"


AVX2_CHECK = """
import torch
from twins import native
native.capability = lambda: "AVX2"  # the AVX2 variant, also on an AVX-512 CPU
ops = native.ops()
assert native.status() == "built for AVX2", native.status()
torch.manual_seed(0)
pre, grad = torch.randn(131, 67) * 3, torch.randn(131, 67)
act, grad_bias, got = torch.empty_like(pre), torch.zeros(67), grad.clone()
ops.gelu_backward_(pre, got, act, grad_bias)
want = torch.ops.aten.gelu_backward(grad.double(), pre.double())
torch.testing.assert_close(act.double(), torch.nn.functional.gelu(pre.double()), atol=1e-6, rtol=0)
torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=0)
torch.testing.assert_close(grad_bias.double(), want.sum(0), atol=1e-5, rtol=1e-6)
x = torch.randn(100_003) * 100
x[::7] = x[::7].view(torch.int32).bitwise_and(~0xFFFF).bitwise_or(0x8000).view(torch.float32)
rounded = x.clone()
ops.round_(rounded, torch.bfloat16)
assert torch.equal(rounded, x.bfloat16().float())
# Stored scores in tiles of 3, 2 and 1 vectors of 8, head channels past the last whole vector.
for L, keys, D in [(13, 49, 32), (5, 7, 12), (530, 64, 40), (9, 17, 16), (3, 1, 8)]:
    q = (torch.randn(2, L, 3, D) * 2).transpose(1, 2)
    k, v = torch.randn(2, 2, keys, 3, D).transpose(2, 3).unbind(0)
    out = torch.empty(2, L, 3, D).transpose(1, 2)
    ops.attention_(q, k, v, out)
    want = torch.softmax(q.double() @ k.double().transpose(-1, -2) / D ** 0.5, -1) @ v.double()
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=1e-5)
    # bf16 operands (16 per AVX2 vector): the fp32 kernel's output rounded once.
    out16 = torch.empty(2, L, 3, D, dtype=torch.bfloat16).transpose(1, 2)
    ops.attention_(q.bfloat16(), k.bfloat16(), v.bfloat16(), out16)
    ops.attention_(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), out)
    assert torch.equal(out16, out.bfloat16())
q = torch.randn(2, 13, 3, 32).transpose(1, 2)
k, v = torch.randn(2, 2, 49, 3, 32).transpose(2, 3).unbind(0)
out = torch.empty(2, 13, 3, 32).transpose(1, 2)
q[0, 1, 4, 0] = float("nan")
ops.attention_(q, k, v, out)
assert torch.isnan(out[0, 1, 4]).all() and not torch.isnan(out[0, 1, 5]).any()
# LayerNorm rows of 1, 67 and 256 channels (67: a scalar tail past the last whole vector).
for C in (1, 67, 256):
    x, w, b = torch.randn(33, C) * 2 + 5, torch.randn(C), torch.randn(C)
    out = torch.empty_like(x)
    ops.layer_norm_(x, w, b, 1e-6, out)
    want = torch.nn.functional.layer_norm(x.double(), (C,), w.double(), b.double(), 1e-6)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)
print("ok")
"""


def test_the_avx2_build_matches_float64_too():
    """The kernels as built for AVX2 CPUs (8-lane vectors, ATen's AVX2 erf and exp), run on this
    one (AVX2 or AVX-512); in a process of its own, since one process holds one build of the
    operators."""
    native_ops()  # this CPU runs AVX2 code, and the compiler works here
    run = subprocess.run([sys.executable, "-c", AVX2_CHECK], cwd=Path(__file__).parents[1],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
