"""`ling.merge`: offline WSM merges of .ckpt, DCP and HF checkpoints, against hand sums and MergeAccumulator."""

import copy
import math

import pytest
import torch
import torch.distributed.checkpoint as dcp

from ling.checkpoint import load_pretrained, save_pretrained
from ling.convert import convert_checkpoint, open_checkpoint
from ling.lightning_module import LingModule
from ling.merge import main, merge_checkpoints
from ling.wsm import MergeAccumulator, merge_weights

pytestmark = pytest.mark.filterwarnings("ignore:.*assuming the intent is to save in a single process.*")


# ---- writing inputs --------------------------------------------------------------------------------
def variant(model, seed, dtype=torch.float32):
    """A copy of `model` with every tensor moved by seeded noise (expert_bias too), stored in `dtype`
    except expert_bias, which LingModule keeps in fp32."""
    out = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in out.state_dict().values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.05)
    out.to(dtype)
    for module in out.modules():
        if isinstance(getattr(module, "expert_bias", None), torch.Tensor):
            module.expert_bias.data = module.expert_bias.data.float()
    return out


def ling_entry(model, tokens_seen=100):
    return {"tokens_seen": tokens_seen, "source_tokens": [tokens_seen], "config": model.config.to_hf(),
            "tokenizer": {"name": "byte", "eos_token": None}}  # fmt: skip


def write_ckpt(path, model, tokens_seen=100):
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    torch.save({"epoch": 0, "global_step": 1, "state_dict": state, "ling": ling_entry(model, tokens_seen)}, path)
    return path


def write_dcp(folder, model, tokens_seen=100):
    folder.mkdir(parents=True)
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    dcp.save({"state_dict": state}, checkpoint_id=folder, no_dist=True)
    torch.save({"epoch": 0, "global_step": 1, "ling": ling_entry(model, tokens_seen)}, folder / "meta.pt")
    return folder


def hand_sum(models, weights):
    """sum_j w_j theta_j in fp64 from the models' own tensors: the oracle the fp32 merge must match."""
    states = [m.state_dict() for m in models]
    return {name: sum(w * s[name].double() for w, s in zip(weights, states, strict=True)) for name in states[0]}


def accumulator_merge(models, weights):
    acc = MergeAccumulator(models[0].state_dict())
    for model, weight in zip(models, weights, strict=True):
        acc.add(model.state_dict(), weight)
    return acc.merged()


def run(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


# ---- values ------------------------------------------------------------------------------------
def test_fp32_merge_of_ckpt_dcp_and_hf_inputs_is_the_weighted_sum(tmp_path, tiny_model):
    models = [variant(tiny_model, seed) for seed in (1, 2, 3)]
    paths = [write_ckpt(tmp_path / "a.ckpt", models[0]), write_dcp(tmp_path / "b", models[1]),
             save_pretrained(models[2], tmp_path / "c", max_shard_size="100KB")]  # fmt: skip
    weights = [0.2, 0.3, 0.5]
    result = merge_checkpoints(paths, weights, out=tmp_path / "hf", ckpt=tmp_path / "m.ckpt")
    expected = hand_sum(models, weights)
    assert list(result.state) == list(expected)
    for name, tensor in result.state.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor.double(), expected[name], rtol=0, atol=1e-6)
    # The oracle the WSM callback uses: the in-memory fp32 merge of the same tensors.
    reference = accumulator_merge(models, weights)
    assert all(torch.equal(result.state[name], reference[name]) for name in reference)
    loaded = load_pretrained(result.out)
    assert all(torch.equal(t, result.state[name]) for name, t in loaded.state_dict().items())
    assert (result.out / "tokenizer.json").is_file()  # the run's recorded tokenizer, as every export writes


def test_bf16_merge_keeps_dtypes_and_equals_the_in_memory_merge(tmp_path, tiny_model):
    models = [variant(tiny_model, seed, torch.bfloat16) for seed in (4, 5, 6, 7)]
    paths = [write_ckpt(tmp_path / f"{i}.ckpt", m, tokens_seen=100 * (i + 1)) for i, m in enumerate(models)]
    weights = merge_weights("1-sqrt", len(paths))
    result = merge_checkpoints(paths, shape="1-sqrt", ckpt=tmp_path / "m.ckpt")
    assert result.weights == weights
    reference = accumulator_merge(models, weights)
    expected = hand_sum(models, weights)
    for name, tensor in result.state.items():
        want = torch.float32 if name.endswith("expert_bias") else torch.bfloat16
        assert tensor.dtype == want == reference[name].dtype, name
        assert torch.equal(tensor, reference[name]), name
        # one bf16 rounding of the exact sum (fp32 exact to ~1e-7 for expert_bias)
        tol = 1e-6 if want == torch.float32 else 2.0**-8
        assert ((tensor.double() - expected[name]).abs() <= tol * expected[name].abs() + 1e-6).all(), name
    assert any(name.endswith("expert_bias") for name in result.state)

    saved = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert saved["ling"]["tokens_seen"] == 400 and saved["ling"]["tokenizer"]["name"] == "byte"
    assert saved["merge"]["weights"] == weights
    # A LingModule takes the weights-only checkpoint.
    module = LingModule("tiny")
    module.model = copy.deepcopy(models[0])
    module.load_state_dict(saved["state_dict"])
    module.on_load_checkpoint(saved)
    assert module.tokens_seen == 400
    assert torch.equal(module.model.lm_head.weight, result.state["lm_head.weight"])
    # ... and so do ling.convert's readers and the converter.
    assert open_checkpoint(tmp_path / "m.ckpt").shapes["lm_head.weight"][1] == torch.bfloat16
    folder = convert_checkpoint(tmp_path / "m.ckpt", tmp_path / "hf", dtype="float32")
    loaded = load_pretrained(folder)
    assert all(torch.equal(t, result.state[name].float()) for name, t in loaded.state_dict().items())


