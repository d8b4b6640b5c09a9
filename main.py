"""Train and evaluate H-Deformable-DETR (command line as upstream main.py)."""
import argparse
import datetime
import functools
import sys
import time
from pathlib import Path

import torch
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

import datasets.samplers as samplers
import util.amp as mixed_precision
import util.misc as utils
from datasets import (
    build_dataset,
    check_checkpoint_categories,
    check_same_categories,
    dataset_fingerprint,
    get_coco_api_from_dataset,
    num_classes_from_annotations,
)
from datasets.coco import COCO_SPLITS, dataset_root
from datasets.tta import TestTimeAugmentation, collate_views
from engine import TrainingRun, evaluate, print_ap
from models import build_model
from models.backbone import load_pretrained_backbone, training_flag_problems
from models.compile import compile_model
from models.optimizer import build_optimizer  # noqa: F401 (main.build_optimizer, as before)
from util.arguments import (  # noqa: F401 (upstream's names)
    argument_problems,
    check_args,
    check_device,
    check_packages,
    get_args_parser,
    missing_packages,
    shared_flags,
    unused_hybrid_flags,
)
from util.checkpoint import evaluation_weights, load_checkpoint, load_finetune_state, load_model_state, save_checkpoint
from util.download import DownloadError
from util.output_dir import check_output_dir
from util.preemption import Preempted
from util.torch_release import untested_torch_note
from util.training_state import (  # noqa: F401 (epoch_seed, resume_training_state: main's names, as before)
    epoch_seed,
    find_resume_checkpoint,
    previous_run_files,
    remove_temporaries,
    resume_position,
    resume_training_state,
    seed_everything,
    start_description,
)


def num_classes_of(args):
    """--num_classes, else the largest category id of the annotation file in use + 1 (91 for COCO)."""
    if args.num_classes is not None or args.dataset_file != "coco":
        return args.num_classes
    split = "train" if not args.eval or args.eval_in_training_set else "val"
    return num_classes_from_annotations(dataset_root(args) / COCO_SPLITS[split][1])


def derived_settings(args):
    """The run's settings: a copy of the parsed `args`, checked, with what follows from them filled in once (the
    precision, the distributed environment: rank, world size, device of this process, and the class count);
    nothing changes them afterwards. Starts the process group of a distributed run."""
    check_args(args)
    unread = training_flag_problems(args)
    if unread:
        raise ValueError("bad flag values: " + "; ".join(unread))
    args = argparse.Namespace(**vars(args))
    args.amp = mixed_precision.amp_mode(args)
    args.use_fp16 = args.amp == "fp16"  # upstream's name, read by upstream's scripts
    utils.init_distributed_mode(args)
    utils.check_same_on_every_rank("their flags", shared_flags(args), "every node must run the same command (the "
                                   "same config script and flags)")
    check_device(args)
    args.num_classes = num_classes_of(args)
    return args


def make_loaders(args, dataset_train, dataset_val):
    """(the training batch sampler, its loader, the evaluation loader). Training batches come from a
    ResumableBatchSampler (order and augmentations a function of the seed, the epoch and the sample)."""
    pin = str(args.device).startswith("cuda")
    if args.distributed:
        sampler_cls = samplers.NodeDistributedSampler if args.cache_mode else samplers.DistributedSampler
        sampler_val = sampler_cls(dataset_val, shuffle=False)
    else:
        sampler_val = torch.utils.data.SequentialSampler(dataset_val)
    batch_sampler = loader_train = None
    if dataset_train is not None:
        if len(dataset_train) < args.batch_size * utils.get_world_size():
            raise ValueError(f"the training set has {len(dataset_train)} images, fewer than one batch "
                             f"({args.batch_size} per process x {utils.get_world_size()} processes)")
        shares = sampler_cls(dataset_train) if args.distributed else None
        batch_sampler = samplers.ResumableBatchSampler(len(dataset_train), args.batch_size, args.seed, shares)
        # large-scale jitter: batches padded to a fixed --lsj x --lsj (masked), as ViTDet
        collate = functools.partial(utils.collate_fn, pad_to=args.lsj) if args.lsj else utils.collate_fn
        # the loader's own generator: starting an epoch's iterator draws nothing from the global random state
        loader_train = DataLoader(samplers.SeededSamples(dataset_train), batch_sampler=batch_sampler,
                                  collate_fn=collate, num_workers=args.num_workers, pin_memory=pin,
                                  generator=torch.Generator().manual_seed(args.seed))
    loader_val = DataLoader(dataset_val, args.batch_size, sampler=sampler_val, drop_last=False,
                            collate_fn=collate_views if args.tta else utils.collate_fn,
                            num_workers=args.num_workers, pin_memory=pin)
    return batch_sampler, loader_train, loader_val


