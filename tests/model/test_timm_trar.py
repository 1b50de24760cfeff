"""TRAR in timm ViTs (model/timm_trar.py), each weight family a tiny random timm model saved as .safetensors.

Checked against timm itself (no orders, and the global order alone), the float64 TRAR formula with the family's
prefix tokens (orders 0, 1, 2), and this repository's own VisionTransformer on Google-layout weights.
"""
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import ParallelScalingBlock

from model.config import get_config
from model.modeling import VisionTransformer
from model.timm_trar import (RoutedAttention, TimmViT, data_config, routed_layers, routing_weights, set_tau,
                              timm_config, trar_vit)
from model.attention import use_implementation
from hub_cache import offline_hub
from official_npz import make_official_weights
from conftest import reference_masks, reference_routed_attention

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5)
# Each family: the timm architecture and what makes it that family (prefix tokens, pooling, norms, patch).
FAMILIES = {
    'class_token': ('vit_base_patch16_224', {}),
    'registers': ('vit_base_patch16_224', dict(reg_tokens=3, no_embed_class=True, img_size=(32, 48))),
    'distillation': ('deit_base_distilled_patch16_224', {}),
    'gap': ('vit_base_patch16_224', dict(global_pool='avg', fc_norm=True)),
    'map_no_class_token': ('vit_base_patch16_224', dict(class_token=False, global_pool='map')),
    'pre_norm': ('vit_base_patch16_224', dict(pre_norm=True, img_size=(24, 40))),
    'layer_scale': ('vit_base_patch16_224', dict(init_values=1e-5)),
    'qk_norm': ('vit_base_patch16_224', dict(qk_norm=True)),
    'patch14': ('vit_base_patch14_dinov2', dict(img_size=42, patch_size=14, init_values=1e-5, dynamic_img_size=False)),
}
PREFIX = {'class_token': 1, 'registers': 4, 'distillation': 2, 'gap': 1, 'map_no_class_token': 0, 'pre_norm': 1,
          'layer_scale': 1, 'qk_norm': 1, 'patch14': 1}


def family_kwargs(family: str) -> dict:
    return {**TINY, **FAMILIES[family][1]}


def saved_family(family: str, path) -> torch.nn.Module:
    """A timm model of the family, every parameter random (norms and layer scales included), saved at `path`."""
    torch.manual_seed(0)
    model = timm.create_model(FAMILIES[family][0], **family_kwargs(family))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    save_file(model.state_dict(), path)
    return model.eval()


def loaded(family: str, path, orders) -> torch.nn.Module:
    """The family's routed model, its weights loaded by timm from the file."""
    torch.manual_seed(1)
    return trar_vit(FAMILIES[family][0], orders, weights=path, pretrained_cfg_overlay=dict(num_classes=5),
                    **family_kwargs(family)).eval()


