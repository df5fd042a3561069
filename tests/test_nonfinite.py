"""Steps with a non-finite loss or gradient norm: skipped bit for bit on the device, counted, and the run
stopped after too many in a row with the last finite weights in the checkpoints and no export; the
fit-end callbacks write the last checkpoint before their own work."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from parallel_setup import make_data

import ling.nonfinite
from callbacks.hf_export import HFExport
from callbacks.sample_text import SampleText
from ling.checkpoint.atomic import AtomicCheckpointIO
from ling.config import ConfigError
from ling.lightning_module import LingModule
from ling.nonfinite import NonFiniteError, NonFinitePolicy, guarded_optimizer, rewind_step_counts
from ling.schedules import ScheduleConfig


class NaNAt(LingModule):
    """The tiny run of tests/parallel_setup.py whose training loss is NaN in the optimizer steps `bad`
    (counted from 1); the loss's gradients, and so the gradient norm, are NaN there too."""

    bad: set[int] = set()

    def forward(self, input_ids, labels=None, **kwargs):
        out = super().forward(input_ids, labels, **kwargs)
        if self.training and out.loss is not None and self.trainer.global_step + 1 in self.bad:
            out.loss = out.loss * float("nan")
        return out


def make_module(bad=(), **kwargs) -> NaNAt:
    torch.manual_seed(0)
    module = NaNAt(model="tiny", bias_update_rate=0.01, schedule=ScheduleConfig(name="wsm", warmup_steps=2), **kwargs)
    module.bad = set(bad)
    return module


class Probe(L.Callback):
    """The weights (expert biases included) and the optimizer state before and after every step."""

    def __init__(self):
        self.before, self.after = {}, {}

    @staticmethod
    def _state(trainer, pl_module):
        weights = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        optim = trainer.optimizers[0].state_dict()["state"]
        return weights, {i: {k: v.clone() for k, v in s.items()} for i, s in optim.items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step + 1] = self._state(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step] = self._state(trainer, pl_module)


def trainer(tmp_path, steps, callbacks, checkpoints=False, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, enable_checkpointing=checkpoints, callbacks=callbacks, default_root_dir=tmp_path,
        plugins=[AtomicCheckpointIO()], log_every_n_steps=kwargs.pop("log_every_n_steps", 1), **kwargs,
    )  # fmt: skip


def same(a, b) -> bool:
    (weights_a, optim_a), (weights_b, optim_b) = a, b
    if weights_a.keys() != weights_b.keys() or optim_a.keys() != optim_b.keys():
        return False
    if not all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a):
        return False
    return all(s.keys() == optim_b[i].keys() and all(torch.equal(v, optim_b[i][k]) for k, v in s.items())
               for i, s in optim_a.items())  # fmt: skip


def test_a_non_finite_step_is_skipped_bit_for_bit_and_training_goes_on(tmp_path):
    probe, module = Probe(), make_module(bad={3})
    with pytest.warns(UserWarning, match=r"1 optimizer step\(s\) up to step 3 had a non-finite loss"):
        trainer(tmp_path, 5, [probe]).fit(module, datamodule=make_data())
    assert module.trainer.global_step == 5 and module.nonfinite_steps == 1
    assert float(module.trainer.callback_metrics["train/nonfinite_steps"]) == 1.0
    # Step 3 left the weights, the expert biases and the optimizer state (step counts too) as they were.
    assert same(probe.before[3], probe.after[3])
    assert any(k.endswith("expert_bias") for k in probe.after[3][0])
    for step in (2, 4, 5):  # the finite steps around it train as usual
        weights, optim = probe.after[step]
        assert not same(probe.before[step], probe.after[step])
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
        assert int(optim[0]["step"]) == step - (step > 3)


def test_too_many_in_a_row_stop_with_the_last_finite_weights_and_no_export(tmp_path):
    probe, module = Probe(), make_module(bad={3, 4, 5}, nonfinite=NonFinitePolicy(max_consecutive=3))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=-1)
    export = HFExport(dirpath=str(tmp_path / "hf"))
    message = r"3 optimizer steps in a row \(steps 3 to 5\) .* stops with the weights of step 2"
    with pytest.warns(UserWarning, match="non-finite"), pytest.raises(NonFiniteError, match=message):
        trainer(tmp_path, 8, [probe, ckpt, export], checkpoints=True).fit(module, datamodule=make_data())
    # The checkpoint of step 5, where the run stopped, was not written; last.ckpt is step 4's, which holds
    # the weights after step 2 (steps 3 and 4 were skipped).
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt", "epoch=0-step=4.ckpt", "last.ckpt",
    ]  # fmt: skip
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4 and last["ling"]["nonfinite_steps"] == 2
    weights_after_2 = probe.after[2][0]
    for name, value in last["state_dict"].items():
        assert torch.equal(value, weights_after_2[name.removeprefix("model.")]), name
    assert not (tmp_path / "hf").exists()


