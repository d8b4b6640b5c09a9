"""Training and evaluation loops, and the hybrid (one-to-one + one-to-many) loss."""


def train_hybrid(outputs, targets, k_one2many, criterion, lambda_one2many):
    """Losses of both query groups: one-to-one against the targets, one-to-many against the targets repeated
    k_one2many times. The one-to-many terms are scaled by lambda_one2many and suffixed _one2many.
    """
    loss_dict = criterion(outputs, targets)
    multi_targets = [
        {**t, "boxes": t["boxes"].repeat(k_one2many, 1), "labels": t["labels"].repeat(k_one2many)} for t in targets
    ]
    outputs_one2many = {
        "pred_logits": outputs["pred_logits_one2many"],
        "pred_boxes": outputs["pred_boxes_one2many"],
    }
    if "aux_outputs_one2many" in outputs:
        outputs_one2many["aux_outputs"] = outputs["aux_outputs_one2many"]
    for key, value in criterion(outputs_one2many, multi_targets).items():
        loss_dict[key + "_one2many"] = value * lambda_one2many
    return loss_dict
