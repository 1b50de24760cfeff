"""Checkpoints: atomic writes, the saver of a run's best and last, RNG state capture, and the checks on resume.

A checkpoint is a plain dict that loads with `torch.load(path, weights_only=True)`.
"""
import io
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from utils import dist_util
from utils.errors import INTERRUPTED, RunError, interrupts_deferred, one_line
from model.pretrained import check_weights
from model.reading import read_checkpoint as read  # noqa: F401 (utils.checkpoint.read)
from utils.files import describe, write_atomic

# What resuming needs of a checkpoint written by train.py (a hand-edited one may lack some).
RESUME_KEYS = ('state_dict', 'optimizer', 'scheduler', 'rng', 'step', 'model_type', 'img_size', 'num_classes',
               'config')


class _WriteErrors(io.RawIOBase):
    """A file that remembers why a write failed: torch.save reports any failed write as `unexpected pos`."""

    def __init__(self, file):
        super().__init__()
        self.file, self.error = file, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise


def save_atomic(state: dict, path: Path) -> None:
    """Write through a temporary file of this process, flushed and renamed (utils.files.write_atomic): a kill,
    a power cut or a full disk mid-write leaves the old file whole and no partial file behind. A failed write
    raises its OSError (`No space left on device`), not torch's `unexpected pos`."""
    def write(tmp: Path) -> None:
        with open(tmp, 'wb') as file:
            recorder = _WriteErrors(file)
            try:
                torch.save(state, recorder)
            except RuntimeError:
                if recorder.error is not None:
                    raise recorder.error from None
                raise
    write_atomic(path, write)


def load(path: str | Path, required: tuple[str, ...] = ('state_dict',)) -> dict:
    """A checkpoint written by train.py that has the `required` keys, with a one-line error for anything else."""
    checkpoint = read(path)
    if 'state_dict' not in checkpoint:
        raise ValueError(f"{path} is not a checkpoint of this repository (no 'state_dict')")
    missing = [key for key in required if key not in checkpoint]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: expected a last.ckpt written by train.py")
    if 'config' in required:
        check_config(path, checkpoint)
    if 'step' in required:  # a run continues from it: hand-edited values would train on, or fail mid-run
        step = checkpoint['step']
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"{path}: its 'step' is {step!r}; expected the non-negative integer train.py writes")
        if not isinstance(checkpoint['state_dict'], dict):
            raise ValueError(f"{path}: its 'state_dict' is a {type(checkpoint['state_dict']).__name__}; "
                             "expected the dict of tensors train.py writes")
        check_weights(path, checkpoint['state_dict'])  # the one rule for weights: finite floating point
    return checkpoint


def check_config(path: str | Path, checkpoint: dict) -> None:
    """A train.py checkpoint's 'config' is the dict train.py writes; a hand-edited one is named in one line."""
    if not isinstance(checkpoint.get('config'), dict):
        raise ValueError(f"{path}: its 'config' is a {type(checkpoint.get('config')).__name__}; "
                         "expected the dict train.py writes")


def rng_state() -> dict:
    """This process's random states (torch CPU and CUDA, numpy, python) in weights_only-loadable types."""
    _, keys, position, has_gauss, cached = np.random.get_state()
    return {
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        'numpy': [torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        'python': random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    keys, position, has_gauss, cached = state['numpy']
    np.random.set_state(('MT19937', keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))


# Config fields that choose how the model computes, not what it is: a run may resume with another value.
HOW_NOT_WHAT = frozenset({'config.transformer.attention'})


def check_compatible(checkpoint: dict, expected: dict) -> None:
    """Raise a one-line error naming every field where a checkpoint's model differs from this run's.

    Nested dicts (the config) are compared field by field: `config.transformer.orders: [0, 1] vs [0, 1, 2]`.
    """
    differences = [f"{key}: checkpoint {theirs!r} vs run {ours!r}"
                   for key, theirs, ours in _differences(checkpoint, expected) if key not in HOW_NOT_WHAT]
    if differences:
        raise ValueError("checkpoint is from another model: " + '; '.join(differences))


def _differences(theirs: dict, ours: dict, prefix: str = ''):
    """(dotted key, their value, our value) for every key of `ours` whose value differs."""
    for key, value in ours.items():
        other = theirs.get(key) if isinstance(theirs, dict) else None
        if isinstance(value, dict) and isinstance(other, dict):
            yield from _differences(other, value, f'{prefix}{key}.')
        elif other != value:
            yield f'{prefix}{key}', other, value


class CheckpointSaver:
    """A run's checkpoints: best.ckpt and last.ckpt in its folder, and the last good state it can continue from.

    `save` writes best.ckpt (when accuracy improved) before last.ckpt, so that a kill between the two writes
    cannot leave a last.ckpt whose best_acc no best.ckpt on disk has. A Ctrl-C during a save stops the run once
    the write is recorded, so the message names that checkpoint. Only the main process writes; every process
    learns of a failed write and stops with the same message.
    """

    def __init__(self, folder: Path, main_process: bool, resumed_from: str | Path | None = None,
                 resumed_step: int = 0):
        self.folder = Path(folder)
        self.main_process = main_process
        self.last_good = (str(resumed_from), resumed_step) if resumed_from is not None else None  # (path, step)

    def where_to_continue(self) -> str:
        """Where a run that stops can be continued from, for its error message."""
        if self.last_good is None:
            return "no checkpoint was written yet"
        path, step = self.last_good
        return f"{path} holds the last good state (step {step}): continue with --resume_path"

    def save(self, build: Callable[[], dict], step: int, improved: bool) -> None:
        """Write the checkpoint `build()` returns (a collective: every process calls it) as the state at `step`."""
        with interrupts_deferred():
            checkpoint = build()
            failed = None
            if self.main_process:
                for name in ('best.ckpt', 'last.ckpt') if improved else ('last.ckpt',):
                    try:
                        save_atomic(checkpoint, self.folder / name)
                    except (OSError, RuntimeError) as error:  # torch.save reports some failures as RuntimeError
                        reason = describe(error) if isinstance(error, OSError) else one_line(error)
                        failed = RunError(f"cannot write {self.folder / name}: {reason}; {self.where_to_continue()}")
                        break
            dist_util.raise_first_error(failed)  # also the barrier: every process stops when the write failed
            self.last_good = (str(self.folder / 'last.ckpt'), step)

    def interrupted(self, step: int) -> RunError:
        """The one-line error of a run that Ctrl-C stopped at `step`, naming where it can be continued from."""
        return RunError(f"interrupted at step {step}; {self.where_to_continue()}", code=INTERRUPTED)
