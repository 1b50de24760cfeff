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
from torch.utils.checkpoint import checkpoint

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
                     alphas: torch.Tensor, dropout_p: float = 0.0, *, grid: Sequence[int] | None = None,
                     orders: Sequence[int] | None = None) -> torch.Tensor:
    """`sum_l alphas[:, l] * softmax(q k^T / sqrt(d), masked by masks[l]) v`, never building the (B, L, H, N, N) stack.

    q, k, v: (B, H, N, d); masks: (L, N, N) bool, True = may attend; alphas: (B, L). Returns (B, H, N, d).

    With `grid` and `orders` (the arguments `masks` was built from by `span_masks`, one CLS token),
    the windowed structure is used: CLS queries are global in every order, so order 0 is one fused
    attention over all tokens, and the local orders only touch patch queries, each grid row of which
    sees a band of 2 * max_order + 1 grid rows plus CLS. The local orders share one banded score
    matrix and one product with V; in training that band is recomputed in backward instead of saved,
    so the memory stays that of one fused attention. In inference, samples whose weight for an
    order is zero (hard routing with `binarize`) skip that order.

    Without them, or with attention dropout, each order is one fused masked attention over all tokens.
    """
    if grid is None or orders is None or (dropout_p > 0 and torch.is_grad_enabled()):
        return _dense_routed_attention(q, k, v, masks, alphas, dropout_p)
    grid, orders = as_grid(grid), [int(o) for o in orders]
    if q.shape[2] != 1 + grid[0] * grid[1] or alphas.shape[1] != len(orders):
        raise ValueError(f"{q.shape[2]} tokens and {alphas.shape[1]} routing weights do not fit a "
                         f"{grid[0]}x{grid[1]} grid with orders {orders}")
    if not torch.is_grad_enabled() and not torch.compiler.is_compiling() and bool((alphas == 0).any()):
        return _windowed_weighted_samples(q, k, v, alphas, grid, orders)
    return _windowed_routed_attention(q, k, v, alphas, grid, orders)


def _dense_routed_attention(q, k, v, masks, alphas, dropout_p=0.0) -> torch.Tensor:
    """One fused masked attention per order over all tokens; attention dropout applies to each order's map."""
    if not torch.is_grad_enabled() and bool((alphas == 0).any()):
        return _only_weighted_orders(q, k, v, masks, alphas)
    out = 0
    for index in range(masks.shape[0]):
        span = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[index], dropout_p=dropout_p)
        out = out + alphas[:, index, None, None, None].to(span.dtype) * span
    return out


def _windowed_routed_attention(q, k, v, alphas, grid, orders) -> torch.Tensor:
    """Order 0 as one fused attention, local orders on the banded patch queries (see `routed_attention`)."""
    alphas = alphas.to(q.dtype)
    local = [index for index, order in enumerate(orders) if order > 0]
    if 0 in orders:
        glob = F.scaled_dot_product_attention(q, k, v)
        cls = glob[:, :, :1]
        patches = alphas[:, orders.index(0), None, None, None] * glob[:, :, 1:]
    else:
        cls = F.scaled_dot_product_attention(q[:, :, :1], k, v)
        patches = 0
    if local:
        args = (q, k, v, alphas[:, local], grid, [orders[i] for i in local])
        if torch.is_grad_enabled():
            patches = patches + checkpoint(_local_patch_attention, *args, use_reentrant=False)
        else:
            patches = patches + _local_patch_attention(*args)
    return torch.cat([alphas.sum(dim=1)[:, None, None, None] * cls, patches], dim=2)