def test_mixed_precision_inputs_merge_in_the_wider_dtype(tmp_path, tiny_model):
    models = [variant(tiny_model, 8, torch.bfloat16), variant(tiny_model, 9)]
    paths = [write_ckpt(tmp_path / "a.ckpt", models[0]), write_ckpt(tmp_path / "b.ckpt", models[1])]
    state = merge_checkpoints(paths).state
    assert all(t.dtype == torch.float32 for t in state.values())
    expected = hand_sum(models, [0.5, 0.5])
    assert all(torch.allclose(state[n].double(), expected[n], rtol=0, atol=1e-6) for n in expected)


# ---- command line --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Four step checkpoints named as Lightning's ModelCheckpoint names them, and their metrics.csv."""
    from ling import preset
    from ling.model import build_model

    torch.manual_seed(0)
    base = build_model(preset("tiny"))
    folder = tmp_path_factory.mktemp("run")
    (folder / "checkpoints").mkdir()
    models = {}
    for step in (2, 10, 30, 100):  # 2 < 10 by step, not by name
        models[step] = variant(base, step)
        write_ckpt(folder / "checkpoints" / f"epoch=0-step={step}.ckpt", models[step], tokens_seen=step)
    # CSVLogger rows: train metrics every step, val/loss of the weights of step=S logged at step S-1
    # (the 0.1 at step 30 is the validation of step=31, which has no checkpoint).
    val = {1: 3.0, 9: 2.0, 29: 2.5, 30: 0.1, 99: 1.0}
    lines = ["epoch,step,train/loss,val/loss,val/acc"]
    for step in range(100):
        lines.append(f"0,{step},{4 - step / 50:.3f},,")
        if step in val:
            lines.append(f"0,{step},,{val[step]},{1 - val[step] / 4}")
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    return folder, models


def merged_entry(path):
    saved = torch.load(path, weights_only=True)
    return [p.rsplit("/", 1)[-1] for p in saved["merge"]["checkpoints"]], saved["merge"]["weights"], saved


def test_cli_path_weight_lists(run_dir, tmp_path, capsys):
    folder, models = run_dir
    a, b = folder / "checkpoints" / "epoch=0-step=10.ckpt", folder / "checkpoints" / "epoch=0-step=30.ckpt"
    code, out, err = run(["--checkpoints", f"{a}:0.25", f"{b}:0.75", "--ckpt", tmp_path / "m.ckpt",
                          "--out", tmp_path / "hf", "--dtype", "bfloat16"], capsys)  # fmt: skip
    assert code == 0, err
    assert "step=10.ckpt:0.25" in out and "wrote" in out
    names, weights, saved = merged_entry(tmp_path / "m.ckpt")
    assert names == [a.name, b.name] and weights == [0.25, 0.75]
    expected = hand_sum([models[10], models[30]], [0.25, 0.75])
    head = saved["state_dict"]["model.lm_head.weight"]
    assert torch.allclose(head.double(), expected["lm_head.weight"], rtol=0, atol=1e-6)
    loaded = load_pretrained(tmp_path / "hf")
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, head.to(torch.bfloat16))


def test_cli_glob_is_ordered_by_step_and_cut_by_a_step_range(run_dir, tmp_path, capsys):
    folder, _ = run_dir
    pattern = folder / "checkpoints" / "epoch=*-step=*.ckpt"
    code, _, err = run(["--checkpoints", pattern, "--ckpt", tmp_path / "all.ckpt"], capsys)
    assert code == 0, err
    names, weights, _ = merged_entry(tmp_path / "all.ckpt")
    assert [n.split("step=")[1] for n in names] == ["2.ckpt", "10.ckpt", "30.ckpt", "100.ckpt"]
    assert weights == pytest.approx([0.25] * 4)
    code, _, err = run(["--checkpoints", pattern, "--steps", "10:30", "--shape", "ema", "--alpha", "0.5",
                        "--ckpt", tmp_path / "cut.ckpt"], capsys)  # fmt: skip
    assert code == 0, err
    names, weights, saved = merged_entry(tmp_path / "cut.ckpt")
    assert names == ["epoch=0-step=10.ckpt", "epoch=0-step=30.ckpt"]
    assert weights == pytest.approx([0.5, 0.5])  # ema alpha 0.5 over 2: c_0 = 0.5, c_1 = 0.5
    assert saved["ling"]["tokens_seen"] == 30  # the newest checkpoint's


