"""The optimizer of a training run and its learning-rate schedule, with upstream's parameter groups."""
import torch

from .backbone import ViTBackbone
from .vit import layer_decay_param_groups


def match_name_keywords(name, keywords):
    return any(k in name for k in keywords)


def backbone_param_groups(args, model, named):
    """The backbone's group (--lr_backbone, --wd_backbone); for a ViT one group per layer, the learning rate
    decayed layer-wise by --lr_layer_decay (models.vit.layer_decay_param_groups)."""
    weight_decay = args.weight_decay if args.wd_backbone is None else args.wd_backbone
    if not args.lr_layer_decay > 0:
        raise ValueError(f"--lr_layer_decay must be positive, not {args.lr_layer_decay}")
    given = [flag for flag, value, default in (("--lr_layer_decay", args.lr_layer_decay, 1.0),
                                                ("--wd_backbone", args.wd_backbone, None)) if value != default]
    if not named and given:
        raise ValueError(f"{' and '.join(given)} set how the backbone trains, but it is frozen (--lr_backbone "
                         f"{args.lr_backbone}): nothing would read them")
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


def check_group_names(args, model):
    """--lr_backbone_names and --lr_linear_proj_names each match some parameter of the model (frozen ones count):
    a list that matches none (a typo: `backbone0`) would train those parameters at --lr without a word."""
    names = [n for n, _ in model.named_parameters()]
    for flag in ("lr_backbone_names", "lr_linear_proj_names"):
        keywords = getattr(args, flag)
        if not any(match_name_keywords(n, keywords) for n in names):
            prefixes = sorted({".".join(n.split(".")[:2]) for n in names})
            raise ValueError(f"--{flag} {' '.join(keywords)} matches no parameter of the model: every parameter "
                             f"would train at --lr (parameter names contain, e.g., {', '.join(prefixes[:8])})")


def build_optimizer(args, model):
    """AdamW (or SGD) with three kinds of groups: backbone (--lr_backbone; one group per layer of a ViT), linear
    projections (--lr * --lr_linear_proj_mult) and the rest (--lr)."""
    check_group_names(args, model)
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
