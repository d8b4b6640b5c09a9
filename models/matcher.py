"""Hungarian matching between predictions and ground truth (focal-style class cost, L1 and GIoU box costs)."""
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising
    cost_class * focal class cost + cost_bbox * L1 + cost_giou * (-GIoU); unmatched queries are background.
    """

    def __init__(self, cost_class: float = 1, cost_bbox: float = 1, cost_giou: float = 1,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all matching costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def cost_matrix(self, logits, boxes, tgt_ids, tgt_boxes):
        """Matching costs [Q, T] of one image's queries (logits [Q, K], cxcywh boxes [Q, 4]) against its targets."""
        prob = logits.sigmoid()[:, tgt_ids]  # [Q, T]
        # focal class cost: the focal loss of calling the query positive minus that of calling it negative
        alpha, gamma = self.focal_alpha, self.focal_gamma
        neg_cost = (1 - alpha) * (prob ** gamma) * (-(1 - prob + 1e-8).log())
        pos_cost = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
        cost_class = pos_cost - neg_cost
        cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        return self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou

    @torch.no_grad()
    def forward(self, outputs, targets, repeats=1):
        """outputs: "pred_logits" [B, Q, K], "pred_boxes" [B, Q, 4] (cxcywh); targets: per image "labels" [T_i]
        and "boxes" [T_i, 4]. Returns per image (query indices, target indices), each of length min(Q, T_i).

        Each image's queries are costed against its own targets only; the costs reach the CPU in one transfer.
        repeats: every image's targets are its first T_i / repeats targets repeated that many times (as the
        one-to-many group's are), so their costs are computed once and tiled: the same matrix, the same matching.
        """
        num_queries = outputs["pred_logits"].shape[1]
        sizes = [len(t["boxes"]) for t in targets]
        if any(size % repeats for size in sizes):
            raise ValueError(f"HungarianMatcher: {sizes} targets per image are not {repeats} repeats of each image's")
        unique = [size // repeats for size in sizes]
        blocks = [self.cost_matrix(logits, boxes, t["labels"][:n], t["boxes"][:n]).flatten()
                  for logits, boxes, t, n in zip(outputs["pred_logits"], outputs["pred_boxes"], targets, unique)]
        costs = torch.cat(blocks).cpu().split([num_queries * n for n in unique])
        # [Q, n] -> [Q, n * repeats]: the columns of boxes.repeat(repeats, 1)
        indices = [linear_sum_assignment(c.view(num_queries, n).repeat(1, repeats)) for c, n in zip(costs, unique)]
        return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices]


def build_matcher(args):
    return HungarianMatcher(cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox,
                            cost_giou=args.set_cost_giou)
