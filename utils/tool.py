"""The one-line exit of the scripts in scripts/: `<tool>: error: <what>` on stderr, status 1; Ctrl-C, status 130.

The scripts raise ValueError (bad arguments or files, one line each) and let OSError through (a full disk);
`run` prints either as one line naming the script that failed, never a traceback.
"""
import argparse
import sys
from typing import Callable, NoReturn

from model.config import parse_orders

from utils.images import UnreadableImage
from utils.errors import one_line
from utils.files import describe

EXPECTED = (ValueError, FileNotFoundError, UnreadableImage, OSError)


def message(error: BaseException) -> str:
    """The error's one line; an OSError's with its path and reason ('No space left on device')."""
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ''
        return f"{where}{describe(error)}"
    return one_line(error, limit=None)


def run(main: Callable[[list[str] | None], object], tool: str, argv: list[str] | None = None) -> NoReturn:
    """Run `main(argv)` and exit: 0, or one line naming `tool` (1 for an error, 130 for Ctrl-C)."""
    try:
        main(argv)
    except EXPECTED as error:
        print(f"{tool}: error: {message(error)}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.unraisablehook = lambda unraisable: None  # loader workers torn down quietly
        print(f"{tool}: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(0)


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, positive: tuple[str, ...]) -> None:
    """Refuse, one line each before any work, a `positive` flag below 1 and `--orders` that do not parse."""
    for flag in positive:
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} {value}: expected a positive integer")
    if args.orders is not None:
        try:
            parse_orders(args.orders)
        except ValueError as error:
            parser.error(f"--orders {args.orders}: {one_line(error)}")
