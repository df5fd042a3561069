"""Bad settings through `train.py`: each stops the run before its first step with exit code 2 and
exactly one `error:` line on stderr that names the setting, without a traceback or the usage text.

Every case runs in this process through `train.cli`, the function `python train.py` runs; a few
also run as a real `python train.py` subprocess.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/tiny.yaml"


def stages(*stage: dict) -> str:
    return "--data.stages=" + json.dumps(list(stage))


def yarn(**rope_scaling) -> str:
    return stages({"name": "yarn", "rope_scaling": rope_scaling})


def sources(**spec) -> tuple[str, str]:
    """One source 'web' in place of the config's two (its stages mix those, so they go too)."""
    return "--data.sources=" + json.dumps({"web": spec}), "--data.stages=null"


def ramp(**fields) -> str:
    return "--data.batch_ramp=" + json.dumps(fields)


SHARES = {"shakespeare": 0.7, "arithmetic": 0.3}

# (id, arguments after `fit --config configs/tiny.yaml` or a whole command, a part of the error line).
# `{tmp}` is a folder holding the files the cases point at (see `files`).
CASES = [
    # ---- data and batch sizes
    ("global_batch_zero", ["--data.global_batch_size=0"], "data.global_batch_size=0 must be a positive number of rows"),
    ("global_batch_negative", ["--data.global_batch_size=-16"], "data.global_batch_size=-16 must be a positive"),
    ("micro_batch_zero", ["--data.micro_batch_size=0"], "micro_batch_size=0 must be positive"),
    ("seq_len_not_a_number", ["--data.seq_len=long"], "data.seq_len: Expected an int. Got value: long"),
    ("val_fraction_above_one", ["--data.val_fraction=1.5"], "val_fraction=1.5 must be between 0 and 1"),
    ("batch_mode_unknown", ["--data.batch_mode=rows"], "data.batch_mode='rows' is not one of tokens, sequences"),
    ("tokenizer_missing", ["--data.tokenizer=./no/tokenizer"], "tokenizer './no/tokenizer' does not exist"),
    # ---- mixtures
    (
        "stage_mixture_not_summing_to_one",
        [stages({"name": "short", "mixture": {"shakespeare": 0.7, "arithmetic": 0.4}})],
        "stage 'short' has mixture weights that sum to 1.1, not 1",
    ),
    (
        "data_mixture_not_summing_to_one",
        ['--data.mixture={"shakespeare": 2, "arithmetic": 2}', "--data.stages=null"],
        "data.mixture has mixture weights that sum to 4, not 1",
    ),
    (
        "mixture_weight_negative",
        [stages({"name": "a", "mixture": {"shakespeare": 1.3, "arithmetic": -0.3}})],
        "stage 'a' gives source 'arithmetic' weight -0.3; weights must be >= 0",
    ),
    (
        "mixture_unknown_source",
        [stages({"name": "a", "mixture": {"web": 1.0}})],
        "stage 'a' mixes source 'web', which is not in data.sources",
    ),
    (
        "mixture_all_zero",
        [stages({"name": "a", "mixture": {"shakespeare": 0, "arithmetic": 0}})],
        "stage 'a' has mixture weights that are all zero",
    ),
    # ---- curriculum stages
    (
        "stage_key_misspelt",
        [stages({"name": "a", "seqlen": 64})],
        "Stage has no setting 'seqlen'; did you mean 'seq_len'",
    ),
    ("stages_empty", ["--data.stages=[]"], "data.stages is an empty list"),
    ("stage_two_budgets", [stages({"name": "a", "tokens": 4096, "steps": 2})], "stage 'a' sets both tokens and steps"),
    ("stage_without_budget", [stages({"name": "a"}, {"name": "b"})], "stage 'a' is not the last stage"),
    ("stage_seq_len_zero", [stages({"name": "a", "seq_len": 0})], "stage 'a': seq_len=0 must be a positive integer"),
    ("stage_lr_negative", [stages({"name": "a", "lr": -1})], "stage 'a': lr=-1.0 must be a number > 0"),
    (
        "stage_bias_update_rate_negative",
        [stages({"name": "a", "bias_update_rate": -0.1})],
        "stage 'a': bias_update_rate=-0.1 must be a number >= 0",
    ),
    (
        "stage_rope_theta_zero",
        [stages({"name": "a", "rope_theta": 0})],
        "stage 'a': rope_theta=0.0 must be a number > 0",
    ),
    (
        "stage_beyond_the_context",
        [stages({"name": "long", "seq_len": 4096, "global_batch_size": 2})],
        "stage 'long' trains 4096-token rows but the model reaches 2048 positions",
    ),
    # ---- a stage's rope scaling, checked when the data module is built
    (
        "rope_factor_not_a_number",
        [yarn(type="yarn", factor="abc")],
        "stage 'yarn': rope_scaling factor='abc' must be a number",
    ),
    ("rope_factor_below_one", [yarn(type="yarn", factor=0.5)], "rope_scaling factor=0.5 must be a number >= 1"),
    (
        "rope_original_not_an_int",
        [yarn(type="yarn", factor=2.0, original_max_position_embeddings=256.5)],
        "original_max_position_embeddings=256.5 must be a positive integer",
    ),
    ("rope_unknown_key", [yarn(type="yarn", factor=2.0, scale=2)], "rope_scaling has unknown keys ['scale']"),
    ("rope_type_unsupported", [yarn(type="linear", factor=2.0)], "rope_scaling type 'linear' is not supported"),
    ("rope_without_type", [yarn(factor=2.0)], "has type 'default', which would ignore ['factor']"),
    ("rope_not_a_mapping", [stages({"name": "yarn", "rope_scaling": 2})], "data.stages.rope_scaling: Expected a dict"),
    # ---- sources
    ("source_key_misspelt", [*sources(pth="x.jsonl")], "SourceSpec has no setting 'pth'; did you mean 'path'"),
    ("source_missing", [*sources(path="./missing.jsonl")], "source 'web': './missing.jsonl' does not exist"),
    ("source_empty_file", [*sources(path="{tmp}/empty.jsonl")], "source 'web': '{tmp}/empty.jsonl' is empty"),
    ("source_blank_text", [*sources(path="{tmp}/blank.txt")], "source 'web': '{tmp}/blank.txt' is empty"),
    ("source_folder_of_empty_files", [*sources(path="{tmp}/hollow")], "all 2 files at '{tmp}/hollow' are empty"),
    ("source_format_unknown", [*sources(path="{tmp}/docs.jsonl", format="csv")], "format='csv' is not one of"),
    ("source_column_missing", [*sources(path="{tmp}/docs.jsonl", text_field="body")], "has no column 'body'"),
    # ---- the model
    ("preset_unknown", ["--model.model=huge"], "unknown model preset 'huge'"),
    (
        "override_misspelt",
        ['--model.model_overrides={"num_expert": 32}'],
        "'num_expert' is not a Ling config field (model_overrides takes config.json keys); did you mean 'num_experts'",
    ),
    ("overrides_not_a_mapping", ["--model.model_overrides=[1]"], "model.model_overrides: Expected a dict"),
    (
        "override_rope_factor_not_a_number",
        ['--model.model_overrides={"rope_scaling": {"type": "yarn", "factor": "x2"}}'],
        "rope_scaling factor='x2' must be a number >= 1",
    ),
    (
        "override_experts_indivisible",
        ['--model.model_overrides={"num_experts": 15}'],
        "num_experts=15 must be divisible by n_group=4",
    ),
    (
        "mtp_loss_scaling_factor_negative",
        ['--model.model_overrides={"mtp_loss_scaling_factor": -0.5}'],
        "model_overrides.mtp_loss_scaling_factor=-0.5 must be 0 or more",
    ),
    ("bias_update_rate_negative", ["--model.bias_update_rate=-0.001"], "bias_update_rate=-0.001 must be 0 or more"),
    ("loss_chunk_tokens_zero", ["--model.loss_chunk_tokens=0"], "loss_chunk_tokens=0 must be a positive number"),
    # ---- the optimizer
    ("lr_zero", ["--model.optimizer.lr=0"], "OptimizerConfig.lr must be > 0, got 0.0"),
    ("lr_negative", ["--model.optimizer.lr=-0.003"], "OptimizerConfig.lr must be > 0, got -0.003"),
    ("lr_not_a_number", ["--model.optimizer.lr=fast"], "model.optimizer.lr: Expected a float. Got value: fast"),
    ("beta_one", ["--model.optimizer.betas=[0.9, 1.0]"], "betas must be two values in [0, 1), got (0.9, 1.0)"),
    ("beta_negative", ["--model.optimizer.betas=[-0.1, 0.95]"], "betas must be two values in [0, 1), got (-0.1, 0.95)"),
    ("weight_decay_negative", ["--model.optimizer.weight_decay=-0.1"], "weight_decay must be >= 0, got -0.1"),
    ("eps_negative", ["--model.optimizer.eps=-1e-8"], "OptimizerConfig.eps must be >= 0, got -1e-08"),
    # ---- the schedule
    ("warmup_negative", ["--model.schedule.warmup_steps=-1"], "ScheduleConfig.warmup_steps must be >= 0, got -1"),
    (
        "schedule_unknown",
        ["--model.schedule.name=step"],
        "model.schedule.name: Expected one of 'wsm', 'wsd', 'cosine'. Got value: step",
    ),
    (
        "cosine_without_end",
        ["--model.schedule.name=cosine", "--trainer.max_steps=-1"],
        "The 'cosine' schedule needs an end step: set schedule.total_steps or trainer.max_steps",
    ),
    (
        "wsd_without_end",
        ["--model.schedule.name=wsd", "--trainer.max_steps=-1"],
        "The 'wsd' schedule needs an end step",
    ),
    (
        "warmup_not_below_total_steps",
        ["--model.schedule.name=cosine", "--model.schedule.total_steps=10", "--model.schedule.warmup_steps=10"],
        "needs warmup_steps < total_steps, got warmup_steps=10 and total_steps=10",
    ),
    (
        "warmup_not_below_max_steps",
        ["--model.schedule.name=wsd", "--trainer.max_steps=20"],
        "needs warmup_steps < total_steps, got warmup_steps=30 and total_steps=20",
    ),
    ("decay_fraction_zero", ["--model.schedule.decay_fraction=0"], "decay_fraction must be in (0, 1], got 0.0"),
    ("min_lr_ratio_above_one", ["--model.schedule.min_lr_ratio=2"], "min_lr_ratio must be in [0, 1], got 2.0"),
    # ---- the batch ramp
    (
        "ramp_start_above_target",
        [ramp(start=32, increment=4, ramp_samples=100)],
        "BatchRamp.start (32) must be <= the target global batch size (16)",
    ),
    ("ramp_increment_zero", [ramp(start=4, increment=0, ramp_samples=100)], "BatchRamp.increment must be > 0, got 0"),
    (
        "ramp_uneven_increments",
        [ramp(start=4, increment=5, ramp_samples=100)],
        "ramp from 4 to the target 16 is not a whole number of increments of 5",
    ),
    (
        "ramp_missing_fields",
        [ramp(start=4)],
        "data.batch_ramp: the following arguments are required: increment, ramp_samples",
    ),
    # ---- the trainer
    ("max_steps_zero", ["--trainer.max_steps=0"], "trainer.max_steps=0 trains no step"),
    ("max_steps_below_minus_one", ["--trainer.max_steps=-5"], "trainer.max_steps=-5 trains no step"),
    ("max_steps_not_a_number", ["--trainer.max_steps=many"], "trainer.max_steps: Expected an int. Got value: many"),
    ("trainer_key_misspelt", ["--trainer.max_stepz=3"], "unrecognized arguments: --trainer.max_stepz=3"),
    # ---- config files
    ("yaml_syntax", ["--config", "{tmp}/bad.yaml"], "--config {tmp}/bad.yaml is not valid YAML at line 2"),
    ("config_missing", ["--config", "{tmp}/absent.yaml"], "config: File does not exist: '{tmp}/absent.yaml'"),
    ("config_key_misspelt", ["--config", "{tmp}/typo.yaml"], "does not accept option 'data.seqlen'"),
    # ---- the checkpoint to resume or evaluate
    ("ckpt_missing", ["--ckpt_path={tmp}/missing.ckpt"], "--ckpt_path '{tmp}/missing.ckpt' does not exist"),
    ("ckpt_empty", ["--ckpt_path={tmp}/empty.ckpt"], "--ckpt_path '{tmp}/empty.ckpt' is empty (0 bytes)"),
    (
        "ckpt_truncated",
        ["--ckpt_path={tmp}/truncated.ckpt"],
        "'{tmp}/truncated.ckpt' is not a checkpoint: not a complete torch.save archive",
    ),
    ("ckpt_not_a_checkpoint", ["--ckpt_path={tmp}/notes.ckpt"], "'{tmp}/notes.ckpt' is not a checkpoint"),
    (
        "ckpt_not_weights_only",
        ["--ckpt_path={tmp}/pickled.ckpt"],
        "'{tmp}/pickled.ckpt' is not a weights-only checkpoint",
    ),
    ("ckpt_empty_folder", ["--ckpt_path={tmp}/hollow_ckpt"], "--ckpt_path '{tmp}/hollow_ckpt' is an empty folder"),
    ("ckpt_folder_without_metadata", ["--ckpt_path={tmp}/sharded"], "is a folder without a .metadata file"),
    (
        "validate_ckpt_missing",
        ["validate", "--config", CONFIG, "--ckpt_path={tmp}/missing.ckpt"],
        "--ckpt_path '{tmp}/missing.ckpt' does not exist",
    ),
    (
        "validate_ckpt_truncated",
        ["validate", "--config", CONFIG, "--ckpt_path={tmp}/truncated.ckpt"],
        "'{tmp}/truncated.ckpt' is not a checkpoint",
    ),
    ("test_ckpt_empty", ["test", "--config", CONFIG, "--ckpt_path={tmp}/empty.ckpt"], "is empty (0 bytes)"),
]
# Also run as `python train.py ...` (each start costs seconds of imports, so a few).
SUBPROCESS = {
    "global_batch_zero",
    "max_steps_zero",
    "stage_mixture_not_summing_to_one",
    "stage_key_misspelt",
    "yaml_syntax",
    "validate_ckpt_truncated",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bad_settings")
    (tmp / "empty.jsonl").write_text("")
    (tmp / "blank.txt").write_text("\n  \n")
    (tmp / "hollow").mkdir()
    (tmp / "hollow" / "a.jsonl").write_text("")
    (tmp / "hollow" / "b.jsonl").write_text("\n")
    (tmp / "docs.jsonl").write_text(json.dumps({"text": "To be, or not to be."}) + "\n")
    (tmp / "bad.yaml").write_text("trainer: [\n  unclosed")
    (tmp / "typo.yaml").write_text("data:\n  seqlen: 64\n")
    torch.save({"state_dict": {"w": torch.zeros(4096)}, "epoch": 0, "global_step": 2}, tmp / "whole.ckpt")
    whole = (tmp / "whole.ckpt").read_bytes()
    (tmp / "truncated.ckpt").write_bytes(whole[: len(whole) // 2])
    (tmp / "empty.ckpt").write_bytes(b"")
    (tmp / "notes.ckpt").write_text("not a checkpoint\n")
    torch.save({"state_dict": {}, "settings": Path("x")}, tmp / "pickled.ckpt")  # a class outside weights_only
    (tmp / "hollow_ckpt").mkdir()
    (tmp / "sharded").mkdir()
    (tmp / "sharded" / "__0_0.distcp").write_bytes(b"\0" * 16)
    return tmp


def command(args: list[str], tmp: Path, out: Path) -> list[str]:
    """The full train.py arguments: outputs go under `out`; a case that wrongly passed would train one step."""
    args = [arg.replace("{tmp}", str(tmp)) for arg in args]
    run = [f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}"]
    if args[0] in ("validate", "test"):
        return [*args[:3], *run, *args[3:]]
    return ["fit", "--config", CONFIG, "--trainer.max_steps=1", *run, *args]


def check(returncode: int, stderr: str, expected: str, tmp: Path, out: Path) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert returncode == 2, stderr
    assert len(errors) == 1, stderr
    assert expected.replace("{tmp}", str(tmp)) in errors[0], errors[0]
    assert "Traceback" not in stderr and "usage:" not in stderr
    assert not list(out.rglob("*.ckpt")) and not list(out.rglob("metrics.csv"))  # no step was trained


@pytest.mark.parametrize(("args", "expected"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_setting_is_one_error_line(args, expected, files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    returncode = train.cli(command(args, files, tmp_path))
    check(returncode, capsys.readouterr().err, expected, files, tmp_path)


@pytest.mark.parametrize(
    ("args", "expected"),
    [case[1:] for case in CASES if case[0] in SUBPROCESS],
    ids=[case[0] for case in CASES if case[0] in SUBPROCESS],
)
def test_bad_setting_through_python_train_py(args, expected, files, tmp_path):
    env = {**os.environ, "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "train.py", *command(args, files, tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    check(result.returncode, result.stderr, expected, files, tmp_path)


def test_every_case_is_named_once():
    names = [case[0] for case in CASES]
    assert len(names) == len(set(names)) and SUBPROCESS <= set(names) and len(names) >= 40
