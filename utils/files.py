"""Files a run writes: atomic writes, the run folder's checks and lock, and no run replacing another.

A write goes to a temporary file beside its target, `.trar-tmp.<process id>.<name>`: a name no user picks,
and two writers never share one. It is flushed to disk and renamed over the target; a failed write (a full disk,
an interrupt) removes its temporary file, and one left by a killed writer is removed when the next run takes
its run folder. Only files of that form whose writer no longer runs are ever removed.
"""
import errno
import fcntl
import os
import re
from pathlib import Path
from typing import Callable

RUN_FILES = ('best.ckpt', 'last.ckpt', 'results.json')
EVENTS_GLOB = 'events.out.tfevents.*'  # TensorBoard's logs
LOCK_NAME = '.lock'
TEMPORARY_MARK = '.trar-tmp.'
_TEMPORARY = re.compile(r'^\.trar-tmp\.(\d+)\..+$')  # .trar-tmp.<pid>.<name>
_HELD: dict[Path, 'RunFolder'] = {}  # the run folders this process has locked


def temporary_path(path: Path) -> Path:
    """The temporary file this process writes `path` through; it keeps the suffix (matplotlib reads the format)."""
    return path.with_name(f'{TEMPORARY_MARK}{os.getpid()}.{path.name}')


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """`write(temporary)`, flush it to disk, rename it to `path`, flush the folder: all of it or nothing."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        write(tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, 'O_DIRECTORY'):  # POSIX; Windows cannot open a folder to flush it
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def ensure_writable(folder: Path) -> None:
    """Create `folder` if needed and write and remove a probe file in it; an OSError says why it cannot be written."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = temporary_path(folder / 'probe')
    try:
        probe.write_bytes(b'probe')  # a byte, so that a full disk shows here
    finally:
        probe.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove this tool's temporary files in `folder` whose writer no longer runs; return them."""
    stale = [path for path in Path(folder).iterdir()
             if (match := _TEMPORARY.match(path.name)) and path.is_file() and not process_alive(int(match.group(1)))]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def describe(error: OSError) -> str:
    """An OSError's reason in words ('No space left on device'), without its repr."""
    return error.strerror or errno.errorcode.get(error.errno or 0) or str(error)


class RunFolder:
    """The folder `output_dir/name` of one run, checked and locked before any data or model is loaded.

    It refuses (ValueError, one line): an output folder that is a file or not writable; a folder locked by a
    live run; a folder holding another run's checkpoints or results, unless this run resumes from its own
    last.ckpt or `overwrite` says to replace them. Replaced runs, and runs that stopped before their first
    checkpoint, leave no TensorBoard logs behind to mix with the new run's.
    """

    def __init__(self, out_dir: str | Path, resume_path: str | None = None, overwrite: bool = False):
        self.path = Path(out_dir)
        self._lock = None
        self._check_writable()
        self._take_lock()
        try:
            self._check_not_another_run(resume_path, overwrite)
            remove_stale_temporaries(self.path)
        except BaseException:
            self.release()
            raise

    def _check_writable(self) -> None:
        for folder in (self.path, *self.path.parents):
            if folder.exists() and not folder.is_dir():
                raise ValueError(f"output folder {folder} is a file: expected a folder (--output_dir, --name)")
        try:
            ensure_writable(self.path)
        except OSError as error:
            raise ValueError(f"output folder {self.path} is not writable: {describe(error)}") from None

    def _take_lock(self) -> None:
        """An exclusive POSIX lock on `.lock` (the kernel drops it when the process ends, however it ends).

        Not flock: forked loader workers would share an flock and hold it after their parent was killed.

        A run of this same process that ended without releasing it (an exception in an interactive session
        or a test) is over: its lock is taken back.
        """
        key = self.path.resolve()
        if key in _HELD:
            _HELD.pop(key).release()
        lock = open(self.path / LOCK_NAME, 'a+')
        try:
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EACCES or EAGAIN: held by another process
            lock.seek(0)
            holder = lock.read().strip() or 'another process'
            lock.close()
            raise ValueError(f"run folder {self.path} is in use by process {holder}: expected one run per folder; "
                             "choose another --name") from None
        try:
            lock.seek(0)
            lock.truncate()
            lock.write(str(os.getpid()))
            lock.flush()
        except OSError as error:  # a full disk
            lock.close()
            raise ValueError(f"cannot write {self.path / LOCK_NAME}: {describe(error)}") from None
        self._lock = lock
        _HELD[key] = self

    def _check_not_another_run(self, resume_path: str | None, overwrite: bool) -> None:
        if resume_path is not None and Path(resume_path).resolve().parent == self.path.resolve():
            return  # continuing this folder's own run
        strange = [name for name in RUN_FILES if (self.path / name).exists() and not (self.path / name).is_file()]
        if strange:  # never removed: this tool writes files of these names, never folders or links to them
            raise ValueError(f"run folder {self.path} holds {', '.join(strange)} that is not a file train.py wrote: "
                             "expected a file; move it away or choose another --name")
        found = [name for name in RUN_FILES if (self.path / name).exists()]
        if not found or overwrite:
            for path in [self.path / name for name in RUN_FILES] + list(self.path.glob(EVENTS_GLOB)):
                if path.is_file():  # a link is removed, not what it points to
                    path.unlink()
            return
        raise ValueError(f"run folder {self.path} already holds a run ({', '.join(found)}): continue it with "
                         f"--resume_path {self.path / 'last.ckpt'}, choose another --name, or pass --overwrite "
                         "to replace it")

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing drops the lock
            self._lock = None
            _HELD.pop(self.path.resolve(), None)
