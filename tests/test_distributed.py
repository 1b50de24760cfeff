"""Real multi-process training with torchrun and gloo: the number of processes does not change the model."""
import json
import sys

import pytest
import torch

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
