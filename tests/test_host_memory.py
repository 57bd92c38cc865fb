"""glibc's treatment of freed host memory: kept for reuse (`retain_freed_memory`) or returned
(`release_freed_memory`, called by gradient checkpointing). Each behaviour is a process-wide
setting, so the measurements run in fresh interpreters."""
import subprocess
import sys
from pathlib import Path

import torch

import twins
from twins import host_memory

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
