"""One run per output folder: `CSVLogger` claims its version folder atomically and holds it.

Lightning's CSVLogger picks `version_<N>` by listing `<save_dir>/<name>` and taking the next number,
and the folder appears only when something is first written there, so two runs started together
with one `save_dir` both pick the same N and write one `metrics.csv`, `config.yaml` (LightningCLI
saves it into the log folder) and `hf/`. The `CSVLogger` here creates its version folder with
`os.mkdir`, which succeeds in one process only (the other takes the next number), and holds an
exclusive `flock` on that folder for as long as the logger lives, so a run given an explicit
`version` that a live run is writing to stops before writing anything:

    error: another run (pid 4242) is writing to outputs/tiny/logs/version_0; wait for it to end, or
    pass another version (--trainer.logger.init_args.version) or save_dir.

The lock goes away with its process, also when the process is killed. Only global rank 0 claims
and locks (the log folder is rank 0's; the trainer hands its path to the other ranks). A claimed
folder that a failed run left empty is removed again. Where the filesystem has no `flock` (some
network filesystems) the claim still holds and a warning says the folder is not locked.

    logger:
      class_path: ling.run_folder.CSVLogger
      init_args: {save_dir: outputs/tiny, name: logs}
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger

from ling.checkpoint.atomic import is_local_path

log = logging.getLogger(__name__)

# What `flock` answers when another open file (here: another run) holds the lock.
_HELD = (errno.EWOULDBLOCK, errno.EAGAIN)


class RunFolderError(MisconfigurationException):
    """A run folder that cannot be created or used; one sentence, printed by train.py as one `error:` line."""


class RunFolderBusy(RunFolderError):
    """Another live run is writing to the run folder this one was given."""


def _make_folder(path: Path, exist_ok: bool) -> None:
    try:
        if exist_ok:
            path.mkdir(parents=True, exist_ok=True)
        else:
            os.mkdir(path)
    except FileExistsError:
        if not exist_ok:
            raise  # the folder is another run's: `claim_version` takes the next number
        raise RunFolderError(f"cannot create the run folder {path}: a file of that name is in the way.") from None
    except OSError as exc:
        name = errno.errorcode.get(exc.errno, "")
        raise RunFolderError(
            f"cannot create the run folder {path}: {exc.strerror}{f' ({name})' if name else ''}."
        ) from exc


class RunFolderLock:
    """An exclusive `flock` on a folder, held until `release` or until the process ends."""

    def __init__(self, path: str | os.PathLike, fd: int | None):
        self.path = Path(path)
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the lock
            self._fd = None

    def __enter__(self) -> RunFolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def lock_run_folder(path: str | os.PathLike, warn: bool = True) -> RunFolderLock:
    """Lock the folder `path` (created if missing) for this process; `RunFolderBusy` if a live run holds it,
    `RunFolderError` if it cannot be created.

    Locks are per open descriptor: a second lock on the same folder is refused in the same process too.
    On a filesystem without `flock` the returned lock is not `held`; `warn` says so in the log.
    """
    folder = Path(path)
    _make_folder(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _lock_holder(fd) if exc.errno in _HELD else None
        os.close(fd)
        if exc.errno in _HELD:
            who = "another run" if holder is None else f"another run (pid {holder})"
            raise RunFolderBusy(
                f"{who} is writing to {folder}; wait for it to end, or pass another version "
                "(--trainer.logger.init_args.version) or save_dir."
            ) from None
        if warn:
            log.warning(
                "cannot lock the run folder %s (%s); make sure no other run writes to it.", folder, exc.strerror
            )
        return RunFolderLock(folder, None)
    return RunFolderLock(folder, fd)


def _lock_holder(fd: int) -> int | None:
    """The pid holding a `flock` on the open folder `fd`, read from /proc/locks (Linux), or None."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 4242 08:01:1234567 0 EOF"; waiters are marked with "->".
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode and fields[4].isdigit():
            return int(fields[4])
    return None


def next_version(root: str | os.PathLike) -> int:
    """One past the highest `version_<N>` folder in `root`, 0 without one (the number Lightning's CSVLogger
    would pick)."""
    root = Path(root)
    if not root.is_dir():
        return 0
    found = [p.name.split("_")[1] for p in root.iterdir() if p.is_dir() and p.name.startswith("version_")]
    return max((int(n) for n in found if n.isdigit()), default=-1) + 1


def claim_version(root: str | os.PathLike, first: int = 0) -> int:
    """Create `<root>/version_<N>` for the lowest free N >= `first` and return N.

    `os.mkdir` fails for all but one of the processes creating the same folder, so runs started at
    the same moment never share a version; each one that loses tries the next number.
    """
    root = Path(root)
    _make_folder(root, exist_ok=True)
    version = first
    while True:
        try:
            _make_folder(root / f"version_{version}", exist_ok=False)
            return version
        except FileExistsError:
            version += 1


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger whose log folder belongs to this run alone (see the module docstring).

    The claim is made when the version is first read, as Lightning's own choice is: only then is this
    process's rank known. Lightning keeps the version and the CSV writer in `_version` and `_experiment`
    and has no public way to set them after construction, so this class sets them itself.
    """

    _run_lock: RunFolderLock | None = None
    _claimed = False

    @property
    def version(self) -> int | str:
        if self._run_lock is None and rank_zero_only.rank == 0 and is_local_path(self.root_dir):
            if self._version is None:
                self._version = claim_version(self.root_dir, first=next_version(self.root_dir))
                self._claimed = True
            # A claimed folder is this run's already; the lock keeps out runs given its version explicitly.
            self._run_lock = lock_run_folder(self._folder(), warn=not self._claimed)
        return super().version

    def _folder(self) -> Path:
        return Path(self.root_dir) / (self._version if isinstance(self._version, str) else f"version_{self._version}")

    def finalize(self, status: str) -> None:
        super().finalize(status)
        if status == "failed" and self._claimed and self._run_lock is not None:
            folder = self._folder()
            if folder.is_dir() and not any(folder.iterdir()):  # the run stopped before writing anything
                self._run_lock.release()
                folder.rmdir()
                # A later run through this logger claims a folder anew.
                self._run_lock, self._version, self._claimed, self._experiment = None, None, False, None
