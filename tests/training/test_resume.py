"""A run killed with SIGKILL after a checkpoint and resumed ends bit for bit where an uninterrupted run ends."""
import torch

from train_helpers import killed_and_resumed, tiny_args, weights

STEPS = 32  # 22 steps an epoch: the resumed run crosses an epoch boundary


def test_sigkill_then_resume_is_bit_exact(tmp_path):
    # Default augmentation (random crops and flips) and dropout stay on; the workers differ between runs.
    args = tiny_args(tmp_path, 'killed', '--eval_every', '7', '--num_workers', '2', steps=STEPS, batch=64)
    resumed, killed_at, checkpoint, whole = killed_and_resumed(
        tmp_path, tiny_args(tmp_path, 'whole', '--eval_every', '7', steps=STEPS, batch=64), args, STEPS)
    evaluated = [int(line.split(':')[0].split()[-1]) for line in resumed.stdout.splitlines() if 'validation' in line]
    assert evaluated[0] == killed_at + 7 and evaluated[-1] == STEPS  # it went on, it did not start again
    final, expected = weights(checkpoint), weights(whole)
    assert torch.load(checkpoint, weights_only=True)['step'] == STEPS
    for key, value in expected.items():
        assert torch.equal(final[key], value), key
