"""Routed attention's one entry point: `routed_attention(q, k, v, alphas, spans)` and the choice of implementation.

The choice is made in one place, `implementation_for(device, requested)`: a process override (`use_implementation`,
else `TRAR_ATTENTION`) first, then the module's `requested` name (`transformer.attention`), and `auto` picks by
device (`CUDA_DEFAULT` on CUDA, `shared_scores` elsewhere). Two cases need another path, and say so:
- training with attention dropout runs `dense` (one masked SDPA per order, the dropout acting on each map): `auto`
  takes it silently, a forced implementation is warned once that `dense` runs instead;
- binarized inference (one-hot weights) under `auto` computes per image only the order it uses (`banded`, one prefix
  token); a forced implementation runs as forced.
"""
import warnings

import torch

from . import settings
from .banded import banded_routed_attention
from .dense import dense_routed_attention
from .flex import flex_routed_attention
from .shared_scores import shared_scores_attention
from .spans import Spans

_warned: set[str] = set()


def implementation_for(device: torch.device | str, requested: str = 'auto') -> str:
    """The implementation routed attention runs on `device` for a module that asks for `requested` ('auto' or a name
    of `IMPLEMENTATIONS`): what train.py, eval.py and test.py record. One-line ValueError for a bad name or an
    implementation that cannot run on `device`."""
    name = settings.forced_implementation() or settings.check_implementation(requested)
    device = torch.device(device)
    if name == 'auto':
        return settings.CUDA_DEFAULT if device.type == 'cuda' else 'shared_scores'
    if name == 'triton' and device.type != 'cuda' and not settings.triton_interpreted():
        raise ValueError(f"the 'triton' routed attention runs on CUDA, not on {device.type} (on CPU tensors only with "
                         "TRITON_INTERPRET=1); choose 'auto', 'shared_scores' or 'dense'")
    return name


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alphas: torch.Tensor, spans: Spans,
                     dropout_p: float = 0.0, *, implementation: str = 'auto', binarized: bool = False) -> torch.Tensor:
    """`sum_l alphas[:, l] * softmax(q k^T / sqrt(d), masked by order l) v`, never building the (B, L, H, N, N) stack.

    q, k, v: (B, H, N, d), N = spans.num_tokens; alphas: (B, L) over `spans.orders`. Returns (B, H, N, d).
    `implementation`: 'auto' or a name of `IMPLEMENTATIONS` (see `implementation_for`). `dropout_p` applies to each
    order's map (training only); `binarized` says the weights are one-hot (a router with `binarize`): inference then
    reads them back from the device to skip unused orders, so only callers with one-hot weights ask for it.
    """
    spans.check(q, alphas)
    name = implementation_for(q.device, implementation)
    auto = settings.forced_implementation() is None and implementation == 'auto'
    if dropout_p > 0 and torch.is_grad_enabled():
        if name != 'dense' and not auto:
            _warn_once(name, f"the {name!r} routed attention has no attention dropout: training with attention "
                             "dropout runs 'dense' (one masked SDPA per order)")
        return dense_routed_attention(q, k, v, spans.tensors_on(q.device)[0], alphas, dropout_p)
    if (auto and binarized and spans.num_prefix_tokens == 1 and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and bool((alphas == 0).any())):
        return banded_routed_attention(q, k, v, alphas, spans.grid, list(spans.orders))
    if name == 'shared_scores':
        return shared_scores_attention(q, k, v, alphas, spans.layout(q.device))
    if name == 'dense':
        return dense_routed_attention(q, k, v, spans.tensors_on(q.device)[0], alphas)
    if name == 'flex':
        if q.device.type == 'cpu' and any(t.requires_grad for t in (q, k, v)):
            raise ValueError("the 'flex' routed attention computes gradients on CUDA only, not on cpu (PyTorch refuses "
                             "flex attention's backward there); run it on inputs that need no gradient (inference) or "
                             "choose 'auto', 'shared_scores' or 'dense'")
        return flex_routed_attention(q, k, v, alphas, spans.grid, spans.orders, spans.num_prefix_tokens)
    return _triton()(q, k, v, alphas, spans.grid, spans.orders, spans.num_prefix_tokens)


def _triton():
    """The Triton kernels, imported on first use: Triton is optional."""
    try:
        from .triton_kernel import triton_routed_attention
    except ImportError as error:
        raise ValueError(f"the 'triton' routed attention is unavailable ({error}); choose 'auto', 'shared_scores', "
                         "'flex' or 'dense'") from None
    return triton_routed_attention


def _warn_once(key: str, message: str) -> None:
    if key not in _warned and not torch.compiler.is_compiling():
        _warned.add(key)
        warnings.warn(message, stacklevel=3)
