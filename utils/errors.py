"""Error messages as one line, for the command-line tools' `error: ...` output, once per run."""
import contextlib
import json
import os
import signal
import sys
import time


class RunError(Exception):
    """An expected failure (bad input, a full disk, an interrupt): one line on stderr and exit status `code`."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


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


# inside `interrupts_deferred`; a Ctrl-C came meanwhile; a Ctrl-C came at all (since `stop_at_first_interrupt`)
_interrupts = {'deferred': False, 'pending': False, 'received': False}


def stop_at_first_interrupt():
    """Handle SIGINT in this process: the first Ctrl-C raises KeyboardInterrupt, later ones (a second Ctrl-C, or
    torchrun passing it on) are ignored, so that the stopping run can still say where its state is. Processes
    forked from this one (DataLoader workers) ignore it: this process stops them. Returns the previous handler."""
    owner = os.getpid()
    _interrupts['received'] = False

    def handler(signum, frame) -> None:
        if os.getpid() != owner:  # a forked DataLoader worker
            return
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _interrupts['received'] = True
        previous_hook = sys.unraisablehook  # a KeyboardInterrupt Python ignores is raised again, so not shown
        sys.unraisablehook = lambda unraisable: None if unraisable.exc_type is KeyboardInterrupt \
            else previous_hook(unraisable)
        if _interrupts['deferred']:
            _interrupts['pending'] = True
            return
        raise KeyboardInterrupt

    return signal.signal(signal.SIGINT, handler)


def raise_lost_interrupt() -> None:
    """Raise KeyboardInterrupt again if a Ctrl-C came but its KeyboardInterrupt was lost: raised where Python
    ignores exceptions (a callback of `os.fork` as a DataLoader starts its workers, a `__del__`), it would leave the
    run going with Ctrl-C ignored. Call it where an interrupt that propagated would already have left."""
    if _interrupts['received']:
        raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_deferred():
    """A Ctrl-C inside the block (with `stop_at_first_interrupt`'s handler) raises KeyboardInterrupt at its end:
    a checkpoint being written is finished and recorded as the last good state before the run stops."""
    _interrupts['deferred'] = True
    try:
        yield
    finally:  # a block that fails leaves no interrupt pending for the next one
        _interrupts['deferred'] = False
        pending, _interrupts['pending'] = _interrupts['pending'], False
    if pending:
        raise KeyboardInterrupt


LAUNCHED_ENV = 'TRAR_ONE_LINE_LAUNCHER'  # set by utils/launch.py, which prints the first failed process's line
ONE_LINE_MARK = 'one_line'  # marks an error file written by `exit_with`


def exit_with(message: str, code: int = 1) -> None:
    """End this process with `error: message` on stderr and exit status `code`.

    A process started by torchrun leaves the message in its error file instead, where the launcher finds it:
    utils/launch.py (train.sh) prints the first process's, once, as the last line; plain torchrun lists every
    failed process's in its report, and the process of rank 0 prints its own too.
    """
    error_file = os.environ.get('TORCHELASTIC_ERROR_FILE')
    if error_file:
        with open(error_file, 'w') as file:
            info = {'timestamp': str(int(time.time())), 'exitcode': code, ONE_LINE_MARK: True}
            json.dump({'message': {'message': message, 'extraInfo': info}}, file)
    if not error_file or (not os.environ.get(LAUNCHED_ENV) and os.environ.get('RANK', '0') == '0'):
        print(f"error: {message}", file=sys.stderr, flush=True)
    # What the failure left half-built is torn down after the line, quietly: a DataLoader iterator that Ctrl-C
    # interrupted in its constructor would print an "Exception ignored" traceback under it.
    sys.unraisablehook = lambda unraisable: None
    sys.exit(code)
