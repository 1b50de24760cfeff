"""Routed attention as one fused Triton kernel pair (FlashAttention-2 style), for CUDA.

`sum_l alphas[:, l] * softmax(q k^T / sqrt(d), masked by order l) v`: order 0 is global, order o lets a
patch see the patches within Chebyshev distance o on the (h, w) grid, and the prefix (CLS) tokens are
global in every order. Orders whose window covers the whole grid are global too.

Forward, per (sample, head, block of queries): each key block's scores are computed once. The global
orders share one online softmax (their weights are summed); the local orders are stacked along the
rows, `LOCAL_PAD * BLOCK_M` rows holding each local order's copy of the query block with its own
running max, sum and accumulator. Global orders sweep every key block; the local orders only the key
blocks the widest window of the query block reaches (a contiguous band of grid rows) and the prefix
block. The routing weights mix the per-order outputs at the end; the per-order outputs and base-2
log-sum-exps are saved for backward.

Backward recomputes the probabilities from the saved log-sum-exps: with `D_l = rowsum(dO * O_l)`,
`dS = sum_l alpha_l P_l (dP - D_l)`, and the weights' gradient is the sum of the `D_l` terms. One kernel
per key block accumulates dK and dV over the query blocks that see it (windows are symmetric, so the
same band rule applies); one per query block accumulates dQ. No (N, N) tensor is ever stored.

Each local order keeps its own running max, so a window whose scores sit far below the row's global
maximum keeps its precision in fp16. Saved per call: the per-group outputs (G x the output, in q's
dtype) and their log-sum-exps; D_l is computed from them in torch at the start of backward.

Launch parameters (`CUDA_LAUNCH`) are compile-checked starting points, not timed: tune them on the GPU.
With TRITON_INTERPRET=1 set before Triton is first imported, the kernels run on CPU tensors (Triton's
interpreter), which is how the tests check them without a GPU.
"""
import functools
from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl

from .spans import check_orders, is_global_order

# Decided by Triton when the kernels below are decorated: interpreted kernels take CPU tensors.
INTERPRETED = bool(triton.knobs.runtime.interpret)

# CUDA launch parameters by LOCAL_PAD (the stacked local rows hold LOCAL_PAD * block_m rows of scores
# and an accumulator each): the largest tiles whose three kernels compile for sm_90 without register
# spills (ptxas -v; triton 3.6, bf16, head_dim 64). Not timed: tune block sizes, warps and stages on the GPU.
CUDA_LAUNCH = {
    1: dict(block_m=64, block_n=64, num_warps=8, num_stages=2),
    2: dict(block_m=64, block_n=32, num_warps=8, num_stages=2),
    4: dict(block_m=32, block_n=32, num_warps=8, num_stages=2),
}
CUDA_LAUNCH_MANY_ORDERS = dict(block_m=16, block_n=32, num_warps=8, num_stages=2)
# The interpreter (CPU tensors): small tiles, so that small test inputs still span several blocks.
CPU_LAUNCH = dict(block_m=16, block_n=16, num_warps=4, num_stages=1)
# What benchmarks/gpu_check.py sweeps (its `tune` section) at each ViT-B/16 shape: the starting points above, fewer
# warps (the 8-warp tiles hold one block per SM at 183 to 244 registers a thread), wider key tiles, deeper pipelines.
# It keeps the fastest within tolerance and prints the CUDA_LAUNCH entries to set.
CUDA_LAUNCH_CANDIDATES = [dict(block_m=m, block_n=n, num_warps=w, num_stages=s) for m, n, w, s in (
    (64, 64, 8, 2), (64, 32, 8, 2), (32, 32, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2), (32, 64, 4, 3),
)]
# When set, every launch uses it instead (the sweep, and tests of any configuration).
LAUNCH_OVERRIDE: dict | None = None

LOG2E = 1.4426950408889634


