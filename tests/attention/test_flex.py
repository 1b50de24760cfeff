"""The flex routed attention (forward on the CPU), and the choice of implementation with its settings."""
import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import model.attention.flex as flex
import model.attention.interface as interface
from model.attention import (CUDA_DEFAULT, Spans, implementation_for, routed_attention, set_implementation, span_masks,
                             use_implementation)
from model.config import get_config
from model.modeling import VisionTransformer
from tests.conftest import assert_matches_reference, reference_routed_attention

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


def test_dispatcher_runs_the_forced_implementation(monkeypatch):
    q, k, v, alphas = inputs(2, 2, (4, 5), [0, 2, 1], 8)
    spans = Spans((4, 5), [0, 2, 1])
    expected = reference_routed_attention(q, k, v, spans.masks, alphas)
    calls = []
    for name, function in (('flex', 'flex_routed_attention'), ('dense', 'dense_routed_attention'),
                           ('shared_scores', 'shared_scores_attention')):
        original = getattr(interface, function)
        monkeypatch.setattr(interface, function, lambda *a, f=original, n=name: calls.append(n) or f(*a))
        for forced, requested in ((name, 'auto'), (None, name)):  # forced for the process, or the module's choice
            with use_implementation(forced), torch.no_grad():
                out = routed_attention(q, k, v, alphas, spans, implementation=requested)
            torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5, msg=name)
    assert calls == ['flex', 'flex', 'dense', 'dense', 'shared_scores', 'shared_scores']


def test_dense_matches_formula_forward_and_backward():
    """The dense path trains on the CPU too (flex's backward is refused there): gradients of q, k, v and alphas."""
    q, k, v, alphas = (t.double().requires_grad_() for t in inputs(2, 2, (3, 5), [1, 0, 2], 8))
    spans = Spans((3, 5), [1, 0, 2])
    assert_matches_reference(lambda *t: routed_attention(*t, spans, implementation='dense'), q, k, v,
                             span_masks((3, 5), [1, 0, 2]), alphas)


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


def test_choice_order_override_then_module_then_device(monkeypatch):
    """`use_implementation` over TRAR_ATTENTION over the module's `requested`; 'auto' picks by device."""
    monkeypatch.delenv('TRAR_ATTENTION', raising=False)
    assert implementation_for('cpu') == implementation_for('cpu', 'auto') == 'shared_scores'
    assert implementation_for('cuda') == CUDA_DEFAULT
    assert implementation_for('cpu', 'dense') == implementation_for('cuda', 'dense') == 'dense'
    monkeypatch.setenv('TRAR_ATTENTION', 'flex')
    assert implementation_for('cpu') == implementation_for('cpu', 'dense') == 'flex'
    with use_implementation('dense'):
        assert implementation_for('cpu', 'flex') == implementation_for('cuda') == 'dense'
        with pytest.raises(ValueError, match="'fast': expected one of shared_scores, flex, triton, dense"):
            set_implementation('fast')
    assert implementation_for('cpu') == 'flex'  # restored, also after the error
    monkeypatch.setenv('TRAR_ATTENTION', '')
    assert implementation_for('cpu') == 'shared_scores'


@pytest.mark.parametrize('variable, value, message', [
    ('TRAR_ATTENTION', 'flash', "TRAR_ATTENTION 'flash': expected one of shared_scores, flex, triton, dense"),
    ('TRAR_CPU_KERNEL', 'yes', "TRAR_CPU_KERNEL 'yes': expected 0"),
])
def test_bad_environment_values_fail_in_one_line_when_used(monkeypatch, variable, value, message):
    """A typo in an environment variable lets a model build; its first attention call names the variable."""
    import importlib

    monkeypatch.setenv(variable, value)
    model = VisionTransformer(get_config('testing'), img_size=32, num_classes=3)
    importlib.import_module('model.attention.shared_scores_cpu').kernel.cache_clear()
    try:
        with pytest.raises(ValueError) as error, torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
    finally:
        importlib.import_module('model.attention.shared_scores_cpu').kernel.cache_clear()
    assert message in str(error.value) and '\n' not in str(error.value)


