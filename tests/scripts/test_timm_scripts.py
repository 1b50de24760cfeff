"""The scripts with timm models (`--model_type timm:<name>`): eval.py and test.py against timm itself."""
import importlib.util
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config
from timm.models import register_model
from timm.models.deit import _create_deit

import eval as evaluate_cli
from hub_cache import offline_hub
from train_helpers import ROOT
from utils.data_utils import load_split

_spec = importlib.util.spec_from_file_location('predict_cli', ROOT / 'test.py')
predict_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(predict_cli)

NAME = 'trar_test_deit'


@register_model
def trar_test_deit(pretrained: bool = False, **kwargs):
    """A two-block DeiT of width 32 with DeiT-tiny's pretrained config: ImageNet mean/std, bicubic, crop_pct 0.875
    (not this repository's defaults)."""
    return _create_deit('deit_tiny_patch16_224', pretrained,
                        **{**dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0), **kwargs})


@pytest.fixture(scope='module')
def timm_file(tmp_path_factory):
    """The two-block DeiT with random weights and a 10-class head, saved as .safetensors, and the model itself."""
    torch.manual_seed(0)
    model = timm.create_model(NAME, num_classes=10, img_size=32).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    path = tmp_path_factory.mktemp('timm') / 'deit.safetensors'
    save_file(model.state_dict(), path)
    return path, model


def timm_transform(model):
    config = resolve_data_config({}, model=model)
    assert config['mean'] != (0.5, 0.5, 0.5) and config['interpolation'] == 'bicubic'
    return create_transform(**{**config, 'input_size': (3, 32, 32)}, is_training=False)


def test_eval_py_gives_timms_accuracy_and_routing(timm_file, tmp_path):
    path, source = timm_file
    args = ['--ckpt', str(path), '--model_type', f'timm:{NAME}', '--dataset', 'digits', '--img_size', '32',
            '--num_workers', '0', '--device', 'cpu', '--batch_size', '128']
    plain = evaluate_cli.main([*args, '--orders', 'none', '--output_json', str(tmp_path / 'plain.json')])
    images = load_split('digits', '', False)
    transform = timm_transform(source)
    x = torch.stack([transform(images.load(i)[0].convert('RGB')) for i in range(len(images))])
    labels = torch.tensor([images.load(i)[1] for i in range(len(images))])
    with torch.no_grad():
        logits = source(x)
    assert plain['images'] == len(images) and plain['layout'] == 'timm'
    assert plain['top1'] == pytest.approx((logits.argmax(-1) == labels).double().mean().item(), abs=1e-12)
    assert plain['loss'] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    routed = evaluate_cli.main([*args, '--orders', '0,1', '--output_json', str(tmp_path / 'routed.json')])
    routing = np.array(routed['routing'])
    assert routed['orders'] == [0, 1] and routing.shape == (2, 2)
    np.testing.assert_allclose(routing.sum(-1), 1, atol=1e-6)


HUB_ID = 'hf-hub:someone/tiny-deit'


@pytest.mark.parametrize('where', ['file', 'hub id'])
def test_test_py_predicts_with_timms_preprocessing_and_draws_the_routing(timm_file, tmp_path, capsys, monkeypatch,
                                                                         where):
    """--ckpt a local file, or a hub id read from an HF_HOME cache with HF_HUB_OFFLINE=1."""
    path, source = timm_file
    if where == 'hub id':
        offline_hub(tmp_path / 'hf', monkeypatch, {HUB_ID.removeprefix('hf-hub:'): path})
        path = HUB_ID
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    picture.save(tmp_path / 'noise.png')
    common = ['--ckpt', str(path), '--model_type', f'timm:{NAME}', '--img_size', '32', '--num_classes', '10',
              '--image', str(tmp_path / 'noise.png'), '--json', '--topk', '3']
    assert predict_cli.main([*common, '--orders', 'none']) == 0
    result = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        probs = source(timm_transform(source)(Image.open(tmp_path / 'noise.png').convert('RGB'))[None]).softmax(-1)[0]
    assert [index for index, _, _ in result['topk']] == probs.topk(3).indices.tolist()
    np.testing.assert_allclose([p for _, _, p in result['topk']], probs.topk(3).values.numpy(), atol=1e-5)
    plot = tmp_path / 'routing.png'
    assert predict_cli.main([*common, '--orders', '0,1', '--routing_plot', str(plot)]) == 0
    routed = json.loads(capsys.readouterr().out)
    assert routed['orders'] == [0, 1] and len(routed['routing']) == 2 and plot.stat().st_size > 0


