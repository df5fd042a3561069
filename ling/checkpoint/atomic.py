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
"""

from __future__ import annotations

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
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

# `.<name>.<kind>-<token>`: staged new checkpoint, old one moved aside, or one being deleted.
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|trash)-(?P<token>[0-9a-f]{16})$")
# What `atomic_torch_save` leaves when killed mid-write: `.<name>.<8 mkstemp characters>.tmp`; only
# removed for checkpoint names (`*.ckpt` or a staged sibling), since saves may go to any folder.
_FILE_TMP = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")
# The files of a Lightning DCP folder (plus what DCP stages while it writes `.metadata`).
_DCP_FILE = re.compile(r"^(\.metadata|\.metadata\.tmp|meta\.pt|__\d+_\d+\.distcp)$")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not is_local_path(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


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
