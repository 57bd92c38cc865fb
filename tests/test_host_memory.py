"""glibc's treatment of freed host memory: kept for reuse (`retain_freed_memory`) or returned
(`release_freed_memory`, called by gradient checkpointing). Each behaviour is a process-wide
setting, so the measurements run in fresh interpreters."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import twins
from twins import host_memory, kernels

ROOT = Path(__file__).resolve().parents[1]


def run_fresh(code: str) -> list:
    out = subprocess.run([sys.executable, "-c", code], check=True, text=True, capture_output=True, cwd=ROOT)
    return [int(v) for v in out.stdout.split()]


FAULTS_SNIPPET = """
import resource, torch
from twins import host_memory
def faults_of_fresh_64mb():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 * 2 ** 20).fill_(1.0)  # 64 MiB, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_fresh_64mb()  # the first time always maps new pages
print(min(faults_of_fresh_64mb() for _ in range(3)))
assert host_memory.retain_freed_memory()
faults_of_fresh_64mb()  # the block freed last was unmapped: mapped once more, then kept
print(min(faults_of_fresh_64mb() for _ in range(3)))
print(int(host_memory.release_freed_memory()))  # retained memory stays retained
"""


def test_retain_freed_memory_stops_page_faults_on_reuse():
    """With glibc defaults a freed 64 MiB block is unmapped and faulted in again on the next
    allocation (16,384 pages of 4 KiB); after retain_freed_memory() it is reused as is, and
    release_freed_memory() no longer gives memory back. One process, before and after the
    call (which cannot be undone)."""
    default, retain, released = run_fresh(FAULTS_SNIPPET)
    assert default > 8000
    assert retain < 1000
    assert released == 0


RELEASE_SNIPPET = """
import resource, torch
from twins import host_memory
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() // 2 ** 20
# 256 MiB in 1 MiB tensors, from glibc's heap (its mmap threshold fixed above their size here,
# rather than left to rise as freed blocks decide), then every other one freed: the holes stay
# resident, since a block still in use lies above each.
M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
assert host_memory._glibc().mallopt(M_MMAP_THRESHOLD, 4 * 2 ** 20)
blocks = [torch.ones(2 ** 18) for _ in range(256)]
del blocks[::2]
before = rss_mib()
released = host_memory.release_freed_memory()
print(before, rss_mib(), int(released), int(blocks[-1].sum()))
"""


def test_release_freed_memory_returns_the_heap_holes():
    """128 MiB freed between blocks still in use stay resident until release_freed_memory()."""
    before, after, released, total = run_fresh(RELEASE_SNIPPET)
    assert total == 2 ** 18  # the blocks in use keep their values
    assert released == 1
    assert before - after > 100  # MiB, of the 128 freed


def test_checkpointing_releases_freed_memory_before_each_stage_last_recomputation(monkeypatch):
    """On the CPU, a checkpointed step releases the heap once per stage, in backward, right
    before the stage's first block is recomputed (the last of its blocks to be); its forward
    releases nothing, and the gradients are those of the step without checkpointing."""
    torch.manual_seed(0)
    model = twins.create_model("alt_gvt_micro", num_classes=5)
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    events = []
    monkeypatch.setattr(host_memory, "release_freed_memory", lambda: events.append("release"))
    for stage in model.blocks:
        for j, blk in enumerate(stage):
            blk.register_forward_pre_hook(lambda m, args, j=j, d=len(stage): events.append((d, j)))
    model.set_grad_checkpointing(True)
    loss = model(x).sum()
    assert "release" not in events
    events.clear()
    loss.backward()
    # Recomputation runs the stages and their blocks in reverse; each stage's block 0 last.
    expected = []
    for stage in reversed(model.blocks):
        expected += [(len(stage), j) for j in reversed(range(1, len(stage)))] + ["release", (len(stage), 0)]
    assert events == expected
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], atol=1e-6, rtol=1e-5, msg=n)


def test_no_release_without_checkpointing_or_under_no_grad(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "release_freed_memory", lambda: calls.append(1))
    model = twins.create_model("alt_gvt_micro", num_classes=5)
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    model.set_grad_checkpointing(True)
    with torch.no_grad():
        model(x)
    assert calls == []


HOLD_SNIPPET = """
import ctypes, resource, sys
from twins import host_memory
libc = host_memory._glibc()
M_MMAP_THRESHOLD = -3  # from glibc's malloc.h; fixed, so that 1 MiB blocks come from the heap
assert libc.mallopt(M_MMAP_THRESHOLD, 4 * 2 ** 20)
hold = sys.argv[1] == "hold"
placed, blocks = [], [0] * 256  # allocated before the blocks, below them in the heap
def faulted_pages_of_a_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(256):  # 256 MiB of activations, say, straight from malloc and written
        blocks[i] = libc.malloc(2 ** 20)
        ctypes.memset(blocks[i], 1, 2 ** 20)
    if hold:
        placed.append(host_memory.hold_heap_top())
    for p in blocks:  # all free: the heap's top goes back to the OS unless something holds it
        libc.free(p)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faulted_pages_of_a_step()  # the first step maps the heap
print(min(faulted_pages_of_a_step() for _ in range(3)), *map(int, placed), len(host_memory._held))
"""


def test_holding_the_heap_top_keeps_the_pages_of_the_last_step():
    """Without a block held at its top, glibc gives a freed heap back and the next step faults
    its 256 MiB in again (65,536 pages); with one, the next step reuses the pages. The block is
    placed in the first step and may rise once more as the heap settles; later steps find it
    at the top and place nothing. One block is held."""
    default = run_fresh(HOLD_SNIPPET.replace("sys.argv[1]", "'default'"))
    held = run_fresh(HOLD_SNIPPET.replace("sys.argv[1]", "'hold'"))
    assert default[0] > 60000 and default[1:] == [0]
    assert held[0] < 1000
    placed, count = held[1:-1], held[-1]
    assert placed[0] == 1 and placed[-2:] == [0, 0]
    assert count == 1


@pytest.mark.parametrize("onednn", [False, True], ids=["sgemm", "onednn"])
def test_heap_top_is_held_by_pooled_steps_only(onednn, monkeypatch):
    """Training steps hold the heap's top from the MLP backward, and after each fresh output of
    oneDNN's fp32 matmuls (`kernels.ONEDNN_MATMULS`), which at inference are the only holds;
    steps whose blocks are checkpointed (which give memory back instead) hold nothing."""
    monkeypatch.setattr(kernels, "ONEDNN_MATMULS", onednn)
    calls = []
    monkeypatch.setattr(host_memory, "hold_heap_top", lambda: calls.append(1))
    model = twins.create_model("alt_gvt_micro", num_classes=5)
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    blocks = sum(len(stage) for stage in model.blocks)
    if onednn:  # per block: fc2 forward, the GELU output's and the input's gradients, and more
        assert len(calls) > 3 * blocks
    else:
        assert len(calls) == blocks  # once per block's MLP
    calls.clear()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    assert calls == []
    with torch.no_grad():
        model.eval()(x)
    assert len(calls) == (2 * blocks if onednn else 0)  # fc1 and fc2 of each block's MLP


def test_no_heap_hold_while_retaining():
    """Where glibc keeps all freed memory already, nothing is held."""
    code = ("from twins import host_memory\n"
            "assert host_memory.retain_freed_memory()\n"
            "import torch; blocks = [torch.ones(2 ** 18) for _ in range(64)]\n"
            "print(int(host_memory.hold_heap_top()), len(host_memory._held))")
    assert run_fresh(code) == [0, 0]