def test_stop_ends_the_run_at_the_first_and_writes_nothing_after_it(tmp_path):
    module = make_module(bad={3}, nonfinite=NonFinitePolicy(action="stop"))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=-1)
    with pytest.raises(NonFiniteError, match=r"optimizer step 3 had a non-finite loss .*action: stop"):
        # log_every_n_steps 50: the check before writing step 3's checkpoint finds it.
        trainer(tmp_path, 6, [ckpt], checkpoints=True, log_every_n_steps=50).fit(module, datamodule=make_data())
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "epoch=0-step=1.ckpt",
        "epoch=0-step=2.ckpt",
        "last.ckpt",
    ]
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 and all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_the_guard_steps_like_the_optimizer_and_keeps_everything_when_not_finite(monkeypatch):
    """In chunks of one parameter each: a finite step equals the optimizer's own step bit for bit; a
    non-finite one leaves parameters and state as they were (the step counts, when left counted as
    on a GPU, are rewound once the host knows)."""
    monkeypatch.setattr(ling.nonfinite, "GUARD_CHUNK_ELEMENTS", 1)

    def setup():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
        return model, optimizer

    def backward(model, scale=1.0):
        model.zero_grad()
        (model(torch.ones(2, 4)).sum() * scale).backward()

    plain, guarded = setup(), setup()
    for _ in range(2):
        for (model, optimizer), guard in ((plain, False), (guarded, True)):
            backward(model)
            if guard:
                with guarded_optimizer(optimizer, torch.tensor(True)):
                    optimizer.step()
            else:
                optimizer.step()
    for a, b in zip(plain[0].parameters(), guarded[0].parameters(), strict=True):
        assert torch.equal(a, b)
    assert str(plain[1].state_dict()) == str(guarded[1].state_dict())

    model, optimizer = guarded
    before = str(optimizer.state_dict()), [p.clone() for p in model.parameters()]
    backward(model, float("nan"))
    with guarded_optimizer(optimizer, torch.tensor(False), leave_step_counts=True):
        optimizer.step()
    assert "step" not in optimizer.__dict__ or optimizer.step.__name__ != "guarded_step"
    assert all(torch.equal(a, b) for a, b in zip(before[1], model.parameters(), strict=True))
    assert all(int(s["step"]) == 3 for s in optimizer.state.values())
    rewind_step_counts(optimizer, 1, None)
    assert str(optimizer.state_dict()) == before[0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"grad_clip": -1.0}, "grad_clip=-1.0 must be positive, or null for no clipping."),
        ({"grad_clip": 0.0}, "grad_clip=0.0 must be positive, or null for no clipping."),
        (
            {"model_overrides": {"initializer_range": -0.02}},
            "model_overrides.initializer_range=-0.02 must be positive (the std of the normal init).",
        ),
        (
            {"model_overrides": {"mtp_loss_scaling_factor": -0.1}},
            "model_overrides.mtp_loss_scaling_factor=-0.1 must be 0 or more.",
        ),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ConfigError, match=f"^{message}$".replace("(", r"\(").replace(")", r"\)")):
        LingModule(**kwargs)


def test_bad_policies_fail_at_construction():
    with pytest.raises(ConfigError, match="nonfinite.action='retry' must be 'skip' or 'stop'."):
        NonFinitePolicy(action="retry")
    with pytest.raises(ConfigError, match="nonfinite.max_consecutive=0 must be a positive number of steps"):
        NonFinitePolicy(max_consecutive=0)
    assert LingModule(grad_clip=None).hparams["nonfinite"] == {"action": "skip", "max_consecutive": 3}


def test_no_clipping_leaves_the_gradients_alone():
    from ling.parallel.clip import clip_grad_norm_

    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    assert float(clip_grad_norm_([p], None)) == 5.0 and p.grad.tolist() == [3.0, 4.0, 0.0]
    with pytest.raises(ValueError, match="max_norm=-1.0 must be positive"):
        clip_grad_norm_([p], -1.0)
    clip_grad_norm_([p], 1.0)
    assert p.grad.tolist() == pytest.approx([0.6, 0.8, 0.0], abs=1e-6)


def test_a_crash_in_sample_text_at_fit_end_keeps_last_ckpt(tmp_path, monkeypatch):
    """ModelCheckpoint writes last.ckpt at fit end here (no checkpoint was due before), and Lightning runs
    it after every other callback: the sample writes it first, then fails, and the failure is raised."""
    import callbacks.sample_text

    def fail(*args, **kwargs):
        raise RuntimeError("generation failed")

    monkeypatch.setattr(callbacks.sample_text, "generate", fail)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_last=True)
    with pytest.raises(RuntimeError, match="generation failed"):
        trainer(tmp_path, 2, [SampleText(), ckpt], checkpoints=True).fit(make_module(), datamodule=make_data())
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 2


def test_non_finite_weights_are_not_exported(tmp_path):
    class Poison(L.Callback):
        def on_train_end(self, trainer, pl_module):
            with torch.no_grad():
                next(pl_module.model.parameters())[0] = float("nan")

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    export = HFExport(dirpath=str(tmp_path / "hf"))
    with pytest.raises(NonFiniteError, match="the weights at step 2 hold NaN or inf values, so no Hugging Face"):
        trainer(tmp_path, 2, [Poison(), export, ckpt], checkpoints=True).fit(make_module(), datamodule=make_data())
    assert not (tmp_path / "hf").exists()
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 and all(torch.isfinite(v).all() for v in last["state_dict"].values())
