"""Implementations of routed attention, one file each; `model.trar.routed_attention` picks one.

- `shared_scores`: one score matrix shared by every order, a custom autograd Function (CPU; any device); on the
  CPU its softmaxes and mixed map are the fused C++ kernel of `shared_scores_cpu` (.cpp), built on first use.
- `flex`: flash SDPA for the global orders and one FlexAttention call for the local ones (CUDA).
- `dense`: one fused masked SDPA per order (training with attention dropout; any device) and the explicit mixed
  map (pictures).
- `banded`: binarized inference, each image computing only the span its router chose.
"""


def is_global_order(order: int, grid: tuple[int, int]) -> bool:
    """Order 0, or a window reaching every patch of the grid: global attention (`span_masks` allows all of it)."""
    return order == 0 or order >= max(grid) - 1
