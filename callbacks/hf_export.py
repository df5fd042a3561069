"""Write the trained model as a Hugging Face checkpoint folder when training ends.

The run's last checkpoint is written first, and weights that are not finite are never exported."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from callbacks.stages import secure_fit_end
from ling.checkpoint import save_pretrained
from ling.config import ConfigError, check_rope_scaling
from ling.data.datamodule import ling_data
from ling.dtypes import FLOAT8_DTYPES, dtype_named
from ling.model.dtensor import is_sharded
from ling.nonfinite import NonFiniteError, weights_finite


class HFExport(L.Callback):
    def __init__(
        self,
        dirpath: str | None = None,
        dtype: str | None = None,
        max_shard_size: str = "5GB",
        rope_scaling: dict | None = None,
        remote_code: str | None = None,
    ):
        """dirpath: output folder (default: `<log dir>/hf`); dtype: float32, bfloat16, float16 or
        float8_e4m3fn (128x128 blockwise float8; default: the weights' own); rope_scaling: written into the
        exported config, e.g. YaRN to serve a longer context than trained (Ling's 128K is YaRN factor 4
        on its 32K training context); remote_code: a local folder with the BailingMoeV2 code files,
        copied in so the folder loads offline with `trust_remote_code=True`.

        The folder also holds the data module's tokenizer and a generation_config.json, and its
        config.json carries that tokenizer's token ids. A sharded model is written without gathering
        it on one host: one group of tensors is gathered at a time and rank 0 writes."""
        self.dtype = dtype_named(dtype, "HFExport dtype", FLOAT8_DTYPES)
        if remote_code is not None and not Path(remote_code).is_dir():
            raise ConfigError(f"HFExport remote_code={remote_code!r} is not a folder.")
        try:  # checked at startup, not when the export at fit end writes it
            check_rope_scaling(rope_scaling)
        except ConfigError as err:
            raise ConfigError(f"HFExport {err}") from None
        self.dirpath, self.max_shard_size = dirpath, max_shard_size
        self.rope_scaling, self.remote_code = rope_scaling, remote_code
        self.saved_to: Path | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        secure_fit_end(trainer, pl_module)
        folder = Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "hf")
        model = pl_module.model
        if not weights_finite(trainer, model.state_dict().values()):
            raise NonFiniteError(
                f"the weights at step {trainer.global_step} hold NaN or inf values, so no Hugging Face folder "
                f"was written to {folder}."
            )
        sharded = any(is_sharded(p) for p in model.parameters())
        if sharded or trainer.is_global_zero:  # a sharded model needs every rank for its gathers
            config = model.config
            if self.rope_scaling is not None:
                config = config.replace(rope_scaling=dict(self.rope_scaling))
            data = ling_data(trainer)
            tokenizer = None if data is None else data.tokenizer
            save_pretrained(model, folder, self.max_shard_size, self.dtype, config=config,
                            tokenizer=tokenizer, remote_code=self.remote_code)  # fmt: skip
            if trainer.is_global_zero:
                self.saved_to = folder
                print(f"Hugging Face checkpoint written to {folder}")
        trainer.strategy.barrier()
