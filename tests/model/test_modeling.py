"""VisionTransformer: configs, checkpoint loading, routing bookkeeping and input validation."""
from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import CONFIGS, get_config
from model.modeling import VisionTransformer
from official_npz import make_official_weights, numpy_vit_logits

REFERENCE_KEYS = Path(__file__).parents[1] / 'data' / 'vit_pytorch_b16_state_dict.txt'


def plain(model_type: str = 'testing'):
    config = get_config(model_type)
    config.transformer.orders = []
    return config


def test_configs_exist_and_testing_routes_by_default():
    for name in ('ViT-B_16', 'ViT-B_32', 'ViT-L_16', 'ViT-L_32', 'ViT-H_14', 'testing'):
        assert name in CONFIGS
    assert get_config('testing').transformer.orders == [0, 1]
    b16 = get_config('ViT-B_16').transformer
    assert (b16.orders, b16.pooling, b16.routing) == ([0, 1, 2], 'avg', 'soft')
    copy = get_config('ViT-B_16')
    copy.transformer.orders = []
    assert CONFIGS['ViT-B_16'].transformer.orders == [0, 1, 2]
    with pytest.raises(ValueError, match='ViT-X_99'):
        get_config('ViT-X_99')


def test_plain_b16_is_exactly_vit_and_matches_vit_pytorch_layout():
    model = VisionTransformer(plain('ViT-B_16'), img_size=224, num_classes=1000)
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    assert total == 86_567_656 and total - head == 85_798_656
    assert not model.is_routed and model.routing_weights() is None
    expected = {}
    for line in REFERENCE_KEYS.read_text().splitlines():
        if line and not line.startswith('#'):
            name, shape = line.split(' ', 1)
            expected[name] = tuple(int(s) for s in shape.strip('()').split(',') if s.strip())
    assert {name: tuple(t.shape) for name, t in model.state_dict().items()} == expected


def test_vit_pytorch_state_dict_loads_into_plain_model():
    source = VisionTransformer(plain(), img_size=32, num_classes=10)
    target = VisionTransformer(plain(), img_size=32, num_classes=10)
    target.load_state_dict(source.state_dict())
    source.eval(), target.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(target(x), source(x))


def test_one_spans_is_shared_by_every_block():
    """The orders are checked and their masks and layout built once per model, not per block."""
    model = VisionTransformer(get_config('testing'), img_size=(16, 32), num_classes=3)
    spans = model.transformer.encoder.spans
    assert (spans.grid, spans.orders, spans.num_prefix_tokens) == ((4, 8), (0, 1), 1)
    assert all(block.attn.spans is spans for block in model.transformer.encoder.layer)
    assert len([m for m in model.modules() if m is spans]) == 1


def test_routed_model_adds_only_router_parameters():
    routed = VisionTransformer(get_config('testing'), img_size=32, num_classes=10)
    plain_keys = set(VisionTransformer(plain(), img_size=32, num_classes=10).state_dict())
    extra = set(routed.state_dict()) - plain_keys
    assert plain_keys <= set(routed.state_dict())
    assert extra and all('.attn.router.' in key for key in extra)


@pytest.mark.parametrize('pre_logits', [False, True])
def test_official_npz_gives_independent_logits(tmp_path, pre_logits):
    config = plain()
    weights = make_official_weights(config, img_size=32, num_classes=7, pre_logits=pre_logits)
    np.savez(tmp_path / 'vit.npz', **weights)
    model = VisionTransformer(config, img_size=32, num_classes=7).eval()
    model.load_from(np.load(tmp_path / 'vit.npz'))
    images = np.random.default_rng(1).standard_normal((3, 3, 32, 32))
    expected = numpy_vit_logits(weights, images, config.transformer.num_layers)
    got = model(torch.from_numpy(images).float()).double().detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_official_npz_into_routed_model_keeps_router_init():
    config = get_config('testing')
    model = VisionTransformer(config, img_size=32, num_classes=7, zero_head=True)
    routers = {k: v.clone() for k, v in model.state_dict().items() if '.router.' in k}
    weights = make_official_weights(config, img_size=32, num_classes=21843)
    model.load_from(weights)
    for key, value in routers.items():
        assert torch.equal(model.state_dict()[key], value)
    assert torch.equal(model.head.weight, torch.zeros_like(model.head.weight))
    np.testing.assert_array_equal(model.transformer.embeddings.cls_token.detach().numpy(), weights['cls'])


