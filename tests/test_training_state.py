"""evaluating_mid_training: eval mode and no autograd inside; modes, unset gradients and every random
state put back afterwards, also when the block raises."""

import random

import numpy as np
import pytest
import torch

from callbacks.training_state import evaluating_mid_training


def model_with_a_gradient():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2))
    model.train()
    model[1].eval()  # a mixed state must come back as it was, not as one model.train()
    model[0](torch.ones(1, 3)).sum().backward()  # the first layer has gradients, the last none
    return model


def draws():
    return random.random(), float(np.random.rand()), torch.rand(2)


@pytest.mark.parametrize("raises", [False, True])
def test_state_is_put_back(raises):
    model = model_with_a_gradient()
    modes = [m.training for m in model.modules()]
    grad = model[0].weight.grad.clone()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = draws()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    try:
        with evaluating_mid_training(model):
            assert not any(m.training for m in model.modules())
            assert not torch.is_grad_enabled()
            model(torch.ones(2, 3)).sum()
            random.seed(7), np.random.seed(7), torch.manual_seed(7)
            draws()
            model[2].weight.grad = torch.ones_like(model[2].weight)
            if raises:
                raise RuntimeError("evaluation failed")
    except RuntimeError:
        assert raises
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model[0].weight.grad, grad)
    assert model[2].weight.grad is None
    python, numpy, cpu = draws()
    assert (python, numpy) == expected[:2] and torch.equal(cpu, expected[2])
