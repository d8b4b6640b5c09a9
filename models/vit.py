"""Plain ViT image encoder (ViTDet style, for MAE pre-trained weights) and its simple feature pyramid.

Module and parameter names are those of the ViT fork of H-Deformable-DETR (kxqt/H-Deformable-DETR, after
detectron2's ViTDet): `net` is the encoder, `simfp_3/4/5` the pyramid levels of stride 8/16/32. The encoder's
names are MAE's and timm's, so their files load into it (models/mae_checkpoint.py).

Numerics as ViTDet: pre-norm blocks (LayerNorm eps 1e-6), window attention on zero-padded windows in most blocks
and global attention in a few, decomposed relative position embeddings (MViTv2) in every block, the pre-training
absolute position embedding resized bicubically to the input grid, stochastic depth growing linearly over blocks.
"""
import math
import re
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, LayerNorm2d, Mlp, trunc_normal_
from torch import nn

from util.tracing import is_exporting

from .swin_transformer import PatchEmbed, padded_to_windows, window_partition, window_reverse


@dataclass(frozen=True)
class ViTSize:
    """Shape of a ViT backbone."""

    embed_dim: int
    depth: int
    num_heads: int
    global_blocks: Tuple[int, ...]  # blocks with global attention; the others attend inside windows
    window_size: int = 14
    patch_size: int = 16
    pretrain_img_size: int = 224  # grid of the pre-trained absolute position embedding (plus a class-token slot)
    img_size: int = 1024  # grid the global blocks' relative position tables are sized for (resized otherwise)
    mlp_ratio: float = 4.0
    pyramid_channels: int = 256


# the fork's sizes (ViTDet's): global attention in four evenly spaced blocks
VIT_SIZES = {
    "vit_base": ViTSize(embed_dim=768, depth=12, num_heads=12, global_blocks=(2, 5, 8, 11)),
    "vit_large": ViTSize(embed_dim=1024, depth=24, num_heads=16, global_blocks=(5, 11, 17, 23)),
}
# the input is padded to a multiple of the coarsest pyramid stride, so every level's grid is exact
SIZE_DIVISIBILITY = 32


def relative_position_embeddings(table, size):
    """[size (query), size (key), C] embeddings of the offsets query - key, from a learned table [L, C] made for
    L = 2 * size - 1 offsets (linearly resized when L differs)."""
    length = 2 * size - 1
    if table.shape[0] != length or is_exporting():  # an exported graph resizes for every size
        table = F.interpolate(table.t()[None], size=length, mode="linear")[0].t()  # [C, L] resized, back to [L', C]
    offsets = torch.arange(size, device=table.device)
    return table[offsets[:, None] - offsets[None, :] + size - 1]


def decomposed_rel_pos_bias(q, rel_pos_h, rel_pos_w, h, w):
    """Attention bias [B, h*w (query), h*w (key)]: q [B, h*w, C] (unscaled) dotted with the embeddings of the
    row offset plus those of the column offset of each query-key pair."""
    rows = relative_position_embeddings(rel_pos_h, h)  # [h, h, C]
    cols = relative_position_embeddings(rel_pos_w, w)  # [w, w, C]
    q = q.reshape(q.shape[0], h, w, q.shape[-1])
    bias_rows = torch.einsum("bhwc,hkc->bhwk", q, rows)  # [B, h, w, h (key row)]
    bias_cols = torch.einsum("bhwc,wkc->bhwk", q, cols)  # [B, h, w, w (key column)]
    return (bias_rows[..., :, None] + bias_cols[..., None, :]).reshape(q.shape[0], h * w, h * w)


def grid_position_embedding(pos_embed, h, w):
    """[1, 1 + n*n, C] (class-token slot first, then an n x n grid) -> [1, h, w, C], resized bicubically."""
    grid = pos_embed[:, 1:]
    n = math.isqrt(grid.shape[1])
    grid = grid.reshape(1, n, n, -1)
    if (n, n) != (h, w) or is_exporting():  # an exported graph resizes for every size
        grid = F.interpolate(grid.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1)
    return grid


class Attention(nn.Module):
    """Multi-head self-attention over a [B, H, W, C] grid with decomposed relative position embeddings."""

    def __init__(self, dim, num_heads, grid):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        # zero-initialised (MAE has none), sized for a grid x grid input
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid - 1, head_dim))

    def forward(self, x):
        b, h, w, c = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(b, h * w, 3, heads, c // heads).permute(2, 0, 3, 1, 4)  # [3, B, heads, N, d]
        q, k, v = qkv.unbind(0)
        bias = decomposed_rel_pos_bias(q.reshape(b * heads, h * w, -1), self.rel_pos_h, self.rel_pos_w, h, w)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(b, heads, h * w, h * w).to(q.dtype))
        return self.proj(x.transpose(1, 2).reshape(b, h, w, c))  # [B, heads, N, d] -> [B, H, W, C]


