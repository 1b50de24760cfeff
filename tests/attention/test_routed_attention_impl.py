"""The paths of routed_attention (shared scores, per-sample dispatch, dropout) against the float64 formula."""
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import model.attention.banded as banded
import model.attention.interface as interface
import model.attention.shared_scores as shared_scores
import model.attention.shared_scores_cpu as shared_scores_cpu
from model.attention import Spans, routed_attention, span_layout, span_masks
from model.attention.shared_scores import shared_scores_attention
from tests.conftest import assert_matches_reference, reference_routed_attention, routed_inputs as inputs

CASES = [  # (batch, heads, grid, orders, head_dim, prefix tokens)
    (2, 2, (4, 4), [0, 1, 2], 8, 1),
    (2, 2, (7, 3), [0, 1, 2], 8, 1),
    (3, 1, (5, 2), [1, 2, 3], 4, 1),  # no global order: CLS still global
    (2, 2, (2, 6), [2, 0], 8, 1),     # order wider than the grid's height, orders unsorted
    (1, 2, (6, 6), [0, 1, 2, 3], 8, 1),
    (2, 2, (3, 4), [0, 1], 8, 2),     # two prefix tokens
    (2, 1, (3, 3), [0], 4, 1),        # global only
]



def through_interface(grid, orders, prefix=1, **kwargs):
    """`routed_attention` over the spans of (grid, orders, prefix), as a function of (q, k, v, alphas)."""
    spans = Spans(grid, orders, prefix)
    return lambda q, k, v, alphas: routed_attention(q, k, v, alphas, spans, **kwargs)


def through_layout(masks):
    """Shared scores over the `span_layout` of any (L, N, N) masks, as a function of (q, k, v, alphas)."""
    layout = span_layout(masks)
    return lambda q, k, v, alphas: shared_scores_attention(q, k, v, alphas, layout)


@pytest.fixture(params=['kernel', 'ops'])
def path(request, monkeypatch):
    """Each way shared scores computes its maps: the fused CPU kernel (checked to have run) and the PyTorch ops."""
    if request.param == 'ops':
        monkeypatch.setattr(shared_scores_cpu, 'runs_on', lambda q: False)
        yield request.param
        return
    toolchain = shutil.which('c++') and (shutil.which('ninja') or shared_scores_cpu.ninja_directory())
    if shared_scores_cpu.kernel() is None and not toolchain:
        pytest.skip('no C++ compiler or ninja to build the CPU kernel')
    assert shared_scores_cpu.kernel() is not None, 'the CPU kernel did not build'
    calls, maps = [], shared_scores_cpu.maps
    monkeypatch.setattr(shared_scores_cpu, 'maps', lambda *args: calls.append(1) or maps(*args))
    yield request.param
    assert calls, 'the CPU kernel never ran'


@pytest.mark.parametrize('keep', [True, False], ids=['kept softmaxes', 'recomputed softmaxes'])
@pytest.mark.parametrize('batch, heads, grid, orders, head_dim, prefix', CASES)
def test_shared_scores_match_formula_forward_and_backward(monkeypatch, path, batch, heads, grid, orders, head_dim,
                                                          prefix, keep):
    """Both backward paths: small calls keep their softmaxes, larger ones recompute them."""
    monkeypatch.setattr(shared_scores, 'KEEP_ELEMENTS', 2 ** 20 if keep else 0)
    q, k, v, masks, alphas = inputs(batch, heads, grid, orders, head_dim, prefix)
    assert_matches_reference(through_interface(grid, orders, prefix), q, k, v, masks, alphas)
    assert_matches_reference(through_layout(masks), q, k, v, masks, alphas)


@pytest.mark.parametrize('keep', [True, False], ids=['kept softmaxes', 'recomputed softmaxes'])
@pytest.mark.parametrize('grid, orders, prefix', [((8, 8), [0, 1, 2], 1), ((14, 14), [0, 1, 2, 3], 1),
                                                  ((6, 5), [2, 0], 2)])
def test_float32_matches_formula(monkeypatch, path, grid, orders, prefix, keep):
    """In float32 (the kernel's vector code; float64 takes the same code at another width) within float32 rounding:
    the demo's grid, ViT-B/16's at 224 px, a small one with two prefix tokens."""
    monkeypatch.setattr(shared_scores, 'KEEP_ELEMENTS', 2 ** 30 if keep else 0)
    q, k, v, masks, alphas = (t.detach().float().requires_grad_() if t.is_floating_point() else t
                              for t in inputs(3, 2, grid, orders, 16, prefix))
    assert_matches_reference(through_interface(grid, orders, prefix), q, k, v, masks, alphas, rtol=1e-4, atol=1e-5)


