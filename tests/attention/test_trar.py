"""span_masks, Spans, routed_attention and the Router against hand-checked cases and a float64 reference."""
import pytest
import torch

from model.attention import Spans, routed_attention, span_masks
from model.trar import Router
from tests.conftest import reference_masks, reference_routed_attention


def test_span_masks_by_hand_3x3():
    masks = span_masks(3, [0, 1])
    assert masks.shape == (2, 10, 10) and masks.dtype == torch.bool
    assert masks[0].all()
    local = masks[1]
    assert local[0].all() and local[:, 0].all()  # CLS sees and is seen by everyone
    patches = local[1:, 1:]
    assert patches[4].all()  # the centre's 3x3 window is the whole grid
    corner = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool).flatten()
    assert torch.equal(patches[0], corner)
    edge = torch.tensor([[1, 1, 1], [1, 1, 1], [0, 0, 0]], dtype=torch.bool).flatten()
    assert torch.equal(patches[1], edge)


def test_span_masks_window_counts_5x5():
    patches = span_masks(5, [2])[0, 1:, 1:]
    counts = patches.sum(dim=1).view(5, 5)
    # Row/column counts of a radius-2 window clipped at the border: 3, 4, 5, 4, 3.
    per_axis = torch.tensor([3, 4, 5, 4, 3])
    assert torch.equal(counts, per_axis[:, None] * per_axis[None, :])
    assert torch.equal(patches, patches.T)


@pytest.mark.parametrize('grid, orders, prefix', [((4, 4), [0, 1, 2, 3], 1), ((3, 5), [1, 2], 1), ((2, 6), [0, 4], 2)])
def test_span_masks_match_brute_force(grid, orders, prefix):
    assert torch.equal(span_masks(grid, orders, prefix), reference_masks(*grid, orders, prefix))


@pytest.mark.parametrize('grid, orders', [(4, [4]), (4, [-1]), ((2, 3), [3]), (4, [1, 1])])
def test_span_masks_reject_bad_orders(grid, orders):
    with pytest.raises(ValueError, match='order'):
        span_masks(grid, orders)
    with pytest.raises(ValueError, match='order'):
        Spans(grid, orders)


@pytest.mark.parametrize('grid, orders, prefix', [((4, 4), [0, 1, 2], 1), ((3, 5), [2, 1], 0), ((2, 6), [0, 4], 3)])
def test_spans_hold_the_masks_and_layout_of_their_grid(grid, orders, prefix):
    """One `Spans` carries any grid and number of prefix tokens: its masks are the brute-force ones, and they and
    the layout move with `.to()` (non-persistent buffers: nothing in a state dict)."""
    spans = Spans(grid, orders, prefix)
    assert (spans.grid, spans.orders, spans.num_prefix_tokens) == (grid, tuple(orders), prefix)
    assert spans.num_tokens == prefix + grid[0] * grid[1]
    assert torch.equal(spans.masks, reference_masks(*grid, orders, prefix))
    assert spans.state_dict() == {}
    moved = spans.to('meta')
    assert {t.device.type for t in moved.tensors_on(torch.device('meta'))} == {'meta'}


@pytest.mark.parametrize('q_shape, alphas_shape', [((2, 1, 16, 4), (2, 2)), ((2, 1, 17, 4), (2, 3))])
def test_routed_attention_rejects_inputs_that_do_not_fit_the_spans(q_shape, alphas_shape):
    q = torch.zeros(q_shape)
    with pytest.raises(ValueError, match=r'do not fit 1 prefix tokens, a 4x4 grid and orders \[0, 1\]'):
        routed_attention(q, q, q, torch.zeros(alphas_shape), Spans(4, [0, 1]))


CASES = [  # (batch, heads, grid, orders, head_dim)
    (2, 3, (4, 4), [0, 1, 2], 8),
    (1, 2, (3, 5), [0, 1], 16),
    (3, 1, (5, 2), [1, 2, 3], 4),
    (2, 2, (6, 6), [0, 1, 2, 3], 8),
    (4, 2, (2, 2), [0], 8),
]


