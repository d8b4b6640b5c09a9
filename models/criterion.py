"""The training loss: SetCriterion (Hungarian-matched sigmoid focal, L1 and GIoU losses on the final, auxiliary and
encoder outputs), HybridCriterion (both query groups, the one-to-many one against repeated targets), the loss
weights and their weighted sum."""
import torch
import torch.nn.functional as F
from torch import nn

from util import box_ops
from util.misc import accuracy, get_world_size, is_dist_avail_and_initialized


def sigmoid_focal_loss(inputs, targets, num_boxes, alpha: float = 0.25, gamma: float = 2):
    """Focal loss (RetinaNet) on logits [B, Q, K] against 0/1 targets, averaged over queries, / num_boxes.

    Written for 0/1 targets: 1 - p_t (p_t the probability given to the true label) is |targets - p|, and alpha_t
    is alpha on positives, 1 - alpha on negatives; the same function as upstream's expressions in fewer passes
    (tests/test_equivalence.py).
    """
    prob = inputs.sigmoid()
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    loss = ce_loss * ((targets - prob).abs() ** gamma)
    if alpha >= 0:
        loss = torch.where(targets > 0.5, loss.new_tensor(alpha), loss.new_tensor(1 - alpha)) * loss
    return loss.mean(1).sum() / num_boxes


