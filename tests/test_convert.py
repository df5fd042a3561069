"""`ling.convert`: Lightning checkpoints (one file or sharded DCP) to HF folders, and blockwise fp8."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open

from callbacks.hf_export import HFExport
from callbacks.wsm import WSM
from ling.checkpoint import CheckpointError, load_pretrained
from ling.checkpoint.fp8 import dequantize_blockwise, quantize_blockwise
from ling.config import ConfigError
from ling.convert import convert_checkpoint, main
from ling.data.tokenizer import load_tokenizer
from ling.merge import merge_checkpoints

ROOT = Path(__file__).resolve().parents[1]
E4M3_MAX = 448.0
pytestmark = pytest.mark.filterwarnings("ignore:.*assuming the intent is to save in a single process.*")


def lightning_state(model):
    """The LightningModule state dict of a LingModule: the model lives under `self.model`."""
    return {f"model.{k}": v.clone() for k, v in model.state_dict().items()}


def ling_entry(model):
    return {"tokens_seen": 123, "source_tokens": [100, 23], "config": model.config.to_hf()}


def write_ckpt(path, model):
    """A single-file checkpoint shaped like the one Lightning's default strategy writes."""
    first = next(iter(model.parameters()))
    optimizer = {"state": {0: {"step": torch.tensor(2.0), "exp_avg": torch.ones_like(first)}}, "param_groups": []}
    torch.save(
        {"epoch": 0, "global_step": 2, "state_dict": lightning_state(model), "optimizer_states": [optimizer]}
        | {"ling": ling_entry(model)},
        path,
    )
    return path


def write_dcp(folder, model):
    """A sharded checkpoint shaped like ModelParallelStrategy(save_distributed_checkpoint=True) writes."""
    folder.mkdir(parents=True)
    state = lightning_state(model)
    optimizer = {"state": {k: {"exp_avg": torch.zeros_like(v)} for k, v in list(state.items())[:3]}}
    dcp.save({"state_dict": state, "optimizer_0": optimizer}, checkpoint_id=folder, no_dist=True)
    torch.save({"epoch": 0, "global_step": 2, "ling": ling_entry(model)}, folder / "meta.pt")
    return folder


def tensors_of(folder):
    """Every tensor of a HF folder, by key."""
    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    return out


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


# ---- bf16 / fp32 exports ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ckpt", "dcp"])
def test_fp32_export_reproduces_the_trained_model(tmp_path, tiny_model, kind):
    write = write_ckpt if kind == "ckpt" else write_dcp
    source = write(tmp_path / f"last.{kind}", tiny_model)
    # read_bytes=1: every DCP tensor is read by its own load call.
    out = convert_checkpoint(source, tmp_path / "hf", dtype="float32", read_bytes=1)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and "quantization_config" not in config
    assert config["num_nextn_predict_layers"] == 1 and config["num_hidden_layers"] == 3
    loaded = load_pretrained(out)
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(loaded, ids), logits(tiny_model, ids))
    expected = tiny_model.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in loaded.state_dict().items())


def test_small_shards_write_an_index(tmp_path, tiny_model):
    source = write_dcp(tmp_path / "dcp", tiny_model)
    one = convert_checkpoint(source, tmp_path / "one", dtype="float32")
    many = convert_checkpoint(source, tmp_path / "many", dtype="float32", max_shard_size="40KB")
    shards = sorted(many.glob("*.safetensors"))
    assert len(shards) > 5 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    single = tensors_of(one)
    assert set(index["weight_map"]) == set(single)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in single.values())
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            if len(handle.keys()) > 1:  # a tensor larger than the limit gets a shard of its own
                assert shard.stat().st_size <= 40_000 + 4096  # + the safetensors header
    ids = torch.randint(0, tiny_model.config.vocab_size, (1, 16))
    assert torch.equal(logits(load_pretrained(many), ids), logits(tiny_model, ids))


def test_bf16_export_rounds_weights_and_keeps_expert_bias_fp32(tmp_path, tiny_model):
    with torch.no_grad():
        for layer in tiny_model.model.layers[1:]:
            layer.mlp.gate.expert_bias.copy_(torch.linspace(-1e-3, 1e-3, 16) + 1.0)  # bf16 would round these
    out = convert_checkpoint(write_ckpt(tmp_path / "a.ckpt", tiny_model), tmp_path / "hf")
    tensors = tensors_of(out)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {k for k, t in tensors.items() if t.dtype == torch.float32} == {
        k for k in tensors if k.endswith("expert_bias")
    }
    assert all(t.dtype == torch.bfloat16 for k, t in tensors.items() if not k.endswith("expert_bias"))
    assert torch.equal(tensors["model.layers.2.mlp.gate.expert_bias"], tiny_model.model.layers[2].mlp.gate.expert_bias)
    expert = tiny_model.model.layers[1].mlp.experts.down_proj[5]
    assert torch.equal(tensors["model.layers.1.mlp.experts.5.down_proj.weight"], expert.to(torch.bfloat16))


