"""Loading the official Swin ImageNet weights into the detection backbone, without mmcv.

Accepted files: ``{"model": state_dict}`` (official Swin releases), ``{"state_dict": ...}``
(mmcv/mmdet style) and plain state dicts. Files are read with ``weights_only=True``.
"""
import logging
import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

# leading parts of keys written by DataParallel/DDP, mmdet detectors and H-DETR models
_PREFIXES = ("module.", "backbone.0.body.", "backbone.")
# classifier parts of the ImageNet files that a detection backbone does not have
_CLASSIFIER_PREFIXES = ("head.", "norm.")


def _log(logger, msg, level=logging.INFO):
    """Log through ``logger``; without one, print on the main process only."""
    if logger is not None:
        logger.log(level, msg)
    elif not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        print(msg)


def _short_list(keys, limit=12):
    keys = list(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _read(path, map_location):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights not found: {path} (no such file)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for unreadable files
        if "weights only" in str(err).lower():
            raise RuntimeError(
                f"{path} holds Python objects other than tensors, so it is not loaded (weights_only=True); "
                f"re-save just its weights, e.g. torch.save({{'model': state_dict}}, path). A checkpoint of "
                f"main.py (which holds its args) is a whole detector: start from it with --finetune"
            ) from err
        raise RuntimeError(f"{path} is not a readable torch checkpoint ({type(err).__name__}: {err})") from err


def _state_dict_of(checkpoint, path):
    """The tensors of a checkpoint, keys stripped of wrapper prefixes."""
    if not isinstance(checkpoint, dict):
        raise RuntimeError(f"{path}: expected a state dict or a dict with 'model'/'state_dict', "
                           f"found {type(checkpoint).__name__}")
    state = checkpoint
    for field in ("state_dict", "model"):
        if isinstance(checkpoint.get(field), dict):
            state = checkpoint[field]
            break
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def _resize_bias_table(table, size):
    """[(2W-1)^2, heads] -> [size^2, heads], bicubic on the (2W-1) x (2W-1) grid of each head."""
    side = math.isqrt(table.shape[0])
    heads = table.shape[1]
    grid = table.float().t().reshape(1, heads, side, side)
    grid = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)
    return grid.reshape(heads, size * size).t().to(table.dtype)


def _resize_abs_pos_embed(embed, target_shape):
    """File [1, L, C] or [1, C, h, w] -> model shape [1, C, H, W] (bicubic when h, w differ)."""
    _, channels, height, width = target_shape
    if embed.dim() == 3:  # [1, L, C] with L = h*w, h == w
        side = math.isqrt(embed.shape[1])
        if side * side != embed.shape[1]:
            return embed
        embed = embed.reshape(embed.shape[0], side, side, embed.shape[2]).permute(0, 3, 1, 2)
    if embed.dim() != 4 or embed.shape[1] != channels:
        return embed  # reported as a shape mismatch
    if tuple(embed.shape[-2:]) != (height, width):
        embed = F.interpolate(embed.float(), size=(height, width), mode="bicubic", align_corners=False)
    return embed.contiguous()


def _adapt(state, own, logger):
    """Drop classifier and computed buffers; fit window-dependent tensors to the model."""
    dropped = [k for k in state if k.startswith(_CLASSIFIER_PREFIXES) and k not in own]
    if dropped:
        _log(logger, f"not loading the classifier: {_short_list(dropped)}")
    for key in list(state):
        # attention masks depend on the input size and index tables on the window size:
        # the model computes its own
        if key in dropped or key.endswith(".attn_mask") or (key.endswith("relative_position_index") and key in own):
            del state[key]

    resized = 0
    for key, table in state.items():
        if not key.endswith("relative_position_bias_table") or key not in own:
            continue
        rows, heads = own[key].shape
        fits = table.dim() == 2 and table.shape[1] == heads and math.isqrt(table.shape[0]) ** 2 == table.shape[0]
        if fits and table.shape[0] != rows:  # other window size; a head count mismatch is reported later
            state[key] = _resize_bias_table(table, math.isqrt(rows))
            resized += 1
    if resized:
        _log(logger, f"interpolated {resized} relative position bias tables to the model's window size (bicubic)")

    if "absolute_pos_embed" in state and "absolute_pos_embed" in own:
        target = own["absolute_pos_embed"].shape
        state["absolute_pos_embed"] = _resize_abs_pos_embed(state["absolute_pos_embed"], target)


