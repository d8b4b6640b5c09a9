"""H-Deformable-DETR: the detector (one-to-one and one-to-many query groups), post-processing and build()."""
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from util import box_ops
from util.amp import float32_call, to_float32
from util.box_ops import refine_boxes
from util.misc import NestedTensor, downsample_mask, nested_tensor_from_tensor_list

from .backbone import build_backbone
from .criterion import build_criterion
from .deformable_transformer import build_deformable_transformer
from .matcher import build_matcher


class MLP(nn.Module):
    """Feed-forward network: num_layers linear layers with ReLU between them."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        self.num_layers = num_layers
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


class DeformableDETR(nn.Module):
    """Deformable DETR with the hybrid branch.

    The first num_queries_one2one queries are trained with one-to-one matching and used at evaluation; the
    following num_queries_one2many are trained against repeated targets (see criterion.HybridCriterion). In eval
    mode (or with forward(..., one2one_only=True)) only the one-to-one queries run.
    """

    def __init__(self, backbone, transformer, num_classes, num_feature_levels, aux_loss=True, with_box_refine=False,
                 two_stage=False, num_queries_one2one=300, num_queries_one2many=0, mixed_selection=False):
        super().__init__()
        if two_stage and not with_box_refine:
            raise ValueError("--two_stage needs --with_box_refine (two-stage Deformable DETR is built on "
                             "iterative box refinement, as upstream)")
        self.num_queries = num_queries_one2one + num_queries_one2many
        self.num_queries_one2one = num_queries_one2one
        self.transformer = transformer
        hidden_dim = transformer.d_model
        self.num_feature_levels = num_feature_levels
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage
        self.mixed_selection = mixed_selection

        # registered in upstream's order, so that parameters (and optimizer states) line up with its checkpoints
        self.class_embed = class_embed = nn.Linear(hidden_dim, num_classes)
        self.bbox_embed = bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        if not two_stage:
            self.query_embed = nn.Embedding(self.num_queries, hidden_dim * 2)  # (position, content)
        elif mixed_selection:
            self.query_embed = nn.Embedding(self.num_queries, hidden_dim)  # content only
        self.input_proj = self._input_projections(backbone, hidden_dim, num_feature_levels)
        self.backbone = backbone

        prior_prob = 0.01
        nn.init.constant_(class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        # one head per decoder layer, plus one for the encoder proposals in two-stage
        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        if with_box_refine:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
            # the decoder refines its reference boxes with the same heads
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList(class_embed for _ in range(num_pred))  # shared
            self.bbox_embed = nn.ModuleList(bbox_embed for _ in range(num_pred))
            self.transformer.decoder.bbox_embed = None
        if two_stage:
            self.transformer.decoder.class_embed = self.class_embed
            for box_embed in self.bbox_embed:
                nn.init.constant_(box_embed.layers[-1].bias[2:], 0.0)

    @staticmethod
    def _input_projections(backbone, hidden_dim, num_feature_levels):
        """1x1 conv + GroupNorm per backbone level; extra levels are 3x3 stride-2 convs on the last map."""
        projections = []
        in_channels = backbone.num_channels[-1]
        for channels in backbone.num_channels:
            projections.append(nn.Sequential(nn.Conv2d(channels, hidden_dim, kernel_size=1),
                                             nn.GroupNorm(32, hidden_dim)))
        for _ in range(num_feature_levels - len(backbone.num_channels)):
            projections.append(nn.Sequential(nn.Conv2d(in_channels, hidden_dim, kernel_size=3, stride=2, padding=1),
                                             nn.GroupNorm(32, hidden_dim)))
            in_channels = hidden_dim
        return nn.ModuleList(projections)

    def _multi_scale_inputs(self, samples: NestedTensor):
        """Projected feature maps, their padding masks and position encodings, one per level."""
        features, pos = self.backbone(samples)
        srcs, masks = [], []
        for level, feat in enumerate(features):
            src, mask = feat.decompose()
            srcs.append(self.input_proj[level](src))
            masks.append(mask)
        for level in range(len(features), self.num_feature_levels):
            src = self.input_proj[level](features[-1].tensors if level == len(features) else srcs[-1])
            mask = downsample_mask(samples.mask, src.shape[-2:])
            pos.append(self.backbone[1](NestedTensor(src, mask)).to(src.dtype))
            srcs.append(src)
            masks.append(mask)
        return srcs, masks, pos

    def forward(self, samples, one2one_only=None):
        """samples: a NestedTensor or a list of [3, H, W] images; one2one_only: run the one-to-one queries alone
        (default: in eval mode, as evaluation does; train mode runs both groups).

        Returns "pred_logits" [B, Q1, K] and "pred_boxes" [B, Q1, 4] (normalised cxcywh) of the one-to-one
        queries, "aux_outputs" (earlier decoder layers) and, in two-stage, "enc_outputs" (encoder proposals); when
        the one-to-many queries run, also "pred_logits_one2many"/"pred_boxes_one2many" [B, Q2, ...] and
        "aux_outputs_one2many".
        """
        if one2one_only is None:
            one2one_only = not self.training
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(samples)
        srcs, masks, pos = self._multi_scale_inputs(samples)

        # upstream's scripts lower `num_queries` to num_queries_one2one for evaluation; that keeps working
        num_queries = min(self.num_queries, self.num_queries_one2one) if one2one_only else self.num_queries
        split = min(self.num_queries_one2one, num_queries)
        query_embeds = None
        if not self.two_stage or self.mixed_selection:
            query_embeds = self.query_embed.weight[:num_queries]
        # the one-to-one and one-to-many queries never attend to each other
        query_groups = (split, num_queries - split)

        hs, init_reference, inter_references, enc_outputs_class, enc_outputs_coord_unact, box_deltas = \
            self.transformer(srcs, masks, pos, query_embeds, query_groups, num_queries)

        # per decoder layer, split into the one-to-one and one-to-many groups before stacking (upstream's order,
        # which keeps the gradients bit-identical to upstream's)
        one2one_class, one2many_class, one2one_coord, one2many_coord = [], [], [], []
        group_sizes = [split, num_queries - split]
        for level in range(len(hs)):
            reference = init_reference if level == 0 else inter_references[level - 1]
            outputs_class = self.class_embed[level](hs[level])  # [B, Q, K]
            # with box refinement the decoder has applied this layer's box head already: the same deltas
            delta = float32_call(self.bbox_embed[level], hs[level]) if box_deltas is None else box_deltas[level]
            outputs_coord = refine_boxes(delta, reference)  # [B, Q, 4]
            class_one2one, class_one2many = outputs_class.split(group_sizes, 1)  # [B, Q1 | Q2, K]
            coord_one2one, coord_one2many = outputs_coord.split(group_sizes, 1)  # [B, Q1 | Q2, 4]
            one2one_class.append(class_one2one)
            one2many_class.append(class_one2many)
            one2one_coord.append(coord_one2one)
            one2many_coord.append(coord_one2many)
        out = self._group_outputs(one2one_class, one2one_coord)
        if num_queries > split:
            one2many = self._group_outputs(one2many_class, one2many_coord)
            out.update({f"{k}_one2many": v for k, v in one2many.items()})
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": enc_outputs_class, "pred_boxes": enc_outputs_coord_unact.sigmoid()}
        return out

    def _group_outputs(self, per_layer_class, per_layer_coord):
        """"pred_logits" and "pred_boxes" of the last layer and, with aux_loss, "aux_outputs" of the others."""
        outputs_class, outputs_coord = torch.stack(per_layer_class), torch.stack(per_layer_coord)  # [D, B, Q, *]
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = self._set_aux_loss(outputs_class, outputs_coord)
        return out

    @staticmethod
    def _set_aux_loss(outputs_class, outputs_coord):
        return [{"pred_logits": a, "pred_boxes": b} for a, b in zip(outputs_class[:-1], outputs_coord[:-1])]


class PostProcess(nn.Module):
    """Turn the one-to-one outputs into COCO-style detections: the top-k (query, class) pairs per image."""

    def __init__(self, topk=100):
        super().__init__()
        self.topk = topk

    @torch.no_grad()
    def forward(self, outputs, target_sizes):
        """target_sizes [B, 2] (h, w): the original image sizes for evaluation. Returns per image "scores" [k],
        "labels" [k] and "boxes" [k, 4] (absolute xyxy).
        """
        scores, labels, boxes = self.top_detections(outputs, target_sizes)
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]

    def top_detections(self, outputs, target_sizes):
        """The batched computation of forward (also what an ONNX export runs): scores [B, k], labels [B, k] and
        boxes [B, k, 4] (absolute xyxy), in float32 for outputs of a model run under autocast too."""
        out_logits, out_bbox = to_float32(outputs["pred_logits"]), to_float32(outputs["pred_boxes"])
        # shapes, not len(): len() would fix the batch size of an exported graph
        if target_sizes.dim() != 2 or target_sizes.shape[0] != out_logits.shape[0] or target_sizes.shape[1] != 2:
            raise ValueError(f"PostProcess: target_sizes must be [{out_logits.shape[0]}, 2], got "
                             f"{tuple(target_sizes.shape)}")
        batch, num_queries, num_classes = out_logits.shape
        prob = out_logits.sigmoid()
        k = min(self.topk, num_queries * num_classes)
        scores, topk_indexes = torch.topk(prob.view(batch, -1), k, dim=1)
        topk_boxes = topk_indexes // num_classes
        labels = topk_indexes % num_classes
        boxes = box_ops.box_cxcywh_to_xyxy(out_bbox)
        boxes = torch.gather(boxes, 1, topk_boxes.unsqueeze(-1).repeat(1, 1, 4))
        img_h, img_w = target_sizes.unbind(1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1)
        return scores, labels, boxes * scale[:, None, :]


def _reject_unsupported(args):
    """Upstream DETR leftovers that never worked with the deformable model stop here with a clear message."""
    if getattr(args, "masks", False):
        raise NotImplementedError("--masks (segmentation) is not supported by H-Deformable-DETR")
    if getattr(args, "dataset_file", "coco") == "coco_panoptic":
        raise NotImplementedError("--dataset_file coco_panoptic is not supported by H-Deformable-DETR")
    if getattr(args, "frozen_weights", None) is not None:
        raise NotImplementedError("--frozen_weights (training a mask head on a frozen detector) is not supported "
                                  "by H-Deformable-DETR")


def _check_hybrid_flags(args):
    if args.num_queries_one2many > 0 and args.k_one2many <= 0:
        raise ValueError(f"--num_queries_one2many {args.num_queries_one2many} needs --k_one2many > 0 (how many "
                         f"times the ground truth is repeated for the one-to-many queries), got {args.k_one2many}; "
                         "pass --num_queries_one2many 0 to train without the hybrid branch")


def build(args):
    _reject_unsupported(args)
    _check_hybrid_flags(args)
    num_classes = getattr(args, "num_classes", None) or (91 if args.dataset_file == "coco" else 20)
    backbone = build_backbone(args)
    transformer = build_deformable_transformer(args)
    model = DeformableDETR(
        backbone,
        transformer,
        num_classes=num_classes,
        num_feature_levels=args.num_feature_levels,
        aux_loss=args.aux_loss,
        with_box_refine=args.with_box_refine,
        two_stage=args.two_stage,
        num_queries_one2one=args.num_queries_one2one,
        num_queries_one2many=args.num_queries_one2many,
        mixed_selection=args.mixed_selection,
    )
    criterion = build_criterion(args, num_classes, build_matcher(args))
    criterion.to(torch.device(args.device))
    postprocessors = {"bbox": PostProcess(topk=args.topk)}
    return model, criterion, postprocessors
