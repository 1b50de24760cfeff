"""Routed attention order by order: one fused masked SDPA per order, and the explicit mixed map.

`dense_routed_attention` is what training with attention dropout runs (dropout acts on each order's
map) and the `dense` implementation of routed attention; `routed_attention_maps` builds the (B, H, N, N) mixed map
itself, for pictures.
"""
import math

import torch
import torch.nn.functional as F


def dense_routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: torch.Tensor,
                           alphas: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """One fused masked attention per order over all tokens; attention dropout applies to each order's map."""
    out = 0
    for index in range(masks.shape[0]):
        span = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[index], dropout_p=dropout_p)
        out = out + alphas[:, index, None, None, None].to(span.dtype) * span
    return out


def routed_attention_maps(q: torch.Tensor, k: torch.Tensor, masks: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """The explicit (B, H, N, N) mixed attention map `sum_l alphas[:, l] * softmax_l`, for pictures.

    Slow and memory-hungry by design: the training path never builds it.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    mixed = torch.zeros_like(scores)
    for index in range(masks.shape[0]):
        attention = scores.masked_fill(~masks[index], float('-inf')).softmax(dim=-1)
        mixed = mixed + alphas[:, index, None, None, None] * attention
    return mixed
