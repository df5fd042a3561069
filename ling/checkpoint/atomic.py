"""Lightning checkpoints, files and sharded folders alike, that are never half-written.

Lightning's default writer goes through an fsspec transaction whose temporary file lives in the
system temp folder; committing it into another filesystem is a copy, so a crash during that copy
leaves a truncated checkpoint under the final name. Here the bytes go to a temporary file beside
the target, are flushed to disk, and the file is renamed into place in one step.

A sharded (DCP) checkpoint is a folder written by every rank, which no single rename can replace
while the old one is still there. `swap_into_place` moves the old folder aside, renames the new one
in and only then deletes the old one; a crash between two steps leaves hidden siblings
(`.<name>.tmp-<token>`, `.<name>.old-<token>`, `.<name>.trash-<token>`) from which
`recover_checkpoint_dir` puts the last complete checkpoint back under its name at the next start.
`AtomicCheckpointIO` runs it on a folder before its first save there and on the folder of a
checkpoint it resumes from; `LingParallelStrategy` on its checkpoint folders at setup.

A save that fails (a full disk, a folder that cannot be written) raises `CheckpointWriteError`, an
OSError with the cause's errno that names the checkpoint's path and the cause in one sentence,
instead of torch's `unexpected pos` message; its temporary files are removed and whatever was under
the checkpoint's name before is untouched.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.distributed.checkpoint import CheckpointException

from ling.checkpoint.hf import CheckpointError

log = logging.getLogger(__name__)

# `.<name>.<kind>-<token>`: staged new checkpoint, old one moved aside, or one being deleted.
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|trash)-(?P<token>[0-9a-f]{16})$")
# What `atomic_torch_save` leaves when killed mid-write: `.<name>.<8 mkstemp characters>.tmp`; only
# removed for checkpoint names (`*.ckpt` or a staged sibling), since saves may go to any folder.
_FILE_TMP = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")
# The files of a Lightning DCP folder (plus what DCP stages while it writes `.metadata`).
_DCP_FILE = re.compile(r"^(\.metadata|\.metadata\.tmp|meta\.pt|__\d+_\d+\.distcp)$")


class CheckpointWriteError(OSError, CheckpointError):
    """A checkpoint that could not be written; `errno` is the cause's, `filename` the checkpoint's path.

    Whatever was under that path before the save is still there, complete (or, after a failed swap,
    put back there by `recover_checkpoint_dir` at the next start, as `message` then says).
    """

    def __init__(self, path: str | os.PathLike, code: int | None, reason: str, message: str | None = None):
        super().__init__(code, reason, os.fspath(path))
        self.message = message

    def __str__(self) -> str:
        if self.message:
            return self.message
        name = errno.errorcode.get(self.errno) if self.errno is not None else None
        cause = f"{self.strerror} ({name})" if name else self.strerror
        unchanged = "any earlier checkpoint under that name is unchanged"
        return f"cannot write the checkpoint {self.filename}: {cause}; {unchanged}."

    def __reduce__(self):  # rebuilt from the same values, e.g. when sent between processes
        return type(self), (self.filename, self.errno, self.strerror, self.message)


def write_error(exc: BaseException, path: str | os.PathLike) -> CheckpointWriteError | None:
    """`exc`, raised while writing the checkpoint `path`, as a `CheckpointWriteError`, or None when it is
    no write failure (an interrupt, a bug).

    torch reports a failed write as `RuntimeError: ... unexpected pos`, with the OSError of the file
    object as its context and none when torch opened the file itself; DCP wraps each rank's error in a
    `CheckpointException`. The cause is looked for in all of them, and for a bare RuntimeError in the
    folder itself (no space left, no write permission).
    """
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return None
    cause = _os_error(exc, set())
    if cause is not None:
        return CheckpointWriteError(path, cause.errno, cause.strerror or str(cause))
    if isinstance(exc, RuntimeError):
        code = _folder_fault(Path(path).parent)
        if code is not None:
            return CheckpointWriteError(path, code, os.strerror(code))
    return None


def _os_error(exc: BaseException | None, seen: set[int]) -> OSError | None:
    if exc is None or id(exc) in seen:
        return None
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc
    if isinstance(exc, CheckpointException):  # DCP's: each failed rank's (exception, traceback)
        for failure, _ in exc.failures.values():
            found = _os_error(failure, seen)
            if found is not None:
                return found
    return _os_error(exc.__cause__, seen) or _os_error(exc.__context__, seen)


def _folder_fault(folder: Path) -> int | None:
    """ENOSPC or EACCES when `folder` (or the nearest folder above it that exists) cannot take a new file."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if os.statvfs(folder).f_bavail == 0:
            return errno.ENOSPC
    except OSError:
        return None
    return None if os.access(folder, os.W_OK | os.X_OK) else errno.EACCES


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to a temporary file beside `path`, flushed to disk and renamed into place.

    A failure removes the temporary file and raises `CheckpointWriteError`; `path` keeps what it held.
    """
    target = Path(path)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        error = write_error(exc, target)
        if error is None:
            raise
        raise error from exc
    fsync_path(target.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer for single files, made atomic (see the module docstring).

    Before its first save into a folder, and before loading a checkpoint, the folder is cleaned of
    what a killed save left there (on global rank 0, where Lightning saves).
    """

    def __init__(self) -> None:
        super().__init__()
        self._tidied: set[Path] = set()

    def _tidy(self, folder: Path) -> None:
        folder = folder.resolve()
        if folder not in self._tidied and rank_zero_only.rank == 0:
            recover_checkpoint_dir(folder)
            self._tidied.add(folder)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not is_local_path(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        self._tidy(Path(path).parent)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if is_local_path(path) and Path(path).is_file():
            self._tidy(Path(path).parent)
        return super().load_checkpoint(path, *args, **kwargs)


def is_local_path(path: str | os.PathLike) -> bool:
    """Whether `path` is on the local filesystem (where renames are atomic), not behind fsspec."""
    return isinstance(get_filesystem(path), LocalFileSystem)


def new_token() -> str:
    """A token that orders siblings by creation time; one rank makes it and broadcasts it."""
    return f"{time.time_ns():016x}"


def sibling(target: str | os.PathLike, kind: str, token: str) -> Path:
    """The hidden neighbour of `target` used while saving (`tmp`), swapping (`old`) or deleting (`trash`)."""
    target = Path(target)
    return target.parent / f".{target.name}.{kind}-{token}"


def holds_only_checkpoint_files(path: str | os.PathLike) -> bool:
    """Whether replacing the folder `path` can only delete a (possibly broken) DCP checkpoint."""
    return all(_DCP_FILE.match(entry.name) and entry.is_file() for entry in Path(path).iterdir())


def _move(src: Path, dst: Path) -> None:
    os.rename(src, dst)


def remove_path(path: str | os.PathLike) -> None:
    """Delete a file, link or folder if it is there."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's bytes, or a folder's entries, to disk (where the platform allows opening folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def swap_into_place(staged: str | os.PathLike, target: str | os.PathLike, token: str) -> None:
    """Put the complete checkpoint `staged` (a file or folder) at `target`, replacing what is there.

    At every instant `target` holds the old or the new checkpoint, except between the two renames,
    when the old one sits at `sibling(target, "old", token)` and `recover_checkpoint_dir` restores it.
    """
    staged, target = Path(staged), Path(target)
    if staged.is_file() and target.is_file() and not target.is_symlink():
        os.replace(staged, target)  # one atomic step for a file over a file
        fsync_path(target.parent)
        return
    if not os.path.lexists(target):
        _move(staged, target)
        fsync_path(target.parent)
        return
    aside = sibling(target, "old", token)
    _move(target, aside)
    _move(staged, target)
    fsync_path(target.parent)
    remove_path(aside)


def discard(path: str | os.PathLike) -> None:
    """Delete a checkpoint without leaving a half-deleted one under its name: rename it away first."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    trash = sibling(path, "trash", new_token())
    _move(path, trash)
    fsync_path(path.parent)
    remove_path(trash)


def _is_checkpoint_name(name: str) -> bool:
    return name.endswith(".ckpt") or _SIBLING.match(name) is not None


def recover_checkpoint_dir(dirpath: str | os.PathLike) -> list[str]:
    """Undo what interrupted saves, swaps and deletions left in `dirpath`; returns what was done.

    A checkpoint moved aside whose new version never arrived goes back under its name; staged,
    moved-aside (already replaced) and half-deleted checkpoints and stale temporary files are removed.
    Run it on one rank while no save is in progress.
    """
    root = Path(dirpath)
    if not root.is_dir():
        return []
    done = []
    entries = sorted(root.iterdir(), key=lambda p: p.name)
    asides: dict[str, list[Path]] = {}
    for entry in entries:
        match = _SIBLING.match(entry.name)
        if match and match["kind"] == "old":
            asides.setdefault(match["name"], []).append(entry)
    for name, olds in asides.items():
        target = root / name
        if not os.path.lexists(target):
            newest = max(olds, key=lambda p: p.name)  # the token orders them in time
            _move(newest, target)
            fsync_path(root)
            done.append(f"restored {target} from an interrupted save")
    for entry in entries:
        match = _SIBLING.match(entry.name)
        partial = _FILE_TMP.match(entry.name)
        stale_file = partial and _is_checkpoint_name(partial["name"]) and entry.is_file() and not entry.is_symlink()
        if (match or stale_file) and os.path.lexists(entry):
            remove_path(entry)
            done.append(f"removed {entry}, left by an interrupted save")
    for line in done:
        log.warning(line)
    return done