def test_position_embedding_is_resized_like_the_official_code():
    config = plain()
    weights = make_official_weights(config, img_size=32, num_classes=5)  # 8x8 grid
    rows, cols = np.meshgrid(np.arange(8), np.arange(8), indexing='ij')
    ramp = np.stack([rows, cols, rows + 2 * cols], -1).astype(np.float32)  # linear in position
    posemb = weights['Transformer/posembed_input/pos_embedding']
    posemb[0, 1:, :3] = ramp.reshape(64, 3)
    model = VisionTransformer(config, img_size=48, num_classes=5)  # 12x12 grid
    model.load_from(weights)
    new = model.transformer.embeddings.position_embeddings.detach()[0]
    torch.testing.assert_close(new[0], torch.from_numpy(posemb[0, 0]))
    # Linear interpolation with corners aligned maps new index i to old index i * 7 / 11.
    r, c = np.meshgrid(np.arange(12) * 7 / 11, np.arange(12) * 7 / 11, indexing='ij')
    expected = np.stack([r, c, r + 2 * c], -1).reshape(144, 3)
    np.testing.assert_allclose(new[1:, :3].numpy(), expected, atol=1e-4)


def test_load_from_lists_missing_keys_and_wrong_shapes():
    config = plain()
    weights = make_official_weights(config, img_size=32, num_classes=5)
    del weights['embedding/bias'], weights['Transformer/encoderblock_1/LayerNorm_2/bias']
    model = VisionTransformer(config, img_size=32, num_classes=5)
    with pytest.raises(ValueError, match='missing embedding/bias; missing Transformer/encoderblock_1/LayerNorm_2/bias'):
        model.load_from(weights)
    wrong = make_official_weights(config, img_size=32, num_classes=9)
    with pytest.raises(ValueError, match=r'head/kernel: file \(9, 32\) vs model \(5, 32\)'):
        model.load_from(wrong)
    wider = plain()
    wider.hidden_size, wider.transformer.num_layers = 48, 3
    with pytest.raises(ValueError) as error:  # another width and depth: named in one line, none from numpy
        model.load_from(make_official_weights(wider, img_size=32, num_classes=5))
    message = str(error.value)
    assert 'width 48 vs 32, depth 3 vs 2' in message and '--model_type' in message and '\n' not in message


def test_tau_is_saved_with_the_weights():
    config = get_config('testing')
    config.transformer.routing = 'hard'
    model = VisionTransformer(config, img_size=32, num_classes=3)
    model.set_tau(0.25)
    restored = VisionTransformer(config, img_size=32, num_classes=3)
    restored.load_state_dict(model.state_dict())
    assert all(float(b.attn.router.tau) == 0.25 for b in restored.transformer.encoder.layer)


def test_routing_weights_and_tau():
    config = get_config('testing')
    config.transformer.routing = 'hard'
    config.transformer.binarize = True
    model = VisionTransformer(config, img_size=32, num_classes=3)
    model.set_tau(0.5)
    assert all(float(b.attn.router.tau) == 0.5 for b in model.transformer.encoder.layer)
    x = torch.randn(4, 3, 32, 32)
    model(x)
    weights = model.routing_weights()
    assert weights.shape == (2, 4, 2) and not weights.requires_grad
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4))
    model.eval()
    model(x)
    assert set(model.routing_weights().unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match='tau'):
        model.set_tau(0.0)


