"""What an exact resume needs besides the weights and running averages (the seeds and random states, the
optimizer and schedule restored), and the files of a run: which checkpoint to resume, temporaries left by killed
saves, the per-epoch copies kept, the logs' lines past the point a run resumes from."""
import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .amp import amp_mode
from .checkpoint import load_checkpoint
from .misc import get_rank, get_world_size, is_dist_avail_and_initialized

EPOCH_COPY = re.compile(r"checkpoint(\d{4})\.pth")
LATEST = "checkpoint.pth"
ITERATION_LOG = "log_iterations.txt"


# ------------------------------------------------------------------------------------------- random states


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def epoch_seed(seed, epoch, rank):
    """A seed of its own for every (epoch, rank): a resumed run draws the same samples and augmentations."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])



def random_state():
    """This process's random states, in types a weights_only checkpoint holds."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_random_states():
    """Every process's random_state(), in rank order (on every process)."""
    state = random_state()
    if not is_dist_avail_and_initialized():
        return [state]
    states = [None] * get_world_size()
    dist.all_gather_object(states, state)
    return states


def restore_random_states(states):
    """Give this process its own of all_random_states(); a checkpoint of another number of processes is an error."""
    if len(states) != get_world_size():
        raise ValueError(f"the checkpoint was saved by {len(states)} processes, this run has {get_world_size()}: "
                         "resume a run mid-epoch with as many processes (or resume from an epoch-end copy)")
    set_random_state(states[get_rank()])


# ------------------------------------------------------------------------------------------- optimizer and schedule


def _optimizer_kind(group):
    return "SGD" if "momentum" in group and "betas" not in group else "AdamW" if "betas" in group else "unknown"


def optimizer_mismatch(saved, optimizer):
    """Why the optimizer state dict `saved` cannot continue in `optimizer` (None when it can): another optimizer,
    or parameter groups of other sizes (the flags that group or freeze the parameters differ)."""
    saved_groups, groups = saved["param_groups"], optimizer.param_groups
    if _optimizer_kind(saved_groups[0]) != _optimizer_kind(groups[0]):
        return (f"its optimizer is {_optimizer_kind(saved_groups[0])}, this run's {_optimizer_kind(groups[0])} "
                "(--sgd)")
    saved_sizes, sizes = [len(g["params"]) for g in saved_groups], [len(g["params"]) for g in groups]
    if saved_sizes != sizes:
        return (f"its optimizer has parameter groups of {saved_sizes} tensors, this run's {sizes} (the flags that "
                "group or freeze parameters differ: --lr_backbone, --lr_backbone_names, --lr_linear_proj_names, "
                "--backbone, ...)")
    return None


# what the command line sets in a parameter group, and wins over a resumed checkpoint's value
COMMAND_LINE_GROUP_KEYS = ("lr", "initial_lr", "weight_decay", "fused")


