"""The in-training lm-eval hook (callbacks/lm_eval.py): when it runs, what it logs and writes, scores
against a hand computation, training left exactly as it was, and 2 processes scoring like one."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from parallel_setup import make_data
from parallel_setup import make_module as make_parallel_module

import callbacks.lm_eval as lm_eval_callback
from callbacks.lm_eval import LMEval
from ling.config import ConfigError
from ling.data.curriculum import Stage
from ling.data.datamodule import LingDataModule
from ling.data.tokenizer import ByteTokenizer
from ling.lightning_module import LingModule
from ling.schedules import ScheduleConfig

ROOT = Path(__file__).resolve().parents[1]

# Sums with answers of different lengths, so acc and acc_norm can disagree.
MC_DOCS = [
    {"question": "3+4=", "choices": ["7", "12", "34"], "answer": 0},
    {"question": "10+5=", "choices": ["105", "15"], "answer": 1},
    {"question": "2+2=", "choices": ["22", "4", "5"], "answer": 1},
    {"question": "9+9=", "choices": ["18", "99"], "answer": 0},
    {"question": "6+1=", "choices": ["61", "7"], "answer": 1},
    {"question": "1+8=", "choices": ["9", "18", "81"], "answer": 0},
]
PPL_DOCS = [
    {"text": "To be, or not to be, that is the question."},
    {"text": "All the world's a stage."},
    {"text": "12+30=42\n7+8=15"},
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Two local tasks (multiple choice and rolling log-likelihood) in the form lm-eval's own tests use."""
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "mc.json").write_text(json.dumps(MC_DOCS))
    (folder / "ppl.json").write_text(json.dumps(PPL_DOCS))
    common = "dataset_path: json\ntest_split: test\nmetadata: {version: 1.0}\n"
    (folder / "mc.yaml").write_text(
        f"task: cb_mc\n{common}dataset_kwargs: {{data_files: {{test: {folder / 'mc.json'}}}}}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_target: answer\n"
        "doc_to_choice: '{{choices}}'\nmetric_list: [{metric: acc}, {metric: acc_norm}]\n"
    )
    (folder / "ppl.yaml").write_text(
        f"task: cb_ppl\n{common}dataset_kwargs: {{data_files: {{test: {folder / 'ppl.json'}}}}}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list: [{metric: word_perplexity}, {metric: byte_perplexity}, {metric: bits_per_byte}]\n"
    )
    return folder


def make_module(**overrides) -> LingModule:
    torch.manual_seed(0)
    return LingModule(
        model="tiny", model_overrides=overrides or None, bias_update_rate=0.01,
        schedule=ScheduleConfig(name="wsm", warmup_steps=3),
    )  # fmt: skip


def staged_data() -> LingDataModule:
    """Stage a for steps 1-2, b (another rope theta) for 3-4, c from step 5."""
    stages = [
        Stage("a", steps=2, seq_len=32),
        Stage("b", steps=2, seq_len=64, rope_theta=50000.0),
        Stage("c", seq_len=32),
    ]
    return LingDataModule(seq_len=32, micro_batch_size=4, global_batch_size=8, seed=7, stages=stages)


def make_trainer(root: Path, steps: int, callbacks: list, logger=False) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_steps=steps, logger=logger, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, enable_checkpointing=False, default_root_dir=root, callbacks=callbacks,
    )  # fmt: skip


class Losses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


