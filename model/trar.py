"""TRAR: routing the attention spans of a Transformer (Zhou et al., ICCV 2021).

Each block computes one attention map per *order*: order 0 is global, order `o` lets a patch attend
to the patches within Chebyshev distance `o` on the patch grid. A router predicts per-sample
weights over the orders and the block's output is the weighted mix of the per-order outputs.

This module holds the three pieces: `span_masks` (which token may attend to which, per order),
`Router` (pooling + MLP + softmax / Gumbel-softmax) and `routed_attention` (the weighted mix,
computed without ever materialising the (B, L, H, N, N) stack of maps).
"""
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

POOLINGS = ('avg', 'attention', 'fc')
ROUTINGS = ('soft', 'hard')


def as_grid(grid: int | Sequence[int]) -> tuple[int, int]:
    """Normalise an int or (h, w) pair to an (h, w) tuple of positive ints."""
    h, w = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if h < 1 or w < 1:
        raise ValueError(f"grid must be positive, got {grid!r}")
    return int(h), int(w)


def check_orders(orders: Sequence[int], grid: int | Sequence[int]) -> list[int]:
    """Validate span orders against a patch grid: distinct, non-negative, smaller than the grid."""
    h, w = as_grid(grid)
    orders = [int(o) for o in orders]
    if len(set(orders)) != len(orders):
        raise ValueError(f"orders must be distinct, got {orders}")
    for o in orders:
        if not 0 <= o < max(h, w):
            raise ValueError(f"order {o} is not in [0, {max(h, w)}) for a {h}x{w} patch grid")
    return orders


def span_masks(grid: int | Sequence[int], orders: Sequence[int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """Boolean attention masks, one per order: `masks[l, i, j]` is True when token i may attend to j.

    Tokens are `num_prefix_tokens` prefix tokens (CLS) followed by the patches in row-major order.
    Order 0 is global; order o allows patches within Chebyshev distance o (a (2o+1)x(2o+1) window
    clipped at the border). Prefix tokens see every token and are seen by every token.
    """
    h, w = as_grid(grid)
    orders = check_orders(orders, (h, w))
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    distance = torch.maximum((rows[:, None] - rows[None, :]).abs(), (cols[:, None] - cols[None, :]).abs())
    n = num_prefix_tokens + h * w
    masks = torch.ones(len(orders), n, n, dtype=torch.bool)
    for index, order in enumerate(orders):
        if order > 0:
            masks[index, num_prefix_tokens:, num_prefix_tokens:] = distance <= order
    return masks


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: torch.Tensor,
                     alphas: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """`sum_l alphas[:, l] * softmax(q k^T / sqrt(d), masked by masks[l]) v`, never building the (B, L, H, N, N) stack.

    q, k, v: (B, H, N, d); masks: (L, N, N) bool, True = may attend; alphas: (B, L). Returns (B, H, N, d).
    Each order is one fused masked attention (`scaled_dot_product_attention`), so only the per-order
    outputs are kept for the backward pass, never an N x N map. In inference, samples whose weight
    for an order is zero (hard routing with `binarize`) skip that order. Attention dropout applies to
    each order's map.
    """
    if not torch.is_grad_enabled() and bool((alphas == 0).any()):
        return _only_weighted_orders(q, k, v, masks, alphas)
    out = 0
    for index in range(masks.shape[0]):
        span = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[index], dropout_p=dropout_p)
        out = out + alphas[:, index, None, None, None].to(span.dtype) * span
    return out


def _only_weighted_orders(q, k, v, masks, alphas) -> torch.Tensor:
    """Inference with zero weights (e.g. one-hot routing): each order runs only on the samples that use it."""
    out = torch.zeros_like(q)
    for index in range(masks.shape[0]):
        samples = alphas[:, index].nonzero().flatten()
        if len(samples):
            span = F.scaled_dot_product_attention(q[samples], k[samples], v[samples], attn_mask=masks[index])
            out[samples] += alphas[samples, index, None, None, None].to(span.dtype) * span
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


class Router(nn.Module):
    """Predicts per-sample weights over the span orders from a block's input tokens.

    Pooling over tokens (`avg`, `attention` or `fc`), a two-layer MLP, then softmax (`soft`) or
    Gumbel-softmax with temperature `tau` (`hard`). With `binarize`, hard routing is a one-hot
    argmax at evaluation.
    """

    def __init__(self, dim: int, num_orders: int, pooling: str = 'avg', routing: str = 'soft',
                 binarize: bool = False, reduction: int = 2):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        if routing not in ROUTINGS:
            raise ValueError(f"unknown routing {routing!r}; expected one of {ROUTINGS}")
        self.pooling, self.routing, self.binarize = pooling, routing, binarize
        hidden = max(dim // reduction, 1)
        if pooling == 'attention':
            self.token_scores = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))
        elif pooling == 'fc':
            self.token_scores = nn.Linear(dim, 1)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(inplace=True), nn.Linear(hidden, num_orders))
        self.register_buffer('tau', torch.tensor(1.0), persistent=False)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens -> (B, D) summary."""
        if self.pooling == 'avg':
            return x.mean(dim=1)
        weights = self.token_scores(x).softmax(dim=1)
        return (weights * x).sum(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens -> (B, num_orders) routing weights, each row summing to one."""
        logits = self.mlp(self.pool(x)).float()
        if self.routing == 'soft':
            return logits.softmax(dim=-1)
        if self.training:
            return F.gumbel_softmax(logits, tau=self.tau, hard=False)
        if self.binarize:
            return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)
        return (logits / self.tau).softmax(dim=-1)
