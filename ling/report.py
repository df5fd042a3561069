"""Plot a run's training curves from its Lightning CSV log (``<log_dir>/metrics.csv``).

Every plot has the tokens seen (``train/tokens``) on the x axis and marks the curriculum stage
boundaries (where ``data/stage`` changes) with labelled vertical lines:

- ``loss.png``: train loss and validation loss, overall and per data source;
- ``mtp_loss.png``: the multi-token-prediction losses (``train/mtp_<k>_loss``);
- ``lr.png``: the learning rate;
- ``batch.png``: the global batch in tokens per optimizer step (the change of ``train/tokens`` over
  the change of ``step`` between logged rows, so an average over each logging interval) and the
  logged ``train/micro_batches`` (micro-batches per step on each rank);
- ``throughput.png``: tokens/s (``tok_s``).

A row without ``train/tokens`` (a validation row) is placed at the tokens seen by the last logged
training row at or before its step. Usage: ``python -m ling.report LOG_DIR [--out DIR]``.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import math
import sys
from pathlib import Path

TOKENS = "train/tokens"
STAGE = "data/stage"
TOKENS_PER_STEP = "tokens_per_step"  # derived, not a CSV column

Series = tuple[list[float], list[float]]


class ReportError(ValueError):
    """The log folder cannot be reported on; the message is one sentence for the user."""


def metrics_path(log_dir: str | Path) -> Path:
    """The metrics.csv of ``log_dir`` (a run's log folder, or the file itself)."""
    path = Path(log_dir)
    if path.is_file() and path.name.endswith(".csv"):
        return path
    if not path.is_dir():
        raise ReportError(f"no such log folder: {path}")
    csv_path = path / "metrics.csv"
    if not csv_path.is_file():
        raise ReportError(f"{path} has no metrics.csv; give the run's log folder, e.g. outputs/tiny/logs/version_0.")
    return csv_path


def read_rows(log_dir: str | Path) -> list[dict[str, float]]:
    """The CSV rows in file order, each holding only the columns present in that row, as floats."""
    rows = []
    with metrics_path(log_dir).open(newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for key, value in raw.items():
                if key is None or value is None or value.strip() == "":
                    continue
                try:
                    row[key] = float(value)
                except ValueError:
                    continue
            rows.append(row)
    return rows


class _TokenAxis:
    """Tokens seen at a step: from the last row at or before it that logged ``train/tokens``."""

    def __init__(self, rows: list[dict[str, float]]):
        by_step: dict[float, float] = {}
        for row in rows:
            if TOKENS in row and "step" in row:
                by_step[row["step"]] = row[TOKENS]
        self.steps = sorted(by_step)
        self.tokens = [by_step[s] for s in self.steps]

    def x(self, row: dict[str, float]) -> float:
        if TOKENS in row:
            return row[TOKENS]
        i = bisect.bisect_right(self.steps, row.get("step", -math.inf))
        return self.tokens[i - 1] if i else 0.0


def _column(rows: list[dict[str, float]], axis: _TokenAxis, name: str) -> Series:
    xs, ys = [], []
    for row in rows:
        if name in row:
            xs.append(axis.x(row))
            ys.append(row[name])
    return xs, ys


def _tokens_per_step(rows: list[dict[str, float]]) -> Series:
    xs, ys = [], []
    prev_step, prev_tokens = -1.0, 0.0  # before the first step (index 0), no tokens
    for row in rows:
        if TOKENS not in row or "step" not in row or row["step"] <= prev_step:
            continue
        xs.append(row[TOKENS])
        ys.append((row[TOKENS] - prev_tokens) / (row["step"] - prev_step))
        prev_step, prev_tokens = row["step"], row[TOKENS]
    return xs, ys


def report_series(log_dir: str | Path) -> dict[str, Series]:
    """Every series the report plots, by name: (tokens seen, value) lists in CSV row order.

    The names are the CSV columns (``train/loss``, ``val/loss``, ``val/loss/<source>``,
    ``train/mtp_<k>_loss``, ``train/lr``, ``train/micro_batches``, ``tok_s``) plus the derived
    ``tokens_per_step``; a column the log lacks is left out.
    """
    rows = read_rows(log_dir)
    axis = _TokenAxis(rows)
    columns = sorted({key for row in rows for key in row})
    names = ["train/loss"]
    names += [c for c in columns if c.startswith("train/mtp_") and c.endswith("_loss")]
    names += ["val/loss"] + [c for c in columns if c.startswith("val/loss/")]
    names += ["train/lr", "train/micro_batches", "tok_s"]
    series = {name: _column(rows, axis, name) for name in names}
    series[TOKENS_PER_STEP] = _tokens_per_step(rows)
    return {name: s for name, s in series.items() if s[0]}


def stage_boundaries(log_dir: str | Path) -> list[tuple[float, int]]:
    """(tokens seen, new stage index) wherever ``data/stage`` changes between logged rows.

    The tokens are those of the last row logged in the old stage: exact with a row every step,
    otherwise within one logging interval before the change.
    """
    rows = read_rows(log_dir)
    axis = _TokenAxis(rows)
    boundaries, prev, prev_x = [], None, 0.0
    for row in rows:
        if STAGE not in row:
            continue
        stage = int(row[STAGE])
        if prev is not None and stage != prev:
            boundaries.append((prev_x, stage))
        prev, prev_x = stage, axis.x(row)
    return boundaries


_PLOTS = {  # file -> (title, y label, series picked by name)
    "loss.png": ("Loss", "loss", lambda n: n in ("train/loss", "val/loss") or n.startswith("val/loss/")),
    "mtp_loss.png": ("MTP loss", "loss", lambda n: n.startswith("train/mtp_")),
    "lr.png": ("Learning rate", "learning rate", lambda n: n == "train/lr"),
    "batch.png": ("Global batch per step", None, lambda n: n in (TOKENS_PER_STEP, "train/micro_batches")),
    "throughput.png": ("Throughput", "tokens/s", lambda n: n == "tok_s"),
}
_BATCH_LABELS = {
    TOKENS_PER_STEP: "tokens per step (Δ train/tokens / Δ step)",
    "train/micro_batches": "micro-batches per step (per rank)",
}


def _mark_stages(ax, boundaries: list[tuple[float, int]]) -> None:
    for x, stage in boundaries:
        ax.axvline(x, color="grey", linestyle="--", linewidth=1)
        ax.annotate(
            f"stage {stage}",
            (x, 1),
            xycoords=("data", "axes fraction"),
            xytext=(3, -3),
            textcoords="offset points",
            va="top",
            fontsize=8,
            color="grey",
        )


def write_report(log_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the report's PNGs into ``out_dir`` (default ``<log_dir>/report``); return their paths.

    A plot whose series are all missing from the log (e.g. no MTP head) is not written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path = metrics_path(log_dir)
    series = report_series(csv_path)
    boundaries = stage_boundaries(csv_path)
    out = Path(out_dir) if out_dir is not None else csv_path.parent / "report"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for file, (title, ylabel, pick) in _PLOTS.items():
        chosen = sorted((name for name in series if pick(name)), key=lambda n: n != TOKENS_PER_STEP)
        if not chosen:
            continue
        batch = file == "batch.png"
        fig, axes = plt.subplots(len(chosen) if batch else 1, 1, figsize=(8, 3.2 * len(chosen) if batch else 4.5))
        axes = list(axes) if batch and len(chosen) > 1 else [axes]
        for i, name in enumerate(chosen):
            ax = axes[i] if batch else axes[0]
            xs, ys = series[name]
            marker = "o" if name.startswith("val/") or len(xs) < 30 else None
            ax.plot(xs, ys, label=_BATCH_LABELS.get(name, name), marker=marker, markersize=3)
            if batch:
                ax.set_ylabel(_BATCH_LABELS[name].split(" (")[0])
        for ax in axes:
            _mark_stages(ax, boundaries)
            ax.set_xlabel("tokens seen")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            if ylabel:
                ax.set_ylabel(ylabel)
        axes[0].set_title(title)
        fig.tight_layout()
        path = out / file
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ling.report", description=__doc__.splitlines()[0])
    parser.add_argument("log_dir", help="the run's log folder holding metrics.csv, e.g. outputs/tiny/logs/version_0")
    parser.add_argument("--out", help="folder for the PNGs (default: LOG_DIR/report)")
    args = parser.parse_args(argv)
    try:
        paths = write_report(args.log_dir, args.out)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
