"""What the scripts in scripts/ share: the errors that end them in one line, and the check of their arguments.

The scripts raise ValueError (bad arguments or files, one line each) and let OSError through (a full disk);
they end through utils.errors.command_line (with `EXPECTED`), as every tool does: one line naming the script.
"""
import argparse

from model.config import parse_orders

from utils.data_utils import UnreadableImage
from utils.errors import one_line

EXPECTED = (ValueError, FileNotFoundError, UnreadableImage, OSError)  # the scripts' errors that end in one line


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
