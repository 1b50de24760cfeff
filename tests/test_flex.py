"""The flex routed attention (forward on the CPU) and the dispatcher's settings, against the float64 formula."""
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import model.attention.flex as flex
import model.trar as trar
from model.config import get_config
from model.modeling import VisionTransformer
from model.trar import (CUDA_DEFAULT, IMPLEMENTATIONS, implementation_for, routed_attention, set_implementation,
                        span_masks, use_implementation)
from tests.test_routed_attention_impl import assert_matches_formula
from tests.test_trar import reference_routed_attention

CASES = [  # (batch, heads, grid, orders, head_dim, prefix tokens)
    (2, 2, (4, 4), [0, 1, 2], 8, 1),
    (2, 2, (7, 3), [0, 1, 2], 8, 1),  # non-square grid
    (3, 1, (5, 2), [1, 2, 3], 4, 1),  # no global order: CLS still global
    (2, 2, (2, 6), [2, 0], 8, 1),     # orders unsorted, one wider than the grid's height
    (2, 2, (2, 3), [2, 1], 8, 1),     # order 2 covers a 2x3 grid: global without order 0
    (2, 2, (3, 4), [0, 1], 8, 2),     # two prefix tokens
    (2, 1, (3, 3), [0], 4, 1),        # global only
]


