"""model/pretrained.py: timm, Google (vit_jax and big_vision), ViT-pytorch and train.py weights, checked against
timm's own forward pass and an independent numpy ViT; what this ViT cannot hold is named in one line."""
import importlib.util
import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer as TimmViT

import train
from model import pretrained
from model.config import get_config
from model.modeling import VisionTransformer
from official_npz import make_official_weights, numpy_vit_logits
from train_helpers import ROOT, tiny_args, weights as checkpoint_weights

TESTING = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)  # the 'testing' config


def timm_vit(cls=TimmViT, seed: int = 0, **changes) -> torch.nn.Module:
    """A timm ViT laid out like the 'testing' config, every parameter (norms included) random."""
    torch.manual_seed(seed)
    model = cls(**{**TESTING, 'num_classes': 10, **changes})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    return model.eval()


def plain_testing():
    config = get_config('testing')
    config.transformer.orders = []
    return config


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as error:
        call(*args, **kwargs)
    message = str(error.value)
    assert '\n' not in message and len(message) < 600, message
    return message


# ---------------------------------------------------------------------------------------------
# timm


@pytest.mark.parametrize('suffix, wrap', [('.safetensors', None), ('.pth', None), ('.pth', 'model'),
                                          ('.bin', 'state_dict')])
def test_timm_state_dicts_give_timm_logits(tmp_path, suffix, wrap):
    source = timm_vit()
    path = tmp_path / f'vit{suffix}'
    state = source.state_dict()
    if suffix == '.safetensors':
        save_file(state, path)
    else:
        torch.save({wrap: state, 'epoch': 3} if wrap else state, path)
    weights = pretrained.read(path)
    assert weights.layout == 'timm' and weights.num_classes == 10
    model = pretrained.build_model(weights, 'testing')
    assert not model.is_routed and model.img_size == (32, 32)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), source(images), rtol=1e-4, atol=1e-5)


def test_timm_vit_b16_from_safetensors(tmp_path):
    """The real ViT-B/16 layout: timm.create_model('vit_base_patch16_224') with random weights (.pth: above)."""
    torch.manual_seed(0)
    source = timm.create_model('vit_base_patch16_224', pretrained=False, num_classes=10, weight_init='skip').eval()
    with torch.no_grad():
        for name, parameter in source.named_parameters():
            parameter.normal_(1.0 if 'norm' in name and name.endswith('weight') else 0.0, 0.02)
    save_file(source.state_dict(), tmp_path / 'b16.safetensors')
    model = pretrained.build_model(pretrained.read(tmp_path / 'b16.safetensors'), 'ViT-B_16')
    assert model.img_size == (224, 224) and model.num_classes == 10
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = source(images)
        assert expected.abs().max() > 0.1  # a test with room to fail
        torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-4)


def test_another_image_size_resizes_the_position_embeddings(tmp_path):
    source = timm_vit()
    save_file(source.state_dict(), tmp_path / 'vit.safetensors')
    model = pretrained.build_model(pretrained.read(tmp_path / 'vit.safetensors'), 'testing', img_size=48)
    new = model.transformer.embeddings.position_embeddings.detach()
    old = source.pos_embed.detach()
    assert new.shape == (1, 1 + 12 * 12, 32)
    torch.testing.assert_close(new[:, 0], old[:, 0])  # the class position is kept
    # scipy's order-1 zoom is bilinear interpolation with the corners aligned.
    grid = old[0, 1:].reshape(8, 8, 32).permute(2, 0, 1)[None]
    expected = F.interpolate(grid.double(), size=(12, 12), mode='bilinear', align_corners=True)
    torch.testing.assert_close(new[0, 1:].double(), expected[0].permute(1, 2, 0).reshape(144, 32), atol=1e-5, rtol=0)
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 10)


