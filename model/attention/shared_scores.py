"""Routed attention from one shared score matrix: the CPU implementation (it runs on any device).

Every order's map is a softmax of the same scores, so they are computed once, the local orders read only their
windows (a `SpanLayout`), and backward recomputes the softmaxes chunk by chunk instead of keeping them. On a CPU in
float32 or float64 the softmaxes and mixed map are the fused C++ kernel of `shared_scores_cpu`; elsewhere, or under
torch.compile, the PyTorch ops below, which the tests check the kernel against. docs/attention.md explains the method.
"""
from typing import NamedTuple

import torch

from . import shared_scores_cpu

# Score-matrix elements computed at once by routed attention (per chunk of samples and heads): bounds the
# transient memory of the (N, N) maps; a GPU affords larger chunks than a CPU's caches favour.
CHUNK_ELEMENTS = {'cpu': 2 ** 21}
DEFAULT_CHUNK_ELEMENTS = 2 ** 28
# Calls with at most this many scores in all (B * H * N * N: about 2^19 for the demo model, 2^21 for ViT-B/16 at
# 224 px and batch 4) keep their softmaxes and mixed map for backward instead of recomputing them: two (N, N)
# maps and the windows' probabilities per layer.
KEEP_ELEMENTS = 2 ** 20


def shared_scores_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alphas: torch.Tensor,
                            layout) -> torch.Tensor:
    """`sum_l alphas[:, l] * softmax_l(q k^T / sqrt(d)) v` for (B, H, N, d) q, k, v and (B, L) alphas."""
    with torch.autocast(q.device.type, enabled=False):
        rows = (alphas.to(q.dtype) @ layout.mixing.to(q.dtype)).unflatten(1, (-1, q.shape[2]))
        return _SharedScoresAttention.apply(q, k, v, rows, layout.index, layout.valid, layout.widths)