def test_input_checkpoint_is_never_touched(tmp_path, tiny_model):
    (tmp_path / "run").mkdir()
    ckpt = write_ckpt(tmp_path / "run" / "last.ckpt", tiny_model)
    folder = write_dcp(tmp_path / "dcp", tiny_model)
    before = {p: p.read_bytes() for p in [ckpt, *folder.iterdir()]}
    with pytest.raises(CheckpointError, match="is the checkpoint itself"):
        convert_checkpoint(folder, folder)
    with pytest.raises(CheckpointError, match="is the checkpoint itself"):
        convert_checkpoint(ckpt, ckpt)
    convert_checkpoint(ckpt, tmp_path / "run")  # beside the .ckpt file: allowed, the file stays
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(os.listdir(folder)) == sorted(p.name for p in before if p.parent == folder)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p, m: p / "absent.ckpt", "does not exist"),
        (lambda p, m: (p / "empty").mkdir() or p / "empty", "folder without a .metadata file"),
        (lambda p, m: (p / "x.ckpt").write_text("not torch") and p / "x.ckpt", "not a readable torch checkpoint"),
        (lambda p, m: torch.save({"weights": 1}, p / "y.ckpt") or p / "y.ckpt", "no 'state_dict'"),
        (lambda p, m: torch.save({"state_dict": lightning_state(m)}, p / "z.ckpt") or p / "z.ckpt", "no 'ling' entry"),
    ],
)
def test_bad_inputs_are_refused_with_one_sentence(tmp_path, tiny_model, make, message):
    with pytest.raises(CheckpointError, match=message):
        convert_checkpoint(make(tmp_path, tiny_model), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dcp_folder_without_meta_and_mismatched_tensors_are_refused(tmp_path, tiny_model):
    folder = write_dcp(tmp_path / "dcp", tiny_model)
    (folder / "meta.pt").rename(tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match="has no meta.pt"):
        convert_checkpoint(folder, tmp_path / "out")
    bigger = tiny_model.config.replace(num_experts=32, n_group=4).to_hf()
    torch.save({"ling": {"config": bigger}}, folder / "meta.pt")
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.gate.weight' with shape \(16, 64\).*\(32, 64\)"):
        convert_checkpoint(folder, tmp_path / "out")
    no_mtp = tiny_model.config.replace(num_nextn_predict_layers=0).to_hf()
    torch.save({"ling": {"config": no_mtp}}, folder / "meta.pt")
    with pytest.raises(CheckpointError, match=r"'model.mtp_layers.0.*which is not a weight"):
        convert_checkpoint(folder, tmp_path / "out")


EXPORT_NAMES = "float32, bfloat16, float16, float8_e4m3fn"


@pytest.mark.parametrize("name", ["bf16", "fp32", "fp8", "int4"])
def test_every_export_dtype_setting_takes_torch_names_only(tmp_path, name):
    """The short names are refused with one sentence listing torch's names, the same for every setting."""
    refusal = rf"={name!r} is not a dtype name; use one of {re.escape(EXPORT_NAMES)}"
    with pytest.raises(ConfigError, match=rf"^dtype{refusal}\.$"):
        convert_checkpoint(tmp_path / "missing.ckpt", tmp_path / "out", dtype=name)
    with pytest.raises(ConfigError, match=rf"^dtype{refusal} \(or null\)\.$"):
        merge_checkpoints([tmp_path / "missing.ckpt"], dtype=name, out=tmp_path / "out")
    with pytest.raises(ConfigError, match=rf"^HFExport dtype{refusal} \(or null\)\.$"):
        HFExport(dtype=name)
    with pytest.raises(ConfigError, match=rf"^WSM dtype{refusal} \(or null\)\.$"):
        WSM(interval=2, count=2, dtype=name)
    assert not (tmp_path / "out").exists()


# ---- blockwise fp8 ---------------------------------------------------------------------------------
def block_amax(w, block=128):
    """Oracle: the largest magnitude of each (partial) block, by slicing."""
    rows, cols = math.ceil(w.shape[0] / block), math.ceil(w.shape[1] / block)
    out = torch.empty(rows, cols)
    for i in range(rows):
        for j in range(cols):
            out[i, j] = w[i * block : (i + 1) * block, j * block : (j + 1) * block].abs().max()
    return out


def e4m3_half_spacing(x):
    """Half the gap between neighbouring e4m3 values around |x|: 3 mantissa bits, normals from 2^-6,
    subnormals spaced 2^-9. Round-to-nearest is never further off than this."""
    exponent = torch.floor(torch.log2(x.abs().clamp(min=2.0**-6)))
    return torch.exp2(exponent - 3) / 2


def expand(blocks, shape, block=128):
    return blocks.repeat_interleave(block, 0)[: shape[0]].repeat_interleave(block, 1)[:, : shape[1]]


@pytest.mark.parametrize("shape", [(300, 200), (256, 128), (1, 5), (129, 383)])
def test_blockwise_fp8_round_trip_is_within_e4m3_rounding(shape):
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=generator)
    rows, cols = math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)
    # Blocks whose magnitudes differ by up to 1e6, so that one scale per tensor would not do.
    w *= expand(10.0 ** torch.empty(rows, cols).uniform_(-3, 3, generator=generator), shape)
    q, scale_inv = quantize_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale_inv.dtype == torch.float32 and tuple(scale_inv.shape) == (rows, cols)
    amax = block_amax(w)
    torch.testing.assert_close(scale_inv, amax / E4M3_MAX, rtol=2**-23, atol=0)
    # Each block's largest magnitude lands exactly on the largest e4m3 value.
    assert torch.equal(block_amax(q.float()), torch.full((rows, cols), E4M3_MAX))
    deq = dequantize_blockwise(q, scale_inv)
    assert deq.dtype == torch.float32
    scale = expand(scale_inv, shape)
    bound = scale * e4m3_half_spacing(w / scale) * (1 + 2**-20)
    error = (deq - w).abs()
    assert (error <= bound).all(), (error / bound).max()
    if shape == (300, 200):
        # The bound is tight: some element is rounded by nearly half a step (a truncating cast would exceed it).
        assert (error / bound).max() > 0.95
        assert (error / amax.max()).max() < 2**-4  # never more than a sixteenth of the block's amax


