"""Distributed setup, metric logging, seeding, RNG state capture, rank-0 checkpoint saving and
the optimizer implementation."""
import datetime
import os
import random
import resource
import time
from collections import defaultdict, deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from twins.checkpoint import save_atomic
from twins.host_memory import retain_freed_memory  # noqa: F401 (main.py and benchmark.py call utils')


# ----------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job; a single process is rank 0 of world size 1."""
    distributed: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def init_distributed_mode(device_type, local_rank_arg=None, dist_url='env://'):
    """Join the process group when launched by torchrun or `torch.distributed.launch`.

    Both launchers export RANK and WORLD_SIZE; torchrun and `launch --use_env` also export
    LOCAL_RANK, while the old `launch` without --use_env passes `--local_rank` on the command
    line (local_rank_arg). NCCL is used for CUDA devices and gloo for the CPU.
    """
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return DistEnv()
    rank, world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    local_rank = int(os.environ.get('LOCAL_RANK', local_rank_arg if local_rank_arg is not None else 0))
    if device_type == 'cuda':
        torch.cuda.set_device(local_rank)
    backend = 'nccl' if device_type == 'cuda' else 'gloo'
    dist.init_process_group(backend=backend, init_method=dist_url, world_size=world_size, rank=rank)
    dist.barrier()
    return DistEnv(True, rank, world_size, local_rank)


