"""Reading files safely, with one-line errors: the pieces the model's loaders and the tools share.

`one_line` (an error's message as one line), `check_file` (a path that can be read as a file) and
`read_checkpoint` (a torch file loaded weights-only, so no pickle runs). `model/` imports nothing from `utils/`;
`utils/` takes these from here. torch is imported on first read: `utils.errors` takes `one_line` from here before
the tools import torch (a Ctrl-C during that import still ends in one line).
"""
import pickle
from pathlib import Path


def one_line(error: BaseException, limit: int | None = 300) -> str:
    """An error's message as one line, cut at `limit` characters (some list hundreds of keys; None: never).

    That is its first line, except for an error re-raised from a DataLoader worker, whose message is
    the worker's traceback: then the original error's message, which the traceback ends with.
    """
    text = str(error).strip() or type(error).__name__
    if '\nOriginal Traceback' in text:
        last = text.splitlines()[-1]  # "module.ErrorType: message"
        text = last.partition(': ')[2] or last
    text = text.splitlines()[0]
    return text if limit is None or len(text) <= limit else text[:limit] + ' ...'


def check_file(path: Path, what: str, expected: str) -> None:
    """One-line errors for a `what` path that is a folder, missing, a special file or empty (an interrupted
    download)."""
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder: expected {expected}")
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if not path.is_file():  # a FIFO or device would block the reader
        raise ValueError(f"{what} {path} is not a regular file: expected {expected}")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} {path} is empty (0 bytes): expected {expected}; an interrupted download?")


def _unpickling_cause(error: Exception) -> str:
    """Why torch's weights-only loader refused a file: its message's paragraph naming the refused object."""
    paragraphs = [part.strip() for part in str(error).split('\n\n') if part.strip()]
    cause = next((part for part in paragraphs[1:] if 'GLOBAL' in part or 'WeightsUnpickler' in part),
                 paragraphs[1] if len(paragraphs) > 1 else one_line(error))
    return ' '.join(cause.split())


def read_checkpoint(path: str | Path) -> dict:
    """The dict a checkpoint file holds (loaded weights-only, on the CPU), with a one-line error for anything else."""
    import torch
    path = Path(path)
    check_file(path, 'checkpoint', 'a checkpoint file written by train.py, e.g. last.ckpt')
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as error:
        if 'weights only' not in str(error).lower():
            raise ValueError(f"{path} is not a readable checkpoint: {one_line(error)}") from None
        raise ValueError(f"{path} is not a readable checkpoint: it holds objects that only arbitrary code could "
                         f"load, which is never done: {_unpickling_cause(error)}") from None
    except Exception as error:  # torch raises many types for a file that is not a checkpoint
        raise ValueError(f"{path} is not a readable checkpoint: {one_line(error)}") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint
