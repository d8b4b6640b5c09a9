"""torchrun worker: one DistributedDataParallel SGD step on a split batch equals a single-process step.

Usage: torchrun --nproc_per_node 2 ddp_step.py OUT_JSON [main.py flags...]

Rank r trains on images [2r, 2r + 2) of a fixed, seeded global batch of 4 images through DDP; every rank also
takes the same step on all 4 images with an unwrapped copy of the initial model. The optimizer is main.py's
(``--sgd``: its first step is plain lr * gradient, unlike Adam's sign-like first step that amplifies float
noise). Rank 0 writes what every rank found to OUT_JSON for the test to assert on.
"""
import copy
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import main as project_main  # noqa: E402
import util.misc as utils  # noqa: E402
from engine import train_hybrid  # noqa: E402
from models import build_model  # noqa: E402
from models.criterion import weighted_losses  # noqa: E402

GLOBAL_BATCH = 4
BOXES_PER_IMAGE = (1, 2, 3, 3)  # unequal shares per rank: the loss normaliser must be averaged over processes
IMAGE_SIZE = 96  # every image the same size: no padding, so split and whole batches see the same pixels


def synthetic_batch(num_classes, seed=0):
    """GLOBAL_BATCH random images with BOXES_PER_IMAGE random boxes (normalised cxcywh), from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(GLOBAL_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    targets = []
    for n in BOXES_PER_IMAGE:
        centres = 0.3 + 0.4 * torch.rand(n, 2, generator=generator)
        sizes = 0.1 + 0.3 * torch.rand(n, 2, generator=generator)
        labels = torch.randint(1, num_classes, (n,), generator=generator)
        targets.append({"boxes": torch.cat([centres, sizes], dim=1), "labels": labels})
    return list(images), targets


def sgd_step(model, criterion, optimizer, images, targets, args):
    """Forward, hybrid loss, backward and one optimizer step; returns the weighted loss."""
    outputs = model(utils.nested_tensor_from_tensor_list(images))
    loss_dict = train_hybrid(outputs, targets, args.k_one2many, criterion, args.lambda_one2many)
    loss = weighted_losses(loss_dict, criterion.weight_dict)[1]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def flat_parameters(model):
    """All trainable parameters as one detached vector."""
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters() if p.requires_grad])


def main():
    out_path = Path(sys.argv[1])
    args = project_main.get_args_parser().parse_args(sys.argv[2:])
    utils.init_distributed_mode(args)
    assert args.distributed and args.dist_backend == "gloo", "expected a gloo process group on the CPU"
    rank, world_size = utils.get_rank(), utils.get_world_size()
    assert GLOBAL_BATCH % world_size == 0
    per_rank = GLOBAL_BATCH // world_size

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model, criterion, _ = build_model(args)
    model.train()
    criterion.train()
    reference = copy.deepcopy(model)
    initial = flat_parameters(model)
    initial_identical = all(torch.equal(initial, other) for other in utils.all_gather(initial))

    images, targets = synthetic_batch(args.num_classes)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer, _ = project_main.build_optimizer(args, model)
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    ddp_loss = sgd_step(ddp, criterion, optimizer, images[mine], targets[mine], args)
    after = flat_parameters(model)

    # the single-process step on the whole batch (its criterion all_reduces the same box count on every rank)
    ref_optimizer, _ = project_main.build_optimizer(args, reference)
    ref_loss = sgd_step(reference, criterion, ref_optimizer, images, targets, args)
    expected = flat_parameters(reference)

    gathered = utils.all_gather(after)
    report = {
        "rank": rank,
        "world_size": world_size,
        "num_parameters": after.numel(),
        "initial_identical_across_ranks": initial_identical,
        "identical_across_ranks": all(torch.equal(after, other) for other in gathered),
        "max_abs_update": float((after - initial).abs().max()),
        "max_abs_diff_to_reference": float((after - expected).abs().max()),
        "allclose_to_reference": bool(torch.allclose(after, expected, rtol=1e-5, atol=1e-6)),
        "ddp_loss": ddp_loss,
        "reference_loss": ref_loss,
    }
    reports = utils.all_gather(report)
    if rank == 0:
        out_path.write_text(json.dumps(reports, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
