"""The fused Triton routed-attention kernels against the float64 formula.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (fp32 and fp16; the interpreter's
bf16 `tl.dot` is wrong, so bf16 is checked on CUDA only). Triton reads TRITON_INTERPRET when it decorates
a function with `@triton.jit`, its own library functions (`tl.zeros`, `tl.sum`, ...) included, so it must
be set before triton is first imported: the interpreted runs happen in one child process
(`python -m tests.attention.test_triton_kernel JOBS RESULTS`), and this process compares their results.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.attention import span_masks
from tests.conftest import index_scalars_of_one_element, reference_routed_attention

triton = pytest.importorskip('triton', reason='Triton is not installed')
import triton.language as tl  # noqa: E402

import model.attention.triton_kernel as triton_kernel  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

CASES = [  # (batch, heads, grid, orders, head_dim, prefix tokens); CPU blocks are 16 tokens
    (2, 1, (6, 6), [2, 0, 1], 32, 1),   # 37 tokens: three blocks, unsorted orders
    (1, 1, (8, 8), [0, 1], 16, 1),      # five blocks: the window band skips key and query blocks
    (1, 3, (4, 5), [1, 2], 16, 1),      # no global order: CLS still global
    (3, 1, (3, 4), [3, 1], 16, 2),      # order 3 covers the 3x4 grid (global); two prefix tokens
    (1, 2, (2, 6), [2, 0], 16, 1),      # order wider than the grid's height
    (2, 1, (3, 3), [0], 16, 1),         # global only
    (0, 2, (3, 3), [0, 1], 16, 1),      # no samples
]
JOBS = [(torch.float32, case) for case in CASES] + [(torch.float16, case) for case in (CASES[0], CASES[2])]

# Largest errors allowed against the float64 formula: fp32 is exact up to summation order; fp16 rounds
# q, k, v, the probabilities fed to the matrix products and the outputs (about 5e-4 relative each).
TOLERANCES = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=4e-3, rtol=4e-3)}


def inputs(batch, heads, grid, orders, head_dim, prefix, dtype, device='cpu', seed=0):
    """q, k, v, alphas in `dtype` (drawn in float64, so the reference sees the very same values)."""
    generator = torch.Generator().manual_seed(seed)
    n = prefix + grid[0] * grid[1]
    q, k, v = (torch.randn(batch, heads, n, head_dim, dtype=torch.float64, generator=generator) for _ in range(3))
    alphas = torch.randn(batch, len(orders), dtype=torch.float64, generator=generator).softmax(-1)
    return [t.to(device, dtype).requires_grad_() for t in (q, k, v, alphas)]


def output_gradient(tensors, seed=1):
    batch, heads, n, head_dim = tensors[0].shape
    return torch.randn(batch, heads, n, head_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def output_and_grads(function, tensors, grad):
    out = function(*tensors)
    return [out, *torch.autograd.grad(out, tensors, grad.to(out.dtype))]


def formula(grid, orders, prefix):
    masks = span_masks(grid, orders, prefix)
    return lambda q, k, v, alphas: reference_routed_attention(q, k, v, masks.to(q.device), alphas)


def as_float64(tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


# (grid, prefix tokens, widest radius, block, other side's block) of the band checks.
BANDS = [((8, 8), 1, 1, 16, 16), ((8, 8), 1, 2, 16, 32), ((16, 5), 2, 1, 32, 16), ((9, 6), 20, 1, 16, 16)]


@triton.jit
def _band_probe(OUT, N, PREFIX, GRID_H, GRID_W, REACH, BLOCK: tl.constexpr, OTHER: tl.constexpr):
    """Store `_band` of every block: (pre, lo, hi, count) per program."""
    i = tl.program_id(0)
    pre, lo, hi, count = triton_kernel._band(i * BLOCK, N, PREFIX, GRID_H, GRID_W, REACH, BLOCK, OTHER)
    tl.store(OUT + 4 * i, pre)
    tl.store(OUT + 4 * i + 1, lo)
    tl.store(OUT + 4 * i + 2, hi)
    tl.store(OUT + 4 * i + 3, count)


def run_bands(bands):
    """The blocks `_band` lists for each block of each (grid, prefix, reach, block, other) case, as sets."""
    results = []
    for (h, w), prefix, reach, block, other in bands:
        n = prefix + h * w
        out = torch.zeros(triton.cdiv(n, block), 4, dtype=torch.int32)
        _band_probe[(len(out),)](out, n, prefix, h, w, reach, block, other)
        results.append([set(range(pre)) | set(range(lo, hi)) for pre, lo, hi, _ in out.tolist()])
    return results


def run_jobs(jobs):
    """Output and gradients of `triton_routed_attention` for each (tensors, grad, grid, orders, prefix) job."""
    return [output_and_grads(lambda *t: triton_kernel.triton_routed_attention(*t, grid, orders, prefix),
                             [t.detach().requires_grad_() for t in tensors], grad)
            for tensors, grad, grid, orders, prefix in jobs]


@pytest.fixture(scope='module')
def interpreted(tmp_path_factory):
    """Every job's results, computed by the kernels in Triton's interpreter in a child process."""
    jobs = []
    for dtype, (batch, heads, grid, orders, head_dim, prefix) in JOBS:
        tensors = inputs(batch, heads, grid, orders, head_dim, prefix, dtype)
        jobs.append((tensors, output_gradient(tensors), grid, orders, prefix))
    # Routing weights kept in float32 while q, k, v are half.
    tensors = inputs(*CASES[2], torch.float16)
    tensors[3] = tensors[3].float()
    jobs.append((tensors, output_gradient(tensors), *CASES[2][2:4], 1))
    # q, k, v as (B, N, H, d) memory seen as (B, H, N, d), as a model's projections give them, and a
    # non-contiguous output gradient.
    tensors = inputs(*CASES[2], torch.float32)
    tensors[:3] = [t.detach().transpose(1, 2).contiguous().transpose(1, 2) for t in tensors[:3]]
    grad = output_gradient(tensors).transpose(2, 3).contiguous().transpose(2, 3)
    jobs.append((tensors, grad, *CASES[2][2:4], 1))
    folder = tmp_path_factory.mktemp('interpreter')
    torch.save({'jobs': [([t.detach() for t in tensors], *rest) for tensors, *rest in jobs], 'bands': BANDS},
               folder / 'jobs.pt')
    child = subprocess.run([sys.executable, '-m', 'tests.attention.test_triton_kernel', folder / 'jobs.pt',
                            folder / 'results.pt'],
                           cwd=ROOT, env={**os.environ, 'TRITON_INTERPRET': '1'}, capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    results = torch.load(folder / 'results.pt')
    return jobs, results['jobs'], results['bands']


@pytest.mark.parametrize('job', range(len(JOBS) + 2),
                         ids=[f'{d}-{c}' for d, c in JOBS] + ['float32-alphas', 'strided'])
def test_interpreted_kernels_match_formula(interpreted, job):
    """Output and the gradients of q, k, v and alphas against the float64 formula, in the inputs' dtypes."""
    (tensors, grad, grid, orders, prefix), got = interpreted[0][job], interpreted[1][job]
    want = output_and_grads(formula(grid, orders, prefix), as_float64(tensors), grad)
    for name, g, w, t in zip(('out', 'q', 'k', 'v', 'alphas'), got, want, [tensors[0], *tensors]):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        torch.testing.assert_close(g.double(), w, **TOLERANCES[tensors[0].dtype], msg=lambda m: f'{name}: {m}')


