"""Plot the run's curves (``ling.report``) from its CSV log when fitting ends, and print the PNG paths."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ling.report import ReportError, write_report


class RunReport(L.Callback):
    """At fit end, on global rank 0, write ``ling.report``'s PNGs for ``trainer.log_dir``.

    ``dirpath``: the folder for the PNGs (default ``<log_dir>/report``).
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath
        self.paths: list[Path] = []

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:  # the CSV logger buffers rows until it saves
            logger.save()
        if trainer.log_dir is None:
            rank_zero_warn("RunReport: the trainer has no log folder; no report written.")
            return
        try:
            self.paths = write_report(trainer.log_dir, self.dirpath)
        except ReportError as e:
            rank_zero_warn(f"RunReport: {e}")
            return
        rank_zero_info("run report:\n" + "\n".join(f"  {path}" for path in self.paths))
