"""Checkpoints: atomic saving, safe loading (weights_only; URLs cached by URL and verified) and a strict, explained
model-state check."""
import argparse
import errno
import os
import pickle
from pathlib import Path

import torch

from .atomic_file import temporary_beside
from .download import DownloadError, cached_file_problem, cached_path, download, is_url, place
from .misc import is_main_process

# everything our and upstream's checkpoints hold besides tensors and plain containers
SAFE_GLOBALS = [argparse.Namespace]
# keys added by the thop profiler to some released checkpoints
IGNORED_SUFFIXES = ("total_params", "total_ops")
# flags that change the architecture, named in the hint when a checkpoint does not fit
ARCHITECTURE_FLAGS = ("backbone", "pretrained_backbone", "dilation", "num_feature_levels", "enc_layers", "dec_layers",
                      "dim_feedforward", "hidden_dim", "nheads", "num_queries_one2one", "num_queries_one2many",
                      "dec_n_points", "enc_n_points", "with_box_refine", "two_stage", "mixed_selection",
                      "position_embedding", "position_embedding_scale", "num_classes")
# architecture flags that change the computation without changing a tensor's shape (always, or in some
# combinations: 16 heads of 2 points have the tensors of 8 heads of 4): a checkpoint trained with other values
# fits the model and would compute something else (e.g. another split of the same queries)
SHAPELESS_FLAGS = ("dilation", "num_queries_one2one", "num_queries_one2many", "position_embedding_scale", "nheads",
                   "enc_n_points", "dec_n_points")


FULL_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT)


class _WriteErrorRecorder:
    """A binary file that remembers the error of a failed write: torch.save turns it into an opaque RuntimeError
    ("unexpected pos ...")."""

    def __init__(self, file):
        self.file = file
        self.error = None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self):
        self.file.flush()


def save_checkpoint(obj, path):
    """torch.save to a temporary file beside path, then rename: a kill mid-save never leaves a broken file, and a
    full disk is reported as such, the previous file kept. The file's permissions follow the umask."""
    if not is_main_process():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temporary_beside(path)
    recorder = None
    try:
        with os.fdopen(fd, "wb") as f:
            recorder = _WriteErrorRecorder(f)
            torch.save(obj, recorder)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        cause = recorder.error if recorder is not None and recorder.error is not None else error
        if isinstance(cause, OSError) and cause.errno in FULL_DISK_ERRORS:
            kept = f"; the previous {path.name} is kept" if path.exists() else ""
            raise OSError(cause.errno, f"no space left on device writing {path}{kept}") from error
        raise


# how a torch.save file starts: a zip archive (torch >= 1.6) or a pickle (older torch)
CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
# flags written as --no_<name>: their argparse destination is True by default
NEGATED_FLAGS = {"pretrained_backbone": "--no_pretrained_backbone", "aux_loss": "--no_aux_loss",
                 "backbone_checkpoint": "--no_backbone_checkpoint"}
CLASSIFIER_MODULE = "class_embed"  # the classification heads (also under transformer.decoder in two-stage)


def _is_classifier(key):
    return CLASSIFIER_MODULE in key.split(".")


def load_checkpoint(path):
    """Load a checkpoint (a file, or an http(s) URL: see load_url_checkpoint) with weights_only=True, allowing
    argparse.Namespace only."""
    if is_url(path):
        return load_url_checkpoint(str(path))
    return _load_file(path)


def load_url_checkpoint(url, cache_root=None):
    """The checkpoint at `url`, from the cache when a verified copy is there (util.download.cached_path: keyed by
    the whole URL), else downloaded, checked (complete, loadable, hash prefix of its name if any) and cached. A
    cached copy that no longer matches its SHA-256 or does not load is reported and downloaded again. Network
    failures and downloads that are not checkpoints are a DownloadError naming the URL."""
    path = cached_path(url, cache_root)
    if path.is_file():
        problem = cached_file_problem(path)
        if problem is None:
            try:
                return _load_file(path)
            except RuntimeError as error:
                problem = str(error)
        print(f"the cached copy {path} of {url} is damaged ({problem}): downloading it again", flush=True)
        path.unlink()
    tmp, sha256 = download(url, path)
    try:
        checkpoint = _load_file(tmp, shown_as=url)
    except RuntimeError as error:
        tmp.unlink()
        raise DownloadError(f"the file downloaded from {url} is not a loadable checkpoint: "
                            f"{str(error).splitlines()[0]}") from error
    place(tmp, path, sha256)
    print(f"downloaded {url} to {path}", flush=True)
    return checkpoint


def _load_file(path, shown_as=None):
    """torch.load of a checkpoint file, weights only; errors name `shown_as` (default: the path)."""
    shown_as = shown_as or path
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such checkpoint file")
        with open(path, "rb") as f:
            head = f.read(4)
        if not head.startswith(CHECKPOINT_MAGIC):
            raise RuntimeError(f"{shown_as} is not a PyTorch checkpoint (a file written by torch.save; this one "
                               f"starts with {head!r})")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            detail = next((line for line in str(err).splitlines() if "WeightsUnpickler error" in line
                           or "Unsupported global" in line), str(err).splitlines()[0])
            raise RuntimeError(f"cannot load checkpoint {shown_as}: it holds Python objects other than tensors, "
                               f"containers and argparse.Namespace, which are refused (loading them could run "
                               f"code): {detail.strip()}") from err
        except Exception as err:
            raise RuntimeError(f"cannot load checkpoint {shown_as}: {type(err).__name__}: {err}") from err


