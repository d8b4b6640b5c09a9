"""Checks of main.py's parsed arguments: values that cannot work stop before anything is built, naming the flag."""

# flags that must be whole numbers > 0, >= 0; and numbers >= 0
POSITIVE_INTS = ("batch_size", "dec_layers", "dim_feedforward", "hidden_dim", "nheads", "num_queries_one2one",
                 "dec_n_points", "enc_n_points", "num_feature_levels", "topk", "print_freq", "lr_drop")
NON_NEGATIVE_INTS = ("enc_layers", "num_queries_one2many", "k_one2many", "num_workers", "start_epoch")
NON_NEGATIVE = ("lr", "lr_backbone", "lr_linear_proj_mult", "weight_decay", "clip_max_norm", "lambda_one2many",
                "set_cost_class", "set_cost_bbox", "set_cost_giou", "cls_loss_coef", "bbox_loss_coef",
                "giou_loss_coef")
# the input projections' GroupNorm has 32 groups
GROUP_NORM_GROUPS = 32


def argument_problems(args):
    """Every problem with the values of `args` (a main.py Namespace), one message per flag."""
    problems = []

    def check(ok, message):
        if not ok:
            problems.append(message)

    for name in POSITIVE_INTS:
        check(getattr(args, name) > 0, f"--{name} must be > 0, got {getattr(args, name)}")
    for name in NON_NEGATIVE_INTS + NON_NEGATIVE:
        check(getattr(args, name) >= 0, f"--{name} must be >= 0, got {getattr(args, name)}")
    if not args.eval:
        check(args.epochs > 0, f"--epochs must be > 0 to train, got {args.epochs}")
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
    check(args.save_every_iters is None or args.save_every_iters > 0,
          f"--save_every_iters must be > 0, got {args.save_every_iters}")
    check(args.keep_checkpoints is None or args.keep_checkpoints > 0,
          f"--keep_checkpoints must be > 0, got {args.keep_checkpoints}")
    check(0 <= args.model_ema_decay < 1, f"--model_ema_decay must be in [0, 1), got {args.model_ema_decay}")
    check(not args.auto_resume or args.output_dir, "--auto_resume needs --output_dir (where the checkpoints are)")
    check(not (args.finetune and args.resume),
          "--finetune and --resume: give one (--resume continues a run, --finetune starts a new one from a "
          "checkpoint's weights)")
    check(not (args.finetune and args.eval), "--finetune starts a training run; evaluate with --eval --resume")
    return problems  # --num_queries_one2many > 0 with --k_one2many 0 is models.deformable_detr.build()'s check


def check_args(args):
    """Raise ValueError listing every flag whose value cannot work (see argument_problems)."""
    problems = argument_problems(args)
    if problems:
        raise ValueError("bad flag values: " + "; ".join(problems))
