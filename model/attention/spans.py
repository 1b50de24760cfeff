"""The spans of routed attention: which token may attend to which, per order, and what the implementations derive.

Tokens are `num_prefix_tokens` prefix tokens (CLS) followed by the patches of an (h, w) grid in row-major order.
Order 0 is global; order o lets a patch attend to the patches within Chebyshev distance o (a (2o+1)x(2o+1) window
clipped at the border); prefix tokens see every token and are seen by every token.

`Spans` holds one model's grid, orders and prefix tokens, checked once, with the masks and the `SpanLayout` built
from them as buffers (they move with the model). Every tensor here is built on the device of its inputs.
"""
from typing import NamedTuple, Sequence

import torch
from torch import nn


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


def is_global_order(order: int, grid: tuple[int, int]) -> bool:
    """Order 0, or a window reaching every patch of the grid: global attention (`span_masks` allows all of it)."""
    return order == 0 or order >= max(grid) - 1


def span_masks(grid: int | Sequence[int], orders: Sequence[int], num_prefix_tokens: int = 1,
               device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean attention masks, one per order: `masks[l, i, j]` is True when token i may attend to j."""
    h, w = as_grid(grid)
    orders = check_orders(orders, (h, w))
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    distance = torch.maximum((rows[:, None] - rows[None, :]).abs(), (cols[:, None] - cols[None, :]).abs())
    n = num_prefix_tokens + h * w
    masks = torch.ones(len(orders), n, n, dtype=torch.bool, device=device)
    for index, order in enumerate(orders):
        if order > 0:
            masks[index, num_prefix_tokens:, num_prefix_tokens:] = distance <= order
    return masks


class SpanLayout(NamedTuple):
    """Where routed attention differs from global attention, derived once from the span masks (shared scores' plan).

    index: (N, K) key positions each query's local orders may see (its window plus the prefix tokens,
    padded), the keys more local orders allow first; valid: (L_local, N, K) which of them each local order
    allows; widths: per local order, the leading entries of `index` that hold all it allows (its window's
    size for span masks, which nest); full_rows: (N,) queries that are global in every order (CLS);
    mixing: (L, (1 + L_local) * N), the routing weights' map to per-row weights: `alphas @ mixing` is each row's
    weight of the global softmax, then each local order's weight of its window's softmax per row (zero on full
    rows, where a local order is global and its weight joins the global softmax's). global_orders /
    local_orders: positions in `orders` of the all-True masks and of the others.
    """
    index: torch.Tensor
    valid: torch.Tensor
    full_rows: torch.Tensor
    mixing: torch.Tensor
    global_orders: tuple[int, ...]
    local_orders: tuple[int, ...]
    widths: tuple[int, ...]


LAYOUT_TENSORS = ('index', 'valid', 'full_rows', 'mixing')


def span_layout(masks: torch.Tensor) -> SpanLayout:
    """The `SpanLayout` of (L, N, N) boolean masks, on their device: any masks work, small local windows make it
    cheap."""
    device = masks.device
    is_global = masks.flatten(1).all(dim=1).tolist()
    global_orders = tuple(l for l, full in enumerate(is_global) if full)
    local_orders = tuple(l for l, full in enumerate(is_global) if not full)
    full_rows = masks.all(dim=-1).all(dim=0)
    local = masks.index_select(0, torch.tensor(local_orders, dtype=torch.long, device=device)) & ~full_rows[:, None]
    allowing = local.sum(dim=0)  # (N, N): how many local orders allow each key
    width = max(1, int((allowing > 0).sum(dim=-1).max()))
    index = allowing.argsort(dim=-1, descending=True, stable=True)[:, :width].contiguous()
    valid = local.gather(-1, index.expand(len(local_orders), -1, -1))
    valid[:, :, 0] |= full_rows  # a finite softmax on rows whose local terms get weight zero
    ends = valid * torch.arange(1, width + 1, device=device)  # 1 + the position of each allowed entry
    widths = tuple(int(end) for end in ends.flatten(1).amax(dim=1)) if local_orders else ()
    mixing = torch.zeros(len(masks), 1 + len(local_orders), masks.shape[-1], device=device)
    for order in global_orders:
        mixing[order, 0] = 1
    for position, order in enumerate(local_orders):
        mixing[order, 0] = full_rows.float()
        mixing[order, 1 + position] = (~full_rows).float()
    return SpanLayout(index, valid, full_rows, mixing.flatten(1), global_orders, local_orders, widths)


class Spans(nn.Module):
    """One model's spans: the patch grid, the orders and the prefix tokens, checked once, and what is derived from
    them for every implementation.

    The masks (`masks`, (L, N, N) bool) and shared scores' `SpanLayout` are non-persistent buffers, built once and
    moved with the model (`.to(device)`); a call on another device gets a copy made once per device
    (`tensors_on`). flex and Triton derive and cache their own plans from `grid`, `orders` and `num_prefix_tokens`.
    Build one per model and share it: every block has the same spans.
    """

    def __init__(self, grid: int | Sequence[int], orders: Sequence[int], num_prefix_tokens: int = 1):
        super().__init__()
        self.grid = as_grid(grid)
        self.orders = tuple(check_orders(orders, self.grid))
        if not self.orders:
            raise ValueError("spans need at least one order, got []")
        if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens {num_prefix_tokens!r}: expected a non-negative integer")
        self.num_prefix_tokens = num_prefix_tokens
        masks = span_masks(self.grid, self.orders, num_prefix_tokens)
        layout = span_layout(masks)
        self.register_buffer('masks', masks, persistent=False)
        for name in LAYOUT_TENSORS:
            self.register_buffer(name, getattr(layout, name), persistent=False)
        self.global_orders, self.local_orders, self.widths = layout.global_orders, layout.local_orders, layout.widths
        self._copies: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid[0] * self.grid[1]

    def extra_repr(self) -> str:
        return f"grid={self.grid}, orders={list(self.orders)}, num_prefix_tokens={self.num_prefix_tokens}"

    def tensors_on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(masks, index, valid, full_rows, mixing) on `device`: the buffers where they are, else a copy kept per
        device (a function called with spans that were not moved with its inputs copies them once)."""
        buffers = (self.masks, *(getattr(self, name) for name in LAYOUT_TENSORS))
        if self.masks.device == device:
            return buffers
        copies = self._copies.get(device)
        if copies is None:
            copies = tuple(t.to(device) for t in buffers)
            if not torch.compiler.is_compiling():
                self._copies[device] = copies
        return copies

    def layout(self, device: torch.device) -> SpanLayout:
        """Shared scores' `SpanLayout` on `device`."""
        return SpanLayout(*self.tensors_on(device)[1:], self.global_orders, self.local_orders, self.widths)

    def check(self, q: torch.Tensor, alphas: torch.Tensor) -> None:
        """One-line error when (B, H, N, d) q or (B, L) alphas do not fit these spans."""
        if q.dim() != 4 or q.shape[2] != self.num_tokens or alphas.dim() != 2 or alphas.shape[1] != len(self.orders):
            raise ValueError(f"q {tuple(q.shape)} and routing weights {tuple(alphas.shape)} do not fit "
                             f"{self.num_prefix_tokens} prefix tokens, a {self.grid[0]}x{self.grid[1]} grid and "
                             f"orders {list(self.orders)}: expected (B, H, {self.num_tokens}, d) and "
                             f"(B, {len(self.orders)})")
