"""What several test modules share: the float64 references routed attention is checked against, and a fixture that
audits the devices tensors are built on."""
import itertools
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

MODEL = str(Path(__file__).resolve().parents[1] / 'model')


def reference_masks(h: int, w: int, orders, prefix: int = 1) -> torch.Tensor:
    """Span masks by brute force over token pairs: prefix tokens see and are seen by all; order o, Chebyshev <= o."""
    n = prefix + h * w
    masks = torch.zeros(len(orders), n, n, dtype=torch.bool)
    for l, order in enumerate(orders):
        for i, j in itertools.product(range(n), range(n)):
            if i < prefix or j < prefix or order == 0:
                masks[l, i, j] = True
            else:
                (ri, ci), (rj, cj) = divmod(i - prefix, w), divmod(j - prefix, w)
                masks[l, i, j] = max(abs(ri - rj), abs(ci - cj)) <= order
    return masks


def reference_routed_attention(q, k, v, masks, alphas):
    """The TRAR formula, order by order, in float64 with an explicit exp-normalise softmax."""
    q, k, v, alphas = q.double(), k.double(), v.double(), alphas.double()
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    out = torch.zeros_like(q)
    for l in range(masks.shape[0]):
        e = torch.exp(scores - scores.max(dim=-1, keepdim=True).values) * masks[l].to(q.device)
        out = out + alphas[:, l, None, None, None] * (e / e.sum(dim=-1, keepdim=True)) @ v
    return out


def assert_matches_reference(function, q, k, v, masks, alphas, rtol=None, atol=None):
    """`function(q, k, v, alphas)`'s output and gradients against the float64 formula (q's dtype sets the default
    tolerances)."""
    out = function(q, k, v, alphas)
    wanted = (q, k, v, alphas)
    exact = [t.detach().double().requires_grad_() for t in wanted]
    expected = reference_routed_attention(*exact[:3], masks, exact[3])
    torch.testing.assert_close(out, expected.to(out.dtype), rtol=rtol, atol=atol)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, wanted, grad), torch.autograd.grad(expected, exact, grad.double())):
        torch.testing.assert_close(got, want.to(got.dtype), rtol=rtol, atol=atol)


FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.as_tensor,
             torch.eye, torch.randn, torch.rand, torch.randint, torch.linspace}


class DeviceAudit(TorchFunctionMode):
    """Records every tensor that code under `root` (model/) makes from scratch without naming a device: on a GPU it
    would be a CPU tensor, mixed with the inputs' (what CPU tests cannot otherwise see)."""

    def __init__(self, root: str = MODEL):
        super().__init__()
        self.root, self.undevised = root, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and 'device' not in kwargs:
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(self.root):
                self.undevised.append(f"{func.__name__} at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
        return func(*args, **kwargs)


@pytest.fixture
def device_audit():
    """A `DeviceAudit` to run code under: `with device_audit: ...`, then `assert device_audit.undevised == []`."""
    return DeviceAudit()


def routed_inputs(batch, heads, grid, orders, head_dim, prefix=1, seed=0):
    """Seeded float64 (q, k, v, masks, alphas) for routed attention over `grid` with `orders`, gradients on."""
    from model.attention import span_masks
    torch.manual_seed(seed)
    n = prefix + grid[0] * grid[1]
    q, k, v = (torch.randn(batch, heads, n, head_dim, dtype=torch.float64, requires_grad=True) for _ in range(3))
    alphas = torch.randn(batch, len(orders), dtype=torch.float64).softmax(-1).requires_grad_()
    return q, k, v, span_masks(grid, orders, prefix), alphas


def index_scalars_of_one_element():
    """Let Triton 3.6's interpreter take loop bounds computed from the program id.

    Its scalars are NumPy arrays of shape (1,), and it turns them into ints with `int(array)`, which
    NumPy 2.4 refuses; Triton 3.8 squeezes them first, as this does.
    """
    from triton.runtime import interpreter
    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, '__index__', lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched
