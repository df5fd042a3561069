"""Recipes: the report's values, whole gradient accumulation, a fitting layout, the plan CLI."""

import dataclasses
from pathlib import Path

import pytest

from ling.data.curriculum import Curriculum, Stage
from ling.planner import AC_MODES, GB, ParallelLayout, plan_memory
from ling.presets import PRESETS, preset
from ling.schedules import BatchRamp
from recipes import RECIPES, Recipe, RecipeError, get_recipe, report_recipe
from recipes.plan import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

REPORT = {  # Ling 2.0 report Table 1 / §3.2.1: peak LR, batch (sequences)
    "mini": (3.36e-4, 4400),
    "flash": (2.61e-4, 8352),
    "1t": (1.86e-4, 18144),
}


def test_registry():
    assert list(RECIPES) == ["tiny", "mini", "flash", "1t"]
    for name, recipe in RECIPES.items():
        assert recipe.name == name and recipe.preset in PRESETS
        config = recipe.config()
        assert config.initializer_range == 0.006 and config.mtp_loss_scaling_factor == 0.1
        assert config.num_nextn_predict_layers == 1


@pytest.mark.parametrize("name", list(RECIPES))
def test_shared_training_settings(name):
    recipe = get_recipe(name)
    assert recipe.mtp_loss_weight == 0.1
    assert recipe.bias_update_rate == 1e-3 and recipe.bias_update_rate_after_extension == 1e-4
    assert recipe.init_std == 0.006
    assert recipe.weight_decay == 0.1 and recipe.betas == (0.9, 0.95) and recipe.grad_clip == 1.0
    assert (recipe.layout.micro_batch, recipe.layout.seq_len) == (recipe.micro_batch, recipe.seq_len)
    per_step = recipe.layout.world * recipe.micro_batch
    assert recipe.global_batch % per_step == 0
    assert recipe.accumulate_grad_batches * per_step == recipe.global_batch
    assert plan_memory(recipe.config(), recipe.layout).fits
    curriculum = recipe.curriculum()  # every stage is whole micro-batches per rank on the layout
    assert curriculum.plan(0).global_rows == (recipe.batch_ramp_start or recipe.global_batch)


@pytest.mark.parametrize("name", ["mini", "flash", "1t"])
def test_report_data_plan(name):
    """The report's stages: 2 x 10T at 4K (68/32 then 54/46), 150B at 32K with 20% long sequences and
    the lower bias-update rate, 600B of reasoning data, and YaRN x4 on 32K written at export. 1t keeps
    its 32K stages out of the config (they fit no layout, see test_one_t_long_stages_fit_no_layout)."""
    recipe = get_recipe(name)
    stages = {stage.name: stage for stage in recipe.stages + recipe.left_out}
    assert list(stages) == ["pretrain_1", "pretrain_2", "long_context", "reasoning"]
    assert [stages[n].tokens for n in stages] == [10**13, 10**13, 1.5 * 10**11, 6 * 10**11]
    shipped = [stage.name for stage in recipe.stages]
    assert shipped == (["pretrain_1", "pretrain_2"] if name == "1t" else list(stages))
    assert recipe.train_tokens == sum(stages[n].tokens for n in shipped)
    assert recipe.train_tokens == (20 * 10**12 if name == "1t" else 20_750_000_000_000)
    assert stages["pretrain_1"].mixture == {"general": 0.68, "reasoning": 0.32}
    assert stages["pretrain_2"].mixture == {"general": 0.54, "reasoning": 0.46}
    long = stages["long_context"]
    assert long.seq_len == 32768 and long.mixture["long"] == 0.2
    assert long.mixture["general"] / long.mixture["reasoning"] == pytest.approx(54 / 46)
    assert sum(long.mixture.values()) == pytest.approx(1.0)
    assert long.bias_update_rate == stages["reasoning"].bias_update_rate == 1e-4
    # 32K rows: the tokens per step of the full batch, rounded down to whole micro-batches per rank.
    world = recipe.layout.world
    assert long.global_batch_size % world == 0
    assert 0 <= recipe.global_batch * 4096 - long.global_batch_size * 32768 < world * 32768
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert recipe.export_rope_scaling == (None if name == "1t" else yarn)  # a model trained at 4K only gets none


@pytest.mark.parametrize("name", ["mini", "flash", "1t"])
def test_report_values_and_ramp(name):
    recipe = get_recipe(name)
    lr, batch = REPORT[name]
    assert recipe.peak_lr == lr and recipe.global_batch == batch
    assert recipe.warmup_steps == 2000 and recipe.seq_len == 4096
    assert recipe.batch_ramp_start == 3024
    assert recipe.batch_ramp_samples == 122_070_312  # 500e9 tokens / 4096, rounded
    assert (recipe.global_batch - recipe.batch_ramp_start) % recipe.batch_ramp_increment == 0
    # Every batch of the ramp is whole micro-batches on every rank of the recipe's layout.
    per_step = recipe.layout.world * recipe.micro_batch
    batches = [recipe.global_batch_at(s) for s in range(0, 130_000_000, 250_000)]
    assert batches[0] == 3024 and batches[-1] == recipe.global_batch
    assert batches == sorted(batches)
    assert all(b % per_step == 0 for b in batches)
    assert recipe.global_batch_at(recipe.batch_ramp_samples) == recipe.global_batch
    assert recipe.global_batch_at(recipe.batch_ramp_samples - 1) < recipe.global_batch


def test_layouts():
    assert (get_recipe("mini").layout.world, get_recipe("mini").layout.ep) == (16, 8)
    assert (get_recipe("flash").layout.world, get_recipe("flash").layout.ep) == (144, 8)
    assert (get_recipe("1t").layout.world, get_recipe("1t").layout.ep) == (1008, 16)
    assert get_recipe("tiny").accumulate_grad_batches == 2 and get_recipe("tiny").batch_ramp_start is None


def test_errors():
    with pytest.raises(RecipeError, match=r"unknown recipe 'huge'; choose one of tiny, mini, flash, 1t\."):
        get_recipe("huge")
    assert get_recipe("1T").name == "1t"
    recipe = get_recipe("mini").with_layout(nodes=4)
    assert recipe.layout.world == 32
    with pytest.raises(RecipeError, match=r"global_batch=4400 is not a multiple of 32"):
        _ = recipe.accumulate_grad_batches
    base = get_recipe("tiny")
    with pytest.raises(RecipeError, match=r"must equal the recipe's micro_batch=8"):
        dataclasses.replace(base, layout=ParallelLayout(nodes=1, gpus_per_node=1, ep=1, seq_len=128))
    with pytest.raises(RecipeError, match=r"reach it in whole increments"):
        dataclasses.replace(get_recipe("mini"), batch_ramp_increment=1000)
    with pytest.raises(RecipeError, match=r"preset 'nano'"):
        Recipe("x", "nano", 1e-3, 0, 16, 128, 4, base.layout)
    # get_recipe hands out copies: editing one does not change the registry.
    get_recipe("mini").model_overrides["num_hidden_layers"] = 2
    assert RECIPES["mini"].model_overrides == {}


def test_plan_cli(capsys):
    main(["mini"])
    out = capsys.readouterr().out
    assert "16,255,643,392" in out and "accumulate_grad_batches 275" in out
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


@pytest.mark.parametrize("name", list(RECIPES))
def test_configs_are_generated_from_the_recipes(name):
    """configs/<name>.yaml is exactly what the recipe renders, and says what the recipe says."""
    import yaml

    from recipes.export import config_path, render

    recipe = RECIPES[name]
    path = config_path(recipe)
    assert path.read_text() == render(recipe), f"run `python -m recipes.export {name}`"
    config = yaml.safe_load(path.read_text())
    assert config["model"]["optimizer"]["lr"] == recipe.peak_lr
    assert config["model"]["schedule"] == {"name": "wsm", "warmup_steps": recipe.warmup_steps}
    assert config["model"]["mtp_loss_weight"] == 0.1 and config["model"]["init_std"] == 0.006
    assert config["model"]["bias_update_rate"] == 1e-3
    assert config["data"]["global_batch_size"] == recipe.global_batch
    assert config["data"]["seq_len"] == recipe.seq_len
    assert config["trainer"]["num_nodes"] * config["trainer"]["devices"] == recipe.layout.world


def test_plan_cli_prints_the_data_stages(capsys):
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


def shipped_stage_plans(config: dict, gpu_memory_gb: float) -> dict[str, object]:
    """Stage name -> the planner's MemoryPlan of that stage of a train.py config, on the config's own
    layout: its nodes, devices, strategy (ep, dp_replicate, checkpointing), loss chunk, and the seq_len
    and rows per micro-batch the data module gives the stage."""
    trainer, model, data = config["trainer"], config["model"], config["data"]
    strategy = trainer.get("strategy", {}).get("init_args", {})
    nodes, devices = trainer["num_nodes"], trainer["devices"]
    ramp = BatchRamp(**data["batch_ramp"]) if data["batch_ramp"] else None
    stages = [Stage(**stage) for stage in data["stages"] or [{"seq_len": data["seq_len"]}]]
    curriculum = Curriculum(stages, list(data["sources"]), data["seq_len"], data["micro_batch_size"],
                            data["global_batch_size"], ramp, nodes * devices, data["batch_mode"])  # fmt: skip
    cfg = preset(model["model"], **(model["model_overrides"] or {}))
    plans = {}
    for stage in stages:
        seq_len, _, rows, _ = curriculum.shape(stage, data["global_batch_size"])
        layout = ParallelLayout(
            nodes=nodes, gpus_per_node=devices, ep=strategy.get("ep", 1), dp_replicate=strategy.get("dp_replicate", 1),
            activation_checkpointing=strategy.get("activation_checkpointing", "none"), micro_batch=rows,
            seq_len=seq_len, gpu_memory_gb=gpu_memory_gb, loss_chunk_tokens=model["loss_chunk_tokens"],
        )  # fmt: skip
        assert strategy.get("dp_shard", layout.dp_shard) == layout.dp_shard
        plans[stage.name] = plan_memory(cfg, layout)
    return plans


def test_every_shipped_stage_fits():
    """Every stage of every configs/*.yaml fits its GPUs by the planner's estimate on that config's
    layout (the GPU memory is the recipe's; the YAML does not carry it)."""
    import yaml

    paths = sorted(CONFIGS.glob("*.yaml"))
    assert {path.stem for path in paths} >= set(RECIPES)
    for path in paths:
        memory = RECIPES[path.stem].layout.gpu_memory_gb if path.stem in RECIPES else 80.0
        plans = shipped_stage_plans(yaml.safe_load(path.read_text()), memory)
        assert plans
        over = {name: round(plan.total / GB, 1) for name, plan in plans.items() if not plan.fits}
        assert not over, f"{path.name}: stages over {memory:g} GB per GPU: {over}"


def test_the_old_one_t_config_would_fail_the_fit_check():
    """The same check on the 1t config as it was, with the report's 32K stages on 126 nodes x 8, EP 16,
    full checkpointing: the planner reports both 32K stages over 80 GB (and only them)."""
    from recipes.export import stage_config

    recipe = get_recipe("1t")
    old = dataclasses.replace(recipe, stages=recipe.stages + recipe.left_out, left_out=[], left_out_reason=None,
                              train_tokens=20_750_000_000_000)  # fmt: skip
    plans = shipped_stage_plans(stage_config(old), 80.0)
    assert [name for name, plan in plans.items() if not plan.fits] == ["long_context", "reasoning"]
    long = plans["long_context"]
    assert (long.layout.nodes, long.layout.ep, long.layout.micro_batch, long.layout.seq_len) == (126, 16, 1, 32768)
    assert long.layout.activation_checkpointing == "full" and long.total > 80 * GB


def test_one_t_long_stages_fit_no_layout():
    """The reason the 1t recipe gives: one 32,768-token row fits no layout of this strategy in 80 GB,
    whatever the nodes, EP or checkpointing mode, since more ranks shard only the model states. On
    141 GB GPUs the recipe's own layout fits."""
    recipe = get_recipe("1t")
    assert [stage.seq_len for stage in recipe.left_out] == [32768, 32768] and recipe.left_out_reason
    cfg = recipe.config()
    for nodes in (126, 252, 504, 1008, 2016, 4032):
        for ep in (8, 16, 32, 64, 128, 256):
            if (nodes * 8) % ep:
                continue
            for mode in AC_MODES:
                layout = ParallelLayout(nodes=nodes, ep=ep, activation_checkpointing=mode, seq_len=32768)
                assert not plan_memory(cfg, layout).fits, layout.describe()
    widest = plan_memory(cfg, ParallelLayout(nodes=4032, ep=16, seq_len=32768))
    assert widest.model_states < 1 * GB and widest.total > 100 * GB  # the activations stay with the row
    assert plan_memory(cfg, dataclasses.replace(recipe.layout, seq_len=32768, gpu_memory_gb=141.0)).fits


def test_left_out_stages_need_a_reason():
    with pytest.raises(RecipeError, match=r"left_out stages and left_out_reason go together"):
        dataclasses.replace(get_recipe("1t"), left_out_reason=None)
    with pytest.raises(RecipeError, match=r"stage 'pretrain_1' is both in stages and in left_out"):
        dataclasses.replace(get_recipe("1t"), left_out=[Stage("pretrain_1", tokens=1)])
    with pytest.raises(RecipeError, match=r"leaves out stage 'nope', which is not a report stage"):
        report_recipe("mini", 3.36e-4, 4400, 2, 8, leave_out=("nope",), reason="x")
