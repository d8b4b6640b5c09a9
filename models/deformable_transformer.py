"""Deformable transformer: multi-scale deformable encoder, decoder with query self-attention, two-stage proposals."""
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.ops.functions.ms_deform_attn_func import spatial_shapes_tensor
from models.ops.modules import MSDeformAttn
from util.amp import float32_call
from util.box_ops import refine_boxes

from .attention import query_self_attention
from .feed_forward import feed_forward


def _clones(module, n):
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def _activation(name):
    # relu in place on the first feed-forward layer's output, which nothing else keeps: one [tokens, d_ffn] less
    activations = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}
    if name not in activations:
        raise ValueError(f"activation should be one of {sorted(activations)}, not {name!r}")
    return activations[name]


def _with_pos(tensor, pos):
    return tensor if pos is None else tensor + pos


def _run_layer(layer, use_checkpoint, *inputs):
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(layer, *inputs, use_reentrant=False)
    return layer(*inputs)


class DeformableTransformerEncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then a feed-forward block (post-norm)."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, activation="relu", n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _activation(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward_ffn(self, src):
        src2 = feed_forward(self.linear1, self.linear2, self.activation, self.dropout2, src)
        return self.norm2(src + self.dropout3(src2))

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, level_sizes, padding_mask=None):
        src2 = self.self_attn(_with_pos(src, pos), reference_points, src, spatial_shapes, level_start_index,
                              padding_mask, level_sizes)
        src = self.norm1(src + self.dropout1(src2))
        return self.forward_ffn(src)


class DeformableTransformerEncoder(nn.Module):
    def __init__(self, encoder_layer, num_layers, use_checkpoint=False):
        super().__init__()
        self.layers = _clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.use_checkpoint = use_checkpoint

    @staticmethod
    def get_reference_points(level_sizes, valid_ratios, device):
        """Pixel centres of every level ((H_l, W_l) ints), normalised by the valid extent, seen from every level:
        [B, S, L, 2]."""
        per_level = []
        for level, (h, w) in enumerate(level_sizes):
            ref_y, ref_x = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=device) + 0.5,
                torch.arange(w, dtype=torch.float32, device=device) + 0.5,
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)  # [B, H*W]
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
            per_level.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(per_level, 1)  # [B, S, 2]
        return reference_points[:, :, None] * valid_ratios[:, None]  # [B, S, L, 2]

    def forward(self, src, spatial_shapes, level_start_index, level_sizes, valid_ratios, pos=None,
                padding_mask=None):
        output = src
        reference_points = self.get_reference_points(level_sizes, valid_ratios, device=src.device)
        for layer in self.layers:
            output = _run_layer(layer, self.use_checkpoint, output, pos, reference_points, spatial_shapes,
                                level_start_index, level_sizes, padding_mask)
        return output


