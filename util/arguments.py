"""main.py's command line: the argument parser (upstream's flags and defaults, and ours), the checks of the parsed
values (values that cannot work stop before anything is built, naming the flag) and of the device."""
import argparse
import importlib
import math

import torch

from .misc import positive_seconds

# upstream's default of --pretrained_backbone_path (a Swin file); for other backbones it means "not given"
DEFAULT_PRETRAINED_BACKBONE_PATH = "./swin_tiny_patch4_window7_224.pkl"
AMP_MODES = ("fp32", "bf16", "fp16")
DEFAULT_DROP_PATH_RATE = 0.2
DEFAULT_K_ONE2MANY = 5
DEFAULT_LAMBDA_ONE2MANY = 1.0
# upstream's scales (shorter sides at an evaluation size of 800) and their object-size ranges, in pixels of the
# image resized to that scale
UPSTREAM_EVAL_SIZE = 800
UPSTREAM_TTA_RANGES = {
    400: (96, math.inf), 500: (96, math.inf), 600: (64, math.inf), 640: (64, math.inf), 700: (64, math.inf),
    900: (0, math.inf), 1000: (0, math.inf), 1100: (0, 256), 1200: (0, 256), 1300: (0, 192), 1400: (0, 192),
    1800: (0, 96),
}
UPSTREAM_TTA_SCALES = tuple(UPSTREAM_TTA_RANGES)
UPSTREAM_TTA_MAX_SIZE = 3000  # longest side for the scales from the evaluation size up (--tta_max_size)
# the --tta_* flags' defaults (a value other than its default is a flag given)
TTA_DEFAULTS = {"tta_scales": None, "tta_ranges": None, "tta_max_size": UPSTREAM_TTA_MAX_SIZE, "tta_flip": False,
                "tta_vote_iou": 0.66, "tta_max_dets": 1000}


