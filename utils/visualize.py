"""Pictures of what TRAR routes: where the CLS token looks, and which span each layer chose.

`routing_figure` draws one image in three panels: the input as the model sees it, the same with the
last layer's CLS attention over it, and a layers x orders heatmap of the routing weights (absent for
a plain ViT, which has no router).
"""
from typing import Sequence

import matplotlib

matplotlib.use('Agg')  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def cls_attention(attention: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """The CLS token's attention over the patch grid, averaged over heads.

    attention: one layer's (heads, N, N) map for one image, token 0 being CLS. Returns (h, w),
    renormalised to sum to 1 over the patches.
    """
    row = attention.float().mean(0)[0, 1:]
    if row.numel() != grid[0] * grid[1]:
        raise ValueError(f"attention over {row.numel()} patches does not fit a {grid[0]}x{grid[1]} grid")
    row = row / row.sum().clamp_min(1e-12)
    return row.reshape(grid).cpu().numpy()


def order_label(order: int) -> str:
    """Human name of a span order: 0 is global, o a (2o+1)x(2o+1) window."""
    return 'global' if order == 0 else f'{2 * order + 1}x{2 * order + 1}'


def routing_figure(image: np.ndarray, attention: np.ndarray, routing: np.ndarray | None,
                   orders: Sequence[int], title: str = '') -> plt.Figure:
    """One picture: the image, the image with its CLS attention overlaid, the routing weights per layer.

    image: (H, W, 3) floats in [0, 1], as the model saw it; attention: (h, w) patch grid;
    routing: (layers, len(orders)) weights of this image, or None for a plain ViT.
    """
    routed = routing is not None
    fig, axes = plt.subplots(1, 3 if routed else 2, figsize=(12.5 if routed else 7.5, 4.2),
                             gridspec_kw={'width_ratios': [1, 1.2, 1.3] if routed else [1, 1.2]})
    _draw_image(axes[0], image)
    _draw_attention(axes[1], image, attention)
    if routed:
        draw_routing(fig, axes[2], np.asarray(routing, dtype=float), orders)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return fig


def save_routing_plot(path: str, image: np.ndarray, attention: np.ndarray, routing: np.ndarray | None,
                      orders: Sequence[int], title: str = '') -> None:
    """Draw `routing_figure` and write it to `path` (the format follows the suffix, e.g. .png)."""
    fig = routing_figure(image, attention, routing, orders, title)
    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def _draw_image(ax: plt.Axes, image: np.ndarray) -> None:
    ax.imshow(image, interpolation='nearest')
    ax.set_title('input, as the model sees it', fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_attention(ax: plt.Axes, image: np.ndarray, attention: np.ndarray) -> None:
    height, width = image.shape[:2]
    ax.imshow(image, interpolation='nearest')
    overlay = ax.imshow(attention, cmap='inferno', alpha=0.55, interpolation='bilinear',
                        extent=(-0.5, width - 0.5, height - 0.5, -0.5))
    ax.figure.colorbar(overlay, ax=ax, fraction=0.046, pad=0.03, label='share of CLS attention')
    ax.set_title('CLS attention, last layer (mean of heads)', fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def draw_routing(fig: plt.Figure, ax: plt.Axes, routing: np.ndarray, orders: Sequence[int]) -> None:
    layers = routing.shape[0]
    cells = ax.imshow(routing, cmap='Blues', vmin=0.0, vmax=1.0, aspect='auto')
    for layer in range(layers):
        for index in range(routing.shape[1]):
            weight = routing[layer, index]
            ax.text(index, layer, f'{weight:.2f}', ha='center', va='center', fontsize=9,
                    color='white' if weight > 0.6 else 'black')
    ax.set_xticks(range(len(orders)), [f'order {o}\n{order_label(o)}' for o in orders], fontsize=9)
    ax.set_yticks(range(layers), [f'layer {i}' for i in range(layers)], fontsize=9)
    ax.set_title('routing weights per layer', fontsize=10)
    fig.colorbar(cells, ax=ax, fraction=0.046, pad=0.03, label='weight')
