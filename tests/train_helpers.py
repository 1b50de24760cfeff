"""Shared pieces of the training tests: tiny runs of train.py on the digits set."""
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def tiny_args(out_dir: Path, name: str, *extra: str, steps: int = 6, batch: int = 16) -> list[str]:
    """train.py arguments for a few steps of the `testing` model on 32-px digits, from scratch, on the CPU.

    The warm-up takes 2 steps, or all steps but the last of a shorter run.
    """
    return ['--name', name, '--dataset', 'digits', '--model_type', 'testing', '--img_size', '32',
            '--pretrained_dir', 'none', '--output_dir', str(out_dir), '--train_batch_size', str(batch),
            '--eval_batch_size', '64', '--num_steps', str(steps), '--eval_every', '3',
            '--warmup_steps', str(min(2, steps - 1)),
            '--learning_rate', '0.1', '--num_workers', '0', '--device', 'cpu', *extra]


def run_train(args: list[str], launcher: list[str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run train.py in a fresh interpreter (or under `launcher`, e.g. torchrun) from the repo root."""
    command = (launcher or [sys.executable]) + ['train.py', *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, **kwargs)


def weights(checkpoint_path: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint_path, map_location='cpu', weights_only=True)['state_dict']