def resume_training_state(args, checkpoint, optimizer, scheduler, scaler, source="the checkpoint"):
    """Restore optimizer, scheduler (and the fp16 gradient scaler); returns the epoch to continue with. The learning
    rates and lr drops of this command line win, as upstream (so a resumed run can change its schedule), and so
    do its weight decays. An optimizer state that does not fit this run's optimizer is an error naming `source`."""
    problem = optimizer_mismatch(checkpoint["optimizer"], optimizer)
    if problem is not None:
        raise ValueError(f"cannot resume the training state of {source}: {problem}. Resume with its flags, or "
                         f"start a new run from its weights with --finetune {source}")
    # this run's learning rates and weight decays, and its choice of the fused AdamW kernel (a checkpoint's
    # param groups carry theirs)
    fresh_groups = [{k: g[k] for k in COMMAND_LINE_GROUP_KEYS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(checkpoint["optimizer"])
    for group, fresh in zip(optimizer.param_groups, fresh_groups):
        group.update(fresh)
    scheduler.load_state_dict(checkpoint["lr_scheduler"])
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    if isinstance(scheduler, torch.optim.lr_scheduler.StepLR):
        scheduler.step_size = args.lr_drop
        drops = scheduler.last_epoch // scheduler.step_size
    else:
        scheduler.milestones = type(scheduler.milestones)(args.lr_drop_epochs)
        drops = sum(1 for m in args.lr_drop_epochs if m <= scheduler.last_epoch)
    for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base_lr * scheduler.gamma ** drops
    if "scaler" in checkpoint and scaler is not None:
        scaler.load_state_dict(checkpoint["scaler"])
    return checkpoint["epoch"] + 1


# ------------------------------------------------------------------------------------------- checkpoint files


def precision_change(checkpoint, amp, source="the checkpoint"):
    """A note when `checkpoint` was trained in another precision than `amp`, this run's (None when the same, or when
    its arguments are not saved): the command line decides, so a run relaunched without its --amp changes it."""
    saved = checkpoint.get("args")
    if not hasattr(saved, "use_fp16") and not hasattr(saved, "amp"):  # no saved arguments (or not main.py's)
        return None
    trained = amp_mode(saved)
    if trained == amp:
        return None
    scaler = ("; its fp16 gradient-scaler state is not used" if "scaler" in checkpoint
              else "; a new gradient scaler starts" if amp == "fp16" else "")
    in_epoch = ("; the rest of its epoch does not repeat its steps exactly" if checkpoint.get("in_epoch") is not None
                else "")
    return f"note: {source} was trained in {trained}; this run continues in {amp} (--amp){scaler}{in_epoch}"


def epoch_copies(output_dir):
    """The per-epoch copies checkpointNNNN.pth of a run, oldest first."""
    output_dir = Path(output_dir)
    copies = [p for p in output_dir.glob("checkpoint*.pth") if EPOCH_COPY.fullmatch(p.name)]
    return sorted(copies, key=lambda p: int(EPOCH_COPY.fullmatch(p.name).group(1)))


def prune_epoch_copies(output_dir, keep):
    """Delete all but the last `keep` per-epoch copies (keep None: delete nothing); returns the deleted files."""
    if keep is None:
        return []
    doomed = epoch_copies(output_dir)[:-keep]
    for path in doomed:
        path.unlink()
    return doomed


def remove_temporaries(output_dir):
    """Delete the temporary files a killed save left (.<name>.<random>.tmp) in a run's folders."""
    removed = []
    for folder in (Path(output_dir), Path(output_dir) / "eval"):
        if folder.is_dir():
            for path in folder.glob(".*.tmp"):
                path.unlink()
                removed.append(path)
    return removed


def previous_run_files(output_dir):
    """The files of an earlier training run in output_dir that a new run would overwrite or append to: its
    checkpoints and logs (names, [] when there are none)."""
    output_dir = Path(output_dir)
    named = [output_dir / name for name in (LATEST, "log.txt", ITERATION_LOG)]
    return [p.name for p in named if p.is_file()] + [p.name for p in epoch_copies(output_dir)]


def find_resume_checkpoint(output_dir, report=print):
    """(path, checkpoint) to resume a run in output_dir from: checkpoint.pth, else, when it is missing or cannot
    be read (named in a report line), the newest per-epoch copy that loads; (None, None) when there is none.
    Checkpoints that are all unreadable are an error: starting afresh would overwrite them."""
    output_dir = Path(output_dir)
    candidates = [path for path in [output_dir / LATEST] + list(reversed(epoch_copies(output_dir)))
                  if path.is_file()]
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except (RuntimeError, ValueError, OSError, EOFError) as err:
            report(f"cannot resume from {path} ({err})" + ("; trying the previous copy" if path != candidates[-1]
                                                           else ""))
    if candidates:
        names = ", ".join(p.name for p in candidates[:3]) + (", ..." if len(candidates) > 3 else "")
        raise RuntimeError(f"--auto_resume: no checkpoint in {output_dir} can be read ({names}), and a new run would "
                           "overwrite them: move them away to start afresh, or --resume a copy from elsewhere")
    return None, None


def resume_position(checkpoint):
    """{"epoch", "iteration"} at which training continues from `checkpoint` (a mid-epoch one's own position)."""
    return checkpoint.get("in_epoch", {"epoch": checkpoint.get("epoch", -1) + 1, "iteration": 0})


def weights_digest(state):
    """A short digest of a state dict: its names, shapes and the first bytes of every tensor (training changes the
    first elements of each trained tensor at every step), cheap for any model size."""
    digest = hashlib.sha1()
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor):
            head = tensor.detach().reshape(-1)[:16].contiguous().cpu().view(torch.uint8)
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(head.numpy().tobytes())
    return digest.hexdigest()[:12]


def start_description(checkpoint):
    """Where a run starts, comparable across processes: nothing (a new run), or the resumed checkpoint's position
    and weights (its path may differ from node to node)."""
    if checkpoint is None:
        return "nothing (a new run)"
    at = resume_position(checkpoint)
    return f"epoch {at['epoch']} iteration {at['iteration']} (weights {weights_digest(checkpoint['model'])})"


# ------------------------------------------------------------------------------------------- logs


def read_log(path):
    """The JSON lines of a log file (none when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_log(path, keep):
    """Rewrite a JSON-lines log with only the lines for which keep(entry) is true; returns how many went."""
    entries = read_log(path)
    kept = [entry for entry in entries if keep(entry)]
    if len(kept) != len(entries):
        Path(path).write_text("".join(json.dumps(entry) + "\n" for entry in kept))
    return len(entries) - len(kept)