def test_kernel_that_cannot_be_built_leaves_the_pytorch_ops(monkeypatch, tmp_path):
    """No compiler or ninja: one warning says why, and routed attention still computes the formula."""
    from torch.utils import cpp_extension

    def no_ninja(*args, **kwargs):
        raise RuntimeError('Ninja is required to load C++ extensions\n(second line)')
    monkeypatch.setattr(cpp_extension, 'load', no_ninja)
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path))  # nothing built there
    shared_scores_cpu.kernel.cache_clear()
    try:
        with pytest.warns(UserWarning, match=r"could not be built \(Ninja is required to load C\+\+ extensions\); "
                                             "using its PyTorch ops"):
            assert shared_scores_cpu.kernel() is None
        q, k, v, masks, alphas = inputs(2, 2, (4, 4), [0, 1, 2], 8)
        assert not shared_scores_cpu.runs_on(q)
        assert_matches_reference(through_interface((4, 4), [0, 1, 2]), q, k, v, masks, alphas)
        monkeypatch.setenv('TRAR_CPU_KERNEL', '0')  # asked not to: no build, no warning
        shared_scores_cpu.kernel.cache_clear()
        monkeypatch.setattr(cpp_extension, 'load', lambda *a, **k: pytest.fail('built although TRAR_CPU_KERNEL=0'))
        assert shared_scores_cpu.kernel() is None
    finally:
        shared_scores_cpu.kernel.cache_clear()


@pytest.mark.parametrize('chunk_scores, expected_chunks', [
    (17 * 17 * 2, [(slice(b, b + 1), slice(h, h + 2)) for b in range(3) for h in (0, 2)]),  # 2 + 1 heads
    (17 * 17 * 3 * 2, [(slice(0, 2), slice(0, 3)), (slice(2, 4), slice(0, 3))]),  # 2 + 1 samples
])
def test_chunks_of_heads_and_samples_match_formula(monkeypatch, path, chunk_scores, expected_chunks):
    """Chunking (a smaller last chunk reusing the start of the workspaces) changes nothing."""
    monkeypatch.setitem(shared_scores.CHUNK_ELEMENTS, 'cpu', chunk_scores)
    q, k, v, masks, alphas = inputs(3, 3, (4, 4), [0, 1, 2], 8)
    assert shared_scores.chunks(q.shape, q.device) == expected_chunks
    assert_matches_reference(through_interface((4, 4), [0, 1, 2]), q, k, v, masks, alphas)

@pytest.mark.parametrize('keep', [2 ** 20, 0])
def test_backward_twice_with_retained_graph_gives_the_same_gradients(monkeypatch, path, keep):
    """Backward leaves what it reads (kept softmaxes included) as it found it."""
    monkeypatch.setattr(shared_scores, 'KEEP_ELEMENTS', keep)
    q, k, v, _, alphas = inputs(2, 2, (4, 4), [0, 1, 2], 8)
    out = routed_attention(q, k, v, alphas, Spans(4, [0, 1, 2]))
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v, alphas), grad, retain_graph=True)
    torch.testing.assert_close(torch.autograd.grad(out, (q, k, v, alphas), grad), first, rtol=0, atol=0)


def test_empty_batch_gives_empty_output_and_gradients():
    """A batch of no samples (every image of a batch skipped as unreadable) passes through, as plain attention does."""
    q, k, v, _, alphas = inputs(0, 2, (3, 3), [0, 1], 4)
    out = routed_attention(q, k, v, alphas, Spans(3, [0, 1]))
    assert out.shape == q.shape == F.scaled_dot_product_attention(q, k, v).shape
    grads = torch.autograd.grad(out.sum(), (q, k, v, alphas))
    assert [tuple(g.shape) for g in grads] == [tuple(q.shape)] * 3 + [(0, 2)]



def test_zero_weights_in_training_keep_their_gradient(path):
    """A weight of exactly zero (a saturated Gumbel sample) still gets d loss / d alpha."""
    q, k, v, masks, _ = inputs(2, 2, (4, 4), [0, 1, 2], 8)
    alphas = torch.tensor([[0.0, 1.0, 0.0], [0.3, 0.0, 0.7]], dtype=torch.float64, requires_grad=True)
    assert_matches_reference(through_interface((4, 4), [0, 1, 2]), q, k, v, masks, alphas)