def get_args_parser():
    """main.py's flags: upstream's, with upstream's defaults, and this project's additions."""
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
    parser.add_argument("--lr_drop", default=40, type=int, help="the learning rate drops 10x every LR_DROP epochs")
    parser.add_argument("--lr_drop_epochs", default=None, type=int, nargs="+",
                        help="epochs at which the learning rate drops 10x, in place of --lr_drop (upstream parsed "
                             "this flag without using it)")
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
    parser.add_argument("--drop_path_rate", default=DEFAULT_DROP_PATH_RATE, type=float,
                        help="stochastic depth of Swin and ViT backbones (the last block's rate)")

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
    parser.add_argument("--k_one2many", default=DEFAULT_K_ONE2MANY, type=int,
                        help="times the ground truth is repeated for the one-to-many queries (used only with "
                             "--num_queries_one2many > 0, which needs it > 0)")
    parser.add_argument("--lambda_one2many", default=DEFAULT_LAMBDA_ONE2MANY, type=float,
                        help="weight of the one-to-many losses")

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
    parser.add_argument("--dist_timeout", default=None, type=positive_seconds, metavar="SECONDS",
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
    tta.add_argument("--tta_vote_iou", default=TTA_DEFAULTS["tta_vote_iou"], type=float,
                     help="IoU that groups detections for soft box voting (default %(default)s)")
    tta.add_argument("--tta_max_dets", default=TTA_DEFAULTS["tta_max_dets"], type=int,
                     help="detections kept per image after merging (default %(default)s)")

    # training techniques
    parser.add_argument("--use_fp16", default=False, action="store_true",
                        help="upstream's flag for float16 mixed precision: the same as --amp fp16")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model for training and evaluation (the first step of each input "
                             "shape compiles, a minute or more; see docs/compile.md)")
    parser.add_argument("--amp", default=None, choices=AMP_MODES,
                        help="mixed precision of training and evaluation (torch.autocast): fp32 (off, the "
                             "default), bf16, or fp16 (with a gradient scaler); on any --device. Given, it wins over "
                             "--use_fp16 (a config's)")
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


# flags that must be whole numbers > 0, >= 0; and numbers >= 0
POSITIVE_INTS = ("batch_size", "dec_layers", "dim_feedforward", "hidden_dim", "nheads", "num_queries_one2one",
                 "dec_n_points", "enc_n_points", "num_feature_levels", "topk", "print_freq", "lr_drop")
NON_NEGATIVE_INTS = ("enc_layers", "num_queries_one2many", "k_one2many", "num_workers", "start_epoch")
NON_NEGATIVE = ("lr", "lr_backbone", "lr_linear_proj_mult", "weight_decay", "clip_max_norm", "lambda_one2many",
                "set_cost_class", "set_cost_bbox", "set_cost_giou", "cls_loss_coef", "bbox_loss_coef",
                "giou_loss_coef")
# the input projections' GroupNorm has 32 groups
GROUP_NORM_GROUPS = 32


def size_range(text):
    """argparse type of --tta_ranges: 'LO,HI' (HI may be 'inf') -> (LO, HI) floats; their order is a check below."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LO,HI (two numbers, e.g. 96,inf or 0,256)") from None
    return low, high


def tta_options_given(args):
    """The --tta_* flags of `args` that were given: those that differ from their default (None, False or a
    number)."""
    return [f"--{name}" for name, default in TTA_DEFAULTS.items() if getattr(args, name) != default]


def tta_problems(args):
    """Problems with the test-time augmentation flags (main.py's and tools/infer.py's), one message per flag."""
    problems = []
    given = tta_options_given(args)
    if given and not args.tta:
        problems.append(f"{', '.join(given)} only act with --tta")
    scales = args.tta_scales
    if scales is not None and (not scales or min(scales) <= 0):
        problems.append(f"--tta_scales needs one or more shorter sides > 0 (pixels), got {list(scales)}")
    if args.tta_ranges is not None:
        count = len(UPSTREAM_TTA_SCALES if scales is None else scales)
        if len(args.tta_ranges) != count:
            problems.append(f"--tta_ranges gives {len(args.tta_ranges)} ranges for {count} scales: one LO,HI per "
                            "--tta_scales value, in the same order")
        bad = [f"{low:g},{high:g}" for low, high in args.tta_ranges if not 0 <= low < high]
        if bad:
            problems.append(f"--tta_ranges needs 0 <= LO < HI in every LO,HI, got {' '.join(bad)}")
    if not 0 < args.tta_vote_iou <= 1:
        problems.append(f"--tta_vote_iou must be in (0, 1], got {args.tta_vote_iou}")
    if args.tta_max_dets <= 0:
        problems.append(f"--tta_max_dets must be > 0, got {args.tta_max_dets}")
    if args.tta_max_size <= 0:
        problems.append(f"--tta_max_size must be > 0, got {args.tta_max_size}")
    return problems


# what one process or node may set for itself: set per process at the start of a distributed run, paths (a node
# may mount a shared folder elsewhere; what they hold is compared once read), the node's data-loading workers
PER_PROCESS_FLAGS = ("rank", "gpu", "device", "output_dir", "coco_path", "coco_panoptic_path", "resume", "finetune",
                     "pretrained_backbone_path", "frozen_weights", "num_workers")


def shared_flags(args):
    """The flags of `args` that every process of a distributed run must share (all but PER_PROCESS_FLAGS)."""
    return {f"--{name}": value for name, value in vars(args).items() if name not in PER_PROCESS_FLAGS}


def value_problems(args):
    """Every flag of `args` (a main.py Namespace) whose value cannot work, whatever the run does with it (training,
    evaluation, a tool that rebuilds a trained model): one message per flag."""
    problems = []

    def check(ok, message):
        if not ok:
            problems.append(message)

    for name in POSITIVE_INTS:
        check(getattr(args, name) > 0, f"--{name} must be > 0, got {getattr(args, name)}")
    for name in NON_NEGATIVE_INTS + NON_NEGATIVE:
        check(getattr(args, name) >= 0, f"--{name} must be >= 0, got {getattr(args, name)}")
    check(args.hidden_dim % GROUP_NORM_GROUPS == 0,
          f"--hidden_dim must be a multiple of {GROUP_NORM_GROUPS} (the input projections' GroupNorm groups), "
          f"got {args.hidden_dim}")
    check(args.nheads <= 0 or args.hidden_dim % args.nheads == 0,
          f"--hidden_dim {args.hidden_dim} must be divisible by --nheads {args.nheads}")
    check(0 <= args.dropout < 1, f"--dropout must be in [0, 1), got {args.dropout}")
    check(0 <= args.drop_path_rate < 1, f"--drop_path_rate must be in [0, 1), got {args.drop_path_rate}")
    check(args.focal_alpha <= 1, f"--focal_alpha must be <= 1 (negative: no alpha weighting), got {args.focal_alpha}")
    check(args.position_embedding_scale > 0,
          f"--position_embedding_scale must be > 0, got {args.position_embedding_scale}")
    check(args.num_classes is None or args.num_classes > 0, f"--num_classes must be > 0, got {args.num_classes}")
    for name in ("val_scale", "max_size"):
        value = getattr(args, name)
        check(value is None or value > 0, f"--{name} must be > 0, got {value}")
    for name in ("train_scales", "lr_drop_epochs"):
        values = getattr(args, name)
        check(not values or min(values) > 0, f"--{name} must all be > 0, got {values}")
    check(args.lsj is None or args.lsj > 0, f"--lsj must be > 0 (the square's side, pixels), got {args.lsj}")
    check(args.save_every_iters is None or args.save_every_iters > 0,
          f"--save_every_iters must be > 0, got {args.save_every_iters}")
    check(args.keep_checkpoints is None or args.keep_checkpoints > 0,
          f"--keep_checkpoints must be > 0, got {args.keep_checkpoints}")
    check(0 <= args.model_ema_decay < 1, f"--model_ema_decay must be in [0, 1), got {args.model_ema_decay}")
    return problems + tta_problems(args)


def argument_problems(args):
    """Every problem with the values of `args` (a main.py Namespace) and their combination for main.py's run, one
    message per flag."""
    problems = value_problems(args)

    def check(ok, message):
        if not ok:
            problems.append(message)

    check(args.eval or args.epochs > 0, f"--epochs must be > 0 to train, got {args.epochs}")
    check(not args.auto_resume or args.output_dir, "--auto_resume needs --output_dir (where the checkpoints are)")
    check(not (args.finetune and args.resume),
          "--finetune and --resume: give one (--resume continues a run, --finetune starts a new one from a "
          "checkpoint's weights)")
    check(not (args.finetune and args.eval), "--finetune starts a training run; evaluate with --eval --resume")
    check(not args.tta or args.eval, "--tta (test-time augmentation) needs --eval: training evaluates at one scale")
    problems += model_flag_problems(args)
    return problems  # --num_queries_one2many > 0 with --k_one2many 0 is models.deformable_detr.build()'s check


def model_flag_problems(args):
    """Model flags of a training run that change nothing without the part they act on, one message each (none with
    --eval, whose flags rebuild a trained model)."""
    if args.eval:
        return []
    unread = [
        (args.mixed_selection and not args.two_stage,
         "--mixed_selection needs --two_stage (it keeps learned content queries beside the encoder's proposals)"),
        (args.look_forward_twice and not args.with_box_refine,
         "--look_forward_twice needs --with_box_refine (it acts on the boxes each decoder layer refines)"),
    ]
    return [message for problem, message in unread if problem]


def unused_hybrid_flags(args):
    """A note when a training run gives the hybrid branch's --k_one2many / --lambda_one2many with no one-to-many
    queries (not an error: a hybrid config with --num_queries_one2many 0 is the branch's ablation), else None."""
    given = [f"--{name} {getattr(args, name)}" for name, default in
             (("k_one2many", DEFAULT_K_ONE2MANY), ("lambda_one2many", DEFAULT_LAMBDA_ONE2MANY))
             if getattr(args, name) != default]
    if args.eval or args.num_queries_one2many or not given:
        return None
    return f"--num_queries_one2many 0: the hybrid branch is off, {' and '.join(given)} unused"


def missing_packages(args):
    """One message per flag of `args` whose optional package cannot be imported: --use_wandb (wandb),
    --tensorboard when training (tensorboard)."""
    wanted = [("--use_wandb", "wandb", args.use_wandb),
              ("--tensorboard", "tensorboard", args.tensorboard and not args.eval)]
    problems = []
    for flag, package, used in wanted:
        if used:
            try:
                importlib.import_module(package)
            except ImportError:
                problems.append(f"{flag} needs the {package} package: pip install {package}")
    return problems


def check_packages(args):
    """Raise ImportError naming the flags whose optional package is missing (see missing_packages)."""
    problems = missing_packages(args)
    if problems:
        raise ImportError("; ".join(problems))


def _raise_problems(problems):
    if problems:
        raise ValueError("bad flag values: " + "; ".join(problems))


def check_args(args):
    """Raise ValueError listing every flag whose value cannot work for main.py's run (see argument_problems)."""
    _raise_problems(argument_problems(args))


def check_values(args):
    """Raise ValueError listing every flag whose value cannot work whatever the run (see value_problems)."""
    _raise_problems(value_problems(args))


def check_device(args):
    """Stop when --device names a device this machine does not have."""
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {args.device} was asked for but CUDA is not available here; "
                           "pass --device cpu to run on the CPU")
    index = torch.device(args.device).index
    if str(args.device).startswith("cuda") and index is not None and index >= torch.cuda.device_count():
        raise RuntimeError(f"--device {args.device}: this machine has {torch.cuda.device_count()} GPUs")
