"""Recipes: the report's values, whole gradient accumulation, a fitting layout, the plan CLI."""

import dataclasses

import pytest

from ling.planner import ParallelLayout, plan_memory
from ling.presets import PRESETS
from recipes import RECIPES, Recipe, RecipeError, get_recipe
from recipes.plan import main

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
    the lower bias-update rate, 600B of reasoning data, and YaRN x4 on 32K written at export."""
    recipe = get_recipe(name)
    stages = {stage.name: stage for stage in recipe.stages}
    assert list(stages) == ["pretrain_1", "pretrain_2", "long_context", "reasoning"]
    assert [stages[n].tokens for n in stages] == [10**13, 10**13, 1.5 * 10**11, 6 * 10**11]
    assert recipe.train_tokens == 20_750_000_000_000
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
    assert recipe.export_rope_scaling == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


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
