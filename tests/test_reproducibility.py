"""The README's reproducibility claim, as worded, on configs/tiny.yaml through train.py: two runs of the same
command log the same losses bit for bit, and a run resumed from a checkpoint logs, for the steps after it,
the losses of the uninterrupted run bit for bit (metrics.csv compared as text)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import train

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 6, 3
# The demo's own model, data and optimizer settings; only the callbacks change: a checkpoint every 3 steps,
# and none of the fit-end extras (HF export, sample, lm-eval, WSM from step 850), which training never reads.
CALLBACKS = {
    "trainer": {
        "enable_progress_bar": False,
        "callbacks": [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"every_n_train_steps": EVERY, "save_top_k": -1, "save_last": True},
            },
            {
                "class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
                "init_args": {"logging_interval": "step"},
            },
        ],
    }
}
NOT_COMPARED = {"tok_s"}  # tokens per second of wall-clock time


def command(root: Path, *extra: str) -> list[str]:
    overrides = root / "callbacks.yaml"
    overrides.write_text(yaml.safe_dump(CALLBACKS))
    return ["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--config", str(overrides),
            f"--trainer.max_steps={STEPS}", "--trainer.log_every_n_steps=1", f"--trainer.default_root_dir={root}",
            f"--trainer.logger.init_args.save_dir={root}", *extra]  # fmt: skip


def fit(root: Path, *extra: str) -> Path:
    """Run train.py in this process; returns the run's log folder."""
    was = torch.are_deterministic_algorithms_enabled()
    try:
        cli = train.main(command(root, *extra))
        assert torch.are_deterministic_algorithms_enabled()  # trainer.deterministic in configs/tiny.yaml
        return Path(cli.trainer.log_dir)
    finally:
        torch.use_deterministic_algorithms(was)  # the run sets it for the whole process


def metrics(log_dir: Path) -> dict[str, dict[str, str]]:
    """metrics.csv as {column: {step: value as written}}, empty cells left out."""
    out: dict[str, dict[str, str]] = {}
    with open(log_dir / "metrics.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            for name, value in row.items():
                if value != "" and name != "step" and name not in NOT_COMPARED:
                    out.setdefault(name, {})[row["step"]] = value
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    log_dir = fit(root)
    assert log_dir == root / "logs" / "version_0"
    logged = metrics(log_dir)
    assert len(logged["train/loss"]) == STEPS and "train/mtp_1_loss" in logged
    return root, log_dir, logged


def test_two_runs_of_the_same_command_log_the_same_losses(uninterrupted):
    """The second run is a fresh `python train.py` process into the same output folder (its own version)."""
    root, _, logged = uninterrupted
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # this process's thread count
    result = subprocess.run([sys.executable, "train.py", *command(root)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert metrics(root / "logs" / "version_1") == logged


def test_a_resumed_run_repeats_the_uninterrupted_losses(uninterrupted):
    root, log_dir, logged = uninterrupted
    resumed = fit(root, f"--ckpt_path={log_dir / 'checkpoints' / f'epoch=0-step={EVERY}.ckpt'}")
    later = {name: {step: v for step, v in values.items() if int(step) >= EVERY} for name, values in logged.items()}
    assert metrics(resumed) == {name: values for name, values in later.items() if values}
    assert list(metrics(resumed)["train/loss"]) == [str(step) for step in range(EVERY, STEPS)]
