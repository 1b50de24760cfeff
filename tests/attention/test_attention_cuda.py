"""Every routed attention implementation on CUDA against the float64 formula, forward and backward, in float32 and
under bf16 and fp16 autocast; binarized dispatch; a training step that never waits for the host. Skipped without a GPU.

Sized for benchmarks/gpu_check.py's few minutes: flex attention compiles one graph per shape and dtype (10 to 25 s
each with Inductor), so it is checked at the ViT-B/16 shape in bf16 and on one small case in float32, not on every
case; the other implementations compile nothing (Triton's kernels take seconds) and run every case. Tests and their
parameters run most valuable first: Triton, dense and shared scores, then flex.
"""
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from model.config import get_config
from model.modeling import VisionTransformer
from model.attention import IMPLEMENTATIONS, Spans, routed_attention, span_masks, use_implementation
from tests.conftest import reference_routed_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

CASES = [  # (batch, heads, grid, orders, head_dim, prefix tokens)
    (2, 3, (6, 6), [0, 1, 2], 32, 1),
    (2, 2, (5, 7), [2, 0, 1], 16, 1),     # non-square grid, orders unsorted
    (3, 2, (4, 6), [1, 3], 64, 1),        # no global order: CLS still global
    (2, 2, (3, 4), [0, 1], 32, 2),        # two prefix tokens
    (2, 2, (24, 24), [0, 1, 2, 3], 64, 1),  # ViT-B/16 at 384 px: 577 tokens, several key blocks
]
FLEX_CASES = [  # (batch, heads, grid, orders, head_dim, prefix tokens, precision): two compiled graphs
    (2, 12, (24, 24), [0, 1, 2], 64, 1, 'bf16'),  # ViT-B/16 at 384 px: several key blocks, most of them skipped
    (2, 3, (6, 6), [2, 0, 1], 32, 1, 'fp32'),      # orders unsorted, float32 exactness
]
PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
PRIORITY = ('triton', 'dense', 'shared_scores', 'flex')  # the order tests run them in


def implementations(*excluded: str):
    """Each implementation but `excluded`, in PRIORITY order; `triton` only where Triton is installed."""
    names = [n for n in PRIORITY if n in IMPLEMENTATIONS] + [n for n in IMPLEMENTATIONS if n not in PRIORITY]
    names = [n for n in names if n not in excluded]
    return [pytest.param(name, marks=pytest.mark.skipif(name == 'triton' and importlib.util.find_spec('triton') is None,
                                                        reason='triton is not installed'))
            for name in names]


@pytest.fixture(scope='module', autouse=True)
def room_for_every_graph():
    """Dynamo's recompile limit (8) above what these tests compile, so that none silently falls back to eager."""
    import torch._dynamo as dynamo

    names = [name for name in ('recompile_limit', 'cache_size_limit') if hasattr(dynamo.config, name)]
    previous = {name: getattr(dynamo.config, name) for name in names}
    for name in names:
        setattr(dynamo.config, name, 32)
    yield
    for name, value in previous.items():
        setattr(dynamo.config, name, value)