class Plan(NamedTuple):
    """How the orders map onto the kernel: one global group (summed weights) plus stacked local orders."""
    membership: torch.Tensor  # (L, G) float: weights = alphas @ membership
    radii: torch.Tensor       # (LOCAL_PAD,) int32 window radius of each stacked local order (padding: 0)
    has_global: bool
    num_local: int
    local_pad: int
    reach: int                # widest local radius


@functools.lru_cache(maxsize=64)
def plan_orders(grid: tuple[int, int], orders: tuple[int, ...], device: torch.device) -> Plan:
    """Group the orders: global ones (order 0, or a window covering the grid) share one softmax.

    Cached: a model calls it with the same few (grid, orders) in every block and step.
    """
    is_global = [is_global_order(o, grid) for o in orders]
    local = [o for o, glob in zip(orders, is_global) if not glob]
    has_global = any(is_global)
    groups = int(has_global) + len(local)
    membership = torch.zeros(len(orders), groups, device=device)
    for position, (order, glob) in enumerate(zip(orders, is_global)):
        membership[position, 0 if glob else int(has_global) + local.index(order)] = 1
    local_pad = triton.next_power_of_2(max(len(local), 1))
    radii = torch.tensor(local + [0] * (local_pad - len(local)), dtype=torch.int32, device=device)
    return Plan(membership, radii, has_global, len(local), local_pad, max(local, default=0))


