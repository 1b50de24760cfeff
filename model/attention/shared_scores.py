"""Routed attention from one shared score matrix: the CPU implementation (it runs on any device).

Every order's map is a softmax of the same scores, so the scores are computed once: the global orders
share one softmax, the local orders need only the few scores inside their windows (a `SpanLayout`), and
the mixed map is built from them and applied to V with one product. Backward recomputes the softmaxes
chunk by chunk instead of keeping them, so training holds no (N, N) tensor per layer; only small calls
(`KEEP_ELEMENTS`), where recomputing costs more time than keeping costs memory, keep them.
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
    return _SharedScoresAttention.apply(q, k, v, alphas, *layout)


def chunks(shape: torch.Size, device: torch.device) -> list[tuple[slice, slice]]:
    """(sample, head) slices covering (B, H, N, d) with at most about CHUNK_ELEMENTS scores each."""
    batch, heads, n, _ = shape
    budget = CHUNK_ELEMENTS.get(device.type, DEFAULT_CHUNK_ELEMENTS)
    heads_per_chunk = max(1, min(heads, budget // (n * n)))
    samples_per_chunk = max(1, budget // (heads * n * n)) if heads_per_chunk == heads else 1
    return [(slice(b, b + samples_per_chunk), slice(h, h + heads_per_chunk))
            for b in range(0, batch, samples_per_chunk) for h in range(0, heads, heads_per_chunk)]


class _SharedScoresAttention(torch.autograd.Function):
    """Routed attention from one score matrix (see `routed_attention`); saves q, k, v and alphas, and the
    softmaxes and the mixed map too when the call is one chunk of at most KEEP_ELEMENTS scores.

    Chunk by chunk, the (N, N) matrices live in workspaces allocated once per call: fresh allocations of
    that size cost page faults on a CPU on every chunk.
    """

    @staticmethod
    def forward(ctx, q, k, v, alphas, index, valid, full_rows, global_orders, local_orders):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # heads' slices: no copy in every product
        out = torch.empty_like(q)
        pieces = chunks(q.shape, q.device)
        kept = ()
        with torch.autocast(q.device.type, enabled=False):
            scores, probs = _workspaces(q, pieces, 2)
            for samples, heads in pieces:
                maps = _softmaxes(q[samples, heads], k[samples, heads], index, valid, scores, probs)
                parts = _SharedScores(alphas[samples].to(q.dtype), full_rows, global_orders, local_orders, *maps)
                mixed = parts.mixed_map(scores, index)
                out[samples, heads] = mixed @ v[samples, heads]
            if len(pieces) == 1 and q.shape[0] * q.shape[1] * q.shape[2] ** 2 <= KEEP_ELEMENTS:
                kept = (*maps, mixed)
        ctx.save_for_backward(q, k, v, alphas, index, valid, full_rows, *kept)
        ctx.orders = global_orders, local_orders
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, alphas, index, valid, full_rows, *kept = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        grad_alphas = torch.zeros_like(alphas, dtype=torch.promote_types(q.dtype, torch.float32))
        pieces = chunks(q.shape, q.device)
        with torch.autocast(q.device.type, enabled=False):
            # The first workspace takes d loss / d map (recomputing: once the softmaxes are taken from the scores
            # in it), the last the mixed map.
            workspaces = _workspaces(q, pieces, 1 if kept else 3)
            for samples, heads in pieces:
                cq, ck = q[samples, heads], k[samples, heads]
                maps = kept[:2] or _softmaxes(cq, ck, index, valid, *workspaces[:2])
                parts = _SharedScores(alphas[samples].to(q.dtype), full_rows, *ctx.orders, *maps)
                mixed = kept[2] if kept else parts.mixed_map(workspaces[-1], index)
                grads = parts.backward(grad_out[samples, heads].to(q.dtype), cq, ck, v[samples, heads], index,
                                       workspaces[0], mixed)
                grad_q[samples, heads], grad_k[samples, heads], grad_v[samples, heads] = grads[:3]
                grad_alphas[samples] += grads[3]
        return grad_q, grad_k, grad_v, grad_alphas.to(alphas.dtype), None, None, None, None, None


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


def _softmaxes(q, k, index, valid, scores_workspace, probs_workspace) -> tuple[torch.Tensor, torch.Tensor]:
    """The global softmax of the scores, (b, h, N, N), and every local order's softmax over its window,
    (b, h, L_local, N, K): all orders' windows in one masked softmax."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1), out=_view(scores_workspace, q))
    window_scores = scores.gather(-1, index.expand(*q.shape[:2], *index.shape))
    window_probs = torch.where(valid, window_scores[:, :, None], float('-inf')).softmax(dim=-1)
    return torch.softmax(scores, dim=-1, out=_view(probs_workspace, q)), window_probs


