"""Tensor helpers (NestedTensor, padding, inverse sigmoid, accuracy) and distributed helpers."""
import argparse
import builtins
import datetime
import math
import os
import re
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

# --------------------------------------------------------------------------- tensors


class NestedTensor:
    """A padded image batch [B, C, H, W] with its padding mask [B, H, W] (True on padded pixels)."""

    def __init__(self, tensors: Tensor, mask: Optional[Tensor]):
        self.tensors = tensors
        self.mask = mask

    def to(self, device, non_blocking=False):
        mask = None if self.mask is None else self.mask.to(device, non_blocking=non_blocking)
        return NestedTensor(self.tensors.to(device, non_blocking=non_blocking), mask)

    def record_stream(self, stream):
        self.tensors.record_stream(stream)
        if self.mask is not None:
            self.mask.record_stream(stream)

    def decompose(self):
        return self.tensors, self.mask

    def __repr__(self):
        mask = None if self.mask is None else tuple(self.mask.shape)
        return f"NestedTensor(tensors={tuple(self.tensors.shape)}, mask={mask})"


def nested_tensor_from_tensor_list(tensor_list: List[Tensor], pad_to: Optional[int] = None) -> NestedTensor:
    """Pad [C, H, W] images to the largest H and W (bottom/right; at least pad_to x pad_to when given) and mark the
    padding in the mask."""
    if len(tensor_list) == 0:
        raise ValueError("nested_tensor_from_tensor_list: got an empty list of images")
    if any(t.dim() != 3 for t in tensor_list):
        shapes = [tuple(t.shape) for t in tensor_list]
        raise ValueError(f"nested_tensor_from_tensor_list: expected [C, H, W] images, got shapes {shapes}")
    first = tensor_list[0]
    if any((t.shape[0], t.dtype, t.device) != (first.shape[0], first.dtype, first.device) for t in tensor_list):
        # copy_ would convert or broadcast them into the first image's kind without a word
        raise ValueError("nested_tensor_from_tensor_list: the images differ in channels, dtype or device: "
                         f"{[(tuple(t.shape), str(t.dtype), str(t.device)) for t in tensor_list]}")
    channels = tensor_list[0].shape[0]
    max_h = max(t.shape[1] for t in tensor_list)
    max_w = max(t.shape[2] for t in tensor_list)
    if pad_to is not None:
        max_h, max_w = max(max_h, pad_to), max(max_w, pad_to)
    batch = first.new_zeros((len(tensor_list), channels, max_h, max_w))
    mask = torch.ones((len(tensor_list), max_h, max_w), dtype=torch.bool, device=first.device)
    for img, padded, m in zip(tensor_list, batch, mask):
        padded[:, : img.shape[1], : img.shape[2]].copy_(img)
        m[: img.shape[1], : img.shape[2]] = False
    return NestedTensor(batch, mask)


def collate_fn(batch, pad_to=None):
    """DataLoader collate: (list of images, list of targets) -> (NestedTensor, tuple of targets)."""
    images, targets = tuple(zip(*batch))
    return nested_tensor_from_tensor_list(list(images), pad_to), targets


def downsample_mask(mask, size):
    """Nearest-neighbour resize of a padding mask [B, H, W] to a feature map's (h, w): [B, h, w] bool."""
    return torch.nn.functional.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]


def inverse_sigmoid(x, eps=1e-5):
    """logit(x), with x clamped to [0, 1] and both terms kept above eps."""
    x = x.clamp(min=0, max=1)
    x1 = x.clamp(min=eps)
    x2 = (1 - x).clamp(min=eps)
    return torch.log(x1 / x2)


@torch.no_grad()
def accuracy(output, target, topk=(1,)):
    """Top-k accuracy in percent of logits [N, C] against labels [N]; 0 when there is no target."""
    if target.numel() == 0:
        return [torch.zeros([], device=output.device)]
    maxk = max(topk)
    _, pred = output.topk(maxk, 1, True, True)
    correct = pred.t().eq(target.view(1, -1).expand(maxk, -1))
    return [correct[:k].reshape(-1).float().sum(0) * (100.0 / target.numel()) for k in topk]


