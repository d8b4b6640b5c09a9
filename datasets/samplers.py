"""Distributed samplers: an epoch-seeded shuffled split of the dataset over processes."""
import math

import torch
from torch.utils.data import Sampler

from util.misc import get_local_rank, get_local_size, get_rank, get_world_size


def _pad_to(indices, length):
    """Repeat ``indices`` cyclically until it holds ``length`` items (so every process gets as many)."""
    if length == 0:
        return []
    if not indices:
        raise ValueError("cannot pad an empty index list")
    repeats = math.ceil(length / len(indices))
    return (indices * repeats)[:length]


class DistributedSampler(Sampler):
    """Each of ``num_replicas`` processes reads a contiguous share of a (shuffled) index list.

    The list is padded by repetition to a multiple of ``num_replicas``; the shuffle is seeded with the
    epoch set by ``set_epoch``, so all processes agree on it. ``local_rank`` / ``local_size`` are accepted
    for the same call signature as ``NodeDistributedSampler`` and unused here.
    """

    def __init__(self, dataset, num_replicas=None, rank=None, local_rank=None, local_size=None,
                 shuffle=True):
        self.dataset = dataset
        self.num_replicas = get_world_size() if num_replicas is None else num_replicas
        self.rank = get_rank() if rank is None else rank
        self.shuffle = shuffle
        self.epoch = 0
        self.num_samples = math.ceil(len(dataset) / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def _ordered_indices(self):
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.epoch)
            return torch.randperm(len(self.dataset), generator=generator).tolist()
        return list(range(len(self.dataset)))

    def __iter__(self):
        indices = _pad_to(self._ordered_indices(), self.total_size)
        start = self.num_samples * self.rank
        return iter(indices[start:start + self.num_samples])

    def __len__(self):
        return self.num_samples

    def set_epoch(self, epoch):
        self.epoch = epoch


class NodeDistributedSampler(DistributedSampler):
    """For ``cache_mode``: a process only gets indices its local rank cached (index % local_size == local_rank).

    The processes sharing a local rank (one per node) split those indices between them.
    """

    def __init__(self, dataset, num_replicas=None, rank=None, local_rank=None, local_size=None,
                 shuffle=True):
        super().__init__(dataset, num_replicas, rank, shuffle=shuffle)
        self.local_rank = get_local_rank() if local_rank is None else local_rank
        self.local_size = get_local_size() if local_size is None else local_size
        if self.num_replicas % self.local_size != 0:
            raise ValueError(f"num_replicas ({self.num_replicas}) must be a multiple of local_size "
                             f"({self.local_size})")
        self.num_nodes = self.num_replicas // self.local_size
        self.node = self.rank // self.local_size
        self.total_size_per_local_rank = self.num_samples * self.num_nodes

    def __iter__(self):
        indices = [i for i in self._ordered_indices() if i % self.local_size == self.local_rank]
        if not indices:  # dataset smaller than the number of local ranks: nothing cached here
            indices = self._ordered_indices()
        indices = _pad_to(indices, self.total_size_per_local_rank)
        return iter(indices[self.node::self.num_nodes])
