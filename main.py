"""Train and evaluate H-Deformable-DETR (command line as upstream main.py)."""
import argparse
import datetime
import functools
import math
import sys
import time
from pathlib import Path

import torch
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

import datasets.samplers as samplers
import util.misc as utils
from datasets import build_dataset, get_coco_api_from_dataset, num_classes_from_annotations
from datasets.coco import COCO_SPLITS, dataset_root
from datasets.tta import UPSTREAM_TTA_MAX_SIZE, collate_views
from engine import TrainingRun, evaluate, print_ap
from models import build_model
from models.backbone import DEFAULT_PRETRAINED_BACKBONE_PATH, ViTBackbone, load_pretrained_backbone
from models.tta import TestTimeAugmentation
from models.vit import layer_decay_param_groups
from util.arguments import argument_problems, check_args, size_range
from util.checkpoint import evaluation_weights, load_checkpoint, load_finetune_state, load_model_state
from util.output_dir import check_output_dir
from util.preemption import Preempted
from util.training_state import (  # noqa: F401 (epoch_seed, resume_training_state: main's names, as before)
    epoch_seed,
    find_resume_checkpoint,
    remove_temporaries,
    resume_training_state,
    seed_everything,
)


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
    parser.add_argument("--dist_timeout", default=None, type=utils.positive_seconds, metavar="SECONDS",
                        help="seconds a collective may wait for the other processes before the run fails, naming "
                             "the ranks that did not respond (default: torch's, 30 min with gloo, 10 with NCCL)")
    parser.add_argument("--seed", default=42, type=int)
    parser.add_argument("--resume", default="", help="resume from checkpoint")
    parser.add_argument("--finetune", default="",
                        help="start a new training run from the weights of this checkpoint (file or URL): every "
                             "tensor is loaded except classification heads of another number of classes, which "
                             "start fresh; the optimizer, schedule and epochs start anew")
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N", help="start epoch")
    parser.add_argument("--num_workers", default=2, type=int)
    parser.add_argument("--cache_mode", default=False, action="store_true",
                        help="whether to cache images on memory")

    # evaluation
    parser.add_argument("--eval", action="store_true")
    parser.add_argument("--eval_in_training_set", default=False, action="store_true")
    parser.add_argument("--topk", default=100, type=int)
    tta = parser.add_argument_group(
        "test-time augmentation", "upstream's multi-scale (and flip) test, with --eval (and in tools/infer.py)")
    tta.add_argument("--tta", action="store_true",
                     help="evaluate every image at the evaluation size and at each --tta_scales, keep each scale's "
                          "top --topk detections in its size range and merge them per class by soft box voting")
    tta.add_argument("--tta_scales", default=None, type=int, nargs="+", metavar="S",
                     help="shorter sides of the extra passes (default upstream's 400 500 600 640 700 900 1000 1100 "
                          "1200 1300 1400 1800)")
    tta.add_argument("--tta_ranges", default=None, type=size_range, nargs="+", metavar="LO,HI",
                     help="per scale, the detection sizes sqrt(w*h) it keeps, in pixels of its resized image "
                          "(e.g. 96,inf or 0,256; default upstream's, scaled to the evaluation size)")
    tta.add_argument("--tta_max_size", default=UPSTREAM_TTA_MAX_SIZE, type=int,
                     help="longest side of the scales from the evaluation size up (default %(default)s; smaller "
                          "scales: --max_size)")
    tta.add_argument("--tta_flip", action="store_true", help="also run every pass on the mirrored image")
    tta.add_argument("--tta_vote_iou", default=0.66, type=float,
                     help="IoU that groups detections for soft box voting (default %(default)s)")
    tta.add_argument("--tta_max_dets", default=1000, type=int,
                     help="detections kept per image after merging (default %(default)s)")

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
    parser.add_argument("--print_freq", default=10, type=int,
                        help="iterations between progress lines (and lines of <output_dir>/log_iterations.txt)")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also log to TensorBoard, in <output_dir>/tensorboard (needs the tensorboard package)")

    # checkpoints, preemption and weight averaging
    parser.add_argument("--save_every_iters", default=None, type=int,
                        help="also write checkpoint.pth every N iterations (an exact resume point mid-epoch)")
    parser.add_argument("--auto_resume", action="store_true",
                        help="resume from <output_dir>/checkpoint.pth when it exists (else from the newest per-epoch "
                             "copy that loads): what a requeued job needs")
    parser.add_argument("--keep_checkpoints", default=None, type=int,
                        help="keep only the last K per-epoch copies checkpointNNNN.pth (default: all, as upstream)")
    parser.add_argument("--model_ema", action="store_true",
                        help="keep an exponential moving average of the weights, evaluated instead of them and "
                             "saved in the checkpoint under 'model_ema'")
    parser.add_argument("--model_ema_decay", default=0.9997, type=float,
                        help="the average's decay, reached after a warm-up (timm's: 1 - (1 + step) ** -2/3)")

    ignored = parser.add_argument_group(
        "accepted for compatibility with upstream's command lines and ignored",
        "DETR segmentation and dataset leftovers that the deformable detector never used")
    ignored.add_argument("--mask_loss_coef", default=1, type=float, help="ignored")
    ignored.add_argument("--dice_loss_coef", default=1, type=float, help="ignored")
    ignored.add_argument("--coco_panoptic_path", type=str, help="ignored")
    ignored.add_argument("--remove_difficult", action="store_true", help="ignored")
    return parser


