"""Training and evaluation loops (the hybrid loss itself is models.criterion.HybridCriterion)."""
import math

import torch

from datasets.coco_eval import CocoEvaluator
from datasets.data_prefetcher import data_prefetcher
from models.criterion import HybridCriterion, weighted_losses
from util.metric_logger import MetricLogger, SmoothedValue
from util.misc import get_total_grad_norm, is_dist_avail_and_initialized, reduce_dict


def train_hybrid(outputs, targets, k_one2many, criterion, lambda_one2many):
    """Upstream's entry to the hybrid loss (kept for scripts that call it): the loss dict of
    models.criterion.HybridCriterion with the given k_one2many and lambda_one2many, around `criterion` (a
    SetCriterion, or the HybridCriterion that build_model returns)."""
    criterion = criterion.criterion if isinstance(criterion, HybridCriterion) else criterion
    return HybridCriterion(criterion, k_one2many, lambda_one2many)(outputs, targets)


STOPPED = "Training stopped; the last saved checkpoint is unchanged (try a lower --lr or --clip_max_norm)"


def _check_finite(loss_value, loss_dict, epoch, iteration):
    """Stop on a non-finite loss, naming the terms that went bad (the last checkpoint stays as it was)."""
    if math.isfinite(loss_value):
        return
    bad = {k: float(v) for k, v in loss_dict.items() if not math.isfinite(float(v))}
    raise FloatingPointError(
        f"loss is {loss_value} at epoch {epoch}, iteration {iteration}; non-finite terms: "
        f"{', '.join(f'{k}={v}' for k, v in sorted(bad.items())) or 'none (the weighted sum overflowed)'}. "
        + STOPPED)


def _output_tensors(outputs, prefix=""):
    """(name, tensor) of every tensor in the model's nested output dict."""
    if isinstance(outputs, dict):
        return [item for key, value in outputs.items() for item in _output_tensors(value, f"{prefix}{key}.")]
    if isinstance(outputs, (list, tuple)):
        return [item for i, value in enumerate(outputs) for item in _output_tensors(value, f"{prefix}{i}.")]
    return [(prefix[:-1], outputs)] if torch.is_tensor(outputs) else []


def _check_outputs_finite(outputs, epoch, iteration):
    """Stop when the model's outputs hold inf or nan (diverged weights), on every process at once, before the
    matcher meets the broken boxes; the message names the outputs and the epoch and iteration."""
    named = _output_tensors(outputs)
    finite = torch.stack([tensor.detach().isfinite().all() for _, tensor in named])
    everywhere = finite.all().float()
    if is_dist_avail_and_initialized():
        torch.distributed.all_reduce(everywhere, op=torch.distributed.ReduceOp.MIN)
    if everywhere.item() < 1:
        bad = [name for (name, _), ok in zip(named, finite.tolist()) if not ok]
        raise FloatingPointError(
            f"the model's outputs are not finite at epoch {epoch}, iteration {iteration} "
            f"({', '.join(bad[:6]) or 'on another process'}): the weights diverged. " + STOPPED)


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, max_norm=0.0, use_wandb=False,
                    use_fp16=False, scaler=None, print_freq=10):
    """One pass over data_loader, minimising the weighted sum of criterion's losses (build_model's
    HybridCriterion trains both query groups); returns the epoch's averaged metrics."""
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
            _check_outputs_finite(outputs, epoch, iteration)
            loss_dict = criterion(outputs, targets)
        _, losses = weighted_losses(loss_dict, weight_dict)

        reduced = reduce_dict(loss_dict)  # for logging, averaged over processes
        reduced_scaled, reduced_total = weighted_losses(reduced, weight_dict)
        loss_value = reduced_total.item()
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


@torch.no_grad()
def evaluate(model, criterion, postprocessors, data_loader, base_ds, device, output_dir="", use_wandb=False,
             print_freq=10):
    """COCO bbox evaluation (the model in eval mode runs its one-to-one queries alone); returns (stats, the
    CocoEvaluator). The model's and criterion's train/eval modes are restored afterwards."""
    model_training, criterion_training = model.training, criterion.training
    model.eval()
    criterion.eval()
    logger = MetricLogger(delimiter="  ")
    logger.add_meter("class_error", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    coco_evaluator = CocoEvaluator(base_ds, ("bbox",))
    weight_dict = criterion.weight_dict
    try:
        for samples, targets in logger.log_every(data_loader, print_freq, "Test:"):
            samples = samples.to(device)
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            outputs = model(samples)
            reduced = reduce_dict(criterion(outputs, targets))
            reduced_scaled, reduced_total = weighted_losses(reduced, weight_dict)
            logger.update(loss=reduced_total, **reduced_scaled, **{f"{k}_unscaled": v for k, v in reduced.items()})
            logger.update(class_error=reduced["class_error"])

            orig_sizes = torch.stack([t["orig_size"] for t in targets], dim=0)
            results = postprocessors["bbox"](outputs, orig_sizes)
            coco_evaluator.update({t["image_id"].item(): r for t, r in zip(targets, results)})
    finally:
        model.train(model_training)
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
