"""Backbones (torchvision ResNet with frozen BatchNorm, Swin Transformer, MAE ViT) joined with the position encoding."""
import os
from collections import OrderedDict
from typing import Dict, List

import torch
import torchvision
from torch import nn
from torchvision import ops

from mmcv_custom import load_checkpoint as load_swin_checkpoint
from mmcv_custom.checkpoint import _read as read_weights
from util.arguments import DEFAULT_DROP_PATH_RATE, DEFAULT_PRETRAINED_BACKBONE_PATH
from util.misc import NestedTensor, downsample_mask
from util.tracing import is_exporting

from .mae_checkpoint import load_mae_checkpoint
from .position_encoding import build_position_encoding
from .vit import SIZE_DIVISIBILITY, VIT_SIZES, build_vit_backbone

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
SWINS = ("swin_tiny", "swin_small", "swin_large", "swin_large_window12")
# what an official Swin ImageNet file holds of the detection backbone in full (not its detection norms)
SWIN_WEIGHT_PREFIXES = ("patch_embed.", "layers.")
# upstream's default --pretrained_backbone_path (a Swin-T file); ResNets then use torchvision's ImageNet weights
STAGE_STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}


class FrozenBatchNorm2d(ops.FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d (same buffers, same float32 operations) with an output in the input's dtype:
    under autocast a bfloat16/float16 feature map stays so, where the float32 statistics would promote it to
    float32 for the next convolution to cast back."""

    def forward(self, x):
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        bias = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale.to(x.dtype) + bias.to(x.dtype)


class ResNetBody(nn.ModuleDict):
    """The ResNet stem and stages up to the last returned one; returns {output name: feature map}."""

    def __init__(self, resnet: nn.Module, return_layers: Dict[str, str]):
        last = max(return_layers, key=lambda name: STAGE_STRIDES[name])
        modules = OrderedDict()
        for name, module in resnet.named_children():
            modules[name] = module
            if name == last:
                break
        super().__init__(modules)
        self.return_layers = dict(return_layers)

    def forward(self, x):
        if torch.is_autocast_enabled(x.device.type):
            # bfloat16/float16 convolutions are several times faster channels-last (oneDNN, cuDNN); the maps keep
            # that layout, which is also the [B, H*W, C] order the transformer flattens them to
            x = x.contiguous(memory_format=torch.channels_last)
        out = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


def _stage_channels(stage: nn.Module) -> int:
    """Output channels of a ResNet stage: those of the last convolution of its last block."""
    return [m.out_channels for m in stage[-1].modules() if isinstance(m, nn.Conv2d)][-1]


class BackboneBase(nn.Module):
    """A network `body` returning {name: feature map}; forward pairs each map with the downsampled padding mask."""

    def _use_body(self, body: nn.Module, train_backbone: bool, name: str):
        """Set `body` (trainable only with train_backbone), with the channels and strides of its outputs."""
        self.body = body
        for param in body.parameters():
            param.requires_grad_(train_backbone)
        self.num_channels = list(body.num_channels)
        self.strides = list(body.strides)
        self.name = name

    def forward(self, tensor_list: NestedTensor) -> Dict[str, NestedTensor]:
        features = self.body(tensor_list.tensors)
        return {name: NestedTensor(x, downsample_mask(tensor_list.mask, x.shape[-2:])) for name, x in features.items()}


class Backbone(BackboneBase):
    """torchvision ResNet-18/34/50/101 with frozen BatchNorm; stem and layer1 stay frozen.

    Returns the outputs of the last num_outputs of layer2-4 (strides 8/16/32); `--dilation` turns the stride of
    layer4 into a dilation (DC5), halving its stride. A backbone trained from random weights (from_scratch)
    trains every stage with ordinary BatchNorm: frozen random layers and statistics would be useless.
    """

    def __init__(self, name: str, train_backbone: bool, num_outputs: int, dilation: bool,
                 from_scratch: bool = False):
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"unknown ResNet backbone {name!r}; choose one of {RESNETS}")
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(f"--dilation needs a bottleneck ResNet (resnet50/101), not {name}")
        norm_layer = nn.BatchNorm2d if from_scratch else FrozenBatchNorm2d
        resnet = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=norm_layer)
        for param_name, param in resnet.named_parameters():
            trainable = train_backbone and (from_scratch or param_name.startswith(("layer2", "layer3", "layer4")))
            param.requires_grad_(trainable)
        stages = ["layer2", "layer3", "layer4"][-num_outputs:]
        self.body = ResNetBody(resnet, {stage: str(i) for i, stage in enumerate(stages)})
        self.num_channels = [_stage_channels(getattr(resnet, stage)) for stage in stages]
        self.strides = [STAGE_STRIDES[stage] for stage in stages]
        if dilation:
            self.strides[-1] //= 2
        self.name = name


class TransformerBackbone(BackboneBase):
    """Swin Transformer returning the last num_outputs of stages 1-3 (strides 8/16/32, 2C/4C/8C channels)."""

    def __init__(self, name: str, train_backbone: bool, num_outputs: int, drop_path_rate: float,
                 use_checkpoint: bool = True):
        super().__init__()
        from .swin_transformer import build_swin_backbone

        out_indices = (1, 2, 3)[-num_outputs:]
        # use_checkpoint: recompute the blocks in backward (upstream always does, to save memory)
        body = build_swin_backbone(name, drop_path_rate=drop_path_rate, use_checkpoint=use_checkpoint,
                                   out_indices=out_indices)
        # re-initialised at construction as upstream does (truncated-normal Linear weights), which also keeps
        # the random stream, hence drop-path masks, in step with upstream's; ImageNet weights come later
        body.init_weights()
        self._use_body(body, train_backbone, name)


def _pad_to_multiple(samples: NestedTensor, multiple: int) -> NestedTensor:
    """Zero-pad the images [B, 3, H, W] at the bottom/right to multiples of `multiple`, the mask marking the pad."""
    pad_h, pad_w = (-samples.tensors.shape[-2]) % multiple, (-samples.tensors.shape[-1]) % multiple
    if not pad_h and not pad_w and not is_exporting():  # an exported graph pads for every size
        return samples
    tensors = torch.nn.functional.pad(samples.tensors, (0, pad_w, 0, pad_h))
    return NestedTensor(tensors, torch.nn.functional.pad(samples.mask, (0, pad_w, 0, pad_h), value=True))


class ViTBackbone(BackboneBase):
    """Plain ViT (MAE pre-training) with a simple feature pyramid: the last num_outputs of strides 8/16/32.

    The batch is first padded to a multiple of 32 (zeros, marked in the mask), so every level's grid is exact.
    As in ViTDet, the ViT attends over padded tokens too; the deformable transformer masks them out.
    """

    def __init__(self, name: str, train_backbone: bool, num_outputs: int, drop_path_rate: float,
                 use_checkpoint: bool = False):
        super().__init__()
        self._use_body(build_vit_backbone(name, num_outputs, drop_path_rate, use_checkpoint), train_backbone, name)

    def forward(self, tensor_list: NestedTensor) -> Dict[str, NestedTensor]:
        return super().forward(_pad_to_multiple(tensor_list, SIZE_DIVISIBILITY))


class Joiner(nn.Sequential):
    """backbone.0 = the backbone, backbone.1 = the position encoding; returns (features, positions) per level."""

    def __init__(self, backbone, position_embedding):
        super().__init__(backbone, position_embedding)
        self.strides = backbone.strides
        self.num_channels = backbone.num_channels

    def forward(self, tensor_list: NestedTensor):
        features = self[0](tensor_list)
        out: List[NestedTensor] = [features[name] for name in sorted(features)]
        pos = [self[1](x).to(x.tensors.dtype) for x in out]
        return out, pos


def training_flag_problems(args):
    """Flags of a training run that its backbone would not read (given, i.e. not at their defaults), and a random
    backbone that would never train: one message each (none with --eval, whose flags rebuild a trained model)."""
    if args.eval:
        return []
    kind = next((kind for kind, names in (("resnet", RESNETS), ("swin", SWINS), ("vit", VIT_SIZES))
                 if args.backbone in names), None)  # None: build_backbone names the unknown --backbone
    pretrained = getattr(args, "pretrained_backbone", True)
    unread = [
        (kind == "resnet" and args.drop_path_rate != DEFAULT_DROP_PATH_RATE,
         f"--drop_path_rate {args.drop_path_rate}: stochastic depth is a Swin and ViT option, --backbone "
         f"{args.backbone} has none"),
        (kind in ("resnet", "vit") and not getattr(args, "backbone_checkpoint", True),
         f"--no_backbone_checkpoint: only Swin blocks are checkpointed by default (--backbone {args.backbone}"
         + (": its blocks follow --use_checkpoint)" if kind == "vit" else ")")),
        (not pretrained and args.pretrained_backbone_path != DEFAULT_PRETRAINED_BACKBONE_PATH,
         f"--pretrained_backbone_path {args.pretrained_backbone_path} with --no_pretrained_backbone: the file "
         "would not be read"),
        (not pretrained and not args.lr_backbone > 0,
         f"--no_pretrained_backbone with --lr_backbone {args.lr_backbone}: a random backbone that never trains"),
    ]
    return [message for problem, message in unread if problem]


def build_backbone(args):
    position_embedding = build_position_encoding(args)
    train_backbone = args.lr_backbone > 0
    # the backbone gives up to three levels; further ones are made by strided convolutions in the head
    num_outputs = min(args.num_feature_levels, 3)
    if args.backbone in RESNETS:
        backbone = Backbone(args.backbone, train_backbone, num_outputs, args.dilation,
                            from_scratch=not getattr(args, "pretrained_backbone", True))
    elif args.backbone in SWINS or args.backbone in VIT_SIZES:
        if args.dilation:
            raise ValueError("--dilation applies to ResNet backbones only")
        if args.backbone in SWINS:
            use_checkpoint = args.use_checkpoint or getattr(args, "backbone_checkpoint", True)
            backbone = TransformerBackbone(args.backbone, train_backbone, num_outputs, args.drop_path_rate,
                                           use_checkpoint)
        else:  # ViT blocks are checkpointed with --use_checkpoint only, as the fork
            backbone = ViTBackbone(args.backbone, train_backbone, num_outputs, args.drop_path_rate,
                                   args.use_checkpoint)
    else:
        raise ValueError(f"unknown --backbone {args.backbone!r}; choose one of {RESNETS + SWINS + tuple(VIT_SIZES)}")
    return Joiner(backbone, position_embedding)


# --------------------------------------------------------------------------- ImageNet weights


def _explicit_resnet_weights(args):
    """The --pretrained_backbone_path given for a ResNet, or None for upstream's Swin default (use torchvision's)."""
    path = args.pretrained_backbone_path
    return None if not path or path == DEFAULT_PRETRAINED_BACKBONE_PATH else path


def _load_resnet_weights(body: ResNetBody, name: str, path):
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--pretrained_backbone_path {path} does not exist")
        state = read_weights(path, map_location="cpu")
        state = state.get("model", state.get("state_dict", state))
        source = path
    else:
        weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as err:  # offline machines end here
            raise RuntimeError(
                f"could not get the ImageNet weights of {name} ({type(err).__name__}: {err}). Download "
                f"{weights.url} and pass it with --pretrained_backbone_path, or train from random "
                "initialisation with --no_pretrained_backbone") from err
        source = weights.url
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = body.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not k.endswith("num_batches_tracked")]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise RuntimeError(f"{source} does not fit --backbone {name}: {len(missing)} tensors missing "
                           f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(mismatched)} of "
                           f"another shape {mismatched[:3]}; is it the right --pretrained_backbone_path?")
    body.load_state_dict(state, strict=False)
    print(f"loaded ImageNet weights of {name} from {source}")


def load_pretrained_backbone(model, args):
    """Load pre-trained weights (ImageNet; MAE for a ViT) into model.backbone[0] (called when training starts
    without --resume)."""
    backbone = model.backbone[0]
    if isinstance(backbone, Backbone):
        _load_resnet_weights(backbone.body, backbone.name, _explicit_resnet_weights(args))
    else:
        vit = isinstance(backbone, ViTBackbone)
        path = args.pretrained_backbone_path
        if not path or not os.path.isfile(path):
            wanted = "an MAE pre-trained ViT file" if vit else "the official Swin ImageNet file"
            raise FileNotFoundError(
                f"--pretrained_backbone_path {path!r} does not exist: {backbone.name} needs {wanted} to start "
                "training (or pass --no_pretrained_backbone)")
        if vit:
            load_mae_checkpoint(backbone.body.net, path, name=backbone.name)
        else:
            # every block of the file's Swin must be the model's: a Swin-T file in a Swin-S would leave
            # blocks random
            load_swin_checkpoint(backbone.body, path, strict=False, required_prefixes=SWIN_WEIGHT_PREFIXES)
