"""Binarized inference: each image computes only the orders its (one-hot) routing weights use.

Patch queries of a local order attend within a band of grid rows around them (banded window attention),
so an image routed to a small window never builds its (N, N) scores.
"""
import torch
import torch.nn.functional as F


def banded_routed_attention(q, k, v, alphas, grid, orders) -> torch.Tensor:
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
