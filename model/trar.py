"""TRAR: routing the attention spans of a Transformer (Zhou et al., ICCV 2021).

Each block computes one attention map per *order*: order 0 is global, order `o` lets a patch attend
to the patches within Chebyshev distance `o` on the patch grid. A router predicts per-sample
weights over the orders and the block's output is the weighted mix of the per-order outputs.

This module holds the three pieces: `span_masks` (which token may attend to which, per order),
`Router` (pooling + MLP + softmax / Gumbel-softmax) and `routed_attention` (the weighted mix,
computed without ever materialising the (B, L, H, N, N) stack of maps).
"""
import contextlib
import os
from typing import Iterable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention.banded import banded_routed_attention
from .attention.dense import dense_routed_attention, routed_attention_maps
from .attention.flex import flex_routed_attention
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


def span_layout(masks: torch.Tensor) -> SpanLayout:
    """The `SpanLayout` of (L, N, N) boolean masks: any masks work, small local windows make it cheap."""
    is_global = masks.flatten(1).all(dim=1).tolist()
    global_orders = tuple(l for l, full in enumerate(is_global) if full)
    local_orders = tuple(l for l, full in enumerate(is_global) if not full)
    full_rows = masks.all(dim=-1).all(dim=0)
    local = masks[list(local_orders)] & ~full_rows[:, None]
    allowing = local.sum(dim=0)  # (N, N): how many local orders allow each key
    width = max(1, int((allowing > 0).sum(dim=-1).max()))
    index = allowing.argsort(dim=-1, descending=True, stable=True)[:, :width].contiguous()
    valid = local.gather(-1, index.expand(len(local_orders), -1, -1))
    valid[:, full_rows, 0] = True  # a finite softmax on rows whose local terms get weight zero
    ends = valid * torch.arange(1, width + 1)  # 1 + the position of each allowed entry
    widths = tuple(int(end) for end in ends.flatten(1).amax(dim=1)) if local_orders else ()
    mixing = torch.zeros(len(masks), 1 + len(local_orders), masks.shape[-1])
    mixing[list(global_orders), 0] = 1
    for position, order in enumerate(local_orders):
        mixing[order, 0] = full_rows.float()
        mixing[order, 1 + position] = (~full_rows).float()
    return SpanLayout(index, valid, full_rows, mixing.flatten(1), global_orders, local_orders, widths)


# Implementations of routed attention (model/attention/): `shared_scores` one score matrix shared by every order,
# `flex` FlexAttention for the local orders and flash SDPA for the global ones, `triton` fused kernels,
# `dense` one masked SDPA per order.
IMPLEMENTATIONS = ('shared_scores', 'flex', 'triton', 'dense')
# What CUDA runs unless told otherwise: the fastest implementation in benchmarks/gpu_check.py's figures (set it
# from them). The CPU runs `shared_scores`.
CUDA_DEFAULT = 'flex'


def _checked_implementation(name: str | None, source: str = 'implementation') -> str | None:
    if name is not None and name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown routed attention {source} {name!r}; expected one of {', '.join(IMPLEMENTATIONS)}")
    return name


def implementation_from_environment() -> str | None:
    """The implementation the environment variable `TRAR_ATTENTION` forces (None when unset or empty)."""
    return _checked_implementation(os.environ.get('TRAR_ATTENTION') or None, 'TRAR_ATTENTION')


_implementation = implementation_from_environment()  # the initial setting


def set_implementation(name: str | None) -> None:
    """Force one implementation of routed attention on every device (benchmarks, tests); None picks by device."""
    global _implementation
    _implementation = _checked_implementation(name)


@contextlib.contextmanager
def use_implementation(name: str | None) -> Iterator[None]:
    """`set_implementation(name)` inside the block, the previous setting after it."""
    previous = _implementation
    set_implementation(name)
    try:
        yield
    finally:
        set_implementation(previous)


def implementation_for(device: torch.device) -> str:
    """The implementation routed attention runs on `device`: the forced one, else `CUDA_DEFAULT` on CUDA and
    `shared_scores` elsewhere."""
    if _implementation is not None:
        return _implementation
    return CUDA_DEFAULT if torch.device(device).type == 'cuda' else 'shared_scores'


