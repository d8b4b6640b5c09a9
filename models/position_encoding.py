"""Positional encodings of image feature maps: sine (fixed) and learned."""
import math

import torch
from torch import nn

from util.misc import NestedTensor


class PositionEmbeddingSine(nn.Module):
    """2-d sine/cosine encoding of the (y, x) position of each unpadded pixel, [B, 2*num_pos_feats, H, W].

    Positions count only valid pixels (the padding mask is used), are centred on the pixel ((i - 0.5) with
    i starting at 1) and, when normalized, scaled to [0, scale] by the valid extent of the image.
    """

    def __init__(self, num_pos_feats=64, temperature=10000, normalize=False, scale=None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: a scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, tensor_list: NestedTensor):
        mask = tensor_list.mask
        if mask is None:
            raise ValueError("PositionEmbeddingSine needs the padding mask of the batch")
        valid = ~mask
        y_embed = valid.cumsum(1, dtype=torch.float32)  # [B, H, W]
        x_embed = valid.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t  # [B, H, W, F]
        pos_y = y_embed[:, :, :, None] / dim_t
        # interleave sin (even features) and cos (odd features): [B, H, W, F/2, 2] -> [B, H, W, F]
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # [B, 2F, H, W]


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute row/column embeddings (maps up to 50 x 50), [B, 2*num_pos_feats, H, W]."""

    def __init__(self, num_pos_feats=256):
        super().__init__()
        self.row_embed = nn.Embedding(50, num_pos_feats)
        self.col_embed = nn.Embedding(50, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, tensor_list: NestedTensor):
        x = tensor_list.tensors
        h, w = x.shape[-2:]
        if h > self.row_embed.num_embeddings or w > self.col_embed.num_embeddings:
            raise ValueError(f"learned position embedding covers at most 50 x 50 positions, got a {h} x {w} map; "
                             "use --position_embedding sine for larger inputs")
        x_emb = self.col_embed(torch.arange(w, device=x.device))  # [W, F]
        y_emb = self.row_embed(torch.arange(h, device=x.device))  # [H, F]
        pos = torch.cat([x_emb.unsqueeze(0).expand(h, w, -1), y_emb.unsqueeze(1).expand(h, w, -1)], dim=-1)
        return pos.permute(2, 0, 1).unsqueeze(0).repeat(x.shape[0], 1, 1, 1)  # [B, 2F, H, W]


def build_position_encoding(args):
    num_pos_feats = args.hidden_dim // 2
    if args.position_embedding == "sine":
        return PositionEmbeddingSine(num_pos_feats, normalize=True, scale=args.position_embedding_scale)
    if args.position_embedding == "learned":
        return PositionEmbeddingLearned(num_pos_feats)
    raise ValueError(f"unknown --position_embedding {args.position_embedding!r}; use 'sine' or 'learned'")