@pytest.mark.parametrize(("mode", "metric", "want"), [("min", "val/loss", [10, 100]), ("max", "val/acc", [10, 100]),
                                                        ("max", "val/loss", [2, 30])])  # fmt: skip
def test_cli_top_n_by_a_validation_metric_is_uniform(run_dir, tmp_path, capsys, mode, metric, want):
    folder, _ = run_dir
    args = ["--checkpoints", folder / "checkpoints" / "*.ckpt", "--top", 2, "--metric", metric, "--mode", mode]
    code, _, err = run([*args, "--log", folder / "metrics.csv", "--ckpt", tmp_path / "top.ckpt"], capsys)
    assert code == 0, err
    names, weights, _ = merged_entry(tmp_path / "top.ckpt")
    assert names == [f"epoch=0-step={s}.ckpt" for s in want] and weights == [0.5, 0.5]


def top_args(n, metric, log):
    return ["--checkpoints", "{c}/*.ckpt", "--top", n, "--metric", metric, "--log", log, "--ckpt", "{t}/m.ckpt"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--checkpoints", "{c}/missing.ckpt", "--ckpt", "{t}/m.ckpt"], "does not exist"),
        (["--checkpoints", "{c}/nothing-*.ckpt", "--ckpt", "{t}/m.ckpt"], "matches no checkpoint"),
        (["--checkpoints", "{c}/*.ckpt", "--steps", "40:90", "--ckpt", "{t}/m.ckpt"], "selects none of the 4"),
        (["--checkpoints", "{c}/*.ckpt", "--steps", "9-1", "--ckpt", "{t}/m.ckpt"], "is not a step range"),
        (["--checkpoints", "{a}:1.5", "{b}:-0.5", "--ckpt", "{t}/m.ckpt"], "non-negative"),
        (["--checkpoints", "{a}:0.5", "{b}:0.25", "--ckpt", "{t}/m.ckpt"], "sum to 1"),
        (["--checkpoints", "{a}:0.5", "{b}", "--ckpt", "{t}/m.ckpt"], "give every checkpoint a weight or none"),
        (["--checkpoints", "{a}", "{b}", "--shape", "linear-ish", "--ckpt", "{t}/m.ckpt"], "shape 'linear-ish'"),
        (["--checkpoints", "{a}", "{b}", "--shape", "ema", "--ckpt", "{t}/m.ckpt"], "needs alpha"),
        (top_args("5", "val/loss", "{r}/metrics.csv"), "--top 5 asks for more checkpoints than the 4 given"),
        (top_args("2", "val/ppl", "{r}/metrics.csv"), "metric 'val/ppl' is not in"),
        (top_args("2", "val/loss", "{t}/none.csv"), "metrics log '"),
        (["--checkpoints", "{a}", "{b}"], "nothing to write"),
        (["--checkpoints", "{a}", "{other}", "--ckpt", "{t}/m.ckpt"], "has num_experts=8 but"),
        (["--checkpoints", "{a}", "--out", "{a}"], "is one of the checkpoints"),
    ],
)
def test_cli_bad_input_is_one_sentence(run_dir, tmp_path, capsys, args, message):
    folder, models = run_dir
    other = models[2].config.replace(num_experts=8, n_group=4, topk_group=2)
    from ling.model import build_model

    other_path = tmp_path / "other.ckpt"
    if "{other}" in args:
        write_ckpt(other_path, build_model(other))
    c = folder / "checkpoints"
    fill = {"c": c, "t": tmp_path, "r": folder, "a": c / "epoch=0-step=10.ckpt", "b": c / "epoch=0-step=30.ckpt",
            "other": other_path}  # fmt: skip
    code, out, err = run([a.format(**fill) for a in args], capsys)
    assert code == 2, (out, err)
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "m.ckpt").exists()


def test_merge_weights_reach_the_function_unchanged(tmp_path, tiny_model):
    models = [variant(tiny_model, seed) for seed in (11, 12, 13)]
    paths = [write_ckpt(tmp_path / f"{i}.ckpt", m) for i, m in enumerate(models)]
    result = merge_checkpoints(paths, shape="cosine")
    assert result.weights == merge_weights("cosine", 3) and math.isclose(sum(result.weights), 1.0)
    expected = hand_sum(models, result.weights)
    assert all(torch.allclose(result.state[n].double(), expected[n], rtol=0, atol=1e-6) for n in expected)