class WatchedLMEval(LMEval):
    """Records what each evaluation saw, and what it left behind."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def evaluate(self, trainer, pl_module, prefix="eval"):
        model = pl_module.model
        modes = [m.training for m in model.modules()]
        rng = torch.get_rng_state()
        next_draw = torch.rand(4)
        torch.set_rng_state(rng)
        metrics = super().evaluate(trainer, pl_module, prefix)
        assert [m.training for m in model.modules()] == modes
        assert all(p.grad is None for p in model.parameters())
        assert torch.equal(torch.rand(4), next_draw)  # the random stream goes on where it was
        torch.set_rng_state(rng)
        self.seen.append((trainer.global_step, model.config.rope_theta))
        return metrics


# ---- configuration -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tasks": []}, "tasks=\\[\\] must be a non-empty list"),
        ({"tasks": "cb_mc"}, "must be a non-empty list"),
        ({"every_n_steps": 0}, "every_n_steps=0 must be a positive number"),
        ({"limit": 0}, "limit=0 for task 'cb_mc' must be a positive number"),
        ({"limit": -0.5}, "limit=-0.5 for task 'cb_mc' must be a positive"),
        ({"limit": {"cb_mc": 0}}, "limit=0 for task 'cb_mc'"),
        ({"limit": {"other": 2}}, "limit names task 'other', which is not in tasks"),
        ({"batch_size": 0}, "batch_size=0 must be a positive integer"),
        ({"max_length": 0}, "max_length=0 must be a positive number of tokens"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LMEval(**{"tasks": ["cb_mc"], **kwargs})


def test_unknown_task_fails_before_training(tmp_path, task_dir):
    losses = Losses()
    callback = LMEval(tasks=["cb_mc", "cb_typo"], include_path=[str(task_dir)])
    with pytest.raises(ConfigError, match="task 'cb_typo' is not in .*; known tasks: cb_mc, cb_ppl"):
        make_trainer(tmp_path, 2, [losses, callback]).fit(make_module(), datamodule=staged_data())
    assert losses.losses == []
    with pytest.raises(ConfigError, match="include_path '/no/such/folder' is not a folder"):
        make_trainer(tmp_path, 2, [LMEval(tasks=["cb_mc"], include_path=["/no/such/folder"])]).fit(
            make_module(), datamodule=staged_data()
        )


# ---- when it runs, what it logs and writes ----------------------------------------------------------------
@pytest.mark.parametrize("lookahead", [True, False], ids=["curriculum", "batch-stage"])
def test_evaluates_every_n_steps_at_stage_ends_and_at_the_end(tmp_path, task_dir, capsys, monkeypatch, lookahead):
    if not lookahead:  # a data module without a curriculum: the stage change is seen in the next batch
        import callbacks.stages

        monkeypatch.setattr(callbacks.stages, "curriculum", lambda trainer: None)
    callback = WatchedLMEval(tasks=["cb_mc"], every_n_steps=3, limit=3, include_path=[str(task_dir)])
    logger = CSVLogger(tmp_path, name="logs")
    make_trainer(tmp_path, 5, [callback], logger=logger).fit(make_module(), datamodule=staged_data())

    # Steps 2 and 4 end stages a and b (each scored with its own rope theta, before the next stage
    # applies its own), step 3 is the every-3 one, step 5 the end; each once.
    assert callback.seen == [(2, 10000.0), (3, 50000.0), (4, 50000.0), (5, 10000.0)]
    assert sorted(callback.scores) == [2, 3, 4, 5]
    assert all(set(s) == {"eval/cb_mc/acc", "eval/cb_mc/acc_norm"} for s in callback.scores.values())

    out = Path(logger.log_dir) / "lm_eval"  # beside the checkpoints, <log dir>/checkpoints
    assert sorted(p.name for p in out.iterdir()) == [f"step={n}.json" for n in (2, 3, 4, 5)]  # no temporaries
    saved = json.loads((out / "step=4.json").read_text())
    assert saved["step"] == 4
    assert saved["versions"] == {"cb_mc": 1.0}
    assert saved["configs"]["cb_mc"]["output_type"] == "multiple_choice"
    assert saved["n-samples"]["cb_mc"] == {"original": 6, "effective": 3}
    assert saved["results"]["cb_mc"]["acc,none"] == callback.scores[4]["eval/cb_mc/acc"]

    rows = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    logged = [dict(zip(header, row.split(","))) for row in rows[1:]]
    logged = {int(r["step"]): float(r["eval/cb_mc/acc"]) for r in logged if r.get("eval/cb_mc/acc")}
    assert logged == {step: s["eval/cb_mc/acc"] for step, s in callback.scores.items()}

    printed = capsys.readouterr().out
    assert "lm-eval at step 5:" in printed
    assert f"  cb_mc  acc_norm  {callback.scores[5]['eval/cb_mc/acc_norm']:.4f}\n" in printed


def test_only_at_the_end_by_default_without_stages(tmp_path, task_dir):
    callback = WatchedLMEval(tasks=["cb_mc"], limit=2, include_path=[str(task_dir)], output_dir=str(tmp_path / "e"))
    data = LingDataModule(seq_len=32, micro_batch_size=4, global_batch_size=8, seed=7)
    make_trainer(tmp_path, 3, [callback]).fit(make_module(), datamodule=data)
    assert [step for step, _ in callback.seen] == [3]
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["step=3.json"]


# ---- the scores -------------------------------------------------------------------------------------------
def continuation_logprob(model, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) from one forward pass over the whole sequence."""
    ids = torch.tensor([context + continuation])
    logprobs = F.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    targets = ids[0, 1:]
    picked = logprobs[torch.arange(len(targets)), targets]
    return float(picked[len(context) - 1 :].sum())


