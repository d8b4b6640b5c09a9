"""Upstream's operation order, the oracle of tests/test_equivalence.py.

The product computes each of these operations in a faster form proven equal in float64; here they are written as
upstream computes them, and `upstream_operations()` runs the model and its loss with them by replacing the
product's module attributes for the duration of a block:

- query self-attention: a masked nn.MultiheadAttention over all queries (product: one dense attention per group);
- the feed-forward blocks: autograd's Linear / ReLU / Linear (product: the ReLU and its gradient in place);
- deformable attention: upstream's module forward, sampling locations as [.., P, 2] expressions and the
  grid_sample path (product: one addcdiv / addcmul, and the compiled op where it loads);
- the detection head recomputes the box heads' outputs (product: reuses the decoder's);
- matching: one batched cost matrix over every query and target, its diagonal blocks assigned (product: per image,
  repeated targets costed once);
- the focal loss in upstream's expressions, the matched pairs' GIoU as the diagonal of the pairwise matrix.
"""
import functools
from collections import Counter
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

import util.box_ops
from models import criterion, deformable_transformer
from models.deformable_transformer import DeformableTransformerDecoder
from models.matcher import HungarianMatcher
from models.ops.functions import ms_deform_attn_core_pytorch, ms_deform_attn_func
from models.ops.modules import MSDeformAttn
from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


def query_self_attention(attn, query_key, value, groups=None):
    """Decoder self-attention [B, Q, C] as upstream's decoder layer: the sequence-first nn.MultiheadAttention over
    all queries, a query attending only to its own group (sizes `groups`, zeros allowed; None: one group)."""
    num_queries = query_key.shape[1]
    groups = [num_queries] if groups is None else [int(g) for g in groups if g > 0]
    mask = None
    if len(groups) > 1:
        mask = torch.ones(num_queries, num_queries, dtype=torch.bool, device=query_key.device)
        start = 0
        for size in groups:
            mask[start:start + size, start:start + size] = False
            start += size
    qk_first = query_key.transpose(0, 1)  # [Q, B, C]
    return attn(qk_first, qk_first, value.transpose(0, 1), attn_mask=mask)[0].transpose(0, 1)


def feed_forward(linear1, linear2, activation, dropout, x):
    """The transformer layers' feed-forward block through autograd's modules."""
    return linear2(dropout(activation(linear1(x))))


def sampling_locations(reference_points, offsets, spatial_shapes, n_points):
    """Upstream's sampling locations [N, Lq, M, L, P, 2] from reference points [N, Lq, L, 2] (offsets in pixels of
    each level) or boxes [N, Lq, L, 4] (offsets relative to the box), offsets [N, Lq, M, L, P, 2]."""
    if reference_points.shape[-1] == 2:
        normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)  # [L, 2] (W, H)
        return reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    return (reference_points[:, :, None, :, None, :2]
            + offsets / n_points * reference_points[:, :, None, :, None, 2:] * 0.5)


