"""Recipes: whole micro-batches per rank along the ramp, every shipped stage fitting on paper, the configs
they write (and train.py parses), the describe CLI, and the keys they refuse."""

import dataclasses
from pathlib import Path

import pytest
import yaml

import train
from ling.data.curriculum import Curriculum, Stage
from ling.memory import GB, estimate_memory
from ling.parallel.layout import AC_MODES, ParallelDims
from ling.presets import preset
from ling.schedules import BatchRamp
from recipes import RECIPES, RecipeError, get_recipe, report_recipe
from recipes.describe import main
from recipes.export import config_path, render, run_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
REPORT = ["mini", "flash", "1t"]


def ranks(recipe) -> int:
    return recipe.trainer["devices"] * recipe.trainer["num_nodes"]


def callback(recipe, name: str) -> dict:
    return next(c.get("init_args", {}) for c in recipe.trainer["callbacks"] if c["class_path"].endswith(f".{name}"))


def test_registry_hands_out_copies():
    with pytest.raises(RecipeError, match=r"unknown recipe 'huge'; choose one of tiny, mini, flash, 1t\."):
        get_recipe("huge")
    assert get_recipe("1T").name == "1t"
    get_recipe("mini").data["stages"].clear()
    assert RECIPES["mini"].data["stages"]


@pytest.mark.parametrize("name", list(RECIPES))
def test_batch_arithmetic(name):
    """The full batch is whole micro-batches on every rank, max_steps covers train_tokens at the full
    batch, and the first step trains the ramp's first batch."""
    recipe = get_recipe(name)
    data = recipe.data
    per_step = ranks(recipe) * data["micro_batch_size"]
    assert recipe.accumulate_grad_batches * per_step == data["global_batch_size"]
    tokens = data["global_batch_size"] * data["seq_len"]
    assert (recipe.max_steps - 1) * tokens < recipe.train_tokens <= recipe.max_steps * tokens
    ramp = data["batch_ramp"]
    curriculum = recipe.curriculum()  # every stage is whole micro-batches per rank on the recipe's ranks
    first = curriculum.at(0)
    assert first.global_rows == (ramp.start if ramp else data["global_batch_size"])
    assert first.micro_batches * first.rows * ranks(recipe) == first.global_rows
    assert recipe.estimate().fits


@pytest.mark.parametrize("name", REPORT)
def test_every_ramp_batch_is_whole_micro_batches_per_rank(name):
    recipe = get_recipe(name)
    data = recipe.data
    ramp, target = data["batch_ramp"], data["global_batch_size"]
    assert ramp.ramp_samples == round(500e9 / data["seq_len"])  # the report ramps over ~500B tokens
    per_step = ranks(recipe) * data["micro_batch_size"]
    batches = [recipe.global_batch_at(s) for s in range(0, ramp.ramp_samples + 10_000_000, 250_000)]
    assert batches[0] == ramp.start and batches[-1] == target and batches == sorted(batches)
    assert all(batch % per_step == 0 for batch in batches)
    assert recipe.global_batch_at(ramp.ramp_samples) == target > recipe.global_batch_at(ramp.ramp_samples - 1)


@pytest.mark.parametrize("name", REPORT)
def test_report_stages(name):
    """The 32K stages keep the tokens per step in whole micro-batches per rank and lower the bias-update
    rate; context extension keeps the pre-training mixture for the 80% that is not long documents;
    train_tokens counts the shipped stages, and the export gets YaRN on 32K exactly when a 32K stage ships
    (1t keeps its 32K stages out of the config: they fit no layout, see test_one_t_long_stages_fit_no_layout)."""
    recipe = get_recipe(name)
    data = recipe.data
    shipped = data["stages"]
    stages = {stage.name: stage for stage in shipped + recipe.left_out}
    assert list(stages) == ["pretrain_1", "pretrain_2", "long_context", "reasoning"]
    assert recipe.train_tokens == sum(stage.tokens for stage in shipped)
    long, before = stages["long_context"], stages["pretrain_2"]
    assert long.mixture["general"] / long.mixture["reasoning"] == pytest.approx(
        before.mixture["general"] / before.mixture["reasoning"]
    )
    assert sum(long.mixture.values()) == pytest.approx(1.0)
    for stage in (long, stages["reasoning"]):
        assert stage.bias_update_rate < recipe.model["bias_update_rate"]
        rows, world = stage.global_batch_size, ranks(recipe)
        assert rows % world == 0
        assert 0 <= data["global_batch_size"] * data["seq_len"] - rows * stage.seq_len < world * stage.seq_len
    long_rows = max(stage.seq_len for stage in shipped)
    yarn = callback(recipe, "HFExport")["rope_scaling"]
    if long_rows == data["seq_len"]:
        assert yarn is None  # a model trained at 4K only gets no YaRN
    else:
        assert yarn["type"] == "yarn" and yarn["original_max_position_embeddings"] == long_rows