class DeformableTransformerDecoderLayer(nn.Module):
    """Query self-attention (within the query groups), deformable cross-attention, feed-forward (post-norm)."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, activation="relu", n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _activation(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward_ffn(self, tgt):
        tgt2 = feed_forward(self.linear1, self.linear2, self.activation, self.dropout3, tgt)
        return self.norm3(tgt + self.dropout4(tgt2))

    def forward(self, tgt, query_pos, reference_points, src, src_spatial_shapes, level_start_index, level_sizes,
                src_padding_mask=None, query_groups=None):
        tgt2 = query_self_attention(self.self_attn, _with_pos(tgt, query_pos), tgt, query_groups)
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.cross_attn(_with_pos(tgt, query_pos), reference_points, src, src_spatial_shapes,
                               level_start_index, src_padding_mask, level_sizes)
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        return self.forward_ffn(tgt)


class DeformableTransformerDecoder(nn.Module):
    """Stack of decoder layers returning every layer's output and reference.

    With `bbox_embed` set (iterative box refinement) each layer refines the reference boxes; the next layer
    sees them detached. With look_forward_twice the returned references keep their gradient, so a layer's
    box head is also trained through the next layer's prediction. The box heads' outputs (deltas) are returned
    too, for the detection head to reuse.
    """

    def __init__(self, decoder_layer, num_layers, return_intermediate=False, look_forward_twice=False,
                 use_checkpoint=False):
        super().__init__()
        self.layers = _clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.return_intermediate = return_intermediate
        self.look_forward_twice = look_forward_twice
        self.use_checkpoint = use_checkpoint
        # set by DeformableDETR: per-layer box heads (box refinement) and class heads (two-stage proposals)
        self.bbox_embed = None
        self.class_embed = None

    def forward(self, tgt, reference_points, src, src_spatial_shapes, src_level_start_index, src_level_sizes,
                src_valid_ratios, query_pos=None, src_padding_mask=None, query_groups=None):
        output = tgt
        outputs, references, box_deltas = [], [], []
        for lid, layer in enumerate(self.layers):
            # references as seen from each level's valid area: [B, Q, L, 2 or 4]
            if reference_points.shape[-1] == 4:
                ratios = torch.cat([src_valid_ratios, src_valid_ratios], -1)
            else:
                ratios = src_valid_ratios
            reference_points_input = reference_points[:, :, None] * ratios[:, None]
            output = _run_layer(layer, self.use_checkpoint, output, query_pos, reference_points_input, src,
                                src_spatial_shapes, src_level_start_index, src_level_sizes, src_padding_mask,
                                query_groups)

            refined = reference_points
            if self.bbox_embed is not None:
                box_deltas.append(float32_call(self.bbox_embed[lid], output))
                refined = refine_boxes(box_deltas[-1], reference_points)
                reference_points = refined.detach()

            if self.return_intermediate:
                outputs.append(output)
                references.append(refined if self.look_forward_twice else reference_points)

        box_deltas = box_deltas if self.bbox_embed is not None else None
        if self.return_intermediate:  # per layer, unstacked: the head takes each layer apart anyway
            return outputs, references, box_deltas
        return output, reference_points, box_deltas


class DeformableTransformer(nn.Module):
    def __init__(self, d_model=256, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=1024,
                 dropout=0.1, activation="relu", return_intermediate_dec=False, num_feature_levels=4,
                 dec_n_points=4, enc_n_points=4, two_stage=False, two_stage_num_proposals=300,
                 look_forward_twice=False, mixed_selection=False, use_checkpoint=False):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        self.mixed_selection = mixed_selection

        encoder_layer = DeformableTransformerEncoderLayer(d_model, dim_feedforward, dropout, activation,
                                                          num_feature_levels, nhead, enc_n_points)
        self.encoder = DeformableTransformerEncoder(encoder_layer, num_encoder_layers, use_checkpoint)
        decoder_layer = DeformableTransformerDecoderLayer(d_model, dim_feedforward, dropout, activation,
                                                          num_feature_levels, nhead, dec_n_points)
        self.decoder = DeformableTransformerDecoder(decoder_layer, num_decoder_layers, return_intermediate_dec,
                                                    look_forward_twice, use_checkpoint)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    def get_proposal_pos_embed(self, proposals):
        """Sine embedding of unactivated proposal boxes [B, K, 4] -> [B, K, 2 * d_model]."""
        num_pos_feats = self.d_model // 2
        temperature = 10000
        scale = 2 * math.pi
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
        dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
        proposals = proposals.sigmoid() * scale  # [B, K, 4]
        pos = proposals[:, :, :, None] / dim_t  # [B, K, 4, F]
        # [B, K, 4, F/2, 2] -> [B, K, 4 * F]
        return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)

    def gen_encoder_output_proposals(self, memory, memory_padding_mask, level_sizes):
        """One proposal box per encoder token (its pixel centre, size 0.05 * 2^level), in logit space.

        Returns the projected memory [B, S, C] (zero on padding and invalid proposals) and the proposals
        [B, S, 4] (inf where the token is padding or its box lies too close to the border).
        """
        n = memory.shape[0]
        proposals = []
        start = 0
        for level, (h, w) in enumerate(level_sizes):
            mask_l = memory_padding_mask[:, start:start + h * w].view(n, h, w, 1)
            valid_h = torch.sum(~mask_l[:, :, 0, 0], 1)
            valid_w = torch.sum(~mask_l[:, 0, :, 0], 1)
            grid_y, grid_x = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=memory.device),
                torch.arange(w, dtype=torch.float32, device=memory.device),
                indexing="ij",
            )
            grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)  # [H, W, 2]
            valid_size = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(n, 1, 1, 2)
            grid = (grid.unsqueeze(0).expand(n, -1, -1, -1) + 0.5) / valid_size
            wh = torch.ones_like(grid) * 0.05 * (2.0 ** level)
            proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))
            start += h * w
        output_proposals = torch.cat(proposals, 1)  # [B, S, 4]
        valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
        output_proposals = torch.log(output_proposals / (1 - output_proposals))
        output_proposals = output_proposals.masked_fill(memory_padding_mask.unsqueeze(-1), float("inf"))
        output_proposals = output_proposals.masked_fill(~valid, float("inf"))

        output_memory = memory.masked_fill(memory_padding_mask.unsqueeze(-1), 0.0)
        output_memory = output_memory.masked_fill(~valid, 0.0)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        return output_memory, output_proposals

    @staticmethod
    def get_valid_ratio(mask):
        """Fraction (w, h) of a padded map [B, H, W] covered by the image: [B, 2]."""
        _, h, w = mask.shape
        valid_h = torch.sum(~mask[:, :, 0], 1)
        valid_w = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)

    def _flatten_levels(self, srcs, masks, pos_embeds):
        """Concatenate the levels' tokens: src [B, S, C], mask [B, S], level-embedded positions [B, S, C]; the
        levels' sizes as a tensor [L, 2] and as Python ints ((H_l, W_l), ...), the first token of each level [L]."""
        src_flatten, mask_flatten, pos_flatten, shapes = [], [], [], []
        for level, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            shapes.append(tuple(src.shape[-2:]))
            src_flatten.append(src.flatten(2).transpose(1, 2))  # [B, C, H, W] -> [B, H*W, C]
            mask_flatten.append(mask.flatten(1))
            pos_flatten.append(pos.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1))
        spatial_shapes = spatial_shapes_tensor(shapes, srcs[0].device)  # [L, 2]
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        src_flatten = torch.cat(src_flatten, 1)
        # under autocast: the positions in the maps' reduced dtype once, not cast again by every layer's use
        pos_flatten = torch.cat(pos_flatten, 1).to(src_flatten.dtype)
        return src_flatten, torch.cat(mask_flatten, 1), pos_flatten, spatial_shapes, level_start_index, tuple(shapes)

    @staticmethod
    def select_proposals(scores, k):
        """Indices [B, K] of the k best-scoring encoder proposals, scores [B, S], best first."""
        return torch.topk(scores, k, dim=1)[1]

    def _two_stage_queries(self, memory, mask_flatten, level_sizes, query_embed, num_queries):
        """Pick the num_queries top-scoring encoder proposals as the decoder's reference boxes and query positions."""
        batch, num_tokens, channels = memory.shape
        output_memory, output_proposals = self.gen_encoder_output_proposals(memory, mask_flatten, level_sizes)
        # the extra (last) class and box heads score and regress the proposals; the scores in float32 (under
        # autocast too), since their top-k picks the queries
        enc_outputs_class = float32_call(self.decoder.class_embed[self.decoder.num_layers], output_memory)
        # float32 (under autocast too): the proposals' logits, their selection and sine embedding
        enc_outputs_coord_unact = (float32_call(self.decoder.bbox_embed[self.decoder.num_layers], output_memory)
                                   + output_proposals)

        k = num_queries
        if k > num_tokens:
            raise ValueError(f"two-stage selects {k} proposals but the encoder has only {num_tokens} tokens "
                             f"(maps {[list(size) for size in level_sizes]}): use larger images or fewer queries")
        topk_proposals = self.select_proposals(enc_outputs_class[..., 0], k)  # [B, K]
        topk_coords_unact = torch.gather(enc_outputs_coord_unact, 1, topk_proposals.unsqueeze(-1).repeat(1, 1, 4))
        topk_coords_unact = topk_coords_unact.detach()
        reference_points = topk_coords_unact.sigmoid()
        pos_trans_out = self.pos_trans_norm(self.pos_trans(self.get_proposal_pos_embed(topk_coords_unact)))
        if self.mixed_selection:
            # positions from the proposals, content from the learned query embedding
            query_pos = pos_trans_out[..., :channels]
            tgt = query_embed.unsqueeze(0).expand(batch, -1, -1)
        else:
            query_pos, tgt = torch.split(pos_trans_out, channels, dim=2)
        return tgt, query_pos, reference_points, enc_outputs_class, enc_outputs_coord_unact

    def forward(self, srcs, masks, pos_embeds, query_embed=None, query_groups=None, num_queries=None):
        """srcs/masks/pos_embeds: per level [B, C, H, W] / [B, H, W] / [B, C, H, W]; query_embed [Q, 2C] (one-stage)
        or [Q, C] (mixed selection); query_groups: sizes of the query groups that attend only within themselves
        (None: one group); num_queries: how many proposals two-stage selects (default: two_stage_num_proposals).

        Returns (decoder outputs D x [B, Q, C], initial references [B, Q, 2|4], per-layer references
        D x [B, Q, 2|4], encoder class logits [B, S, K] and unactivated boxes [B, S, 4] (two-stage, else None),
        the decoder's box-head outputs per layer (D x [B, Q, 4]; with box refinement, else None)).
        Under autocast (any device) the layers run in its dtype; the reference points, box refinement and two-stage
        proposals stay float32.
        """
        src_flatten, mask_flatten, pos_flatten, spatial_shapes, level_start_index, level_sizes = \
            self._flatten_levels(srcs, masks, pos_embeds)
        valid_ratios = torch.stack([self.get_valid_ratio(m) for m in masks], 1)  # [B, L, 2]

        memory = self.encoder(src_flatten, spatial_shapes, level_start_index, level_sizes, valid_ratios, pos_flatten,
                              mask_flatten)

        enc_outputs_class = enc_outputs_coord_unact = None
        if self.two_stage:
            tgt, query_pos, reference_points, enc_outputs_class, enc_outputs_coord_unact = self._two_stage_queries(
                memory, mask_flatten, level_sizes, query_embed, num_queries or self.two_stage_num_proposals)
        else:
            batch, _, channels = memory.shape
            query_pos, tgt = torch.split(query_embed, channels, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(batch, -1, -1)
            tgt = tgt.unsqueeze(0).expand(batch, -1, -1)
            reference_points = float32_call(self.reference_points, query_pos).sigmoid()
        init_reference = reference_points
        # the decoder's inputs in the encoder output's dtype (autocast's) once, not cast again by every layer
        tgt, query_pos = tgt.to(memory.dtype), query_pos.to(memory.dtype)

        hs, inter_references, box_deltas = self.decoder(tgt, reference_points, memory, spatial_shapes,
                                                        level_start_index, level_sizes, valid_ratios, query_pos,
                                                        mask_flatten, query_groups)
        return hs, init_reference, inter_references, enc_outputs_class, enc_outputs_coord_unact, box_deltas


def build_deformable_transformer(args):
    return DeformableTransformer(
        d_model=args.hidden_dim,
        nhead=args.nheads,
        num_encoder_layers=args.enc_layers,
        num_decoder_layers=args.dec_layers,
        dim_feedforward=args.dim_feedforward,
        dropout=args.dropout,
        activation="relu",
        return_intermediate_dec=True,
        num_feature_levels=args.num_feature_levels,
        dec_n_points=args.dec_n_points,
        enc_n_points=args.enc_n_points,
        two_stage=args.two_stage,
        two_stage_num_proposals=args.num_queries_one2one + args.num_queries_one2many,
        mixed_selection=args.mixed_selection,
        look_forward_twice=args.look_forward_twice,
        use_checkpoint=args.use_checkpoint,
    )
