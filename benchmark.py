"""Throughput, memory and profile of the Twins models, optionally against timm's implementation.

Every configuration (model x batch size x input size x precision x mode) becomes one row: a few
untimed warm-up steps, then `--runs` timed steps; the row reports the median images/s with the
min-max spread, the memory page-faulted in per step (fresh pages: on the CPU, where PyTorch's
allocator does not cache, a large part of the time), the peak memory of a step, and with
`--compare-timm` the same figures for timm's implementation of the same network loaded with the
same weights. By default each implementation of each row is timed in a fresh process of its own
(ours, timm, ours, timm, ... for `--rounds` rounds), so that neither inherits the heap of the
other; `--no-isolate` times both in this process with the runs interleaved.

    python benchmark.py --model alt_gvt_small pcpvt_small_v0 --precision fp32 bf16 \
        --mode inference train --compare-timm --name cpu_small

writes logs/benchmark_cpu_small.json and logs/benchmark_cpu_small.md. Weights are random unless
`--checkpoint` gives a file; `--bf16-agreement N` compares bf16 and fp32 top-1 classes on N
random images, or on N real ones from `--images DIR`. `main.py --throughput` reuses
`time_inference`.
"""
import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import twins
from twins import native
from twins.checkpoint import create_with_weights
from utils import fused_optimizer_kwargs, retain_freed_memory

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ("ours", "timm")


@dataclass
class Timing:
    """Throughput over repeated timed runs, in images per second."""
    median: float
    min: float
    max: float
    seconds: List[float]  # wall time of each timed run
    # MiB of memory page-faulted in during each timed run (CPU: fresh pages the kernels first
    # touch; empty where the platform does not count them)
    faulted_mib: List[float] = field(default_factory=list)

    @property
    def median_faulted_mib(self) -> Optional[float]:
        return statistics.median(self.faulted_mib) if self.faulted_mib else None


@dataclass
class Config:
    """One benchmark row."""
    model: str
    batch_size: int
    img_size: int
    precision: str  # a key of PRECISIONS
    mode: str  # "inference" or "train"
    compile: bool = False
    channels_last: bool = False
    grad_checkpointing: bool = False


# ------------------------------------------------------------------------------------ timing
def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that wall-clock time covers the work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """Autocast context for `amp_dtype` on `device`; disabled (plain fp32) when it is None."""
    return torch.autocast(device_type=device.type, dtype=amp_dtype or torch.bfloat16,
                          enabled=amp_dtype is not None)


def timing_from_seconds(seconds: List[float], batch_size: int,
                        faulted_mib: Sequence[float] = ()) -> Timing:
    """Images/s statistics of runs that each processed `batch_size` images."""
    rates = [batch_size / s for s in seconds]
    return Timing(statistics.median(rates), min(rates), max(rates), list(seconds),
                  list(faulted_mib))


def _minor_faults() -> int:
    """Page faults served without I/O so far in this process: mostly fresh memory touched."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_call(fn: Callable[[], object], device: torch.device) -> Tuple[float, float]:
    """Seconds taken by fn(), synchronised on CUDA before and after, and the MiB of memory
    page-faulted in meanwhile (host memory; 0 where the OS does not count faults). Each fault
    counts one base page: where a fault maps a huge page (THP_MEM_ALLOC_ENABLE=1) the figure
    undercounts the memory, though it still counts the faults."""
    synchronize(device)
    faults = _minor_faults()
    start = time.perf_counter()
    fn()
    synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, (_minor_faults() - faults) * resource.getpagesize() / 2 ** 20


def time_interleaved(steps: Dict[str, Callable[[], object]], batch_size: int,
                     device: torch.device, warmup: int, runs: int) -> Dict[str, Timing]:
    """Time several step functions in turn: all warm up, then run i of each, then run i + 1."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    seconds: Dict[str, List[float]] = {name: [] for name in steps}
    faulted: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(runs):
        for name, step in steps.items():
            s, mib = time_call(step, device)
            seconds[name].append(s)
            faulted[name].append(mib)
    return {name: timing_from_seconds(seconds[name], batch_size, faulted[name]) for name in steps}


def inference_step(model: nn.Module, images: torch.Tensor,
                   amp_dtype: Optional[torch.dtype]) -> Callable[[], torch.Tensor]:
    """A closure running one forward pass of `model` (put in eval mode) without autograd."""
    model.eval()

    def step() -> torch.Tensor:
        with torch.inference_mode(), autocast(images.device, amp_dtype):
            return model(images)
    return step


