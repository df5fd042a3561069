"""`train.py`: the YAML run end to end, the resolved config, and errors before training starts."""

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

import train
from ling import preset
from ling.checkpoint import load_pretrained, save_pretrained
from ling.config import ConfigError
from ling.data.datamodule import LingDataModule
from ling.lightning_module import LingModule
from ling.model import build_model

ROOT = Path(__file__).resolve().parents[1]


def tiny_args(tmp_path, steps=4, *extra):
    """configs/tiny.yaml made small: 32-token rows, checkpoints every 2 steps, output under tmp_path."""
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(max_steps=steps, val_check_interval=2, default_root_dir=str(tmp_path), enable_progress_bar=False)
    trainer["logger"]["init_args"]["save_dir"] = str(tmp_path)
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = 2
    trainer["callbacks"] = [c for c in trainer["callbacks"] if not c["class_path"].endswith("TQDMProgressBar")]
    config["data"].update(seq_len=32, micro_batch_size=2)
    # The three stages at a quarter of the length, one step, two steps, then the rest (512 tokens per step).
    short, long, yarn = config["data"]["stages"]
    short.update(seq_len=32, tokens=512)
    long.update(seq_len=64, tokens=1024)
    yarn.update(seq_len=128)
    yarn["rope_scaling"]["original_max_position_embeddings"] = 64
    path = tmp_path / "run.yaml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return ["fit", "--config", str(path), *extra]


def test_yaml_run_writes_checkpoints_hf_export_and_sample(tmp_path, capsys, caplog):
    cli = train.main(tiny_args(tmp_path))
    assert cli.trainer.global_step == 4
    log_dir = Path(cli.trainer.log_dir)
    checkpoints = sorted(p.name for p in (log_dir / "checkpoints").glob("*.ckpt"))
    assert checkpoints == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]
    exported = load_pretrained(log_dir / "hf")
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, cli.model.model(ids).logits)
    out = capsys.readouterr().out
    assert "sample: 'The " in out
    assert "finished at step 4: train/loss" in caplog.text and "unigram entropy of the data" in caplog.text
    header = (log_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/loss", "val/loss/shakespeare", "val/loss/arithmetic"} <= set(header)
    shares = [float(cli.trainer.callback_metrics[f"data/share/{name}"]) for name in ("shakespeare", "arithmetic")]
    assert sum(shares) == pytest.approx(1.0)
    assert cli.model.stage == 2 and cli.model.config.rope_scaling["factor"] == 2.0
    assert load_pretrained(log_dir / "hf").config.rope_scaling == cli.model.config.rope_scaling


def test_exports_carry_the_runs_tokenizer(tmp_path):
    """The HF folder written at fit end, and one converted from the run's checkpoint afterwards, hold the
    run's (byte) tokenizer as Hugging Face files, and their config.json carries its token ids."""
    from transformers import AutoTokenizer

    from ling.convert import convert_checkpoint
    from ling.data.tokenizer import ByteTokenizer

    cli = train.main(tiny_args(tmp_path, 2))
    log_dir = Path(cli.trainer.log_dir)
    converted = convert_checkpoint(log_dir / "checkpoints" / "last.ckpt", tmp_path / "converted", dtype="bfloat16")
    text = "To be, or not to be: 12 + 30 = 42 ✓\n"
    for folder in (log_dir / "hf", converted):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ByteTokenizer().encode(text)
        config = json.loads((folder / "config.json").read_text())
        assert (config["eos_token_id"], config["pad_token_id"]) == (256, 256) and "bos_token_id" not in config
        assert config["auto_map"]["AutoModelForCausalLM"].endswith("modeling_bailing_moe_v2.BailingMoeV2ForCausalLM")
        assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 256


def test_resume_with_a_different_model_is_refused(tmp_path):
    """LightningCLI takes the model settings from the checkpoint; through the Python API a mismatch
    is caught before any weight is loaded."""
    train.main(tiny_args(tmp_path, 2))
    ckpt = next(Path(tmp_path).rglob("epoch=0-step=2.ckpt"))
    module = LingModule(model="tiny", model_overrides={"num_experts": 32})
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False, default_root_dir=tmp_path / "again"
    )
    with pytest.raises(ConfigError, match="num_experts=16 but this run's model has num_experts=32"):
        trainer.fit(module, datamodule=LingDataModule(seq_len=32, micro_batch_size=2), ckpt_path=ckpt)