def chunks(shape: torch.Size, device: torch.device) -> list[tuple[slice, slice]]:
    """(sample, head) slices covering (B, H, N, d) with at most about CHUNK_ELEMENTS scores each."""
    batch, heads, n, _ = shape
    budget = CHUNK_ELEMENTS.get(device.type, DEFAULT_CHUNK_ELEMENTS)
    heads_per_chunk = max(1, min(heads, budget // (n * n)))
    samples_per_chunk = max(1, budget // (heads * n * n)) if heads_per_chunk == heads else 1
    return [(slice(b, b + samples_per_chunk), slice(h, h + heads_per_chunk))
            for b in range(0, batch, samples_per_chunk) for h in range(0, heads, heads_per_chunk)]


class Maps(NamedTuple):
    """A chunk's maps: the global softmax and the mixed map, (b, h, N, N), and the local orders' window
    softmaxes in the form of the path that made them (a list of (b, h, N, widths[l]) for the PyTorch ops, one
    (b, h, N, L_local, K padded) tensor for the kernel)."""
    probs: torch.Tensor
    mixed: torch.Tensor
    window_probs: tuple[torch.Tensor, ...]


class _SharedScoresAttention(torch.autograd.Function):
    """Attention with weighted rows from one score matrix. Row i of a sample's mixed map is `full[i] *
    softmax(scores)[i] + sum_l local[l, i] * (order l's softmax over row i's window)`, `rows` (B, 1 + L_local, N)
    holding full, then local. Saves q, k, v and the weights, and the maps too when the call is one chunk of at
    most KEEP_ELEMENTS scores.

    Chunk by chunk, the (N, N) matrices live in workspaces allocated once per call: fresh allocations of
    that size cost page faults on a CPU on every chunk. `valid` (L_local, N, K) says which of the keys `index`
    (N, K) names each local order allows; local order l looks at the first `widths[l]` of the K.
    """

    @staticmethod
    def forward(ctx, q, k, v, rows, index, valid, widths):
        q, k, v, rows = q.contiguous(), k.contiguous(), v.contiguous(), rows.contiguous()  # no copy per product
        fused = shared_scores_cpu.runs_on(q)
        pieces = chunks(q.shape, q.device)
        workspaces = _workspaces(q, pieces, 2)
        outputs = []
        for samples, heads in pieces:
            maps = _maps(q[samples, heads], k[samples, heads], rows[samples], index, valid, widths, fused, workspaces)
            outputs.append(maps.mixed @ v[samples, heads])
        keep = len(pieces) == 1 and q.shape[0] * q.shape[1] * q.shape[2] ** 2 <= KEEP_ELEMENTS
        kept = (maps.probs, maps.mixed, *maps.window_probs) if keep else ()
        ctx.save_for_backward(q, k, v, rows, index, valid, *kept)
        ctx.widths, ctx.fused = widths, fused
        return _stitch(pieces, outputs, q)

    @staticmethod
    @torch.autocast('cpu', enabled=False)
    @torch.autocast('cuda', enabled=False)
    def backward(ctx, grad_out):  # a backward called under autocast still computes in q's dtype
        q, k, v, rows, index, valid, *kept = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        pieces = chunks(q.shape, q.device)
        # Recomputing: the first workspace takes the scores, then the softmax; the second the mixed map; the last
        # d loss / d map, then d loss / d scores.
        workspaces = _workspaces(q, pieces, 1 if kept else 3)
        scale = q.shape[-1] ** -0.5
        grads, grad_rows = [], []
        for samples, heads in pieces:
            cq, ck, cv, chunk_rows = q[samples, heads], k[samples, heads], v[samples, heads], rows[samples]
            maps = Maps(kept[0], kept[1], tuple(kept[2:])) if kept else \
                _maps(cq, ck, chunk_rows, index, valid, ctx.widths, ctx.fused, workspaces)
            chunk_grad_out = grad_out[samples, heads]
            grad_map = torch.matmul(chunk_grad_out, cv.transpose(-2, -1), out=_view(workspaces[-1], cq))
            grad_v = maps.mixed.transpose(-2, -1) @ chunk_grad_out
            score_grads = shared_scores_cpu.score_grads if ctx.fused else _score_grads
            grad_scores, chunk_grad_rows = score_grads(grad_map, maps, chunk_rows, index, ctx.widths, scale)
            grads.append((grad_scores @ ck, grad_scores.transpose(-2, -1) @ cq, grad_v))
            grad_rows.append((samples, chunk_grad_rows))
        grad_q, grad_k, grad_v = (_stitch(pieces, [chunk[i] for chunk in grads], q) for i in range(3))
        return grad_q, grad_k, grad_v, _sum_rows(grad_rows, rows), None, None, None


def _maps(q, k, rows, index, valid, widths, fused, workspaces) -> Maps:
    """A chunk's maps from its q and k; the scores and the softmax take the first workspace, the mixed map the
    second."""
    scores = torch.matmul(q, k.transpose(-2, -1), out=_view(workspaces[0], q))
    maps = shared_scores_cpu.maps if fused else _softmaxes_and_mix
    return Maps(*maps(scores, rows, index, valid, widths, q.shape[-1] ** -0.5, _view(workspaces[1], q)))


def _workspaces(q: torch.Tensor, chunks: list[tuple[slice, slice]], count: int) -> list[torch.Tensor]:
    """`count` flat buffers, each large enough for the (samples, heads, N, N) scores of any chunk."""
    batch, heads, n, _ = q.shape
    samples, chunk_heads = chunks[0] if chunks else (slice(0), slice(0))  # the first chunk is the largest
    size = len(range(batch)[samples]) * len(range(heads)[chunk_heads]) * n * n
    return [q.new_empty(size) for _ in range(count)]


def _view(workspace: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The start of a flat workspace as the (b, h, N, N) score matrix of `like`, (b, h, N, ...)."""
    b, h, n, _ = like.shape
    return workspace[:b * h * n * n].view(b, h, n, n)


def _stitch(pieces: list[tuple[slice, slice]], parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The chunks' (b, h, N, d) results as one tensor shaped like `like` (no copy for a single chunk)."""
    if len(parts) == 1:
        return parts[0]
    whole = torch.empty_like(like)
    for (samples, heads), part in zip(pieces, parts):
        whole[samples, heads] = part
    return whole


def _sum_rows(parts: list[tuple[slice, torch.Tensor]], rows: torch.Tensor) -> torch.Tensor:
    """The chunks' d loss / d row weights (each chunk's heads summed) as one tensor shaped like `rows`."""
    if len(parts) == 1:
        return parts[0][1]
    total = torch.zeros_like(rows)
    for samples, part in parts:
        total[samples] += part
    return total


# The PyTorch ops: what runs where the fused kernel does not, and what the tests check the kernel against.

def _row_weights(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, 1 + L_local, N) row weights as full (b, 1, N, 1) and local (b, 1, L_local, N, 1), to broadcast."""
    return rows[:, None, 0, :, None], rows[:, None, 1:, :, None]


def _softmaxes_and_mix(scores, rows, index, valid, widths, scale, mixed_workspace) -> Maps:
    """From the (b, h, N, N) unscaled scores: the global softmax of scale * scores (in place of the scores), each
    local order's softmax over its window, (b, h, N, widths[l]), and the mixed map (in `mixed_workspace`)."""
    full, local = _row_weights(rows)
    scores = scores.mul_(scale)
    window = index.expand(*scores.shape[:2], *index.shape)
    bias = torch.where(valid, 0.0, float('-inf')).to(scores.dtype)  # (L_local, N, K): -inf where not allowed
    window_scores = scores.gather(-1, window)
    window_probs = tuple(torch.add(window_scores[..., :width], bias[l, :, :width]).softmax(dim=-1)
                         for l, width in enumerate(widths))
    probs = torch.softmax(scores, dim=-1, out=scores)
    window_mix = _window_sum(window_probs, local.unbind(dim=2), probs.new_zeros(window.shape))
    mixed = torch.mul(probs, full, out=mixed_workspace).scatter_add_(-1, window, window_mix)
    return Maps(probs, mixed, window_probs)


def _window_sum(window_probs, weights, total: torch.Tensor) -> torch.Tensor:
    """`total + sum_l weights[l] * window_probs[l]`, in `total` (b, h, N, K): each (b, h, N, widths[l]) term fills
    the first widths[l] entries."""
    for probs, weight in zip(window_probs, weights):
        total[..., :probs.shape[-1]].addcmul_(probs, weight)
    return total


def _score_grads(grad_map, maps, rows, index, widths, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """d loss / d scores times `scale` (in place of d loss / d map, (b, h, N, N)) and d loss / d row weights,
    (b, 1 + L_local, N): each softmax's backward p * (g - <g, p>), weighted as the forward mixed them."""
    full, local = _row_weights(rows)
    window = index.expand(*grad_map.shape[:2], *index.shape)
    grad_window = grad_map.gather(-1, window)  # (b, h, N, K)
    window_dots = [torch.linalg.vecdot(grad_window[..., :p.shape[-1]], p)[..., None] for p in maps.window_probs]
    grad_window_scores = _window_sum(maps.window_probs, [
        torch.sub(grad_window[..., :p.shape[-1]], dot).mul_(weight * scale)
        for p, dot, weight in zip(maps.window_probs, window_dots, local.unbind(dim=2))], torch.zeros_like(grad_window))
    grad_scores = grad_map.mul_(maps.probs)
    global_dot = grad_scores.sum(dim=-1, keepdim=True)  # (b, h, N, 1): d loss / d full, per head
    grad_scores.addcmul_(maps.probs, -global_dot).mul_(full * scale)
    grad_scores.scatter_add_(-1, window, grad_window_scores)
    grad_rows = torch.cat([global_dot, *window_dots], dim=-1).sum(dim=1).transpose(-1, -2)  # (b, 1 + L_local, N)
    return grad_scores, grad_rows
