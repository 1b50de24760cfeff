"""A run killed with SIGKILL after a checkpoint and resumed ends bit for bit where an uninterrupted run ends."""
import subprocess
import sys
import time

import torch

from train_helpers import ROOT, run_train, tiny_args, weights

STEPS = 40


def test_sigkill_then_resume_is_bit_exact(tmp_path):
    # Default augmentation (random crops and flips) and dropout stay on; the workers differ between runs.
    reference = run_train(tiny_args(tmp_path, 'whole', '--eval_every', '7', steps=STEPS, batch=64))  # 22 steps an epoch
    assert reference.returncode == 0, reference.stderr[-2000:]

    args = tiny_args(tmp_path, 'killed', '--eval_every', '7', '--num_workers', '2', steps=STEPS, batch=64)
    process = subprocess.Popen([sys.executable, 'train.py', *args], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / 'killed' / 'last.ckpt'
    deadline = time.time() + 240
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.kill()
    process.wait()
    killed_at = torch.load(checkpoint, weights_only=True)['step']
    assert 0 < killed_at < STEPS, 'the run must be killed mid-way'

    resumed = run_train(args + ['--resume_path', str(checkpoint)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final, expected = weights(checkpoint), weights(tmp_path / 'whole' / 'last.ckpt')
    assert torch.load(checkpoint, weights_only=True)['step'] == STEPS
    for key, value in expected.items():
        assert torch.equal(final[key], value), key