def test_zero_block_quantizes_to_zeros_with_a_finite_scale():
    w = torch.randn(300, 200)
    w[128:256, :128] = 0
    q, scale_inv = quantize_blockwise(w.to(torch.bfloat16))
    assert torch.isfinite(scale_inv).all() and (scale_inv > 0).all()
    assert torch.equal(q[128:256, :128].float(), torch.zeros(128, 128))
    deq = dequantize_blockwise(q, scale_inv)
    assert torch.equal(deq[128:256, :128], torch.zeros(128, 128)) and torch.isfinite(deq).all()


def test_fp8_shape_errors():
    with pytest.raises(ValueError, match="2-D"):
        quantize_blockwise(torch.ones(4, 4, 4))
    q, scale_inv = quantize_blockwise(torch.ones(300, 200))
    with pytest.raises(ValueError, match=r"expected \(3, 2\)"):
        dequantize_blockwise(q, scale_inv[:2])


# Written out from the released fp8 layout: linear projections of attention, dense MLPs, shared and
# routed experts in every decoder and MTP layer are float8; nothing else is.
FP8_SUFFIXES = (
    "attention.query_key_value.weight",
    "attention.dense.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "mlp.shared_experts.gate_proj.weight",
    "mlp.shared_experts.up_proj.weight",
    "mlp.shared_experts.down_proj.weight",
)


