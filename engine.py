"""Training and evaluation loops, and the training run around them (the hybrid loss itself is
models.criterion.HybridCriterion)."""
import json
import math
import time
from pathlib import Path

import torch

from datasets import category_names
from datasets.coco_eval import CocoEvaluator
from datasets.data_prefetcher import data_prefetcher
from models.criterion import HybridCriterion, weighted_losses
from util import amp as mixed_precision
from util.checkpoint import save_checkpoint
from util.metric_logger import MetricLogger, SmoothedValue
from util.misc import get_rank, get_total_grad_norm, is_dist_avail_and_initialized, is_main_process, reduce_dict
from util.preemption import Preempted, Preemption
from util.training_state import (
    ITERATION_LOG,
    LATEST,
    all_random_states,
    epoch_seed,
    precision_change,
    prune_epoch_copies,
    read_log,
    restore_random_states,
    resume_training_state,
    seed_everything,
    truncate_log,
)


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


def _check_outputs_finite(outputs, where, consequence):
    """Stop when the model's outputs hold inf or nan, on every process at once, before the matcher meets the
    broken boxes; the message names the outputs, `where` (e.g. "at epoch 3, iteration 7") and ends with
    `consequence`."""
    named = _output_tensors(outputs)
    finite = torch.stack([tensor.detach().isfinite().all() for _, tensor in named])
    everywhere = finite.all().float()
    if is_dist_avail_and_initialized():
        torch.distributed.all_reduce(everywhere, op=torch.distributed.ReduceOp.MIN)
    if everywhere.item() < 1:
        bad = [name for (name, _), ok in zip(named, finite.tolist()) if not ok]
        raise FloatingPointError(f"the model's outputs are not finite {where} "
                                 f"({', '.join(bad[:6]) or 'on another process'}): {consequence}")


CLASS_ERRORS = ("class_error", "class_error_one2many")  # the criterion's statistics of the matched queries
MATCHED = "matched_objects"  # their weight, beside them in the dict reduce_dict averages over processes


def weigh_class_errors(loss_dict, targets, outputs):
    """loss_dict (the criterion's, for reduce_dict) with each class error (class_error; class_error_one2many of
    the hybrid) times the batch's matched objects (each image's objects, at most the outputs' one-to-one
    queries), and their number under MATCHED. Averaged over processes, their ratio (class_errors) is the error
    over all matched objects, not a mean over batches or processes; upstream's 100 of a batch without objects
    weighs nothing. The one-to-many group takes the same weight (its k-fold repeated objects would weigh the
    same)."""
    logits = outputs["pred_logits"]  # [B, queries, classes]
    matched = sum(min(len(t["labels"]), logits.shape[1]) for t in targets)
    weighted = {k: v * matched if k in CLASS_ERRORS else v for k, v in loss_dict.items()}
    weighted[MATCHED] = torch.tensor(float(matched), device=logits.device)
    return weighted


def class_errors(reduced):
    """Take the weighted class errors and MATCHED out of `reduced` (weigh_class_errors' dict after reduce_dict):
    {name: (error in %, weight)}, without them when no process matched any object."""
    weight = float(reduced.pop(MATCHED))
    totals = {name: float(reduced.pop(name)) for name in CLASS_ERRORS if name in reduced}
    return {name: (total / weight, weight) for name, total in totals.items()} if weight else {}


def class_error_scalars(errors):
    """The logged names of class_errors' values: class_error (also as class_error_unscaled, and
    class_error_one2many_unscaled, the names of upstream's log) -> (value, weight)."""
    scalars = {}
    for name, pair in errors.items():
        if name == "class_error":
            scalars[name] = pair
        scalars[f"{name}_unscaled"] = pair
    return scalars


def class_errors_update(logger, weighted):
    """Add class_error_scalars' values to the logger's meters, each weighted by its number of matched objects
    (a step without objects adds nothing: its console line shows the last value)."""
    for name, (value, count) in weighted.items():
        logger.meters[name].update(value, n=count)


def class_error_text(logger):
    meter = logger.meters["class_error"]
    return f"cls_err {meter.value:.1f}" if meter.deque else "cls_err -"