def msdeform_attn_forward(self, query, reference_points, input_flatten, input_spatial_shapes,
                          input_level_start_index, input_padding_mask=None, level_sizes=None):
    """MSDeformAttn.forward as upstream writes it, on the grid_sample path (level_sizes, ours, is not used: upstream
    reads the sizes from input_spatial_shapes)."""
    batch, num_queries, _ = query.shape
    value = self.value_proj(input_flatten)
    if input_padding_mask is not None:
        value = value.masked_fill(input_padding_mask[..., None], 0.0)
    value = value.view(batch, input_flatten.shape[1], self.n_heads, self.d_model // self.n_heads)
    offsets = self.sampling_offsets(query).view(batch, num_queries, self.n_heads, self.n_levels, self.n_points, 2)
    weights = self.attention_weights(query).view(batch, num_queries, self.n_heads, self.n_levels * self.n_points)
    weights = F.softmax(weights, -1).view(batch, num_queries, self.n_heads, self.n_levels, self.n_points)
    locations = sampling_locations(reference_points, offsets, input_spatial_shapes, self.n_points)
    return self.output_proj(ms_deform_attn_core_pytorch(value, input_spatial_shapes, locations, weights))


def sigmoid_focal_loss(inputs, targets, num_boxes, alpha: float = 0.25, gamma: float = 2):
    """Upstream's focal loss on logits [B, Q, K] against 0/1 targets, averaged over queries, / num_boxes."""
    prob = inputs.sigmoid()
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_boxes


def paired_generalized_box_iou(boxes1, boxes2):
    """The GIoU of matched pairs as upstream's loss takes it: the diagonal of the pairwise [N, N] matrix."""
    return torch.diag(generalized_box_iou(boxes1, boxes2))


def matching_costs(matcher, outputs, targets):
    """Upstream's cost matrix: every query of the batch against every target of the batch, [B, Q, sum T_i]."""
    batch, num_queries = outputs["pred_logits"].shape[:2]
    prob = outputs["pred_logits"].flatten(0, 1).sigmoid()  # [B*Q, K]
    boxes = outputs["pred_boxes"].flatten(0, 1)
    tgt_ids = torch.cat([t["labels"] for t in targets])
    tgt_boxes = torch.cat([t["boxes"] for t in targets])
    alpha, gamma = matcher.focal_alpha, matcher.focal_gamma
    neg_cost = (1 - alpha) * (prob ** gamma) * (-(1 - prob + 1e-8).log())
    pos_cost = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
    cost_class = pos_cost[:, tgt_ids] - neg_cost[:, tgt_ids]
    cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
    cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
    cost = matcher.cost_bbox * cost_bbox + matcher.cost_class * cost_class + matcher.cost_giou * cost_giou
    return cost.view(batch, num_queries, -1)


@torch.no_grad()
def matcher_forward(self, outputs, targets, repeats=1):
    """HungarianMatcher.forward as upstream: the batched cost matrix, each image's diagonal block assigned
    (repeated targets costed in full)."""
    blocks = matching_costs(self, outputs, targets).cpu().split([len(t["boxes"]) for t in targets], -1)
    indices = [linear_sum_assignment(block[i]) for i, block in enumerate(blocks)]
    return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices]


def _decoder_forward_without_box_deltas(forward):
    """The decoder's forward returning no box-head outputs, so that the detection head recomputes them."""
    def recomputing(self, *args, **kwargs):
        hs, references, _ = forward(self, *args, **kwargs)
        return hs, references, None
    return recomputing


# (owner, attribute, upstream's form): the product's attributes that upstream_operations() replaces
UPSTREAM_FORMS = [
    (deformable_transformer, "query_self_attention", query_self_attention),
    (deformable_transformer, "feed_forward", feed_forward),
    (DeformableTransformerDecoder, "forward",
     _decoder_forward_without_box_deltas(DeformableTransformerDecoder.forward)),
    (MSDeformAttn, "forward", msdeform_attn_forward),
    (HungarianMatcher, "forward", matcher_forward),
    (criterion, "sigmoid_focal_loss", sigmoid_focal_loss),
    (util.box_ops, "paired_generalized_box_iou", paired_generalized_box_iou),
]


def form_name(owner, attribute):
    """"feed_forward" of models.deformable_transformer -> "deformable_transformer.feed_forward"."""
    return f"{owner.__name__.rpartition('.')[2]}.{attribute}"


def _counted(calls, name, form):
    @functools.wraps(form)
    def counting(*args, **kwargs):
        calls[name] += 1
        return form(*args, **kwargs)
    return counting


@contextmanager
def upstream_operations():
    """Within the block the model, its matcher and its loss run upstream's forms (UPSTREAM_FORMS), and the
    deformable-attention op takes its PyTorch path wherever it is called; the product's attributes are restored
    afterwards. Yields a Counter of the calls of each form (by form_name), so that a test can tell that every one
    ran."""
    calls = Counter()
    with pytest.MonkeyPatch.context() as patch:
        for owner, attribute, form in UPSTREAM_FORMS:
            patch.setattr(owner, attribute, _counted(calls, form_name(owner, attribute), form))
        patch.setattr(ms_deform_attn_func, "use_compiled", lambda value: False)
        yield calls