@pytest.fixture(autouse=True)
def quiet_eager_flex():
    """Eager flex attention warns that it is unfused; on the CPU that is what is tested."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='flex_attention called without torch.compile')
        yield


def inputs(batch, heads, grid, orders, head_dim, prefix=1, seed=0):
    torch.manual_seed(seed)
    n = prefix + grid[0] * grid[1]
    q, k, v = (torch.randn(batch, heads, n, head_dim) for _ in range(3))
    return q, k, v, torch.randn(batch, len(orders)).softmax(-1)


@pytest.mark.parametrize('batch, heads, grid, orders, head_dim, prefix', CASES)
def test_flex_forward_matches_formula(batch, heads, grid, orders, head_dim, prefix):
    q, k, v, alphas = inputs(batch, heads, grid, orders, head_dim, prefix)
    out = flex.flex_routed_attention(q, k, v, alphas, grid, orders, prefix)
    expected = reference_routed_attention(q, k, v, span_masks(grid, orders, prefix), alphas)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)  # float32 against float64


def test_dispatcher_runs_the_forced_implementation():
    q, k, v, alphas = inputs(2, 2, (4, 5), [0, 2, 1], 8)
    masks = span_masks((4, 5), [0, 2, 1])
    expected = reference_routed_attention(q, k, v, masks, alphas)
    for name in ('flex', 'dense', 'shared_scores'):
        with use_implementation(name), torch.no_grad():
            out = routed_attention(q, k, v, masks, alphas, grid=(4, 5), orders=[0, 2, 1])
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5, msg=name)


def test_dense_matches_formula_forward_and_backward():
    """The dense path trains on the CPU too (flex's backward is refused there): gradients of q, k, v and alphas."""
    q, k, v, alphas = (t.double().requires_grad_() for t in inputs(2, 2, (3, 5), [1, 0, 2], 8))
    with use_implementation('dense'):
        assert_matches_formula(q, k, v, span_masks((3, 5), [1, 0, 2]), alphas)


def test_block_mask_is_cached_and_skips_the_blocks_no_window_reaches():
    grid, orders, heads = (24, 24), (0, 1, 2), 2
    n = 1 + 24 * 24
    plan = flex.flex_plan(grid, orders, 1, heads, n, torch.device('cpu'))
    assert flex.flex_plan(grid, orders, 1, heads, n, torch.device('cpu')) is plan
    assert plan.global_orders == (0,) and plan.local_orders == (1, 2)
    masks = span_masks(grid, orders)[1:]  # the local orders, (2, N, N)
    size = flex.BLOCK_SIZE
    blocks = -(-n // size)
    padded = F.pad(masks, (0, blocks * size - n, 0, blocks * size - n))
    reached = padded.view(2, blocks, size, blocks, size).any(dim=(2, 4))  # (order, query block, key block)
    dense_blocks = plan.block_mask.to_dense()[0].bool()  # (heads * orders, query block, key block)
    for head in range(heads * 2):  # query head = (model head, local order), orders fastest
        assert torch.equal(dense_blocks[head], reached[head % 2])
    assert not reached.all()  # some key blocks are skipped


def test_set_implementation_and_the_device_defaults():
    assert IMPLEMENTATIONS == ('shared_scores', 'flex', 'triton', 'dense')
    assert trar._implementation is None  # no TRAR_ATTENTION in the test environment
    assert implementation_for(torch.device('cpu')) == 'shared_scores'
    assert implementation_for(torch.device('cuda')) == CUDA_DEFAULT
    with use_implementation('dense'):
        assert implementation_for(torch.device('cpu')) == implementation_for(torch.device('cuda')) == 'dense'
        with pytest.raises(ValueError, match="'fast'.*shared_scores, flex, triton, dense"):
            set_implementation('fast')
    assert implementation_for(torch.device('cpu')) == 'shared_scores'  # restored, also after the error


def test_environment_variable_sets_the_initial_implementation(monkeypatch):
    monkeypatch.setenv('TRAR_ATTENTION', 'dense')
    assert trar.implementation_from_environment() == 'dense'
    monkeypatch.setenv('TRAR_ATTENTION', '')
    assert trar.implementation_from_environment() is None
    monkeypatch.setenv('TRAR_ATTENTION', 'flash')
    with pytest.raises(ValueError, match="TRAR_ATTENTION 'flash'; expected one of shared_scores, flex, triton, dense"):
        trar.implementation_from_environment()


def test_flex_and_triton_need_the_grid_and_orders(monkeypatch):
    q, k, v, alphas = inputs(1, 1, (3, 3), [0, 1], 4)
    with use_implementation('flex'), pytest.raises(ValueError, match='grid and orders'):
        routed_attention(q, k, v, span_masks(3, [0, 1]), alphas)
    monkeypatch.setitem(sys.modules, 'model.attention.triton_kernel', None)  # as if triton were not installed
    with use_implementation('triton'), pytest.raises(RuntimeError, match="'triton' routed attention is unavailable"):
        routed_attention(q, k, v, span_masks(3, [0, 1]), alphas, grid=(3, 3), orders=[0, 1])


class HostSyncAudit(TorchDispatchMode):
    """Records the operations that make a CUDA stream wait for the host or the host for the device, seen on any device:
    reading a value back (`.item()`, `bool(tensor)`), data-dependent shapes (`nonzero`) and tensors made from Python
    data (indexing with a Python list, `torch.tensor(...)`: a host-to-device copy on CUDA)."""

    SYNCING = ('aten._local_scalar_dense', 'aten.nonzero', 'aten.lift_fresh')

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(self.SYNCING):
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


def test_training_step_makes_no_host_sync():
    """A routed model's training step through the dispatcher (dense path) reads nothing back from the device.

    The flex path's own audit is CUDA's (tests/test_attention_cuda.py): its operator cannot run under this mode."""
    config = get_config('testing')
    config.transformer.orders = [0, 1, 2]
    model = VisionTransformer(config, img_size=32, num_classes=3)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    with use_implementation('dense'), HostSyncAudit() as audit:
        F.cross_entropy(model(images), labels).backward()
    assert audit.calls == []
    with HostSyncAudit() as audit:
        torch.tensor([1.0]).item()
        torch.ones(2, 3)[:, [0, 2]]
    assert audit.calls == ['aten.lift_fresh.default', 'aten._local_scalar_dense.default', 'aten.lift_fresh.default']


@pytest.mark.parametrize('name', ['flex', 'dense'])
def test_model_traces_without_graph_breaks(name):
    """The dispatcher adds no graph break: the whole model is one graph with flex or dense attention (inference: the
    CPU runs flex attention's forward only)."""
    import torch._dynamo as dynamo

    model = VisionTransformer(get_config('testing'), img_size=32, num_classes=3).eval()
    dynamo.reset()
    with use_implementation(name), torch.no_grad():
        explanation = dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