def refuse_to_overwrite_a_run(args, output_dir):
    """A new training run (no --resume, no --auto_resume) stops in a folder that holds another run's checkpoints or
    logs: it would overwrite the checkpoints and mix its log lines with the other run's."""
    if output_dir is None or args.eval or args.resume or args.auto_resume:
        return
    found = previous_run_files(output_dir)
    if found:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise FileExistsError(f"--output_dir {output_dir} holds another run ({shown}): a new run would overwrite its "
                              "checkpoints and mix their log lines. Continue it with --auto_resume (or --resume "
                              "FILE), or start anew in another --output_dir (or delete those files)")


def resume_checkpoint(args, output_dir):
    """(source, checkpoint) to resume from: --resume, else with --auto_resume the run's own checkpoint.pth (or its
    newest per-epoch copy that loads); (None, None) to start afresh."""
    if args.resume:
        return args.resume, load_checkpoint(args.resume)
    if args.auto_resume:
        path, checkpoint = find_resume_checkpoint(output_dir)
        if path is None:
            if args.eval:
                raise FileNotFoundError(f"--eval --auto_resume: no checkpoint in {output_dir} to evaluate")
            print(f"--auto_resume: no checkpoint in {output_dir} yet, starting a new run", flush=True)
            return None, None
        at = resume_position(checkpoint)
        print(f"--auto_resume: resuming from {path} (epoch {at['epoch']}, iteration {at['iteration']})", flush=True)
        return str(path), checkpoint
    return None, None


def load_weights(args, model, source, checkpoint):
    """The model's starting weights: a checkpoint's (its average with --eval when it has one), --finetune's, or
    the ImageNet backbone's."""
    if checkpoint is not None:
        weights, averaged = evaluation_weights(checkpoint) if args.eval else (checkpoint, False)
        load_model_state(model, weights, source, args)
        print(f"evaluating the weight average (model_ema) of {source}" if averaged else f"loaded the model of {source}")
    elif args.finetune:
        fresh = load_finetune_state(model, load_checkpoint(args.finetune), args.finetune)
        print(f"fine-tuning from {args.finetune}" + (f"; new classification heads ({len(fresh)} tensors: "
                                                     f"{', '.join(fresh[:4])}{', ...' if len(fresh) > 4 else ''})"
                                                     if fresh else ""))
    elif not args.eval and args.pretrained_backbone:
        load_pretrained_backbone(model, args)


