"""TRAR: routing the attention spans of a Transformer (Zhou et al., ICCV 2021).

Each block computes one attention map per *order*: order 0 is global, order `o` lets a patch attend
to the patches within Chebyshev distance `o` on the patch grid. A router predicts per-sample
weights over the orders and the block's output is the weighted mix of the per-order outputs.

This module holds the three pieces: `span_masks` (which token may attend to which, per order),
`Router` (pooling + MLP + softmax / Gumbel-softmax) and `routed_attention` (the weighted mix,
computed without ever materialising the (B, L, H, N, N) stack of maps).
"""
import math
from typing import NamedTuple, Sequence

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
        return _dense_routed_attention(q, k, v, masks, alphas, dropout_p)
    dispatch = grid is not None and orders is not None and not torch.is_grad_enabled()
    if dispatch and not torch.compiler.is_compiling() and bool((alphas == 0).any()):
        grid, orders = as_grid(grid), [int(o) for o in orders]
        if q.shape[2] != 1 + grid[0] * grid[1] or alphas.shape[1] != len(orders):
            raise ValueError(f"{q.shape[2]} tokens and {alphas.shape[1]} routing weights do not fit a "
                             f"{grid[0]}x{grid[1]} grid with orders {orders}")
        return _windowed_weighted_samples(q, k, v, alphas, grid, orders)
    layout = span_layout(masks) if layout is None else layout
    return _SharedScoresAttention.apply(q, k, v, alphas, *layout)


def _dense_routed_attention(q, k, v, masks, alphas, dropout_p=0.0) -> torch.Tensor:
    """One fused masked attention per order over all tokens; attention dropout applies to each order's map."""
    out = 0
    for index in range(masks.shape[0]):
        span = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[index], dropout_p=dropout_p)
        out = out + alphas[:, index, None, None, None].to(span.dtype) * span
    return out


# Score-matrix elements computed at once by routed attention (per chunk of samples and heads): bounds the
# transient memory of the (N, N) maps; a GPU affords larger chunks than a CPU's caches favour.
CHUNK_ELEMENTS = {'cpu': 2 ** 21}
DEFAULT_CHUNK_ELEMENTS = 2 ** 28


