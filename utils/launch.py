"""torchrun that reports a failed run as one line: `python -m utils.launch [torchrun flags] train.py [flags]`.

Plain torchrun shows a failed process's error once per process, under the launcher's own traceback. Under
this launcher each process of train.py leaves its one-line message in torchrun's error file and prints
nothing (utils.errors.exit_with); when the run fails or is interrupted, the launcher prints the first
process's message once, as the last line, and exits with that process's status. A crash without such a
message keeps the traceback its process printed, and gets a last line saying which process failed.
"""
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from utils.errors import INTERRUPTED, LAUNCHED_ENV, ONE_LINE_MARK, error_line


def first_message(log_dir: Path, script: str) -> tuple[str, int] | None:
    """The one line (`<tool>: error: ...`) and exit status left by the first process to stop (earliest, then
    lowest rank); for an interrupt, which reaches every process at once, the lowest rank's. `script` names the
    tool when a process left no name."""
    found = []
    for path in log_dir.rglob('error.json'):  # <log_dir>/<run id>/attempt_<n>/<local rank>/error.json
        try:
            info = json.loads(path.read_text())['message']
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(info, dict) and info.get('extraInfo', {}).get(ONE_LINE_MARK):
            extra = info['extraInfo']
            status = int(extra.get('exitcode', 1))
            when = 0 if status == INTERRUPTED else int(extra.get('timestamp', 0))
            rank = int(path.parent.name) if path.parent.name.isdigit() else 0
            found.append((when, rank, error_line(info['message'], extra.get('tool') or script), status))
    if not found:
        return None
    _, _, message, status = min(found)
    return message, status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    script = Path(args.training_script).name
    own_log_dir = args.log_dir is None
    if own_log_dir:  # where the processes' error files go, to be read here
        args.log_dir = tempfile.mkdtemp(prefix='trar-launch-')
    os.environ[LAUNCHED_ENV] = '1'  # inherited by the processes: they leave their message to the launcher
    for name in list(logging.root.manager.loggerDict):  # the agent's notes on stopping the other processes
        if name.startswith('torch.distributed.elastic'):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(args)
        return 0
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        fallback = (error_line(f"process {rank} failed with exit status {failure.exitcode}; its output is above",
                               script), failure.exitcode if failure.exitcode > 0 else 1)
    except (KeyboardInterrupt, SignalException):
        fallback = (error_line("interrupted", script), INTERRUPTED)
    finally:
        reported = first_message(Path(args.log_dir), script)
        if own_log_dir:
            shutil.rmtree(args.log_dir, ignore_errors=True)
    line, status = reported or fallback
    print(line, file=sys.stderr, flush=True)
    return status


if __name__ == '__main__':
    sys.exit(main())
