"""Distributed samplers: repeated augmentation for training, exact sharding for evaluation."""
import math

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def _resolve_world(num_replicas, rank):
    """Fill in world size and rank from torch.distributed; a single process is world size 1."""
    initialized = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f'need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas=}, {rank=}.')
    return num_replicas, rank


class RASampler(Sampler):
    """Repeated augmentation (Hoffer et al., 2020), as DeiT uses it for distributed training.

    Every epoch shuffles the dataset with a generator seeded by seed + epoch (the same order on
    every rank), repeats each index num_repeats times in a row and deals the list round-robin to
    the ranks, so with num_replicas >= num_repeats the copies of one image go to different ranks
    and receive different augmentations. The list is extended by wrapping around to a multiple of
    num_replicas, so every rank gets the same number of indices for any dataset size. Each rank
    then keeps its first ceil(len(dataset) / num_replicas) indices: an epoch costs as many steps
    as a plain epoch and sees about 1 / num_repeats of the images, num_repeats times each.
    (DeiT also rounds the dataset size down to a multiple of 256, which yields an empty epoch for
    datasets smaller than 256; that rounding is left out here.)

    Args:
        dataset: any sized dataset.
        num_replicas: number of processes; from torch.distributed when None.
        rank: this process's rank; from torch.distributed when None.
        shuffle: shuffle before repeating (else dataset order).
        num_repeats: copies of each drawn image.
        seed: added to the epoch to seed the shuffle; must be equal on all ranks.
    """

    def __init__(self, dataset, num_replicas=None, rank=None, shuffle=True, num_repeats=3, seed=0):
        self.num_replicas, self.rank = _resolve_world(num_replicas, rank)
        if len(dataset) == 0 or num_repeats < 1:
            raise ValueError(f'RASampler needs a non-empty dataset and num_repeats >= 1, got '
                             f'{len(dataset)} samples and {num_repeats=}.')
        self.dataset_size = len(dataset)
        self.shuffle = shuffle
        self.num_repeats = num_repeats
        self.seed = seed
        self.epoch = 0
        self.samples_per_rank = math.ceil(self.dataset_size * num_repeats / self.num_replicas)
        self.selected_per_rank = math.ceil(self.dataset_size / self.num_replicas)

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        repeated = [index for index in order for _ in range(self.num_repeats)]
        total_size = self.samples_per_rank * self.num_replicas
        # Wrap around (possibly several times for tiny datasets) so every rank gets equally many.
        padded = [repeated[i % len(repeated)] for i in range(total_size)]
        own = padded[self.rank:total_size:self.num_replicas]
        return iter(own[:self.selected_per_rank])

    def __len__(self):
        return self.selected_per_rank

    def set_epoch(self, epoch):
        """Reseed the shuffle; call at the start of every epoch with the same value on all ranks."""
        self.epoch = epoch


class DistributedEvalSampler(Sampler):
    """Shard a dataset across ranks for evaluation without padding or duplicates.

    Rank r gets indices r, r + W, r + 2W, ... (W = num_replicas), so the shards are disjoint and
    together cover every index exactly once; ranks differ in length by at most one. Summing the
    correct-prediction counts and sample counts over ranks therefore gives exactly the accuracy
    of a single-process run. torch's DistributedSampler (used by DeiT and the official Twins
    code with --dist-eval) instead pads the index list with repeated samples until it divides
    evenly, so the reported accuracy changes with the number of GPUs.

    The caller must reduce sums (correct, count) across ranks rather than average per-rank
    accuracies, since shards differ in size, and must not run collective operations once per
    batch, since ranks may run a different number of batches.

    Args:
        dataset: any sized dataset.
        num_replicas: number of processes; from torch.distributed when None.
        rank: this process's rank; from torch.distributed when None.
    """

    def __init__(self, dataset, num_replicas=None, rank=None):
        self.num_replicas, self.rank = _resolve_world(num_replicas, rank)
        self.dataset_size = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, self.dataset_size, self.num_replicas))

    def __len__(self):
        return len(range(self.rank, self.dataset_size, self.num_replicas))
