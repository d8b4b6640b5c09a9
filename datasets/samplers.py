"""Samplers: an epoch-seeded shuffled split of the dataset over processes, and the resumable training batches
(order and augmentations a function of the seed, the epoch and the sample, so a run can continue mid-epoch)."""
import math
import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

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


# seed streams of their own (the spawn keys), apart from main.epoch_seed's
SAMPLE_STREAM, ORDER_STREAM = 1, 2


def sample_seed(seed, epoch, index):
    """The seed of one sample's random augmentations in one epoch."""
    return int(np.random.SeedSequence([seed, epoch, index], spawn_key=(SAMPLE_STREAM,)).generate_state(1)[0])


def order_seed(seed, epoch):
    """The seed of one epoch's (single-process) sample order."""
    return int(np.random.SeedSequence([seed, epoch], spawn_key=(ORDER_STREAM,)).generate_state(1)[0])


class ResumableBatchSampler(Sampler):
    """The training batches of one epoch (full batches only), each sample paired with its augmentation seed:
    batches of (index, seed) for SeededSamples.

    The order is `sampler`'s for the epoch set by set_epoch (a DistributedSampler's share), or, with no sampler, a
    permutation of the dataset seeded with (seed, epoch). set_epoch(epoch, start) skips the first `start` batches
    without reading them: the rest are exactly those of an uninterrupted epoch. len() counts every batch.
    """

    def __init__(self, num_samples, batch_size, seed, sampler=None):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.sampler = sampler
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch, start=0):
        self.epoch = epoch
        self.start = start
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def _order(self):
        if self.sampler is not None:
            return list(self.sampler)
        generator = torch.Generator().manual_seed(order_seed(self.seed, self.epoch))
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self):
        order = self._order()
        for first in range(self.start * self.batch_size, len(order) - self.batch_size + 1, self.batch_size):
            yield [(index, sample_seed(self.seed, self.epoch, index)) for index in order[first:first + self.batch_size]]

    def __len__(self):
        total = len(self.sampler) if self.sampler is not None else self.num_samples
        return total // self.batch_size


class SeededSamples(Dataset):
    """`dataset` read with (index, seed) keys: the sample's random augmentations are drawn from its own seed
    (python's random and torch's CPU generator), whatever was read before; the callers' random states are left
    as they were."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            torch.manual_seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(state)