def _incomplete(path, arch, missing, unexpected, prefixes):
    """RuntimeError for a file that lacks tensors of ``model`` under ``prefixes``, or has tensors there that
    the model lacks (a Swin of another depth or key layout)."""
    layout = ""
    if any(k.startswith("stages.") or ".w_msa." in k for k in unexpected):
        layout = ("; its keys are in mmdet / mmpretrain's layout (stages.*, attn.w_msa.*): use the official Swin "
                  "release (layers.*, attn.qkv.*) or convert the key names")
    found = []
    if missing:
        found.append(f"it lacks {len(missing)} of the model's {'/'.join(prefixes)} tensors "
                     f"(e.g. {_short_list(missing, 3)})")
    if unexpected:
        found.append(f"it has {len(unexpected)} tensors the model does not (e.g. {_short_list(unexpected, 3)})")
    return RuntimeError(f"{path} does not fit {arch}: {' and '.join(found)}{layout}; is this the right "
                        f"--pretrained_backbone_path for --backbone {arch}?")


def load_checkpoint(model, filename, map_location="cpu", strict=False, logger=None, required_prefixes=()):
    """Load backbone weights from ``filename`` into ``model``; returns the checkpoint dict.

    Missing and unexpected keys are reported (fatal only when ``strict``); a file with no
    matching key, or with tensors of other shapes, raises RuntimeError naming the file, and so
    does one that misses, or has extra, tensors under ``required_prefixes`` (key starts that a
    file of the model's architecture holds in full, e.g. a Swin's ``layers.``).
    """
    path = os.fspath(filename)
    checkpoint = _read(path, map_location)
    state = _state_dict_of(checkpoint, path)
    if not state:
        raise RuntimeError(f"{path}: no tensors found in the checkpoint")
    own = model.state_dict()
    _adapt(state, own, logger)

    arch = getattr(model, "variant", None) or type(model).__name__
    matched = [k for k in state if k in own]
    if not matched:
        raise RuntimeError(
            f"{path}: none of its {len(state)} tensors matches a parameter of {arch} "
            f"(file has e.g. {_short_list(state, 4)}; model expects e.g. {_short_list(own, 4)}); "
            f"is this the right --pretrained_backbone_path for --backbone {arch}?"
        )
    wrong = [k for k in matched if state[k].shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise RuntimeError(
            f"{path} does not fit {arch}: {len(wrong)} tensors have other shapes, e.g. {k}: "
            f"file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}; "
            f"is this the right --pretrained_backbone_path for --backbone {arch}?"
        )

    computed = {k for k in own if k.endswith("relative_position_index")}
    missing = [k for k in own if k not in state and k not in computed]
    unexpected = [k for k in state if k not in own]
    required = tuple(required_prefixes)
    if required:
        lacking = [k for k in missing if k.startswith(required)]
        extra = [k for k in unexpected if k.startswith(required + ("stages.",))
                 and not k.endswith("relative_position_index")]  # a computed buffer
        if lacking or extra:
            raise _incomplete(path, arch, lacking, extra, required)
    if strict and (missing or unexpected):
        raise RuntimeError(f"{path}: strict loading failed; missing keys: {_short_list(missing)}; "
                           f"unexpected keys: {_short_list(unexpected)}")

    model.load_state_dict({k: state[k] for k in matched}, strict=False)
    _log(logger, f"loaded {len(matched)} tensors from {path} into {arch}")
    if missing:
        _log(logger, f"missing keys (left as initialised): {_short_list(missing, 50)}", logging.WARNING)
    if unexpected:
        _log(logger, f"unexpected keys in {path} (ignored): {_short_list(unexpected, 50)}", logging.WARNING)
    return checkpoint