def test_fine_tune_start_keeps_routers_and_a_fresh_head(tmp_path):
    source = timm_vit(num_classes=1000)
    save_file(source.state_dict(), tmp_path / 'vit.safetensors')
    torch.manual_seed(1)
    model = VisionTransformer(get_config('testing'), img_size=32, num_classes=10, zero_head=True)
    routers = {key: value.clone() for key, value in model.state_dict().items() if '.router.' in key}
    pretrained.load_pretrained(model, tmp_path / 'vit.safetensors')
    state = model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in routers.items())
    assert not state['head.weight'].any() and not state['head.bias'].any()
    block = source.blocks[1]
    q, k, v = block.attn.qkv.weight.detach().chunk(3)
    torch.testing.assert_close(state['transformer.encoder.layer.1.attn.key.weight'], k)
    torch.testing.assert_close(state['transformer.encoder.layer.1.ffn_norm.bias'], block.norm2.bias.detach())
    # Without zero_head, a head of the same classes is kept and one of other classes stays fresh.
    same = VisionTransformer(plain_testing(), img_size=32, num_classes=1000)
    pretrained.load_pretrained(same, tmp_path / 'vit.safetensors')
    torch.testing.assert_close(same.head.weight, source.head.weight)
    other = VisionTransformer(plain_testing(), img_size=32, num_classes=7)
    fresh = other.head.weight.clone()
    pretrained.load_pretrained(other, tmp_path / 'vit.safetensors')
    assert torch.equal(other.head.weight, fresh)


def test_no_embed_class_position_table_gets_a_zero_class_position(tmp_path):
    source = timm_vit(no_embed_class=True)
    save_file(source.state_dict(), tmp_path / 'vit.safetensors')
    model = pretrained.build_model(pretrained.read(tmp_path / 'vit.safetensors'), 'testing')
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), source(images), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Google .npz: vit_jax and big_vision


def big_vision_layout(w: dict[str, np.ndarray], num_layers: int, stacked: bool) -> dict[str, np.ndarray]:
    """vit_jax arrays renamed as big_vision saves them: `params/`, a pos_embedding of the patches only."""
    out = {}
    for key, value in w.items():
        if key == 'Transformer/posembed_input/pos_embedding':
            out['params/pos_embedding'] = value[:, 1:]
            continue
        key = key.replace('MultiHeadDotProductAttention_1', 'MultiHeadDotProductAttention_0')
        out['params/' + key.replace('MlpBlock_3', 'MlpBlock_0').replace('LayerNorm_2', 'LayerNorm_1')] = value
    if stacked:
        first = [key for key in out if key.startswith('params/Transformer/encoderblock_0/')]
        for key in first:
            suffix = key.removeprefix('params/Transformer/encoderblock_0/')
            out[f'params/Transformer/encoderblock/{suffix}'] = np.stack(
                [out.pop(f'params/Transformer/encoderblock_{i}/{suffix}') for i in range(num_layers)])
    return out


@pytest.mark.parametrize('layout', ['vit_jax', 'big_vision', 'big_vision_stacked'])
def test_google_npz_layouts_give_independent_logits(tmp_path, layout):
    config = plain_testing()
    w = make_official_weights(config, img_size=32, num_classes=7, seed=3)
    if layout != 'vit_jax':  # big_vision adds no position embedding to the class token
        w['Transformer/posembed_input/pos_embedding'][:, 0] = 0
        arrays = big_vision_layout(w, config.transformer.num_layers, stacked=layout.endswith('stacked'))
    else:
        arrays = w
    np.savez(tmp_path / 'vit.npz', **arrays)
    weights = pretrained.read(tmp_path / 'vit.npz')
    assert weights.layout == layout.removesuffix('_stacked') and weights.num_heads == 2
    model = pretrained.build_model(weights, 'testing')
    images = np.random.default_rng(1).standard_normal((2, 3, 32, 32))
    expected = numpy_vit_logits(w, images, config.transformer.num_layers)
    with torch.no_grad():
        got = model(torch.from_numpy(images).float()).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_pre_logits_layer_predicts_with_its_head_and_is_dropped_for_a_fine_tune(tmp_path):
    """The 2020 in21k files put Dense + tanh before their head: prediction uses it, a fresh head does not."""
    config = plain_testing()
    w = make_official_weights(config, img_size=32, num_classes=7, seed=4, pre_logits=True)
    np.savez(tmp_path / 'vit.npz', **w)
    model = pretrained.build_model(pretrained.read(tmp_path / 'vit.npz'), 'testing')
    assert model.config.representation_size == config.hidden_size
    images = np.random.default_rng(2).standard_normal((2, 3, 32, 32))
    with torch.no_grad():
        got = model(torch.from_numpy(images).float()).double().numpy()
    np.testing.assert_allclose(got, numpy_vit_logits(w, images, config.transformer.num_layers, use_pre_logits=True),
                               rtol=1e-4, atol=1e-4)
    fine_tune = VisionTransformer(config, img_size=32, num_classes=3, zero_head=True)
    pretrained.load_pretrained(fine_tune, tmp_path / 'vit.npz')
    assert not any(key.startswith('pre_logits') for key in fine_tune.state_dict())


