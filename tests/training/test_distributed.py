"""Real multi-process training with torchrun and gloo: the number of processes does not change the model."""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from train_helpers import run_train, tiny_args, weights


def torchrun(processes: int) -> list[str]:
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={processes}']


def test_processes_times_accumulation_give_the_same_model(tmp_path):
    common = ['--augment', 'none', '--set', 'transformer.dropout_rate=0.0', '--eval_batch_size', '50',
              '--max_grad_norm', '0']  # clipping would hide a wrongly scaled gradient
    layouts = {'p1x4': (1, 4), 'p2x2': (2, 2), 'p4x1': (4, 1)}
    results = {}
    for name, (processes, accumulation) in layouts.items():
        args = tiny_args(tmp_path, name, *common, '--gradient_accumulation_steps', str(accumulation), steps=4)
        result = run_train(args, launcher=torchrun(processes) if processes > 1 else None)
        assert result.returncode == 0, result.stderr[-3000:]
        results[name] = json.loads(result.stdout.strip().splitlines()[-1])
        assert results[name]['world_size'] == processes
    reference = weights(tmp_path / 'p1x4' / 'last.ckpt')
    for name in ('p2x2', 'p4x1'):
        other = weights(tmp_path / name / 'last.ckpt')
        for key, value in reference.items():
            torch.testing.assert_close(other[key], value, rtol=1e-5, atol=1e-6, msg=f'{name}: {key}')
        # Every validation image counted once whatever the number of processes.
        assert results[name]['final_acc'] == pytest.approx(results['p1x4']['final_acc'], abs=1e-9)


def test_every_image_is_counted_once_when_processes_do_not_divide_it(tmp_path):
    """7 validation images on 2 processes: 7 counted (padding with duplicates would count 8); the 8 unreadable
    training files skipped are counted over both processes (3 on the first, 5 on the second)."""
    rng = np.random.default_rng(0)
    for split, count in (('train', 8), ('val', 7)):
        for index in range(count):
            folder = tmp_path / 'data' / split / f'class{index % 2}'
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f'{index}.png')
            if split == 'train':
                (folder / f'broken{index}.png').write_bytes(b'not a picture')
    args = tiny_args(tmp_path, 'odd', '--dataset', 'imagenet', '--data_dir', str(tmp_path / 'data'),
                     '--eval_batch_size', '2', '--skip_corrupt', steps=1, batch=16)
    result = run_train(args, launcher=torchrun(2))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary['val_images'] == 7 and summary['world_size'] == 2
    assert summary['skipped_images'] == 8
    assert (summary['final_acc'] * 7) == pytest.approx(round(summary['final_acc'] * 7))