def test_gradcheck_against_finite_differences(path):
    q, k, v, _, alphas = inputs(2, 2, (3, 4), [0, 1, 2], 4)
    assert torch.autograd.gradcheck(through_interface((3, 4), [0, 1, 2]), (q, k, v, alphas))


def test_arbitrary_masks_work_too(path):
    """Nothing assumes span masks: random masks (each row allowing itself) give the formula too."""
    torch.manual_seed(3)
    n = 12
    masks = torch.rand(3, n, n) < 0.4
    masks |= torch.eye(n, dtype=torch.bool)
    masks[1] = True  # one global order
    masks[2, 5] = True  # a row that is global in one local order only
    q, k, v = (torch.randn(2, 2, n, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    alphas = torch.randn(2, 3, dtype=torch.float64).softmax(-1).requires_grad_()
    assert_matches_reference(through_layout(masks), q, k, v, masks, alphas)


def test_layout_of_span_masks_is_the_window():
    layout = span_layout(span_masks(5, [0, 1, 2]))
    assert layout.global_orders == (0,) and layout.local_orders == (1, 2)
    assert layout.full_rows.tolist() == [True] + [False] * 25
    assert layout.index.shape == (26, 1 + 25)  # CLS and the 5x5 window of the centre patch
    centre = 1 + 2 * 5 + 2
    assert sorted(layout.index[centre].tolist()) == [0] + list(range(1, 26))
    assert int(layout.valid[0, centre].sum()) == 1 + 9 and int(layout.valid[1, centre].sum()) == 1 + 25


@pytest.mark.parametrize('grid, orders, prefix', [((5, 5), [0, 1, 2], 1), ((7, 3), [2, 1, 0], 1),
                                                  ((6, 6), [0, 1, 2, 3], 2)])
def test_layout_widths_and_row_mixing_follow_the_masks(grid, orders, prefix):
    """Each local order finds all it allows in the first `widths` window entries (its window: they nest), and
    `alphas @ mixing` gives each row its weight of the global softmax and of each local order's window."""
    masks = span_masks(grid, orders, prefix)
    layout = span_layout(masks)
    n = masks.shape[-1]
    for position, order in enumerate(layout.local_orders):
        allowed = masks[order, prefix:].sum(dim=-1)  # patch rows: the window clipped at the border, plus the prefix
        assert layout.widths[position] == int(allowed.max())  # the widest window and no more
        window = layout.index[prefix:, :layout.widths[position]]
        assert masks[order, prefix:].gather(-1, window).sum(dim=-1).equal(allowed)  # nothing it allows is left out
    alphas = torch.rand(3, len(orders))
    rows = (alphas @ layout.mixing).unflatten(1, (-1, n))  # (B, 1 + L_local, N)
    is_global = [bool(mask.all()) for mask in masks]
    global_weight = sum(alphas[:, l] for l in range(len(orders)) if is_global[l])
    torch.testing.assert_close(rows[:, 0, :prefix], alphas.sum(dim=1, keepdim=True).expand(-1, prefix))
    torch.testing.assert_close(rows[:, 0, prefix:], global_weight[:, None].expand(-1, n - prefix))
    for position, order in enumerate(layout.local_orders):
        torch.testing.assert_close(rows[:, 1 + position, prefix:], alphas[:, order, None].expand(-1, n - prefix))
        assert not rows[:, 1 + position, :prefix].any()
    if grid == (5, 5):
        assert layout.widths == (1 + 3 * 3, 1 + 5 * 5)


def test_bf16_autocast_is_close_to_float32():
    q, k, v, masks, alphas = inputs(2, 2, (4, 4), [0, 1, 2], 8)
    expected = reference_routed_attention(q, k, v, masks, alphas)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = routed_attention(q.float().bfloat16(), k.float().bfloat16(), v.float().bfloat16(), alphas.float(),
                               Spans(4, [0, 1, 2]))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize('grid, orders, rows', [((4, 4), [0, 1, 2], 1), ((7, 3), [0, 1, 2], 3), ((5, 2), [1, 2, 3], 2),
                                                ((2, 6), [2, 0], 2), ((6, 6), [0, 1, 2, 3], None)])
def test_binarized_dispatch_matches_formula(monkeypatch, grid, orders, rows):
    if rows is not None:  # tiles that overhang the grid, one row per tile, ...
        monkeypatch.setattr(banded, '_tile_rows', lambda grid: rows)
    q, k, v, masks, _ = inputs(6, 2, grid, orders, 8)
    choice = torch.arange(6) % len(orders)
    one_hot = F.one_hot(choice, len(orders)).double()
    calls, dispatch = [], banded.banded_routed_attention
    monkeypatch.setattr(interface, 'banded_routed_attention', lambda *a: calls.append(1) or dispatch(*a))
    with torch.no_grad():
        out = routed_attention(q, k, v, one_hot, Spans(grid, orders), binarized=True)
        soft = routed_attention(q, k, v, one_hot, Spans(grid, orders))
    assert calls == [1]  # binarized went per image, the soft call did not
    torch.testing.assert_close(out, reference_routed_attention(q, k, v, masks, one_hot))
    torch.testing.assert_close(soft, reference_routed_attention(q, k, v, masks, one_hot))


def test_binarized_dispatch_skips_unused_orders(monkeypatch):
    """With one-hot weights choosing only local orders, no patch query runs global attention."""
    q, k, v, masks, _ = inputs(2, 2, (4, 4), [0, 1], 8)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(banded.F, 'scaled_dot_product_attention',
                        lambda q, *a, **kw: calls.append(q.shape[2]) or sdpa(q, *a, **kw))
    with torch.no_grad():
        local_only = torch.tensor([[0., 1.], [0., 1.]], dtype=torch.float64)
        routed_attention(q, k, v, local_only, Spans(4, [0, 1]), binarized=True)
    assert calls == [1]  # only the CLS queries


def test_dropout_uses_one_fused_attention_per_order():
    q, k, v, masks, alphas = inputs(2, 2, (3, 3), [0, 1], 8)
    torch.manual_seed(1)
    expected = sum(alphas[:, l, None, None, None] * F.scaled_dot_product_attention(q, k, v, masks[l], dropout_p=0.5)
                   for l in range(2))
    torch.manual_seed(1)
    out = routed_attention(q, k, v, alphas, Spans(3, [0, 1]), 0.5)
    torch.testing.assert_close(out, expected)


def test_wrong_grid_is_rejected():
    q, k, v, masks, _ = inputs(1, 1, (3, 3), [0, 1], 4)
    with pytest.raises(ValueError, match='grid'), torch.no_grad():
        routed_attention(q, k, v, torch.tensor([[1.0, 0.0]]), Spans((3, 4), [0, 1]))


def test_every_implementation_builds_on_the_inputs_device(device_audit):
    """Layout, dispatcher and every implementation that runs on the CPU (forward and backward where it has one, the
    per-image path too) make no tensor without naming its device: on a GPU none would land on the CPU."""
    spans = Spans((4, 5), [0, 1, 2], 2)
    q, k, v, _, alphas = inputs(3, 2, (4, 5), [0, 1, 2], 8, 2)
    one_hot = F.one_hot(torch.tensor([0, 1, 2]), 3).double()
    with device_audit:
        span_layout(span_masks((3, 4), [0, 1], 1, device=q.device))
        for name in ('shared_scores', 'dense'):
            routed_attention(q, k, v, alphas, spans, implementation=name).sum().backward()
        routed_attention(q, k, v, alphas, spans, 0.5).sum().backward()
        with torch.no_grad():  # inference: flex runs forward only on the CPU
            routed_attention(q.detach(), k.detach(), v.detach(), alphas, spans, implementation='flex')
            one_prefix = inputs(3, 2, (4, 5), [0, 1, 2], 8)[:3]  # the per-image path takes one prefix token
            routed_attention(*one_prefix, one_hot, Spans((4, 5), [0, 1, 2]), binarized=True)
    assert device_audit.undevised == []


def test_device_audit_sees_a_tensor_made_without_a_device():
    from tests.conftest import DeviceAudit

    with DeviceAudit(root=__file__) as audit:
        torch.arange(3) + torch.zeros(3, device='cpu')
    assert len(audit.undevised) == 1 and audit.undevised[0].startswith('arange at test_routed_attention_impl.py:')


@pytest.mark.parametrize('name', ['shared_scores', 'dense'])
def test_spans_made_on_the_cpu_serve_inputs_on_another_device(monkeypatch, name):
    """On the meta device (a stand-in for a GPU) with spans built on the CPU, as a benchmark passes them: the
    output and every gradient are on the inputs' device, and the spans' tensors are copied there once."""
    import contextlib

    monkeypatch.setattr(torch, 'autocast', lambda *args, **kwargs: contextlib.nullcontext())  # no meta autocast
    spans = Spans((4, 4), [0, 1, 2])
    q, k, v = (torch.randn(2, 2, 17, 8, device='meta', requires_grad=True) for _ in range(3))
    alphas = torch.randn(2, 3, device='meta').softmax(-1).requires_grad_()
    out = routed_attention(q, k, v, alphas, spans, implementation=name)
    grads = torch.autograd.grad(out.sum(), (q, k, v, alphas))
    assert {t.device.type for t in (out, *grads)} == {'meta'}
    assert spans.masks.device.type == 'cpu' and spans.tensors_on(q.device) is spans.tensors_on(q.device)


def test_kernel_build_folder_is_named_by_its_source_and_flags(monkeypatch, tmp_path):
    """Checkouts share a build only when it is the same build: same source and flags, same folder."""
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path))
    source = shared_scores_cpu.SOURCE.read_bytes()
    copy = tmp_path / 'another_checkout.cpp'  # the same file in another checkout
    copy.write_bytes(source)
    folder = shared_scores_cpu.build_directory()
    assert folder.parent == tmp_path and folder.name.startswith(shared_scores_cpu.NAME)
    assert shared_scores_cpu.build_directory(copy.read_bytes()) == folder
    edited = shared_scores_cpu.build_directory(source.replace(b'{', b'{ ', 1))
    other_flags = shared_scores_cpu.build_directory(source, ['-O2', '-fopenmp'])
    assert len({folder, edited, other_flags}) == 3
    with monkeypatch.context() as patched:  # another environment's torch: its headers, another build
        patched.setattr(torch, '__file__', str(tmp_path / 'other_env' / 'torch' / '__init__.py'))
        assert shared_scores_cpu.build_directory() not in {folder, edited, other_flags}