def hand_scores(model) -> dict[str, float]:
    """The two tasks scored by hand: bytes as tokens, the choice after a space, texts after end-of-text."""
    tok = ByteTokenizer()
    acc, acc_norm = [], []
    for doc in MC_DOCS[:4]:
        lls = [continuation_logprob(model, tok.encode(doc["question"]), tok.encode(" " + c)) for c in doc["choices"]]
        acc.append(max(range(len(lls)), key=lambda i: lls[i]) == doc["answer"])
        norm = [ll / len(c) for ll, c in zip(lls, doc["choices"])]
        acc_norm.append(max(range(len(norm)), key=lambda i: norm[i]) == doc["answer"])
    ll = sum(continuation_logprob(model, [tok.eos_token_id], tok.encode(d["text"])) for d in PPL_DOCS)
    words = sum(len(d["text"].split()) for d in PPL_DOCS)
    n_bytes = sum(len(d["text"].encode()) for d in PPL_DOCS)
    return {
        "eval/cb_mc/acc": sum(acc) / 4,
        "eval/cb_mc/acc_norm": sum(acc_norm) / 4,
        "eval/cb_ppl/word_perplexity": math.exp(-ll / words),
        "eval/cb_ppl/byte_perplexity": math.exp(-ll / n_bytes),
        "eval/cb_ppl/bits_per_byte": -ll / n_bytes / math.log(2),
    }


def test_scores_match_a_hand_computation_and_the_entry_point(tmp_path, task_dir):
    callback = LMEval(
        tasks=["cb_mc", "cb_ppl"], limit={"cb_mc": 4}, include_path=[str(task_dir)], output_dir=str(tmp_path / "e")
    )
    module = make_module()
    trainer = make_trainer(tmp_path, 3, [callback])
    trainer.fit(module, datamodule=staged_data())
    module.model.eval()
    with torch.no_grad():
        expected = hand_scores(module.model)
    assert callback.scores[3].keys() == expected.keys()
    for name, value in expected.items():
        assert callback.scores[3][name] == pytest.approx(value, rel=1e-5), name
    saved = json.loads((tmp_path / "e" / "step=3.json").read_text())
    assert saved["n-samples"] == {"cb_mc": {"original": 6, "effective": 4}, "cb_ppl": {"original": 3, "effective": 3}}
    assert saved["config"]["limit"] == {"cb_mc": 4, "cb_ppl": None}

    # What a weight-merging callback calls: the same weights give the same scores, under its prefix.
    module.model.train()
    again = callback.evaluate(trainer, module, prefix="wsm/eval")
    assert again == {name.replace("eval/", "wsm/eval/", 1): v for name, v in callback.scores[3].items()}
    assert float(trainer.callback_metrics["wsm/eval/cb_ppl/bits_per_byte"]) == pytest.approx(
        again["wsm/eval/cb_ppl/bits_per_byte"]
    )
    assert (tmp_path / "e" / "wsm_eval.step=3.json").is_file()
    assert module.model.training


# ---- training left as it was ---------------------------------------------------------------------------------
def test_training_is_exactly_the_same_with_evaluations(tmp_path, task_dir):
    """With attention dropout, training draws from torch's generator, which lm-eval reseeds; eval mode
    would switch the dropout off: the losses and weights only match if both are put back."""

    def run(callbacks):
        losses, module = Losses(), make_module(attention_dropout=0.1)
        make_trainer(tmp_path, 5, [losses, *callbacks]).fit(module, datamodule=staged_data())
        return losses.losses, module.model.state_dict()

    callback = WatchedLMEval(
        tasks=["cb_mc", "cb_ppl"], every_n_steps=2, limit=2, include_path=[str(task_dir)], output_dir=str(tmp_path)
    )
    with_eval, weights_with = run([callback])
    without, weights_without = run([])
    assert [step for step, _ in callback.seen] == [2, 4, 5]
    assert with_eval == without
    for (name, a), b in zip(weights_with.items(), weights_without.values(), strict=True):
        assert torch.equal(a, b), name


# ---- two processes --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_score_like_one(tmp_path, task_dir):
    """FSDP2 + expert parallelism (dp_shard=2, ep=2) on gloo: every rank logs rank 0's scores, which
    equal one process's, for all three request types (generation included, which rank 0 steers)."""
    settings = {
        "tasks": ["cb_mc", "cb_ppl", "ling_arithmetic_gen"],
        "every_n_steps": 2,
        "limit": {"cb_mc": 3, "cb_ppl": 3, "ling_arithmetic_gen": 2},
        "include_path": [str(task_dir), str(lm_eval_callback.TASKS_DIR)],
    }
    module, callback = make_parallel_module(), LMEval(**settings, output_dir=str(tmp_path / "one"))
    make_trainer(tmp_path, 2, [callback]).fit(module, datamodule=make_data())

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1"}
    out = tmp_path / "dist"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "tests/dist/lm_eval_run.py", "--dims", "1,2,2", "--steps", "2", "--callback", json.dumps(settings),
               "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # the same metrics on every rank
    scores = {int(step): s for step, s in ranks[0]["scores"].items()}
    assert sorted(scores) == [2]
    assert scores[2].keys() == callback.scores[2].keys()
    assert "eval/ling_arithmetic_gen/exact_match_answer-line" in scores[2]
    for name, value in callback.scores[2].items():
        assert scores[2][name] == pytest.approx(value, rel=1e-6, abs=1e-6), name
    assert sorted(p.name for p in Path(ranks[0]["output_dir"]).iterdir()) == ["step=2.json"]  # rank 0 alone writes