class Block(nn.Module):
    """Pre-norm transformer block on a [B, H, W, C] grid: attention in window_size windows (0: global), MLP."""

    def __init__(self, dim, num_heads, mlp_ratio, drop_path, window_size, grid):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, window_size or grid)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.window_size = window_size

    def forward(self, x):
        shortcut = x
        x = self.norm1(x)
        ws = self.window_size
        if ws:
            b, h, w = x.shape[:3]
            hp, wp = padded_to_windows(h, ws), padded_to_windows(w, ws)
            x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))  # zero tokens at the bottom/right
            x = self.attn(window_partition(x, ws))  # [B * windows, ws, ws, C]
            x = window_reverse(x, ws, hp, wp, b)[:, :h, :w]
        else:
            x = self.attn(x)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """ViT encoder: [B, 3, H, W] -> [B, C, H/16, W/16] (sizes rounded up to whole patches)."""

    def __init__(self, size: ViTSize, drop_path_rate=0.0, use_checkpoint=False):
        super().__init__()
        self.size = size
        self.embed_dim = size.embed_dim
        self.use_checkpoint = use_checkpoint
        self.patch_embed = PatchEmbed(size.patch_size, 3, size.embed_dim)
        pretrain_grid = size.pretrain_img_size // size.patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pretrain_grid ** 2, size.embed_dim))
        rates = torch.linspace(0, drop_path_rate, size.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(size.embed_dim, size.num_heads, size.mlp_ratio, rates[i],
                  0 if i in size.global_blocks else size.window_size, size.img_size // size.patch_size)
            for i in range(size.depth)
        )
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_module)

    @staticmethod
    def _init_module(m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.patch_embed(x).permute(0, 2, 3, 1)  # [B, C, h, w] -> [B, h, w, C]
        x = x + grid_position_embedding(self.pos_embed, x.shape[1], x.shape[2])
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x.permute(0, 3, 1, 2)


def _pyramid_level(dim, channels, level):
    """Stride 2**level from the stride-16 map: x2 transposed conv (3), identity (4) or 2x2 max pool (5), then
    1x1 conv, LayerNorm, 3x3 conv, LayerNorm to `channels` (ViTDet's simple feature pyramid, no conv biases)."""
    if level == 3:
        layers, in_dim = [nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2)], dim // 2
    elif level == 4:
        layers, in_dim = [], dim
    elif level == 5:
        layers, in_dim = [nn.MaxPool2d(kernel_size=2, stride=2)], dim
    else:
        raise ValueError(f"pyramid level {level} is not one of 3, 4, 5 (strides 8, 16, 32)")
    layers += [nn.Conv2d(in_dim, channels, kernel_size=1, bias=False), LayerNorm2d(channels, eps=1e-6),
               nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False), LayerNorm2d(channels, eps=1e-6)]
    return nn.Sequential(*layers)


class SimpleFeaturePyramid(nn.Module):
    """The ViT `net` and pyramid levels made from its last map; returns {"p<level>": [B, channels, H_l, W_l]}.

    Input sizes must be multiples of 32 (ViTBackbone pads them)."""

    def __init__(self, net: ViT, channels, levels=(3, 4, 5)):
        super().__init__()
        self.levels = tuple(levels)
        for level in self.levels:  # registered before `net`, as the fork does: same state-dict order
            self.add_module(f"simfp_{level}", _pyramid_level(net.embed_dim, channels, level))
        self.net = net
        self.num_channels = [channels] * len(self.levels)
        self.strides = [2 ** level for level in self.levels]

    def forward(self, x):
        features = self.net(x)
        return {f"p{level}": getattr(self, f"simfp_{level}")(features) for level in self.levels}


def build_vit_backbone(name, num_outputs=3, drop_path_rate=0.0, use_checkpoint=False):
    """ViT of VIT_SIZES[name] with the last num_outputs of the stride 8/16/32 levels (randomly initialised)."""
    if name not in VIT_SIZES:
        raise ValueError(f"unknown ViT {name!r}; choose one of {tuple(VIT_SIZES)}")
    if not 1 <= num_outputs <= 3:
        raise ValueError(f"a ViT pyramid gives 1 to 3 levels, not {num_outputs}")
    size = VIT_SIZES[name]
    net = ViT(size, drop_path_rate=drop_path_rate, use_checkpoint=use_checkpoint)
    return SimpleFeaturePyramid(net, size.pyramid_channels, levels=(3, 4, 5)[-num_outputs:])


# --------------------------------------------------------------------------- layer-wise learning-rate decay

_BLOCK = re.compile(r"(?:^|\.)net\.blocks\.(\d+)\.")
_EMBEDDING = re.compile(r"(?:^|\.)net\.(?:pos_embed$|patch_embed\.)")


def vit_layer_id(param_name, num_blocks):
    """0 for the patch and position embeddings, i + 1 for block i, num_blocks + 1 for anything else (the pyramid);
    param_name as in model.named_parameters() (e.g. backbone.0.body.net.blocks.3.attn.qkv.weight)."""
    block = _BLOCK.search(param_name)
    if block:
        return int(block.group(1)) + 1
    return 0 if _EMBEDDING.search(param_name) else num_blocks + 1


def layer_decay_param_groups(named_params, num_blocks, lr, layer_decay, weight_decay):
    """Optimizer groups for a ViT backbone's (name, parameter) pairs, as the fork: learning rate
    lr * layer_decay ** (num_blocks + 1 - layer id), so that the pyramid gets lr, the last block lr * layer_decay
    and the embeddings lr * layer_decay ** (num_blocks + 1); no weight decay on the position embedding. The groups
    depend on the names alone, not on the values (a run with weight_decay 0 resumes with another)."""
    groups = {}
    for name, param in named_params:
        layer = vit_layer_id(name, num_blocks)
        decayed = not name.endswith("pos_embed")  # the position embedding's group first in its layer, as the fork
        group = groups.setdefault((layer, decayed), {"params": [], "lr": lr * layer_decay ** (num_blocks + 1 - layer),
                                                     "weight_decay": weight_decay if decayed else 0.0})
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]