def test_the_demo_scores_and_merges_its_last_stage():
    """The demo's WSM merge takes its snapshots inside the last stage, the last at the final step, and
    its evaluation windows are as long as the longest training rows."""
    recipe = get_recipe("tiny")
    curriculum, last = recipe.curriculum(), len(recipe.data["stages"]) - 1
    first = next(step for step in range(recipe.max_steps) if curriculum.at(step).stage == last)
    wsm = callback(recipe, "WSM")
    assert wsm["start_step"] + wsm["count"] * wsm["interval"] == recipe.max_steps
    assert first <= wsm["start_step"] < first + wsm["interval"]
    longest = max(curriculum.at(step).seq_len for step in range(recipe.max_steps))
    assert callback(recipe, "LMEval")["max_length"] == longest


def test_describe_cli(capsys):
    main(["mini"])
    out = capsys.readouterr().out
    assert "16,255,643,392" in out  # Ling-mini-2.0's published parameter count
    assert "accumulate_grad_batches 275" in out  # 4,400 / 16 ranks
    assert "9.94 GFLOP" in out and "fits" in out
    main(["mini", "--nodes", "4", "--ac", "none"])
    out = capsys.readouterr().out
    assert "32 ranks" in out and "NOT a whole number" in out and "AC 'none'" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["huge"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: unknown recipe 'huge'; choose one of tiny, mini, flash, 1t." in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["mini", "--ep", "3"])
    assert "ep=3 must divide dp_shard=16" in capsys.readouterr().err


def test_describe_cli_prints_the_data_stages(capsys):
    main(["mini"])
    out = capsys.readouterr().out
    # pretrain_1: 10T tokens / (4,400 x 4,096 tokens per step) = 554,865.9 -> 554,866 steps
    assert "pretrain_1       4,096      10T   554,866     4,400       1     275" in out
    # 32K rows: 544 per step (34 per rank); 150B / (544 x 32,768) = 8,414.5 -> 8,415 steps
    assert "long_context    32,768     150B     8,415       544       1      34" in out
    assert "! more than the GPU memory" not in out  # with the chunked loss every stage fits
    main(["mini", "--loss-chunk", "0"])  # whole logits: the 32K stages do not fit
    assert "! more than the GPU memory on this layout" in capsys.readouterr().out
    main(["tiny"])
    assert "yarn               512     open         -         4       2       2" in capsys.readouterr().out
    main(["1t"])  # the left-out 32K stages are still shown, flagged, after the reason
    out = capsys.readouterr().out
    assert "left out of the config: one 32,768-token row per micro-batch does not fit" in out
    assert "long_context    32,768     150B     2,271     2,016       1       2  121.2!" in out
    assert "the largest item is activations stored for backward (46.2 GB" in out
    main(["1t", "--gpu-memory-gb", "141"])
    assert "! more than the GPU memory" not in capsys.readouterr().out


@pytest.mark.parametrize("name", list(RECIPES))
def test_configs_are_generated_from_the_recipes(name):
    """configs/<name>.yaml is exactly what the recipe renders; its max_steps covers the token budget of
    its stages at the full batch; the model section leaves the model's own settings to the model config."""
    recipe = RECIPES[name]
    path = config_path(recipe)
    assert path.read_text() == render(recipe), f"run `python -m recipes.export {name}`"
    config = yaml.safe_load(path.read_text())
    data = config["data"]
    tokens_per_step = data["global_batch_size"] * data["seq_len"]
    budget = sum(stage.get("tokens", 0) for stage in data["stages"])
    assert config["trainer"]["max_steps"] >= budget / tokens_per_step
    assert not {"init_std", "mtp_loss_weight", "router_z_loss_coeff"} & set(config["model"])


def contains(full, part) -> bool:
    """Every value of `part` is in `full` (which may hold more keys: the defaults)."""
    if isinstance(part, dict):
        return isinstance(full, dict) and all(key in full and contains(full[key], v) for key, v in part.items())
    if isinstance(part, list):
        return isinstance(full, list) and len(full) == len(part) and all(map(contains, full, part))
    return full == part


@pytest.mark.parametrize("name", list(RECIPES))
def test_configs_parse_through_train_py(name, capsys):
    """train.py's LightningCLI reads each config as it is: `--print_config` resolves it, and every value
    of the file is in the resolved run."""
    path = CONFIGS / f"{name}.yaml"
    with pytest.raises(SystemExit) as exit_info:
        train.main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    written = yaml.safe_load(path.read_text())
    for section in ("seed_everything", "trainer", "model", "data"):
        assert contains(resolved[section], written[section]), section


def stage_estimates(config: dict, gpu_memory_gb: float) -> dict[str, object]:
    """Stage name -> the memory estimate of that stage of a train.py config, on the config's own layout:
    its nodes, devices, strategy (dp_replicate, dp_shard, ep, checkpointing), loss chunk, and the seq_len
    and rows per micro-batch the data module gives the stage."""
    trainer, model, data = config["trainer"], config["model"], config["data"]
    strategy = trainer.get("strategy", {}).get("init_args", {})
    world = trainer["num_nodes"] * trainer["devices"]
    ramp = BatchRamp(**data["batch_ramp"]) if data["batch_ramp"] else None
    stages = [Stage(**stage) for stage in data["stages"] or [{"seq_len": data["seq_len"]}]]
    curriculum = Curriculum(stages, list(data["sources"]), data["seq_len"], data["micro_batch_size"],
                            data["global_batch_size"], ramp, world, data["batch_mode"])  # fmt: skip
    cfg = preset(model["model"], **(model["model_overrides"] or {}))
    dims = ParallelDims.for_world(
        world, strategy.get("dp_replicate", 1), strategy.get("dp_shard"), strategy.get("ep", 1)
    )
    estimates = {}
    for stage in stages:
        seq_len, _, rows, _ = curriculum.shape(stage, data["global_batch_size"])
        estimates[stage.name] = estimate_memory(
            cfg, dims, activation_checkpointing=strategy.get("activation_checkpointing", "none"), micro_batch=rows,
            seq_len=seq_len, loss_chunk_tokens=model["loss_chunk_tokens"], gpu_memory_gb=gpu_memory_gb,
        )  # fmt: skip
    return estimates


def test_every_shipped_stage_fits():
    """Every stage of every configs/*.yaml fits its GPUs by the memory estimate on that config's layout
    (the GPU memory is the recipe's; the YAML does not carry it)."""
    paths = sorted(CONFIGS.glob("*.yaml"))
    assert {path.stem for path in paths} >= set(RECIPES)
    for path in paths:
        memory = RECIPES[path.stem].gpu_memory_gb if path.stem in RECIPES else 80.0
        estimates = stage_estimates(yaml.safe_load(path.read_text()), memory)
        assert estimates
        over = {name: round(e.total / GB, 1) for name, e in estimates.items() if not e.fits}
        assert not over, f"{path.name}: stages over {memory:g} GB per GPU: {over}"


def test_the_old_one_t_config_would_fail_the_fit_check():
    """The same check on the 1t config with the report's 32K stages, on its 126 nodes x 8, EP 16, full
    checkpointing: the estimate puts both 32K stages over 80 GB (and only them)."""
    recipe = get_recipe("1t")
    old = report_recipe("1t", peak_lr=recipe.model["optimizer"]["lr"], global_batch=recipe.data["global_batch_size"],
                        nodes=recipe.trainer["num_nodes"], ep=recipe.strategy_args["ep"])  # fmt: skip
    estimates = stage_estimates(run_config(old), 80.0)
    assert [name for name, e in estimates.items() if not e.fits] == ["long_context", "reasoning"]
    long = estimates["long_context"]
    assert (long.dims.world, long.dims.ep, long.micro_batch, long.seq_len) == (1008, 16, 1, 32768)
    assert long.activation_checkpointing == "full" and long.total > 80 * GB


def test_one_t_long_stages_fit_no_layout():
    """The reason the 1t recipe gives: one 32,768-token row fits no layout of this strategy in 80 GB,
    whatever the nodes, EP or checkpointing mode, since more ranks shard only the model states. On
    141 GB GPUs the recipe's own layout fits."""
    recipe = get_recipe("1t")
    assert [stage.seq_len for stage in recipe.left_out] == [32768, 32768] and recipe.left_out_reason
    cfg = recipe.config()
    row = dict(micro_batch=1, seq_len=32768, loss_chunk_tokens=recipe.model["loss_chunk_tokens"], gpu_memory_gb=80.0)
    for nodes in (126, 252, 504, 1008, 2016, 4032):
        for ep in (8, 16, 32, 64, 128, 256):
            if (nodes * 8) % ep:
                continue
            for mode in AC_MODES:
                estimate = estimate_memory(cfg, ParallelDims.for_world(nodes * 8, ep=ep), activation_checkpointing=mode,
                                           **row)  # fmt: skip
                assert not estimate.fits, estimate.describe()
    widest = estimate_memory(cfg, ParallelDims.for_world(4032 * 8, ep=16), activation_checkpointing="full", **row)
    assert widest.model_states < 1 * GB and widest.total > 100 * GB  # the activations stay with the row
    assert recipe.with_args(gpu_memory_gb=141.0).estimate(seq_len=32768, micro_batch=1).fits


def test_left_out_stages_need_a_reason():
    with pytest.raises(RecipeError, match=r"left_out stages and left_out_reason go together"):
        dataclasses.replace(get_recipe("1t"), left_out_reason=None)
    with pytest.raises(RecipeError, match=r"stage 'pretrain_1' is both in stages and in left_out"):
        dataclasses.replace(get_recipe("1t"), left_out=[Stage("pretrain_1", tokens=1)])
    with pytest.raises(RecipeError, match=r"leaves out stage 'nope', which is not a report stage"):
        report_recipe("mini", 3.36e-4, 4400, 2, 8, leave_out=("nope",), reason="x")


def test_misspelt_keys_are_refused():
    """A key that is no argument of its class is one error naming the recipe, the key and the valid names."""
    tiny = get_recipe("tiny")
    with pytest.raises(RecipeError, match=r"^recipe 'tiny': model \(LingModule\) has no argument 'peak_lr'; "
                                          r"valid ones are model, model_overrides, "):  # fmt: skip
        dataclasses.replace(tiny, model={**tiny.model, "peak_lr": 1e-3})
    with pytest.raises(RecipeError, match=r"data \(LingDataModule\) has no argument 'micro_batch'; did you mean "
                                          r"'micro_batch_size'\? valid ones are sources, "):  # fmt: skip
        tiny.with_args(data={"micro_batch": 4})
    with pytest.raises(RecipeError, match=r"model.optimizer \(OptimizerConfig\) has no argument 'beta'; did you"):
        tiny.with_args(model={"optimizer": {"lr": 1e-3, "beta": [0.9, 0.95]}})
    with pytest.raises(RecipeError, match=r"trainer.strategy \(LingParallelStrategy\) has no argument 'expert_par"):
        get_recipe("mini").with_args(strategy={"expert_parallel": 8})
    wsm = [{"class_path": "callbacks.wsm.WSM", "init_args": {"intervall": 5, "count": 2}}]
    with pytest.raises(RecipeError, match=r"trainer.callbacks\[0\] \(WSM\) has no argument 'intervall'"):
        tiny.with_args(trainer={"callbacks": wsm})
    with pytest.raises(RecipeError, match=r"trainer\.max_steps follows from train_tokens"):
        tiny.with_args(trainer={"max_steps": 10})
    with pytest.raises(RecipeError, match=r"recipe 'tiny': 'num_expert' is not a Ling config field"):
        tiny.with_args(model={"model_overrides": {"num_expert": 8}})


def test_impossible_runs_are_refused():
    mini = get_recipe("mini")
    wider = mini.with_args(trainer={"num_nodes": 4}, strategy={"dp_shard": None})
    assert wider.parallel_dims == ParallelDims(1, 32, 8)
    with pytest.raises(RecipeError, match=r"global_batch_size=4400 is not a multiple of 32"):
        _ = wider.accumulate_grad_batches
    with pytest.raises(RecipeError, match=r"recipe 'mini': ep=3 must divide dp_shard=16"):
        mini.with_args(strategy={"ep": 3})
    with pytest.raises(RecipeError, match=r"recipe 'mini': the mesh dp_replicate=1 x dp_shard=16 needs 16 processes"):
        mini.with_args(trainer={"num_nodes": 4})
    with pytest.raises(RecipeError, match=r"not a whole number of increments of 1000"):
        mini.with_args(data={"batch_ramp": BatchRamp(3024, 1000, 10)})
    with pytest.raises(RecipeError, match=r"recipe 'mini': unknown model preset 'nano'"):
        mini.with_args(model={"model": "nano"})
