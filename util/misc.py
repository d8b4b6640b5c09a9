"""Tensor helpers (NestedTensor, padding, inverse sigmoid, accuracy) and distributed helpers."""
import builtins
import os
import subprocess
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
    channels = tensor_list[0].shape[0]
    max_h = max(t.shape[1] for t in tensor_list)
    max_w = max(t.shape[2] for t in tensor_list)
    if pad_to is not None:
        max_h, max_w = max(max_h, pad_to), max(max_w, pad_to)
    first = tensor_list[0]
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


def init_distributed_mode(args):
    """Set args.distributed/rank/world_size/gpu from torchrun or SLURM variables and start the process group.

    NCCL is used for CUDA devices, gloo otherwise; a single process without those variables runs undistributed.
    """
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
    print(f"| distributed init (rank {args.rank} of {args.world_size}, backend {args.dist_backend})", flush=True)
    dist.init_process_group(backend=args.dist_backend, init_method="env://",
                            world_size=args.world_size, rank=args.rank)
    dist.barrier()
    setup_for_distributed(args.rank == 0)


def close_distributed_mode():
    """End the process group, if one was started (torch's documented end of a distributed run)."""
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


def all_gather(data):
    """Gather any picklable object from every process; returns the list in rank order."""
    if get_world_size() == 1:
        return [data]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, data)
    return gathered


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