def get_total_grad_norm(parameters, norm_type=2):
    """L2 (or other) norm of all gradients together, as clip_grad_norm_ reports it."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros([])
    device = grads[0].device
    return torch.norm(torch.stack([torch.norm(g, norm_type).to(device) for g in grads]), norm_type)


# --------------------------------------------------------------------------- distributed


def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def get_local_size():
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if is_dist_avail_and_initialized() else 1


def get_local_rank():
    return int(os.environ.get("LOCAL_RANK", 0)) if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def barrier():
    if is_dist_avail_and_initialized():
        dist.barrier()


def save_on_master(*args, **kwargs):
    if is_main_process():
        torch.save(*args, **kwargs)


def setup_for_distributed(is_master):
    """Silence print() on every process but the main one (print(..., force=True) still prints)."""
    builtin_print = builtins.print

    def print_on_master(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_master or force:
            builtin_print(*args, **kwargs)

    builtins.print = print_on_master


def _slurm_environment():
    """Translate SLURM variables into the torch.distributed env:// variables; returns (rank, world, local)."""
    rank = int(os.environ["SLURM_PROCID"])
    world_size = int(os.environ["SLURM_NTASKS"])
    local_rank = int(os.environ.get("SLURM_LOCALID", rank % max(torch.cuda.device_count(), 1)))
    if "MASTER_ADDR" not in os.environ:
        node_list = os.environ["SLURM_NODELIST"]
        os.environ["MASTER_ADDR"] = subprocess.getoutput(f"scontrol show hostname {node_list} | head -n1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(local_rank)
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    return rank, world_size, local_rank


# The keys of one start of the process group go under a prefix of their own: torchrun restarts a failed worker
# group (--max-restarts) against the same store, its agent's, where the killed group's keys (gloo's peer addresses
# above all) are still set; a restarted rank that read its peer's stale address failed to connect or hung.
RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"
MEMBER_KEY = "member/{}"  # "host, pid" of a rank, for messages naming it
FAILED_KEY = "failed_collective/{}"  # set by a rank whose collective failed (see unresponsive_ranks_named)
NAMING_GRACE_S = 10.0  # at most this long a failed rank waits for the others' reports (less with a short timeout)
STORE_ANSWER_S = 5.0  # and this much longer for the store's answers
# how gloo's (and NCCL's) failures of a collective read as plain RuntimeErrors: gloo's name its source file
# ("[.../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete")
COMMUNICATION_FAILURE = re.compile(r"gloo|NCCL|pair closure|Connection (reset|closed) by peer")


@dataclass
class _ProcessGroup:
    """What this process needs of the group it started to name the ranks that stop responding."""
    store: dist.Store
    rank: int
    world_size: int
    timeout: Optional[datetime.timedelta]


_group: Optional[_ProcessGroup] = None


def positive_seconds(text):
    """argparse type of --dist_timeout: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _group_store(rank, world_size, timeout):
    """The store of torch's env:// rendezvous (torchrun's agent serves it, else rank 0 does), its keys under
    this start's restart count."""
    options = {} if timeout is None else {"timeout": timeout}
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, **options))
    if timeout is not None:
        store.set_timeout(timeout)
    return dist.PrefixStore(f"restart_{os.environ.get(RESTART_COUNT, '0')}", store)


def init_distributed_mode(args):
    """Set args.distributed/rank/world_size/gpu from torchrun or SLURM variables and start the process group.

    NCCL is used for CUDA devices, gloo otherwise; a single process without those variables runs undistributed.
    args.dist_timeout (seconds, None: torch's default) bounds every collective and the rendezvous.
    """
    global _group
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        args.rank = int(os.environ["RANK"])
        args.world_size = int(os.environ["WORLD_SIZE"])
        args.gpu = int(os.environ.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        args.rank, args.world_size, args.gpu = _slurm_environment()
    else:
        print("Not using distributed mode")
        args.distributed = False
        args.rank, args.world_size, args.gpu = 0, 1, 0
        return

    args.distributed = True
    use_cuda = str(args.device).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(args.gpu)
        args.device = f"cuda:{args.gpu}"
    args.dist_backend = "nccl" if use_cuda else "gloo"
    seconds = getattr(args, "dist_timeout", None)
    timeout = None if seconds is None else datetime.timedelta(seconds=seconds)
    print(f"| distributed init (rank {args.rank} of {args.world_size}, backend {args.dist_backend})", flush=True)
    store = _group_store(args.rank, args.world_size, timeout)
    dist.init_process_group(backend=args.dist_backend, store=store, world_size=args.world_size, rank=args.rank,
                            timeout=timeout)
    store.set(MEMBER_KEY.format(args.rank), f"host {socket.gethostname()}, pid {os.getpid()}")
    _group = _ProcessGroup(store, args.rank, args.world_size, timeout)
    dist.barrier()
    setup_for_distributed(args.rank == 0)


def close_distributed_mode():
    """End the process group, if one was started (torch's documented end of a distributed run)."""
    global _group
    _group = None
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


class CollectiveFailed(RuntimeError):
    """A collective failed (timed out, lost a peer); the message names the ranks that did not respond."""


def _member(store, rank):
    """'host NAME, pid N' of a rank (a store's get would wait for a missing key: hence the check)."""
    key = MEMBER_KEY.format(rank)
    return store.get(key).decode() if store.check([key]) else "host unknown"


def _report_and_wait(group, grace_s, missing):
    group.store.set(FAILED_KEY.format(group.rank), "1")
    deadline = time.monotonic() + grace_s
    while True:
        missing[:] = [r for r in range(group.world_size) if not group.store.check([FAILED_KEY.format(r)])]
        if not missing or time.monotonic() > deadline:
            return
        time.sleep(0.1)


def unresponsive_ranks(group, grace_s):
    """The ranks that do not report a failed collective within grace_s (a stopped, hung or dead process; the
    others' collectives fail within the timeout too): this rank reports its own, then waits for theirs. None when
    the store itself does not answer in time (a store request to a stopped host waits on it, whatever the store's
    timeout: hence the thread)."""
    missing = [None]
    asking = threading.Thread(target=_report_and_wait, args=(group, grace_s, missing), daemon=True)
    asking.start()
    asking.join(grace_s + STORE_ANSWER_S)
    return None if asking.is_alive() or missing == [None] else missing


def describe_failed_collective(group, error):
    """The message of CollectiveFailed: who did not respond, and the error this rank got."""
    timeout_s = None if group.timeout is None else group.timeout.total_seconds()
    within = "torch's default timeout" if timeout_s is None else f"--dist_timeout {timeout_s:g} s"
    grace_s = NAMING_GRACE_S if timeout_s is None else min(NAMING_GRACE_S, timeout_s)
    lines = str(error).strip().splitlines()
    # gloo's messages start with its source file: "[.../gloo/transport/tcp/pair.cc:545] Read error ..."
    cause = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]) if lines else type(error).__name__
    seen = f"rank {group.rank} of {group.world_size} saw a collective fail: {cause}"
    missing = unresponsive_ranks(group, grace_s)
    if missing is None:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            return f"{seen}; the store at {where} (torchrun's, on the first node) did not answer either"
        return f"{seen}; the store at {where}, which rank 0 hosts, did not answer either: rank 0 stopped responding"
    if not missing:
        return f"{seen} (every rank reported the failure)"
    reported = [r for r in range(group.world_size) if r not in missing]
    named = ", ".join(f"rank {r} ({_member(group.store, r)})" for r in missing)
    return (f"{named} did not respond within {within}: stopped, hung or dead, or waiting behind such a process "
            f"(ranks that reported the failure within {grace_s:g} s: {', '.join(map(str, reported))}); {seen}")