def _triton_routed_attention():
    """The Triton kernels, imported on first use: Triton is optional."""
    try:
        from .attention.triton_kernel import triton_routed_attention
    except ImportError as error:
        raise RuntimeError(f"the 'triton' routed attention is unavailable: {error}") from None
    return triton_routed_attention


def _spans(q: torch.Tensor, alphas: torch.Tensor, grid: Sequence[int] | None,
           orders: Sequence[int] | None) -> tuple[tuple[int, int], list[int], int] | None:
    """(grid, orders, prefix tokens) that the masks were built from, checked against q and alphas; None if not given."""
    if grid is None or orders is None:
        return None
    grid, orders = as_grid(grid), [int(o) for o in orders]
    prefix = q.shape[2] - grid[0] * grid[1]
    if prefix < 0 or alphas.shape[1] != len(orders):
        raise ValueError(f"{q.shape[2]} tokens and {alphas.shape[1]} routing weights do not fit a "
                         f"{grid[0]}x{grid[1]} grid with orders {orders}")
    return grid, orders, prefix


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: torch.Tensor,
                     alphas: torch.Tensor, dropout_p: float = 0.0, *, layout: SpanLayout | None = None,
                     grid: Sequence[int] | None = None, orders: Sequence[int] | None = None,
                     binarized: bool = False) -> torch.Tensor:
    """`sum_l alphas[:, l] * softmax(q k^T / sqrt(d), masked by masks[l]) v`, never building the (B, L, H, N, N) stack.

    q, k, v: (B, H, N, d); masks: (L, N, N) bool, True = may attend; alphas: (B, L). Returns (B, H, N, d).
    `grid` and `orders` are what `masks` was built from by `span_masks` (its prefix tokens are the tokens
    before the grid's patches); `layout` is `span_layout(masks)`, derived when not given.

    The implementation (`IMPLEMENTATIONS`) follows the device (`implementation_for`): `shared_scores` on the
    CPU, `CUDA_DEFAULT` on CUDA; `set_implementation`, `use_implementation` or the environment variable
    `TRAR_ATTENTION` force one. `flex` and `triton` need `grid` and `orders`. Two cases keep their own path:
    attention dropout in training runs one fused masked attention per order (dropout acts on each map), and
    `binarized` inference (one-hot weights: a router with `binarize`) computes per image only the order it
    uses; that reads the weights back from the device, so only callers with one-hot weights ask for it.
    """
    if dropout_p > 0 and torch.is_grad_enabled():
        return dense_routed_attention(q, k, v, masks, alphas, dropout_p)
    spans = _spans(q, alphas, grid, orders)
    per_image = binarized and spans is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
    if per_image and bool((alphas == 0).any()):
        if spans[2] != 1:
            raise ValueError(f"per-image dispatch takes one prefix token, got {spans[2]}")
        return banded_routed_attention(q, k, v, alphas, spans[0], spans[1])
    name = implementation_for(q.device)
    if name == 'dense':
        return dense_routed_attention(q, k, v, masks, alphas)
    if name == 'shared_scores':
        return shared_scores_attention(q, k, v, alphas, span_layout(masks) if layout is None else layout)
    if spans is None:
        raise ValueError(f"the {name!r} routed attention needs the grid and orders the masks were built from")
    attention = flex_routed_attention if name == 'flex' else _triton_routed_attention()
    return attention(q, k, v, alphas, *spans)


def check_routing(pooling: str, routing: str) -> None:
    """Reject unknown router pooling or routing names."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
    if routing not in ROUTINGS:
        raise ValueError(f"unknown routing {routing!r}; expected one of {ROUTINGS}")


def sample_gumbel(logits: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise shaped like `logits`, drawn as TRAR's and torch's `gumbel_softmax` draw it."""
    return -torch.empty_like(logits).exponential_().log()


