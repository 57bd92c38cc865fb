"""Tests for samplers.py: exact evaluation shards and repeated-augmentation training order."""
from collections import Counter

import pytest
from torch.utils.data import DistributedSampler

from samplers import DistributedEvalSampler, RASampler


def shards(sampler_class, size, world_size, **kwargs):
    return [list(sampler_class(range(size), num_replicas=world_size, rank=rank, **kwargs))
            for rank in range(world_size)]


@pytest.mark.parametrize('size', [10, 11, 1797])
@pytest.mark.parametrize('world_size', [1, 2, 3, 4, 7])
def test_eval_shards_cover_every_index_exactly_once(size, world_size):
    per_rank = shards(DistributedEvalSampler, size, world_size)
    assert sorted(i for shard in per_rank for i in shard) == list(range(size))
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1
    assert per_rank[world_size - 1][:2] == list(range(world_size - 1, size, world_size))[:2]
    assert [len(DistributedEvalSampler(range(size), world_size, rank)) for rank in range(world_size)] == \
        list(map(len, per_rank))


def test_eval_accuracy_summed_over_ranks_equals_single_process():
    size, world_size = 11, 4
    correct = [i % 3 == 0 for i in range(size)]  # 4 of 11 right: 36.36 %
    single = sum(correct) / size
    per_rank = shards(DistributedEvalSampler, size, world_size)
    summed = sum(correct[i] for shard in per_rank for i in shard) / sum(map(len, per_rank))
    assert summed == single
    # torch's DistributedSampler pads 11 to 12 with a duplicate, which changes the figure.
    padded = shards(DistributedSampler, size, world_size, shuffle=False)
    assert sum(map(len, padded)) == 12
    assert sum(correct[i] for shard in padded for i in shard) / 12 != single


def test_eval_sampler_rejects_rank_outside_world():
    with pytest.raises(ValueError, match='0 <= rank < num_replicas'):
        DistributedEvalSampler(range(5), num_replicas=2, rank=2)


@pytest.mark.parametrize('size, world_size', [(10, 1), (10, 3), (11, 4), (1797, 7), (2, 8)])
def test_ra_ranks_get_equal_counts(size, world_size):
    per_rank = shards(RASampler, size, world_size)
    expected = -(-size // world_size)  # ceil
    assert [len(shard) for shard in per_rank] == [expected] * world_size
    assert len(RASampler(range(size), world_size, 0)) == expected
    assert all(0 <= i < size for shard in per_rank for i in shard)


def test_ra_copies_of_an_image_go_to_different_ranks():
    per_rank = shards(RASampler, 20, 4)
    ranks_of = {}
    for rank, shard in enumerate(per_rank):
        for index in shard:
            ranks_of.setdefault(index, []).append(rank)
    # 4 ranks x 5 = 20 slots = 6 images x 3 copies + 2 copies of a seventh.
    assert sorted(Counter(len(r) for r in ranks_of.values()).items()) == [(2, 1), (3, 6)]
    assert all(len(set(ranks)) == len(ranks) for ranks in ranks_of.values())


def test_ra_single_process_repeats_consecutively():
    order = list(RASampler(range(9), num_replicas=1, rank=0, shuffle=False))
    assert order == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_ra_epoch_reseeds_and_is_reproducible():
    first = RASampler(range(100), num_replicas=2, rank=1, seed=5)
    second = RASampler(range(100), num_replicas=2, rank=1, seed=5)
    epoch0 = list(first)
    assert list(second) == epoch0
    assert list(first) == epoch0  # iterating again without set_epoch repeats the order
    first.set_epoch(1)
    epoch1 = list(first)
    assert epoch1 != epoch0
    second.set_epoch(1)
    assert list(second) == epoch1
    assert list(RASampler(range(100), num_replicas=2, rank=1, seed=6)) != epoch0