@pytest.mark.parametrize('band', range(len(BANDS)), ids=[str(b) for b in BANDS])
def test_band_lists_every_reachable_block_and_no_far_one(interpreted, band):
    """Per block, the blocks the kernels sweep for the local orders: every block holding a token that the
    widest window lets the block's tokens see (brute force over the span masks), and only blocks holding a
    prefix token or a token within `reach` grid rows of one of the block's tokens."""
    (h, w), prefix, reach, block, other = BANDS[band]
    allowed = span_masks((h, w), [reach], prefix)[0]
    token_row = torch.cat([torch.full((prefix,), -1), torch.arange(h).repeat_interleave(w)])
    within_rows = (token_row[:, None] - token_row[None, :]).abs() <= reach
    within_rows |= (token_row[:, None] < 0) | (token_row[None, :] < 0)
    n = prefix + h * w
    for i, listed in enumerate(interpreted[2][band]):
        mine = slice(i * block, min((i + 1) * block, n))
        seen = {j for j in range(triton.cdiv(n, other)) if allowed[mine, j * other:(j + 1) * other].any()}
        near = {j for j in range(triton.cdiv(n, other)) if within_rows[mine, j * other:(j + 1) * other].any()}
        assert seen <= listed <= near, (i, sorted(seen), sorted(listed), sorted(near))
    assert any(len(listed) < triton.cdiv(n, other) for listed in interpreted[2][band]), 'no block was skipped'


