"""utils/visualize.py: the CLS attention grid and the routing picture."""
import numpy as np
import pytest
import torch
from PIL import Image

from model.config import get_config
from model.modeling import VisionTransformer
from utils.visualize import cls_attention, order_label, routing_figure, save_routing_plot


def test_cls_attention_is_the_head_mean_of_the_cls_row_over_the_grid():
    torch.manual_seed(0)
    heads, grid = 3, (2, 3)
    attention = torch.rand(heads, 1 + 6, 1 + 6).softmax(-1)
    got = cls_attention(attention, grid)
    row = [sum(float(attention[h, 0, 1 + j]) for h in range(heads)) / heads for j in range(6)]
    expected = np.array(row).reshape(2, 3) / sum(row)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    with pytest.raises(ValueError, match='4x4 grid'):
        cls_attention(attention, (4, 4))


def test_order_labels():
    assert [order_label(o) for o in (0, 1, 2)] == ['global', '3x3', '5x5']


def test_figure_of_a_routed_model_shows_its_routing_weights():
    model = VisionTransformer(get_config('testing'), img_size=32, num_classes=10).eval()
    x = torch.rand(1, 3, 32, 32)
    maps = model.attention_maps(x)
    routing = model.routing_weights()[:, 0].numpy()
    fig = routing_figure(x[0].permute(1, 2, 0).numpy(), cls_attention(maps[-1][0], model.grid), routing,
                         model.config.transformer.orders, title='a digit')
    image_ax, attention_ax, routing_ax = [ax for ax in fig.axes if ax.get_title()]
    np.testing.assert_allclose(routing_ax.images[0].get_array(), routing)
    shown = sorted(float(t.get_text()) for t in routing_ax.texts)
    np.testing.assert_allclose(shown, sorted(np.round(routing.ravel(), 2)))
    assert [t.get_text() for t in routing_ax.get_xticklabels()] == ['order 0\nglobal', 'order 1\n3x3']
    assert attention_ax.images[1].get_array().shape == model.grid
    assert fig._suptitle.get_text() == 'a digit'


def test_plain_model_figure_has_no_routing_panel(tmp_path):
    image = np.random.default_rng(0).random((32, 32, 3))
    fig = routing_figure(image, np.full((8, 8), 1 / 64), None, [])
    assert len([ax for ax in fig.axes if ax.get_title()]) == 2
    save_routing_plot(str(tmp_path / 'plain.png'), image, np.full((8, 8), 1 / 64), None, [])
    with Image.open(tmp_path / 'plain.png') as picture:
        assert picture.format == 'PNG' and picture.width > picture.height > 300
