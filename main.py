"""Train and evaluate H-Deformable-DETR (command line as upstream main.py)."""
import argparse
import datetime
import functools
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import datasets.samplers as samplers
import util.misc as utils
from datasets import build_dataset, get_coco_api_from_dataset, num_classes_from_annotations
from datasets.coco import COCO_SPLITS
from engine import evaluate, train_one_epoch
from models import build_model
from models.backbone import DEFAULT_PRETRAINED_BACKBONE_PATH, ViTBackbone, load_pretrained_backbone
from models.vit import layer_decay_param_groups
from util.checkpoint import load_checkpoint, load_model_state, save_checkpoint


def get_args_parser():
    parser = argparse.ArgumentParser("Deformable DETR Detector", add_help=False)
    parser.add_argument("--lr", default=2e-4, type=float)
    parser.add_argument("--lr_backbone_names", default=["backbone.0"], type=str, nargs="+")
    parser.add_argument("--lr_backbone", default=2e-5, type=float)
    parser.add_argument("--lr_linear_proj_names", default=["reference_points", "sampling_offsets"],
                        type=str, nargs="+")
    parser.add_argument("--lr_linear_proj_mult", default=0.1, type=float)
    parser.add_argument("--batch_size", default=2, type=int)
    parser.add_argument("--weight_decay", default=1e-4, type=float)
    parser.add_argument("--epochs", default=50, type=int)
    parser.add_argument("--lr_drop", default=40, type=int)
    parser.add_argument("--lr_drop_epochs", default=None, type=int, nargs="+")
    parser.add_argument("--clip_max_norm", default=0.1, type=float, help="gradient clipping max norm")
    parser.add_argument("--sgd", action="store_true")

    # variants of Deformable DETR
    parser.add_argument("--with_box_refine", default=False, action="store_true")
    parser.add_argument("--two_stage", default=False, action="store_true")

    # model
    parser.add_argument("--frozen_weights", type=str, default=None,
                        help="DETR segmentation leftover; not supported by the deformable model")

    # backbone
    parser.add_argument("--backbone", default="resnet50", type=str,
                        help="resnet18/34/50/101, swin_tiny, swin_small, swin_large, swin_large_window12, vit_base "
                             "or vit_large")
    parser.add_argument("--dilation", action="store_true",
                        help="replace the stride of the last ResNet stage by a dilation (DC5)")
    parser.add_argument("--position_embedding", default="sine", type=str, choices=("sine", "learned"),
                        help="type of positional embedding on top of the image features")
    parser.add_argument("--position_embedding_scale", default=2 * math.pi, type=float,
                        help="position / size * scale")
    parser.add_argument("--num_feature_levels", default=4, type=int, help="number of feature levels")
    parser.add_argument("--pretrained_backbone_path", default=DEFAULT_PRETRAINED_BACKBONE_PATH, type=str,
                        help="ImageNet weights of the backbone: the official Swin file for Swin backbones; for "
                             "ResNet, a torchvision state dict (when not given, torchvision's weights are used); "
                             "for ViT, an MAE pre-trained file (MAE's release or timm's)")
    parser.add_argument("--no_pretrained_backbone", dest="pretrained_backbone", action="store_false",
                        help="train the backbone from random initialisation instead of ImageNet weights (a ResNet "
                             "then trains all its stages with ordinary BatchNorm; pass it at evaluation too)")
    parser.add_argument("--drop_path_rate", default=0.2, type=float)

    # ViT backbones (vit_base, vit_large: MAE pre-training)
    parser.add_argument("--lr_layer_decay", "--lr_backbone_decay_rate", dest="lr_layer_decay", default=1.0,
                        type=float, help="layer-wise learning-rate decay of a ViT backbone: block i of N trains at "
                        "--lr_backbone * decay ** (N - i), the embeddings at decay ** (N + 1), the feature pyramid "
                        "at --lr_backbone (1.0: off; --lr_backbone_decay_rate is the ViT fork's name)")
    parser.add_argument("--wd_backbone", default=None, type=float,
                        help="weight decay of the backbone parameters (default: --weight_decay); a ViT's position "
                             "embedding gets none")
    parser.add_argument("--lsj", nargs="?", const=1024, default=None, type=int, metavar="SIZE",
                        help="large-scale jitter at training instead of the multi-scale resize: resize to fit a "
                             "random 0.1-2.0 of SIZE x SIZE (default 1024), random SIZE x SIZE crop, batches padded "
                             "to SIZE x SIZE (the padding masked)")

    # transformer
    parser.add_argument("--enc_layers", default=6, type=int, help="number of encoder layers")
    parser.add_argument("--dec_layers", default=6, type=int, help="number of decoder layers")
    parser.add_argument("--dim_feedforward", default=2048, type=int,
                        help="hidden size of the feed-forward layers in the transformer blocks")
    parser.add_argument("--hidden_dim", default=256, type=int, help="size of the transformer embeddings")
    parser.add_argument("--dropout", default=0.1, type=float, help="dropout applied in the transformer")
    parser.add_argument("--nheads", default=8, type=int, help="number of attention heads")
    parser.add_argument("--num_queries_one2one", default=300, type=int,
                        help="number of queries trained with one-to-one matching (used at evaluation)")
    parser.add_argument("--num_queries_one2many", default=0, type=int,
                        help="number of extra queries trained with one-to-many matching (the hybrid branch; 0: off)")
    parser.add_argument("--dec_n_points", default=4, type=int)
    parser.add_argument("--enc_n_points", default=4, type=int)
    # Deformable DETR tricks
    parser.add_argument("--mixed_selection", action="store_true", default=False)
    parser.add_argument("--look_forward_twice", action="store_true", default=False)
    # hybrid branch: on when --num_queries_one2many > 0
    parser.add_argument("--k_one2many", default=5, type=int,
                        help="times the ground truth is repeated for the one-to-many queries (used only with "
                             "--num_queries_one2many > 0, which needs it > 0)")
    parser.add_argument("--lambda_one2many", default=1.0, type=float, help="weight of the one-to-many losses")

    # segmentation (DETR leftover)
    parser.add_argument("--masks", action="store_true", help="not supported by the deformable model")

    # loss
    parser.add_argument("--no_aux_loss", dest="aux_loss", action="store_false",
                        help="disable the auxiliary decoding losses (loss at each layer)")

    # matcher
    parser.add_argument("--set_cost_class", default=2, type=float, help="class weight in the matching cost")
    parser.add_argument("--set_cost_bbox", default=5, type=float, help="L1 box weight in the matching cost")
    parser.add_argument("--set_cost_giou", default=2, type=float, help="GIoU weight in the matching cost")

    # loss coefficients
    parser.add_argument("--cls_loss_coef", default=2, type=float)
    parser.add_argument("--bbox_loss_coef", default=5, type=float)
    parser.add_argument("--giou_loss_coef", default=2, type=float)
    parser.add_argument("--focal_alpha", default=0.25, type=float)

    # dataset
    parser.add_argument("--dataset_file", default="coco")
    parser.add_argument("--coco_path", default="./data/coco", type=str)
    parser.add_argument("--num_classes", default=None, type=int,
                        help="classifier size; by default the largest category id of the annotation "
                             "file + 1 (91 for COCO)")
    parser.add_argument("--train_scales", default=None, type=int, nargs="+",
                        help="shorter sides of the multi-scale training resize (default: 480..800 step 32)")
    parser.add_argument("--val_scale", default=None, type=int,
                        help="shorter side at evaluation (default: the largest training scale, 800)")
    parser.add_argument("--max_size", default=None, type=int, help="longest side after resizing (default 1333)")
    parser.add_argument("--no_crop_augment", action="store_true",
                        help="leave out the random resize-crop branch of the training augmentation")

    parser.add_argument("--output_dir", default="", help="path where to save, empty for no saving")
    parser.add_argument("--device", default="cuda", help="device to use for training / testing")
    parser.add_argument("--seed", default=42, type=int)
    parser.add_argument("--resume", default="", help="resume from checkpoint")
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N", help="start epoch")
    parser.add_argument("--num_workers", default=2, type=int)
    parser.add_argument("--cache_mode", default=False, action="store_true",
                        help="whether to cache images on memory")

    # evaluation
    parser.add_argument("--eval", action="store_true")
    parser.add_argument("--eval_in_training_set", default=False, action="store_true")
    parser.add_argument("--topk", default=100, type=int)

    # training techniques
    parser.add_argument("--use_fp16", default=False, action="store_true")
    parser.add_argument("--use_checkpoint", default=False, action="store_true",
                        help="gradient checkpointing: recompute the transformer's encoder and decoder layers (and "
                             "a ViT backbone's blocks) in backward to save memory (Swin backbones checkpoint their "
                             "blocks by default, as upstream; see --no_backbone_checkpoint)")
    parser.add_argument("--no_backbone_checkpoint", dest="backbone_checkpoint", action="store_false",
                        help="do not checkpoint the Swin backbone's blocks (faster, more memory; upstream always "
                             "checkpoints them); ignored with --use_checkpoint")

    # logging
    parser.add_argument("--use_wandb", action="store_true", default=False)
    parser.add_argument("--print_freq", default=10, type=int, help="iterations between progress lines")

    ignored = parser.add_argument_group(
        "accepted for compatibility with upstream's command lines and ignored",
        "DETR segmentation and dataset leftovers that the deformable detector never used")
    ignored.add_argument("--mask_loss_coef", default=1, type=float, help="ignored")
    ignored.add_argument("--dice_loss_coef", default=1, type=float, help="ignored")
    ignored.add_argument("--coco_panoptic_path", type=str, help="ignored")
    ignored.add_argument("--remove_difficult", action="store_true", help="ignored")
    return parser


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def epoch_seed(seed, epoch, rank):
    """A seed of its own for every (epoch, rank): a resumed run draws the same samples and augmentations."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def check_device(args):
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {args.device} was asked for but CUDA is not available here; "
                           "pass --device cpu to run on the CPU")
    if args.use_fp16 and not str(args.device).startswith("cuda"):
        raise ValueError("--use_fp16 needs a CUDA device")


def resolve_num_classes(args):
    """--num_classes, else the largest category id of the annotation file in use + 1 (91 for COCO)."""
    if args.num_classes is None and args.dataset_file == "coco":
        split = "train" if not args.eval or args.eval_in_training_set else "val"
        args.num_classes = num_classes_from_annotations(Path(args.coco_path) / COCO_SPLITS[split][1])


def make_loaders(args, dataset_train, dataset_val):
    pin = str(args.device).startswith("cuda")
    if args.distributed:
        sampler_cls = samplers.NodeDistributedSampler if args.cache_mode else samplers.DistributedSampler
        sampler_train = sampler_cls(dataset_train) if dataset_train is not None else None
        sampler_val = sampler_cls(dataset_val, shuffle=False)
    else:
        sampler_train = torch.utils.data.RandomSampler(dataset_train) if dataset_train is not None else None
        sampler_val = torch.utils.data.SequentialSampler(dataset_val)
    loader_train = None
    if dataset_train is not None:
        if len(dataset_train) < args.batch_size * utils.get_world_size():
            raise ValueError(f"the training set has {len(dataset_train)} images, fewer than one batch "
                             f"({args.batch_size} per process x {utils.get_world_size()} processes)")
        batch_sampler = torch.utils.data.BatchSampler(sampler_train, args.batch_size, drop_last=True)
        # large-scale jitter: batches padded to a fixed --lsj x --lsj (masked), as ViTDet
        collate = functools.partial(utils.collate_fn, pad_to=args.lsj) if args.lsj else utils.collate_fn
        loader_train = DataLoader(dataset_train, batch_sampler=batch_sampler, collate_fn=collate,
                                  num_workers=args.num_workers, pin_memory=pin)
    loader_val = DataLoader(dataset_val, args.batch_size, sampler=sampler_val, drop_last=False,
                            collate_fn=utils.collate_fn, num_workers=args.num_workers, pin_memory=pin)
    return sampler_train, loader_train, loader_val


def match_name_keywords(name, keywords):
    return any(k in name for k in keywords)


def backbone_param_groups(args, model, named):
    """The backbone's group (--lr_backbone, --wd_backbone); for a ViT one group per layer, the learning rate
    decayed layer-wise by --lr_layer_decay (models.vit.layer_decay_param_groups)."""
    weight_decay = args.weight_decay if args.wd_backbone is None else args.wd_backbone
    if not args.lr_layer_decay > 0:
        raise ValueError(f"--lr_layer_decay must be positive, not {args.lr_layer_decay}")
    if isinstance(model.backbone[0], ViTBackbone):
        return layer_decay_param_groups(named, len(model.backbone[0].body.net.blocks), args.lr_backbone,
                                        args.lr_layer_decay, weight_decay)
    if args.lr_layer_decay != 1.0:
        raise ValueError(f"--lr_layer_decay {args.lr_layer_decay} applies to ViT backbones only, not --backbone "
                         f"{args.backbone}")
    group = {"params": [p for _, p in named], "lr": args.lr_backbone}
    if args.wd_backbone is not None:
        group["weight_decay"] = args.wd_backbone
    return [group]


def build_optimizer(args, model):
    """AdamW (or SGD) with three kinds of groups: backbone (--lr_backbone; one group per layer of a ViT), linear
    projections (--lr * --lr_linear_proj_mult) and the rest (--lr)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    backbone = [(n, p) for n, p in named if match_name_keywords(n, args.lr_backbone_names)]
    linear_proj = [p for n, p in named if match_name_keywords(n, args.lr_linear_proj_names)]
    rest = [p for n, p in named if not match_name_keywords(n, args.lr_backbone_names)
            and not match_name_keywords(n, args.lr_linear_proj_names)]
    param_groups = [
        {"params": rest, "lr": args.lr},
        *backbone_param_groups(args, model, backbone),
        {"params": linear_proj, "lr": args.lr * args.lr_linear_proj_mult},
    ]
    if args.sgd:
        optimizer = torch.optim.SGD(param_groups, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        # the fused kernel: upstream's AdamW update in one pass over all parameters (4x faster on the CPU)
        fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
        optimizer = torch.optim.AdamW(param_groups, lr=args.lr, weight_decay=args.weight_decay, fused=fused)
    if args.lr_drop_epochs:
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.lr_drop_epochs)
    else:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    return optimizer, scheduler