def test_a_tiny_timm_vit_trains_resumes_bit_exactly_evaluates_and_predicts(timm_file, tmp_path, monkeypatch,
                                                                          capsys):
    """train.py fine-tunes a timm DeiT-tiny file routed over [0, 1]; stopped after its first checkpoint and resumed,
    it ends with the uninterrupted run's weights; eval.py and test.py read its checkpoint."""
    import train
    from train_helpers import tiny_args
    from utils import checkpoint as checkpoints
    path, _ = timm_file
    timm_args = ['--model_type', f'timm:{NAME}', '--pretrained_dir', str(path), '--orders', '0,1',
                 '--set', 'transformer.routing=hard']
    whole = train.main(tiny_args(tmp_path, 'whole', *timm_args, steps=6))
    assert whole['steps'] == 6
    save, saves = checkpoints.save_atomic, []

    def stop_after_the_first_checkpoint(state, target):
        save(state, target)
        saves.append(target.name)
        if saves.count('last.ckpt') == 1 and target.name == 'last.ckpt':
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, 'save_atomic', stop_after_the_first_checkpoint)
    with pytest.raises(BaseException):
        train.main(tiny_args(tmp_path, 'stopped', *timm_args, steps=6))
    monkeypatch.setattr(checkpoints, 'save_atomic', save)
    last = tmp_path / 'stopped' / 'last.ckpt'
    assert torch.load(last, weights_only=True)['step'] == 3
    train.main(tiny_args(tmp_path, 'stopped', *timm_args, '--resume_path', str(last), steps=6))
    final = torch.load(last, weights_only=True)
    expected = torch.load(tmp_path / 'whole' / 'last.ckpt', weights_only=True)['state_dict']
    assert final['step'] == 6 and final['config']['timm_name'] == NAME
    assert any('.attn.router.' in key for key in expected)
    for key, value in expected.items():
        assert torch.equal(final['state_dict'][key], value), key
    capsys.readouterr()
    summary = evaluate_cli.main(['--ckpt', str(last), '--dataset', 'digits', '--num_workers', '0', '--device', 'cpu',
                                 '--output_json', str(tmp_path / 'eval.json')])
    assert summary['images'] == 360 and summary['orders'] == [0, 1] and len(summary['routing']) == 2
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    picture.save(tmp_path / 'noise.png')
    capsys.readouterr()
    assert predict_cli.main(['--ckpt', str(last), '--image', str(tmp_path / 'noise.png'), '--json',
                             '--routing_plot', str(tmp_path / 'routing.png')]) == 0
    assert json.loads(capsys.readouterr().out)['orders'] == [0, 1] and (tmp_path / 'routing.png').exists()


def test_train_py_starts_from_a_hub_id_as_from_its_file(timm_file, tmp_path, monkeypatch):
    """--pretrained_dir hf-hub:<repo>, read from an HF_HOME cache with HF_HUB_OFFLINE=1, starts the fine-tune the
    file itself starts: after two steps the weights are the same, bit for bit."""
    import train
    from train_helpers import tiny_args, weights
    path, _ = timm_file
    offline_hub(tmp_path / 'hf', monkeypatch, {HUB_ID.removeprefix('hf-hub:'): path})
    runs = {}
    for name, start in (('file', str(path)), ('hub', HUB_ID)):
        train.main(tiny_args(tmp_path, name, '--model_type', f'timm:{NAME}', '--pretrained_dir', start,
                             '--orders', '0,1', steps=2))
        runs[name] = weights(tmp_path / name / 'last.ckpt')
    assert runs['hub'].keys() == runs['file'].keys()
    for key, value in runs['file'].items():
        assert torch.equal(runs['hub'][key], value), key


def test_training_preprocessing_follows_the_timm_models_config():
    """train.py's transforms for a timm model: DeiT's ImageNet mean/std, for the augmented and the plain view."""
    from model.timm_trar import data_config
    from utils.images import Preprocess, get_train_transform
    config = data_config(f'timm:{NAME}')
    gray = Image.new('RGB', (40, 40), (128, 128, 128))
    expected = (128 / 255 - torch.tensor(config['mean'])) / torch.tensor(config['std'])
    for augment in ('crop', 'none'):
        x = get_train_transform(32, augment, Preprocess.from_timm(config))(gray)
        assert x.shape == (3, 32, 32)
        torch.testing.assert_close(x.mean(dim=(1, 2)), expected.float(), atol=1e-4, rtol=0)
