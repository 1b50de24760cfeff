"""Runs that survive preemption: `--resume auto` continues the run's own last.ckpt, and under
`torchrun --max-restarts` a killed worker restarts and the run ends bit for bit where an uninterrupted one ends."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from train_helpers import ROOT, run_train, tiny_args, weights

ONE_THREAD = {**os.environ, 'OMP_NUM_THREADS': '1'}


def test_resume_auto_starts_afresh_then_continues_its_own_last_checkpoint(tmp_path, capsys):
    first = train.main(tiny_args(tmp_path, 'run', '--resume', 'auto', steps=3))
    assert first['steps'] == 3
    assert 'no ' + str(tmp_path / 'run' / 'last.ckpt') + ' yet, starting afresh' in capsys.readouterr().err
    # The same command again: the run is found and continued, not refused or replaced.
    again = train.main(tiny_args(tmp_path, 'run', '--resume', 'auto', steps=3))
    assert f"--resume auto: continuing {tmp_path / 'run' / 'last.ckpt'} from step 3" in capsys.readouterr().err
    assert again['steps'] == 3 and again['best_acc'] == first['best_acc']
    # Other trajectory settings make it another run: refused with one line, kept.
    before = (tmp_path / 'run' / 'last.ckpt').read_bytes()
    with pytest.raises(ValueError, match=r"--resume auto: .*last\.ckpt was trained with other settings "
                                         r"\(--seed 42 -> 7\): expected the same settings"):
        train.main(tiny_args(tmp_path, 'run', '--resume', 'auto', '--seed', '7', steps=3))
    assert (tmp_path / 'run' / 'last.ckpt').read_bytes() == before
    with pytest.raises(SystemExit):
        train.get_args(tiny_args(tmp_path, 'run', '--resume', 'auto', '--resume_path', 'x.ckpt'))


def worker_of_rank(launcher_pid: int, rank: int) -> int | None:
    """The process id of torchrun's worker of `rank` (a child of the launcher with RANK=rank), if running."""
    for entry in Path('/proc').iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / 'stat').read_text().rpartition(')')[2].split()[1])
            environ = (entry / 'environ').read_bytes().split(b'\0')
        except (OSError, ValueError, IndexError):
            continue
        if parent == launcher_pid and f'RANK={rank}'.encode() in environ:
            return int(entry.name)
    return None


def test_a_killed_worker_restarts_under_torchrun_and_the_run_ends_as_an_uninterrupted_one(tmp_path):
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    steps = 24

    def args(name: str) -> list[str]:
        return tiny_args(tmp_path, name, '--resume', 'auto', '--eval_every', '3', steps=steps)

    whole = run_train(args('whole'), launcher=torchrun, env=ONE_THREAD)
    assert whole.returncode == 0, whole.stderr[-3000:]

    launched = subprocess.Popen([*torchrun, '--max-restarts', '1', 'train.py', *args('killed')], cwd=ROOT,
                                env=ONE_THREAD, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    checkpoint = tmp_path / 'killed' / 'last.ckpt'
    deadline = time.time() + 240
    while not checkpoint.exists() and launched.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim = worker_of_rank(launched.pid, 1)
    assert victim is not None, 'rank 1 must still run after the first checkpoint'
    os.kill(victim, signal.SIGKILL)
    stdout, stderr = launched.communicate(timeout=300)
    assert launched.returncode == 0, stderr[:6000]
    continued = [line for line in stderr.splitlines() if line.startswith('--resume auto: continuing')]
    assert len(continued) == 1, stderr[-3000:]  # the restarted run continued, it did not start again
    killed_at = int(continued[0].rsplit(' ', 1)[1])
    assert 0 < killed_at < steps
    assert json.loads(stdout.strip().splitlines()[-1])['steps'] == steps
    final, expected = weights(checkpoint), weights(tmp_path / 'whole' / 'last.ckpt')
    for key, value in expected.items():
        assert torch.equal(final[key], value), key