def run_cli(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_print_config_shows_the_whole_run():
    result = run_cli("fit", "--config", "configs/tiny.yaml", "--print_config")
    assert result.returncode == 0, result.stderr
    for line in ("model: tiny", "bias_update_rate: 0.001", "name: wsm", "path: shakespeare", "max_steps: 1000"):
        assert line in result.stdout


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.model=huge", "error: unknown model preset 'huge'; choose one of ['1t', 'flash', 'mini', 'tiny']."),
        (
            '--model.model_overrides={"num_nextn_predict_layers": 0}',
            "error: model_overrides.mtp_loss_scaling_factor=0.1 needs an MTP layer",
        ),
        (
            ('--data.stages=[{"name": "long", "seq_len": 4096, "global_batch_size": 2}]',),
            "error: stage 'long' trains 4096-token rows but the model reaches 2048 positions",
        ),
        (
            ('--data.sources={"web": {"path": "./missing/*.jsonl"}}', "--data.stages=null"),
            "error: source 'web': no json, jsonl, parquet, txt or md files found at './missing/*.jsonl'",
        ),
    ],
)
def test_bad_settings_fail_with_one_sentence(override, message):
    overrides = override if isinstance(override, tuple) else (override,)
    result = run_cli("fit", "--config", "configs/tiny.yaml", *overrides)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in result.stderr


def test_unreadable_yaml_is_refused_before_training(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [\n  unclosed")
    result = run_cli("fit", "--config", str(bad))
    assert result.returncode == 2
    assert f"error: --config {bad} is not valid YAML at line 2" in result.stderr and "Traceback" not in result.stderr


def test_continued_pretraining_starts_from_the_hf_checkpoint(tmp_path):
    torch.manual_seed(3)
    source = build_model(preset("tiny"))
    save_pretrained(source, tmp_path / "hf")
    module = LingModule(pretrained=str(tmp_path / "hf"), model="ignored-when-pretrained")
    module.configure_model()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(module.model(ids).logits, source(ids).logits)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=LingDataModule(seq_len=32, micro_batch_size=2))
    assert trainer.global_step == 2
    with pytest.raises(ConfigError, match="not a Hugging Face checkpoint folder"):
        LingModule(pretrained=str(tmp_path / "missing"))


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    module = LingModule(model="tiny", model_overrides={"vocab_size": 200, "pad_token_id": 0, "eos_token_id": 0})
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    with pytest.raises(ConfigError, match="the tokenizer has 257 tokens but the model's vocab_size is 200"):
        trainer.fit(module, datamodule=LingDataModule(seq_len=32, micro_batch_size=2))
    assert module.model is None  # refused before the model was built


def test_gpu_configs_name_the_parallel_strategy_and_refuse_a_bad_mesh():
    from ling.parallel.strategy import LingParallelStrategy

    config = yaml.safe_load((ROOT / "configs" / "mini.yaml").read_text())
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"] == "ling.parallel.strategy.LingParallelStrategy"
    assert strategy["init_args"] == {"dp_replicate": 1, "dp_shard": 16, "ep": 8, "activation_checkpointing": "full"}
    LingParallelStrategy(**strategy["init_args"]).validate(16)  # a valid mesh on 2 nodes x 8 GPUs
    result = run_cli("fit", "--config", "configs/mini.yaml", "--trainer.strategy.init_args.ep=3",
                     "--trainer.accelerator=cpu", "--data.tokenizer=byte")  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ep=3 must divide dp_shard=16")
