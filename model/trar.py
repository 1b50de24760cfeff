"""TRAR: routing the attention spans of a Transformer (Zhou et al., ICCV 2021).

Each block computes one attention map per *order*: order 0 is global, order `o` lets a patch attend
to the patches within Chebyshev distance `o` on the patch grid. A router predicts per-sample
weights over the orders and the block's output is the weighted mix of the per-order outputs.

This module holds the three pieces: `span_masks` (which token may attend to which, per order),
`Router` (pooling + MLP + softmax / Gumbel-softmax) and `routed_attention` (the weighted mix,
computed without ever materialising the (B, L, H, N, N) stack of maps).
"""
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention.banded import banded_routed_attention
from .attention.dense import dense_routed_attention, routed_attention_maps
from .attention.shared_scores import shared_scores_attention

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


class SpanLayout(NamedTuple):
    """Where routed attention differs from global attention, derived once from the span masks.

    index: (N, K) key positions each query's local orders may see (its window plus the prefix tokens,
    padded); valid: (L_local, N, K) which of them each local order allows; full_rows: (N,) queries that
    are global in every order (CLS). global_orders / local_orders: positions in `orders` of the all-True
    masks and of the others.
    """
    index: torch.Tensor
    valid: torch.Tensor
    full_rows: torch.Tensor
    global_orders: tuple[int, ...]
    local_orders: tuple[int, ...]


def span_layout(masks: torch.Tensor) -> SpanLayout:
    """The `SpanLayout` of (L, N, N) boolean masks: any masks work, small local windows make it cheap."""
    is_global = masks.flatten(1).all(dim=1).tolist()
    global_orders = tuple(l for l, full in enumerate(is_global) if full)
    local_orders = tuple(l for l, full in enumerate(is_global) if not full)
    full_rows = masks.all(dim=-1).all(dim=0)
    local = masks[list(local_orders)] & ~full_rows[:, None]
    support = local.any(dim=0)
    width = max(1, int(support.sum(dim=-1).max()))
    index = support.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[:, :width].contiguous()
    valid = local.gather(-1, index.expand(len(local_orders), -1, -1))
    valid[:, full_rows, 0] = True  # a finite softmax on rows whose local terms get weight zero
    return SpanLayout(index, valid, full_rows, global_orders, local_orders)


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: torch.Tensor,
                     alphas: torch.Tensor, dropout_p: float = 0.0, *, layout: SpanLayout | None = None,
                     grid: Sequence[int] | None = None, orders: Sequence[int] | None = None) -> torch.Tensor:
    """`sum_l alphas[:, l] * softmax(q k^T / sqrt(d), masked by masks[l]) v`, never building the (B, L, H, N, N) stack.

    q, k, v: (B, H, N, d); masks: (L, N, N) bool, True = may attend; alphas: (B, L). Returns (B, H, N, d).

    Every order's map is a softmax of the same scores, so the scores are computed once: the global
    orders share one softmax, and each local order only needs the few scores inside its window
    (`layout`, derived from `masks` when not given; the model passes it precomputed). The mixed map
    is built in place and applied to V with one product; backward recomputes it rather than saving
    it, so training keeps no (N, N) tensor per layer. Costs: the matrix products of plain attention
    plus a few passes over one score matrix.

    Passing `grid` and `orders` (what `masks` was built from by `span_masks`, one CLS token) asks for
    per-sample dispatch in inference: with zero weights (hard routing with `binarize`), each sample
    computes only the orders it uses. The check for zeros reads the weights back from the device, so
    callers pass them only when weights can be zero.
    With attention dropout in training, each order is one fused masked attention (dropout acts on each map).
    """
    if dropout_p > 0 and torch.is_grad_enabled():
        return dense_routed_attention(q, k, v, masks, alphas, dropout_p)
    dispatch = grid is not None and orders is not None and not torch.is_grad_enabled()
    if dispatch and not torch.compiler.is_compiling() and bool((alphas == 0).any()):
        grid, orders = as_grid(grid), [int(o) for o in orders]
        if q.shape[2] != 1 + grid[0] * grid[1] or alphas.shape[1] != len(orders):
            raise ValueError(f"{q.shape[2]} tokens and {alphas.shape[1]} routing weights do not fit a "
                             f"{grid[0]}x{grid[1]} grid with orders {orders}")
        return banded_routed_attention(q, k, v, alphas, grid, orders)
    layout = span_layout(masks) if layout is None else layout
    return shared_scores_attention(q, k, v, alphas, layout)


def check_routing(pooling: str, routing: str) -> None:
    """Reject unknown router pooling or routing names."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
    if routing not in ROUTINGS:
        raise ValueError(f"unknown routing {routing!r}; expected one of {ROUTINGS}")


class Router(nn.Module):
    """Predicts per-sample weights over the span orders from a block's input tokens.

    Pooling over tokens (`avg`, `attention` or `fc`), a two-layer MLP, then softmax (`soft`) or
    Gumbel-softmax with temperature `tau` (`hard`). With `binarize`, hard routing is a one-hot
    argmax at evaluation.
    """

    def __init__(self, dim: int, num_orders: int, pooling: str = 'avg', routing: str = 'soft',
                 binarize: bool = False, reduction: int = 2):
        super().__init__()
        check_routing(pooling, routing)
        self.pooling, self.routing, self.binarize = pooling, routing, binarize
        hidden = max(dim // reduction, 1)
        if pooling == 'attention':
            self.token_scores = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))
        elif pooling == 'fc':
            self.token_scores = nn.Linear(dim, 1)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, num_orders))
        self.register_buffer('tau', torch.tensor(1.0))  # saved: evaluation uses the temperature reached

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
