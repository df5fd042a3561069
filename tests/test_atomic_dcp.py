"""Atomic sharded checkpoints: the swap and the start-up recovery by hand, the strategy's saves in one process,
and 2-rank runs killed with SIGKILL inside a DCP save that resume from the previous checkpoint exactly."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from parallel_setup import make_data, make_module
from torch.distributed.checkpoint import FileSystemReader

import ling.checkpoint.atomic as atomic
from ling.checkpoint import CheckpointError
from ling.checkpoint.atomic import recover_checkpoint_dir, sibling, swap_into_place
from ling.parallel.strategy import LingParallelStrategy

ROOT = Path(__file__).resolve().parents[1]
TOKEN, LATER = "0000000000000001", "0000000000000002"


def fake_dcp(path: Path, tag: str) -> Path:
    """A folder shaped like a Lightning DCP checkpoint whose files all say `tag`."""
    path.mkdir(parents=True)
    for name in (".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"):
        (path / name).write_text(tag)
    return path


def tag(path: Path) -> str:
    texts = {p.read_text() for p in path.iterdir()}
    assert len(texts) == 1 and len(list(path.iterdir())) == 4, f"{path} is not one complete checkpoint"
    return texts.pop()


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_swap_replaces_the_folder_and_leaves_nothing_behind(tmp_path):
    fake_dcp(tmp_path / "last.ckpt", "old")
    swap_into_place(fake_dcp(sibling(tmp_path / "last.ckpt", "tmp", TOKEN), "new"), tmp_path / "last.ckpt", TOKEN)
    assert names(tmp_path) == ["last.ckpt"] and tag(tmp_path / "last.ckpt") == "new"
    swap_into_place(fake_dcp(tmp_path / ".fresh.ckpt.tmp-x", "first"), tmp_path / "fresh.ckpt", TOKEN)
    assert names(tmp_path) == ["fresh.ckpt", "last.ckpt"] and tag(tmp_path / "fresh.ckpt") == "first"


@pytest.mark.parametrize("crash_after", [1, 2])
def test_recovery_after_a_crash_inside_the_swap(tmp_path, monkeypatch, crash_after):
    """A crash after moving the old `last` aside brings the old one back; after renaming the new one in, the
    new one stays and the old one is removed."""
    target = fake_dcp(tmp_path / "last.ckpt", "old")
    staged = fake_dcp(sibling(target, "tmp", TOKEN), "new")
    moves, move = [], atomic._move

    def move_then_crash(src, dst):
        move(src, dst)
        moves.append((Path(src).name, Path(dst).name))
        if len(moves) == crash_after:
            raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "_move", move_then_crash)
    with pytest.raises(KeyboardInterrupt):
        swap_into_place(staged, target, TOKEN)
    monkeypatch.undo()
    assert moves[0] == ("last.ckpt", f".last.ckpt.old-{TOKEN}")
    if crash_after == 1:
        assert names(tmp_path) == [f".last.ckpt.old-{TOKEN}", f".last.ckpt.tmp-{TOKEN}"]  # no `last.ckpt` at all
    else:
        assert names(tmp_path) == [f".last.ckpt.old-{TOKEN}", "last.ckpt"]
    done = recover_checkpoint_dir(tmp_path)
    assert names(tmp_path) == ["last.ckpt"]
    assert tag(target) == ("old" if crash_after == 1 else "new")
    assert len(done) == (2 if crash_after == 1 else 1)
    assert recover_checkpoint_dir(tmp_path) == []  # nothing left to do


def test_recovery_removes_only_what_interrupted_saves_left(tmp_path):
    keep = [fake_dcp(tmp_path / "epoch=0-step=2.ckpt", "a"), fake_dcp(tmp_path / "last.ckpt", "b")]
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / ".hidden").write_text("mine")
    (tmp_path / ".last.ckpt.tmp-mine").mkdir()  # not a token this code makes
    partial = sibling(tmp_path / "epoch=0-step=4.ckpt", "tmp", TOKEN)
    partial.mkdir()
    (partial / "__1_0.distcp").write_text("shard")
    fake_dcp(sibling(tmp_path / "epoch=0-step=0.ckpt", "trash", TOKEN), "deleted").joinpath(".metadata").unlink()
    (tmp_path / ".single.ckpt.ab_12xyz.tmp").write_bytes(b"half a file")  # what atomic_torch_save leaves
    (tmp_path / ".notes.txt.ab_12xyz.tmp").write_bytes(b"not a checkpoint's")
    # Two asides of one missing checkpoint: the newer one (the later token) comes back.
    fake_dcp(sibling(tmp_path / "gone.ckpt", "old", TOKEN), "older")
    fake_dcp(sibling(tmp_path / "gone.ckpt", "old", LATER), "newer")
    recover_checkpoint_dir(tmp_path)
    assert names(tmp_path) == [".hidden", ".last.ckpt.tmp-mine", ".notes.txt.ab_12xyz.tmp", "epoch=0-step=2.ckpt",
                               "gone.ckpt", "last.ckpt", "notes.txt"]  # fmt: skip
    assert [tag(p) for p in keep] == ["a", "b"] and tag(tmp_path / "gone.ckpt") == "newer"
    assert recover_checkpoint_dir(tmp_path / "missing") == []


def test_removal_never_leaves_half_a_checkpoint_under_its_name(tmp_path, monkeypatch):
    target = fake_dcp(tmp_path / "epoch=0-step=2.ckpt", "old")

    def crash(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "remove_path", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic.discard(target)
    monkeypatch.undo()
    (trash,) = tmp_path.iterdir()
    assert trash.name.startswith(".epoch=0-step=2.ckpt.trash-") and tag(trash) == "old"
    recover_checkpoint_dir(tmp_path)
    assert names(tmp_path) == []


def test_strategy_saves_atomically_in_one_process(tmp_path):
    """Top-1 cleanup and `last` go through the swap; a stale staging folder and an aside `last` from a killed
    run are dealt with at start; a user's save onto a folder of other files is refused."""
    ckpt = tmp_path / "ckpt"
    fake_dcp(sibling(ckpt / "epoch=0-step=9.ckpt", "tmp", TOKEN), "stale")
    fake_dcp(sibling(ckpt / "last.ckpt", "old", TOKEN), "killed")
    seen = []

    class Look(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append(names(ckpt))

    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy=LingParallelStrategy(param_dtype=None, reduce_dtype=None),
        max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[Look(), ModelCheckpoint(dirpath=ckpt, every_n_train_steps=1, save_top_k=1, save_last=True)],
        default_root_dir=tmp_path,
    )  # fmt: skip
    try:
        trainer.fit(make_module(), datamodule=make_data())
        assert seen == [["last.ckpt"]]  # the aside `last` is back, the staging folder gone, before any save
        # Top-1 removed steps 1 and 2; Lightning versions `last` because the restored one is there.
        assert names(ckpt) == ["epoch=0-step=3.ckpt", "last-v1.ckpt", "last.ckpt"]
        assert tag(ckpt / "last.ckpt") == "killed"
        for name in ["epoch=0-step=3.ckpt", "last-v1.ckpt"]:
            assert names(ckpt / name) == [".metadata", "__0_0.distcp", "meta.pt"]
            assert global_step(ckpt / name) == 3
        user = tmp_path / "mine"
        user.mkdir()
        (user / "notes.txt").write_text("mine")
        with pytest.raises(CheckpointError, match="mine is a folder holding other files"):
            trainer.save_checkpoint(user)
        assert names(user) == ["notes.txt"]
        trainer.save_checkpoint(ckpt / "last.ckpt")  # a user's save over an existing checkpoint folder
        assert names(ckpt) == ["epoch=0-step=3.ckpt", "last-v1.ckpt", "last.ckpt"]
        assert names(ckpt / "last.ckpt") == [".metadata", "__0_0.distcp", "meta.pt"]
        assert global_step(ckpt / "last.ckpt") == 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --- 2 ranks killed inside a DCP save ---------------------------------------------------------------------


