"""eval.py: a checkpoint evaluated without training gives what training reported, once per image under torchrun."""
import importlib.util
import json
import subprocess
import sys

import ml_collections
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train
from model.modeling import VisionTransformer
from train_helpers import ROOT, tiny_args
from utils.data_utils import digits_split, get_eval_transform

_spec = importlib.util.spec_from_file_location('eval_cli', ROOT / 'eval.py')
eval_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eval_cli)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A short routed training run on digits: (its results, its last.ckpt)."""
    out = tmp_path_factory.mktemp('runs')
    results = train.main(tiny_args(out, 'run', '--augment', 'none', steps=3))
    return results, out / 'run' / 'last.ckpt'


def independent_measures(ckpt) -> dict:
    """Top-1, top-5, mean loss and mean routing weights over the digits validation set, in one batch."""
    checkpoint = torch.load(ckpt, map_location='cpu', weights_only=True)
    model = VisionTransformer(ml_collections.ConfigDict(checkpoint['config']), img_size=32, num_classes=10).eval()
    model.load_state_dict(checkpoint['state_dict'])
    images, labels = digits_split('val')
    transform = get_eval_transform(32)
    batch = torch.stack([transform(Image.fromarray(x, mode='L')) for x in images])
    labels = torch.from_numpy(labels).long()
    with torch.no_grad():
        logits = model(batch)
    return {'images': len(labels), 'top1': (logits.argmax(-1) == labels).double().mean().item(),
            'top5': (logits.topk(5).indices == labels[:, None]).any(-1).double().mean().item(),
            'loss': F.cross_entropy(logits.double(), labels).item(),
            'routing': model.routing_weights().double().mean(dim=1).tolist()}


def eval_args(ckpt, out_json, *extra) -> list[str]:
    return ['--ckpt', str(ckpt), '--dataset', 'digits', '--batch_size', '50', '--num_workers', '0',
            '--device', 'cpu', '--output_json', str(out_json), *extra]


def test_eval_gives_the_accuracy_training_reported(trained, tmp_path, capsys):
    results, ckpt = trained
    capsys.readouterr()
    summary = eval_cli.main(eval_args(ckpt, tmp_path / 'eval.json'))
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and json.loads(printed[0]) == summary
    assert json.loads((tmp_path / 'eval.json').read_text()) == summary
    assert summary['top1'] == pytest.approx(results['final_acc'], abs=1e-12)
    assert summary['images'] == results['val_images']
    expected = independent_measures(ckpt)
    assert summary['images'] == expected['images'] and summary['layout'] == 'train.py'
    assert summary['top1'] == pytest.approx(expected['top1'], abs=1e-12)
    assert summary['top5'] == pytest.approx(expected['top5'], abs=1e-12) and summary['top5'] >= summary['top1']
    assert summary['loss'] == pytest.approx(expected['loss'], rel=1e-5)
    assert summary['orders'] == [0, 1] and len(summary['routing']) == 2
    torch.testing.assert_close(torch.tensor(summary['routing']), torch.tensor(expected['routing']),
                               rtol=1e-5, atol=1e-6)


def test_torchrun_counts_every_image_once(trained, tmp_path):
    _, ckpt = trained
    alone = eval_cli.main(eval_args(ckpt, tmp_path / 'one.json'))
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    done = subprocess.run(launcher + ['eval.py', *eval_args(ckpt, tmp_path / 'two.json', '--batch_size', '7')],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / 'two.json').read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1]) == summary  # printed once, by the first process
    assert summary['world_size'] == 2 and summary['images'] == alone['images']
    for key in ('top1', 'top5'):
        assert summary[key] == pytest.approx(alone[key], abs=1e-12)
    assert summary['loss'] == pytest.approx(alone['loss'], rel=1e-5)
    torch.testing.assert_close(torch.tensor(summary['routing']), torch.tensor(alone['routing']), rtol=1e-5, atol=1e-6)


def test_a_head_of_other_classes_is_one_line(trained, tmp_path):
    _, ckpt = trained
    folder = tmp_path / 'data' / 'val'
    for name in ('a', 'b', 'c'):
        (folder / name).mkdir(parents=True)
        Image.new('RGB', (8, 8)).save(folder / name / 'x.png')
    with pytest.raises(ValueError, match=r'classifies 10 classes; imagenet has 3$'):
        eval_cli.main(eval_args(ckpt, tmp_path / 'x.json', '--dataset', 'imagenet', '--data_dir',
                                str(tmp_path / 'data')))