def triton_routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alphas: torch.Tensor,
                            grid: tuple[int, int], orders: Sequence[int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """Routed attention of (B, H, N, d) q, k, v with (B, L) routing weights over `orders` on an (h, w) patch grid.

    Tokens are `num_prefix_tokens` prefix tokens followed by the h * w patches in row-major order.
    Returns (B, H, N, d) in q's dtype; differentiable with respect to q, k, v and alphas.
    """
    h, w = (int(grid[0]), int(grid[1]))
    orders = [int(o) for o in orders]
    _check_inputs(q, k, v, alphas, (h, w), orders, num_prefix_tokens)
    plan = plan_orders((h, w), tuple(orders), q.device)
    weights = alphas.float() @ plan.membership  # (B, G): autograd carries their gradient back to alphas
    return _RoutedAttention.apply(q, k, v, weights, plan, (h, w), num_prefix_tokens)


def _check_inputs(q, k, v, alphas, grid, orders, prefix) -> None:
    """One-line errors for inputs the kernels cannot take."""
    h, w = grid
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one (B, H, N, d) shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if h < 1 or w < 1 or prefix < 0 or q.shape[2] != prefix + h * w:
        raise ValueError(f"{q.shape[2]} tokens do not fit {prefix} prefix tokens and a {h}x{w} grid")
    if not check_orders(orders, grid):
        raise ValueError("orders must name at least one order, got []")
    if alphas.shape != (q.shape[0], len(orders)):
        raise ValueError(f"alphas must be (B, L) = {(q.shape[0], len(orders))}, got {tuple(alphas.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a float16, bfloat16 or float32 dtype, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if q.device.type != 'cuda' and not INTERPRETED:
        raise ValueError(f"triton_routed_attention runs on CUDA tensors, got {q.device} (on the CPU only with "
                         f"TRITON_INTERPRET=1 set before import)")


class _RoutedAttention(torch.autograd.Function):
    """Forward and backward kernels; saves q, k, v, the group weights, per-group outputs and log-sum-exps."""

    @staticmethod
    def forward(ctx, q, k, v, weights, plan, grid, prefix):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        launch = _Launch(q, weights, plan, grid, prefix)
        out = q.new_empty(q.shape)  # contiguous, whatever q's strides: the kernels write (B, H, N, d) rows
        per_group = q.new_empty(launch.batch, launch.heads, launch.groups, launch.n, launch.dim)
        lse = q.new_empty(launch.batch, launch.heads, launch.groups, launch.n, dtype=torch.float32)
        if q.numel():
            _forward_kernel[launch.grid('block_m')](q, k, v, weights, plan.radii, out, per_group, lse,
                                                   *launch.strides(q, k, v), *launch.args, **launch.meta)
        ctx.save_for_backward(q, k, v, weights, per_group, lse)
        ctx.launch = launch
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, weights, per_group, lse = ctx.saved_tensors
        launch = ctx.launch
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        # D_g = rowsum(dO * O_g) per group, in float32 (a group at a time keeps the transient small).
        grad_float = grad_out.float()
        delta = torch.stack([(grad_float * per_group[:, :, g].float()).sum(-1) for g in range(launch.groups)], dim=2)
        grad_weights = delta.sum(dim=(1, 3))
        grad_q, grad_k, grad_v = (q.new_empty(q.shape) for _ in range(3))
        if q.numel():
            common = (q, k, v, grad_out, weights, ctx.launch.plan.radii, lse, delta)
            strides = (*launch.strides(q, k, v), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2))
            _backward_kv_kernel[launch.grid('block_n')](*common, grad_k, grad_v, *strides, *launch.args, **launch.meta)
            _backward_q_kernel[launch.grid('block_m')](*common, grad_q, *strides, *launch.args, **launch.meta)
        return grad_q, grad_k, grad_v, grad_weights, None, None, None


class _Launch:
    """Shapes, scalar arguments and compile-time parameters shared by the three kernels."""

    def __init__(self, q, weights, plan: Plan, grid, prefix):
        self.batch, self.heads, self.n, self.dim = q.shape
        self.plan, self.groups = plan, weights.shape[1]
        params = LAUNCH_OVERRIDE or (CPU_LAUNCH if q.device.type == 'cpu'
                                     else CUDA_LAUNCH.get(plan.local_pad, CUDA_LAUNCH_MANY_ORDERS))
        self.block_m, self.block_n = params['block_m'], params['block_n']
        scale = self.dim ** -0.5
        self.args = (self.heads, self.n, self.dim, prefix, grid[0], grid[1], plan.reach, scale, scale * LOG2E,
                     self.groups)
        self.meta = dict(HAS_GLOBAL=plan.has_global, NUM_LOCAL=plan.num_local, LOCAL_PAD=plan.local_pad,
                         BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_D=max(16, triton.next_power_of_2(self.dim)),
                         PRECISION='ieee' if q.dtype == torch.float32 else 'tf32',
                         num_warps=params['num_warps'], num_stages=params['num_stages'])

    def grid(self, block: str) -> tuple[int, int]:
        return triton.cdiv(self.n, getattr(self, block)), self.batch * self.heads

    @staticmethod
    def strides(q, k, v) -> tuple[int, ...]:
        return tuple(s for t in (q, k, v) for s in t.stride()[:3])


# ---------------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _band(start, N, PREFIX, GRID_H, GRID_W, REACH, BLOCK: tl.constexpr, OTHER: tl.constexpr):
    """Blocks of OTHER tokens that tokens [start, start + BLOCK) reach within REACH grid rows.

    Returns (pre, lo, hi, count): the band is blocks [lo, hi), and [0, pre) are the prefix blocks outside
    it; a block holding prefix tokens reaches everything. Windows are symmetric, so this serves both
    queries reaching keys and keys seen by queries.
    """
    count = tl.cdiv(N, OTHER)
    first_row = (start - PREFIX) // GRID_W
    last_row = (tl.minimum(start + BLOCK, N) - 1 - PREFIX) // GRID_W
    lo = (PREFIX + tl.maximum(first_row - REACH, 0) * GRID_W) // OTHER
    hi = tl.cdiv(PREFIX + tl.minimum(last_row + REACH + 1, GRID_H) * GRID_W, OTHER)
    full = start < PREFIX
    lo = tl.where(full, 0, lo)
    hi = tl.where(full, count, hi)
    pre = tl.minimum(tl.cdiv(PREFIX, OTHER), lo)
    return pre, lo, hi, count


@triton.jit
def _program(H, N, PREFIX, GRID_H, GRID_W, REACH, NUM_LOCAL: tl.constexpr, BLOCK: tl.constexpr, OTHER: tl.constexpr):
    """This program's first token, (sample, head) row `bh`, sample, head, and the other side's blocks:
    [0, pre) and [lo, hi) for every order, the rest of [0, count) for the global orders only."""
    start = tl.program_id(0) * BLOCK
    bh = tl.program_id(1).to(tl.int64)
    pre, lo, hi, count = _band(start, N, PREFIX, GRID_H, GRID_W, REACH, BLOCK, OTHER)
    if NUM_LOCAL == 0:
        pre, lo, hi = 0, 0, 0
    return start, bh, bh // H, bh % H, pre, lo, hi, count


@triton.jit
def _nth_block(j, first, first_end, second):
    """The j-th block of the blocks [first, first_end) followed by [second, ...)."""
    return tl.where(j < first_end - first, first + j, second + j - (first_end - first))


@triton.jit
def _allowed(query, key, radius, PREFIX, GRID_W):
    """(rows, keys) mask of window attention: within `radius` grid steps, or a prefix token on either side."""
    qp, kp = query - PREFIX, key - PREFIX  # grid coordinates per row and per key, then their 2-D distances
    near = ((tl.abs((qp // GRID_W)[:, None] - (kp // GRID_W)[None, :]) <= radius[:, None])
            & (tl.abs((qp % GRID_W)[:, None] - (kp % GRID_W)[None, :]) <= radius[:, None]))
    return (query < PREFIX)[:, None] | (key < PREFIX)[None, :] | near


@triton.jit
def _stack(x, LOCAL_PAD: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """(ROWS, COLS) -> (LOCAL_PAD * ROWS, COLS): one copy of the rows per stacked local order."""
    return tl.reshape(tl.broadcast_to(x[None, :, :], (LOCAL_PAD, ROWS, COLS)), (LOCAL_PAD * ROWS, COLS))


@triton.jit
def _unstack_sum(x, LOCAL_PAD: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """(LOCAL_PAD * ROWS, COLS) -> (ROWS, COLS): the sum over the stacked local orders."""
    return tl.sum(tl.reshape(x, (LOCAL_PAD, ROWS, COLS)), axis=0)


@triton.jit
def _rows(ptr, start, N, D, stride_n, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pointers to rows [start, start + ROWS) of a (N, D) matrix with row stride stride_n, and where they are in it.

    `ptr` carries the (sample, head) offset; the offsets within one (N, D) matrix are 32-bit.
    """
    rows = start + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    return ptr + rows[:, None] * stride_n + cols[None, :], (rows[:, None] < N) & (cols[None, :] < D)


@triton.jit
def _load_rows(ptr, start, N, D, stride_n, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows [start, start + ROWS) of a (N, D) matrix as (ROWS, BLOCK_D), zero outside."""
    ptrs, inside = _rows(ptr, start, N, D, stride_n, ROWS, BLOCK_D)
    return tl.load(ptrs, mask=inside, other=0.0)


@triton.jit
def _store_rows(ptr, value, start, N, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store (ROWS, BLOCK_D) `value` as rows [start, start + ROWS) of a contiguous (N, D) matrix."""
    ptrs, inside = _rows(ptr, start, N, D, D, ROWS, BLOCK_D)
    tl.store(ptrs, value.to(ptr.dtype.element_ty), mask=inside)


@triton.jit
def _stacked_rows(start, RADII, NUM_LOCAL: tl.constexpr, LOCAL_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per stacked local row of the query block at `start`: query index, window radius, local order, validity."""
    rows = tl.arange(0, LOCAL_PAD * BLOCK_M)
    order = rows // BLOCK_M
    return start + rows % BLOCK_M, tl.load(RADII + order), order, order < NUM_LOCAL


@triton.jit
def _online_softmax_step(m, l, acc, s, v, PRECISION: tl.constexpr):
    """Fold one key block (base-2 scores `s`, -inf where masked) into a running max, sum and accumulator."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)  # rows with nothing allowed yet stay at zero
    correction = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l = l * correction + tl.sum(p, axis=1)
    acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l, acc


@triton.jit
def _finish(m, l, acc):
    """Normalised output and base-2 log-sum-exp (+inf for rows that saw nothing: zero probabilities in backward)."""
    seen = l > 0
    out = acc / tl.where(seen, l, 1.0)[:, None]
    return out, tl.where(seen, m + tl.log2(tl.where(seen, l, 1.0)), float('inf'))


# ---------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _forward_step(q, K, V, b_k, b_v, kb, state, local_query, radius, N, D, PREFIX, GRID_W, SCALE2,
                  sk_n, sv_n, LOCAL: tl.constexpr, HAS_GLOBAL: tl.constexpr, LOCAL_PAD: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One key block: its scores once, folded into the global softmax and (LOCAL) every local order's."""
    m_g, l_g, acc_g, m_l, l_l, acc_l = state
    keys = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    k = _load_rows(K + b_k, kb * BLOCK_N, N, D, sk_n, BLOCK_N, BLOCK_D)
    v = _load_rows(V + b_v, kb * BLOCK_N, N, D, sv_n, BLOCK_N, BLOCK_D)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * SCALE2
    s = tl.where((keys < N)[None, :], s, float('-inf'))
    if HAS_GLOBAL:
        m_g, l_g, acc_g = _online_softmax_step(m_g, l_g, acc_g, s, v, PRECISION)
    if LOCAL:
        stacked = _stack(s, LOCAL_PAD, BLOCK_M, BLOCK_N)
        stacked = tl.where(_allowed(local_query, keys, radius, PREFIX, GRID_W), stacked, float('-inf'))
        m_l, l_l, acc_l = _online_softmax_step(m_l, l_l, acc_l, stacked, v, PRECISION)
    return m_g, l_g, acc_g, m_l, l_l, acc_l


@triton.jit
def _forward_kernel(Q, K, V, W, RADII, OUT, PER_GROUP, LSE,
                    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                    H, N, D, PREFIX, GRID_H, GRID_W, REACH, SCALE, SCALE2, G,
                    HAS_GLOBAL: tl.constexpr, NUM_LOCAL: tl.constexpr, LOCAL_PAD: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One (sample, head, query block): mixed output, per-group outputs and log-sum-exps."""
    start, bh, b, head, pre, lo, hi, count = _program(H, N, PREFIX, GRID_H, GRID_W, REACH, NUM_LOCAL, BLOCK_M, BLOCK_N)
    query = start + tl.arange(0, BLOCK_M)
    q = _load_rows(Q + b * sq_b + head * sq_h, start, N, D, sq_n, BLOCK_M, BLOCK_D)
    local_query, radius, order, real = _stacked_rows(start, RADII, NUM_LOCAL, LOCAL_PAD, BLOCK_M)
    state = (tl.full((BLOCK_M,), float('-inf'), tl.float32), tl.zeros((BLOCK_M,), tl.float32),
             tl.zeros((BLOCK_M, BLOCK_D), tl.float32), tl.full((LOCAL_PAD * BLOCK_M,), float('-inf'), tl.float32),
             tl.zeros((LOCAL_PAD * BLOCK_M,), tl.float32), tl.zeros((LOCAL_PAD * BLOCK_M, BLOCK_D), tl.float32))
    b_k, b_v = b * sk_b + head * sk_h, b * sv_b + head * sv_h
    if HAS_GLOBAL:  # key blocks no window reaches: the global softmax only
        for j in range(0, (lo - pre) + (count - hi)):
            state = _forward_step(q, K, V, b_k, b_v, _nth_block(j, pre, lo, hi), state, local_query, radius,
                                  N, D, PREFIX, GRID_W, SCALE2, sk_n, sv_n, False, HAS_GLOBAL, LOCAL_PAD,
                                  BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    if NUM_LOCAL > 0:  # the prefix blocks and the band: every order
        for j in range(0, pre + (hi - lo)):
            state = _forward_step(q, K, V, b_k, b_v, _nth_block(j, 0, pre, lo), state, local_query, radius,
                                  N, D, PREFIX, GRID_W, SCALE2, sk_n, sv_n, True, HAS_GLOBAL, LOCAL_PAD,
                                  BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    m_g, l_g, acc_g, m_l, l_l, acc_l = state
    mixed = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    if HAS_GLOBAL:  # group slot 0
        out_g, lse_g = _finish(m_g, l_g, acc_g)
        mixed += tl.load(W + b * G) * out_g
        _store_rows(PER_GROUP + bh * G * N * D, out_g, start, N, D, BLOCK_M, BLOCK_D)
        tl.store(LSE + bh * G * N + query, lse_g, mask=query < N)
    if NUM_LOCAL > 0:  # group slots HAS_GLOBAL + order
        out_l, lse_l = _finish(m_l, l_l, acc_l)
        first = bh * G + HAS_GLOBAL * 1
        mixed += _unstack_sum(out_l * tl.load(W + b * G + HAS_GLOBAL * 1 + order, mask=real, other=0.0)[:, None],
                              LOCAL_PAD, BLOCK_M, BLOCK_D)
        # Stacked row (order, query) is row order * N + query of the local groups' (NUM_LOCAL * N, D) slab.
        cols = tl.arange(0, BLOCK_D)
        tl.store(PER_GROUP + first * N * D + (order * N + local_query)[:, None] * D + cols[None, :],
                 out_l.to(PER_GROUP.dtype.element_ty), mask=(real & (local_query < N))[:, None] & (cols[None, :] < D))
        tl.store(LSE + first * N + order * N + local_query, lse_l, mask=real & (local_query < N))
    _store_rows(OUT + bh * N * D, mixed, start, N, D, BLOCK_M, BLOCK_D)


# ---------------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _query_block(Q, DO, W, LSE, DELTA, RADII, b, head, bh, qb, sq_b, sq_h, sq_n, so_b, so_h, so_n, N, D, G,
                 HAS_GLOBAL: tl.constexpr, NUM_LOCAL: tl.constexpr, LOCAL_PAD: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """What backward needs of one query block: q, dO, and each group's weight, log-sum-exp and D term."""
    start = qb * BLOCK_M
    query = start + tl.arange(0, BLOCK_M)
    q = _load_rows(Q + b * sq_b + head * sq_h, start, N, D, sq_n, BLOCK_M, BLOCK_D)
    do = _load_rows(DO + b * so_b + head * so_h, start, N, D, so_n, BLOCK_M, BLOCK_D)
    in_n = query < N
    # Slot 0 is the global group's; without one these read a local group's values, and go unused.
    lse_g = tl.load(LSE + bh * G * N + query, mask=in_n, other=float('inf'))
    delta_g = tl.load(DELTA + bh * G * N + query, mask=in_n, other=0.0)
    weight_g = tl.load(W + b * G)
    local_query, _, order, real = _stacked_rows(start, RADII, NUM_LOCAL, LOCAL_PAD, BLOCK_M)
    keep = real & (local_query < N)
    first = bh * G + HAS_GLOBAL * 1
    lse_l = tl.load(LSE + first * N + order * N + local_query, mask=keep, other=float('inf'))
    delta_l = tl.load(DELTA + first * N + order * N + local_query, mask=keep, other=0.0)
    weight_l = tl.load(W + b * G + HAS_GLOBAL * 1 + order, mask=real, other=0.0)
    return q, do, lse_g, delta_g, weight_g, local_query, lse_l, delta_l, weight_l


@triton.jit
def _tile_grads(query_block, k, v, keys, radius, N, PREFIX, GRID_W, SCALE2, LOCAL: tl.constexpr,
                HAS_GLOBAL: tl.constexpr, LOCAL_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mixed probabilities sum_l w_l P_l and score gradients sum_l w_l P_l (dP - D_l)."""
    q, do, lse_g, delta_g, weight_g, local_query, lse_l, delta_l, weight_l = query_block
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * SCALE2
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    key_in = (keys < N)[None, :]
    mixed = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    ds = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if HAS_GLOBAL:
        p = tl.where(key_in, tl.exp2(s - lse_g[:, None]), 0.0) * weight_g
        mixed += p
        ds += p * (dp - delta_g[:, None])
    if LOCAL:
        allowed = _allowed(local_query, keys, radius, PREFIX, GRID_W) & key_in
        p = tl.where(allowed, tl.exp2(_stack(s, LOCAL_PAD, BLOCK_M, BLOCK_N) - lse_l[:, None]), 0.0) * weight_l[:, None]
        mixed += _unstack_sum(p, LOCAL_PAD, BLOCK_M, BLOCK_N)
        ds += _unstack_sum(p * (_stack(dp, LOCAL_PAD, BLOCK_M, BLOCK_N) - delta_l[:, None]), LOCAL_PAD, BLOCK_M,
                           BLOCK_N)
    return mixed, ds


@triton.jit
def _kv_step(Q, DO, W, LSE, DELTA, RADII, k, v, keys, dk, dv, b, head, bh, qb, radius, sq_b, sq_h, sq_n, so_b, so_h,
             so_n, N, D, PREFIX, GRID_W, SCALE2, G, LOCAL: tl.constexpr, HAS_GLOBAL: tl.constexpr,
             NUM_LOCAL: tl.constexpr, LOCAL_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one query block into the key block's dK and dV."""
    block = _query_block(Q, DO, W, LSE, DELTA, RADII, b, head, bh, qb, sq_b, sq_h, sq_n, so_b, so_h, so_n, N, D, G,
                         HAS_GLOBAL, NUM_LOCAL, LOCAL_PAD, BLOCK_M, BLOCK_D)
    q, do = block[0], block[1]
    mixed, ds = _tile_grads(block, k, v, keys, radius, N, PREFIX, GRID_W, SCALE2, LOCAL, HAS_GLOBAL,
                            LOCAL_PAD, BLOCK_M, BLOCK_N, PRECISION)
    dv += tl.dot(tl.trans(mixed.to(do.dtype)), do, input_precision=PRECISION)
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _backward_kv_kernel(Q, K, V, DO, W, RADII, LSE, DELTA, DK, DV,
                        sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
                        H, N, D, PREFIX, GRID_H, GRID_W, REACH, SCALE, SCALE2, G,
                        HAS_GLOBAL: tl.constexpr, NUM_LOCAL: tl.constexpr, LOCAL_PAD: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One (sample, head, key block): dK and dV over the query blocks that see it."""
    start, bh, b, head, pre, lo, hi, count = _program(H, N, PREFIX, GRID_H, GRID_W, REACH, NUM_LOCAL, BLOCK_N, BLOCK_M)
    keys = start + tl.arange(0, BLOCK_N)
    k = _load_rows(K + b * sk_b + head * sk_h, start, N, D, sk_n, BLOCK_N, BLOCK_D)
    v = _load_rows(V + b * sv_b + head * sv_h, start, N, D, sv_n, BLOCK_N, BLOCK_D)
    radius = _stacked_rows(0, RADII, NUM_LOCAL, LOCAL_PAD, BLOCK_M)[1]
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    if HAS_GLOBAL:  # query blocks no window of this key block reaches: the global softmax only
        for j in range(0, (lo - pre) + (count - hi)):
            dk, dv = _kv_step(Q, DO, W, LSE, DELTA, RADII, k, v, keys, dk, dv, b, head, bh, _nth_block(j, pre, lo, hi),
                              radius, sq_b, sq_h, sq_n, so_b, so_h, so_n, N, D, PREFIX, GRID_W, SCALE2, G, False,
                              HAS_GLOBAL, NUM_LOCAL, LOCAL_PAD, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    if NUM_LOCAL > 0:
        for j in range(0, pre + (hi - lo)):
            dk, dv = _kv_step(Q, DO, W, LSE, DELTA, RADII, k, v, keys, dk, dv, b, head, bh, _nth_block(j, 0, pre, lo),
                              radius, sq_b, sq_h, sq_n, so_b, so_h, so_n, N, D, PREFIX, GRID_W, SCALE2, G, True,
                              HAS_GLOBAL, NUM_LOCAL, LOCAL_PAD, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    _store_rows(DK + bh * N * D, dk * SCALE, start, N, D, BLOCK_N, BLOCK_D)
    _store_rows(DV + bh * N * D, dv, start, N, D, BLOCK_N, BLOCK_D)


@triton.jit
def _q_step(K, V, b_k, b_v, sk_n, sv_n, kb, block, radius, dq, N, D, PREFIX, GRID_W, SCALE2,
            LOCAL: tl.constexpr, HAS_GLOBAL: tl.constexpr, LOCAL_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one key block into the query block's dQ."""
    keys = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    k = _load_rows(K + b_k, kb * BLOCK_N, N, D, sk_n, BLOCK_N, BLOCK_D)
    v = _load_rows(V + b_v, kb * BLOCK_N, N, D, sv_n, BLOCK_N, BLOCK_D)
    _, ds = _tile_grads(block, k, v, keys, radius, N, PREFIX, GRID_W, SCALE2, LOCAL,
                        HAS_GLOBAL, LOCAL_PAD, BLOCK_M, BLOCK_N, PRECISION)
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _backward_q_kernel(Q, K, V, DO, W, RADII, LSE, DELTA, DQ,
                       sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
                       H, N, D, PREFIX, GRID_H, GRID_W, REACH, SCALE, SCALE2, G,
                       HAS_GLOBAL: tl.constexpr, NUM_LOCAL: tl.constexpr, LOCAL_PAD: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One (sample, head, query block): dQ over the key blocks it sees, as the forward sweeps them."""
    start, bh, b, head, pre, lo, hi, count = _program(H, N, PREFIX, GRID_H, GRID_W, REACH, NUM_LOCAL, BLOCK_M, BLOCK_N)
    block = _query_block(Q, DO, W, LSE, DELTA, RADII, b, head, bh, tl.program_id(0), sq_b, sq_h, sq_n, so_b, so_h, so_n,
                         N, D, G, HAS_GLOBAL, NUM_LOCAL, LOCAL_PAD, BLOCK_M, BLOCK_D)
    radius = _stacked_rows(start, RADII, NUM_LOCAL, LOCAL_PAD, BLOCK_M)[1]
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    b_k, b_v = b * sk_b + head * sk_h, b * sv_b + head * sv_h
    if HAS_GLOBAL:
        for j in range(0, (lo - pre) + (count - hi)):
            dq = _q_step(K, V, b_k, b_v, sk_n, sv_n, _nth_block(j, pre, lo, hi), block, radius, dq, N, D, PREFIX,
                         GRID_W, SCALE2, False, HAS_GLOBAL, LOCAL_PAD, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    if NUM_LOCAL > 0:
        for j in range(0, pre + (hi - lo)):
            dq = _q_step(K, V, b_k, b_v, sk_n, sv_n, _nth_block(j, 0, pre, lo), block, radius, dq, N, D, PREFIX,
                         GRID_W, SCALE2, True, HAS_GLOBAL, LOCAL_PAD, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    _store_rows(DQ + bh * N * D, dq * SCALE, start, N, D, BLOCK_M, BLOCK_D)
