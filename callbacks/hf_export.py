"""Write the trained model as a Hugging Face checkpoint folder when training ends."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from ling.checkpoint import save_pretrained
from ling.checkpoint.hf import DTYPES


class HFExport(L.Callback):
    def __init__(
        self,
        dirpath: str | None = None,
        dtype: str | None = None,
        max_shard_size: str = "5GB",
        rope_scaling: dict | None = None,
    ):
        """dirpath: output folder (default: `<log dir>/hf`); dtype: float32, bfloat16 or float16;
        rope_scaling: written into the exported config, e.g. YaRN to serve a longer context than
        trained (Ling's 128K is YaRN factor 4 on its 32K training context)."""
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"HFExport dtype={dtype!r} is not one of {sorted(DTYPES)}.")
        self.dirpath, self.dtype, self.max_shard_size = dirpath, dtype, max_shard_size
        self.rope_scaling = rope_scaling
        self.saved_to: Path | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "hf")
        dtype = DTYPES[self.dtype] if self.dtype else None
        model = pl_module.model
        if any(hasattr(p, "device_mesh") for p in model.parameters()):
            model = _gathered(model)  # every rank takes part in the gather; rank 0 gets the weights
        if trainer.is_global_zero:
            config = model.config
            if self.rope_scaling is not None:
                config = config.replace(rope_scaling=dict(self.rope_scaling))
            self.saved_to = save_pretrained(model, folder, self.max_shard_size, dtype, config=config)
            print(f"Hugging Face checkpoint written to {folder}")
        trainer.strategy.barrier()


def _gathered(model):
    """An unsharded CPU copy of a sharded model on rank 0 (None elsewhere)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ling.model import LingForCausalLM

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        full = LingForCausalLM(model.config)
    full.load_state_dict(state, assign=True)
    full.model.rotary_emb = model.model.rotary_emb.__class__(model.config)  # non-persistent buffers
    return full
