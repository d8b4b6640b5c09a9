"""Swin Transformer backbone for detection (no mmcv).

Module layout and parameter names follow the official Swin detection release, so the
official ImageNet classification files load into it (see ``mmcv_custom.load_checkpoint``)
and the ``backbone.0.body.*`` keys of H-Deformable-DETR checkpoints match exactly.
The numerics (window order, relative position index, cyclic shift, mask value -100,
zero padding after ``norm1``) are those of the official implementation.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, to_2tuple, trunc_normal_

from mmcv_custom import load_checkpoint

# name -> (embed_dim, depths, num_heads, window_size, pretrain_img_size)
SWIN_VARIANTS = {
    "swin_tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 224),
    "swin_small": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7, 224),
    "swin_large": (192, (2, 2, 18, 2), (6, 12, 24, 48), 7, 224),
    "swin_large_window12": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12, 384),
}


def padded_to_windows(n, ws):
    """n rounded up to a multiple of ws. Written as a product: under torch.export the symbolic sizes then stay simple
    enough (a modulo at every stage makes tracing take many minutes)."""
    return (n + ws - 1) // ws * ws


def window_partition(x, ws):
    """[B, H, W, C] (H, W multiples of ws) -> [B * nW, ws, ws, C], windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    # sizes spelled out, not -1: under torch.export inferring -1 from symbolic sizes is very slow
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b * (h // ws) * (w // ws), ws, ws, c)


def window_reverse(windows, ws, h, w, b):
    """Inverse of window_partition: [B * nW, ws * ws or (ws, ws), C] -> [B, H, W, C]."""
    c = windows.shape[-1]
    x = windows.view(b, h // ws, w // ws, ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def relative_position_index(ws):
    """[ws*ws, ws*ws] index into the (2ws-1)^2 bias table for each (query, key) pair."""
    rows, cols = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])  # [2, N]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # [N, N, 2], query - key
    rel = rel + (ws - 1)  # shift both offsets to start at 0
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def shifted_window_mask(hp, wp, ws, shift, device):
    """Additive mask [nW, ws*ws, ws*ws]: -100 between tokens that were not neighbours before
    the cyclic shift, 0 otherwise. hp, wp are the padded feature sizes."""

    def region(n):
        # three bands after rolling by -shift: [0, n-ws), [n-ws, n-shift), [n-shift, n)
        idx = torch.arange(n, device=device)
        return (idx >= n - ws).long() + (idx >= n - shift).long()

    labels = region(hp)[:, None] * 3 + region(wp)[None, :]  # [Hp, Wp]
    labels = window_partition(labels[None, :, :, None], ws).flatten(1)  # [nW, ws, ws, 1] -> [nW, N]
    differs = labels[:, None, :] != labels[:, :, None]  # [nW, N, N]
    return torch.zeros(differs.shape, device=device).masked_fill(differs, -100.0)