def _spelled(name, value):
    """A flag as typed on the command line: --two_stage, --no_aux_loss, --num_queries_one2one 300."""
    if isinstance(value, bool):
        flag = NEGATED_FLAGS.get(name, f"--{name}")
        return flag if value != (name in NEGATED_FLAGS) else f"without {flag}"
    return f"--{name} {value}"


def _flag_differences(saved_args, args, names=ARCHITECTURE_FLAGS):
    if not isinstance(saved_args, argparse.Namespace):
        return []
    return [f"{_spelled(name, getattr(saved_args, name))} (now {_spelled(name, getattr(args, name, None))})"
            for name in names
            if hasattr(saved_args, name) and getattr(saved_args, name) != getattr(args, name, None)]


def model_state_of(checkpoint, source):
    """checkpoint["model"]; anything else is an error saying what the file holds instead."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        return {k: v for k, v in checkpoint["model"].items() if not k.endswith(IGNORED_SUFFIXES)}
    if isinstance(checkpoint, dict) and checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
        what = (f"a bare state dict of {len(checkpoint)} tensors (e.g. {next(iter(checkpoint))}); ImageNet "
                "backbone weights go to --pretrained_backbone_path")
    elif isinstance(checkpoint, dict):
        what = f"a dict with the keys {sorted(map(str, checkpoint))[:8]}"
    else:
        what = f"a {type(checkpoint).__name__}"
    raise ValueError(f"{source} is not a checkpoint of this project or upstream's (a dict with a 'model' state "
                     f"dict): it holds {what}")


def _classifier_sizes(state, own):
    """(the checkpoint's, the model's) number of classifier outputs when they differ, else None."""
    for key in own:
        if _is_classifier(key) and key.endswith(".bias") and key in state \
                and state[key].shape != own[key].shape:
            return state[key].shape[0], own[key].shape[0]
    return None


def _state_problems(state, own, ignore=()):
    """Missing, unexpected and mis-shaped tensors of `state` against the model's `own`, keys in `ignore` aside."""
    missing = [k for k in own if k not in state and k not in ignore]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and k not in ignore and state[k].shape != own[k].shape]
    problems = []
    for name, items in (("missing", missing), ("unexpected", unexpected), ("of another shape", mismatched)):
        if items:
            problems.append(f"{len(items)} tensors {name} (e.g. {', '.join(items[:3])})")
    return problems


def load_model_state(model, checkpoint, source, args=None):
    """Load checkpoint["model"] into model; any missing, unexpected or mis-shaped tensor is an error that
    names them and, when the checkpoint carries its args, the architecture flags that differ. So is a
    checkpoint whose args differ from `args` in a flag that changes the computation but no shape
    (SHAPELESS_FLAGS)."""
    state = model_state_of(checkpoint, source)
    own = model.state_dict()
    problems = _state_problems(state, own)
    if problems:
        classes = _classifier_sizes(state, own)
        if classes is not None:
            problems.insert(0, f"the checkpoint's classifier has {classes[0]} outputs, this model {classes[1]}: "
                               f"pass --num_classes {classes[0]} to evaluate it (to train it on your classes, "
                               f"--finetune {source})")
        hint = _flag_differences(checkpoint.get("args"), args) if args is not None else []
        hint_text = f"; it was trained with {', '.join(hint)}" if hint else \
            "; were these the flags it was trained with?"
        raise RuntimeError(f"{source} does not fit the model built from these flags: {'; '.join(problems)}"
                           f"{hint_text}")
    shapeless = _flag_differences(checkpoint.get("args"), args, SHAPELESS_FLAGS) if args is not None else []
    if shapeless:
        raise RuntimeError(f"{source} was trained with other flags: {', '.join(shapeless)}; its tensors fit this "
                           "model, but the model computes something else with these flags: pass the flags it was "
                           "trained with")
    model.load_state_dict(state)


def evaluation_weights(checkpoint):
    """(checkpoint, averaged): a checkpoint with a weight average (--model_ema) is evaluated with it, as its run's
    evaluations were; its "model" entry is then the average."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model_ema"), dict):
        return {**checkpoint, "model": checkpoint["model_ema"]}, True
    return checkpoint, False


def load_finetune_state(model, checkpoint, source):
    """Load every tensor of checkpoint["model"] into model except the classification heads of another number of
    classes, which keep their fresh initialisation; returns the names of those heads' tensors. Any other
    difference is an error, as in load_model_state."""
    state = model_state_of(checkpoint, source)
    own = model.state_dict()
    skipped = [k for k in own if _is_classifier(k) and k in state and state[k].shape != own[k].shape]
    problems = _state_problems(state, own, ignore=skipped)
    if problems:
        raise RuntimeError(f"--finetune {source} does not fit the model built from these flags (only the "
                           f"classification heads may differ): {'; '.join(problems)}")
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    return skipped