def train_step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
               amp_dtype: Optional[torch.dtype]) -> Callable[[], torch.Tensor]:
    """A closure running forward, cross-entropy backward and one (fused) AdamW step (train mode).

    fp16 uses a gradient scaler, as fp16 training must; bf16 and fp32 need none.
    """
    model.train()
    # The optimizer main.py trains with: fused where the device has the kernel.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5,
                                  **fused_optimizer_kwargs("adamw", model.parameters()))
    scaler = torch.amp.GradScaler(images.device.type, enabled=amp_dtype == torch.float16)

    def step() -> torch.Tensor:
        with autocast(images.device, amp_dtype):
            loss = F.cross_entropy(model(images), targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def time_inference(model: nn.Module, images: torch.Tensor, *, warmup: int, runs: int,
                   amp_dtype: Optional[torch.dtype] = None) -> Timing:
    """Images/s of `model(images)` under inference_mode: `warmup` untimed then `runs` timed calls.

    Args:
        model: the network, already on the device of `images` (put in eval mode here).
        images: (B, C, H, W) batch.
        amp_dtype: autocast dtype (torch.bfloat16 / torch.float16), or None for full precision.
    """
    step = inference_step(model, images, amp_dtype)
    return time_interleaved({"model": step}, images.shape[0], images.device, warmup, runs)["model"]


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int = 1024,
                runs: int = 10) -> float:
    """GFLOP/s of a (size x size) @ (size x size) matmul in `dtype` on `device`, the median of
    `runs` after one untimed call: how fast this machine multiplies at the moment. The same
    code measures at different speeds on different days (shared hosts, clock speeds), and both
    implementations' steps are mostly matmuls, so a run records this beside its figures."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(device, dtype) for _ in range(2))
    return 2 * size ** 3 / _median_seconds(lambda: torch.mm(a, b), device, runs) / 1e9


def matmul_rates(device: torch.device, precisions: Sequence[str]) -> Dict[str, float]:
    """`matmul_rate` in fp32 and in each low precision asked for, keyed by precision name."""
    names = ["fp32"] + [p for p in dict.fromkeys(precisions) if p != "fp32"]
    return {name: matmul_rate(device, PRECISIONS[name] or torch.float32) for name in names}


def copy_rate(device: torch.device, mib: int = 256, runs: int = 5) -> float:
    """GB/s moved by copying a `mib` MiB fp32 tensor into another (the bytes read plus those
    written), the median of `runs` after one untimed copy: the memory bandwidth at the moment,
    which neighbours on a shared host take a share of without slowing the matmuls as much."""
    src = torch.ones(mib * 2 ** 20 // 4, device=device)
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), device, runs)
    return 2 * src.numel() * src.element_size() / seconds / 1e9


def _median_seconds(fn: Callable[[], object], device: torch.device, runs: int) -> float:
    """Median seconds of `runs` timed calls of fn, after one untimed call."""
    fn()
    return statistics.median(time_call(fn, device)[0] for _ in range(runs))


def machine_speed(device: torch.device, precisions: Sequence[str]) -> Dict[str, object]:
    """`matmul_rates` and `copy_rate`, keyed as the run's environment records them."""
    return {"matmul_gflops": matmul_rates(device, precisions), "copy_gbps": copy_rate(device)}


# ---------------------------------------------------------------------------------- models
def timm_name(model: str) -> str:
    """timm's name for one of our models, or a ValueError for models timm does not have."""
    name = twins.resolve_name(model)
    if name not in twins.TIMM_NAMES:
        raise ValueError(f"--compare-timm: timm has no counterpart of {model!r}; choose one of "
                         f"{', '.join(sorted(twins.TIMM_NAMES))}")
    return twins.TIMM_NAMES[name]


def load_weights(path: str) -> Dict[str, torch.Tensor]:
    """The weights of a checkpoint file (official, DeiT-style, timm, mmsegmentation or ours)
    under the official key names; loading executes no code from the file."""
    from twins.checkpoint import extract_state_dict, torch_load
    return extract_state_dict(torch_load(path), source=path)