@pytest.mark.parametrize('shape, grid, orders, alphas_shape, message', [
    ((1, 2, 10, 16), (3, 4), [0, 1], (1, 2), 'do not fit'),
    ((1, 2, 10, 16), (3, 3), [0, 3], (1, 2), r'order 3 is not in \[0, 3\) for a 3x3 patch grid'),
    ((1, 2, 10, 16), (3, 3), [1, 1], (1, 2), 'orders must be distinct'),
    ((1, 2, 10, 16), (3, 3), [], (1, 0), 'at least one order'),
    ((1, 2, 10, 16), (3, 3), [0, 1], (1, 3), 'alphas must be'),
])
def test_bad_inputs_are_rejected(shape, grid, orders, alphas_shape, message):
    q = torch.zeros(shape)
    with pytest.raises(ValueError, match=message):
        triton_kernel.triton_routed_attention(q, q, q, torch.zeros(alphas_shape), grid, orders)


@pytest.mark.skipif(triton_kernel.INTERPRETED, reason='kernels decorated for the interpreter')
def test_compiled_kernels_refuse_cpu_tensors():
    q = torch.zeros(1, 1, 10, 16)
    with pytest.raises(ValueError, match='CUDA tensors'):
        triton_kernel.triton_routed_attention(q, q, q, torch.ones(1, 1), (3, 3), [0])


def relative_errors(got, want):
    """Largest error of each tensor, relative to the reference's largest magnitude."""
    return [((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('grid, orders', [((24, 24), [0, 1, 2]), ((14, 14), [0, 1, 2, 3]), ((14, 14), [1, 2])])
def test_cuda_error_no_worse_than_flash_sdpa(dtype, grid, orders):
    """ViT-B/16 shapes (12 heads of 64): output and gradient errors against the float64 formula, relative to
    its magnitudes, stay within twice flash SDPA's own against float64 plain attention on the same inputs."""
    case = (2, 12, grid, orders, 64, 1)
    tensors = inputs(*case, dtype, device='cuda')
    grad = torch.randn(tensors[0].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).cuda()
    routed = output_and_grads(lambda *t: triton_kernel.triton_routed_attention(*t, grid, orders), tensors, grad)
    routed_error = relative_errors(routed, output_and_grads(formula(grid, orders, 1), as_float64(tensors), grad))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        flash = output_and_grads(F.scaled_dot_product_attention, tensors[:3], grad)
    plain = as_float64(tensors[:3]) + [torch.ones(2, 1, dtype=torch.float64, device='cuda', requires_grad=True)]
    flash_error = relative_errors(flash, output_and_grads(formula(grid, [0], 1), plain, grad)[:4])
    for name, mine, theirs in zip(('out', 'q', 'k', 'v'), routed_error, flash_error):
        assert mine <= 2 * theirs, f'{name}: relative error {mine:.3g} vs flash SDPA {theirs:.3g}'
    assert routed_error[4] <= 1e-2, f'alphas: relative error {routed_error[4]:.3g}'


if __name__ == '__main__':  # the interpreter's child process: python -m tests.attention.test_triton_kernel JOBS RESULTS
    index_scalars_of_one_element()
    payload = torch.load(sys.argv[1])
    torch.save({'jobs': run_jobs(payload['jobs']), 'bands': run_bands(payload['bands'])}, sys.argv[2])
