"""Checkpoints: atomic writes, RNG state capture, and the config check on resume.

A checkpoint is a plain dict that loads with `torch.load(path, weights_only=True)`.
"""
import os
import random
from pathlib import Path

import numpy as np
import torch

from utils.errors import one_line


def save_atomic(state: dict, path: Path) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename: a kill or a power cut
    mid-write leaves the old file whole. The folder is flushed too, so that the rename itself lasts."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp')
    torch.save(state, tmp)
    with open(tmp, 'rb') as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if hasattr(os, 'O_DIRECTORY'):  # POSIX; Windows cannot open a folder to flush it
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def read(path: str | Path) -> dict:
    """The dict a checkpoint file holds (loaded weights-only, on the CPU), with a one-line error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # torch raises many types for a file that is not a checkpoint
        raise ValueError(f"{path} is not a readable checkpoint: {one_line(error)}") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def load(path: str | Path) -> dict:
    """A checkpoint written by train.py, with a one-line error for anything else."""
    checkpoint = read(path)
    if 'state_dict' not in checkpoint:
        raise ValueError(f"{path} is not a checkpoint of this repository (no 'state_dict')")
    return checkpoint


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


def check_compatible(checkpoint: dict, expected: dict) -> None:
    """Raise a one-line error naming every field where a checkpoint's model differs from this run's.

    Nested dicts (the config) are compared field by field: `config.transformer.orders: [0, 1] vs [0, 1, 2]`.
    """
    differences = [f"{key}: checkpoint {theirs!r} vs run {ours!r}"
                   for key, theirs, ours in _differences(checkpoint, expected)]
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
