"""How the command-line tools end: one line `<tool>: error: ...` on stderr, once per run, and Ctrl-C the same way.

- `command_line(main, tool)` runs a tool's `main` and turns an expected failure into that one line and an exit
  status; every tool ends through it (train.py, eval.py, test.py, scripts/*.py, benchmarks/*.py).
- `INTERRUPTS` is train.py's Ctrl-C handling while it trains (see `Interrupts`).
- Under torchrun, `exit_with` leaves the line in torchrun's error file, where utils/launch.py finds it, and a
  process that only lost a peer (the peer reports the cause) exits quietly.
"""
import contextlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from typing import Callable, NoReturn

from model.reading import one_line  # the tools' one-line messages
from utils.files import describe


class RunError(Exception):
    """An expected failure (bad input, a full disk, an interrupt): one line on stderr and exit status `code`."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


INTERRUPTED = 130  # the exit status of a process stopped by Ctrl-C (128 + SIGINT)


class Interrupts:
    """Ctrl-C (SIGINT) while a run trains, so that the stopping run can still say where its state is.

    Python's own handling raises KeyboardInterrupt wherever the main thread happens to be. A run needs more:
    - only the first Ctrl-C counts: later ones (a second press, torchrun passing the signal on) are ignored;
    - one that comes while a checkpoint is written is held until the write is recorded (`deferred`);
    - one whose KeyboardInterrupt Python swallowed (raised in a `__del__`, or in an `os.fork` callback as a
      DataLoader starts its workers) is raised again at the next step (`raise_if_lost`);
    - forked DataLoader workers ignore it: the run stops them.
    One instance, `INTERRUPTS`, serves the process (a signal handler is process-wide).
    """

    def __init__(self):
        self.received = False  # a Ctrl-C came since `install`
        self._deferring = False  # inside `deferred`
        self._pending = False  # a Ctrl-C came inside `deferred`
        self._owner = os.getpid()

    def install(self):
        """Handle SIGINT as described above, from now on; returns the previous handler."""
        self.received, self._pending, self._owner = False, False, os.getpid()
        return signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._owner:  # a forked DataLoader worker
            return
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.received = True
        _hide_ignored_interrupts()
        if self._deferring:
            self._pending = True
            return
        raise KeyboardInterrupt

    def raise_if_lost(self) -> None:
        """Raise KeyboardInterrupt if a Ctrl-C came but its KeyboardInterrupt was swallowed. Call it where an
        interrupt that propagated would already have left (after each training step)."""
        if self.received:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self):
        """A Ctrl-C inside the block raises KeyboardInterrupt at its end, not in the middle."""
        self._deferring = True
        try:
            yield
        finally:  # a block that fails leaves no interrupt pending for the next one
            self._deferring = False
            pending, self._pending = self._pending, False
        if pending:
            raise KeyboardInterrupt


def _hide_ignored_interrupts() -> None:
    """A KeyboardInterrupt that Python ignores (in a `__del__`) is raised again by `raise_if_lost`: not shown."""
    previous = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None if unraisable.exc_type is KeyboardInterrupt else previous(unraisable)


INTERRUPTS = Interrupts()
# The names train.py and the tests use.
stop_at_first_interrupt = INTERRUPTS.install
raise_lost_interrupt = INTERRUPTS.raise_if_lost
interrupts_deferred = INTERRUPTS.deferred


LAUNCHED_ENV = 'TRAR_ONE_LINE_LAUNCHER'  # set by utils/launch.py, which prints the first failed process's line
ONE_LINE_MARK = 'one_line'  # marks an error file written by `exit_with`


def tool_name() -> str:
    """The running tool's name as its line starts: the script's file name (`train.py`)."""
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] not in ('', '-c', '-m') else 'python'


def error_line(message: str, tool: str | None = None) -> str:
    """The one line a tool ends with: `train.py: error: <message>`."""
    return f"{tool or tool_name()}: error: {message}"


def exit_with(message: str, code: int = 1, tool: str | None = None) -> NoReturn:
    """End this process with `<tool>: error: message` on stderr and exit status `code`.

    A process started by torchrun leaves the message in its error file too, where the launcher finds it:
    utils/launch.py (train.sh) prints the first process's, once, as the last line. Under plain torchrun the
    first process of the attempt to fail prints its line (once for the run, `_first_to_report`); torchrun then
    prints its own ChildFailedError report, whose `traceback :` fields carry the same message.
    """
    tool = tool or tool_name()
    error_file = os.environ.get('TORCHELASTIC_ERROR_FILE')
    if error_file:
        with open(error_file, 'w') as file:
            info = {'timestamp': str(int(time.time())), 'exitcode': code, ONE_LINE_MARK: True, 'tool': tool}
            json.dump({'message': {'message': message, 'extraInfo': info}}, file)
    if not error_file or (not os.environ.get(LAUNCHED_ENV) and _first_to_report(error_file)):
        print(error_line(message, tool), file=sys.stderr, flush=True)
    _exit_quietly(code)


def _first_to_report(error_file: str) -> bool:
    """Whether this process is the first of its torchrun attempt to report an error: torchrun gives each
    process `<attempt folder>/<local rank>/error.json`; the first to create the attempt folder's mark prints.
    An error file set some other way: rank 0 speaks for the run."""
    rank_folder = os.path.dirname(error_file)
    attempt = os.path.dirname(rank_folder)
    if not (os.path.basename(rank_folder).isdigit() and os.path.basename(attempt).startswith('attempt_')):
        return os.environ.get('RANK', '0') == '0'
    try:
        os.close(os.open(os.path.join(attempt, '.trar-reported'), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False
    except OSError:  # an attempt folder that cannot be marked
        return os.environ.get('RANK', '0') == '0'


def _exit_quietly(code: int) -> NoReturn:
    """Exit; what the failure left half-built is torn down without a word: a DataLoader iterator that Ctrl-C
    interrupted in its constructor would print an "Exception ignored" traceback."""
    sys.unraisablehook = lambda unraisable: None
    _ignore_late_interrupts()
    sys.exit(code)


_starting_handler = None  # `starting`'s SIGINT handler, which `command_line` takes back


def _ignore_late_interrupts() -> None:
    """A tool that has ended (its result or its line said) ignores Ctrl-C while Python exits: the second or so of
    tearing down torch and loader workers, where a Python handler would print a traceback, and where Python, late
    in its exit, restores the default action, which killed the process without a word. In-process callers of
    `command_line` (tests) never ran `starting` and keep their handler."""
    if _starting_handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def starting(interrupted: str = 'interrupted') -> None:
    """Call first in a tool, before its slow imports (torch): until `command_line` runs `main`, Ctrl-C ends the
    process at once with the line `interrupted` (a KeyboardInterrupt would print a traceback), and so does an
    OSError the imports raise, which is the machine's, not a bug (torch finds no writable temporary folder
    under a file-size limit or a read-only /tmp)."""
    global _starting_handler
    _starting_handler = lambda signum, frame: exit_with(interrupted, INTERRUPTED)  # noqa: E731
    signal.signal(signal.SIGINT, _starting_handler)
    sys.excepthook = _failed_to_start


def _failed_to_start(exc_type: type, error: BaseException, tb) -> None:
    if issubclass(exc_type, OSError):
        print(error_line(f"cannot start: {message(error)}"), file=sys.stderr, flush=True)
        return
    sys.__excepthook__(exc_type, error, tb)


def lost_a_peer(error: BaseException) -> bool:
    """Whether `error` is a collective failing because another process of the run stopped first (gloo's
    "Connection closed by peer", NCCL's abort): that process reports the cause, this one has nothing to add."""
    distributed = sys.modules.get('torch.distributed')
    if distributed is None or not distributed.is_available() or not distributed.is_initialized():
        return False
    if isinstance(error, getattr(distributed, 'DistError', ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        mark in text for mark in ('Connection closed by peer', 'Connection reset by peer', 'gloo', 'NCCL'))


def _quiet_fd_sharing(exc_type: type, error: BaseException, tb) -> None:
    """`sys.excepthook`, minus what multiprocessing's fd-sharing thread reports (through this hook) when a loader
    worker it was serving dies mid-handshake: Ctrl-C reaches the workers too, and the tool reports the interrupt
    itself. Anything else prints as usual."""
    if any(frame.filename.endswith('resource_sharer.py') for frame in traceback.extract_tb(tb)):
        return
    sys.__excepthook__(exc_type, error, tb)


def message(error: BaseException) -> str:
    """An expected error's one line; an OSError's with its path and reason ('No space left on device')."""
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ''
        return f"{where}{describe(error)}"
    return one_line(error, limit=None)


def command_line(main: Callable[[list[str] | None], object], tool: str, argv: list[str] | None = None,
                 expected: tuple[type[BaseException], ...] = (ValueError, OSError),
                 interrupted: str = 'interrupted') -> NoReturn:
    """Run a tool's `main(argv)` and exit: with its result when that is an int (else 0), or with one line
    `<tool>: error: ...`: every tool of this project ends here.

    A `RunError` gives its message and code; one of the `expected` errors its message and status 1; Ctrl-C
    `interrupted` and status 130. A process of a multi-process run that only lost a peer exits quietly, status 1.
    Anything else is a bug and keeps its traceback.
    """
    sys.excepthook = _quiet_fd_sharing
    if _starting_handler is not None and signal.getsignal(signal.SIGINT) is _starting_handler:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # from here Ctrl-C is `interrupted`, below
    try:
        result = main(argv)
    except RunError as error:
        exit_with(one_line(error, limit=None), error.code, tool)
    except KeyboardInterrupt:
        exit_with(interrupted, INTERRUPTED, tool)
    except Exception as error:
        if lost_a_peer(error):
            _exit_quietly(1)
        if not isinstance(error, expected):
            raise
        exit_with(message(error), tool=tool)
    _ignore_late_interrupts()
    sys.exit(result if isinstance(result, int) else 0)