def train_logger():
    """The MetricLogger of a training epoch (its meters are what a mid-epoch checkpoint saves)."""
    logger = MetricLogger(delimiter="  ")
    logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    logger.add_meter("class_error", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    logger.add_meter("grad_norm", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    return logger


# the console's group sums: in log_iterations.txt, not in log.txt's epoch lines (their format stays upstream's)
GROUP_SUMS = ("loss_one2one", "loss_one2many")


def group_losses(scaled):
    """{loss_one2one, loss_one2many}: sums of the weighted terms of each query group (the _enc terms count with
    the one-to-one group); {} without one-to-many terms."""
    one2many = [v for k, v in scaled.items() if k.endswith("_one2many")]
    if not one2many:
        return {}
    return dict(zip(GROUP_SUMS, (sum(scaled.values()) - sum(one2many), sum(one2many))))


def train_summary(logger):
    """The console's view of a training iteration: the total and group losses, class error, lr, grad norm."""
    meters = logger.meters
    text = f"loss {meters['loss'].median:.3f}"
    if "loss_one2one" in meters:
        text += f" (o2o {meters['loss_one2one'].median:.3f}, o2m {meters['loss_one2many'].median:.3f})"
    text += f"  {class_error_text(logger)}  lr {meters['lr'].value:.1e}"
    if meters["grad_norm"].count:  # the last step's, or the last not skipped by the fp16 scaler
        text += f"  grad {meters['grad_norm'].value:.2f}"
    return text + (f"  scale {meters['loss_scale'].value:.0f}" if "loss_scale" in meters else "")


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, max_norm=0.0, use_wandb=False,
                    use_fp16=False, scaler=None, print_freq=10, start_iteration=0, logger=None, ema=None,
                    after_iteration=None, amp=None):
    """One pass over data_loader, minimising the weighted sum of criterion's losses (build_model's
    HybridCriterion trains both query groups); returns the epoch's averaged metrics.

    amp: "fp32", "bf16" or "fp16" (default: "fp16" with upstream's use_fp16, else "fp32"): the model's forward
    runs under autocast, the losses in float32 on its outputs; `scaler` (a torch.amp.GradScaler, made here when
    None) scales fp16 losses and skips the steps whose gradients overflow.

    A resumed epoch starts at start_iteration (data_loader yields the remaining batches) with the restored
    `logger` (train_logger()). `ema` (timm's ModelEmaV3) is updated after each step. after_iteration(iteration,
    logger, scalars) runs after each one (iteration records, mid-epoch checkpoints, preemption).
    """
    model.train()
    criterion.train()
    logger = logger if logger is not None else train_logger()
    device = torch.device(device)
    amp = amp or ("fp16" if use_fp16 else "fp32")
    if scaler is None:
        scaler = mixed_precision.grad_scaler(device, amp)
    weight_dict = criterion.weight_dict
    iterations = len(data_loader)
    averaged = model.module if hasattr(model, "module") else model  # what the EMA follows (DDP unwrapped)

    prefetcher = data_prefetcher(data_loader, device, prefetch=True)
    samples, targets = prefetcher.next()
    for iteration in logger.log_every(range(start_iteration, iterations), print_freq, f"Epoch {epoch}",
                                      total=iterations, summary=train_summary):
        outputs = mixed_precision.forward(model, samples, device, amp)  # in float32
        _check_outputs_finite(outputs, f"at epoch {epoch}, iteration {iteration}", "the weights diverged. " + STOPPED)
        loss_dict = criterion(outputs, targets)
        _, losses = weighted_losses(loss_dict, weight_dict)

        # for logging, averaged over processes
        reduced = reduce_dict(weigh_class_errors(loss_dict, targets, outputs))
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
        scale = scaler.get_scale() if scaler.is_enabled() else None  # fp16: the scale of this step's loss
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update(averaged, step=epoch * iterations + iteration + 1)

        reduced = {k: v.item() for k, v in reduced.items()}
        errors = class_errors(reduced)  # over the matched objects of all processes
        weighted = class_error_scalars(errors)
        reduced_scaled = {k: v.item() for k, v in reduced_scaled.items()}
        scalars = {"loss": loss_value, **group_losses(reduced_scaled), **reduced_scaled,
                   **{f"{k}_unscaled": v for k, v in reduced.items()},
                   **{k: value for k, (value, _) in weighted.items()},
                   "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm.item()}
        if scale is not None:  # a step whose gradients overflowed is skipped (the scale lowered): no grad norm
            skipped = scaler.get_scale() < scale
            scalars.update(loss_scale=scale, skipped_step=float(skipped))  # an epoch's: the share skipped
            if skipped:
                del scalars["grad_norm"]
        logger.update(**{k: v for k, v in scalars.items() if k not in weighted})
        class_errors_update(logger, weighted)
        if use_wandb:
            import wandb

            wandb.log({**reduced, **{k: value for k, (value, _) in errors.items()}})
        if after_iteration is not None:
            after_iteration(iteration, logger, scalars)
        samples, targets = prefetcher.next()

    logger.synchronize_between_processes()
    stats = {k: meter.global_avg for k, meter in logger.meters.items() if k not in GROUP_SUMS and meter.count}
    class_error = f"{stats['class_error']:.2f}" if "class_error" in stats else "- (no objects)"
    print(f"Epoch {epoch} averages: loss {stats['loss']:.4f}, class_error {class_error} (every term in log.txt)",
          flush=True)
    return stats


def eval_summary(logger):
    return f"loss {logger.meters['loss'].median:.3f}  {class_error_text(logger)}"


@torch.no_grad()
def evaluate(model, criterion, postprocessors, data_loader, base_ds, device, output_dir="", use_wandb=False,
             print_freq=10, table=True, tta=None, amp="fp32"):
    """COCO bbox evaluation (the model in eval mode runs its one-to-one queries alone); returns (stats, the
    CocoEvaluator); table=False leaves out the printed COCO table. The model's and criterion's train/eval modes are
    restored afterwards. With `tta` (a datasets.tta.TestTimeAugmentation, data_loader's batches carrying datasets.tta
    views) the detections of the batch's pass are merged with those of the other scales and flips; the losses stay
    the batch's. amp: the model runs under autocast in that precision (util.amp), the losses, post-processing and
    TTA merging in float32 on its outputs."""
    model_training, criterion_training = model.training, criterion.training
    model.eval()
    criterion.eval()
    logger = MetricLogger(delimiter="  ")
    logger.add_meter("class_error", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    # --topk > 100: maxDets; the boxes per image: the one-to-one queries (more with TTA's merged passes)
    queries = None if tta is not None else getattr(getattr(model, "module", model), "num_queries_one2one", None)
    coco_evaluator = CocoEvaluator(base_ds, ("bbox",), topk=postprocessors["bbox"].topk, queries=queries)
    weight_dict = criterion.weight_dict
    try:
        for samples, targets, *views in logger.log_every(data_loader, print_freq, "Test", summary=eval_summary):
            samples = samples.to(device)
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            outputs = mixed_precision.forward(model, samples, device, amp)  # in float32
            image_ids = [t["image_id"].item() for t in targets]
            _check_outputs_finite(outputs, f"in evaluation, on the batch of images {image_ids}",
                                  "are the weights (or the --amp precision) broken?")
            reduced = reduce_dict(weigh_class_errors(criterion(outputs, targets), targets, outputs))
            errors = class_errors(reduced)  # over the matched objects of all processes
            reduced_scaled, reduced_total = weighted_losses(reduced, weight_dict)
            logger.update(loss=reduced_total, **reduced_scaled, **{f"{k}_unscaled": v for k, v in reduced.items()})
            class_errors_update(logger, class_error_scalars(errors))

            orig_sizes = torch.stack([t["orig_size"] for t in targets], dim=0)
            results = postprocessors["bbox"](outputs, orig_sizes)
            if tta is not None:
                results = tta(model, samples, targets, results, views[0], amp)
            coco_evaluator.update(dict(zip(image_ids, results)))
    finally:
        model.train(model_training)
        criterion.train(criterion_training)

    logger.synchronize_between_processes()
    coco_evaluator.synchronize_between_processes()
    coco_evaluator.accumulate()
    coco_evaluator.summarize(table)
    stats = {k: meter.global_avg for k, meter in logger.meters.items() if meter.count}  # class_error: objects seen
    stats["coco_eval_bbox"] = coco_evaluator.coco_eval["bbox"].stats.tolist()
    if use_wandb:
        import wandb

        wandb.log({"AP": stats["coco_eval_bbox"][0], "AP50": stats["coco_eval_bbox"][1]})
    return stats, coco_evaluator


def print_ap(stats):
    ap = stats["coco_eval_bbox"]
    print(f"bbox AP {ap[0]:.4f}  AP50 {ap[1]:.4f}  AP75 {ap[2]:.4f}  APs {ap[3]:.4f}  APm {ap[4]:.4f}  "
          f"APl {ap[5]:.4f}", flush=True)


class TrainingRun:
    """The epochs of a training run, each followed by its evaluation, and the files that make it resumable.

    In output_dir: checkpoint.pth after every epoch (and every save_every_iters iterations, and when a stop signal
    arrives: then the run saves after the current iteration and raises Preempted), the per-epoch copies
    checkpointNNNN.pth (the last keep_checkpoints of them), log.txt (one JSON line per epoch, written after its
    evaluation; train_time and test_time: the seconds its training and its evaluation took), log_iterations.txt
    (every print_freq-th iteration's scalars) and eval/. A run resumed from any checkpoint.pth repeats an
    uninterrupted run's iterations exactly (same batches, augmentations and random states) and completes what a
    kill left undone at an epoch end (its copy, evaluation and log line).
    """

    def __init__(self, args, model, criterion, postprocessors, optimizer, scheduler, scaler, batch_sampler,
                 loader_train, loader_val, base_ds, device, ema=None, n_parameters=0):
        self.args = args
        self.model = model
        self.model_without_ddp = model.module if hasattr(model, "module") else model
        self.criterion, self.postprocessors = criterion, postprocessors
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.batch_sampler, self.loader_train, self.loader_val = batch_sampler, loader_train, loader_val
        self.base_ds, self.device, self.ema = base_ds, device, ema
        self.n_parameters = n_parameters
        self.categories = category_names(loader_train.dataset)  # {id: name} of the training set, saved
        self.output_dir = Path(args.output_dir) if args.output_dir else None
        self.main_process = is_main_process()
        self.preemption = Preemption(device)
        self.tensorboard = None
        self.start_epoch, self.start_iteration = args.start_epoch, 0
        self.resumed = None  # the in-epoch state of a mid-epoch checkpoint: meters and random states
        self.pending_epoch_end = None  # (epoch, train stats) of an epoch whose end a kill interrupted
        self.epoch_started = None  # time.time() at the start of this epoch's training (less a resumed part)

    # ------------------------------------------------------------------------------------------- checkpoints

    def state(self, epoch_done, **extra):
        """What checkpoint.pth holds: upstream's entries ("epoch" = the last completed epoch) and ours."""
        state = {"model": self.model_without_ddp.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "lr_scheduler": self.scheduler.state_dict(), "epoch": epoch_done, "args": self.args,
                 "categories": self.categories}
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        if self.ema is not None:
            state["model_ema"] = self.ema.module.state_dict()
        return {**state, **extra}

    def save_in_epoch(self, epoch, iterations_done, logger):
        """checkpoint.pth at an iteration of `epoch` (collective: every process's random state goes in)."""
        randomness = all_random_states()
        if self.output_dir is not None:
            in_epoch = {"epoch": epoch, "iteration": iterations_done, "random": randomness,
                        "meters": logger.state(), "seconds": time.time() - self.epoch_started,
                        "batches": self.batches_of_an_epoch()}
            save_checkpoint(self.state(epoch - 1, in_epoch=in_epoch), self.output_dir / LATEST)

    def batches_of_an_epoch(self):
        """What decides an epoch's batches besides the epoch (and the number of processes, checked with the
        random states): the position of a mid-epoch checkpoint means these batches only."""
        return {"batch_size": self.args.batch_size, "seed": self.args.seed, "images": self.batch_sampler.num_samples}

    def check_position(self, in_epoch, source):
        """A mid-epoch checkpoint resumes only where its iterations count the same batches."""
        saved, ours = in_epoch.get("batches"), self.batches_of_an_epoch()
        if saved is None:  # saved before the batches were recorded
            return
        spelled = {"batch_size": "--batch_size {}", "seed": "--seed {}", "images": "{} training images"}
        changed = [f"{spelled[k].format(saved[k])} (now {ours[k]})" for k in ours if saved.get(k) != ours[k]]
        if changed:
            raise ValueError(f"{source} was saved at iteration {in_epoch['iteration']} of epoch {in_epoch['epoch']} "
                             f"by a run with {', '.join(changed)}: this run's batches of that epoch are others, so "
                             "resuming there would skip some images and repeat others. Resume with its settings, or "
                             "from the previous epoch's copy checkpointNNNN.pth")

    def resume_weight_average(self, checkpoint, source):
        if self.ema is not None and "model_ema" in checkpoint:
            self.ema.module.load_state_dict(checkpoint["model_ema"])
        elif "model_ema" in checkpoint:
            print(f"note: {source} holds a weight average (--model_ema) that this run, without --model_ema, does not "
                  "continue: its evaluations and checkpoints are of the trained weights", flush=True)
        elif self.ema is not None:
            print(f"note: {source} holds no weight average: --model_ema starts one from its weights", flush=True)

    def resume(self, checkpoint, source):
        """Continue from `checkpoint` (ours at an epoch end or mid-epoch, or upstream's)."""
        in_epoch = checkpoint.get("in_epoch")
        if in_epoch is not None:
            self.check_position(in_epoch, source)
        next_epoch = resume_training_state(self.args, checkpoint, self.optimizer, self.scheduler, self.scaler,
                                           source)
        self.resume_weight_average(checkpoint, source)
        changed = precision_change(checkpoint, mixed_precision.amp_mode(self.args), source)
        if changed is not None:
            print(changed, flush=True)
        if in_epoch is not None:
            self.start_epoch, self.start_iteration = in_epoch["epoch"], in_epoch["iteration"]
            self.resumed = in_epoch
        else:
            self.start_epoch = next_epoch
            if "train_stats" in checkpoint:
                self.pending_epoch_end = (checkpoint["epoch"], checkpoint["train_stats"])
                copy = self.output_dir / f"checkpoint{checkpoint['epoch']:04}.pth" if self.output_dir else None
                if copy is not None and not copy.exists():  # a kill came between checkpoint.pth and its copy
                    save_checkpoint(checkpoint, copy)
        if self.start_epoch >= self.args.epochs:
            print(f"{source} ends before epoch {self.start_epoch}: nothing to train up to --epochs "
                  f"{self.args.epochs}", flush=True)
            return
        print(f"resuming {source} at epoch {self.start_epoch}, iteration {self.start_iteration}", flush=True)
        if self.output_dir is not None and self.main_process:
            # lines from beyond the resume point (written after the checkpoint, or by a run that went further)
            truncate_log(self.output_dir / "log.txt", lambda entry: entry["epoch"] < self.start_epoch)
            truncate_log(self.output_dir / ITERATION_LOG, lambda entry: (entry["epoch"], entry["iteration"])
                         < (self.start_epoch, self.start_iteration))

    # ------------------------------------------------------------------------------------------- epochs

    def after_iteration(self, epoch, iteration, logger, scalars):
        done = iteration + 1
        if self.main_process and (iteration % self.args.print_freq == 0 or done == len(self.loader_train)):
            self.record(epoch, iteration, scalars)
        every = self.args.save_every_iters
        saved = bool(every) and done % every == 0 and done < len(self.loader_train)
        if saved:
            self.save_in_epoch(epoch, done, logger)
        if self.preemption.requested():
            if not saved:
                self.save_in_epoch(epoch, done, logger)
            self.stop(epoch, done)

    def stop(self, epoch, iterations_done):
        where = self.output_dir / LATEST if self.output_dir is not None else None
        message = (f"received {self.preemption.name}: stopped after epoch {epoch} iteration {iterations_done}; " +
                   (f"saved {where}: resume with --resume {where} (or --auto_resume)" if where is not None
                    else "nothing saved (no --output_dir)"))
        raise Preempted(message, self.preemption.signum)

    def record(self, epoch, iteration, scalars):
        """One line of log_iterations.txt, and TensorBoard's scalars (main process)."""
        if self.output_dir is not None:
            with (self.output_dir / ITERATION_LOG).open("a") as f:
                f.write(json.dumps({"epoch": epoch, "iteration": iteration, **scalars}) + "\n")
        if self.tensorboard is not None:
            step = epoch * len(self.loader_train) + iteration
            for name, value in scalars.items():
                self.tensorboard.add_scalar(f"train/{name}", value, step)

    def finish_epoch(self, epoch, train_stats):
        """The epoch end: checkpoint.pth, its per-epoch copy, then the evaluation and the log line."""
        if self.output_dir is not None:
            state = self.state(epoch, train_stats=train_stats)
            save_checkpoint(state, self.output_dir / LATEST)
            save_checkpoint(state, self.output_dir / f"checkpoint{epoch:04}.pth")
            if self.main_process:
                prune_epoch_copies(self.output_dir, self.args.keep_checkpoints)
        return self.evaluate_and_log(epoch, train_stats)

    def evaluate_and_log(self, epoch, train_stats):
        evaluated = self.ema.module if self.ema is not None else self.model
        started = time.time()
        stats, coco_evaluator = evaluate(evaluated, self.criterion, self.postprocessors, self.loader_val,
                                         self.base_ds, self.device, self.args.output_dir,
                                         use_wandb=self.args.use_wandb, print_freq=self.args.print_freq,
                                         table=False, amp=mixed_precision.amp_mode(self.args))
        print_ap(stats)
        if self.output_dir is not None and self.main_process:
            (self.output_dir / "eval").mkdir(exist_ok=True)
            for name in ["latest.pth"] + ([f"{epoch:03}.pth"] if epoch % 50 == 0 else []):
                save_checkpoint(coco_evaluator.coco_eval["bbox"].eval, self.output_dir / "eval" / name)
            log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                         **{f"test_{k}": v for k, v in stats.items()}, "test_time": time.time() - started,
                         "epoch": epoch, "n_parameters": self.n_parameters}
            with (self.output_dir / "log.txt").open("a") as f:  # last: a logged epoch is a finished one
                f.write(json.dumps(log_stats) + "\n")
        if self.tensorboard is not None:
            for name, value in zip(("AP", "AP50", "AP75"), stats["coco_eval_bbox"]):
                self.tensorboard.add_scalar(f"test/{name}", value, epoch)
        return stats

    def complete_interrupted_epoch_end(self):
        """After a kill between an epoch's checkpoint and its log line: its evaluation and line (resume() made the
        per-epoch copy)."""
        if self.pending_epoch_end is None or self.output_dir is None:
            return
        epoch, train_stats = self.pending_epoch_end
        if not any(entry["epoch"] == epoch for entry in read_log(self.output_dir / "log.txt")):
            print(f"completing the end of epoch {epoch} (evaluation and log line)", flush=True)
            self.evaluate_and_log(epoch, train_stats)

    def run(self):
        """Train from the start (or resume) point to args.epochs; returns the last evaluation's stats."""
        args, stats = self.args, None
        if args.tensorboard and self.main_process and self.output_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.output_dir / "tensorboard"))
        with self.preemption.handling():
            self.complete_interrupted_epoch_end()
            for epoch in range(self.start_epoch, args.epochs):
                seed_everything(epoch_seed(args.seed, epoch, get_rank()))
                start = self.start_iteration if epoch == self.start_epoch else 0
                logger = train_logger()
                resumed_seconds = 0.0
                if start and self.resumed is not None:
                    logger.load_state(self.resumed["meters"])
                    restore_random_states(self.resumed["random"])
                    resumed_seconds = self.resumed.get("seconds", 0.0)  # the iterations before the save
                self.epoch_started = time.time() - resumed_seconds
                self.batch_sampler.set_epoch(epoch, start)
                train_stats = train_one_epoch(
                    self.model, self.criterion, self.loader_train, self.optimizer, self.device, epoch,
                    args.clip_max_norm, use_wandb=args.use_wandb, amp=mixed_precision.amp_mode(args),
                    scaler=self.scaler,
                    print_freq=args.print_freq, start_iteration=start, logger=logger, ema=self.ema,
                    after_iteration=lambda i, log, scalars, e=epoch: self.after_iteration(e, i, log, scalars))
                train_stats["time"] = time.time() - self.epoch_started  # log.txt's train_time
                self.scheduler.step()
                stats = self.finish_epoch(epoch, train_stats)
                if self.preemption.requested():
                    if epoch + 1 < args.epochs:
                        self.stop(epoch, len(self.loader_train))
                    print(f"received {self.preemption.name} during the last epoch's end: the run is complete "
                          "(nothing left to stop)", flush=True)
        if self.tensorboard is not None:
            self.tensorboard.close()
        return stats
