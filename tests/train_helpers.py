"""Shared pieces of the training tests: tiny runs of train.py on the digits set."""
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
ONE_THREAD = {**os.environ, 'OMP_NUM_THREADS': '1'}  # runs side by side on two cores, alike


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


def killed_and_resumed(out_dir: Path, whole_args: list[str], killed_args: list[str], steps: int
                       ) -> tuple[subprocess.CompletedProcess, int, Path, Path]:
    """Train `whole_args` uninterrupted in the background while `killed_args` runs until its first checkpoint,
    is killed with SIGKILL and resumed from it. Returns the resumed run, the step it was killed at, and the
    killed-and-resumed and the uninterrupted runs' final last.ckpt."""
    whole_log = out_dir / 'whole.log'
    with open(whole_log, 'w') as log:
        whole = subprocess.Popen([sys.executable, 'train.py', *whole_args], cwd=ROOT, env=ONE_THREAD, stdout=log,
                                 stderr=subprocess.STDOUT)
    killed = subprocess.Popen([sys.executable, 'train.py', *killed_args], cwd=ROOT, env=ONE_THREAD,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out_dir / killed_args[killed_args.index('--name') + 1] / 'last.ckpt'
    deadline = time.time() + 240
    while not checkpoint.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed.kill()
    killed.wait()
    killed_at = torch.load(checkpoint, weights_only=True)['step']
    assert 0 < killed_at < steps, 'the run must be killed mid-way'
    resumed = run_train(killed_args + ['--resume_path', str(checkpoint)], env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert whole.wait(timeout=300) == 0, whole_log.read_text()[-2000:]
    return resumed, killed_at, checkpoint, out_dir / whole_args[whole_args.index('--name') + 1] / 'last.ckpt'


def edited_checkpoint(source: Path, folder: Path, edit) -> Path:
    """A hand-edited copy of a checkpoint: `edit` changes the loaded dict in place; saved as folder/edited.ckpt."""
    checkpoint = torch.load(source, map_location='cpu', weights_only=True)
    edit(checkpoint)
    path = folder / 'edited.ckpt'
    torch.save(checkpoint, path)
    return path
