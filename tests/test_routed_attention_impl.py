"""The windowed paths of routed_attention (banded local orders, per-sample dispatch) against the float64 formula."""
import pytest
import torch
import torch.nn.functional as F

import model.trar as trar
from model.trar import routed_attention, span_masks
from tests.test_trar import reference_routed_attention

CASES = [  # (batch, heads, grid, orders, head_dim, tile rows)
    (2, 2, (4, 4), [0, 1, 2], 8, 1),
    (2, 2, (7, 3), [0, 1, 2], 8, 3),  # tiles that overhang the grid
    (3, 1, (5, 2), [1, 2, 3], 4, 2),  # no global order: CLS still global
    (2, 2, (2, 6), [2, 0], 8, 2),     # order wider than the grid's height, orders unsorted
    (1, 2, (6, 6), [0, 1, 2, 3], 8, None),
]


def inputs(batch, heads, grid, orders, head_dim):
    torch.manual_seed(0)
    n = 1 + grid[0] * grid[1]
    q, k, v = (torch.randn(batch, heads, n, head_dim, dtype=torch.float64, requires_grad=True) for _ in range(3))
    return q, k, v, span_masks(grid, orders), torch.randn(batch, len(orders), dtype=torch.float64)


@pytest.mark.parametrize('batch, heads, grid, orders, head_dim, rows', CASES)
def test_windowed_matches_formula_forward_and_backward(monkeypatch, batch, heads, grid, orders, head_dim, rows):
    if rows is not None:
        monkeypatch.setattr(trar, '_tile_rows', lambda grid: rows)
    q, k, v, masks, alphas = inputs(batch, heads, grid, orders, head_dim)
    out = routed_attention(q, k, v, masks, alphas, grid=grid, orders=orders)
    expected = reference_routed_attention(q, k, v, masks, alphas)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize('batch, heads, grid, orders, head_dim, rows', CASES)
def test_binarized_dispatch_matches_formula(batch, heads, grid, orders, head_dim, rows):
    q, k, v, masks, _ = inputs(6, heads, grid, orders, head_dim)
    choice = torch.arange(6) % len(orders)
    one_hot = F.one_hot(choice, len(orders)).double()
    with torch.no_grad():
        out = routed_attention(q, k, v, masks, one_hot, grid=grid, orders=orders)
    torch.testing.assert_close(out, reference_routed_attention(q, k, v, masks, one_hot))


def test_binarized_dispatch_skips_unused_orders(monkeypatch):
    """With one-hot weights choosing only local orders, no patch query runs global attention."""
    q, k, v, masks, _ = inputs(2, 2, (4, 4), [0, 1], 8)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(trar.F, 'scaled_dot_product_attention', lambda q, *a, **kw: calls.append(q.shape[2]) or sdpa(q, *a, **kw))
    with torch.no_grad():
        routed_attention(q, k, v, masks, torch.tensor([[0., 1.], [0., 1.]], dtype=torch.float64), grid=(4, 4), orders=[0, 1])
    assert calls == [1]  # only the CLS queries


def test_dropout_falls_back_to_dense_orders():
    q, k, v, masks, alphas = inputs(2, 2, (3, 3), [0, 1], 8)
    torch.manual_seed(1)
    dense = trar._dense_routed_attention(q, k, v, masks, alphas, 0.5)
    torch.manual_seed(1)
    out = routed_attention(q, k, v, masks, alphas, 0.5, grid=(3, 3), orders=[0, 1])
    torch.testing.assert_close(out, dense)


def test_wrong_grid_is_rejected():
    q, k, v, masks, alphas = inputs(1, 1, (3, 3), [0, 1], 4)
    with pytest.raises(ValueError, match='grid'):
        routed_attention(q, k, v, masks, alphas, grid=(3, 4), orders=[0, 1])
