"""One training run from a recipe: inputs, model, Lightning trainer, export, curve and summary.

A run directory holds:
    recipe.yaml                  the recipe as run (after --set overrides)
    checkpoints/last.ckpt        Lightning state after the last finished epoch (only for --resume)
    logs/session-<k>/metrics.csv one CSV per start or resume (CSVLogger)
    best/                        the exported checkpoint: config.json, model.safetensors, README.md
    training_curve.png           loss and dev metrics
    summary.json                 counts of used and skipped mentions, best dev MRR, wall time

On several devices (`trainer.devices`, `trainer.num_nodes`, strategy "ddp") Lightning runs the same
command once per device; every process trains, and only the first writes the run directory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy

from mmel.backbones import load_backbone
from mmel.backbones.text_layers import TopTextLayers, is_fine_tuned, lower_layers_fingerprint
from mmel.core.config import ConfigError
from mmel.core.errors import MismatchError, MmelError
from mmel.core.paths import atomic_write_json
from mmel.core.types import Dataset
from mmel.data import load_dataset
from mmel.features.templates import get_template, template_for_views
from mmel.features.views import DatasetFeatures, list_views, open_features
from mmel.models import MODELS
from mmel.models.base import MelModel
from mmel.training.datamodule import DataCounts, ItemTable, LinkedSplit, MelDataModule
from mmel.training.export import BestModelExporter, ExportInfo
from mmel.training.plots import plot_training_curve
from mmel.training.recipe import ModelSection, Recipe, TrainerSection, save_recipe
from mmel.training.system import MONITOR, BackboneEncoder, MelSystem, NameSignal

logger = logging.getLogger(__name__)
WIDTH_KEYS = ("text_dim", "image_global_dim", "image_patch_dim")


@dataclass
class TrainResult:
    run_dir: Path
    best_dir: Path
    best_mrr: float | None      # best dev MRR (None if no validation ran)
    best_epoch: int | None      # 1-based epoch of the exported weights
    epochs_run: int
    counts: DataCounts
    wall_time_s: float
    curve_png: Path | None

    def summary(self) -> str:
        best = "no validation ran" if self.best_mrr is None else f"best dev MRR {self.best_mrr:.4f} " \
                                                                 f"(epoch {self.best_epoch})"
        return (f"trained {self.epochs_run} epochs in {self.wall_time_s:.0f} s; {best}; "
                f"checkpoint: {self.best_dir}; curve: {self.curve_png}")


@dataclass
class RunInputs:
    """Everything a run needs besides the recipe: the data module, model widths and provenance."""

    datamodule: MelDataModule
    widths: dict[str, int]
    info: ExportInfo
    encoder: BackboneEncoder | TopTextLayers | None = None


# --- building the pieces -----------------------------------------------------------------------


def build_model(section: ModelSection, widths: dict[str, int]) -> MelModel:
    """The recipe's model, its widths taken from the features; `options` may not contradict them."""
    model_class = MODELS.get(section.type)
    clashes = {key: (section.options[key], widths[key]) for key in WIDTH_KEYS
               if key in section.options and section.options[key] != widths[key]}
    if clashes:
        raise ConfigError(f"model.options widths contradict the features (option, features): {clashes}")
    return model_class(model_class.config_class.from_dict({**section.options, **widths}))


def stored_inputs(recipe: Recipe, dataset: Dataset, features_dir: Path) -> RunInputs:
    """Frozen backbone: features from the store, checked against the dataset and the recipe.

    With `backbone.train_text_layers`, the store holds the token states below the trained layers and
    a `TopTextLayers` copy of the backbone's top layers turns them into features, with gradients.
    """
    top_layers = _top_text_layers(recipe)
    features = _open_matching_view(recipe, dataset, Path(features_dir),
                                   text_layer=None if top_layers is None else top_layers.first)
    splits = [recipe.data.train_split, recipe.data.dev_split]
    missing = [split for split in splits if split in dataset.splits and split not in features.mentions]
    if missing:
        raise MismatchError(f"{features.view_dir}: no features for split(s) {missing}; rebuild them with "
                            f"`mmel features build --splits {','.join(splits)}`")
    backbone = {key: value for key, value in features.manifest["backbone"].items() if key != "text_layer"}
    if top_layers is not None:        # the checkpoint's backbone is the full encoder, not the cached layers
        backbone["fingerprint"] = backbone["fingerprint"].removesuffix(lower_layers_fingerprint("", top_layers.first))
    info = ExportInfo(backbone=backbone, preprocess=_preprocess_block(features.manifest["template"],
                                                                      features.max_text_length, backbone),
                      recipe=recipe)
    datamodule = _datamodule(recipe, dataset, features.entities, {s: features.mentions[s] for s in splits
                                                                   if s in features.mentions})
    return RunInputs(datamodule, {key: int(backbone[key]) for key in WIDTH_KEYS}, info, encoder=top_layers)