def test_attention_maps_are_the_maps_the_forward_pass_uses():
    torch.manual_seed(0)
    model = VisionTransformer(get_config('testing'), img_size=32, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    maps = model.attention_maps(x)
    assert len(maps) == 2 and maps[0].shape == (2, 2, 65, 65)
    torch.testing.assert_close(maps[-1].sum(-1), torch.ones(2, 2, 65))
    # Rebuild layer 0's output from its map and compare with the fused path.
    block = model.transformer.encoder.layer[0]
    tokens = model.transformer.embeddings(x)
    fused, _ = block.attn(block.attention_norm(tokens))
    normed = block.attention_norm(tokens)
    v = block.attn.heads(block.attn.value(normed))
    rebuilt = block.attn.out((maps[0] @ v).transpose(1, 2).flatten(2))
    torch.testing.assert_close(rebuilt, fused, rtol=1e-4, atol=1e-5)


def test_non_square_images():
    model = VisionTransformer(get_config('testing'), img_size=(16, 32), num_classes=3)
    assert model.grid == (4, 8)
    assert model(torch.randn(2, 3, 16, 32)).shape == (2, 3)


@pytest.mark.parametrize('change, kwargs, message', [
    ({}, {'img_size': 30}, 'not divisible'),
    ({'transformer.orders': [0, 8]}, {}, 'order 8'),
    ({'transformer.pooling': 'max'}, {}, 'pooling'),
    ({'transformer.routing': 'sparse'}, {}, 'routing'),
    ({'transformer.orders': [], 'transformer.pooling': 'max'}, {}, 'pooling'),  # checked without routers too
])
def test_bad_config_values_are_rejected(change, kwargs, message):
    config = get_config('testing')
    for key, value in change.items():
        section, field = key.split('.')
        config[section][field] = value
    with pytest.raises(ValueError, match=message):
        VisionTransformer(config, **{'img_size': 32, 'num_classes': 3, **kwargs})


def test_wrong_input_shape_is_rejected():
    model = VisionTransformer(get_config('testing'), img_size=32, num_classes=3)
    for shape in [(2, 3, 48, 48), (2, 1, 32, 32), (3, 32, 32)]:
        with pytest.raises(ValueError, match='expected'):
            model(torch.randn(*shape))


def test_legacy_img_scale_must_agree():
    config = get_config('testing')
    config.transformer.img_scale = 8
    VisionTransformer(config, img_size=32, num_classes=3)
    with pytest.raises(ValueError, match='img_scale=24'):
        config.transformer.img_scale = 24
        VisionTransformer(config, img_size=32, num_classes=3)


@pytest.mark.parametrize('routing, training', [('soft', True), ('soft', False), ('hard', True), ('hard', False)])
def test_torch_compile_traces_one_graph_without_breaks(routing, training):
    """torch.compile sees the whole model, routed attention included, as one graph (train and eval)."""
    import torch._dynamo as dynamo

    config = get_config('testing')
    config.transformer.routing, config.transformer.binarize = routing, routing == 'hard'
    model = VisionTransformer(config, img_size=32, num_classes=3).train(training)
    dynamo.reset()
    with torch.set_grad_enabled(training):
        explanation = dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_torch_compiled_model_trains_and_predicts_as_eager():
    """Inductor's compiled model (a training step, then inference) gives eager's loss, gradients and logits."""
    torch.manual_seed(0)
    config = get_config('testing')
    config.transformer.dropout_rate = 0.0
    model = VisionTransformer(config, img_size=32, num_classes=3)
    compiled = torch.compile(model)
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])

    def loss_and_grads(module):
        loss = torch.nn.functional.cross_entropy(module(images), labels)
        return loss, torch.autograd.grad(loss, list(model.parameters()))

    (loss, grads), (eager_loss, eager_grads) = loss_and_grads(compiled), loss_and_grads(model)
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(grads, eager_grads, rtol=1e-4, atol=1e-5)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), model(images), rtol=1e-4, atol=1e-5)


def test_only_binarized_models_dispatch_per_image_in_inference(monkeypatch):
    """One-hot routing skips unused orders; soft routing never pays for looking at the weights."""
    import model.attention.interface as interface

    calls = []
    dispatch = interface.banded_routed_attention
    monkeypatch.setattr(interface, 'banded_routed_attention', lambda *a: calls.append(1) or dispatch(*a))
    x = torch.randn(3, 3, 32, 32)
    for routing in ('soft', 'hard'):
        config = get_config('testing')
        config.transformer.routing, config.transformer.binarize = routing, routing == 'hard'
        model = VisionTransformer(config, img_size=32, num_classes=3).eval()
        with torch.no_grad():
            model(x)
        assert len(calls) == (0 if routing == 'soft' else 2)  # once per layer for one-hot weights


@pytest.mark.parametrize('routing', ['soft', 'hard'])
def test_model_trains_on_another_device_with_nothing_left_on_the_cpu(monkeypatch, routing):
    """On the meta device (a stand-in for a GPU here) a training step and inference mix no CPU tensor in: every
    buffer moves with the model and every tensor made on the fly is made on the input's device."""
    import contextlib

    monkeypatch.setattr(torch, 'autocast', lambda *args, **kwargs: contextlib.nullcontext())  # no meta autocast
    config = get_config('testing')
    config.transformer.orders, config.transformer.routing = [0, 1, 2], routing
    model = VisionTransformer(config, img_size=32, num_classes=3).to('meta')
    images, labels = torch.randn(2, 3, 32, 32, device='meta'), torch.zeros(2, dtype=torch.long, device='meta')
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    assert all(p.grad is not None and p.grad.device.type == 'meta' for p in model.parameters())
    with torch.no_grad():
        assert model.eval()(images).device.type == 'meta'