def check_device(args):
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {args.device} was asked for but CUDA is not available here; "
                           "pass --device cpu to run on the CPU")
    index = torch.device(args.device).index
    if str(args.device).startswith("cuda") and index is not None and index >= torch.cuda.device_count():
        raise RuntimeError(f"--device {args.device}: this machine has {torch.cuda.device_count()} GPUs")
    if args.use_fp16 and not str(args.device).startswith("cuda"):
        raise ValueError("--use_fp16 needs a CUDA device")


def resolve_num_classes(args):
    """--num_classes, else the largest category id of the annotation file in use + 1 (91 for COCO)."""
    if args.num_classes is None and args.dataset_file == "coco":
        split = "train" if not args.eval or args.eval_in_training_set else "val"
        args.num_classes = num_classes_from_annotations(dataset_root(args) / COCO_SPLITS[split][1])


def make_loaders(args, dataset_train, dataset_val):
    """(the training batch sampler, its loader, the evaluation loader). Training batches come from a
    ResumableBatchSampler (order and augmentations a function of the seed, the epoch and the sample)."""
    pin = str(args.device).startswith("cuda")
    if args.distributed:
        sampler_cls = samplers.NodeDistributedSampler if args.cache_mode else samplers.DistributedSampler
        sampler_val = sampler_cls(dataset_val, shuffle=False)
    else:
        sampler_val = torch.utils.data.SequentialSampler(dataset_val)
    batch_sampler = loader_train = None
    if dataset_train is not None:
        if len(dataset_train) < args.batch_size * utils.get_world_size():
            raise ValueError(f"the training set has {len(dataset_train)} images, fewer than one batch "
                             f"({args.batch_size} per process x {utils.get_world_size()} processes)")
        shares = sampler_cls(dataset_train) if args.distributed else None
        batch_sampler = samplers.ResumableBatchSampler(len(dataset_train), args.batch_size, args.seed, shares)
        # large-scale jitter: batches padded to a fixed --lsj x --lsj (masked), as ViTDet
        collate = functools.partial(utils.collate_fn, pad_to=args.lsj) if args.lsj else utils.collate_fn
        # the loader's own generator: starting an epoch's iterator draws nothing from the global random state
        loader_train = DataLoader(samplers.SeededSamples(dataset_train), batch_sampler=batch_sampler,
                                  collate_fn=collate, num_workers=args.num_workers, pin_memory=pin,
                                  generator=torch.Generator().manual_seed(args.seed))
    loader_val = DataLoader(dataset_val, args.batch_size, sampler=sampler_val, drop_last=False,
                            collate_fn=collate_views if args.tta else utils.collate_fn,
                            num_workers=args.num_workers, pin_memory=pin)
    return batch_sampler, loader_train, loader_val


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


def resume_checkpoint(args, output_dir):
    """(source, checkpoint) to resume from: --resume, else with --auto_resume the run's own checkpoint.pth (or its
    newest per-epoch copy that loads); (None, None) to start afresh."""
    if args.resume:
        return args.resume, load_checkpoint(args.resume)
    if args.auto_resume:
        path, checkpoint = find_resume_checkpoint(output_dir)
        if path is None:
            print(f"--auto_resume: no checkpoint in {output_dir} yet, starting a new run", flush=True)
            return None, None
        at = checkpoint.get("in_epoch", {"epoch": checkpoint.get("epoch", -1) + 1, "iteration": 0})
        print(f"--auto_resume: resuming from {path} (epoch {at['epoch']}, iteration {at['iteration']})", flush=True)
        args.resume = str(path)
        return str(path), checkpoint
    return None, None


