"""A run killed with SIGKILL after a checkpoint and resumed ends bit for bit where an uninterrupted run ends."""
import os
import subprocess
import sys
import time

import torch

from train_helpers import ROOT, run_train, tiny_args, weights

STEPS = 32  # 22 steps an epoch: the resumed run crosses an epoch boundary
ONE_THREAD = {**os.environ, 'OMP_NUM_THREADS': '1'}  # both runs alike, and side by side on two cores


def test_sigkill_then_resume_is_bit_exact(tmp_path):
    # Default augmentation (random crops and flips) and dropout stay on; the workers differ between runs.
    whole_log = tmp_path / 'whole.log'
    with open(whole_log, 'w') as log:
        whole = subprocess.Popen([sys.executable, 'train.py', *tiny_args(tmp_path, 'whole', '--eval_every', '7',
                                                                         steps=STEPS, batch=64)],
                                 cwd=ROOT, env=ONE_THREAD, stdout=log, stderr=subprocess.STDOUT)
    args = tiny_args(tmp_path, 'killed', '--eval_every', '7', '--num_workers', '2', steps=STEPS, batch=64)
    killed = subprocess.Popen([sys.executable, 'train.py', *args], cwd=ROOT, env=ONE_THREAD,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / 'killed' / 'last.ckpt'
    deadline = time.time() + 240
    while not checkpoint.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed.kill()
    killed.wait()
    killed_at = torch.load(checkpoint, weights_only=True)['step']
    assert 0 < killed_at < STEPS, 'the run must be killed mid-way'

    resumed = run_train(args + ['--resume_path', str(checkpoint)], env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    evaluated = [int(line.split(':')[0].split()[-1]) for line in resumed.stdout.splitlines() if 'validation' in line]
    assert evaluated[0] == killed_at + 7 and evaluated[-1] == STEPS  # it went on, it did not start again
    assert whole.wait(timeout=300) == 0, whole_log.read_text()[-2000:]
    final, expected = weights(checkpoint), weights(tmp_path / 'whole' / 'last.ckpt')
    assert torch.load(checkpoint, weights_only=True)['step'] == STEPS
    for key, value in expected.items():
        assert torch.equal(final[key], value), key