def formula(q, k, v, masks, alphas, dtype):
    """The routed attention formula computed plainly in `dtype`: each order's masked softmax map, mixed."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    out = 0
    for l in range(masks.shape[0]):
        probs = scores.masked_fill(~masks[l], float('-inf')).softmax(dim=-1)
        out = out + alphas[:, l, None, None, None].to(dtype) * (probs @ v)
    return out


def outputs_and_grads(function, inputs, grad_out):
    out = function(*inputs)
    return [out, *torch.autograd.grad(out, inputs, grad_out.to(out.dtype))]


def max_error(got, want):
    return (got.double() - want).abs().max().item()


def allowed_error(plain, want, dtype):
    """Twice the plain low-precision formula's largest error, plus one rounding of the largest value: a result (or a
    sum over many terms, as alphas' gradient) rounded to `dtype` once more than the plain formula's may be off by its
    unit roundoff; float32 gets 1e-5 relative for its reductions in another order."""
    rounding = max(torch.finfo(dtype).eps if dtype is not None else 0.0, 1e-5)
    return 2 * max_error(plain, want) + rounding * want.abs().max().item()


@pytest.mark.parametrize('precision', PRECISIONS)
@pytest.mark.parametrize('batch, heads, grid, orders, head_dim, prefix', CASES)
@pytest.mark.parametrize('name', implementations('flex'))
def test_implementation_matches_formula_forward_and_backward(name, batch, heads, grid, orders, head_dim, prefix,
                                                            precision):
    """Output and the gradients of q, k, v and alphas (flex: `test_flex_matches_formula_forward_and_backward`).

    Tolerance (`allowed_error`), FlashAttention's test criterion: the implementation's largest error against the
    float64 formula is at most twice the largest error the formula itself makes when PyTorch computes it plainly in
    the same precision (scores, probabilities and products rounded to it), plus one rounding of the largest value.
    """
    check_against_formula(name, batch, heads, grid, orders, head_dim, prefix, precision)


@pytest.mark.parametrize('batch, heads, grid, orders, head_dim, prefix, precision', FLEX_CASES)
def test_flex_matches_formula_forward_and_backward(batch, heads, grid, orders, head_dim, prefix, precision):
    """Flex attention as the other implementations are checked, on the two cases it compiles."""
    check_against_formula('flex', batch, heads, grid, orders, head_dim, prefix, precision)


def check_against_formula(name, batch, heads, grid, orders, head_dim, prefix, precision):
    """`name`'s output and gradients within `allowed_error` of the float64 formula's."""
    torch.manual_seed(0)
    dtype = PRECISIONS[precision]
    n = prefix + grid[0] * grid[1]
    # As the model makes them: q, k, v from Linear layers (low precision under autocast), routing weights in float32.
    q, k, v = (torch.randn(batch, heads, n, head_dim, device='cuda').to(dtype or torch.float32).requires_grad_()
               for _ in range(3))
    alphas = torch.randn(batch, len(orders), device='cuda').softmax(-1).requires_grad_()
    masks = span_masks(grid, orders, prefix).cuda()
    grad_out = torch.randn(batch, heads, n, head_dim, device='cuda')
    inputs = (q, k, v, alphas)

    exact = outputs_and_grads(lambda *t: reference_routed_attention(*t[:3], masks, t[3]),
                              [t.detach().double().requires_grad_() for t in inputs], grad_out.double())
    plain = outputs_and_grads(lambda *t: formula(*t[:3], masks, t[3], dtype or torch.float32), inputs, grad_out)
    with use_implementation(name), torch.autocast('cuda', dtype=dtype or torch.float32, enabled=dtype is not None):
        got = outputs_and_grads(lambda *t: routed_attention(*t, Spans(grid, orders, prefix)), inputs, grad_out)
    assert got[0].shape == q.shape and got[0].dtype == (dtype or torch.float32)
    for what, mine, baseline, want in zip(('out', 'q', 'k', 'v', 'alphas'), got, plain, exact):
        allowed = allowed_error(baseline, want, dtype)
        error = max_error(mine, want)
        assert error <= allowed, f"{name} {precision} {what}: {error:.3g} > {allowed:.3g}"


@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
@pytest.mark.parametrize('grid, orders', [((6, 6), [0, 1, 2]), ((5, 7), [2, 0, 1]), ((4, 6), [1, 3])])
def test_binarized_dispatch_matches_formula(grid, orders, precision):
    """Inference with one-hot weights computes per image only its order (banded windows or global attention)."""
    torch.manual_seed(1)
    dtype = PRECISIONS[precision] or torch.float32
    n = 1 + grid[0] * grid[1]
    q, k, v = (torch.randn(6, 2, n, 32, device='cuda').to(dtype) for _ in range(3))
    one_hot = F.one_hot(torch.arange(6, device='cuda') % len(orders), len(orders)).float()
    masks = span_masks(grid, orders).cuda()
    with torch.no_grad(), torch.autocast('cuda', dtype=dtype, enabled=dtype != torch.float32):
        out = routed_attention(q, k, v, one_hot, Spans(grid, orders), binarized=True)
    expected = reference_routed_attention(q, k, v, masks, one_hot)
    plain = formula(q, k, v, masks, one_hot, dtype)
    assert max_error(out, expected) <= allowed_error(plain, expected, PRECISIONS[precision])


@pytest.mark.parametrize('name', implementations())
def test_training_step_never_waits_for_the_host(name):
    """After a first step (block masks built, kernels compiled), a bf16 training step makes no host sync."""
    torch.manual_seed(0)
    config = get_config('testing')
    config.transformer.orders = [0, 1, 2]
    model = VisionTransformer(config, img_size=64, num_classes=3).cuda()  # a 16x16 grid
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, labels = torch.randn(4, 3, 64, 64, device='cuda'), torch.tensor([0, 1, 2, 0], device='cuda')

    def step():
        with torch.autocast('cuda', dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with use_implementation(name):
        step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode('error')
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode('default')
    torch.cuda.synchronize()


@pytest.mark.parametrize('name', ['flex', 'dense'])
def test_compiled_model_has_no_graph_break_on_cuda(name):
    import torch._dynamo as dynamo

    model = VisionTransformer(get_config('testing'), img_size=32, num_classes=3).cuda()
    dynamo.reset()
    with use_implementation(name):
        explanation = dynamo.explain(model)(torch.randn(2, 3, 32, 32, device='cuda'))
    assert explanation.graph_break_count == 0, explanation.break_reasons
