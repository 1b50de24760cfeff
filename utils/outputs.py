"""The one rule for every file a tool writes (summaries, pictures, tables), checked before the long work.

A tool writes only where it may: never over one of its inputs, a checkpoint or weights file, a folder or
a device, and over an existing file only when a tool of this project wrote it (each writes a mark into its
files: a PNG/PDF/SVG's creator field, a JSON key, a markdown comment). Every check runs before the model
is loaded or the data read, so that an unwritable place fails first, in one line (ValueError). Writes are
atomic (utils.files.write_atomic): a full disk leaves the old file whole.
"""
import json
import math
from pathlib import Path
from typing import Any, Collection

from utils.files import describe, ensure_writable, write_atomic

MARK = 'written by TRAR-ViT'  # in every file a tool of this project writes
FIGURE_FORMATS = ('.png', '.pdf', '.svg')  # the formats whose files carry the mark
WEIGHTS_SUFFIXES = ('.ckpt', '.pth', '.pt', '.bin', '.npz', '.safetensors')
_MARK_BYTES = MARK.encode()
_READ_LIMIT = 64 << 20  # a file this project wrote is smaller; a larger one is not read to look for the mark


def mark(tool: str) -> str:
    """The mark `tool` leaves in its files: 'written by TRAR-ViT eval.py'."""
    return f'{MARK} {tool}'


def is_ours(path: Path) -> bool:
    """Whether a tool of this project wrote the file at `path` (it carries the mark)."""
    try:
        if path.stat().st_size > _READ_LIMIT:
            return False
        return _MARK_BYTES in path.read_bytes()
    except OSError:
        return False


def check_output(path: str | Path, flag: str, suffixes: Collection[str], inputs: Collection[str | Path] = (),
                 create: bool = True) -> Path:
    """`path` if a tool may write it, else a one-line ValueError naming `flag` and what was expected.

    Refused: another suffix than `suffixes`, a checkpoint or weights name, a folder or special file, one of
    `inputs`, an existing file no tool of this project wrote, a place that cannot be written. `create`:
    create the missing folders (the writability probe needs them).
    """
    path = Path(path)
    what = f"{flag} {path}"
    if path.suffix.lower() in WEIGHTS_SUFFIXES:
        raise ValueError(f"{what}: a checkpoint or weights file is never written over; "
                         f"expected a name ending in {_listed(suffixes)}")
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{what}: expected a file name ending in {_listed(suffixes)}")
    for folder in path.parents:
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{what}: {folder} is a file, not a folder")
    if path.is_dir():
        raise ValueError(f"{what} is a folder: expected a file name")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise ValueError(f"{what} is not a regular file (a device, pipe or dangling link): expected a file name")
        for source in inputs:
            if Path(source).exists() and path.resolve() == Path(source).resolve():
                raise ValueError(f"{what} is an input of this run ({source}): it is never written over")
        if not is_ours(path):
            raise ValueError(f"{what} exists and was not written by this project's tools: it is never written "
                             "over; remove it or choose another name")
    if create:
        try:
            ensure_writable(path.parent)
        except OSError as error:
            raise ValueError(f"{what}: cannot write in {path.parent}: {describe(error)}") from None
    return path


def _listed(suffixes: Collection[str]) -> str:
    items = sorted(suffixes)
    return items[0] if len(items) == 1 else ', '.join(items[:-1]) + ' or ' + items[-1]


def check_figure(path: str | Path, flag: str, inputs: Collection[str | Path] = ()) -> Path:
    """`check_output` for a picture (.png, .pdf or .svg)."""
    return check_output(path, flag, FIGURE_FORMATS, inputs)


def save_figure(fig, path: Path, tool: str, **savefig_kwargs) -> None:
    """Save a matplotlib figure atomically, with the tool's mark in its creator field."""
    key = 'Software' if path.suffix.lower() == '.png' else 'Creator'
    metadata = {key: mark(tool)}
    write_atomic(path, lambda tmp: fig.savefig(tmp, metadata=metadata, **savefig_kwargs))


def finite_or_none(value: Any) -> Any:
    """`value` with every NaN or infinity inside it replaced by None (JSON's null): JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def json_text(value: Any, tool: str, indent: int | None = 2) -> str:
    """`value` (a dict) as strict JSON with the tool's mark as its 'written_by' key."""
    return json.dumps({**finite_or_none(value), 'written_by': mark(tool)}, indent=indent, allow_nan=False) + '\n'


def write_text(path: Path, text: str) -> None:
    """Write `text` atomically (the caller has checked `path` with `check_output`)."""
    write_atomic(path, lambda tmp: tmp.write_text(text))
