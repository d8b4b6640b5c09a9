"""Training and evaluation loops, and the hybrid (one-to-one + one-to-many) loss."""
import math
from contextlib import contextmanager

import torch

from datasets.coco_eval import CocoEvaluator
from datasets.data_prefetcher import data_prefetcher
from util.metric_logger import MetricLogger, SmoothedValue
from util.misc import get_total_grad_norm, reduce_dict


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


def _weighted_total(loss_dict, weight_dict):
    return sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)


def _check_finite(loss_value, loss_dict, epoch, iteration):
    """Stop on a non-finite loss, naming the terms that went bad (the last checkpoint stays as it was)."""
    if math.isfinite(loss_value):
        return
    bad = {k: float(v) for k, v in loss_dict.items() if not math.isfinite(float(v))}
    raise FloatingPointError(
        f"loss is {loss_value} at epoch {epoch}, iteration {iteration}; non-finite terms: "
        f"{', '.join(f'{k}={v}' for k, v in sorted(bad.items())) or 'none (the weighted sum overflowed)'}. "
        "Training stopped; the last saved checkpoint is unchanged (try a lower --lr or --clip_max_norm)")


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, max_norm=0.0, k_one2many=1,
                    lambda_one2many=1.0, use_wandb=False, use_fp16=False, scaler=None, print_freq=10):
    """One pass over data_loader; returns the epoch's averaged metrics."""
    model.train()
    criterion.train()
    logger = MetricLogger(delimiter="  ")
    logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    logger.add_meter("class_error", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    logger.add_meter("grad_norm", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    device = torch.device(device)
    if scaler is None:
        scaler = torch.amp.GradScaler(device.type, enabled=use_fp16)
    weight_dict = criterion.weight_dict

    prefetcher = data_prefetcher(data_loader, device, prefetch=True)
    samples, targets = prefetcher.next()
    for iteration in logger.log_every(range(len(data_loader)), print_freq, f"Epoch: [{epoch}]"):
        with torch.autocast(device.type, enabled=use_fp16):
            outputs = model(samples)
            if k_one2many > 0:
                loss_dict = train_hybrid(outputs, targets, k_one2many, criterion, lambda_one2many)
            else:
                loss_dict = criterion(outputs, targets)
        losses = _weighted_total(loss_dict, weight_dict)

        reduced = reduce_dict(loss_dict)  # for logging, averaged over processes
        reduced_scaled = {k: v * weight_dict[k] for k, v in reduced.items() if k in weight_dict}
        loss_value = sum(reduced_scaled.values()).item()
        _check_finite(loss_value, reduced, epoch, iteration)

        optimizer.zero_grad()
        scaler.scale(losses).backward()
        scaler.unscale_(optimizer)
        if max_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        else:
            grad_norm = get_total_grad_norm(model.parameters())
        scaler.step(optimizer)
        scaler.update()

        logger.update(loss=loss_value, **reduced_scaled, **{f"{k}_unscaled": v for k, v in reduced.items()})
        logger.update(class_error=reduced["class_error"], lr=optimizer.param_groups[0]["lr"], grad_norm=grad_norm)
        if use_wandb:
            import wandb

            wandb.log({k: v.item() for k, v in reduced.items()})
        samples, targets = prefetcher.next()

    logger.synchronize_between_processes()
    print("Averaged stats:", logger)
    return {k: meter.global_avg for k, meter in logger.meters.items()}


def unwrap(model):
    """The model itself, also when wrapped in DistributedDataParallel."""
    return model.module if hasattr(model, "module") else model


@contextmanager
def one2one_queries(model):
    """Evaluate with the one-to-one queries only; the query counts and train/eval mode are restored after."""
    detr = unwrap(model)
    saved = (detr.num_queries, detr.transformer.two_stage_num_proposals, model.training)
    detr.num_queries = detr.num_queries_one2one
    detr.transformer.two_stage_num_proposals = detr.num_queries
    model.eval()
    try:
        yield
    finally:
        detr.num_queries, detr.transformer.two_stage_num_proposals, training = saved
        model.train(training)


@torch.no_grad()
def evaluate(model, criterion, postprocessors, data_loader, base_ds, device, output_dir="", use_wandb=False,
             print_freq=10):
    """COCO bbox evaluation with the one-to-one queries; returns (stats, the CocoEvaluator)."""
    criterion_training = criterion.training
    criterion.eval()
    logger = MetricLogger(delimiter="  ")
    logger.add_meter("class_error", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    coco_evaluator = CocoEvaluator(base_ds, ("bbox",))
    weight_dict = criterion.weight_dict
    with one2one_queries(model):
        for samples, targets in logger.log_every(data_loader, print_freq, "Test:"):
            samples = samples.to(device)
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            outputs = model(samples)
            reduced = reduce_dict(criterion(outputs, targets))
            reduced_scaled = {k: v * weight_dict[k] for k, v in reduced.items() if k in weight_dict}
            logger.update(loss=sum(reduced_scaled.values()), **reduced_scaled,
                          **{f"{k}_unscaled": v for k, v in reduced.items()})
            logger.update(class_error=reduced["class_error"])

            orig_sizes = torch.stack([t["orig_size"] for t in targets], dim=0)
            results = postprocessors["bbox"](outputs, orig_sizes)
            coco_evaluator.update({t["image_id"].item(): r for t, r in zip(targets, results)})
    criterion.train(criterion_training)

    logger.synchronize_between_processes()
    print("Averaged stats:", logger)
    coco_evaluator.synchronize_between_processes()
    coco_evaluator.accumulate()
    coco_evaluator.summarize()
    stats = {k: meter.global_avg for k, meter in logger.meters.items()}
    stats["coco_eval_bbox"] = coco_evaluator.coco_eval["bbox"].stats.tolist()
    if use_wandb:
        import wandb

        wandb.log({"AP": stats["coco_eval_bbox"][0], "AP50": stats["coco_eval_bbox"][1]})
    return stats, coco_evaluator
