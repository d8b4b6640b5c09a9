"""Checkpoints: atomic saving, safe loading (weights_only) and a strict, explained model-state check."""
import argparse
import os
import tempfile
from pathlib import Path

import torch

from .misc import is_main_process

# everything our and upstream's checkpoints hold besides tensors and plain containers
SAFE_GLOBALS = [argparse.Namespace]
# keys added by the thop profiler to some released checkpoints
IGNORED_SUFFIXES = ("total_params", "total_ops")
# flags that change the architecture, named in the hint when a checkpoint does not fit
ARCHITECTURE_FLAGS = ("backbone", "pretrained_backbone", "dilation", "num_feature_levels", "enc_layers", "dec_layers", "dim_feedforward",
                      "hidden_dim", "nheads", "num_queries_one2one", "num_queries_one2many", "dec_n_points",
                      "enc_n_points", "with_box_refine", "two_stage", "mixed_selection", "position_embedding",
                      "num_classes")


def save_checkpoint(obj, path):
    """torch.save to a temporary file beside path, then rename: a kill mid-save never leaves a broken file."""
    if not is_main_process():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path):
    """Load a checkpoint (a file or an https URL) with weights_only=True, allowing argparse.Namespace only."""
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        if str(path).startswith(("https://", "http://")):
            return torch.hub.load_state_dict_from_url(str(path), map_location="cpu", check_hash=True,
                                                      weights_only=True)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--resume {path}: no such checkpoint file")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise RuntimeError(f"cannot load checkpoint {path}: {type(err).__name__}: {err}") from err


def _flag_differences(saved_args, args):
    if not isinstance(saved_args, argparse.Namespace):
        return []
    return [f"--{name} {getattr(saved_args, name)!r} (now {getattr(args, name)!r})" for name in ARCHITECTURE_FLAGS
            if hasattr(saved_args, name) and getattr(saved_args, name) != getattr(args, name, None)]


def load_model_state(model, checkpoint, source, args=None):
    """Load checkpoint["model"] into model; any missing, unexpected or mis-shaped tensor is an error that
    names them and, when the checkpoint carries its args, the architecture flags that differ."""
    if "model" not in checkpoint:
        raise KeyError(f"{source} has no 'model' entry (keys: {sorted(checkpoint)[:10]})")
    state = {k: v for k, v in checkpoint["model"].items() if not k.endswith(IGNORED_SUFFIXES)}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        problems = []
        for name, items in (("missing", missing), ("unexpected", unexpected), ("of another shape", mismatched)):
            if items:
                problems.append(f"{len(items)} tensors {name} (e.g. {', '.join(items[:3])})")
        hint = _flag_differences(checkpoint.get("args"), args) if args is not None else []
        hint_text = f"; it was trained with {', '.join(hint)}" if hint else \
            "; were these the flags it was trained with?"
        raise RuntimeError(f"{source} does not fit the model built from these flags: {'; '.join(problems)}"
                           f"{hint_text}")
    model.load_state_dict(state)