def build_models(cfg: Config, impls, device: torch.device, seed: int,
                 checkpoint: Optional[str] = None) -> Dict[str, nn.Module]:
    """Our model with seeded weights, or those of `checkpoint` (its class count taken from
    the checkpoint's classifier), and, if asked, timm's model loaded with the same weights."""
    torch.manual_seed(seed)
    models = {"ours": create_with_weights(cfg.model, checkpoint)}
    if "timm" in impls:
        import timm
        models["timm"] = timm.create_model(timm_name(cfg.model), pretrained=False,
                                           num_classes=models["ours"].num_classes)
        models["timm"].load_state_dict(models["ours"].state_dict())
    for name, model in models.items():
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    return models


def make_inputs(cfg: Config, device: torch.device, seed: int, num_classes: int = 1000):
    """A fixed random (images, targets) batch for `cfg`."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, generator=gen)
    targets = torch.randint(0, max(num_classes, 1), (cfg.batch_size,), generator=gen)
    images = images.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    return images, targets.to(device)


def check_precision(precision: str, device: torch.device) -> None:
    """A ValueError for a precision the device cannot run (fp16 autocast off CUDA)."""
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 is for CUDA devices only; use bf16 on the CPU")


def make_step(model: nn.Module, cfg: Config, images: torch.Tensor, targets: torch.Tensor):
    """The timed step of `cfg` for `model` (compiled first when cfg.compile)."""
    check_precision(cfg.precision, images.device)
    if cfg.compile:
        model = torch.compile(model)
    amp_dtype = PRECISIONS[cfg.precision]
    if cfg.mode == "inference":
        return inference_step(model, images, amp_dtype)
    return train_step(model, images, targets, amp_dtype)


@torch.inference_mode()
def max_logit_difference(a: nn.Module, b: nn.Module, images: torch.Tensor) -> float:
    """max |a(images) - b(images)| in fp32, both in eval mode."""
    a.eval()
    b.eval()
    return (a(images).float() - b(images).float()).abs().max().item()


@torch.inference_mode()
def top1_agreement(model: nn.Module, images: torch.Tensor, amp_dtype: torch.dtype,
                   chunk: int = 32) -> float:
    """Share of images whose top-1 class under `amp_dtype` autocast equals the fp32 one."""
    model.eval()
    same = 0
    for batch in images.split(chunk):
        with autocast(batch.device, amp_dtype):
            low = model(batch).argmax(1)
        same += (low == model(batch).argmax(1)).sum().item()
    return same / images.shape[0]


def image_files(folder: str) -> List[Path]:
    """The image files under `folder` (any depth), sorted; an error naming the folder if none."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {folder}: no such folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise ValueError(f"--images {folder}: no image files ({', '.join(IMG_EXTENSIONS)}) in it")
    return files


