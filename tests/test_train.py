"""train.py end to end on the digits set: outputs, checkpoints, mixed precision, launchers and bad input."""
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from model.config import get_config
from train_helpers import ROOT, run_train, tiny_args


def test_a_run_writes_checkpoints_results_and_tensorboard(tmp_path, capsys):
    results = train.main(tiny_args(tmp_path, 'run', '--augment', 'none'))
    run_dir = tmp_path / 'run'
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line) == results == json.loads((run_dir / 'results.json').read_text())
    for key in ('best_acc', 'final_acc', 'steps', 'seconds', 'peak_memory_mib'):
        assert key in results
    assert results['steps'] == 6 and 0 <= results['final_acc'] <= results['best_acc'] <= 1
    assert results['peak_memory_mib'] > 0

    checkpoint = torch.load(run_dir / 'last.ckpt', map_location='cpu', weights_only=True)
    assert checkpoint['step'] == 6 and checkpoint['best_acc'] == results['best_acc']
    for key in ('optimizer', 'scheduler', 'rng', 'epoch', 'epoch_step', 'config', 'args', 'class_names'):
        assert key in checkpoint
    assert checkpoint['class_names'] == [str(i) for i in range(10)]
    assert (run_dir / 'best.ckpt').is_file()
    assert not list(run_dir.glob('.*.tmp'))

    # The saved weights are the model that scored final_acc: evaluate them independently.
    from model.modeling import VisionTransformer
    import ml_collections
    from utils.data_utils import digits_split, get_eval_transform
    model = VisionTransformer(ml_collections.ConfigDict(checkpoint['config']), img_size=32, num_classes=10).eval()
    model.load_state_dict(checkpoint['state_dict'])
    images, labels = digits_split('val')
    transform = get_eval_transform(32)
    batch = torch.stack([transform(Image.fromarray(x, mode='L')) for x in images])
    with torch.no_grad():
        accuracy = (model(batch).argmax(-1).numpy() == labels).mean()
    assert accuracy == pytest.approx(results['final_acc'])

    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()['scalars'])
    assert {'train/loss', 'train/lr', 'val/accuracy', 'train/images_per_second', 'train/peak_memory_mib'} <= tags
    assert {'routing/layer00_order0', 'routing/layer01_order1'} <= tags


def test_hard_routing_anneals_tau(tmp_path):
    train.main(tiny_args(tmp_path, 'hard', '--set', 'transformer.routing=hard', '--tau_policy', 'fast',
                         '--orders', '0,1,2'))
    events = EventAccumulator(str(tmp_path / 'hard'))
    events.Reload()
    taus = [event.value for event in events.Scalars('train/tau')]
    assert taus and taus[-1] == pytest.approx(0.1)
    assert 'routing/layer01_order2' in events.Tags()['scalars']


@pytest.mark.parametrize('flags', [
    ['--fp16', '--amp_dtype', 'bf16'],
    ['--fp16', '--fp16_opt_level', 'O1', '--loss_scale', '128'],
    ['--fp16', '--fp16_opt_level', 'O3', '--amp_dtype', 'bf16'],
    ['--fp16', '--fp16_opt_level', 'O0'],
])
def test_mixed_precision_levels_train(tmp_path, flags):
    results = train.main(tiny_args(tmp_path, 'amp', *flags, steps=3))
    assert results['steps'] == 3 and np.isfinite(results['final_acc'])
    state = torch.load(tmp_path / 'amp' / 'last.ckpt', weights_only=True)
    if '--loss_scale' in flags:
        assert state['scaler']['scale'] == 128.0
    expected = torch.bfloat16 if 'O3' in flags else torch.float32
    assert state['state_dict']['head.weight'].dtype == expected


def test_orders_and_set_override_the_config(tmp_path):
    args = train.get_args(tiny_args(tmp_path, 'x', '--orders', 'none', '--set', 'transformer.dropout_rate=0.0',
                                    '--set', 'hidden_size=48', '--set', 'transformer.pooling=fc'))
    config = train.build_config(args)
    assert config.transformer.orders == [] and config.transformer.dropout_rate == 0.0
    assert config.hidden_size == 48 and config.transformer.pooling == 'fc'
    assert train.build_config(train.get_args(tiny_args(tmp_path, 'x', '--orders', '0,2'))).transformer.orders == [0, 2]
    assert get_config('testing').hidden_size == 32