def test_a_built_kernel_is_loaded_without_running_the_build_again(monkeypatch, tmp_path):
    """A present library in the (content-named) build folder is loaded as it is: no ninja run, which would rebuild
    it after a killed build. A damaged one (a build killed while linking) is built again."""
    if shared_scores_cpu.kernel() is None:
        pytest.skip('the CPU kernel cannot be built here')
    # the first build's library: torch names a process's later builds of one extension NAME_v1.so, NAME_v2.so, ...,
    # whose init function carries that name, so only NAME.so loads under the name NAME
    library = shared_scores_cpu.build_directory() / f'{shared_scores_cpu.NAME}.so'
    if not library.is_file():
        library = Path(shared_scores_cpu.kernel().__file__)
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path))
    folder = shared_scores_cpu.build_directory()
    folder.mkdir(parents=True)
    library_name = f'{shared_scores_cpu.NAME}.so'
    shutil.copy(library, folder / library_name)
    from torch.utils import cpp_extension
    builds = []
    monkeypatch.setattr(cpp_extension, 'load', lambda *args, **kwargs: builds.append(kwargs['build_directory']))
    shared_scores_cpu.kernel.cache_clear()
    try:
        assert hasattr(shared_scores_cpu.kernel(), 'forward') and builds == []
        monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path / 'damaged'))  # a path Python has not loaded
        damaged = shared_scores_cpu.build_directory()
        damaged.mkdir(parents=True)
        (damaged / library_name).write_bytes(b'half a library')
        shared_scores_cpu.kernel.cache_clear()
        shared_scores_cpu.kernel()
        assert builds == [str(damaged)]
    finally:
        shared_scores_cpu.kernel.cache_clear()


def test_the_kernel_compiles_from_a_copy_in_its_build_folder_so_checkouts_share_one_build(monkeypatch, tmp_path):
    """torch writes the source's path into the build's ninja file: compiled from the checkout's own path, two
    checkouts of one source would rebuild over each other in their shared folder. The copy is written once."""
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path))
    folder = shared_scores_cpu.build_directory()
    folder.mkdir(parents=True)
    staged = shared_scores_cpu.staged_source(folder)
    assert staged.parent == folder and staged.read_bytes() == shared_scores_cpu.SOURCE.read_bytes()
    written = staged.stat().st_mtime_ns
    os.utime(staged, ns=(written - 10**9, written - 10**9))
    assert shared_scores_cpu.staged_source(folder) == staged and staged.stat().st_mtime_ns == written - 10**9
    staged.write_bytes(b'// an older source')  # a damaged copy is replaced
    assert shared_scores_cpu.staged_source(folder).read_bytes() == shared_scores_cpu.SOURCE.read_bytes()
    assert [p.name for p in folder.iterdir()] == [staged.name]