class Mlp(nn.Module):
    """Two-layer feed-forward network with GELU."""

    def __init__(self, in_features, hidden_features, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias."""

    def __init__(self, dim, window_size, num_heads, qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x, mask=None):
        """x: [B * nW, N, C]; mask: [nW, N, N] additive, or None."""
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]  # each [B * nW, heads, N, head_dim]
        attn = q @ k.transpose(-2, -1)  # [B * nW, heads, N, N]

        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.view(bw, self.num_heads, n, n)
        attn = self.attn_drop(attn.softmax(dim=-1))

        x = (attn @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(self.proj(x))


class SwinTransformerBlock(nn.Module):
    """(Shifted) window attention + MLP, both pre-norm with residuals; any H, W."""

    def __init__(self, dim, num_heads, window_size=7, shift_size=0, mlp_ratio=4.0, qkv_bias=True, qk_scale=None,
                 drop=0.0, attn_drop=0.0, drop_path=0.0, norm_layer=nn.LayerNorm):
        super().__init__()
        assert 0 <= shift_size < window_size, "shift_size must be in [0, window_size)"
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x, h, w, attn_mask):
        """x: [B, H*W, C]; attn_mask: [nW, N, N] for the padded size, used only when shifted."""
        b, _, c = x.shape
        ws, shift = self.window_size, self.shift_size
        shortcut = x

        x = self.norm1(x).view(b, h, w, c)
        hp, wp = padded_to_windows(h, ws), padded_to_windows(w, ws)
        x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))  # zero tokens on the bottom/right
        if shift > 0:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))

        windows = window_partition(x, ws).flatten(1, 2)  # [B * nW, ws, ws, C] -> [B * nW, N, C]
        windows = self.attn(windows, mask=attn_mask if shift > 0 else None)
        x = window_reverse(windows, ws, hp, wp, b)  # [B, Hp, Wp, C]

        if shift > 0:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        x = x[:, :h, :w, :].reshape(b, h * w, c)

        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Concatenate each 2x2 neighbourhood (4C) and project to 2C; halves H and W (rounding up)."""

    def __init__(self, dim, norm_layer=nn.LayerNorm):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)  # registered first, as in the official release
        self.norm = norm_layer(4 * dim)

    def forward(self, x, h, w):
        """[B, H*W, C] -> [B, ceil(H/2)*ceil(W/2), 2C]."""
        b, _, c = x.shape
        h2, w2 = (h + 1) // 2, (w + 1) // 2
        x = F.pad(x.view(b, h, w, c), (0, 0, 0, 2 * w2 - w, 0, 2 * h2 - h))
        x = x.view(b, h2, 2, w2, 2, c)  # [B, H', row parity, W', column parity, C]
        # order (even row, even col), (odd, even), (even, odd), (odd, odd) as in the official code
        x = torch.cat([x[:, :, 0, :, 0], x[:, :, 1, :, 0], x[:, :, 0, :, 1], x[:, :, 1, :, 1]], dim=-1)
        return self.reduction(self.norm(x.flatten(1, 2)))  # [B, H', W', 4C] -> [B, H'*W', 4C]


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks alternating regular / shifted windows, then optional merging."""

    def __init__(self, dim, depth, num_heads, window_size=7, mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop=0.0,
                 attn_drop=0.0, drop_path=(), norm_layer=nn.LayerNorm, downsample=None, use_checkpoint=False):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim, num_heads, window_size, 0 if i % 2 == 0 else self.shift_size, mlp_ratio, qkv_bias, qk_scale,
                drop, attn_drop, drop_path[i], norm_layer,
            )
            for i in range(depth)
        )
        self.downsample = downsample(dim, norm_layer=norm_layer) if downsample is not None else None

    def forward(self, x, h, w):
        """x: [B, H*W, C] -> (stage output [B, H*W, C], next input [B, H'*W', C'], H', W')."""
        ws = self.window_size
        hp, wp = padded_to_windows(h, ws), padded_to_windows(w, ws)  # as the blocks pad
        attn_mask = shifted_window_mask(hp, wp, ws, self.shift_size, x.device)
        for blk in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, h, w, attn_mask, use_reentrant=False)
            else:
                x = blk(x, h, w, attn_mask)
        if self.downsample is None:
            return x, x, h, w
        return x, self.downsample(x, h, w), (h + 1) // 2, (w + 1) // 2


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection; pads the image to a multiple of the patch size."""

    def __init__(self, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None):
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x):
        """[B, 3, H, W] -> [B, C, ceil(H/p), ceil(W/p)]."""
        ph, pw = self.patch_size
        h, w = x.shape[-2:]
        x = F.pad(x, (0, padded_to_windows(w, pw) - w, 0, padded_to_windows(h, ph) - h))
        x = self.proj(x)
        if self.norm is not None:
            b, c, h, w = x.shape
            x = self.norm(x.flatten(2).transpose(1, 2))  # [B, H*W, C]
            x = x.transpose(1, 2).reshape(b, c, h, w)
        return x


class SwinTransformer(nn.Module):
    """Swin Transformer returning ``{str(i): [B, C_i, H_i, W_i]}`` for the stages in ``out_indices``."""

    def __init__(self, pretrain_img_size=224, patch_size=4, in_chans=3, embed_dim=96, depths=(2, 2, 6, 2),
                 num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop_rate=0.0,
                 attn_drop_rate=0.0, drop_path_rate=0.2, norm_layer=nn.LayerNorm, ape=False, patch_norm=True,
                 out_indices=(1, 2, 3), frozen_stages=-1, use_checkpoint=False):
        super().__init__()
        self.variant = None  # set by build_swin_backbone; used in checkpoint error messages
        self.num_layers = len(depths)
        self.ape = ape
        self.out_indices = tuple(out_indices)
        self.frozen_stages = frozen_stages
        self.window_size = window_size
        num_features = [int(embed_dim * 2 ** i) for i in range(self.num_layers)]
        self.num_features = num_features
        self.num_channels = [num_features[i] for i in self.out_indices]
        self.strides = [patch_size * 2 ** i for i in self.out_indices]

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm_layer if patch_norm else None)
        if ape:
            grid = [s // patch_size for s in to_2tuple(pretrain_img_size)]
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, grid[0], grid[1]))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(p=drop_rate)

        # stochastic depth rate grows linearly over all blocks
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i in range(self.num_layers):
            first = sum(depths[:i])
            self.layers.append(BasicLayer(
                num_features[i], depths[i], num_heads[i], window_size, mlp_ratio, qkv_bias, qk_scale, drop_rate,
                attn_drop_rate, dpr[first:first + depths[i]], norm_layer,
                PatchMerging if i < self.num_layers - 1 else None, use_checkpoint,
            ))
        for i in self.out_indices:
            self.add_module(f"norm{i}", norm_layer(num_features[i]))
        self._freeze_stages()

    def _freeze_stages(self):
        """Eval mode and no gradients for patch embedding (>= 0), APE (>= 1), stages < frozen_stages - 1."""
        frozen = []
        if self.frozen_stages >= 0:
            frozen.append(self.patch_embed)
        if self.frozen_stages >= 1 and self.ape:
            self.absolute_pos_embed.requires_grad = False
        if self.frozen_stages >= 2:
            frozen.append(self.pos_drop)
            frozen.extend(self.layers[: self.frozen_stages - 1])
        for module in frozen:
            module.eval()
            for p in module.parameters():
                p.requires_grad = False

    @staticmethod
    def _init_module(m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def init_weights(self, pretrained=None, logger=None):
        """Re-initialise Linear/LayerNorm weights; then load ``pretrained`` (a path) if given."""
        self.apply(self._init_module)
        if isinstance(pretrained, (str, os.PathLike)):
            load_checkpoint(self, pretrained, strict=False, logger=logger)
        elif pretrained is not None:
            raise TypeError(f"pretrained must be a path or None, got {type(pretrained).__name__}")

    def forward(self, x):
        x = self.patch_embed(x)  # [B, C, Wh, Ww]
        h, w = x.shape[-2:]
        if self.ape:
            pos = F.interpolate(self.absolute_pos_embed, size=(h, w), mode="bicubic")
            x = x + pos
        x = self.pos_drop(x.flatten(2).transpose(1, 2))  # [B, Wh*Ww, C]

        outs = {}
        for i, layer in enumerate(self.layers):
            out, x, h_next, w_next = layer(x, h, w)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(out)
                outs[str(i)] = out.view(out.shape[0], h, w, self.num_features[i]).permute(0, 3, 1, 2).contiguous()
            h, w = h_next, w_next
        return outs

    def train(self, mode=True):
        super().train(mode)
        self._freeze_stages()
        return self


def build_swin_backbone(name, drop_path_rate=0.2, use_checkpoint=False, out_indices=(1, 2, 3)):
    """SwinTransformer for a variant of ``SWIN_VARIANTS`` (randomly initialised)."""
    if name not in SWIN_VARIANTS:
        raise ValueError(f"unknown Swin variant {name!r}; valid: {', '.join(SWIN_VARIANTS)}")
    embed_dim, depths, num_heads, window_size, img_size = SWIN_VARIANTS[name]
    model = SwinTransformer(
        pretrain_img_size=img_size, embed_dim=embed_dim, depths=depths, num_heads=num_heads,
        window_size=window_size, drop_path_rate=drop_path_rate, ape=False, patch_norm=True,
        out_indices=out_indices, use_checkpoint=use_checkpoint,
    )
    model.variant = name
    return model