@pytest.mark.parametrize('extra, message', [
    (['--set', 'transformer.heads=3'], 'no such config field'),
    (['--set', 'hidden_size=wide'], 'hidden_size=wide'),
    (['--orders', '0,one'], "orders '0,one': expected comma-separated integers"),
    (['--gradient_accumulation_steps', '3'], 'not divisible by 1 processes x 3'),
    (['--orders', '0,8'], 'order 8'),
])
def test_bad_settings_fail_with_one_clear_line(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        train.main(tiny_args(tmp_path, 'bad', *extra))


def test_missing_inputs_name_what_and_where(tmp_path):
    result = run_train(tiny_args(tmp_path, 'x', '--pretrained_dir', str(tmp_path / 'ViT-B_16.npz')))
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert 'https://storage.googleapis.com/vit_models/imagenet21k/testing.npz' in result.stderr
    with pytest.raises(FileNotFoundError, match='train/<class>'):
        train.main(tiny_args(tmp_path, 'x', '--dataset', 'imagenet', '--data_dir', str(tmp_path / 'nowhere')))
    with pytest.raises(SystemExit):
        train.get_args(tiny_args(tmp_path, 'x', '--loss_scale', '3'))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match=r'at step \d+'):
        train.main(tiny_args(tmp_path, 'nan', '--learning_rate', '1e30', '--max_grad_norm', '0',
                             '--eval_every', '1', '--warmup_steps', '0', steps=20))
    checkpoint = torch.load(tmp_path / 'nan' / 'last.ckpt', weights_only=True)
    assert checkpoint['step'] >= 1
    assert all(torch.isfinite(t).all() for t in checkpoint['state_dict'].values() if t.is_floating_point())


def test_resuming_with_another_model_is_refused(tmp_path):
    train.main(tiny_args(tmp_path, 'a', steps=3))
    with pytest.raises(ValueError, match='another model.*config'):
        train.main(tiny_args(tmp_path, 'b', '--orders', '0,1,2', '--resume_path', str(tmp_path / 'a' / 'last.ckpt')))
    (tmp_path / 'junk.ckpt').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='not a readable checkpoint'):
        train.main(tiny_args(tmp_path, 'c', '--resume_path', str(tmp_path / 'junk.ckpt')))


def test_corrupt_images_stop_the_run_or_are_skipped(tmp_path):
    data = tmp_path / 'data'
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        for name in ('a', 'b'):
            folder = data / split / name
            folder.mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f'{i}.jpg')
    good = (data / 'train' / 'a' / '0.jpg').read_bytes()
    (data / 'train' / 'b' / 'truncated.jpg').write_bytes(good[:len(good) // 3])
    args = tiny_args(tmp_path, 'folder', '--dataset', 'imagenet', '--data_dir', str(data), '--num_workers', '1',
                     steps=2, batch=17)
    result = run_train(args)
    assert result.returncode != 0 and 'truncated.jpg' in result.stderr.strip().splitlines()[-1]
    result = run_train(args + ['--skip_corrupt'])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])['skipped_images'] >= 1


def test_train_sh_runs_on_a_machine_without_gpus(tmp_path):
    env = {**os.environ, 'DATASET': 'digits', 'MODEL_TYPE': 'testing', 'IMG_SIZE': '32', 'NAME': 'sh',
           'TRAIN_BATCH_SIZE': '16', 'EVAL_BATCH_SIZE': '90', 'NUM_STEPS': '2', 'WARMUP_STEPS': '1',
           'PRETRAINED_DIR': 'none', 'GPUS': '0', 'CUDA_VISIBLE_DEVICES': ''}
    for script, extra in (('train.sh', []), ('train_fp16.sh', ['--amp_dtype', 'bf16'])):
        result = subprocess.run(['bash', script, '--output_dir', str(tmp_path), '--num_workers', '0', *extra],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout.strip().splitlines()[-1])['steps'] == 2
    args = json.loads(json.dumps(torch.load(tmp_path / 'sh' / 'last.ckpt', weights_only=True)['args']))
    assert args['fp16'] and args['fp16_opt_level'] == 'O2' and args['img_size'] == 32