def images(model, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(batch, 3, *model.patch_embed.img_size)


def reference_forward(layer: RoutedAttention, x: torch.Tensor) -> torch.Tensor:
    """The layer's output by the TRAR formula in float64, from its timm modules and router, masks brute-forced."""
    B, N, _ = x.shape
    q, k, v = layer.qkv(x).reshape(B, N, 3, layer.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = layer.q_norm(q), layer.k_norm(k)
    spans = layer.spans
    masks = reference_masks(*spans.grid, spans.orders, prefix=N - spans.grid[0] * spans.grid[1])
    out = reference_routed_attention(q, k, v, masks, layer.router(x).double())
    return layer.proj(layer.norm(out.transpose(1, 2).reshape(B, N, -1)))


def use_reference(layers) -> None:
    """Make each routed layer compute by `reference_forward`."""
    for layer in layers:
        layer.forward = lambda tokens, attn_mask=None, is_causal=False, layer=layer: reference_forward(layer, tokens)


@pytest.mark.parametrize('family', FAMILIES)
def test_family_loads_and_routes(tmp_path, family):
    source = saved_family(family, tmp_path / 'vit.safetensors')
    x = images(source)
    with torch.no_grad():
        expected = source(x)
        plain = loaded(family, tmp_path / 'vit.safetensors', orders=[])
        assert not routed_layers(plain)
        assert (plain(x) - expected).abs().max() <= 1e-5  # timm's own model, through timm's loader
        global_only = loaded(family, tmp_path / 'vit.safetensors', orders=[0])
        assert (global_only(x) - expected).abs().max() <= 1e-5  # the routed layer, one global order

        routed = loaded(family, tmp_path / 'vit.safetensors', orders=[0, 1, 2]).double()
        layers = routed_layers(routed)
        assert len(layers) == 2 and layers[0].spans.num_prefix_tokens == PREFIX[family]
        assert layers[0].spans is layers[1].spans
        got = routed(x.double())
        use_reference(layers)
        want = routed(x.double())
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert (got - expected.double()).abs().max() > 1e-3  # local orders change the logits


def test_every_prefix_token_is_global_in_every_order():
    for name, kwargs, prefix in (('deit_base_distilled_patch16_224', {}, 2),
                                 ('vit_base_patch16_224', dict(reg_tokens=2), 3),
                                 ('vit_base_patch16_224', dict(class_token=False, global_pool='avg'), 0)):
        masks = trar_vit(name, [1, 2], **TINY, **kwargs).blocks[1].attn.spans.masks
        assert masks.shape == (2, prefix + 16, prefix + 16)
        assert masks[:, :prefix].all() and masks[:, :, :prefix].all()
        assert not masks[:, prefix:, prefix:].flatten(1).all(dim=1).any()


def test_weights_keep_timm_names_and_add_routers(tmp_path):
    source = saved_family('qk_norm', tmp_path / 'vit.safetensors')
    routed = loaded('qk_norm', tmp_path / 'vit.safetensors', orders=[0, 1])
    state = routed.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(state[key], value), key
    extra = sorted(set(state) - set(source.state_dict()))
    assert extra and all('.attn.router.' in key for key in extra)
    plain = timm.create_model('vit_base_patch16_224', **family_kwargs('qk_norm'))
    assert sorted(plain.load_state_dict(routed.state_dict(), strict=False).unexpected_keys) == extra


def test_routing_weights_tau_and_training_backward():
    torch.manual_seed(0)
    model = trar_vit('vit_base_patch16_224', [0, 1], routing='hard', **TINY)
    set_tau(model, 0.5)
    assert all(layer.router.tau.item() == 0.5 for layer in routed_layers(model))
    x = torch.randn(3, 3, 32, 32)
    model(x).sum().backward()
    alphas = routing_weights(model)
    assert alphas.shape == (2, 3, 2)
    torch.testing.assert_close(alphas.sum(-1), torch.ones(2, 3))
    assert all(layer.router.mlp[0].weight.grad.abs().sum() > 0 for layer in routed_layers(model))


@pytest.mark.parametrize('implementation', ['shared_scores', 'flex'])
def test_each_implementation_gives_the_same_model(implementation):
    """The module's own choice and the process override both reach routed_attention; `dense` is the yardstick."""
    kwargs = {**TINY, 'reg_tokens': 1}
    torch.manual_seed(0)
    model = trar_vit('vit_base_patch16_224', [0, 2], implementation=implementation, **kwargs).eval()
    assert all(layer.implementation == implementation for layer in routed_layers(model))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = model(x)
        with use_implementation('dense'):
            expected = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_binarized_routing_with_one_prefix_token_matches_the_formula():
    torch.manual_seed(0)
    model = trar_vit('vit_base_patch16_224', [0, 1, 2], binarize=True, **TINY).eval().double()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        got = model(x)
        use_reference(routed_layers(model))
        want = model(x)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_google_b16_layout_equals_this_repositorys_vit(tmp_path):
    """The same Google .npz and routers: timm's ViT made routed gives this repository's VisionTransformer's logits."""
    config = get_config('testing')
    config.transformer.orders = [0, 1, 2]
    config.transformer.dropout_rate = 0.0
    arrays = make_official_weights(config, img_size=32, num_classes=7, seed=3)
    np.savez(tmp_path / 'vit.npz', **arrays)
    torch.manual_seed(0)
    own = VisionTransformer(config, img_size=32, num_classes=7)
    own.load_from(np.load(tmp_path / 'vit.npz'))
    routed = trar_vit('vit_base_patch16_224', [0, 1, 2], weights=tmp_path / 'vit.npz',
                      **{**TINY, 'patch_size': 4, 'num_classes': 7}).eval()
    for index, layer in enumerate(routed_layers(routed)):
        layer.router.load_state_dict(own.transformer.encoder.layer[index].attn.router.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, got = own.eval()(x), routed(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_hub_weights_from_a_local_cache_without_network(tmp_path, monkeypatch):
    """A name with a tag and a hub id both read the Hugging Face cache layout (HF_HUB_OFFLINE=1, no network)."""
    source = saved_family('class_token', tmp_path / 'vit.safetensors')
    offline_hub(tmp_path / 'hf', monkeypatch, {repo: tmp_path / 'vit.safetensors' for repo in (
        'timm/vit_base_patch16_224.augreg2_in21k_ft_in1k', 'someone/tiny-vit')})
    x = images(source)
    kwargs = dict(family_kwargs('class_token'), pretrained_cfg_overlay=dict(num_classes=5))
    by_tag = trar_vit('vit_base_patch16_224.augreg2_in21k_ft_in1k', [], pretrained=True, **kwargs).eval()
    by_id = trar_vit('vit_base_patch16_224', [], weights='hf-hub:someone/tiny-vit', **kwargs).eval()
    with torch.no_grad():
        for model in (by_tag, by_id):
            assert (model(x) - source(x)).abs().max() <= 1e-5


def test_weights_neither_on_disk_nor_in_the_hub_cache_are_named_in_one_line(tmp_path, monkeypatch):
    offline_hub(tmp_path / 'hf', monkeypatch, {})
    for source in ('hf-hub:nobody/none', str(tmp_path / 'missing.safetensors')):
        with pytest.raises(ValueError) as error:
            trar_vit('vit_base_patch16_224', [0], weights=source, **TINY)
        message = str(error.value)
        assert f'weights {source} are neither a local file nor a hub repository' in message and '\n' not in message


@pytest.mark.parametrize('call, expected', [
    (lambda: trar_vit(torch.nn.Linear(2, 2)), 'Linear is not a timm VisionTransformer'),
    (lambda: trar_vit('vit_base_patch16_224', [0, 9], **TINY), 'order 9 is not in [0, 4)'),
    (lambda: trar_vit('vit_base_patch16_224', [0], pooling='max', **TINY), "unknown pooling 'max'"),
    (lambda: trar_vit('vit_base_patch16_224', [0], implementation='fast', **TINY), "'fast'"),
    (lambda: trar_vit('vit_base_patch16_224', [0], **{**TINY, 'dynamic_img_size': True}), 'dynamic_img_size'),
    (lambda: trar_vit('vit_base_patch16_224', [0], attn_layer='diff', **TINY),
     "blocks.0.attn: DiffAttention is not timm's Attention"),
    (lambda: trar_vit('vit_base_patch16_224', [0], block_fn=ParallelScalingBlock, **TINY),
     'blocks.0 (ParallelScalingBlock) has no separate attention to route'),
])
def test_what_cannot_route_is_named_in_one_line(call, expected):
    with pytest.raises(ValueError) as error:
        call()
    assert expected in str(error.value) and '\n' not in str(error.value)


def test_tokens_of_another_grid_are_refused_in_one_line():
    layer = trar_vit('vit_base_patch16_224', [0, 1], **TINY).blocks[0].attn
    with pytest.raises(ValueError, match=r'do not fit 1 prefix tokens, a 4x4 grid .* expected \(B, H, 17, d\)'):
        layer(torch.randn(1, 5, 32))


def test_timm_model_for_the_scripts_has_the_repository_interface():
    config = timm_config('timm:vit_tiny_patch16_224', [0, 1])
    config.transformer.routing = 'hard'
    torch.manual_seed(0)
    model = TimmViT(config, img_size=(32, 48), num_classes=5)
    assert model.grid == (2, 3) and model.is_routed and model.config.transformer.num_layers == 12
    assert all(key.startswith('vit.') for key in model.state_dict())
    x = torch.randn(2, 3, 32, 48)
    model.eval()
    logits = model(x)
    assert logits.shape == (2, 5) and model.routing_weights().shape == (12, 2, 2)
    model.set_tau(0.25)
    assert all(layer.router.tau.item() == 0.25 for layer in routed_layers(model))
    maps = model.attention_maps(x)
    assert len(maps) == 12 and maps[0].shape == (2, 3, 7, 7)
    torch.testing.assert_close(maps[-1].sum(-1), torch.ones(2, 3, 7))
    assert data_config(model)['mean'] == (0.5, 0.5, 0.5)  # AugReg's
    deit = TimmViT(timm_config('timm:deit_tiny_distilled_patch16_224.fb_in1k'), img_size=64, num_classes=3)
    assert data_config(deit)['mean'] == (0.485, 0.456, 0.406)  # ImageNet's
    assert deit.attention_maps(torch.randn(1, 3, 64, 64))[0].shape[-1] == 17  # class token + 16 patches
    with pytest.raises(ValueError, match='expected timm:<a timm model name>'):
        timm_config('timm:no_such_model')