def test_bad_environment_values_do_not_stop_imports():
    """The tools import the model with any environment: a bad value fails only where it is used, in one line."""
    import subprocess

    env = {**os.environ, 'TRAR_ATTENTION': 'flash', 'TRAR_CPU_KERNEL': 'yes'}
    child = subprocess.run([sys.executable, '-c', 'import model.modeling, model.attention.interface, model.pretrained'],
                           capture_output=True, text=True, timeout=120, env=env)
    assert child.returncode == 0, child.stderr[-2000:]


def test_config_names_the_implementation_and_bad_names_are_refused():
    config = get_config('testing')
    assert config.transformer.attention == 'auto'
    config.transformer.attention = 'dense'
    model = VisionTransformer(config, img_size=32, num_classes=3)
    assert model.attention_implementation() == 'dense' and model.attention_implementation('cuda') == 'dense'
    config.transformer.attention = 'flash'
    with pytest.raises(ValueError, match="transformer.attention 'flash': expected one of auto, shared_scores, flex"):
        VisionTransformer(config, img_size=32, num_classes=3)
    plain = get_config('testing')
    plain.transformer.orders = []
    assert VisionTransformer(plain, img_size=32, num_classes=3).attention_implementation() is None


def test_triton_without_cuda_and_flex_gradients_on_the_cpu_are_one_line_errors(monkeypatch):
    q, k, v, alphas = (t.requires_grad_() for t in inputs(1, 1, (3, 3), [0, 1], 4))
    spans = Spans(3, [0, 1])
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    with pytest.raises(ValueError, match="'triton' routed attention runs on CUDA, not on cpu"):
        routed_attention(q, k, v, alphas, spans, implementation='triton')
    with pytest.raises(ValueError, match="'flex' routed attention computes gradients on CUDA only, not on cpu"):
        routed_attention(q, k, v, alphas, spans, implementation='flex')
    with torch.no_grad():  # its forward runs
        routed_attention(q.detach(), k.detach(), v.detach(), alphas, spans, implementation='flex')
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    monkeypatch.setitem(sys.modules, 'model.attention.triton_kernel', None)  # as if triton were not installed
    with pytest.raises(ValueError, match="'triton' routed attention is unavailable"):
        routed_attention(q, k, v, alphas, spans, implementation='triton')


def test_attention_dropout_runs_dense_and_says_so_when_another_was_chosen(monkeypatch):
    q, k, v, alphas = inputs(2, 1, (3, 3), [0, 1], 4)
    spans = Spans(3, [0, 1])
    calls, dense = [], interface.dense_routed_attention
    monkeypatch.setattr(interface, 'dense_routed_attention', lambda *a: calls.append(1) or dense(*a))
    monkeypatch.setattr(interface, '_warned', set())
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # 'auto' takes dense without a word
        routed_attention(q, k, v, alphas, spans, 0.1)
    with pytest.warns(UserWarning, match="'shared_scores' routed attention has no attention dropout: training with "
                                         "attention dropout runs 'dense'"):
        routed_attention(q, k, v, alphas, spans, 0.1, implementation='shared_scores')
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # once
        routed_attention(q, k, v, alphas, spans, 0.1, implementation='shared_scores')
    assert calls == [1, 1, 1]


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

    The flex path's own audit is CUDA's (tests/attention/test_attention_cuda.py): its operator cannot run under this
    mode."""
    config = get_config('testing')
    config.transformer.orders = [0, 1, 2]
    config.transformer.attention = 'dense'
    model = VisionTransformer(config, img_size=32, num_classes=3)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    with HostSyncAudit() as audit:
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

    config = get_config('testing')
    config.transformer.attention = name
    model = VisionTransformer(config, img_size=32, num_classes=3).eval()
    dynamo.reset()
    with torch.no_grad():
        explanation = dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