def _top_text_layers(recipe: Recipe) -> TopTextLayers | None:
    """The trainable top text layers of `backbone.train_text_layers`, copied from the pretrained backbone."""
    section = recipe.backbone
    if section.train_text_layers == 0:
        return None
    backbone = load_backbone(section.name, **({"path": section.path} if section.path else {}))
    return TopTextLayers.from_backbone(backbone, section.train_text_layers)


def end_to_end_inputs(recipe: Recipe, dataset: Dataset) -> RunInputs:
    """Trainable backbone (the paper's recipe): texts and images are encoded on the fly, with gradients."""
    section = recipe.backbone
    backbone = load_backbone(section.name, **({"path": section.path} if section.path else {}))
    template = get_template(section.template)
    block = {"name": backbone.name, "fingerprint": backbone.fingerprint,
             **{key: getattr(backbone, key) for key in (*WIDTH_KEYS, "num_patches", "image_size")}}
    info = ExportInfo(backbone=block, preprocess=_preprocess_block(template.to_dict(), section.max_text_length, block),
                      recipe=recipe)
    splits = {s: ItemTable.for_split(dataset, s, template) for s in (recipe.data.train_split, recipe.data.dev_split)
              if s in dataset.splits}
    datamodule = _datamodule(recipe, dataset, ItemTable.for_kb(dataset, template), splits,
                             train_entities=ItemTable.for_kb(dataset, template, image_choice="random"))
    return RunInputs(datamodule, {key: getattr(backbone, key) for key in WIDTH_KEYS}, info,
                     encoder=BackboneEncoder(backbone, section.max_text_length))


def _datamodule(recipe: Recipe, dataset: Dataset, entities: Any, tables: dict[str, Any], **options: Any
                ) -> MelDataModule:
    train_split, dev_split = recipe.data.train_split, recipe.data.dev_split
    if train_split not in tables:
        raise ConfigError(f"dataset {dataset.name!r} has no split {train_split!r} to train on; "
                          f"splits: {', '.join(dataset.splits)}")
    dev = LinkedSplit.from_dataset(dataset, dev_split, tables[dev_split]) if dev_split in tables else None
    if dev is None:
        logger.warning("dataset %s has no split %r: training without validation or early stopping",
                       dataset.name, dev_split)
    return MelDataModule(entities, LinkedSplit.from_dataset(dataset, train_split, tables[train_split]), dev,
                         data=recipe.data, validation=recipe.validation, seed=recipe.trainer.seed,
                         entity_names=[entity.name for entity in dataset.kb],
                         entity_texts=[entity.text("description") for entity in dataset.kb],
                         name_signal=recipe.model.name_signal, **options)


def _open_matching_view(recipe: Recipe, dataset: Dataset, features_dir: Path, *, text_layer: int | None
                        ) -> DatasetFeatures:
    """The one view of the recipe's backbone, template and length (token states after `text_layer`, if given).

    Views of fine-tuned backbones (`mmel features build --model`) are not training inputs.
    """
    wanted = {"backbone": recipe.backbone.name, "template": recipe.backbone.template,
              "max_text_length": recipe.backbone.max_text_length, "text_layer": text_layer, "fine_tuned": False}
    views = list_views(features_dir).get(dataset.name, [])
    matching = []
    for view in views:
        features = open_features(features_dir, dataset.name, view_id=view)
        backbone = features.manifest["backbone"]
        found = {"backbone": backbone["name"], "template": features.template.name,
                 "max_text_length": features.max_text_length, "text_layer": backbone.get("text_layer"),
                 "fine_tuned": is_fine_tuned(backbone["fingerprint"])}
        if found == wanted:
            matching.append(features)
    if len(matching) != 1:
        layer_option = "" if text_layer is None else f" --text-layer {text_layer}"
        raise MismatchError(f"{features_dir}: {len(matching)} feature views of dataset {dataset.name!r} match the "
                            f"recipe's {wanted} (views: {', '.join(views) or 'none'}); build them with "
                            f"`mmel features build {dataset.root} --store {features_dir} --backbone "
                            f"{wanted['backbone']}{layer_option}`")
    matching[0].check_dataset(dataset)
    return matching[0]


