"""The native CPU kernels (twins/native.cpp) against float64 references, their use by the MLP's
backward, and the PyTorch fallback when they cannot be built or are turned off."""
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


class _Counting:
    """The native operators, counting the calls of the fused GELU backward."""

    def __init__(self, ops):
        self.ops, self.calls = ops, 0

    def gelu_backward_(self, *args):
        self.calls += 1
        return self.ops.gelu_backward_(*args)


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
    assert counting.calls == (-(-21 // chunk_rows) if precision == "fp32" else 0)


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
