"""The multi-scale deformable attention module (Deformable DETR, Zhu et al. 2021)."""
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..functions import ms_deform_attn


def _per_point(pair, n_points):
    """[N, Lq, L, 2] -> [N, Lq, 1, L, P * 2]: each level's (x, y) repeated for the P points."""
    n, num_queries, levels, _ = pair.shape
    return pair[:, :, None, :, None, :].expand(n, num_queries, 1, levels, n_points, 2).reshape(
        n, num_queries, 1, levels, n_points * 2)


class MSDeformAttn(nn.Module):
    """Each query attends to n_points sampled locations per head and level around its reference point/box.

    d_model: hidden size; n_levels: feature levels; n_heads: attention heads; n_points: points per head and level.
    """

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, got {d_model} and {n_heads}")
        head_dim = d_model // n_heads
        if head_dim & (head_dim - 1) != 0:
            warnings.warn(f"MSDeformAttn: {head_dim} channels per head is not a power of 2, which is slower "
                          "in the CUDA kernel", stacklevel=2)
        self.im2col_step = 64
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        # offsets start as a fixed pattern: head h points in direction 2*pi*h/M, point p at distance p + 1
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        # [M, 2] -> [M, L, P, 2]
        pattern = directions.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        pattern = pattern * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(pattern.flatten())
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index,
                input_padding_mask=None, level_sizes=None):
        """
        query:              [N, Lq, C]
        reference_points:   [N, Lq, L, 2] points (x, y) in [0, 1] of the padded map,
                            or [N, Lq, L, 4] boxes (cx, cy, w, h) whose size scales the offsets
        input_flatten:      [N, S, C] with S = sum of H_l * W_l
        input_spatial_shapes [L, 2] (H_l, W_l); input_level_start_index [L]
        input_padding_mask: [N, S], True on padding
        level_sizes:        ((H_l, W_l), ...) as Python ints, as the model passes them; None: read from
                            input_spatial_shapes (on a GPU a wait for the device)
        returns             [N, Lq, C]
        Under autocast the projections run in its dtype while the offsets, the softmax of the attention weights and
        the sampling locations are computed in float32 (at least: float64 stays), and so is the sampling's sum.
        """
        n, num_queries, _ = query.shape
        _, num_values, _ = input_flatten.shape
        if input_spatial_shapes.shape != (self.n_levels, 2):
            raise ValueError(f"MSDeformAttn of {self.n_levels} levels: input_spatial_shapes must be [{self.n_levels}, "
                             f"2], got {list(input_spatial_shapes.shape)}")
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value.masked_fill_(input_padding_mask[..., None], 0.0)  # in place: the projection's own output
        value = value.view(n, num_values, self.n_heads, self.d_model // self.n_heads)
        # offsets [N, Lq, M, L, P * 2]: the points' (x, y) pairs side by side, so that the elementwise kernels
        # below run over a long contiguous last dimension (over a last dimension of 2, broadcast, the CPU kernels
        # are 2-4x slower); the operations and so the values are the same as in the [.., P, 2] layout
        pairs = self.n_points * 2
        offsets = self.sampling_offsets(query)
        weights = self.attention_weights(query)
        # at least float32, else the widest of the inputs (as upstream's arithmetic promotes): a no-op outside autocast
        precise = torch.promote_types(torch.promote_types(reference_points.dtype, offsets.dtype), torch.float32)
        reference_points = reference_points.to(precise)
        offsets = offsets.to(precise).view(n, num_queries, self.n_heads, self.n_levels, pairs)
        weights = weights.to(precise).view(n, num_queries, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1).view(n, num_queries, self.n_heads, self.n_levels, self.n_points)

        # sampling locations [N, Lq, M, L, P * 2]
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: normalise by (W_l, H_l); normalizer [L, P * 2]
            normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            normalizer = normalizer.to(offsets.dtype)[:, None, :].expand(-1, self.n_points, 2).reshape(-1, pairs)
            # reference + offsets / normalizer, in one pass
            locations = torch.addcdiv(_per_point(reference_points, self.n_points), offsets, normalizer)
        elif reference_points.shape[-1] == 4:
            # offsets are relative to the reference box: half its size reached by the farthest point
            # reference centre + offsets / n_points * size * 0.5, in one pass over the large tensor
            locations = torch.addcmul(_per_point(reference_points[..., :2], self.n_points), offsets / self.n_points,
                                      _per_point(reference_points[..., 2:] * 0.5, self.n_points))
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {reference_points.shape[-1]}")
        locations = locations.view(n, num_queries, self.n_heads, self.n_levels, self.n_points, 2)

        output = ms_deform_attn(value, input_spatial_shapes, input_level_start_index, locations, weights,
                                self.im2col_step, level_sizes)
        return self.output_proj(output)