def _preprocess_block(template: dict[str, Any], max_text_length: int, backbone: dict[str, Any]) -> dict[str, Any]:
    return {"template": template, "max_text_length": max_text_length, "image_size": backbone.get("image_size")}


# --- running -----------------------------------------------------------------------------------


def train(recipe: Recipe, *, data_dir: Path, out_dir: Path, features_dir: Path | None = None,
          resume: bool = False) -> TrainResult:
    """Train `recipe` on the dataset at `data_dir` (features from `features_dir` unless the backbone trains)."""
    if not recipe.backbone.trainable and features_dir is None:
        raise ConfigError("a frozen-backbone recipe reads features: pass --features STORE_DIR")
    dataset = load_dataset(data_dir)
    _configure_torch(recipe)
    if recipe.backbone.trainable:
        inputs = end_to_end_inputs(recipe, dataset)
    else:
        inputs = stored_inputs(recipe, dataset, Path(features_dir))
    inputs.info.data = {"dataset": dataset.name, "kb_size": len(dataset.kb)}
    model = build_model(recipe.model, inputs.widths)
    _check_model_reads(model, recipe, inputs.datamodule)
    return fit(model, inputs.datamodule, recipe, out_dir, inputs.info, encoder=inputs.encoder, resume=resume)


def _check_model_reads(model: MelModel, recipe: Recipe, datamodule: MelDataModule) -> None:
    """The recipe's template must render the model's primary views, and the features must hold its further views."""
    views = model.feature_views()
    expected = template_for_views(views).name
    if recipe.backbone.template != expected:
        raise ConfigError(f"model {recipe.model.type} reads the views {views.mention} / {views.entity}, rendered by "
                          f"template {expected!r}, but the recipe says backbone.template={recipe.backbone.template!r}")
    further = set(views.mention_extra + views.entity_extra)
    if further and recipe.backbone.trainable:
        raise ConfigError(f"model {recipe.model.type} reads further text views ({', '.join(sorted(further))}), "
                          "which only the feature store provides: train it on a frozen backbone")
    if further and recipe.backbone.train_text_layers:
        raise ConfigError(f"model {recipe.model.type} reads further text views ({', '.join(sorted(further))}) as "
                          "pooled vectors, which the trained top text layers would not refine: set "
                          "backbone.train_text_layers=0 for it")
    held = set(getattr(datamodule.entities, "extra_views", [])) | set(
        getattr(datamodule.train_split.table, "extra_views", []))
    missing = sorted(further - held)
    if missing:
        raise ConfigError(f"model {recipe.model.type} reads text views {', '.join(missing)} that the features lack; "
                          f"add them with `mmel features build ... {' '.join('--view ' + v for v in missing)}`")


def _configure_torch(recipe: Recipe) -> None:
    L.seed_everything(recipe.trainer.seed, workers=True, verbose=False)
    if recipe.trainer.num_threads > 0:
        torch.set_num_threads(recipe.trainer.num_threads)


def fit(model: MelModel, datamodule: MelDataModule, recipe: Recipe, out_dir: Path, info: ExportInfo, *,
        encoder: BackboneEncoder | TopTextLayers | None = None, resume: bool = False) -> TrainResult:
    """Run (or resume) Lightning training of `model`; export the best weights to `out_dir/best`."""
    out_dir = Path(out_dir)
    last = out_dir / "checkpoints" / "last.ckpt"
    if resume and not last.is_file():
        raise MmelError(f"nothing to resume: {last} does not exist")
    if not resume and last.is_file():
        raise MmelError(f"{out_dir} already holds a run; pass --resume to continue it, or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    system = MelSystem(model, recipe.optimizer, validation=recipe.validation, encoder=encoder,
                       name_signal=NameSignal() if recipe.model.name_signal else None,
                       progress=recipe.trainer.progress)
    exporter = BestModelExporter(out_dir / "best", info)
    datamodule.setup("fit")
    info.data.update(train=datamodule.counts.train, dev=datamodule.counts.dev)
    trainer = _trainer(recipe, out_dir, exporter, with_validation=datamodule.dev_split is not None)
    if trainer.is_global_zero:
        save_recipe(recipe, out_dir / "recipe.yaml")
    trainer.fit(system, datamodule=datamodule, ckpt_path=str(last) if resume else None)
    wall = time.perf_counter() - start
    curve = _plot(out_dir, recipe) if trainer.is_global_zero else None
    result = TrainResult(run_dir=out_dir, best_dir=out_dir / "best", best_mrr=exporter.best,
                         best_epoch=None if exporter.best_epoch is None else exporter.best_epoch + 1,
                         epochs_run=trainer.current_epoch, counts=datamodule.counts, wall_time_s=wall, curve_png=curve)
    image_problems = _image_problems(datamodule)
    if trainer.is_global_zero:
        atomic_write_json(out_dir / "summary.json", {**asdict(result), "run_dir": str(out_dir),
                                                     "best_dir": str(result.best_dir), "curve_png": str(curve),
                                                     "image_problems": image_problems})
    return result


