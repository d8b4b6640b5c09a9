"""Loading MAE pre-trained ViT weights into models.vit.ViT: the official MAE release ({"model": state dict},
e.g. mae_pretrain_vit_large.pth, decoder included or not) and timm's files (a plain state dict, or safetensors).

Only the encoder is kept: the class token, the final norm, a classifier and the MAE decoder are dropped; the
position embedding is resized to the model's pre-training grid. Anything else that does not fit is an error naming
the file and the tensor.
"""
import math
import os
import re

import torch

from mmcv_custom.checkpoint import _read, _state_dict_of

from .vit import grid_position_embedding

# parts of MAE / timm files that the detection encoder does not have
DROPPED_PREFIXES = ("decoder_", "mask_token", "cls_token", "norm.", "fc_norm.", "head.")
# ViTDet's relative position tables: not in MAE files, they stay as initialised (zeros) when absent
OPTIONAL = re.compile(r"^blocks\.\d+\.attn\.rel_pos_[hw]$")


def read_state_dict(path):
    """The tensors of a .pth / .safetensors file, unwrapped from {"model": ...} / {"state_dict": ...}."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        return _state_dict_of(_read(path, "cpu"), path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights not found: {path} (no such file)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as err:
        raise RuntimeError(f"{path} is not a readable safetensors file ({err})") from err


def _describe(state):
    """"depth D, width W" of the ViT whose tensors are in `state`."""
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    proj = state.get("patch_embed.proj.weight")
    width = proj.shape[0] if proj is not None else "?"
    return f"depth {depth}, width {width}"


def _shortlist(keys, limit=6):
    keys = list(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def fit_position_embedding(embed, shape, where):
    """A file's position embedding [1, 1 + n*n, C] (or [1, n*n, C], without the class-token slot) -> `shape`
    = [1, 1 + m*m, C]: the grid resized bicubically, the class-token slot kept (zeros when the file has none)."""
    if embed.dim() != 3 or embed.shape[0] != 1 or embed.shape[2] != shape[2]:
        raise RuntimeError(f"{where}: pos_embed is {tuple(embed.shape)}, the model needs [1, 1 + n*n, {shape[2]}]")
    tokens = embed.shape[1]
    if tokens > 1 and math.isqrt(tokens - 1) ** 2 == tokens - 1:
        cls_slot, grid = embed[:, :1], embed[:, 1:]
    elif math.isqrt(tokens) ** 2 == tokens:
        cls_slot, grid = embed.new_zeros(1, 1, shape[2]), embed
    else:
        raise RuntimeError(f"{where}: pos_embed has {tokens} positions, neither a square grid nor one plus a "
                           "square grid")
    side = math.isqrt(shape[1] - 1)
    resized = grid_position_embedding(torch.cat([cls_slot, grid], 1).float(), side, side)  # [1, m, m, C]
    return torch.cat([cls_slot.float(), resized.reshape(1, side * side, -1)], 1)


def load_mae_checkpoint(vit, path, name="the ViT"):
    """Copy the encoder of the MAE / timm ViT file `path` into `vit` (a models.vit.ViT); returns the keys loaded."""
    path = os.fspath(path)
    state = read_state_dict(path)
    dropped = [k for k in state if k.startswith(DROPPED_PREFIXES)]
    state = {k: v for k, v in state.items() if k not in dropped}
    own = vit.state_dict()
    if not any(k.startswith("blocks.") for k in state):
        raise RuntimeError(
            f"{path} is not a ViT checkpoint (MAE or timm format): it has no blocks.N.* tensors (it holds e.g. "
            f"{_shortlist(list(dropped) + list(state), 4)}); --backbone {name} needs an MAE pre-trained ViT file "
            "such as mae_pretrain_vit_large.pth")

    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not OPTIONAL.match(k)]
    if unexpected or missing:
        raise RuntimeError(
            f"{path} does not fit --backbone {name} (file: {_describe(state)}; model: {_describe(own)}): "
            f"{len(missing)} tensors missing from the file [{_shortlist(missing)}], {len(unexpected)} unexpected "
            f"[{_shortlist(unexpected)}]")
    grid = None
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        grid = (state["pos_embed"].shape[1], own["pos_embed"].shape[1])
        state["pos_embed"] = fit_position_embedding(state["pos_embed"], own["pos_embed"].shape, path)
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise RuntimeError(f"{path} does not fit --backbone {name} (file: {_describe(state)}; model: "
                               f"{_describe(own)}): tensor {key} is {tuple(value.shape)} in the file, "
                               f"{tuple(own[key].shape)} in the model")

    vit.load_state_dict(state, strict=False)
    notes = [f"dropped {_shortlist(dropped, 3)}"] if dropped else []
    if grid:
        notes.append(f"position embedding resized from {grid[0]} to {grid[1]} positions")
    absent = [k for k in own if k not in state]
    if absent:
        notes.append(f"{len(absent)} relative position tables not in the file, left at zero")
    print(f"loaded {len(state)} tensors of {path} into {name}" + "".join(f"; {n}" for n in notes))
    return list(state)
