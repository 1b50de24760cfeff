"""eval.py: a checkpoint evaluated without training gives what training reported, once per image under torchrun."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

from pathlib import Path

import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train
from model.modeling import VisionTransformer
from train_helpers import ROOT, edited_checkpoint, tiny_args
from utils.data_utils import digits_split
from utils.images import get_eval_transform

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
    written = json.loads((tmp_path / 'eval.json').read_text())
    assert written.pop('written_by') == 'written by TRAR-ViT eval.py' and written == summary
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
    del summary['written_by']
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


# ---------------------------------------------------------------------------------------------
# The summary file: checked before the evaluation, never an input or another checkpoint's summary


def run_eval(argv, cwd=ROOT, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / 'eval.py'), *map(str, argv)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize('target, expected', [
    ('ckpt', r'--output_json .*last\.ckpt: a checkpoint or weights file is never written over'),
    ('image', r'--output_json .*digit\.png: expected a file name ending in \.json$'),
    ('mine', r'--output_json .*mine\.json exists and was not written by this project'),
    ('/dev/full', r'--output_json /dev/full: expected a file name ending in \.json'),
    ('/proc/eval.json', r'--output_json /proc/eval\.json: cannot write in /proc'),
])
def test_an_output_it_may_not_write_is_refused_before_the_evaluation(trained, tmp_path, monkeypatch, target,
                                                                     expected):
    _, ckpt = trained
    (tmp_path / 'digit.png').write_bytes(b'an input image')
    (tmp_path / 'mine.json').write_text('{"my": "notes"}')
    kept = {path: path.read_bytes() for path in (ckpt, tmp_path / 'digit.png', tmp_path / 'mine.json')}
    out = {'ckpt': ckpt, 'image': tmp_path / 'digit.png', 'mine': tmp_path / 'mine.json'}.get(target, target)
    monkeypatch.setattr(eval_cli, 'evaluate', lambda *a: pytest.fail('evaluated before checking the output'))
    with pytest.raises(ValueError, match=expected):
        eval_cli.main(eval_args(ckpt, out))
    assert {path: path.read_bytes() for path in kept} == kept


def test_the_default_summary_is_per_checkpoint_and_never_replaces_another(trained, tmp_path):
    _, ckpt = trained
    copies = []
    for run in ('run_a', 'run_b'):
        (tmp_path / run).mkdir()
        copies.append(tmp_path / run / 'best.ckpt')
        copies[-1].write_bytes(ckpt.read_bytes())
    args = [eval_cli.get_args(['--ckpt', str(c), '--dataset', 'digits']) for c in copies]
    paths = [eval_cli.output_path(a) for a in args]
    assert paths == [Path('output/eval/run_a_best-digits.json'), Path('output/eval/run_b_best-digits.json')]
    summary = tmp_path / 'summary.json'
    eval_cli.main(eval_args(copies[0], summary))
    eval_cli.main(eval_args(copies[0], summary))  # the same checkpoint's summary again: replaced
    with pytest.raises(ValueError, match=r'holds the summary of another checkpoint \(.*run_a/best\.ckpt\)'):
        eval_cli.main(eval_args(copies[1], summary))
    assert json.loads(summary.read_text())['checkpoint'] == str(copies[0])


def test_a_failed_write_prints_the_result_first(trained, tmp_path, monkeypatch, capsys):
    _, ckpt = trained

    def full_disk(path, text):
        raise OSError(28, 'No space left on device', str(path))

    monkeypatch.setattr(eval_cli.outputs, 'write_text', full_disk)
    capsys.readouterr()
    with pytest.raises(ValueError, match=r'cannot write --output_json .*: No space left on device \(the summary is '
                                         r'printed above\)'):
        eval_cli.main(eval_args(ckpt, tmp_path / 'eval.json'))
    assert json.loads(capsys.readouterr().out)['images'] == 360


def test_a_nan_loss_is_written_as_json_null(trained, tmp_path, monkeypatch, capsys):
    _, ckpt = trained
    real = eval_cli.evaluate

    def nan_loss(*args):
        result = real(*args)
        result.loss = float('nan')
        return result

    monkeypatch.setattr(eval_cli, 'evaluate', nan_loss)
    summary = eval_cli.main(eval_args(ckpt, tmp_path / 'eval.json'))
    text = (tmp_path / 'eval.json').read_text()
    assert summary['loss'] is None and json.loads(text)['loss'] is None and 'NaN' not in text
    assert 'warning: the mean loss is not finite' in capsys.readouterr().err


@pytest.mark.parametrize('edit, expected', [
    (lambda c: c.update(config='ViT-B_16'), r"its 'config' is a str; expected the dict train\.py writes"),
    (lambda c: c.update(class_names=c['class_names'][:3]), r'it names 3 classes but its head has 10'),
    (lambda c: c.update(class_names='0123456789'), r"its 'class_names' is a str \('0123456789'\); expected a list"),
    (lambda c: c['state_dict']['head.weight'].fill_(float('nan')),
     r'head\.weight holds NaN or infinite values; expected finite weights'),
])
def test_hand_edited_and_non_finite_checkpoints_are_one_line(trained, tmp_path, edit, expected):
    _, ckpt = trained
    with pytest.raises(ValueError, match=expected):
        eval_cli.main(eval_args(edited_checkpoint(ckpt, tmp_path, edit), tmp_path / 'x.json'))
    assert not (tmp_path / 'x.json').exists()


def test_a_one_dimensional_npz_is_one_line(tmp_path):
    arrays = {'embedding/kernel': np.zeros(48, np.float32), 'cls': np.zeros(32, np.float32),
              'Transformer/posembed_input/pos_embedding': np.zeros(65, np.float32),
              'head/kernel': np.zeros(10, np.float32), 'head/bias': np.zeros(10, np.float32)}
    np.savez(tmp_path / 'flat.npz', **arrays)
    with pytest.raises(ValueError, match=r'flat\.npz: .*(malformed|cannot build a model)'):
        eval_cli.main(eval_args(tmp_path / 'flat.npz', tmp_path / 'x.json', '--model_type', 'testing'))


@pytest.mark.parametrize('workers', [0, 2])
def test_ctrl_c_is_one_line_and_status_130(trained, tmp_path, workers):
    _, ckpt = trained
    # 128 px (1025 tokens) one image a batch: seconds of evaluation after the line that says it starts
    process = subprocess.Popen([sys.executable, 'eval.py', *eval_args(ckpt, tmp_path / 'x.json', '--batch_size', '1',
                                                                      '--img_size', '128', '--num_workers',
                                                                      str(workers))],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    started = process.stderr.readline()
    assert started.startswith('eval.py: evaluating'), started
    time.sleep(1)  # the loader (and its workers) running
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130 and err.strip().splitlines() == [
        'eval.py: error: interrupted (Ctrl-C): nothing was written'], \
        (process.returncode, err[-2000:])
    assert out == '' and not (tmp_path / 'x.json').exists()


def test_the_fd_sharing_threads_report_of_a_dead_loader_worker_is_dropped_others_print(capsys):
    """multiprocessing's resource_sharer thread reports through sys.excepthook when a loader worker killed by the
    same Ctrl-C dies mid-handshake: the tools' exit drops that report, not any other."""
    from utils.errors import _quiet_fd_sharing
    scope = {}
    exec(compile("def _serve():\n    raise EOFError('peer gone')\n", 'multiprocessing/resource_sharer.py', 'exec'),
         scope)
    for raising, printed in ((scope['_serve'], False), (lambda: int('x'), True)):
        try:
            raising()
        except Exception:
            _quiet_fd_sharing(*sys.exc_info())
        assert ('Traceback' in capsys.readouterr().err) == printed
