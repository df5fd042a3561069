"""Train a Ling 2.0 model: `python train.py fit --config configs/tiny.yaml`.

Subcommands fit / validate / test; `--print_config` shows the whole resolved run. YAML files are
read with omegaconf, so values can interpolate (`${data.seq_len}`).
"""

from __future__ import annotations

import os
import sys
import warnings

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

from lightning.fabric.utilities.exceptions import MisconfigurationException  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from ling.checkpoint import CheckpointError  # noqa: E402
from ling.config import ConfigError  # noqa: E402
from ling.data.errors import DataError  # noqa: E402
from ling.data.module import LingDataModule  # noqa: E402
from ling.module import LingModule  # noqa: E402

# Lightning's own misconfiguration messages are sentences for users too (for example
# accumulate_grad_batches: the micro-batches per step come from data.global_batch_size).
# The step is written out in LingModule (manual optimization); checkpoints hold the state after the
# step, which is what resuming needs, so Lightning's advice to keep pre-step copies does not apply.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")

USER_ERRORS = (ConfigError, CheckpointError, DataError, MisconfigurationException)


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return LightningCLI(
        LingModule,
        LingDataModule,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