def _image_problems(datamodule: MelDataModule) -> dict[str, str]:
    """Unusable image files met while loading raw items (end-to-end runs), per table, as counted summaries.

    Each process counts (and logs) the images it loaded; on several processes the summary file holds
    the first process's counts.
    """
    tables = {"kb": datamodule.entities, "kb (training)": datamodule.train_entities,
              "train": datamodule.train_split.table}
    if datamodule.dev_split is not None:
        tables["dev"] = datamodule.dev_split.table
    problems = {name: table.image_report.summary() for name, table in tables.items() if isinstance(table, ItemTable)}
    for message in problems.values():
        logger.info("images: %s", message)
    return problems


def _trainer(recipe: Recipe, out_dir: Path, exporter: BestModelExporter, *, with_validation: bool) -> L.Trainer:
    config = recipe.trainer
    resume_state = ModelCheckpoint(dirpath=out_dir / "checkpoints", filename="last", monitor=None, save_top_k=1,
                                   every_n_epochs=1, save_on_train_epoch_end=True, enable_version_counter=False)
    callbacks: list[L.Callback] = [resume_state, exporter]
    if with_validation:
        callbacks.append(EarlyStopping(monitor=MONITOR, mode="max", patience=config.early_stopping_patience,
                                       min_delta=0.0))
    session = 1 + sum(1 for _ in (out_dir / "logs").glob("session-*"))
    # the data module draws every process's share of the same global batches (GlobalBatchSampler) itself
    return L.Trainer(max_epochs=config.max_epochs, check_val_every_n_epoch=config.check_val_every_n_epoch,
                     accelerator=config.accelerator, strategy=_strategy(config), devices=config.devices,
                     num_nodes=config.num_nodes, use_distributed_sampler=False,
                     precision=config.precision, deterministic=config.deterministic,
                     num_sanity_val_steps=config.num_sanity_val_steps, log_every_n_steps=config.log_every_n_steps,
                     gradient_clip_val=config.gradient_clip_val or None,
                     enable_progress_bar=config.progress, enable_model_summary=False, default_root_dir=out_dir,
                     logger=CSVLogger(save_dir=out_dir, name="logs", version=f"session-{session}"),
                     callbacks=callbacks)


def _strategy(config: TrainerSection) -> str | DDPStrategy:
    """Lightning's strategy for the recipe: one process, or DDP with one process per device.

    DDP is told to look for unused parameters: models keep release parameters that no score reads
    (MIMIC's CMFU `context_layer_norm`, CLIP's `logit_scale` in end-to-end runs), which it would
    otherwise refuse. "auto" is never left to Lightning on several devices, since in a notebook it
    would fork workers that return nothing to this process (see recipe.STRATEGIES).
    """
    several = config.devices != 1 or config.num_nodes > 1
    if config.strategy == "ddp" or several:
        return DDPStrategy(find_unused_parameters=True)
    return config.strategy


def _plot(out_dir: Path, recipe: Recipe) -> Path | None:
    sessions = sorted((out_dir / "logs").glob("session-*/metrics.csv"), key=lambda p: int(p.parent.name.split("-")[1]))
    if not sessions:
        return None
    return plot_training_curve(sessions, out_dir / "training_curve.png", title=recipe.name)


__all__ = ["RunInputs", "TrainResult", "build_model", "end_to_end_inputs", "fit", "stored_inputs", "train"]
