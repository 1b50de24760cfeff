"""What the scripts in scripts/ share: the errors that end them in one line, and the check of their arguments.

The scripts raise ValueError (bad arguments or files, one line each) and let OSError through (a full disk);
they end through utils.errors.command_line (with `EXPECTED`), as every tool does: one line naming the script.
"""
import argparse
import math
import os

from model.config import parse_orders

from utils.images import UnreadableImage
from utils.errors import one_line

EXPECTED = (ValueError, FileNotFoundError, UnreadableImage, OSError)  # the scripts' errors that end in one line


def check_finite(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a number flag given as nan or inf: argparse's float() takes them, and a range check (`x < 0`) lets
    NaN through, since every comparison with it is false."""
    for flag, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            parser.error(f"--{flag} {value}: expected a finite number")


def check_folder_name(parser: argparse.ArgumentParser, flag: str, name: str) -> None:
    """Refuse a `flag` that should name one folder but is empty, '.', '..' or holds a path separator (a run
    named '../x' would be written outside its output folder, where the checks of that folder do not look)."""
    if name in ('', '.', '..') or os.sep in name or (os.altsep and os.altsep in name) or '\0' in name:
        parser.error(f"--{flag} {name!r}: expected a folder name (no '/', not '.' or '..')")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, positive: tuple[str, ...]) -> None:
    """Refuse, one line each before any work, a `positive` flag below 1, a number flag that is not finite and
    `--orders` that do not parse."""
    check_finite(parser, args)
    for flag in positive:
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} {value}: expected a positive integer")
    if args.orders is not None:
        try:
            parse_orders(args.orders)
        except ValueError as error:
            parser.error(f"--orders {args.orders}: {one_line(error)}")
