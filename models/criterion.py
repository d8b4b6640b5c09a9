"""SetCriterion: Hungarian-matched sigmoid focal, L1 and GIoU losses on the final, auxiliary and encoder outputs."""
import torch
import torch.nn.functional as F
from torch import nn

from util import box_ops
from util.misc import accuracy, get_world_size, is_dist_avail_and_initialized


def sigmoid_focal_loss(inputs, targets, num_boxes, alpha: float = 0.25, gamma: float = 2):
    """Focal loss (RetinaNet) on logits [B, Q, K] against 0/1 targets, averaged over queries, / num_boxes."""
    prob = inputs.sigmoid()
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
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
        # background queries get the extra class num_classes, dropped from the one-hot below
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64,
                                    device=src_logits.device)
        target_classes[idx] = target_classes_o
        onehot = torch.zeros([*src_logits.shape[:2], src_logits.shape[2] + 1], dtype=src_logits.dtype,
                             device=src_logits.device)
        onehot.scatter_(2, target_classes.unsqueeze(-1), 1)
        onehot = onehot[:, :, :-1]
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
        giou = box_ops.generalized_box_iou(box_ops.box_cxcywh_to_xyxy(src_boxes),
                                           box_ops.box_cxcywh_to_xyxy(target_boxes))
        loss_giou = 1 - torch.diag(giou)
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

    def _losses_for(self, outputs, targets, num_boxes, suffix=""):
        indices = self.matcher(outputs, targets)
        losses = {}
        for loss in self.losses:
            kwargs = {"log": False} if loss == "labels" and suffix else {}
            losses.update(self.get_loss(loss, outputs, targets, indices, num_boxes, **kwargs))
        return {k + suffix: v for k, v in losses.items()}

    def forward(self, outputs, targets):
        """outputs: the model's dict ("pred_logits", "pred_boxes", optional "aux_outputs", "enc_outputs");
        targets: per image dicts with "labels" and "boxes". Returns {loss name: scalar tensor}.
        """
        num_boxes = self._average_num_boxes(targets, outputs["pred_logits"].device)
        losses = self._losses_for(outputs, targets, num_boxes)
        for i, aux_outputs in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._losses_for(aux_outputs, targets, num_boxes, suffix=f"_{i}"))
        if "enc_outputs" in outputs:
            # proposals are scored class-agnostically: every target is class 0
            bin_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            losses.update(self._losses_for(outputs["enc_outputs"], bin_targets, num_boxes, suffix="_enc"))
        return losses