def torchrun(out: Path, ckpt: Path, *extra: str, killed: bool = False) -> list[tuple[int, float]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "tests/dist/kill_save.py", "--ckpt-dir", str(ckpt), "--out", str(out), *extra]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if killed:
        assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
        for pid_file in Path(f"{out}.pids").iterdir():  # both ranks are gone too (the killer dies last)
            pid, deadline = int(pid_file.read_text()), time.monotonic() + 30
            while running(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not running(pid)
    else:
        assert result.returncode == 0, result.stderr[-3000:]
    lines = Path(f"{out}.losses").read_text().split()
    return [(int(step), float.fromhex(loss)) for step, loss in zip(lines[::2], lines[1::2], strict=True)]


def running(pid: int) -> bool:
    """Whether `pid` is alive: a killed rank whose parent died may linger as a zombie until it is reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def global_step(path: Path) -> int:
    """The step of a complete Lightning DCP folder (its `.metadata` reads and names every tensor)."""
    assert FileSystemReader(path).read_metadata().state_dict_metadata
    return torch.load(path / "meta.pt", weights_only=False)["global_step"]


def hidden(folder: Path, start: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(start))


@pytest.mark.slow
def test_kills_inside_a_dcp_save_leave_the_previous_checkpoint_that_resumes_exactly(tmp_path):
    """One uninterrupted 4-step run is the reference. A fresh run is killed inside the save at step 4; each
    later run resumes from `last.ckpt` (step 2), must retrace the reference exactly, and is killed at the next
    point of the step-4 save; the last one runs to the end."""
    reference = torchrun(tmp_path / "ref.pt", tmp_path / "ref_ckpt")
    assert [step for step, _ in reference] == [1, 2, 3, 4]
    ck = tmp_path / "ckpt"

    # Rank 1 has written its shard of step 4; rank 0 never writes `.metadata`.
    losses = torchrun(tmp_path / "a.pt", ck, "--kill", "shards:epoch=0-step=4.ckpt@4", killed=True)
    assert losses == reference
    assert names(ck) == [f".epoch=0-step=4.ckpt.tmp-{t}" for t in tokens(ck)] + ["epoch=0-step=2.ckpt", "last.ckpt"]
    (partial,) = hidden(ck, ".epoch=0-step=4.ckpt.tmp-")
    assert "__1_0.distcp" in names(partial) and ".metadata" not in names(partial)
    assert global_step(ck / "last.ckpt") == global_step(ck / "epoch=0-step=2.ckpt") == 2

    # Both ranks have written `last.ckpt` of step 4; nothing is renamed yet.
    losses = torchrun(tmp_path / "b.pt", ck, "--resume", str(ck / "last.ckpt"), "--kill", "written:last.ckpt@4",
                      killed=True)  # fmt: skip
    assert losses == reference[2:]  # resumed from step 2 exactly
    assert not partial.exists()  # the start removed the staging folder of the first kill
    (staged,) = hidden(ck, ".last.ckpt.tmp-")
    assert global_step(staged) == 4 and global_step(ck / "last.ckpt") == 2
    assert global_step(ck / "epoch=0-step=4.ckpt") == 4

    # Rank 0 has moved the old `last.ckpt` aside: the final path is empty for an instant.
    losses = torchrun(tmp_path / "c.pt", ck, "--resume", str(ck / "last.ckpt"), "--kill", "aside:last.ckpt@4",
                      killed=True)  # fmt: skip
    assert losses == reference[2:]
    assert not staged.exists() and not (ck / "last.ckpt").exists()
    (aside,) = hidden(ck, ".last.ckpt.old-")
    (staged,) = hidden(ck, ".last.ckpt.tmp-")
    assert global_step(aside) == 2 and global_step(staged) == 4

    # The next start puts the old `last.ckpt` back and resumes from it to the end.
    losses = torchrun(tmp_path / "d.pt", ck, "--resume", str(ck / "last.ckpt"))
    assert losses == reference[2:]
    resumed, full = torch.load(tmp_path / "d.pt", weights_only=True), torch.load(tmp_path / "ref.pt", weights_only=True)
    assert resumed.keys() == full.keys()
    for name, value in full.items():
        assert torch.equal(resumed[name], value), name
    assert not [p for p in ck.iterdir() if p.name.startswith(".")]
    assert global_step(ck / "last.ckpt") == 4
    assert {p.name: global_step(p) for p in ck.iterdir()} == {
        "epoch=0-step=2.ckpt": 2, "epoch=0-step=4.ckpt": 4, "epoch=0-step=4-v1.ckpt": 4,
        "epoch=0-step=4-v2.ckpt": 4, "last.ckpt": 4,
    }  # fmt: skip


def tokens(folder: Path) -> list[str]:
    return [p.name.rsplit("-", 1)[1] for p in hidden(folder, ".epoch=0-step=4.ckpt.tmp-")]
