"""Routed attention from one shared score matrix: the CPU implementation (it runs on any device).

Every order's map is a softmax of the same scores, so the scores are computed once: the global orders
share one softmax, each local order needs only the few scores inside its window (a `SpanLayout`), and
the mixed map is built in place and applied to V with one product. Backward recomputes the map chunk
by chunk instead of keeping it, so training holds no (N, N) tensor per layer.
"""
import torch


def shared_scores_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alphas: torch.Tensor,
                            layout) -> torch.Tensor:
    """`sum_l alphas[:, l] * softmax_l(q k^T / sqrt(d)) v` for (B, H, N, d) q, k, v and (B, L) alphas."""
    return _SharedScoresAttention.apply(q, k, v, alphas, *layout)


# Score-matrix elements computed at once by routed attention (per chunk of samples and heads): bounds the
# transient memory of the (N, N) maps; a GPU affords larger chunks than a CPU's caches favour.
CHUNK_ELEMENTS = {'cpu': 2 ** 21}
DEFAULT_CHUNK_ELEMENTS = 2 ** 28


def chunks(shape: torch.Size, device: torch.device) -> list[tuple[slice, slice]]:
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
        pieces = chunks(q.shape, q.device)
        with torch.autocast(q.device.type, enabled=False):
            scores, probs = _workspaces(q, pieces, 2)
            for samples, heads in pieces:
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
        pieces = chunks(q.shape, q.device)
        with torch.autocast(q.device.type, enabled=False):
            scores, probs = _workspaces(q, pieces, 2)
            for samples, heads in pieces:
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
