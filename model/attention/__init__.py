"""Routed attention, the whole of it: `routed_attention(q, k, v, alphas, spans)` picks one implementation.

- `spans`: the grid, orders and prefix tokens (`Spans`), their masks and layout.
- `settings`: implementation names, device defaults and every environment variable.
- `interface`: the entry point and the choice of implementation (`implementation_for`).
- One file per implementation: `shared_scores` (one score matrix shared by every order; on the CPU its fused C++
  kernel, `shared_scores_cpu`), `flex` (FlexAttention + flash SDPA, CUDA), `triton` (fused kernels, CUDA),
  `dense` (one masked SDPA per order; training with attention dropout; the explicit map for pictures) and `banded`
  (binarized inference, each image computing only the span its router chose).

The names below are imported from their modules on first use, so that `python -m model.attention.shared_scores_cpu`
(make's kernel build) loads nothing else. docs/attention.md explains the implementations and the choice.
"""
import importlib

_EXPORTS = {
    'interface': ('implementation_for', 'routed_attention'),
    'settings': ('CHOICES', 'CUDA_DEFAULT', 'IMPLEMENTATIONS', 'set_implementation', 'use_implementation'),
    'spans': ('SpanLayout', 'Spans', 'as_grid', 'check_orders', 'is_global_order', 'span_layout', 'span_masks'),
    'dense': ('routed_attention_maps',),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f'.{_MODULE_OF[name]}', __name__), name)