def expected_fp8(key):
    return key.endswith(FP8_SUFFIXES) or re.search(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$", key)


def test_fp8_export_layout_values_and_logits(tmp_path, tiny_model):
    ckpt = write_ckpt(tmp_path / "a.ckpt", tiny_model)
    out = convert_checkpoint(ckpt, tmp_path / "fp8", dtype="float8_e4m3fn", max_shard_size="30KB")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    assert config["torch_dtype"] == "bfloat16"
    tensors = tensors_of(out)
    source = tensors_of(convert_checkpoint(ckpt, tmp_path / "fp32", dtype="float32"))
    weights = {k for k in tensors if not k.endswith("_scale_inv")}
    assert weights == set(source)
    fp8 = {k for k in weights if expected_fp8(k)}
    # 4 layers (3 + MTP) x 2 attention, 3 dense MLP, 3 x (16 + 1) expert projections in 3 MoE layers.
    assert len(fp8) == 4 * 2 + 3 + 3 * 3 * 17
    assert {k for k in weights if tensors[k].dtype == torch.float8_e4m3fn} == fp8
    assert {k.removesuffix("_scale_inv") for k in tensors if k.endswith("_scale_inv")} == fp8
    for key in weights - fp8:
        expected_dtype = torch.float32 if key.endswith("expert_bias") else torch.bfloat16
        assert tensors[key].dtype == expected_dtype, key
        assert torch.equal(tensors[key], source[key].to(expected_dtype)), key
    kept = weights - fp8
    assert {"model.word_embeddings.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight"} <= kept
    assert {"model.layers.3.eh_proj.weight", "model.norm.weight", "model.layers.3.mlp.gate.expert_bias"} <= kept
    for key in fp8:
        w, scale_inv = source[key], tensors[key + "_scale_inv"]
        assert scale_inv.dtype == torch.float32
        assert tuple(scale_inv.shape) == (math.ceil(w.shape[0] / 128), math.ceil(w.shape[1] / 128))
        scale = expand(scale_inv, w.shape)
        error = (dequantize_blockwise(tensors[key], scale_inv) - w).abs()
        assert (error <= scale * e4m3_half_spacing(w / scale) * (1 + 2**-20)).all(), key

    # load_pretrained reads the fp8 folder back (dequantised) next to the bf16 export of the same checkpoint.
    dequantised = load_pretrained(out, dtype=torch.float32)
    bf16 = load_pretrained(convert_checkpoint(ckpt, tmp_path / "bf16"), dtype=torch.float32)
    state = dequantised.state_dict()
    expert = tiny_model.model.layers[2].mlp.experts.up_proj[7]
    key = "model.layers.2.mlp.experts.7.up_proj.weight"
    assert torch.equal(
        state["model.layers.2.mlp.experts.up_proj"][7], dequantize_blockwise(tensors[key], tensors[key + "_scale_inv"])
    )
    assert not torch.equal(state["model.layers.2.mlp.experts.up_proj"][7], expert)
    ids = torch.randint(0, tiny_model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(2))
    reference, got = logits(bf16, ids), logits(dequantised, ids)
    # Measured on this seed: max |diff| 1.9% of max |logit|, relative RMS 1.3%.
    assert (got - reference).abs().max() <= 0.04 * reference.abs().max()
    assert (got - reference).norm() <= 0.025 * reference.norm()


# ---- command line ----------------------------------------------------------------------------------
def run_cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "ling.convert", "dcp-to-hf", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_converts_a_checkpoint_and_refuses_bad_input(tmp_path, tiny_model):
    folder = write_dcp(tmp_path / "dcp", tiny_model)
    result = run_cli("--checkpoint", folder, "--out", tmp_path / "hf", "--dtype", "float8_e4m3fn",
                     "--max-shard-size", "100KB", "--tokenizer", "byte")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert load_pretrained(tmp_path / "hf").config.num_experts == 16
    assert load_tokenizer(str(tmp_path / "hf")).encode("héllo") == list("héllo".encode())  # --tokenizer byte

    result = run_cli("--checkpoint", folder, "--out", tmp_path / "hf2", "--remote-code", tmp_path / "missing")
    assert result.returncode == 2 and "remote_code=" in result.stderr and "Traceback" not in result.stderr

    (tmp_path / "not-a-checkpoint").mkdir()
    for args, message in [
        (("--checkpoint", tmp_path / "missing", "--out", tmp_path / "o"), "does not exist"),
        (("--checkpoint", tmp_path / "not-a-checkpoint", "--out", tmp_path / "o"), "without a .metadata file"),
    ]:
        result = run_cli(*args)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dtype", "fp8"], f"error: dtype='fp8' is not a dtype name; use one of {EXPORT_NAMES}."),
        (["--max-shard-size", "lots"], "error: max_shard_size='lots' is not a size"),
        (["--out", "{ckpt}"], "is the checkpoint itself"),
    ],
)
def test_cli_user_errors_are_one_line(tmp_path, tiny_model, capsys, args, message):
    ckpt = write_ckpt(tmp_path / "a.ckpt", tiny_model)
    args = [a.format(ckpt=ckpt) for a in args]
    argv = ["dcp-to-hf", "--checkpoint", str(ckpt), *(["--out", str(tmp_path / "hf")] if "--out" not in args else [])]
    try:
        code = main([*argv, *args])
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert ckpt.is_file()
