"""Recipes: packaged YAML files load into typed sections; overrides are typed and checked."""

from __future__ import annotations

import dataclasses

import pytest

from mmel.core.config import ConfigError
from mmel.features.templates import template_for_views
from mmel.training.recipe import Recipe, available_recipes, load_recipe, save_recipe
from mmel.training.run import build_model


def test_every_packaged_recipe_loads_and_its_template_renders_its_models_views() -> None:
    names = available_recipes()
    assert {"mimic-paper", "mimic-wikimel-cpu", "mimic-richpediamel-cpu", "mimic-synthetic-cpu", "m3el-paper",
            "m3el-wikimel-cpu", "m3el-richpediamel-cpu", "dim-wikimel-cpu", "dim-richpediamel-cpu"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.model.type == name.split("-")[0]
        model = build_model(recipe.model, {"text_dim": 16, "image_global_dim": 12, "image_patch_dim": 10})
        assert template_for_views(model.feature_views()).name == recipe.backbone.template, name


def test_dim_release_recipe_has_the_release_scripts_hyper_parameters_and_cpu_recipes_change_only_the_rate() -> None:
    release = load_recipe("dim-release")
    optimizer, data = release.optimizer, release.data
    assert (optimizer.lr, optimizer.eps, optimizer.weight_decay) == (5e-5, 1e-8, 1e-3)                # §4.5
    assert (optimizer.schedule, optimizer.warmup_steps, release.trainer.gradient_clip_val) == ("linear", 100, 1.0)
    assert (data.batch_size, data.hard_negatives, data.hard_negative_source) == (64, 1, "tfidf")
    assert release.trainer.seed == 114514 and release.model.options["dropout"] == 0.4
    assert release.trainer.max_epochs == 300 and release.model.options["entity_text"] == "desc"
    for name in ("dim-wikimel-cpu", "dim-richpediamel-cpu"):
        cpu = load_recipe(name)
        assert (cpu.optimizer.lr, cpu.trainer.max_epochs) == (1e-3, 30)
        assert dataclasses.replace(cpu.optimizer, lr=5e-5) == release.optimizer and cpu.data == release.data
    for name in ("dim-wikimel-cpu", "dim-richpediamel-cpu"):   # neither dataset's entity text names the entity
        assert load_recipe(name).model.options["entity_text"] == "name_desc"
        assert load_recipe(name).backbone.template == "m3el"


def test_paper_recipe_has_the_published_hyper_parameters() -> None:
    recipe = load_recipe("mimic-paper")
    assert recipe.backbone.trainable and recipe.backbone.name == "clip" and recipe.backbone.max_text_length == 40
    optimizer = recipe.optimizer
    assert (optimizer.lr, optimizer.eps, optimizer.weight_decay, optimizer.betas) == (1e-5, 1e-4, 1e-4, (0.9, 0.999))
    assert optimizer.no_decay == ("bias", "LayerNorm.bias", "LayerNorm.weight")
    trainer = recipe.trainer
    assert (trainer.max_epochs, trainer.check_val_every_n_epoch, trainer.early_stopping_patience, trainer.seed) == \
        (20, 2, 3, 43)
    assert recipe.data.batch_size == 128 and recipe.validation.max_mentions == 0


def test_overrides_are_parsed_and_typed() -> None:
    recipe = load_recipe("mimic-wikimel-cpu", ["trainer.max_epochs=3", "optimizer.lr=1e-3", "data.train_fraction=0.1",
                                               "model.options.mask_missing_images=false", "backbone.path=/m/clip"])
    assert recipe.trainer.max_epochs == 3 and recipe.optimizer.lr == 1e-3 and recipe.data.train_fraction == 0.1
    assert recipe.model.options["mask_missing_images"] is False and recipe.backbone.path == "/m/clip"


@pytest.mark.parametrize(("override", "message"), [
    ("trainer.max_epoch=3", "unknown TrainerSection key"),
    ("trainer.max_epochs=many", "must be an integer"),
    ("optimizer.lr=fast", "must be a number"),
    ("speed=3", "unknown Recipe key"),
    ("trainer=3", "must be a mapping"),
    ("trainer.max_epochs", "must look like section.key=value"),
])
def test_bad_overrides_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_recipe("mimic-wikimel-cpu", [override])


def test_unknown_recipe_lists_the_available_ones_and_files_round_trip(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"available: .*mimic-paper"):
        load_recipe("mimic-nowhere")
    recipe = load_recipe("mimic-synthetic-cpu", ["trainer.seed=7"])
    save_recipe(recipe, tmp_path / "run.yaml")
    assert load_recipe(tmp_path / "run.yaml") == recipe
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_recipe(tmp_path / "bad.yaml")
    assert Recipe.from_dict({}).trainer.max_epochs == 20