def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def all_reduce_sum(values, device):
    """Sum a list of floats over all ranks (unchanged in a single process); returns floats."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if is_dist_avail_and_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def save_on_master(obj, path):
    """Write a checkpoint atomically from rank 0 only, so a crash never leaves half a file."""
    if is_main_process():
        save_atomic(obj, path)


def print_on_master(*args, **kwargs):
    if is_main_process():
        print(*args, **kwargs, flush=True)


# ----------------------------------------------------------------------------- seeds and RNG
def seed_everything(seed):
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def capture_rng_state():
    """Every global generator training draws from: shuffling, augmentation, mixup, drop path.

    Stored with plain types and tensors only, so checkpoints load with weights_only=True.
    """
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        'torch': torch.get_rng_state(),
        'numpy': {'name': np_name, 'keys': torch.from_numpy(np_keys.astype(np.int64)),
                  'pos': int(np_pos), 'has_gauss': int(np_has_gauss), 'cached_gaussian': float(np_gauss)},
        'python': [py_version, list(py_internal), py_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def gather_rng_states():
    """capture_rng_state of every rank, as a list indexed by rank (collective in distributed runs)."""
    state = capture_rng_state()
    if not is_dist_avail_and_initialized():
        return [state]
    states = [None] * get_world_size()
    dist.all_gather_object(states, state)
    return states


def restore_rng_state(state):
    """Inverse of capture_rng_state."""
    torch.set_rng_state(state['torch'])
    numpy_state = state['numpy']
    np.random.set_state((numpy_state['name'], numpy_state['keys'].numpy().astype(np.uint32),
                         numpy_state['pos'], numpy_state['has_gauss'], numpy_state['cached_gaussian']))
    py_version, py_internal, py_gauss = state['python']
    random.setstate((py_version, tuple(py_internal), py_gauss))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# ----------------------------------------------------------------------------- metric logging
class SmoothedValue:
    """A series of values: the median/average over a recent window and the global average."""

    def __init__(self, window_size=20, fmt='{median:.4f} ({global_avg:.4f})'):
        self.window = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value, n=1):
        self.window.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self, device):
        """Sum count and total over ranks so global_avg is the job-wide mean (window stays local)."""
        count, self.total = all_reduce_sum([self.count, self.total], device)
        self.count = int(count)

    @property
    def median(self):
        return float(np.median(self.window)) if self.window else 0.0

    @property
    def avg(self):
        return float(np.mean(self.window)) if self.window else 0.0

    @property
    def global_avg(self):
        return self.total / max(self.count, 1)

    @property
    def value(self):
        return self.window[-1] if self.window else 0.0

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, value=self.value)


# timm optimizer names served by torch.optim.Adam / AdamW, which have a fused implementation.
FUSED_OPTIMIZERS = ('adam', 'adamw')


def fused_optimizer_kwargs(opt_name, params):
    """{'fused': True} where PyTorch's fused Adam/AdamW can run `opt_name` on `params`, else {}.

    The fused kernel updates every parameter in one vectorised pass instead of a handful of
    elementwise ops per parameter: an AdamW step over Twins-SVT-S's 24M parameters takes
    15 ms instead of 56 ms on the 2-core CPU (`tools/optimizer_step.py`); PyTorch documents
    it as its fastest implementation on CUDA too. It needs floating-point parameters on a
    device PyTorch has the kernel for (CPU, CUDA, XPU, MPS, ...); anything else keeps the
    default implementation.
    """
    if opt_name.lower() not in FUSED_OPTIMIZERS:
        return {}
    try:  # private in torch.optim; without it, the default implementation
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
    except ImportError:
        return {}
    devices = set(_get_fused_kernels_supported_devices())
    params = list(params)
    if params and all(p.is_floating_point() and p.device.type in devices for p in params):
        return {'fused': True}
    return {}


def keep_implementation_on_load(optimizer):
    """Make optimizer.load_state_dict keep this optimizer's implementation; returns it.

    Saved parameter groups carry the implementation flags of the run that wrote them
    (`fused`, `foreach`), and loading would otherwise restore those: a run resumed with the
    fused AdamW from a checkpoint of the per-parameter loop would silently continue in the
    loop, and the other way round. A load pre-hook sets the flags to this optimizer's first, so
    the state is also placed as this implementation needs it (the fused one keeps its step
    counts on the parameters' device). A mismatch in the groups is left to load_state_dict.
    """
    def own_flags(opt, state):
        groups = state.get('param_groups')
        if not isinstance(groups, list) or len(groups) != len(opt.param_groups):
            return None
        own = [{key: group[key] for key in ('fused', 'foreach') if key in group}
               for group in opt.param_groups]
        return dict(state, param_groups=[{**saved, **mine} for saved, mine in zip(groups, own)])
    optimizer.register_load_state_dict_pre_hook(own_flags)
    return optimizer


def peak_memory_mb(device):
    """Peak allocated CUDA memory, or the process's peak resident set size on the CPU."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricLogger:
    """Named SmoothedValues plus a loop wrapper that prints progress every print_freq steps."""

    def __init__(self, delimiter='  '):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, n=1, **values):
        for name, value in values.items():
            self.meters[name].update(float(value), n=n)

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def synchronize_between_processes(self, device):
        for meter in self.meters.values():
            meter.synchronize_between_processes(device)

    def __str__(self):
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def log_every(self, iterable, print_freq, header, device, batch_size=None):
        """Yield from iterable; every print_freq steps print ETA, meters, images/s and peak memory."""
        total = len(iterable)
        width = len(str(total))
        step_time = SmoothedValue(fmt='{avg:.4f}')
        start = end = time.time()
        for step, item in enumerate(iterable):
            yield item
            step_time.update(time.time() - end)
            end = time.time()
            if step % print_freq == 0 or step == total - 1:
                eta = datetime.timedelta(seconds=int(step_time.global_avg * (total - step - 1)))
                parts = [f'{header} [{step:>{width}}/{total}]', f'eta: {eta}', str(self)]
                if batch_size:
                    parts.append(f'img/s: {batch_size / max(step_time.avg, 1e-9):.1f}')
                parts.append(f'max mem: {peak_memory_mb(device):.0f} MB')
                print_on_master(self.delimiter.join(parts))
        elapsed = datetime.timedelta(seconds=int(time.time() - start))
        print_on_master(f'{header} total time: {elapsed} ({(time.time() - start) / max(total, 1):.4f} s / it)')