def resume_training_state(args, checkpoint, optimizer, scheduler, scaler):
    """Restore optimizer, scheduler and epoch; the learning rates and lr drops of this command line win, as
    upstream (so a resumed run can change its schedule)."""
    # this run's learning rates, and its choice of the fused AdamW kernel (a checkpoint's param groups carry theirs)
    fresh_groups = [{k: g[k] for k in ("lr", "initial_lr", "fused") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(checkpoint["optimizer"])
    for group, fresh in zip(optimizer.param_groups, fresh_groups):
        group.update(fresh)
    scheduler.load_state_dict(checkpoint["lr_scheduler"])
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    if isinstance(scheduler, torch.optim.lr_scheduler.StepLR):
        scheduler.step_size = args.lr_drop
        drops = scheduler.last_epoch // scheduler.step_size
    else:
        scheduler.milestones = type(scheduler.milestones)(args.lr_drop_epochs)
        drops = sum(1 for m in args.lr_drop_epochs if m <= scheduler.last_epoch)
    for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base_lr * scheduler.gamma ** drops
    if "scaler" in checkpoint and scaler is not None:
        scaler.load_state_dict(checkpoint["scaler"])
    args.start_epoch = checkpoint["epoch"] + 1


def save_epoch(args, output_dir, epoch, model, optimizer, scheduler, scaler):
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "lr_scheduler": scheduler.state_dict(), "epoch": epoch, "args": args}
    if args.use_fp16:
        state["scaler"] = scaler.state_dict()
    for path in (output_dir / "checkpoint.pth", output_dir / f"checkpoint{epoch:04}.pth"):
        save_checkpoint(state, path)


def print_ap(stats):
    ap = stats["coco_eval_bbox"]
    print(f"bbox AP {ap[0]:.4f}  AP50 {ap[1]:.4f}  AP75 {ap[2]:.4f}  APs {ap[3]:.4f}  APm {ap[4]:.4f}  "
          f"APl {ap[5]:.4f}", flush=True)


def main(args):
    utils.init_distributed_mode(args)
    check_device(args)
    print(args)
    device = torch.device(args.device)
    seed_everything(args.seed + utils.get_rank())
    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir is not None and utils.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
    if args.use_wandb and utils.is_main_process():
        import wandb

        wandb.init(project="H-Deformable-DETR", name=output_dir.name if output_dir else None, config=vars(args))

    # data first: a wrong path fails before any model is built
    resolve_num_classes(args)
    dataset_train = None if args.eval else build_dataset("train", args)
    dataset_val = build_dataset("val", args)
    sampler_train, loader_train, loader_val = make_loaders(args, dataset_train, dataset_val)
    base_ds = get_coco_api_from_dataset(dataset_val)

    model, criterion, postprocessors = build_model(args)
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    if checkpoint is not None:
        load_model_state(model, checkpoint, args.resume, args)
        print(f"loaded the model of {args.resume}")
    elif not args.eval and args.pretrained_backbone:
        load_pretrained_backbone(model, args)
    model.to(device)
    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print("number of params:", n_parameters)

    optimizer, scheduler = build_optimizer(args, model_without_ddp)
    scaler = torch.amp.GradScaler(device.type, enabled=args.use_fp16)
    if checkpoint is not None and not args.eval and all(k in checkpoint for k in ("optimizer", "lr_scheduler",
                                                                                 "epoch")):
        resume_training_state(args, checkpoint, optimizer, scheduler, scaler)
        print(f"resuming at epoch {args.start_epoch}")
    del checkpoint
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if device.type == "cuda"
                                                          else None)
        model_without_ddp = model.module

    if args.eval:
        stats, coco_evaluator = evaluate(model, criterion, postprocessors, loader_val, base_ds, device,
                                         args.output_dir, use_wandb=args.use_wandb, print_freq=args.print_freq)
        print_ap(stats)
        if output_dir is not None:
            utils.save_on_master(coco_evaluator.coco_eval["bbox"].eval, output_dir / "eval.pth")
        return stats

    print("Start training")
    start_time = time.time()
    stats = None
    for epoch in range(args.start_epoch, args.epochs):
        seed_everything(epoch_seed(args.seed, epoch, utils.get_rank()))
        if args.distributed:
            sampler_train.set_epoch(epoch)
        train_stats = train_one_epoch(model, criterion, loader_train, optimizer, device, epoch,
                                      args.clip_max_norm, use_wandb=args.use_wandb, use_fp16=args.use_fp16,
                                      scaler=scaler, print_freq=args.print_freq)
        scheduler.step()
        if output_dir is not None:
            save_epoch(args, output_dir, epoch, model_without_ddp, optimizer, scheduler, scaler)

        stats, coco_evaluator = evaluate(model, criterion, postprocessors, loader_val, base_ds, device,
                                         args.output_dir, use_wandb=args.use_wandb, print_freq=args.print_freq)
        print_ap(stats)
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                     **{f"test_{k}": v for k, v in stats.items()},
                     "epoch": epoch, "n_parameters": n_parameters}
        if output_dir is not None and utils.is_main_process():
            with (output_dir / "log.txt").open("a") as f:
                f.write(json.dumps(log_stats) + "\n")
            (output_dir / "eval").mkdir(exist_ok=True)
            names = ["latest.pth"] + ([f"{epoch:03}.pth"] if epoch % 50 == 0 else [])
            for name in names:
                save_checkpoint(coco_evaluator.coco_eval["bbox"].eval, output_dir / "eval" / name)

    total_time = str(datetime.timedelta(seconds=int(time.time() - start_time)))
    print(f"Training time {total_time}")
    return stats


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Deformable DETR training and evaluation script", parents=[get_args_parser()])
    main(parser.parse_args())