def _local_patch_attention(q, k, v, alphas, grid, orders, tile_rows=None) -> torch.Tensor:
    """`sum_l alphas[:, l] * window_l attention` of the patch queries, (B, H, h * w, d), for local orders only.

    The grid is cut into tiles of `tile_rows` rows; the queries of a tile attend to CLS and the patches
    of the tile's rows extended by o_max rows each side (zero-padded at the border, masked out), so the
    scores are (B, H, tiles, tile_rows * w, 1 + (tile_rows + 2 o_max) w) instead of N x N. Tiles of a
    few rows keep the matrix products large enough to run efficiently.
    """
    b, heads, _, d = q.shape
    h, w = grid
    reach = max(orders)
    rows = tile_rows or _tile_rows(grid)
    tiles = -(-h // rows)
    extra = tiles * rows - h
    queries = F.pad(q[:, :, 1:].reshape(b, heads, h, w, d), (0, 0, 0, 0, 0, extra)).reshape(b, heads, tiles, rows * w, d)
    band_k, band_v = (_row_band(t, grid, reach, rows, extra) for t in (k, v))
    scores = (queries * d ** -0.5) @ band_k.transpose(-2, -1)
    mixed = 0
    for weight, allowed in zip(alphas.unbind(1), _band_masks(grid, reach, rows, orders, q.device)):
        probs = scores.masked_fill(~allowed, float('-inf')).softmax(dim=-1)
        mixed = mixed + weight[:, None, None, None, None] * probs
    return (mixed @ band_v).reshape(b, heads, tiles * rows * w, d)[:, :, :h * w]


def _tile_rows(grid) -> int:
    """Grid rows per tile: the fewest that give at least 64 queries per tile."""
    return min(grid[0], -(-64 // grid[1]))


def _row_band(x, grid, reach, rows, extra) -> torch.Tensor:
    """(B, H, N, d) -> (B, H, tiles, 1 + (rows + 2 reach) w, d): per tile, CLS then its rows widened by `reach`."""
    b, heads, _, d = x.shape
    h, w = grid
    patches = F.pad(x[:, :, 1:].reshape(b, heads, h, w, d), (0, 0, 0, 0, reach, reach + extra))
    band = patches.unfold(2, rows + 2 * reach, rows).permute(0, 1, 2, 5, 3, 4).flatten(3, 4)
    return torch.cat([x[:, :, :1, None].expand(b, heads, band.shape[2], 1, d), band], dim=3)


def _band_masks(grid, reach, rows, orders, device) -> torch.Tensor:
    """(L, tiles, rows * w, 1 + (rows + 2 reach) w) bool: which band keys each patch query may see, per order."""
    h, w = grid
    tiles = -(-h // rows)
    query_row = torch.arange(tiles * rows, device=device).view(tiles, rows, 1)  # grid row of each query
    key_row = (torch.arange(tiles, device=device) * rows - reach)[:, None, None] + torch.arange(
        rows + 2 * reach, device=device)  # grid row of each band row, (tiles, 1, rows + 2 reach)
    row_gap = (query_row - key_row).abs()
    key_inside = (key_row >= 0) & (key_row < h)
    col_gap = (torch.arange(w, device=device)[:, None] - torch.arange(w, device=device)).abs()  # (w, w)
    masks = []
    for order in orders:
        rows_ok = (row_gap <= order) & key_inside  # (tiles, rows, rows + 2 reach)
        ok = rows_ok[:, :, None, :, None] & (col_gap <= order)[None, None, :, None, :]
        ok = ok.reshape(tiles, rows * w, -1)
        masks.append(torch.cat([ok.new_ones(tiles, rows * w, 1), ok], dim=-1))
    return torch.stack(masks)


def _windowed_weighted_samples(q, k, v, alphas, grid, orders) -> torch.Tensor:
    """Inference with zero weights (one-hot routing): each sample computes only the orders it weights.

    CLS queries are global in every order; patch queries run global attention only for the samples
    that weight order 0, and the banded local attention only for the samples and orders in use.
    """
    alphas = alphas.to(q.dtype)
    out = torch.empty_like(q)
    used = alphas != 0
    out[:, :, :1] = alphas.sum(dim=1)[:, None, None, None] * F.scaled_dot_product_attention(q[:, :, :1], k, v)
    out[:, :, 1:] = 0
    if 0 in orders:
        g = orders.index(0)
        samples = used[:, g].nonzero().flatten()
        if len(samples):
            glob = F.scaled_dot_product_attention(q[samples, :, 1:], k[samples], v[samples])
            out[samples, :, 1:] += alphas[samples, g, None, None, None] * glob
    local = [index for index, order in enumerate(orders) if order > 0 and bool(used[:, index].any())]
    samples = used[:, local].any(dim=1).nonzero().flatten() if local else []
    if len(samples):
        out[samples, :, 1:] += _local_patch_attention(q[samples], k[samples], v[samples], alphas[samples][:, local],
                                                      grid, [orders[i] for i in local])
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