def _matched_prediction_index(indices):
    """(batch index, query index) of every matched prediction."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx, src_idx


class SetCriterion(nn.Module):
    """Match predictions to targets, then apply the requested losses ("labels", "boxes", "cardinality").

    Auxiliary decoder outputs get the same losses with suffix _<layer>; two-stage encoder proposals get them
    with suffix _enc, matched class-agnostically.
    """

    def __init__(self, num_classes, matcher, weight_dict, losses, focal_alpha=0.25):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.losses = losses
        self.focal_alpha = focal_alpha

    def loss_labels(self, outputs, targets, indices, num_boxes, log=True):
        """Sigmoid focal loss over all queries and classes; class_error (%) of the matched queries when logging."""
        src_logits = outputs["pred_logits"]
        idx = _matched_prediction_index(indices)
        target_classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        # one-hot targets [B, Q, K]: each matched query's class, all zeros for the unmatched (background)
        onehot = torch.zeros_like(src_logits)
        onehot[(*idx, target_classes_o)] = 1
        loss_ce = sigmoid_focal_loss(src_logits, onehot, num_boxes, alpha=self.focal_alpha, gamma=2)
        losses = {"loss_ce": loss_ce * src_logits.shape[1]}
        if log:
            losses["class_error"] = 100 - accuracy(src_logits[idx], target_classes_o)[0]
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices, num_boxes):
        """Logging only: |number of queries whose best class is not the last one - number of targets|."""
        pred_logits = outputs["pred_logits"]
        target_lengths = torch.as_tensor([len(t["labels"]) for t in targets], device=pred_logits.device)
        card_pred = (pred_logits.argmax(-1) != pred_logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(card_pred.float(), target_lengths.float())}

    def loss_boxes(self, outputs, targets, indices, num_boxes):
        """L1 and GIoU losses of the matched boxes (normalised cxcywh)."""
        idx = _matched_prediction_index(indices)
        src_boxes = outputs["pred_boxes"][idx]
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")
        giou = box_ops.paired_generalized_box_iou(box_ops.box_cxcywh_to_xyxy(src_boxes),
                                                  box_ops.box_cxcywh_to_xyxy(target_boxes))
        loss_giou = 1 - giou
        return {"loss_bbox": loss_bbox.sum() / num_boxes, "loss_giou": loss_giou.sum() / num_boxes}

    def get_loss(self, loss, outputs, targets, indices, num_boxes, **kwargs):
        loss_map = {"labels": self.loss_labels, "cardinality": self.loss_cardinality, "boxes": self.loss_boxes}
        if loss not in loss_map:
            raise ValueError(f"unknown loss {loss!r}; choose from {sorted(loss_map)}")
        return loss_map[loss](outputs, targets, indices, num_boxes, **kwargs)

    def _average_num_boxes(self, targets, device):
        """Number of target boxes averaged over processes (at least 1), the normaliser of every loss."""
        num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        if is_dist_avail_and_initialized():
            torch.distributed.all_reduce(num_boxes)
        return torch.clamp(num_boxes / get_world_size(), min=1).item()

    def _losses_for(self, outputs, targets, num_boxes, suffix="", repeats=1):
        indices = self.matcher(outputs, targets, repeats=repeats)
        losses = {}
        for loss in self.losses:
            kwargs = {"log": False} if loss == "labels" and suffix else {}
            losses.update(self.get_loss(loss, outputs, targets, indices, num_boxes, **kwargs))
        return {k + suffix: v for k, v in losses.items()}

    def forward(self, outputs, targets, repeats=1):
        """outputs: the model's dict ("pred_logits", "pred_boxes", optional "aux_outputs", "enc_outputs");
        targets: per image dicts with "labels" and "boxes"; repeats: each image's targets are its boxes repeated
        that many times (the one-to-many group's), which the matcher costs once. Returns {loss name: scalar}.
        """
        if len(targets) != outputs["pred_logits"].shape[0]:
            raise ValueError(f"SetCriterion: {len(targets)} target dicts for a batch of "
                             f"{outputs['pred_logits'].shape[0]} images (one per image, empty for an image without "
                             "objects)")
        num_boxes = self._average_num_boxes(targets, outputs["pred_logits"].device)
        losses = self._losses_for(outputs, targets, num_boxes, repeats=repeats)
        for i, aux_outputs in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._losses_for(aux_outputs, targets, num_boxes, suffix=f"_{i}", repeats=repeats))
        if "enc_outputs" in outputs:
            # proposals are scored class-agnostically: every target is class 0
            bin_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            losses.update(self._losses_for(outputs["enc_outputs"], bin_targets, num_boxes, suffix="_enc"))
        return losses


def loss_weights(args):
    """Weights of every loss term: final layer, auxiliary layers _0.._{D-2}, encoder _enc, and their _one2many.

    The _enc terms are weighted whenever there are encoder proposals (upstream dropped them with --no_aux_loss,
    leaving the proposal heads untrained).
    """
    base = {"loss_ce": args.cls_loss_coef, "loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef}
    weight_dict = dict(base)
    if args.aux_loss:
        for i in range(args.dec_layers - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
    if args.aux_loss or args.two_stage:
        weight_dict.update({f"{k}_enc": v for k, v in base.items()})
    hybrid = {}
    for key, value in weight_dict.items():
        hybrid[key] = value
        hybrid[key + "_one2many"] = value
    return hybrid


def weighted_losses(loss_dict, weight_dict):
    """({name: loss * weight} for the terms that have a weight, their sum): what training minimises and logs."""
    scaled = {k: v * weight_dict[k] for k, v in loss_dict.items() if k in weight_dict}
    return scaled, sum(scaled.values())


ONE2MANY_OUTPUTS = {"pred_logits_one2many": "pred_logits", "pred_boxes_one2many": "pred_boxes",
                    "aux_outputs_one2many": "aux_outputs"}


class HybridCriterion(nn.Module):
    """The loss of H-Deformable-DETR: the one-to-one group (and the encoder proposals) against the targets, and,
    when the outputs hold one-to-many predictions and k_one2many > 0, the one-to-many group against the targets
    repeated k_one2many times, its terms scaled by lambda_one2many and suffixed _one2many.

    Returns one loss dict; `weighted(loss_dict)` gives the weighted terms and the total that training minimises.
    """

    def __init__(self, criterion: SetCriterion, k_one2many=0, lambda_one2many=1.0):
        super().__init__()
        if k_one2many < 0:
            raise ValueError(f"k_one2many must be >= 0, got {k_one2many}")
        self.criterion = criterion
        self.k_one2many = k_one2many
        self.lambda_one2many = lambda_one2many

    @property
    def weight_dict(self):
        return self.criterion.weight_dict

    @property
    def matcher(self):
        return self.criterion.matcher

    def weighted(self, loss_dict):
        return weighted_losses(loss_dict, self.weight_dict)

    def forward(self, outputs, targets):
        loss_dict = self.criterion(outputs, targets)
        one2many = {ours: outputs[theirs] for theirs, ours in ONE2MANY_OUTPUTS.items() if theirs in outputs}
        if self.k_one2many == 0 or "pred_logits" not in one2many or one2many["pred_logits"].shape[1] == 0:
            return loss_dict
        repeated = [{**t, "boxes": t["boxes"].repeat(self.k_one2many, 1),
                     "labels": t["labels"].repeat(self.k_one2many)} for t in targets]
        for key, value in self.criterion(one2many, repeated, repeats=self.k_one2many).items():
            loss_dict[key + "_one2many"] = value * self.lambda_one2many
        return loss_dict


def build_criterion(args, num_classes, matcher):
    """The training loss of the parsed arguments: a HybridCriterion around the SetCriterion."""
    criterion = SetCriterion(num_classes, matcher, loss_weights(args), ["labels", "boxes", "cardinality"],
                             focal_alpha=args.focal_alpha)
    return HybridCriterion(criterion, args.k_one2many, args.lambda_one2many)
