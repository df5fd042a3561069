"""One run per output folder: runs started together get their own version folders, a folder a live run
writes to is refused with one sentence, and a run that stops before writing leaves no empty folder."""

import gc
import multiprocessing
import os
from pathlib import Path

import pytest
import yaml

import train
from ling import run_folder
from ling.run_folder import CSVLogger, RunFolderBusy, RunFolderError, claim_version, lock_run_folder, next_version

ROOT = Path(__file__).resolve().parents[1]


def _claim(root, start, versions):
    start.wait()
    versions.put(claim_version(root, first=0))


def test_runs_started_together_claim_different_versions(tmp_path):
    """Eight processes that all listed the folder as empty (so all would pick version_0) create their
    folders at the same moment: each gets its own."""
    context = multiprocessing.get_context("fork")
    start, versions = context.Event(), context.Queue()
    processes = [context.Process(target=_claim, args=(tmp_path / "logs", start, versions)) for _ in range(8)]
    for process in processes:
        process.start()
    start.set()
    for process in processes:
        process.join(30)
        assert process.exitcode == 0
    assert sorted(versions.get(timeout=5) for _ in processes) == list(range(8))
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [f"version_{i}" for i in range(8)]


def test_the_next_version_is_one_past_the_highest_run_folder(tmp_path):
    assert next_version(tmp_path / "missing") == 0
    for name in ("version_0", "version_3", "version_x", "other"):
        (tmp_path / name).mkdir()
    (tmp_path / "version_7").write_text("a file, not a run folder")
    assert next_version(tmp_path) == 4


def test_two_loggers_into_one_save_dir_write_apart(tmp_path, monkeypatch):
    """The listing answers version 0 to both, as when two runs start at once; the second takes 1."""
    monkeypatch.setattr(run_folder, "next_version", lambda root: 0)
    first, second = CSVLogger(tmp_path, name="logs"), CSVLogger(tmp_path, name="logs")
    assert (first.version, second.version) == (0, 1)
    assert first.log_dir == str(tmp_path / "logs" / "version_0") and second.log_dir == str(
        tmp_path / "logs" / "version_1"
    )
    first.log_metrics({"train/loss": 1.0}, step=0)
    second.log_metrics({"train/loss": 2.0}, step=0)
    first.save(), second.save()
    assert "1.0" in (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    assert "2.0" in (tmp_path / "logs" / "version_1" / "metrics.csv").read_text()


def test_a_folder_a_live_run_writes_to_is_refused(tmp_path):
    """An explicit version another logger holds: refused with the holder's pid; free again once it is gone."""
    holder = CSVLogger(tmp_path, name="logs", version=0)
    assert holder.version == 0
    folder = tmp_path / "logs" / "version_0"
    with pytest.raises(RunFolderBusy) as info:
        _ = CSVLogger(tmp_path, name="logs", version=0).log_dir
    assert str(info.value) == (
        f"another run (pid {os.getpid()}) is writing to {folder}; wait for it to end, or pass another version "
        "(--trainer.logger.init_args.version) or save_dir."
    )
    assert isinstance(info.value, train.USER_ERRORS)  # printed by train.py as one `error:` line
    with pytest.raises(RunFolderBusy):
        lock_run_folder(folder)
    del holder
    gc.collect()
    with lock_run_folder(folder) as lock:
        assert lock.held
    assert CSVLogger(tmp_path, name="logs", version=0).version == 0


def test_train_py_refuses_a_busy_folder_before_writing(tmp_path):
    """Through train.py: with another run holding version_0, a run told to write there stops before it
    writes config.yaml, metrics or checkpoints."""
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    assert config["trainer"]["logger"]["class_path"] == "ling.run_folder.CSVLogger"
    folder = tmp_path / "logs" / "version_0"
    args = ["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.version=0",
            "--trainer.max_steps=1"]  # fmt: skip
    with lock_run_folder(folder), pytest.raises(RunFolderBusy, match=f"is writing to {folder};"):
        train.main(args)
    assert list(folder.iterdir()) == []


def test_a_claimed_folder_left_empty_by_a_failed_run_is_removed(tmp_path):
    failed, done = CSVLogger(tmp_path, name="logs"), CSVLogger(tmp_path, name="logs")
    assert (failed.version, done.version) == (0, 1)
    failed.finalize("failed")
    done.finalize("success")
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["version_1"]
    assert failed.version == 2  # a fresh folder when used again


def test_a_folder_that_cannot_be_made_is_one_sentence(tmp_path):
    (tmp_path / "taken").write_text("a file where the output folder should be")
    with pytest.raises(RunFolderError) as info:
        _ = CSVLogger(tmp_path / "taken", name="logs").log_dir
    assert str(info.value) == f"cannot create the run folder {tmp_path / 'taken' / 'logs'}: Not a directory (ENOTDIR)."
    assert isinstance(info.value, train.USER_ERRORS)
