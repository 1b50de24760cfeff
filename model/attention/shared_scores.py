"""Routed attention from one shared score matrix: the CPU implementation (it runs on any device).

Every order's map is a softmax of the same scores, so the scores are computed once: the global orders
share one softmax, the local orders need only the few scores inside their windows (a `SpanLayout`), and
the mixed map is built from them and applied to V with one product. Backward recomputes the softmaxes
chunk by chunk instead of keeping them, so training holds no (N, N) tensor per layer; only small calls
(`KEEP_ELEMENTS`), where recomputing costs more time than keeping costs memory, keep them.

The routing weights enter as per-row weights (`alphas @ SpanLayout.mixing`, plain autograd), so the custom Function
is attention with weighted rows: `(full * softmax(S) + sum_l local_l * window softmax_l(S)) v`.
"""
import torch

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
        bias = torch.where(layout.valid, 0.0, float('-inf')).to(q.dtype)
        return _SharedScoresAttention.apply(q, k, v, rows, layout.index, bias, layout.widths)


def chunks(shape: torch.Size, device: torch.device) -> list[tuple[slice, slice]]:
    """(sample, head) slices covering (B, H, N, d) with at most about CHUNK_ELEMENTS scores each."""
    batch, heads, n, _ = shape
    budget = CHUNK_ELEMENTS.get(device.type, DEFAULT_CHUNK_ELEMENTS)
    heads_per_chunk = max(1, min(heads, budget // (n * n)))
    samples_per_chunk = max(1, budget // (heads * n * n)) if heads_per_chunk == heads else 1
    return [(slice(b, b + samples_per_chunk), slice(h, h + heads_per_chunk))
            for b in range(0, batch, samples_per_chunk) for h in range(0, heads, heads_per_chunk)]


class _SharedScoresAttention(torch.autograd.Function):
    """Attention with weighted rows from one score matrix. Row i of a sample's mixed map is `full[i] *
    softmax(scores)[i] + sum_l local[l, i] * (order l's softmax over row i's window)`, `rows` (B, 1 + L_local, N)
    holding full, then local. Saves q, k, v and the weights, and the softmaxes and the mixed map too when the call
    is one chunk of at most KEEP_ELEMENTS scores.

    Chunk by chunk, the (N, N) matrices live in workspaces allocated once per call: fresh allocations of
    that size cost page faults on a CPU on every chunk. `bias` is 0 where a local order's window allows a key
    and -inf elsewhere, (L_local, N, K) like `index`; local order l looks at the first `widths[l]` of the K.
    """

    @staticmethod
    def forward(ctx, q, k, v, rows, index, bias, widths):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # heads' slices: no copy in every product
        full, local = _row_weights(rows)
        pieces = chunks(q.shape, q.device)
        scores, probs = _workspaces(q, pieces, 2)
        outputs = []
        for samples, heads in pieces:
            maps = _softmaxes(q[samples, heads], k[samples, heads], index, bias, widths, scores, probs)
            mixed = _mixed_map(*maps, full[samples], local[samples], index, scores)
            outputs.append(mixed @ v[samples, heads])
        keep = len(pieces) == 1 and q.shape[0] * q.shape[1] * q.shape[2] ** 2 <= KEEP_ELEMENTS
        ctx.save_for_backward(q, k, v, rows, index, bias, *((mixed, maps[0], *maps[1]) if keep else ()))
        ctx.widths = widths
        return _stitch(pieces, outputs, q)

    @staticmethod
    @torch.autocast('cpu', enabled=False)
    @torch.autocast('cuda', enabled=False)
    def backward(ctx, grad_out):  # a backward called under autocast still computes in q's dtype
        q, k, v, rows, index, bias, *kept = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        full, local = _row_weights(rows)
        pieces = chunks(q.shape, q.device)
        # The first workspace takes d loss / d map (recomputing: once the softmaxes are taken from the scores in
        # it), the last the mixed map.
        workspaces = _workspaces(q, pieces, 1 if kept else 3)
        grads, grad_rows = [], torch.zeros_like(rows)
        for samples, heads in pieces:
            cq, ck, chunk_full, chunk_local = q[samples, heads], k[samples, heads], full[samples], local[samples]
            if kept:
                mixed, maps = kept[0], (kept[1], kept[2:])
            else:
                maps = _softmaxes(cq, ck, index, bias, ctx.widths, *workspaces[:2])
                mixed = _mixed_map(*maps, chunk_full, chunk_local, index, workspaces[-1])
            *chunk_grads, chunk_grad_rows = _backward(grad_out[samples, heads], cq, ck, v[samples, heads], *maps,
                                                      chunk_full, chunk_local, index, mixed, workspaces[0])
            grads.append(chunk_grads)
            grad_rows[samples] += chunk_grad_rows
        grad_q, grad_k, grad_v = (_stitch(pieces, [chunk[i] for chunk in grads], q) for i in range(3))
        return grad_q, grad_k, grad_v, grad_rows, None, None, None


def _row_weights(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1 + L_local, N) row weights as full (B, 1, N, 1) and local (B, 1, L_local, N, 1), to broadcast."""
    return rows[:, None, 0, :, None], rows[:, None, 1:, :, None]


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


def _softmaxes(q, k, index, bias, widths, scores_workspace, probs_workspace):
    """The global softmax of the scores, (b, h, N, N), and the list of each local order's softmax over its window,
    (b, h, N, widths[l])."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1), out=_view(scores_workspace, q))
    window_scores = scores.gather(-1, index.expand(*q.shape[:2], *index.shape))
    window_probs = [torch.add(window_scores[..., :width], bias[l, :, :width]).softmax(dim=-1)
                    for l, width in enumerate(widths)]
    return torch.softmax(scores, dim=-1, out=_view(probs_workspace, q)), window_probs


def _window_sum(window_probs: list[torch.Tensor], weights: list[torch.Tensor], total: torch.Tensor) -> torch.Tensor:
    """`total + sum_l weights[l] * window_probs[l]`, in `total` (b, h, N, K): each (b, h, N, widths[l]) term fills
    the first widths[l] entries."""
    for probs, weight in zip(window_probs, weights):
        total[..., :probs.shape[-1]].addcmul_(probs, weight)
    return total


def _mixed_map(probs, window_probs, full, local, index, workspace) -> torch.Tensor:
    """The (b, h, N, N) mixed attention map, built in `workspace`."""
    window = index.expand(*probs.shape[:2], *index.shape)
    window_mix = _window_sum(window_probs, local.unbind(dim=2), probs.new_zeros(window.shape))
    return torch.mul(probs, full, out=_view(workspace, probs)).scatter_add_(-1, window, window_mix)


def _backward(grad_out, q, k, v, probs, window_probs, full, local, index, mixed, grad_map_workspace):
    """Gradients of q, k, v and of the row weights (b, 1 + L_local, N) from the gradient of the output; the workspace
    takes d loss / d map, then d loss / d scores."""
    grad_map = torch.matmul(grad_out, v.transpose(-2, -1), out=_view(grad_map_workspace, grad_out))
    grad_v = mixed.transpose(-2, -1) @ grad_out
    window = index.expand(*q.shape[:2], *index.shape)
    grad_window = grad_map.gather(-1, window)  # (b, h, N, K)
    # Each softmax's backward is p * (g - <g, p>); the map weights them, and the scores' scale is applied here.
    scale = q.shape[-1] ** -0.5
    window_dots = [torch.linalg.vecdot(grad_window[..., :p.shape[-1]], p)[..., None] for p in window_probs]
    grad_window_scores = _window_sum(window_probs, [
        torch.sub(grad_window[..., :p.shape[-1]], dot).mul_(weight * scale)
        for p, dot, weight in zip(window_probs, window_dots, local.unbind(dim=2))], torch.zeros_like(grad_window))
    grad_scores = grad_map.mul_(probs)
    global_dot = grad_scores.sum(dim=-1, keepdim=True)  # (b, h, N, 1): d loss / d full, per head
    grad_scores.addcmul_(probs, -global_dot).mul_(full * scale)
    grad_scores.scatter_add_(-1, window, grad_window_scores)
    grad_q = grad_scores @ k
    grad_k = grad_scores.transpose(-2, -1) @ q
    grad_rows = torch.cat([global_dot, *window_dots], dim=-1).sum(dim=1).transpose(-1, -2)  # (b, 1 + L_local, N)
    return grad_q, grad_k, grad_v, grad_rows
