"""ling.report (plots from a run's metrics.csv) and the RunReport callback."""

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from callbacks.run_report import RunReport
from ling.report import TOKENS_PER_STEP, main, report_series, stage_boundaries, write_report

PNGS = ["loss.png", "mtp_loss.png", "lr.png", "batch.png", "throughput.png"]
COLUMNS = [
    "data/stage", "epoch", "step", "tok_s", "train/loss", "train/lr", "train/micro_batches", "train/mtp_1_loss",
    "train/tokens", "val/loss", "val/loss/arithmetic", "val/loss/shakespeare",
]  # fmt: skip


def _write_log(folder):
    """A Lightning-style metrics.csv: a training row every 2 steps (the global batch doubles at step 5,
    the stage changes 0 -> 1 after step 5 and 1 -> 2 after step 9) and validation rows of their own."""
    rows, tokens = [], 0
    for step in range(1, 12, 2):
        tokens += 2 * (256 if step < 5 else 512)
        stage = 0 if step <= 5 else 1 if step <= 9 else 2
        rows.append({
            "data/stage": stage, "epoch": 0, "step": step, "tok_s": 1000.0 + step, "train/loss": 5.0 - step / 10,
            "train/lr": 1e-3 * step, "train/micro_batches": 1 if step < 5 else 2, "train/mtp_1_loss": 5.5 - step / 10,
            "train/tokens": tokens,
        })  # fmt: skip
        if step in (5, 11):
            rows.append({"epoch": 0, "step": step, "val/loss": 4.0 - step / 10,
                         "val/loss/arithmetic": 3.0 - step / 10, "val/loss/shakespeare": 4.5 - step / 10})  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def test_series_are_the_csv_columns_against_tokens(tmp_path):
    _write_log(tmp_path)
    with (tmp_path / "metrics.csv").open(newline="") as f:
        raw = list(csv.DictReader(f))
    series = report_series(tmp_path)
    names = ["train/loss", "train/mtp_1_loss", "train/lr", "train/micro_batches", "tok_s"]
    names += ["val/loss", "val/loss/arithmetic", "val/loss/shakespeare"]
    assert set(series) == {*names, TOKENS_PER_STEP}
    for name in names:
        present = [r for r in raw if r[name] != ""]
        # A validation row has no train/tokens: it sits at the tokens of the training row of its step.
        tokens_at = {r["step"]: float(r["train/tokens"]) for r in raw if r["train/tokens"] != ""}
        assert series[name] == ([tokens_at[r["step"]] for r in present], [float(r[name]) for r in present]), name
    assert series["val/loss"][0] == [2 * 256 * 2 + 2 * 512, 2 * 256 * 2 + 2 * 512 * 4]
    xs, per_step = series[TOKENS_PER_STEP]
    assert xs == series["train/loss"][0]
    assert per_step == [256 * 2 / 2, 256, 512, 512, 512, 512]  # the first row: 2 steps (0 and 1), 512 tokens


def test_stage_boundaries_where_the_stage_changes(tmp_path):
    _write_log(tmp_path)
    # The last row of the old stage: step 5 (2048 tokens) and step 9 (4096 tokens).
    assert stage_boundaries(tmp_path) == [(2048.0, 1), (4096.0, 2)]


def test_report_pngs_and_cli(tmp_path, capsys):
    _write_log(tmp_path)
    paths = write_report(tmp_path)
    assert [p.name for p in paths] == PNGS
    assert all(p.parent == tmp_path / "report" and p.stat().st_size > 0 for p in paths)

    assert main([str(tmp_path), "--out", str(tmp_path / "elsewhere")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "elsewhere" / name) for name in PNGS]
    assert all((tmp_path / "elsewhere" / name).stat().st_size > 0 for name in PNGS)


def test_cli_errors(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == f"error: no such log folder: {tmp_path / 'missing'}"
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path} has no metrics.csv") and err.count("\n") == 0


def test_report_without_mtp_or_validation(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,train/loss,train/tokens,data/stage\n0,5.0,64,0\n1,4.0,128,0\n")
    assert [p.name for p in write_report(tmp_path)] == ["loss.png", "batch.png"]
    assert stage_boundaries(tmp_path) == []


class _Logged(BoringModel):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        step = self.global_step
        self.log("train/loss", out["loss"])
        self.log("train/tokens", float(64 * (step + 1)))
        self.log("train/lr", 0.1)
        self.log("data/stage", float(step >= 4))
        return out


@pytest.mark.parametrize("dirpath", [None, "custom"])
def test_callback_writes_the_report_at_fit_end(tmp_path, dirpath, capsys):
    torch.manual_seed(0)
    callback = RunReport(dirpath=str(tmp_path / dirpath) if dirpath else None)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="logs"),  # flushes every 100 steps unless saved
        callbacks=[callback],
        max_steps=8,
        log_every_n_steps=1,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(_Logged())
    log_dir = tmp_path / "logs" / "version_0"
    out = tmp_path / dirpath if dirpath else log_dir / "report"
    assert [p.name for p in callback.paths] == ["loss.png", "lr.png", "batch.png"]
    assert all(p.parent == out and p.stat().st_size > 0 for p in callback.paths)
    assert report_series(log_dir)["train/loss"][0] == [64.0 * (s + 1) for s in range(8)]
    assert stage_boundaries(log_dir) == [(256.0, 1)]
