"""Query self-attention in groups that never see each other (the hybrid branch's one-to-one and one-to-many
queries), computed with nn.MultiheadAttention's parameters; equal in float64 to upstream's masked attention
(tests/test_equivalence.py)."""
import torch
import torch.nn.functional as F
from torch import nn


def group_attention_mask(groups, device=None):
    """[Q, Q] bool mask, True where attention is forbidden: between queries of different groups (sizes `groups`)."""
    group_of = torch.repeat_interleave(torch.arange(len(groups), device=device),
                                       torch.as_tensor(groups, device=device))
    return group_of[:, None] != group_of[None, :]


def grouped_self_attention(attn: nn.MultiheadAttention, query_key, value, groups):
    """What `attn` computes for queries = keys = query_key [B, Q, C] and values `value` [B, Q, C] under
    group_attention_mask(groups), without dropout: one dense attention per group instead of a masked one over
    all queries, whose softmax gives the other groups exactly zero weight. Returns [B, Q, C]."""
    batch, num_queries, channels = query_key.shape
    heads = attn.num_heads
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    # queries and keys come from the same input: one projection, [B, Q, 2C] -> [B, Q, 2, M, C/M]
    q, k = F.linear(query_key, weight[:2 * channels], bias[:2 * channels]).view(
        batch, num_queries, 2, heads, -1).unbind(2)  # [B, Q, M, C/M] each
    v = F.linear(value, weight[2 * channels:], bias[2 * channels:]).view(batch, num_queries, heads, -1)
    outputs = []
    for q_g, k_g, v_g in zip(q.split(groups, 1), k.split(groups, 1), v.split(groups, 1)):
        # [B, Qg, M, C/M] -> [B, M, Qg, C/M] for the attention, and back
        attended = F.scaled_dot_product_attention(q_g.transpose(1, 2), k_g.transpose(1, 2), v_g.transpose(1, 2))
        outputs.append(attended.transpose(1, 2))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, 1)
    return attn.out_proj(out.reshape(batch, num_queries, channels))


def masked_self_attention_with_dropout(attn: nn.MultiheadAttention, query_key, value, groups):
    """Upstream's computation, a masked nn.MultiheadAttention over all queries [B, Q, C], for training with
    attention dropout: its dropout masks the attention weights of all queries with upstream's random numbers,
    which per-group attentions would draw differently. Returns [B, Q, C]."""
    mask = group_attention_mask(groups, query_key.device) if len(groups) > 1 else None
    # nn.MultiheadAttention in its sequence-first layout: [B, Q, C] -> [Q, B, C] and back
    qk_first = query_key.transpose(0, 1)
    return attn(qk_first, qk_first, value.transpose(0, 1), attn_mask=mask)[0].transpose(0, 1)


def query_self_attention(attn: nn.MultiheadAttention, query_key, value, groups=None):
    """Self-attention of decoder queries [B, Q, C] within their groups (sizes summing to Q; None: one group).

    grouped_self_attention, except in training with attention dropout (upstream's --dropout 0.1), where dropout
    makes it a different random function: masked_self_attention_with_dropout.
    """
    groups = [query_key.shape[1]] if groups is None else [int(g) for g in groups if g > 0]
    if sum(groups) != query_key.shape[1]:
        raise ValueError(f"query groups {groups} do not add up to the {query_key.shape[1]} queries")
    if attn.training and attn.dropout > 0:
        return masked_self_attention_with_dropout(attn, query_key, value, groups)
    return grouped_self_attention(attn, query_key, value, groups)