def _chunks(shape: torch.Size, device: torch.device) -> list[tuple[slice, slice]]:
    """(sample, head) slices covering (B, H, N, d) with at most about CHUNK_ELEMENTS scores each."""
    batch, heads, n, _ = shape
    budget = CHUNK_ELEMENTS.get(device.type, DEFAULT_CHUNK_ELEMENTS)
    heads_per_chunk = max(1, min(heads, budget // (n * n)))
    samples_per_chunk = max(1, budget // (heads * n * n)) if heads_per_chunk == heads else 1
    return [(slice(b, b + samples_per_chunk), slice(h, h + heads_per_chunk))
            for b in range(0, batch, samples_per_chunk) for h in range(0, heads, heads_per_chunk)]


class _SharedScoresAttention(torch.autograd.Function):
    """Routed attention from one score matrix (see `routed_attention`); saves only q, k, v and alphas.

    Chunk by chunk, the (N, N) matrices live in two workspaces allocated once per call: fresh
    allocations of that size cost page faults on a CPU on every chunk.
    """

    @staticmethod
    def forward(ctx, q, k, v, alphas, index, valid, full_rows, global_orders, local_orders):
        out = torch.empty_like(q)
        chunks = _chunks(q.shape, q.device)
        with torch.autocast(q.device.type, enabled=False):
            scores, probs = _workspaces(q, chunks, 2)
            for samples, heads in chunks:
                parts = _SharedScores(q[samples, heads], k[samples, heads], alphas[samples].to(q.dtype), index, valid,
                                      full_rows, global_orders, local_orders, scores, probs)
                out[samples, heads] = parts.mixed_map() @ v[samples, heads]
        ctx.save_for_backward(q, k, v, alphas, index, valid, full_rows)
        ctx.orders = global_orders, local_orders
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, alphas, index, valid, full_rows = ctx.saved_tensors
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        grad_alphas = torch.zeros_like(alphas, dtype=torch.promote_types(q.dtype, torch.float32))
        chunks = _chunks(q.shape, q.device)
        with torch.autocast(q.device.type, enabled=False):
            scores, probs = _workspaces(q, chunks, 2)
            for samples, heads in chunks:
                parts = _SharedScores(q[samples, heads], k[samples, heads], alphas[samples].to(q.dtype), index, valid,
                                      full_rows, *ctx.orders, scores, probs)
                grads = parts.backward(grad_out[samples, heads].to(q.dtype), v[samples, heads], scores)
                grad_q[samples, heads], grad_k[samples, heads], grad_v[samples, heads] = grads[:3]
                grad_alphas[samples] += grads[3]
        return grad_q, grad_k, grad_v, grad_alphas.to(alphas.dtype), None, None, None, None, None


def _workspaces(q: torch.Tensor, chunks: list[tuple[slice, slice]], count: int) -> list[torch.Tensor]:
    """`count` flat buffers, each large enough for the (samples, heads, N, N) scores of any chunk."""
    batch, heads, n, _ = q.shape
    size = max((len(range(batch)[samples]) * len(range(heads)[chunk_heads]) for samples, chunk_heads in chunks),
               default=0) * n * n  # no chunk for an empty batch
    return [q.new_empty(size) for _ in range(count)]


def _view(workspace: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The start of a flat workspace as the (b, h, N, N) score matrix of `like`, (b, h, N, d)."""
    b, h, n, _ = like.shape
    return workspace[:b * h * n * n].view(b, h, n, n)


class _SharedScores:
    """The global softmax of the scores, each local order's softmax over its window, and their weights."""

    def __init__(self, q, k, alphas, index, valid, full_rows, global_orders, local_orders, scores, probs):
        b, heads, n, d = q.shape
        self.scale, self.k, self.q = d ** -0.5, k, q
        self.alphas, self.global_orders, self.local_orders = alphas, global_orders, local_orders
        self.index = index.expand(b, heads, n, index.shape[1])
        scores = torch.matmul(q * self.scale, k.transpose(-2, -1), out=_view(scores, q))
        window_scores = scores.gather(-1, self.index)
        self.probs = torch.softmax(scores, dim=-1, out=_view(probs, q))
        self.window_probs = [window_scores.masked_fill(~allowed, float('-inf')).softmax(dim=-1) for allowed in valid]
        self.local_rows = (~full_rows).to(q.dtype)
        # Row i of the mixed map: row_scale[i] * probs[i] plus the local orders' window terms.
        local_sum = alphas[:, list(local_orders)].sum(dim=1, keepdim=True)
        self.row_scale = alphas[:, list(global_orders)].sum(dim=1, keepdim=True) + full_rows * local_sum  # (B, N)
        self.local_weights = [alphas[:, l, None] * self.local_rows for l in local_orders]  # each (B, N)

    def window_mix(self) -> torch.Tensor:
        """(B, H, N, K): the local orders' weighted window probabilities."""
        mix = torch.zeros_like(self.index, dtype=self.probs.dtype)
        for weight, probs in zip(self.local_weights, self.window_probs):
            mix += weight[:, None, :, None] * probs
        return mix

    def mixed_map(self) -> torch.Tensor:
        """The (B, H, N, N) mixed attention map, built in place of the global probabilities."""
        mixed = self.probs.mul_(self.row_scale[:, None, :, None])
        return mixed.scatter_add_(-1, self.index, self.window_mix())

    def backward(self, grad_out: torch.Tensor, v: torch.Tensor, workspace: torch.Tensor):
        """Gradients of q, k, v and alphas from the gradient of the output; `workspace` holds d loss / d map."""
        grad_map = torch.matmul(grad_out, v.transpose(-2, -1), out=_view(workspace, grad_out))
        grad_alphas = torch.zeros_like(self.alphas)
        global_dot = torch.einsum('bhij,bhij->bhi', grad_map, self.probs)  # d loss / d row_scale, per head
        row_dot = global_dot.sum(dim=1)
        for l in self.global_orders:
            grad_alphas[:, l] += row_dot.sum(dim=1)
        grad_window = grad_map.gather(-1, self.index)
        grad_window_scores = torch.zeros_like(grad_window)
        full_rows = 1 - self.local_rows  # where a local order is global too
        for l, weight, probs in zip(self.local_orders, self.local_weights, self.window_probs):
            dot = (grad_window * probs).sum(dim=-1)  # (B, H, N)
            grad_alphas[:, l] += (row_dot * full_rows).sum(dim=1) + (dot.sum(dim=1) * self.local_rows).sum(dim=1)
            grad_window_scores += weight[:, None, :, None] * probs * (grad_window - dot[..., None])
        # The mixed map for dV, then back to the scaled global probabilities for the softmax's backward.
        scaled = self.probs.mul_(self.row_scale[:, None, :, None])
        kept = scaled.gather(-1, self.index)
        grad_v = scaled.scatter_add_(-1, self.index, self.window_mix()).transpose(-2, -1) @ grad_out
        scaled.scatter_(-1, self.index, kept)
        grad_scores = grad_map.sub_(global_dot[..., None]).mul_(scaled).scatter_add_(-1, self.index, grad_window_scores)
        grad_q = (grad_scores @ self.k) * self.scale
        grad_k = (grad_scores.transpose(-2, -1) @ self.q) * self.scale
        return grad_q, grad_k, grad_v, grad_alphas


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
    queries = F.pad(q[:, :, 1:].reshape(b, heads, h, w, d), (0, 0, 0, 0, 0, extra))
    queries = queries.reshape(b, heads, tiles, rows * w, d)
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
