"""Routed attention on FlexAttention and fused SDPA: the CUDA implementation.

Routed attention is linear in the per-order outputs, `sum_l alphas[:, l] * attention_l(q, k, v)`, so:
- the global orders (windows that cover the grid) run as one fused SDPA (flash attention), weighted by the
  sum of their routing weights;
- the local orders run as one flex attention call whose query heads are the (head, order) pairs: with
  `enable_gqa` every group of query heads shares its key and value head, so K and V are not copied. The
  `BlockMask` (from a mask_mod on the patch grid) skips the key blocks a window never reaches; it is built once
  per (grid, orders, heads, tokens, device) and cached;
- the outputs are mixed by the routing weights with ordinary torch ops, so autograd gives every gradient,
  the routing weights' included.

Flex attention is fused only when compiled: on CUDA, eager calls go through one module-level
`torch.compile(flex_attention)`, and inside a compiled model the model's compilation fuses it. On the CPU
eager flex attention runs the forward only (PyTorch refuses its backward there).
"""
import functools
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .spans import is_global_order

# Query and key tokens per block of the BlockMask: 128 is flex attention's default; 64 skips more of the blocks no
# window reaches (ViT-B/16 computes 44% of the block pairs at 384 px, 88% at 224 px, against 76% and 100%).
# benchmarks/gpu_check.py sweeps both (its `tune` section): set it from its figures. Read when a plan is built.
BLOCK_SIZE = 128


class FlexPlan(NamedTuple):
    """What a (grid, orders, heads, tokens, device) needs: the local orders' BlockMask and which orders are which.

    global_orders / local_orders: positions in `orders` of global attention (order 0, or a window covering the
    grid) and of the others; block_mask: over (head, order) query heads, None without local orders.
    """
    global_orders: tuple[int, ...]
    local_orders: tuple[int, ...]
    block_mask: BlockMask | None


_PLANS: dict[tuple, FlexPlan] = {}


def flex_routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alphas: torch.Tensor,
                          grid: tuple[int, int], orders: Sequence[int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """`sum_l alphas[:, l] * attention_l(q, k, v)` for (B, H, N, d) q, k, v, (B, L) alphas and span orders on `grid`.

    Order o lets a patch attend to the patches within Chebyshev distance o; the `num_prefix_tokens` tokens before
    the patches (CLS) see every token and are seen by every token, as in `span_masks`.
    """
    batch, heads, n, d = q.shape
    plan = flex_plan(grid, tuple(orders), num_prefix_tokens, heads, n, q.device)
    weights = alphas.to(q.dtype)
    out = None
    if plan.global_orders:
        global_weight = sum(weights[:, i] for i in plan.global_orders)
        out = global_weight[:, None, None, None] * F.scaled_dot_product_attention(q, k, v)
    if plan.local_orders:
        count = len(plan.local_orders)
        queries = q.unsqueeze(2).expand(batch, heads, count, n, d).reshape(batch, heads * count, n, d)
        local = _flex(q.device)(queries, k, v, block_mask=plan.block_mask, enable_gqa=True)
        local_weights = torch.stack([weights[:, i] for i in plan.local_orders], dim=1)  # (B, L_local)
        mixed = (local.unflatten(1, (heads, count)) * local_weights[:, None, :, None, None]).sum(dim=2)
        out = mixed if out is None else out + mixed
    return out


def flex_plan(grid: tuple[int, int], orders: tuple[int, ...], num_prefix_tokens: int, heads: int, n: int,
              device: torch.device) -> FlexPlan:
    """The cached `FlexPlan` (per `BLOCK_SIZE` too); built on first use (inside a compiled model it is built in the
    graph, not cached)."""
    key = (tuple(grid), orders, num_prefix_tokens, heads, n, torch.device(device), BLOCK_SIZE)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _build_plan(*key)
        if not torch.compiler.is_compiling():
            _PLANS[key] = plan
    return plan


def _build_plan(grid, orders, num_prefix_tokens, heads, n, device, block_size) -> FlexPlan:
    w = grid[1]
    is_global = [is_global_order(order, grid) for order in orders]
    global_orders = tuple(i for i, full in enumerate(is_global) if full)
    local_orders = tuple(i for i, full in enumerate(is_global) if not full)
    if not local_orders:
        return FlexPlan(global_orders, local_orders, None)
    reach = torch.tensor([orders[i] for i in local_orders], device=device)
    count, prefix = len(local_orders), num_prefix_tokens

    def within_span(b, head, q_idx, kv_idx):
        """Query head `head` is (model head head // count, local order head % count)."""
        q_row, q_col = (q_idx - prefix) // w, (q_idx - prefix) % w
        kv_row, kv_col = (kv_idx - prefix) // w, (kv_idx - prefix) % w
        near = torch.maximum((q_row - kv_row).abs(), (q_col - kv_col).abs()) <= reach[head % count]
        return (q_idx < prefix) | (kv_idx < prefix) | near

    block_mask = create_block_mask(within_span, None, heads * count, n, n, device=device, BLOCK_SIZE=block_size)
    return FlexPlan(global_orders, local_orders, block_mask)


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention)


def _flex(device: torch.device):
    """Flex attention as it runs fused: compiled on CUDA (the model's own compilation when tracing)."""
    if device.type != 'cuda' or torch.compiler.is_compiling():
        return flex_attention
    return _compiled_flex_attention()
