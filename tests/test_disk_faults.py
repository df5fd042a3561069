"""Saves that fail, on one device (AtomicCheckpointIO) and under the sharded strategy (DCP, one process):
a full disk part-way through a save, or a folder that cannot be written, stops the run with one error naming
the checkpoint and the cause; nothing is left half-written under a final name nor as a temporary, and the
previous checkpoint is intact and resumes exactly. What a killed save left is removed at the next start."""

import errno
import os
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint.filesystem as dcp_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from parallel_setup import Record, make_data, make_module

from ling.checkpoint import CheckpointError
from ling.checkpoint.atomic import AtomicCheckpointIO, CheckpointWriteError, write_error
from ling.parallel.strategy import LingParallelStrategy

ENOSPC = os.strerror(errno.ENOSPC)  # "No space left on device"


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def trainer(root: Path, ckpt: Path, steps: int, callbacks: list, strategy=None, every: int = 2) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
        callbacks=[*callbacks, ModelCheckpoint(dirpath=ckpt, every_n_train_steps=every, save_top_k=-1, save_last=True)],
        **({"strategy": strategy} if strategy else {"plugins": [AtomicCheckpointIO()]}),
    )  # fmt: skip


class FillDisk(L.Callback):
    """From the end of step `after` on, the disk is full (`full` switches the patched writers on)."""

    def __init__(self, after: int):
        self.after, self.full = after, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.full = trainer.global_step > self.after  # runs before ModelCheckpoint's hook (checkpoints go last)


class FullFile:
    """A file on a disk that takes `room` more bytes: the write crossing it writes what fits, then ENOSPC."""

    def __init__(self, fh, room: int):
        self.fh, self.room = fh, room

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if len(data) > self.room:
            self.fh.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, ENOSPC)
        self.room -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)