def load_images(folder: str, count: int, img_size: int) -> torch.Tensor:
    """`count` images spread evenly over the sorted files under `folder` (all of them if there
    are fewer), with the evaluation transform of main.py --eval: (n, 3, img_size, img_size)."""
    from datasets import build_transform, load_rgb
    files = image_files(folder)
    if len(files) > count:
        files = [files[i * len(files) // count] for i in range(count)]
    transform = build_transform(False, argparse.Namespace(input_size=img_size))
    return torch.stack([transform(load_rgb(path)) for path in files])


# ---------------------------------------------------------------------------------- memory
def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _exit_with_parent(parent: int) -> None:
    """Initializer of the benchmark's worker processes: end the worker as soon as its parent
    is gone, so that stopping a run (Ctrl-C, kill, a crash) stops its timing workers too
    instead of leaving them running, and skewing whatever is timed next, for minutes. A
    daemon thread checks twice a second (no work on the timed path)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def worker_pool(workers: int = 1) -> concurrent.futures.ProcessPoolExecutor:
    """A pool of fresh (spawned) processes that end with this one (`_exit_with_parent`)."""
    return concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_exit_with_parent, initargs=(os.getpid(),))


def _cpu_peak_memory_worker(cfg: Config, impl: str, seed: int, warmup: int,
                            threads: int) -> Dict[str, int]:
    """In a fresh process: RSS before the first step and max RSS after warmup + 1 steps."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    model = build_models(cfg, ("ours", impl), device, seed)[impl]
    images, targets = make_inputs(cfg, device, seed)
    step = make_step(model, cfg, images, targets)
    before = _current_rss_bytes()
    for _ in range(warmup + 1):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"rss_before_step": before, "peak": peak}


def peak_memory(cfg: Config, impl: str, step: Callable, device: torch.device, seed: int,
                warmup: int = 1) -> Dict[str, int]:
    """Peak memory of one step of `impl` in bytes.

    CUDA: torch.cuda.max_memory_allocated over one step, in this process. CPU: the max resident
    set size never goes down within a process, so each measurement runs in a fresh subprocess
    (model build, `warmup` steps, one more step); "peak" is that process's max RSS, and
    "rss_before_step" its RSS once the model and batch exist, so peak - rss_before_step is
    what the step itself (activations, gradients, optimizer state) added.
    """
    if device.type == "cuda":
        step()
        synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return {"rss_before_step": before, "peak": torch.cuda.max_memory_allocated(device)}
    with worker_pool() as pool:
        return pool.submit(_cpu_peak_memory_worker, cfg, impl, seed, warmup,
                           torch.get_num_threads()).result()


# --------------------------------------------------------------------------------- profile
KERNEL_CATEGORIES = {
    "matmul": ("addmm", "aten::mm", "bmm", "baddbmm", "linear_pointwise", "aten::matmul",
               "aten::linear", "gemm"),
    "conv": ("conv",),
    "attention": ("scaled_dot_product", "flash_attention", "efficient_attention", "attention"),
}


def kernel_category(op_name: str) -> str:
    """'matmul', 'conv', 'attention' or 'other' for a profiler op name. Our `twins::` custom
    ops are composites: their self time is what the profiler attributes to no operator inside
    them (the Python around the kernels they call, and more), so 'other'."""
    if op_name.startswith("twins::"):
        return "other"
    lowered = op_name.lower()
    for category, keys in KERNEL_CATEGORIES.items():
        if any(key in lowered for key in keys):
            return category
    return "other"


def kernel_shares(events, device: torch.device) -> Dict[str, float]:
    """Share of self time per kernel category, from profiler `key_averages()`."""
    totals = dict.fromkeys(list(KERNEL_CATEGORIES) + ["other"], 0.0)
    for event in events:
        self_time = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        totals[kernel_category(event.key)] += self_time
    whole = sum(totals.values())
    if whole <= 0:
        raise ValueError("the profile recorded no operator time: nothing to take shares of")
    shares = {category: t / whole for category, t in totals.items()}
    shares["kernels"] = 1.0 - shares["other"]
    return shares


# How many steps `profile_step` profiles in a row. The profiler keeps a record of every
# operator on the heap while a step runs; where those records land between the step's freed
# tensors, glibc grows its heap around them and the step page-faults the difference in, which
# slows the memory-bound operators most. Profiled SVT-S fp32 training steps at batch 32 faulted
# in 0-380 MiB and ran from as fast as unprofiled steps (which fault nothing) to 23% slower,
# differently from step to step; our inference steps were not affected (docs/throughput.md,
# "The profiled step"). Of several, the one nearest the timed median describes the timed steps.
PROFILED_STEPS = 4


def profile_step(step: Callable, device: torch.device, label: str,
                 typical_seconds: Optional[float] = None, rows: int = 15,
                 steps: int = PROFILED_STEPS) -> Tuple[Dict[str, float], Dict]:
    """Profile `steps` steps in a row and report the one whose time is nearest
    `typical_seconds` (the median of the timed steps; without it, the last): print its top ops
    by self time and return its kernel-time shares and {"seconds", "faulted_mib"} of it, with
    every profiled step's seconds and MiB faulted in "all_seconds" and "all_faulted_mib"."""
    if steps < 1:
        raise ValueError(f"profile_step needs at least one step to profile, got steps={steps}")
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    times: List[Tuple[float, float]] = []
    events, chosen = None, None
    for i in range(steps):
        with profile(activities=activities) as prof:
            times.append(time_call(step, device))
        nearer = (chosen is None or typical_seconds is None
                  or abs(times[i][0] - typical_seconds) < abs(times[chosen][0] - typical_seconds))
        if nearer:  # only the chosen step's events are kept: the others' are freed at once
            events, chosen = prof.key_averages(), i
        del prof
    seconds, faulted_mib = times[chosen]
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n--- profile: {label}")
    print(events.table(sort_by=sort_by, row_limit=rows, max_name_column_width=50))
    shares = kernel_shares(events, device)
    print("time share: " + ", ".join(f"{k} {v:.1%}" for k, v in shares.items()))
    typical = f", the timed median {typical_seconds * 1e3:.0f} ms" if typical_seconds else ""
    print(f"profiled step {chosen + 1} of {steps}: {seconds * 1e3:.0f} ms, {faulted_mib:.0f} MiB "
          f"faulted (all: {', '.join(f'{s * 1e3:.0f} ms / {m:.0f} MiB' for s, m in times)}{typical})")
    return shares, {"seconds": seconds, "faulted_mib": faulted_mib,
                    "all_seconds": [s for s, _ in times], "all_faulted_mib": [m for _, m in times]}


# ------------------------------------------------------------------------------------ rows
def run_config(cfg: Config, args: argparse.Namespace, device: torch.device,
               timed: Optional[Sequence[str]] = None, compare: bool = True) -> Dict:
    """Time (and optionally compare, profile, measure memory of) one configuration.

    timed: the implementations timed here (default: all of the row, interleaved); compare:
    whether to compute the logit difference and bf16 agreement here (needs every
    implementation of the row built in this process).
    """
    impls = IMPLS if args.compare_timm else ("ours",)
    timed = tuple(impls if timed is None else timed)
    models = build_models(cfg, impls if compare else timed, device, args.seed, args.checkpoint)
    num_classes = next(iter(models.values())).num_classes
    images, targets = make_inputs(cfg, device, args.seed, num_classes)
    row: Dict = {"config": asdict(cfg), "timed": list(timed)}
    row.update({impl: {} for impl in impls})
    if compare and args.compare_timm:
        row["max_logit_diff"] = max_logit_difference(models["ours"], models["timm"], images)
    amp_dtype = PRECISIONS[cfg.precision]
    if compare and args.bf16_agreement and amp_dtype is not None:
        if args.images:
            batch = load_images(args.images, args.bf16_agreement, cfg.img_size)
        else:
            gen = torch.Generator().manual_seed(args.seed + 1)
            batch = torch.randn(args.bf16_agreement, 3, cfg.img_size, cfg.img_size, generator=gen)
        row["agreement_images"] = batch.shape[0]
        for impl in impls:  # timm's figure tells how much of a shortfall random weights cause
            row[impl]["top1_agreement"] = top1_agreement(models[impl], batch.to(device), amp_dtype)
    models = {impl: models[impl] for impl in timed}  # the others are not kept while timing
    steps = {impl: make_step(models[impl], cfg, images, targets) for impl in timed}
    timings = time_interleaved(steps, cfg.batch_size, device, args.warmup, args.runs)
    for impl in timed:
        row[impl]["timing"] = asdict(timings[impl])
        if args.profile:
            row[impl]["kernel_share"], row[impl]["profiled_step"] = profile_step(
                steps[impl], device, f"{impl} {cfg}", statistics.median(timings[impl].seconds))
        if args.memory:
            row[impl]["memory"] = peak_memory(cfg, impl, steps[impl], device, args.seed)
    if set(timed) == set(impls):
        finish_row(row)
    return row


def finish_row(row: Dict) -> None:
    """Add the ratio of a row whose implementations are all timed, and print it."""
    if "timm" in row:
        row["ratio"] = ratio(Timing(**row["ours"]["timing"]), Timing(**row["timm"]["timing"]))
    print(format_row(row), flush=True)


def _run_config_here(cfg: Config, args: argparse.Namespace, timed: Sequence[str],
                     compare: bool) -> Dict:
    """`run_config` in a fresh process, set up as the parent was."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.retain_memory:
        retain_freed_memory()
    return run_config(cfg, args, torch.device(args.device), timed, compare)


def run_config_isolated(cfg: Config, args: argparse.Namespace) -> Dict:
    """`run_config` with each implementation timed in a fresh process of its own, ours and
    timm's processes alternating for `--rounds` rounds; the comparisons run in the first.

    On the CPU how fast a step runs depends on the state of glibc's heap: which activations
    come from pages already mapped and which are page-faulted in afresh (PyTorch's CPU
    allocator does not cache). In one process, a model's figures therefore depend on what ran
    before it, the other implementation included: timm's bf16 training step measured anywhere
    from 12.8 to 17.5 img/s interleaved with ours. Alone in a process, as in real use, each
    runs with a heap of its own making.
    """
    impls = IMPLS if args.compare_timm else ("ours",)
    parts: List[Dict] = []
    for round_ in range(args.rounds):
        for impl in impls:
            part_args = argparse.Namespace(**vars(args))
            part_args.profile = args.profile and round_ == 0
            part_args.memory = args.memory and round_ == 0
            compare = round_ == 0 and impl == impls[0]
            with worker_pool() as pool:
                parts.append(pool.submit(_run_config_here, cfg, part_args, (impl,), compare).result())
    row = {key: value for key, value in parts[0].items() if key not in impls}
    row["timed"] = list(impls)
    for impl in impls:
        row[impl] = {}
        for part in parts:  # figures measured once come from the part that measured them
            for key, value in part[impl].items():
                row[impl].setdefault(key, value)
        timings = [part[impl]["timing"] for part in parts if impl in part["timed"]]
        row[impl]["timing"] = asdict(timing_from_seconds(
            [s for t in timings for s in t["seconds"]], cfg.batch_size,
            [m for t in timings for m in t["faulted_mib"]]))
    finish_row(row)
    return row


def ratio(ours: Timing, reference: Timing) -> Dict[str, float]:
    """ours / reference throughput: of the medians, and the median of the per-run ratios.

    Run i of both ran close in time (interleaved, or in alternating processes), so they saw
    about the same machine load; the per-run ratios are the steadier figure when the load
    changes during a benchmark.
    """
    paired = [r / o for o, r in zip(ours.seconds, reference.seconds)]  # rate ratio = time ratio^-1
    return {"of_medians": ours.median / reference.median, "paired_median": statistics.median(paired)}


def _mib(n_bytes: Optional[int]) -> str:
    return "-" if n_bytes is None else f"{n_bytes / 2 ** 20:,.0f}"


def _rate(timing: Dict) -> str:
    return f"{timing['median']:.1f} ({timing['min']:.1f}-{timing['max']:.1f})"


def _faulted(timing: Dict) -> str:
    """Median MiB page-faulted in per timed step, or '-' where not counted."""
    mib = Timing(**timing).median_faulted_mib
    return "-" if mib is None else f"{mib:,.0f}"


def format_row(row: Dict) -> str:
    """One human-readable line per row for the console."""
    c = row["config"]
    text = (f"{c['model']} b{c['batch_size']} {c['img_size']}px {c['precision']} {c['mode']}"
            f"{' compiled' if c['compile'] else ''}{' channels-last' if c['channels_last'] else ''}"
            f"{' grad-ckpt' if c['grad_checkpointing'] else ''}: ours {_rate(row['ours']['timing'])} img/s"
            f" ({_faulted(row['ours']['timing'])} MiB faulted/step)")
    if "timm" in row:
        text += (f", timm {_rate(row['timm']['timing'])} img/s"
                 f" ({_faulted(row['timm']['timing'])} MiB faulted/step), ours/timm "
                 f"{row['ratio']['of_medians']:.2f}x, max|dlogit| {row['max_logit_diff']:.2e}")
    return text


MD_COLUMNS = ("model", "batch", "img", "precision", "mode", "compile", "ch-last", "grad-ckpt",
              "ours img/s (min-max)", "timm img/s (min-max)", "ours/timm", "max abs logit diff",
              "kernel share ours / timm", "faulted MiB/step ours / timm", "peak MiB ours / timm",
              "top-1 = fp32 ours / timm")


def markdown_table(rows: List[Dict]) -> str:
    """The rows as a markdown table (absent figures shown as '-')."""
    def pair(key, fmt):
        return " / ".join(fmt(row[i][key]) if i in row and key in row[i] else "-" for i in IMPLS)

    lines = ["| " + " | ".join(MD_COLUMNS) + " |", "|" + "---|" * len(MD_COLUMNS)]
    for row in rows:
        c = row["config"]
        cells = [c["model"], c["batch_size"], c["img_size"], c["precision"], c["mode"],
                 "yes" if c["compile"] else "no", "yes" if c["channels_last"] else "no",
                 "yes" if c["grad_checkpointing"] else "no", _rate(row["ours"]["timing"]),
                 _rate(row["timm"]["timing"]) if "timm" in row else "-",
                 f"{row['ratio']['of_medians']:.2f}x" if "ratio" in row else "-",
                 f"{row['max_logit_diff']:.1e}" if "max_logit_diff" in row else "-"]
        cells.append(pair("kernel_share", lambda s: f"{s['kernels']:.0%}"))
        cells.append(pair("timing", _faulted))
        cells.append(pair("memory", lambda m: _mib(m["peak"])))
        cells.append(pair("top1_agreement", lambda a: f"{a:.1%}"))
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- output
def source_revision(root: Optional[Path] = None, ignore: Optional[Path] = None) -> Optional[str]:
    """The git commit of the code being measured (the checkout holding `root`, by default this
    file's), marked "+changes" when tracked files differ from it, except the benchmark's own
    outputs (`benchmark_*` in the folder `ignore`); None outside a git checkout or without git."""
    root = (Path(__file__).parent if root is None else Path(root)).resolve()

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, check=True,
                              capture_output=True, text=True, timeout=30).stdout.strip()
    status = ["status", "--porcelain", "--untracked-files=no"]
    ignore = None if ignore is None else Path(ignore).resolve()
    if ignore is not None and ignore.is_relative_to(root):
        status += ["--", ".", ":(exclude)" + (ignore.relative_to(root) / "benchmark_*").as_posix()]
    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        changed = git(*status)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+changes" if changed else "")


# Environment variables that change how fast the same code runs: the allocator (PyTorch's
# transparent-huge-page switch, glibc's malloc tunables, a preloaded jemalloc/tcmalloc) and the
# thread pools, the native kernels (TWINS_NATIVE=0 turns them off). Recorded with the figures
# when set.
PERFORMANCE_ENV = ("THP_MEM_ALLOC_ENABLE", "LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES",
                   "MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                   "MALLOC_TOP_PAD_", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "KMP_AFFINITY",
                   "KMP_BLOCKTIME", "OMP_PROC_BIND", "GOMP_CPU_AFFINITY", "ONEDNN_MAX_CPU_ISA",
                   "TWINS_NATIVE")


def performance_env() -> Dict[str, str]:
    """The `PERFORMANCE_ENV` variables set in this process, by name."""
    return {name: os.environ[name] for name in PERFORMANCE_ENV if name in os.environ}


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) ..."), which Python's `platform`
    does not give on Linux; the architecture where the system does not say."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, output_dir: Optional[Path] = None) -> Dict:
    """What the figures depend on: code revision (outputs in `output_dir` aside), versions,
    device, threads, allocator and thread settings from the environment, machine load."""
    info = {"commit": source_revision(ignore=output_dir), "torch": torch.__version__,
            "python": platform.python_version(),
            "device": str(device), "threads": torch.get_num_threads(),
            "cpu": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_kernels": native.status() if device.type == "cpu" else None,
            "env": performance_env()}
    try:
        import timm
        info["timm"] = timm.__version__
    except ImportError:
        info["timm"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        with open("/proc/loadavg") as f:
            info["load_average_at_start"] = f.read().split()[:3]
    except OSError:
        pass
    return info


def _start_end(start: float, end: Optional[float], fmt: str) -> str:
    """'start / end' in format `fmt`, '-' for an end not measured yet."""
    return f"{start:{fmt}} / " + ("-" if end is None else f"{end:{fmt}}")


def write_results(rows: List[Dict], args: argparse.Namespace, env: Dict, command: str) -> Path:
    """Write logs/benchmark_<name>.json and .md; return the JSON path."""
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"benchmark_{args.name}"
    settings = {k: v for k, v in vars(args).items()}
    result = {"command": command, "settings": settings, "environment": env, "rows": rows}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    header = f"Command: `{command}`"
    if env.get("cpu"):  # which machine: figures of different CPUs differ
        header += f" on {env['cpu']} ({env.get('cpu_capability')})"
    if env["commit"]:
        header += f" at commit {env['commit']}"
    if env["env"]:
        header += ", with " + " ".join(f"{k}={v}" for k, v in env["env"].items())
    rates, copies = env.get("matmul_gflops"), env.get("copy_gbps")
    if rates:  # how fast the machine multiplied, at the start of the run and at its end
        header += "; matmul GFLOP/s (start / end): " + ", ".join(
            f"{name} {_start_end(rate, rates.get('end', {}).get(name), ',.0f')}"
            for name, rate in rates["start"].items())
    if copies:  # and how fast it copied memory
        header += f"; copy GB/s {_start_end(copies['start'], copies.get('end'), ',.1f')}"
    stem.with_suffix(".md").write_text(header + "\n\n" + markdown_table(rows))
    return stem.with_suffix(".json")


def configs_from_args(args: argparse.Namespace) -> List[Config]:
    """The cross product of the requested models, sizes, precisions and modes."""
    return [Config(model, batch, size, precision, mode, args.compile, args.channels_last,
                   args.grad_checkpointing)
            for model in args.model for batch in args.batch_size for size in args.img_size
            for precision in args.precision for mode in args.mode]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    what = parser.add_argument_group("what to run")
    what.add_argument("--model", nargs="+", default=["alt_gvt_small"],
                      choices=twins.list_models(include_aliases=True))
    what.add_argument("--batch-size", nargs="+", type=int, default=[32])
    what.add_argument("--img-size", nargs="+", type=int, default=[224])
    what.add_argument("--precision", nargs="+", choices=list(PRECISIONS), default=["fp32"],
                      help="fp32, or bf16/fp16 autocast (fp16 on CUDA only)")
    what.add_argument("--mode", nargs="+", choices=["inference", "train"], default=["inference"],
                      help="train = forward + cross-entropy backward + AdamW step")
    what.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                      help="torch.compile the model(s) (compilation happens in the warm-up)")
    what.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False)
    what.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    what.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    what.add_argument("--checkpoint", default=None, metavar="PATH",
                      help="weights for the model(s) (official, timm, mmsegmentation or ours; "
                           "the class count follows the checkpoint), instead of random ones")
    how = parser.add_argument_group("how to measure")
    how.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    how.add_argument("--runs", type=int, default=5, help="timed steps; the median is reported")
    how.add_argument("--compare-timm", action=argparse.BooleanOptionalAction, default=False,
                     help="also run timm's twins_* with the same weights")
    how.add_argument("--profile", action=argparse.BooleanOptionalAction, default=False,
                     help="profile one step and report the time share of matmul/conv/attention")
    how.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                     help="peak memory of a step (CPU: max RSS of a fresh subprocess per row)")
    how.add_argument("--bf16-agreement", type=int, default=0, metavar="N",
                     help="for autocast rows: share of N fixed images whose top-1 class equals "
                          "the fp32 one (ours, and timm's with --compare-timm)")
    how.add_argument("--images", default=None, metavar="DIR",
                     help="take the --bf16-agreement images from the image files under DIR "
                          "(evaluation transform; evenly spread over the sorted files) instead "
                          "of random ones")
    how.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    how.add_argument("--retain-memory", action=argparse.BooleanOptionalAction, default=False,
                     help="CPU: make glibc keep freed memory for reuse (as jemalloc/tcmalloc would) "
                          "instead of page-faulting fresh activations every step; applies to "
                          "every model in the process")
    how.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                     help="time each implementation of each row in a fresh process of its own "
                          "(else all in this process, interleaved)")
    how.add_argument("--rounds", type=int, default=1,
                     help="with --isolate: alternate ours/timm processes this many times, each "
                          "timing --runs steps")
    how.add_argument("--seed", type=int, default=0)
    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", default="logs")
    out.add_argument("--name", default="latest", help="writes <output-dir>/benchmark_<name>.json/.md")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    args = parse_args(argv)
    command = "python benchmark.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.retain_memory and not retain_freed_memory():
        raise SystemExit("--retain-memory needs glibc's mallopt, which this platform lacks")
    device = torch.device(args.device)
    configs = configs_from_args(args)
    try:  # fail before any timing on a bad precision, checkpoint or image folder
        for precision in args.precision:
            check_precision(precision, device)
        if args.checkpoint:
            load_weights(args.checkpoint)
        if args.images:
            image_files(args.images)
    except (OSError, ValueError) as error:
        raise SystemExit(f"benchmark.py: error: {error}") from None
    if args.compare_timm:
        for cfg in configs:  # fail before any timing when a model has no timm counterpart
            try:
                timm_name(cfg.model)
            except ValueError as error:
                raise SystemExit(f"benchmark.py: error: {error}") from None
    env = environment(device, Path(args.output_dir))  # the code as launched
    for key, value in machine_speed(device, args.precision).items():
        env[key] = {"start": value}
    rows: List[Dict] = []
    for cfg in configs:  # results are rewritten after every row: long runs keep what they have
        rows.append(run_config_isolated(cfg, args) if args.isolate else run_config(cfg, args, device))
        path = write_results(rows, args, env, command)
    for key, value in machine_speed(device, args.precision).items():
        env[key]["end"] = value
    path = write_results(rows, args, env, command)
    print("\n" + markdown_table(rows) + f"\nwrote {path} and {path.with_suffix('.md')}")
    return rows


if __name__ == "__main__":
    main()