class _SharedScores:
    """One chunk's softmaxes and routing weights: the mixed map, and the gradients through it."""

    def __init__(self, alphas, full_rows, global_orders, local_orders, probs, window_probs):
        self.global_orders, self.local_orders = global_orders, local_orders
        self.probs, self.window_probs = probs, window_probs
        self.full_rows = full_rows.to(probs.dtype)  # queries global in every order (CLS)
        self.local_rows = 1 - self.full_rows
        # Row i of the mixed map: row_scale[i] * probs[i] plus the local orders' window terms. The orders'
        # columns are taken one by one (Python ints): indexing with a list would copy it to the device and sync.
        weights = alphas.unbind(dim=1)
        local_sum = sum((weights[l] for l in local_orders), alphas.new_zeros(len(alphas)))
        global_sum = sum((weights[l] for l in global_orders), alphas.new_zeros(len(alphas)))
        self.row_scale = (global_sum[:, None] + self.full_rows * local_sum[:, None])[:, None, :, None]  # (B, 1, N, 1)
        local = torch.stack([weights[l] for l in local_orders], dim=1) if local_orders else alphas[:, :0]
        local_weights = (local[:, :, None] * self.local_rows)[:, None, :, :, None]  # (B, 1, L_local, N, 1)
        self.weighted_window_probs = local_weights * window_probs
        self.window_mix = self.weighted_window_probs.sum(dim=2)  # (B, H, N, K): the local orders' part of the map

    def mixed_map(self, workspace: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The (B, H, N, N) mixed attention map, built in `workspace`."""
        mixed = torch.mul(self.probs, self.row_scale, out=_view(workspace, self.probs))
        return mixed.scatter_add_(-1, index.expand_as(self.window_mix), self.window_mix)

    def backward(self, grad_out, q, k, v, index, grad_map_workspace, mixed):
        """Gradients of q, k, v and alphas from the gradient of the output and the mixed map; the workspace
        takes d loss / d map."""
        grad_map = torch.matmul(grad_out, v.transpose(-2, -1), out=_view(grad_map_workspace, grad_out))
        grad_v = mixed.transpose(-2, -1) @ grad_out
        global_dot = torch.einsum('bhij,bhij->bhi', grad_map, self.probs)  # d loss / d row_scale, per head
        row_dot = global_dot.sum(dim=1)  # (B, N)
        window = index.expand(*self.window_probs.shape[:2], *index.shape)
        grad_window = grad_map.gather(-1, window)  # (B, H, N, K)
        dot = (grad_window[:, :, None] * self.window_probs).sum(dim=-1, keepdim=True)  # (B, H, L_local, N, 1)
        grad_window_scores = grad_window * self.window_mix - (self.weighted_window_probs * dot).sum(dim=2)
        # The global softmax's backward through row_scale * probs, then the windows' part.
        grad_scores = grad_map.sub_(global_dot[..., None]).mul_(self.probs).mul_(self.row_scale)
        grad_scores.scatter_add_(-1, window, grad_window_scores)
        scale = q.shape[-1] ** -0.5
        grad_q = (grad_scores @ k) * scale
        grad_k = (grad_scores.transpose(-2, -1) @ q) * scale
        # d loss / d alpha: a global order weights every row's softmax, a local order its windows and the
        # full rows' softmax.
        global_grad = row_dot.sum(dim=1)
        local_grads = ((dot[..., 0].sum(dim=1) * self.local_rows).sum(dim=-1)
                       + (row_dot * self.full_rows).sum(dim=-1)[:, None]).unbind(dim=1)
        columns = dict(zip(self.local_orders, local_grads)) | {l: global_grad for l in self.global_orders}
        grad_alphas = torch.stack([columns[l] for l in range(len(columns))], dim=1)
        return grad_q, grad_k, grad_v, grad_alphas