@contextmanager
def unresponsive_ranks_named():
    """Around a distributed run: a failed collective (timeout, lost peer) is raised again as CollectiveFailed,
    naming the ranks that did not respond; other errors pass unchanged."""
    try:
        yield
    except Exception as error:
        group = _group
        communication = isinstance(error, dist.DistError) or COMMUNICATION_FAILURE.search(str(error))
        if group is None or not communication or isinstance(error, CollectiveFailed):
            raise
        raise CollectiveFailed(describe_failed_collective(group, error)) from error


def all_gather(data):
    """Gather any picklable object from every process; returns the list in rank order."""
    if get_world_size() == 1:
        return [data]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, data)
    return gathered


def _rank_list(ranks):
    """'0-7, 9' for [0, 1, ..., 7, 9]."""
    spans = []
    for rank in ranks:
        if spans and spans[-1][1] == rank - 1:
            spans[-1][1] = rank
        else:
            spans.append([rank, rank])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def check_same_on_every_rank(what, settings, advice):
    """Every process holds the same `settings` (a dict of picklable values), else every process raises, naming
    for each distinct variant the ranks and hosts that hold it and the values that differ. One process: nothing
    to compare."""
    if get_world_size() == 1:
        return
    gathered = all_gather((socket.gethostname(), settings))
    variants = []  # [(settings, {host: [ranks]})], in rank order
    for rank, (host, held) in enumerate(gathered):
        holders = next((hosts for known, hosts in variants if known == held), None)
        if holders is None:
            holders = {}
            variants.append((held, holders))
        holders.setdefault(host, []).append(rank)
    if len(variants) == 1:
        return
    keys = list(dict.fromkeys(key for held, _ in variants for key in held))
    differing = [key for key in keys if any(held.get(key) != variants[0][0].get(key) for held, _ in variants)]
    described = []
    for held, hosts in variants:
        where = ", ".join(f"rank{'s' if len(ranks) > 1 else ''} {_rank_list(ranks)} on {host}"
                          for host, ranks in hosts.items())
        described.append(f"{where}: " + ", ".join(f"{key} {held.get(key, '(none)')}" for key in differing))
    raise RuntimeError(f"the processes differ in {what} ({'; '.join(described)}): {advice}")


def reduce_dict(input_dict, average=True):
    """Average (or sum) a dict of scalar tensors over all processes; every process gets the result."""
    world_size = get_world_size()
    if world_size < 2:
        return input_dict
    with torch.no_grad():
        names = sorted(input_dict.keys())
        values = torch.stack([input_dict[k].detach().float().reshape(()) for k in names])
        dist.all_reduce(values)
        if average:
            values /= world_size
        return dict(zip(names, values))
