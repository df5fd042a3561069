"""LR schedules and the batch-size ramp against hand-worked values and formulas evaluated here with `math`."""

import io
import math

import pytest
import torch
from torch import nn

from ling.optim import OptimizerConfig, build_optimizer
from ling.schedules import (
    BatchRamp,
    LRSchedule,
    ScheduleConfig,
    build_scheduler,
    lr_multiplier,
    ramp_global_batch,
)


def test_wsm_is_linear_warmup_then_constant_forever():
    cfg = ScheduleConfig(name="wsm", warmup_steps=4)
    values = [lr_multiplier(cfg, step, None) for step in (0, 1, 3, 4, 40)]
    assert values == [0.25, 0.5, 1.0, 1.0, 1.0]
    # No end step needed; a given one changes nothing.
    assert lr_multiplier(cfg, 10**9, 100) == 1.0


def test_zero_warmup_starts_at_peak():
    assert lr_multiplier(ScheduleConfig(name="wsm", warmup_steps=0), 0, None) == 1.0


# total 100, warmup 10, decay over the last 0.2 * 100 = 20 steps (window starts at step 80),
# min_lr_ratio 0.1: value = 0.1 + 0.9 * shape(p), p = (step - 80) / 20.
WSD_STEPS = (0, 9, 50, 79, 80, 90, 99, 150)
WSD_EXPECTED = {
    "linear": [0.1, 1.0, 1.0, 1.0, 1.0, 0.1 + 0.9 * 0.5, 0.1 + 0.9 * 0.05, 0.1],
    "cosine": [
        0.1,
        1.0,
        1.0,
        1.0,
        1.0,
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)),
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.95)),
        0.1,
    ],
    "1-sqrt": [0.1, 1.0, 1.0, 1.0, 1.0, 0.1 + 0.9 * (1 - math.sqrt(0.5)), 0.1 + 0.9 * (1 - math.sqrt(0.95)), 0.1],
}


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_wsd_values(shape):
    cfg = ScheduleConfig(name="wsd", warmup_steps=10, decay_fraction=0.2, decay_shape=shape, min_lr_ratio=0.1)
    got = [lr_multiplier(cfg, step, 100) for step in WSD_STEPS]
    assert got == pytest.approx(WSD_EXPECTED[shape], abs=1e-12)
    # The config's total_steps wins over the trainer's.
    cfg.total_steps = 100
    assert [lr_multiplier(cfg, step, 7) for step in WSD_STEPS] == pytest.approx(WSD_EXPECTED[shape], abs=1e-12)


def test_wsd_decay_window_never_overlaps_warmup():
    # decay_fraction 1 with warmup 5 of 20: warmup, then linear decay over steps 5..20.
    cfg = ScheduleConfig(name="wsd", warmup_steps=5, decay_fraction=1.0, decay_shape="linear")
    assert [lr_multiplier(cfg, s, 20) for s in (0, 4, 5, 8, 20)] == pytest.approx([0.2, 1.0, 1.0, 0.8, 0.0])


def test_cosine_values():
    # warmup 10, total 110: cosine over 100 steps from step 10, min 0.1.
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    got = [lr_multiplier(cfg, s, 110) for s in (0, 9, 10, 35, 60, 110, 500)]
    expected = [0.1, 1.0, 1.0, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), 0.55, 0.1, 0.1]
    assert got == pytest.approx(expected, abs=1e-12)


def test_lambda_lr_on_adamw_sets_every_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    optimizer = build_optimizer(model, OptimizerConfig(lr=0.02))
    cfg = ScheduleConfig(name="wsd", warmup_steps=10, decay_fraction=0.2, decay_shape="1-sqrt", min_lr_ratio=0.1)
    scheduler = build_scheduler(optimizer, LRSchedule(cfg, 100, peak=0.02))
    expected = dict(zip(WSD_STEPS, WSD_EXPECTED["1-sqrt"]))
    assert len(optimizer.param_groups) == 2
    for n in range(151):
        if n in expected:
            for group in optimizer.param_groups:
                assert group["lr"] == pytest.approx(0.02 * expected[n], rel=1e-12)
        optimizer.step()
        scheduler.step()


def test_a_new_peak_is_used_from_the_next_step():
    optimizer = build_optimizer(nn.Linear(2, 2), OptimizerConfig(lr=0.02))
    cfg = ScheduleConfig(name="wsm", warmup_steps=4)
    schedule = LRSchedule(cfg, None, peak=0.02)
    scheduler = build_scheduler(optimizer, schedule)
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == [0.02 * 0.5] * 2  # step 1 of 4 warmup steps: 2 / 4
    schedule.peak = 0.01
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == [0.01 * 0.75] * 2