# ---------------------------------------------------------------------------------------------
# What does not fit: one line each


def save_timm(tmp_path, name: str, state: dict) -> str:
    path = tmp_path / f'{name}.safetensors'
    save_file({key: value.contiguous() for key, value in state.items()}, path)
    return path


@pytest.mark.parametrize('name, changes, expected', [
    ('registers', dict(reg_tokens=4), 'registers (reg_token)'),
    ('gap', dict(class_token=False, global_pool='avg'), 'global-average pooling (fc_norm)'),
    ('gap_with_cls', dict(global_pool='avg', fc_norm=True), 'global-average pooling (fc_norm)'),
    ('no_cls', dict(class_token=False, global_pool='avg', fc_norm=False), 'no class token'),
    ('map', dict(class_token=False, global_pool='map'), 'attention pooling (attn_pool)'),
    ('layer_scale', dict(init_values=0.1), 'layer scale'),
    ('patch8', dict(patch_size=8), 'patch 8x8 vs 4x4'),
    ('wide', dict(embed_dim=48, num_heads=2), 'width 48 vs 32'),
    ('deep', dict(depth=3), 'depth 3 vs 2'),
])
def test_what_this_vit_cannot_hold_is_named(tmp_path, name, changes, expected):
    path = save_timm(tmp_path, name, timm_vit(**changes).state_dict())
    message = one_line_error(lambda: pretrained.build_model(pretrained.read(path), 'testing'))
    assert expected in message and str(path) in message


def test_a_fused_qkv_of_another_shape_is_named_once_by_its_timm_name(tmp_path):
    """timm's qkv is three of this model's tensors: a misfit names the file's one tensor, once."""
    path = save_timm(tmp_path, 'qkv', {**timm_vit().state_dict(), 'blocks.1.attn.qkv.weight': torch.zeros(96, 16)})
    message = one_line_error(pretrained.load_pretrained, VisionTransformer(plain_testing(), 32, num_classes=10), path)
    assert '(1 problems): blocks.1.attn.qkv.weight: file (32, 16) vs model (32, 32)' in message, message


def test_distilled_deit_is_named(tmp_path):
    path = save_timm(tmp_path, 'deit', timm_vit(VisionTransformerDistilled).state_dict())
    message = one_line_error(pretrained.read, path)
    assert 'distillation token (dist_token' in message and str(path) in message
    assert '--model_type timm:<its timm name>' in message  # where it does load: docs/timm.md


def test_google_gap_and_map_checkpoints_are_named(tmp_path):
    arrays = big_vision_layout(make_official_weights(plain_testing(), 32, 5), 2, stacked=True)
    gap = {key: value for key, value in arrays.items() if key != 'params/cls'}
    np.savez(tmp_path / 'gap.npz', **gap)
    assert 'no class token' in one_line_error(pretrained.read, tmp_path / 'gap.npz')
    np.savez(tmp_path / 'map.npz', **gap, **{'params/MAPHead_0/probe': np.zeros((1, 1, 32), np.float32)})
    assert 'attention pooling (MAPHead_0)' in one_line_error(pretrained.read, tmp_path / 'map.npz')


def test_google_arrays_out_of_place_missing_or_of_another_shape_are_named_as_in_the_file():
    """Checked before timm's reader, which would stop at the first missing key: every one is named, in Google's
    names, stacked big_vision blocks included; arrays that disagree in shape are named by timm's message."""
    w = make_official_weights(plain_testing(), 32, 5)
    extra = {**w, 'Transformer/encoderblock_0/Extra/kernel': np.zeros((2, 2), np.float32)}
    assert 'entries Transformer/encoderblock_0/Extra/kernel have no place in it (vit_jax layout)' in \
        one_line_error(pretrained.from_google_arrays, extra)
    stacked = big_vision_layout(w, 2, stacked=True)
    del stacked['params/Transformer/encoderblock/LayerNorm_1/bias'], stacked['params/embedding/bias']
    message = one_line_error(pretrained.from_google_arrays, stacked)
    assert '(2 problems): missing params/embedding/bias; missing params/Transformer/encoderblock/LayerNorm_1/bias' \
        in message
    odd = {**w, 'Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel': np.zeros((32, 48), np.float32)}
    message = one_line_error(pretrained.from_google_arrays, odd)
    assert 'timm cannot read its arrays as one ViT' in message and '48' in message