class StdLayerNorm(nn.Module):
    """TRAR's LayerNorm (OpenVQA's): `weight * (x - mean) / (std + eps) + bias`, std unbiased, eps added to the std.

    Not `nn.LayerNorm`, which divides by sqrt(biased variance + eps): the attention pooling keeps the original's.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + self.eps) + self.bias


class AttentionPooling(nn.Module):
    """TRAR's `AttFlat` with one glimpse: (B, N, D) tokens -> (B, D).

    Token scores from an MLP (D -> D, ReLU, dropout, D -> 1), a softmax over the tokens, the weighted
    sum of the tokens, a D -> D `merge`, then TRAR's LayerNorm.
    """

    def __init__(self, dim: int, dropout_rate: float):
        super().__init__()
        self.hidden = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout_rate)
        self.score = nn.Linear(dim, 1)
        self.merge = nn.Linear(dim, dim)
        self.norm = StdLayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.score(self.dropout(F.relu(self.hidden(x)))).softmax(dim=1)
        return self.norm(self.merge((weights * x).sum(dim=1)))


class Router(nn.Module):
    """Predicts per-sample weights over the span orders from a block's input tokens (TRAR's routing blocks).

    Pooling over tokens (`avg`: the mean; `attention`: TRAR's `AttFlat`, whose dropout is `dropout_rate`;
    `fc`: a softmax of one linear score per token), a two-layer MLP (D -> D / reduction without bias,
    ReLU, -> orders), then softmax (`soft`) or Gumbel-softmax with temperature `tau` (`hard`).
    Hard routing samples Gumbel noise in training; at evaluation it is `softmax(logits / tau)`, unless
    `eval_noise` samples there too, as the original code does. With `binarize`, evaluation returns the
    one-hot argmax of those weights, for either routing.
    """

    def __init__(self, dim: int, num_orders: int, pooling: str = 'avg', routing: str = 'soft',
                 binarize: bool = False, reduction: int = 2, dropout_rate: float = 0.1, eval_noise: bool = False):
        super().__init__()
        check_routing(pooling, routing)
        self.pooling, self.routing, self.binarize, self.eval_noise = pooling, routing, binarize, eval_noise
        if pooling == 'attention':
            self.attention_pool = AttentionPooling(dim, dropout_rate)
        elif pooling == 'fc':
            self.token_scores = nn.Linear(dim, 1)
        hidden = max(dim // reduction, 1)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, num_orders))
        self.register_buffer('tau', torch.tensor(1.0))  # saved: evaluation uses the temperature reached

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens -> (B, D) summary."""
        if self.pooling == 'avg':
            return x.mean(dim=1)
        if self.pooling == 'attention':
            return self.attention_pool(x)
        weights = self.token_scores(x).softmax(dim=1)
        return (weights * x).sum(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens -> (B, num_orders) routing weights, each row summing to one."""
        logits = self.mlp(self.pool(x)).float()
        if self.routing == 'hard':
            noisy = self.training or self.eval_noise
            logits = ((logits + sample_gumbel(logits)) if noisy else logits) / self.tau
        if self.binarize and not self.training:
            return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)
        return logits.softmax(dim=-1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        check_router_keys([key for key in state_dict if key.startswith(prefix)], self.pooling)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def check_router_keys(keys: Iterable[str], pooling: str) -> None:
    """Refuse in one line, for `attention` pooling, router weights of the earlier attention pooling.

    That pooling was a D -> D/2 -> 1 token scorer saved at `...router.token_scores.{0,2}.*`; it was replaced
    by TRAR's `AttFlat` (`...router.attention_pool.*`), so its weights cannot be loaded, and a key-by-key
    mismatch would not say why. `Router` checks on `load_state_dict`; loaders that copy tensors call it.
    """
    if pooling != 'attention':
        return
    old = next((key for key in keys if key.endswith('token_scores.0.weight')), None)
    if old is not None:
        raise ValueError(f"{old.removesuffix('0.weight')}*: these router weights are of the earlier attention "
                         "pooling (a D->D/2->1 token scorer), replaced by TRAR's AttFlat (attention_pool.*), and "
                         "cannot be loaded; drop the router keys and load with strict=False to retrain the routers")