def test_scheduler_state_round_trips():
    # Lightning saves scheduler.state_dict() in checkpoints: it loads with weights_only=True and resumes at
    # the same step; of the schedule it holds only the peak, so a resumed run keeps its own settings.
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(model, OptimizerConfig(lr=1.0))
    scheduler = build_scheduler(optimizer, LRSchedule(ScheduleConfig(name="wsm", warmup_steps=4), None, 0.5))
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    fresh_optimizer = build_optimizer(model, OptimizerConfig(lr=1.0))
    fresh_schedule = LRSchedule(ScheduleConfig(name="wsm", warmup_steps=8), None, 2.0)
    fresh = build_scheduler(fresh_optimizer, fresh_schedule)
    state = torch.load(buffer, weights_only=True)
    assert state["lr_lambdas"] == [{"peak": 0.5}] * len(optimizer.param_groups)
    fresh.load_state_dict(state)
    fresh_optimizer.step()
    fresh.step()
    assert fresh_schedule.peak == 0.5 and fresh_schedule.config.warmup_steps == 8
    assert fresh_optimizer.param_groups[0]["lr"] == 0.5 * 0.5  # step 3 of the fresh 8-step warmup: 4 / 8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(warmup_steps=-1), "warmup_steps must be >= 0, got -1"),
        (dict(decay_fraction=0.0), r"decay_fraction must be in \(0, 1\], got 0.0"),
        (dict(decay_fraction=1.5), r"decay_fraction must be in \(0, 1\], got 1.5"),
        (dict(min_lr_ratio=-0.1), r"min_lr_ratio must be in \[0, 1\], got -0.1"),
        (dict(min_lr_ratio=2.0), r"min_lr_ratio must be in \[0, 1\], got 2.0"),
        (dict(total_steps=0), "total_steps must be > 0 or None, got 0"),
        (dict(name="step"), "name must be .*, got 'step'"),
        (dict(decay_shape="exp"), "decay_shape must be .*, got 'exp'"),
    ],
)
def test_schedule_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScheduleConfig(**kwargs)


@pytest.mark.parametrize("name", ["wsd", "cosine"])
def test_decaying_schedules_need_an_end(name):
    cfg = ScheduleConfig(name=name, warmup_steps=10)
    optimizer = build_optimizer(nn.Linear(2, 2), OptimizerConfig())
    for total in (None, -1):  # -1 is Lightning's "no max_steps"
        with pytest.raises(ValueError, match=f"'{name}' schedule needs an end step.*schedule.total_steps.*max_steps"):
            build_scheduler(optimizer, LRSchedule(cfg, total, 1.0))
    with pytest.raises(ValueError, match="warmup_steps=10 and total_steps=10"):
        lr_multiplier(cfg, 0, 10)


def test_batch_ramp_hand_example():
    # start 4, increment 2, target 10, 30 ramp samples: 3 increments, one every 10 samples.
    # consumed before each step: 0, 4, 8, 12, 18, 24, 32, 42 -> floor(c / 10) = 0, 0, 0, 1, 1, 2, 3, 4 (capped at 3).
    ramp = BatchRamp(start=4, increment=2, ramp_samples=30)
    assert [ramp_global_batch(ramp, 10, c) for c in (0, 4, 8, 12, 18, 24, 32, 42)] == [4, 4, 4, 6, 6, 8, 10, 10]
    assert [ramp_global_batch(ramp, 10, c) for c in (9, 10, 29, 30, 10**6)] == [4, 6, 8, 10, 10]


def test_batch_ramp_uneven_increments():
    # start 2, increment 2, target 8, 10 ramp samples: 3 increments every 10/3 samples.
    # consumed 0, 2, 4, 8, 14, 22 -> floor(c * 3 / 10) = 0, 0, 1, 2, 4, 6 -> batch 2, 2, 4, 6, 8 (cap), 8.
    assert [ramp_global_batch(BatchRamp(2, 2, 10), 8, c) for c in (0, 2, 4, 8, 14, 22)] == [2, 2, 4, 6, 8, 8]
    # Half the ramp (9 of 18 samples) of 14 increments is exactly 7 increments, which a float
    # floor(9 / (18 / 14)) would round down to 6.
    assert ramp_global_batch(BatchRamp(1, 1, 18), 15, 9) == 8


def test_no_ramp_or_nothing_to_ramp_is_the_target():
    assert [ramp_global_batch(None, 10, c) for c in (0, 10, 20)] == [10, 10, 10]
    assert ramp_global_batch(BatchRamp(10, 2, 30), 10, 0) == 10
    assert ramp_global_batch(BatchRamp(4, 2, 0), 10, 0) == 10


@pytest.mark.parametrize(
    ("args", "target", "message"),
    [
        ((0, 2, 30), 10, "start must be > 0, got 0"),
        ((4, 0, 30), 10, "increment must be > 0, got 0"),
        ((4, 2, -1), 10, "ramp_samples must be >= 0, got -1"),
        ((12, 2, 30), 10, r"start \(12\) must be <= the target global batch size \(10\)"),
        ((4, 4, 30), 10, "from 4 to the target 10 is not a whole number of increments of 4"),
    ],
)
def test_batch_ramp_errors(args, target, message):
    with pytest.raises(ValueError, match=message):
        ramp_global_batch(BatchRamp(*args), target, 0)