def test_unknown_layout_names_the_layouts_accepted(tmp_path):
    torch.save({'conv1.weight': torch.zeros(8, 3, 7, 7), 'fc.weight': torch.zeros(10, 8)}, tmp_path / 'resnet.pth')
    message = one_line_error(pretrained.read, tmp_path / 'resnet.pth')
    for layout in ('Google .npz', 'big_vision', 'timm ViT state dict', 'ViT-pytorch', 'train.py checkpoint'):
        assert layout in message
    assert 'conv1.weight' in message
    np.savez(tmp_path / 'other.npz', unrelated=np.zeros(3))
    assert 'Google .npz' in one_line_error(pretrained.read, tmp_path / 'other.npz')


def test_damaged_files_and_malformed_position_embeddings(tmp_path):
    np.savez(tmp_path / 'full.npz', **make_official_weights(plain_testing(), 32, 5))
    full = (tmp_path / 'full.npz').read_bytes()
    (tmp_path / 'cut.npz').write_bytes(full[: len(full) // 2])
    (tmp_path / 'empty.npz').write_bytes(b'')
    save_file(timm_vit().state_dict(), tmp_path / 'full.safetensors')
    (tmp_path / 'cut.safetensors').write_bytes((tmp_path / 'full.safetensors').read_bytes()[:3000])
    torch.save(timm_vit().state_dict(), tmp_path / 'full.pth')
    (tmp_path / 'cut.pth').write_bytes((tmp_path / 'full.pth').read_bytes()[:5000])
    for name, words in (('cut.npz', 'interrupted download'), ('empty.npz', 'empty'),
                        ('cut.safetensors', 'interrupted download'), ('cut.pth', 'not a readable checkpoint')):
        message = one_line_error(pretrained.read, tmp_path / name)
        assert words in message and name in message
    assert 'is a folder' in one_line_error(pretrained.read, tmp_path)
    model = VisionTransformer(plain_testing(), img_size=32, num_classes=10)
    for bad in (torch.randn(1, 51, 32), torch.randn(1, 1, 65, 32), torch.randn(1, 0, 32)):
        state = {**timm_vit().state_dict(), 'pos_embed': bad}
        path = save_timm(tmp_path, f'posemb{bad.dim()}_{bad.shape[-2]}', state)
        message = one_line_error(pretrained.load_pretrained, model, path)
        assert 'position embedding' in message and str(path) in message
    w = make_official_weights(plain_testing(), 32, 5)
    w['embedding/kernel'] = w['embedding/kernel'][0]  # three dimensions, not four
    assert 'embedding/kernel of shape (4, 3, 32) is malformed' in one_line_error(pretrained.from_google_arrays, w)


# ---------------------------------------------------------------------------------------------
# Through the tools


def test_train_py_checkpoint_as_pretrained_starts_a_new_fine_tune(tmp_path, capsys):
    """Its backbone loads, the head starts at zero, the routers at their initialisation; stderr names --resume_path."""
    config = get_config('testing')
    torch.manual_seed(5)
    source = VisionTransformer(config, img_size=32, num_classes=10)
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.add_(torch.randn_like(parameter))
    path = tmp_path / 'earlier' / 'last.ckpt'
    path.parent.mkdir()
    torch.save({'state_dict': source.state_dict(), 'config': config.to_dict(), 'img_size': 32, 'num_classes': 10,
                'step': 100}, path)
    results = train.main(tiny_args(tmp_path, 'again', '--pretrained_dir', str(path), '--learning_rate', '0', steps=1))
    err = capsys.readouterr().err
    assert results['steps'] == 1 and f'--resume_path {path}' in err and 'fresh head' in err
    state = checkpoint_weights(tmp_path / 'again' / 'last.ckpt')  # lr 0: as loaded
    for key, value in source.named_parameters():
        kept = '.router.' not in key and not key.startswith('head.')
        assert torch.equal(state[key], value) == kept, key
    assert not state['head.weight'].any()


def test_train_py_reports_a_damaged_pretrained_file_in_one_line(tmp_path):
    (tmp_path / 'cut.npz').write_bytes(b'PK\x03\x04' + bytes(100))
    message = one_line_error(train.main, tiny_args(tmp_path, 'x', '--pretrained_dir', str(tmp_path / 'cut.npz')))
    assert 'cut.npz' in message and 'interrupted download' in message


def test_test_py_predicts_with_timm_weights(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location('predict_cli', ROOT / 'test.py')
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    source = timm_vit()
    save_file(source.state_dict(), tmp_path / 'vit.safetensors')
    from PIL import Image
    from utils.images import get_eval_transform
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    picture.save(tmp_path / 'noise.png')
    status = cli.main(['--ckpt', str(tmp_path / 'vit.safetensors'), '--model_type', 'testing',
                       '--image', str(tmp_path / 'noise.png'), '--json', '--topk', '3'])
    out, err = capsys.readouterr()
    assert status == 0 and err == ''
    with torch.no_grad():
        probs = source(get_eval_transform(32)(Image.open(tmp_path / 'noise.png'))[None]).softmax(-1)[0]
    result = json.loads(out)
    assert [index for index, _, _ in result['topk']] == probs.topk(3).indices.tolist()
    np.testing.assert_allclose([p for _, _, p in result['topk']], probs.topk(3).values.numpy(), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The one rule for weights: finite floating-point tensors of the expected shapes, or one line naming the tensor


@pytest.mark.parametrize('name, value, words', [
    ('blocks.1.mlp.fc2.bias', float('nan'), 'blocks.1.mlp.fc2.bias holds NaN or infinite values'),
    ('norm.weight', float('inf'), 'norm.weight holds NaN or infinite values'),
    ('blocks.0.attn.qkv.weight', torch.int64, 'blocks.0.attn.qkv.weight holds int64 values'),
    ('head.bias', torch.bool, 'head.bias holds bool values'),
])
def test_non_finite_or_non_float_timm_weights_are_named(tmp_path, name, value, words):
    state = timm_vit().state_dict()
    if isinstance(value, float):
        state[name] = state[name].clone()
        state[name].view(-1)[3] = value
    else:
        state[name] = torch.ones_like(state[name], dtype=value)
    for suffix in ('.safetensors', '.pth'):
        path = tmp_path / f'bad{suffix}'
        save_file(state, path) if suffix == '.safetensors' else torch.save({'model': state}, path)
        message = one_line_error(pretrained.read, path)
        assert words in message and str(path) in message


def test_own_layout_non_finite_weights_are_named(tmp_path):
    model = VisionTransformer(get_config('testing'), img_size=32, num_classes=10)
    state = model.state_dict()
    state['transformer.encoder.layer.1.attn.router.mlp.2.bias'][0] = float('-inf')
    torch.save(state, tmp_path / 'own.pth')
    assert 'layer.1.attn.router.mlp.2.bias holds NaN or infinite' in one_line_error(pretrained.read,
                                                                                     tmp_path / 'own.pth')


@pytest.mark.parametrize('value, words', [(np.array(['a', 'b']), '<U1 values'), (np.array([b'ab']), '|S2 values'),
                                          (np.arange(4), 'int64 values'), (np.ones(3, dtype=bool), 'bool values')])
def test_npz_arrays_that_are_not_floats_are_named(tmp_path, value, words):
    w = make_official_weights(plain_testing(), 32, 5)
    w['Transformer/encoderblock_1/LayerNorm_2/bias'] = value
    np.savez(tmp_path / 'bad.npz', **w)
    message = one_line_error(pretrained.read, tmp_path / 'bad.npz')
    assert 'Transformer/encoderblock_1/LayerNorm_2/bias holds' in message and words in message
    w['Transformer/encoderblock_1/LayerNorm_2/bias'] = np.full(32, np.nan, dtype=np.float32)
    np.savez(tmp_path / 'nan.npz', **w)
    assert 'LayerNorm_2/bias holds NaN' in one_line_error(pretrained.read, tmp_path / 'nan.npz')


def test_integer_keys_in_a_pth_are_named(tmp_path):
    torch.save({**timm_vit().state_dict(), 7: torch.zeros(2)}, tmp_path / 'odd.pth')
    assert 'entry 7 is named by a int' in one_line_error(pretrained.read, tmp_path / 'odd.pth')


def test_a_one_dimensional_position_embedding_is_named(tmp_path):
    state = {**timm_vit().state_dict(), 'pos_embed': torch.randn(65 * 32)}
    path = tmp_path / 'flat.safetensors'
    save_file(state, path)
    weights = pretrained.read(path)
    for call in (lambda: pretrained.build_model(weights, 'testing'),
                 lambda: pretrained.load_pretrained(VisionTransformer(plain_testing(), 32, num_classes=10), weights)):
        message = one_line_error(call)
        assert 'position embedding of shape (2080,)' in message and str(path) in message
