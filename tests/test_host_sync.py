"""A training step leaves the host free to run ahead of the accelerator.

On a GPU the host waits for the device whenever the step needs a value computed there: a Python
conversion of a device tensor (`.item()`, `.tolist()`, `bool()`, `int()`, `float()`), an op whose
output shape depends on the data (`nonzero`, `bincount`, boolean-mask indexing, `repeat_interleave`
without `output_size`, `unique`, ...) or a blocking `barrier`. A CPU run cannot feel these waits, so
`SyncCounter` counts where they are asked for, and whole training steps (one process here, two gloo
ranks with ep=2 in `tests/dist/sync_step.py`) are held to a short allowed list, each entry with its
reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from parallel_setup import make_data, make_module
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
_TORCH = Path(torch.__file__).resolve().parent
_HERE = Path(__file__).resolve()
# Frames that only carry a call into the counter; the site of an event is the first frame outside them.
_CARRIERS = {_HERE, _TORCH / "_ops.py", _TORCH / "utils" / "_python_dispatch.py"}
_PROJECT = ("ling/", "callbacks/", "eval/", "recipes/")

# aten ops whose result the host must know before it can go on (output shape or a Python value).
_DATA_DEPENDENT = {
    "nonzero", "nonzero_numpy", "argwhere", "bincount", "masked_select", "_local_scalar_dense", "is_nonzero",
    "equal", "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive", "histogram",
}  # fmt: skip
# Indexing ops that turn a boolean mask into positions first (a nonzero on the device).
_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl", "_index_put_impl_"}
# Python conversions of a tensor: each reads its data on the host.
_CONVERSIONS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu")


def _short(path: Path) -> str:
    for base in (_TORCH.parent, ROOT):  # torch and lightning as their package paths, then this project
        if path.is_relative_to(base):
            return str(path.relative_to(base))
    return str(path)


def _sites() -> tuple[str, str]:
    """(innermost frame of this project's code, innermost frame of any code) of the current call, as
    path:function; "-" where the call does not pass through the project."""
    frame, inner = sys._getframe(2), None
    while frame is not None:
        path = Path(frame.f_code.co_filename).resolve()
        if path not in _CARRIERS:
            where = f"{_short(path)}:{frame.f_code.co_name}"
            inner = inner or where
            if where.startswith(_PROJECT):
                return where, inner
        frame = frame.f_back
    return "-", inner or "-"


class SyncCounter(TorchDispatchMode):
    """Counts, while active, what would make the host wait for a GPU: data-dependent aten ops (seen by
    this dispatch mode), Python conversions of tensors (patched on torch.Tensor: on CPU `.tolist()`
    does not go through the dispatcher) and `torch.distributed.barrier`.

    `events` maps (what, project site, innermost site) to a count; what is an aten op name or `Tensor.<method>`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.events: Counter[tuple[str, str, str]] = Counter()
        self._converting = False
        self._saved: dict[str, object] = {}

    def _record(self, what: str) -> None:
        self.events[(what, *_sites())] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if not self._converting:  # a conversion's own _local_scalar_dense is counted as the conversion
            if name in _DATA_DEPENDENT:
                self._record(f"aten.{name}")
            elif name == "repeat_interleave" and kwargs.get("output_size") is None:
                self._record("aten.repeat_interleave without output_size")
            elif name in _INDEXING and _has_mask(args[1] if len(args) > 1 else kwargs.get("indices")):
                self._record(f"aten.{name} with a boolean mask")
        return func(*args, **kwargs)

    def _wrap(self, what: str, original):
        counter = self

        def counted(*args, **kwargs):
            if counter._converting:
                return original(*args, **kwargs)
            counter._record(what)
            counter._converting = True
            try:
                return original(*args, **kwargs)
            finally:
                counter._converting = False

        return counted

    def __enter__(self):
        for method in _CONVERSIONS:
            self._saved[method] = torch.Tensor.__dict__.get(method)
            setattr(torch.Tensor, method, self._wrap(f"Tensor.{method}", getattr(torch.Tensor, method)))
        self._saved["barrier"] = dist.barrier
        dist.barrier = self._wrap("torch.distributed.barrier", dist.barrier)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            dist.barrier = self._saved.pop("barrier")
            for method in _CONVERSIONS:
                saved = self._saved.pop(method)
                if saved is None:  # inherited from torch._C.TensorBase
                    delattr(torch.Tensor, method)
                else:
                    setattr(torch.Tensor, method, saved)

    def by_what(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for (what, _, _), n in self.events.items():
            out[what] += n
        return out


def _has_mask(indices) -> bool:
    if not isinstance(indices, list | tuple):
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


class CountSteps(L.Callback):
    """A `SyncCounter` around each training step (from on_train_batch_start to on_train_batch_end: the
    step itself and Lightning's manual-optimization loop, not the logger's work after the step)."""

    def __init__(self) -> None:
        self.steps: list[SyncCounter] = []
        self.micro_batches: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.micro_batches.append(batch["input_ids"].shape[0])
        self.steps.append(SyncCounter())
        self.steps[-1].__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[-1].__exit__(None, None, None)

    def report(self, pl_module, ep: int) -> dict:
        """What the steps asked for, with what the allowed list needs to know, as plain data."""
        return {
            "ep": ep,
            "moe_layers": len(pl_module.moe_layer_names),
            "params": sum(1 for p in pl_module.parameters() if p.requires_grad),
            "micro_batches": self.micro_batches,
            "steps": [[[*key, n] for key, n in sorted(c.events.items())] for c in self.steps],
        }


# The optimizer steps through `ling.lightning_module.guarded_optimizer`, which skips a non-finite step on the device.
OPTIMIZER_STEP_COUNTS = ("Tensor.item", "ling/nonfinite.py:guarded_step", "torch/optim/")
EP_SPLITS = ("Tensor.tolist", *["ling/parallel/expert_parallel.py:_dispatch"] * 2)


def allowed(report: dict, micro_batches: int) -> dict[tuple[str, str, str], tuple[int, str]]:
    """The waits one step may ask for: (what, project site, innermost site prefix) -> (most per step, why)."""
    rules = {
        OPTIMIZER_STEP_COUNTS: (
            report["params"],
            "host memory: AdamW (neither capturable nor fused) keeps each parameter's step count on the host",
        ),
    }
    if report["ep"] > 1:
        rules[EP_SPLITS] = (
            report["moe_layers"] * micro_batches,
            "one per expert-parallel dispatch: all_to_all takes its split sizes as host numbers",
        )
    return rules


def unexplained(events: list[list], rules: dict) -> list[str]:
    """The events no rule allows, and the rules whose count was exceeded, as readable lines."""
    used: Counter = Counter()
    problems = []
    for what, site, inner, n in events:
        rule = next((key for key in rules if key[:2] == (what, site) and inner.startswith(key[2])), None)
        if rule is None:
            problems.append(f"{n} x {what} at {site} (innermost {inner})")
        else:
            used[rule] += n
    for rule, n in used.items():
        if n > rules[rule][0]:
            problems.append(f"{n} x {rule[0]} at {rule[1]}, more than the {rules[rule][0]} allowed ({rules[rule][1]})")
    return problems


def count_of(events: list[list], rule: tuple[str, str, str]) -> int:
    return sum(n for what, site, inner, n in events if (what, site) == rule[:2] and inner.startswith(rule[2]))


def check_steps(report: dict) -> None:
    assert len(report["steps"]) == 2
    for events, micro_batches in zip(report["steps"], report["micro_batches"], strict=True):
        assert unexplained(events, allowed(report, micro_batches)) == []
        # The counter was on during the step: it saw the optimizer read its host step counts.
        assert 0 < count_of(events, OPTIMIZER_STEP_COUNTS) <= report["params"]
        if report["ep"] > 1:  # exactly one read of split sizes per MoE layer and micro-batch
            assert count_of(events, EP_SPLITS) == report["moe_layers"] * micro_batches


# ---- the counter sees what it is meant to see -------------------------------------------------------


def test_counter_sees_each_kind_of_wait():
    x, slots = torch.arange(6.0), torch.tensor([2, 0, 2, 1])
    with SyncCounter() as counter:
        torch.bincount(slots, minlength=3)
        slots.tolist()
        x.sum().item()
        bool(x.sum() > 0)
        int(x[0])
        float(x[1])
        x[x > 2]
        x[x > 4] = 0.0
        torch.repeat_interleave(torch.tensor([1, 2]), torch.tensor([2, 1]))
        slots.nonzero()
        torch.unique(slots)
        with pytest.raises(ValueError):  # counted before it runs (and fails: no process group here)
            dist.barrier()
    seen = counter.by_what()
    assert seen == {
        "aten.bincount": 1, "Tensor.tolist": 1, "Tensor.item": 1, "Tensor.__bool__": 1, "Tensor.__int__": 1,
        "Tensor.__float__": 1, "aten.index with a boolean mask": 1, "aten.index_put_ with a boolean mask": 1,
        "aten.repeat_interleave without output_size": 1, "aten.nonzero": 1, "aten._unique2": 1,
        "torch.distributed.barrier": 1,
    }  # fmt: skip


def test_counter_passes_what_needs_no_wait_and_restores_torch():
    slots = torch.tensor([2, 0, 2, 1])
    methods = {m: torch.Tensor.__dict__.get(m) for m in _CONVERSIONS}
    with SyncCounter() as counter:
        counts = torch.zeros(3, dtype=torch.int64).scatter_add_(0, slots, torch.ones_like(slots))
        torch.repeat_interleave(torch.tensor([1, 2]), torch.tensor([2, 1]), output_size=3)
        slots.argsort(stable=True)
        slots[torch.tensor([0, 3])]
        len(slots), slots.shape[0], slots.numel()
    assert counter.events == {}
    assert counts.tolist() == [1, 1, 2]  # the same counts as torch.bincount gives
    assert {m: torch.Tensor.__dict__.get(m) for m in _CONVERSIONS} == methods
    assert dist.barrier.__name__ == "barrier"


def test_expert_major_order_never_waits():
    from ling.parallel.expert_parallel import expert_major_order

    received = torch.tensor([[2, 1], [1, 3]])
    with SyncCounter() as quiet:
        order = expert_major_order(received, total=7)
    assert quiet.events == {}
    assert order.tolist() == [0, 1, 3, 2, 4, 5, 6]


def test_source_rows_stay_on_the_host_when_the_batch_moves():
    from ling.data.datamodule import LingDataModule

    batch = {"input_ids": torch.zeros(1, 2, 4, dtype=torch.long), "stage": 0, "source_rows": torch.tensor([1, 1])}
    moved = LingDataModule().transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert moved["input_ids"].device.type == "meta" and moved["stage"] == 0
    assert moved["source_rows"] is batch["source_rows"]  # not copied anywhere


# ---- whole training steps ---------------------------------------------------------------------------


def train_counted(tmp_path, steps: int) -> dict:
    count, module = CountSteps(), make_module()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, enable_checkpointing=False, callbacks=[count], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=make_data())
    return count.report(module, ep=1)


def test_training_step_waits_only_where_allowed(tmp_path):
    """Two steps of the tiny model in one process: 4 micro-batches of 2 rows, 3 MoE layers (two decoder
    layers and the MTP layer), gradient clipping, the bias update and every log of the step."""
    report = train_counted(tmp_path, steps=2)
    assert report["micro_batches"] == [4, 4] and report["moe_layers"] == 3
    check_steps(report)


def test_a_wait_added_to_the_step_is_reported(tmp_path, monkeypatch):
    """The harness catches a regression: MoE layers that count with bincount and read the counts back."""
    from ling.model.moe import MoE

    original = MoE.forward

    def forward(self, x):
        y, stats = original(self, x)
        torch.bincount(stats.tokens_per_expert, minlength=self.num_experts)
        stats.tokens_per_expert.tolist()
        return y, stats

    monkeypatch.setattr(MoE, "forward", forward)
    report = train_counted(tmp_path, steps=1)
    problems = unexplained(report["steps"][0], allowed(report, report["micro_batches"][0]))
    # once per MoE layer (3) and micro-batch (4), named by the project code that ran the layer
    assert [line.split(" (innermost")[0] for line in problems] == [
        "12 x Tensor.tolist at ling/model/block.py:forward",
        "12 x aten.bincount at ling/model/block.py:forward",
    ]


@pytest.mark.slow
def test_expert_parallel_step_waits_once_per_dispatch(tmp_path):
    """The same steps on two gloo ranks with dp_shard=2 and ep=2: each rank also reads the split sizes
    of each all-to-all dispatch, once, and nothing else."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "tests/dist/sync_step.py", "--dims", "1,2,2", "--out", str(tmp_path / "counts")]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        report = json.loads((tmp_path / f"counts.{rank}.json").read_text())
        assert report["micro_batches"] == [2, 2] and report["ep"] == 2
        check_steps(report)