@pytest.mark.parametrize('batch, heads, grid, orders, head_dim', CASES)
def test_routed_attention_matches_reference_forward_and_backward(batch, heads, grid, orders, head_dim):
    torch.manual_seed(0)
    n = 1 + grid[0] * grid[1]
    q, k, v = (torch.randn(batch, heads, n, head_dim, requires_grad=True) for _ in range(3))
    alphas = torch.randn(batch, len(orders)).softmax(-1).requires_grad_()
    grad_out = torch.randn(batch, heads, n, head_dim)

    out = routed_attention(q, k, v, alphas, Spans(grid, orders))
    grads = torch.autograd.grad(out, (q, k, v, alphas), grad_out)
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v, alphas)]
    ref = reference_routed_attention(*ref_inputs[:3], reference_masks(*grid, orders), ref_inputs[3])
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out.double())

    assert out.shape == (batch, heads, n, head_dim)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-4)


def test_inference_with_one_hot_weights_computes_each_sample_once():
    torch.manual_seed(2)
    grid, orders = (4, 5), (0, 1, 2)
    q, k, v = (torch.randn(5, 2, 21, 8) for _ in range(3))
    choice = torch.tensor([2, 0, 1, 2, 2])
    alphas = torch.nn.functional.one_hot(choice, 3).float()
    with torch.no_grad():
        out = routed_attention(q, k, v, alphas, Spans(grid, orders), binarized=True)
    expected = reference_routed_attention(q, k, v, reference_masks(*grid, orders), alphas)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


def test_routed_attention_one_hot_alpha_is_that_span():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 2, 17, 8) for _ in range(3))
    masks = span_masks(4, [0, 1])
    local_only = routed_attention(q, k, v, torch.tensor([[0.0, 1.0], [0.0, 1.0]]), Spans(4, [0, 1]))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=masks[1])
    torch.testing.assert_close(local_only, expected)


def test_router_soft_weights_are_a_softmax():
    torch.manual_seed(0)
    for pooling in ('avg', 'attention', 'fc'):
        router = Router(16, 3, pooling=pooling)
        alphas = router(torch.randn(5, 10, 16))
        assert alphas.shape == (5, 3)
        torch.testing.assert_close(alphas.sum(-1), torch.ones(5))
        assert (alphas > 0).all()


def test_router_avg_pooling_is_the_token_mean():
    torch.manual_seed(0)
    router = Router(8, 2, pooling='avg')
    x = torch.randn(3, 6, 8)
    expected = router.mlp(x.mean(dim=1)).softmax(-1)
    torch.testing.assert_close(router(x), expected)


def test_router_hard_routing():
    torch.manual_seed(0)
    router = Router(8, 3, routing='hard', binarize=True)
    x = torch.randn(64, 5, 8)
    logits = router.mlp(router.pool(x))
    router.eval()
    one_hot = router(x)
    assert torch.equal(one_hot.argmax(-1), logits.argmax(-1))
    assert torch.equal(one_hot.sum(-1), torch.ones(64)) and set(one_hot.unique().tolist()) <= {0.0, 1.0}
    router.binarize = False
    router.tau.fill_(2.0)
    torch.testing.assert_close(router(x), (logits / 2.0).softmax(-1))
    router.train()
    router.tau.fill_(1e-3)  # a tiny temperature makes Gumbel-softmax samples nearly one-hot
    samples = router(x)
    torch.testing.assert_close(samples.sum(-1), torch.ones(64))
    assert (samples.max(-1).values > 0.99).float().mean() > 0.95
    router.tau.fill_(1e3)  # a huge one makes them nearly uniform
    torch.testing.assert_close(router(x), torch.full((64, 3), 1 / 3), atol=0.02, rtol=0)


@pytest.mark.parametrize('kwargs, word', [({'pooling': 'max'}, 'pooling'), ({'routing': 'sparse'}, 'routing')])
def test_router_rejects_unknown_names(kwargs, word):
    with pytest.raises(ValueError, match=word):
        Router(8, 2, **kwargs)
