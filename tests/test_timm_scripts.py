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

import eval as evaluate_cli
from train_helpers import ROOT
from utils.data_utils import load_split

_spec = importlib.util.spec_from_file_location('predict_cli', ROOT / 'test.py')
predict_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(predict_cli)

NAME = 'deit_tiny_patch16_224'  # ImageNet mean/std, bicubic, crop_pct 0.875: not this repository's defaults


@pytest.fixture(scope='module')
def timm_file(tmp_path_factory):
    """A timm DeiT-tiny with random weights and a 10-class head, saved as .safetensors, and the model itself."""
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
    assert routed['orders'] == [0, 1] and routing.shape == (12, 2)
    np.testing.assert_allclose(routing.sum(-1), 1, atol=1e-6)


def test_test_py_predicts_with_timms_preprocessing_and_draws_the_routing(timm_file, tmp_path, capsys):
    path, source = timm_file
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
    assert routed['orders'] == [0, 1] and len(routed['routing']) == 12 and plot.stat().st_size > 0