def test_full_disk_on_one_device_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The disk fills 4 KB into the step-4 save: the run stops with one error naming the file and ENOSPC,
    `last.ckpt` still holds step 2 and resumes to the losses the failed run had trained."""
    ckpt, disk = tmp_path / "ckpt", FillDisk(after=2)
    save = torch.save
    monkeypatch.setattr(
        torch, "save", lambda obj, f, *a, **k: save(obj, FullFile(f, 4096) if disk.full else f, *a, **k)
    )
    failed = Record()
    with pytest.raises(CheckpointWriteError) as info:
        trainer(tmp_path / "a", ckpt, 4, [failed, disk]).fit(make_module(), datamodule=make_data())
    error = info.value
    assert isinstance(error, CheckpointError) and error.errno == errno.ENOSPC  # train.py prints it as one line
    assert str(error) == (f"cannot write the checkpoint {ckpt / 'epoch=0-step=4.ckpt'}: {ENOSPC} (ENOSPC); "
                          "any earlier checkpoint under that name is unchanged.")  # fmt: skip
    assert "unexpected pos" in str(error.__cause__)  # what torch itself says
    assert len(failed.losses) == 4
    assert names(ckpt) == ["epoch=0-step=2.ckpt", "last.ckpt"]  # no temporary, no half a step-4 file
    assert torch.load(ckpt / "last.ckpt", weights_only=False)["global_step"] == 2
    monkeypatch.undo()

    resumed = Record()
    trainer(tmp_path / "b", ckpt, 4, [resumed]).fit(make_module(), datamodule=make_data(), ckpt_path=ckpt / "last.ckpt")
    assert resumed.losses == failed.losses[2:]
    assert names(ckpt) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]


def test_full_disk_under_the_sharded_strategy_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The same inside DCP's shard writer, one process, saving every step: the disk fills in the step-2
    save, the staged folder is removed and `last.ckpt` (a DCP folder of step 1) resumes exactly."""
    ckpt, disk = tmp_path / "ckpt", FillDisk(after=1)
    write_item = dcp_filesystem._write_item

    def full_write_item(transforms, stream, *args, **kwargs):
        if disk.full:
            stream.write(b"the first bytes of a shard")
            raise OSError(errno.ENOSPC, ENOSPC)
        return write_item(transforms, stream, *args, **kwargs)

    monkeypatch.setattr(dcp_filesystem, "_write_item", full_write_item)
    failed, strategy = Record(), LingParallelStrategy(param_dtype=None, reduce_dtype=None)
    try:
        with pytest.raises(CheckpointWriteError) as info:
            run = trainer(tmp_path / "a", ckpt, 2, [failed, disk], strategy, every=1)
            run.fit(make_module(), datamodule=make_data())
    finally:
        if dist.is_initialized():  # the strategy's one-rank process group; later runs make their own
            dist.destroy_process_group()
    assert info.value.errno == errno.ENOSPC
    assert str(info.value).startswith(f"cannot write the checkpoint {ckpt / 'epoch=0-step=2.ckpt'}: {ENOSPC} (ENOSPC);")
    assert names(ckpt) == ["epoch=0-step=1.ckpt", "last.ckpt"]
    assert torch.load(ckpt / "last.ckpt" / "meta.pt", weights_only=False)["global_step"] == 1
    monkeypatch.undo()

    resumed, strategy = Record(), LingParallelStrategy(param_dtype=None, reduce_dtype=None)
    try:
        run = trainer(tmp_path / "b", ckpt, 2, [resumed], strategy, every=1)
        run.fit(make_module(), datamodule=make_data(), ckpt_path=ckpt / "last.ckpt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert len(failed.losses) == 2 and resumed.losses == failed.losses[1:]


def refuse_writes(folder: Path, monkeypatch) -> None:
    """Make `folder` read-only; as root, who may write anyway, creating anything in it fails as it would
    for anyone else."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    if os.geteuid() != 0:
        return

    def refuse(real):
        def call(path, *args, **kwargs):
            if isinstance(path, (str, os.PathLike)) and Path(path).parent == folder:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
            return real(path, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "open", refuse(os.open))
    monkeypatch.setattr(os, "mkdir", refuse(os.mkdir))


@pytest.mark.parametrize("sharded", [False, True])
def test_a_folder_that_cannot_be_written_is_named(tmp_path, monkeypatch, sharded):
    ckpt = tmp_path / "ckpt"
    refuse_writes(ckpt, monkeypatch)
    strategy = LingParallelStrategy(param_dtype=None, reduce_dtype=None) if sharded else None
    try:
        with pytest.raises(CheckpointWriteError) as info:
            trainer(tmp_path, ckpt, 2, [], strategy).fit(make_module(), datamodule=make_data())
    finally:
        ckpt.chmod(0o755)
        if dist.is_initialized():
            dist.destroy_process_group()
    assert info.value.errno == errno.EACCES
    assert str(info.value) == (f"cannot write the checkpoint {ckpt / 'epoch=0-step=2.ckpt'}: Permission denied "
                               "(EACCES); any earlier checkpoint under that name is unchanged.")  # fmt: skip
    assert names(ckpt) == []


def test_a_killed_save_is_cleaned_up_at_the_next_start_on_one_device(tmp_path):
    """What `atomic_torch_save` leaves when killed mid-write (`.<name>.<8 characters>.tmp`) is gone before
    the first step, both in the folder a fresh run saves into and in the folder of a checkpoint it resumes from."""
    first = tmp_path / "first"
    trainer(tmp_path, first, 2, []).fit(make_module(), datamodule=make_data())
    stale = [first / ".last.ckpt.k1ll3d_x.tmp", tmp_path / "second" / ".epoch=0-step=4.ckpt.ab_12xyz.tmp"]
    for path in stale:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half a checkpoint")
    (tmp_path / "second" / "notes.tmp").write_text("not a checkpoint's")
    seen = []

    class Look(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append([path.exists() for path in stale])

    run = trainer(tmp_path, tmp_path / "second", 4, [Look()])
    run.fit(make_module(), datamodule=make_data(), ckpt_path=first / "last.ckpt")
    assert seen == [[False, True]]  # the resumed-from folder at start; the new folder before its first save
    assert names(tmp_path / "second") == ["epoch=0-step=4.ckpt", "last.ckpt", "notes.tmp"]
    assert names(first) == ["epoch=0-step=2.ckpt", "last.ckpt"]


def test_write_errors_name_the_cause_also_without_an_os_error(tmp_path, monkeypatch):
    """torch.save given a path reports a full disk only as `unexpected pos`: the folder tells the cause."""
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert write_error(torch_error, tmp_path / "x.ckpt") is None  # space left: not known to be a full disk
    monkeypatch.setattr(os, "statvfs", lambda path: type("Full", (), {"f_bavail": 0})())
    error = write_error(torch_error, tmp_path / "x.ckpt")
    assert error.errno == errno.ENOSPC
    assert str(error).startswith(f"cannot write the checkpoint {tmp_path / 'x.ckpt'}: {ENOSPC} (ENOSPC);")
    assert write_error(KeyboardInterrupt(), tmp_path / "x.ckpt") is None
