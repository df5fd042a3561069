"""Evaluate the model in the middle of training and leave the training state exactly as it was.

`evaluating_mid_training(model)` is the one way the callbacks run forward passes between training steps
(WSM's validation losses, LMEval's tasks): inside it the model is in eval mode under `torch.no_grad()`;
on leaving, even by an exception, the module train/eval flags, the gradients that were unset and the
python, numpy and torch (CPU and CUDA) random states are put back, and the weights that FSDP2 gathered for
the forward passes are freed. So a run with such evaluations trains bit for bit like one without.

    with evaluating_mid_training(pl_module.model):
        loss = pl_module(input_ids, labels).main_loss
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch.distributed.fsdp import FSDPModule


@contextmanager
def evaluating_mid_training(model: torch.nn.Module) -> Iterator[None]:
    """Run the block with `model` in eval mode under `torch.no_grad()`, then put the training state back."""
    modes = [(m, m.training) for m in model.modules()]
    no_grad = [p for p in model.parameters() if p.grad is None]
    python, numpy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training
        for p in no_grad:
            p.grad = None
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()  # free the weights the forward passes left gathered
