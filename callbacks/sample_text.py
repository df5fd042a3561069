"""Print a sample generation from the model (with the data module's tokenizer) when training ends,
after the run's last checkpoint is written (so a failing sample cannot lose it)."""

from __future__ import annotations

import lightning as L
import torch

from callbacks.stages import secure_fit_end
from ling.generate import generate


class SampleText(L.Callback):
    def __init__(
        self,
        prompt: str = "The ",
        max_new_tokens: int = 100,
        temperature: float = 0.8,
        top_k: int | None = 40,
        seed: int = 0,
    ):
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self.temperature, self.top_k, self.seed = temperature, top_k, seed
        self.text: str | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        secure_fit_end(trainer, pl_module)
        tokenizer = trainer.datamodule.tokenizer
        prompt = torch.tensor([tokenizer.encode(self.prompt)], device=pl_module.device)
        new = generate(
            pl_module.model,
            prompt,
            self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            stop_tokens=[tokenizer.eos_token_id],
            generator=torch.Generator(pl_module.device).manual_seed(self.seed),
        )
        self.text = self.prompt + tokenizer.decode(new[0])
        if trainer.is_global_zero:
            print(f"sample: {self.text!r}")