def main(args):
    """Train, or with --eval evaluate, as the parsed main.py `args` say; returns the last evaluation's stats."""
    torch_note = untested_torch_note()
    if torch_note:
        print(torch_note)
    check_output_dir(args.output_dir)
    args = derived_settings(args)
    print(args)
    hybrid_note = unused_hybrid_flags(args)
    if hybrid_note:
        print(hybrid_note)
    device = torch.device(args.device)
    mixed_precision.warn_if_slow(device, args.amp, training=not args.eval)
    seed_everything(args.seed + utils.get_rank())
    output_dir = Path(args.output_dir) if args.output_dir else None
    refuse_to_overwrite_a_run(args, output_dir)
    # a training run's own leftovers; an evaluation may share the folder of a run saving at this moment
    if output_dir is not None and utils.is_main_process() and not args.eval:
        for path in remove_temporaries(output_dir):
            print(f"removed {path}, left by an interrupted save")
    check_packages(args)
    if args.use_wandb and utils.is_main_process():
        import wandb

        wandb.init(project="H-Deformable-DETR", name=output_dir.name if output_dir else None, config=vars(args))

    # data first: a wrong path fails before any model is built
    dataset_train = None if args.eval else build_dataset("train", args)
    dataset_val = build_dataset("val", args)
    check_same_categories(dataset_train, dataset_val)
    batch_sampler, loader_train, loader_val = make_loaders(args, dataset_train, dataset_val)
    base_ds = get_coco_api_from_dataset(dataset_val)

    source, checkpoint = resume_checkpoint(args, output_dir)
    if args.eval and checkpoint is None:
        raise ValueError("--eval needs the weights to evaluate: --resume CHECKPOINT (a file or URL), or "
                         "--auto_resume with a checkpoint in --output_dir")
    if checkpoint is not None:  # the categories it learnt are those it is evaluated on, or trains on further
        check_checkpoint_categories(checkpoint.get("categories"), source, dataset_val if args.eval else dataset_train)
    model, criterion, postprocessors = build_model(args)
    load_weights(args, model, source, checkpoint)
    if args.distributed:  # the digests read every image entry and weight: only where there is something to compare
        utils.check_same_on_every_rank(
            "where they start and what they read",
            {"starting from": start_description(checkpoint), "training set": dataset_fingerprint(dataset_train),
             "validation set": dataset_fingerprint(dataset_val)},
            "--output_dir must be one folder that every node shares (its checkpoints decide where --auto_resume "
            "continues), and every node must read the same checkpoint and annotation files")
    model.to(device)
    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print("number of params:", n_parameters)
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if device.type == "cuda"
                                                          else None)

    if args.eval:
        model = compile_model(model, device) if args.compile else model
        tta = TestTimeAugmentation.from_args(args, postprocessors["bbox"]) if args.tta else None
        if tta is not None:
            print(tta)
        stats, coco_evaluator = evaluate(model, criterion, postprocessors, loader_val, base_ds, device,
                                         args.output_dir, use_wandb=args.use_wandb, print_freq=args.print_freq,
                                         tta=tta, amp=args.amp)
        print_ap(stats)
        if output_dir is not None:
            save_checkpoint(coco_evaluator.coco_eval["bbox"].eval, output_dir / "eval.pth")  # atomic, main process
        return stats

    optimizer, scheduler = build_optimizer(args, model_without_ddp)
    scaler = mixed_precision.grad_scaler(device, args.amp)
    ema = ModelEmaV3(model_without_ddp, decay=args.model_ema_decay, use_warmup=True) if args.model_ema else None
    model = compile_model(model, device) if args.compile else model  # after the average's copy: it stays eager
    run = TrainingRun(args, model, criterion, postprocessors, optimizer, scheduler, scaler, batch_sampler,
                      loader_train, loader_val, base_ds, device, ema=ema, n_parameters=n_parameters)
    if checkpoint is not None and all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch")):
        run.resume(checkpoint, source)
    elif checkpoint is not None:
        print(f"{source} holds no training state (optimizer, lr_scheduler, epoch): a new run starts from its "
              "weights", flush=True)
    del checkpoint

    print("Start training")
    start_time = time.time()
    stats = run.run()
    total_time = str(datetime.timedelta(seconds=int(time.time() - start_time)))
    print(f"Training time {total_time}")
    return stats


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Deformable DETR training and evaluation script", parents=[get_args_parser()])
    parsed = parser.parse_args()
    problems = argument_problems(parsed) + training_flag_problems(parsed) + missing_packages(parsed)
    if problems:
        parser.error("; ".join(problems))
    try:
        with utils.unresponsive_ranks_named():
            main(parsed)
        exit_code = 0
    except Preempted as stopped:
        print(stopped, flush=True)
        exit_code = 128 + stopped.signum  # the shell's convention for "ended by this signal"
    except DownloadError as error:  # no network, a wrong URL: one line naming the URL and why, not a traceback
        sys.exit(f"main.py: {error}")
    utils.close_distributed_mode()  # after a clean end only: after an error, other processes may be mid-collective
    sys.exit(exit_code)