def load_weights(args, model, source, checkpoint):
    """The model's starting weights: a checkpoint's (its average with --eval when it has one), --finetune's, or
    the ImageNet backbone's."""
    if checkpoint is not None:
        weights, averaged = evaluation_weights(checkpoint) if args.eval else (checkpoint, False)
        load_model_state(model, weights, source, args)
        print(f"evaluating the weight average (model_ema) of {source}" if averaged else f"loaded the model of {source}")
    elif args.finetune:
        fresh = load_finetune_state(model, load_checkpoint(args.finetune), args.finetune)
        print(f"fine-tuning from {args.finetune}" + (f"; new classification heads ({len(fresh)} tensors: "
                                                     f"{', '.join(fresh[:4])}{', ...' if len(fresh) > 4 else ''})"
                                                     if fresh else ""))
    elif not args.eval and args.pretrained_backbone:
        load_pretrained_backbone(model, args)


def main(args):
    check_output_dir(args.output_dir)
    check_args(args)
    utils.init_distributed_mode(args)
    check_device(args)
    print(args)
    device = torch.device(args.device)
    seed_everything(args.seed + utils.get_rank())
    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir is not None and utils.is_main_process():
        for path in remove_temporaries(output_dir):
            print(f"removed {path}, left by an interrupted save")
    if args.tensorboard and not args.eval:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    if args.use_wandb and utils.is_main_process():
        import wandb

        wandb.init(project="H-Deformable-DETR", name=output_dir.name if output_dir else None, config=vars(args))

    # data first: a wrong path fails before any model is built
    resolve_num_classes(args)
    dataset_train = None if args.eval else build_dataset("train", args)
    dataset_val = build_dataset("val", args)
    batch_sampler, loader_train, loader_val = make_loaders(args, dataset_train, dataset_val)
    base_ds = get_coco_api_from_dataset(dataset_val)

    model, criterion, postprocessors = build_model(args)
    source, checkpoint = resume_checkpoint(args, output_dir)
    load_weights(args, model, source, checkpoint)
    model.to(device)
    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print("number of params:", n_parameters)
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if device.type == "cuda"
                                                          else None)

    if args.eval:
        tta = TestTimeAugmentation.from_args(args, postprocessors["bbox"]) if args.tta else None
        if tta is not None:
            print(tta)
        stats, coco_evaluator = evaluate(model, criterion, postprocessors, loader_val, base_ds, device,
                                         args.output_dir, use_wandb=args.use_wandb, print_freq=args.print_freq,
                                         tta=tta)
        print_ap(stats)
        if output_dir is not None:
            utils.save_on_master(coco_evaluator.coco_eval["bbox"].eval, output_dir / "eval.pth")
        return stats

    optimizer, scheduler = build_optimizer(args, model_without_ddp)
    scaler = torch.amp.GradScaler(device.type, enabled=args.use_fp16)
    ema = ModelEmaV3(model_without_ddp, decay=args.model_ema_decay, use_warmup=True) if args.model_ema else None
    run = TrainingRun(args, model, criterion, postprocessors, optimizer, scheduler, scaler, batch_sampler,
                      loader_train, loader_val, base_ds, device, ema=ema, n_parameters=n_parameters)
    if checkpoint is not None and all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch")):
        run.resume(checkpoint, source)
    del checkpoint

    print("Start training")
    start_time = time.time()
    stats = run.run()
    total_time = str(datetime.timedelta(seconds=int(time.time() - start_time)))
    print(f"Training time {total_time}")
    return stats


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Deformable DETR training and evaluation script", parents=[get_args_parser()])
    parsed = parser.parse_args()
    problems = argument_problems(parsed)
    if problems:
        parser.error("; ".join(problems))
    try:
        with utils.unresponsive_ranks_named():
            main(parsed)
        exit_code = 0
    except Preempted as stopped:
        print(stopped, flush=True)
        exit_code = 128 + stopped.signum  # the shell's convention for "ended by this signal"
    utils.close_distributed_mode()  # after a clean end only: after an error, other processes may be mid-collective
    sys.exit(exit_code)
