"""Training recipes: typed sections loaded from YAML, with `--set section.key=value` overrides.

A recipe says what a run used (data, backbone, optimiser, epochs, seed, validation); the model's
architecture config is saved with the checkpoint instead. Recipes ship as package data under
`mmel/training/recipes/`, so `load_recipe("mimic-wikimel-cpu")` works after `pip install`; a path
to a YAML file works too. Unknown keys are rejected at every level, with the valid ones listed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import yaml

from mmel.core.config import ConfigBase, ConfigError
from mmel.core.paths import atomic_write_text

RECIPE_SUFFIX = ".yaml"
HARD_NEGATIVE_SOURCES = ("dense", "name", "tfidf")
SCHEDULES = ("constant", "linear")
# Lightning strategies a run supports: "auto" (one device, or "ddp" on several) and "ddp", which
# runs the same command once per device. Spawned or forked workers ("ddp_spawn", "ddp_fork",
# "ddp_notebook") return nothing to the process that starts them, so such a run could not export
# its best checkpoint or write its summary.
STRATEGIES = ("auto", "ddp")


@dataclass
class ModelSection(ConfigBase):
    """The model to train. Its widths come from the features; `options` sets the other config keys."""

    type: str = "mimic"
    options: dict[str, Any] = field(default_factory=dict)
    # mmel option: the surface-name match (mmel.lexical.name_match) as a learned signal. Training adds
    # a cross-entropy over score + w * name_match to the model's loss, w learned with it; the checkpoint
    # stores the learned w as its name-prior weight, which linking adds as the tuned prior is added.
    name_signal: bool = False


@dataclass
class BackboneSection(ConfigBase):
    """Where features come from. Frozen: the feature store; trainable: encoded on the fly, end to end."""

    name: str = "minilm_effnet"
    path: str = ""                 # clip: local checkpoint directory or hub id ("" = the backbone's default)
    trainable: bool = False        # True fine-tunes the backbone with the model (the paper's recipe, §1.2)
    template: str = "mimic"        # text template (mmel.features.templates), §1.1
    max_text_length: int = 40      # §1.1
    # mmel option (frozen backbone only): the top N text layers train with the model, from the token
    # states below them cached in the store (`mmel features build --text-layer <layers - N>`); the
    # checkpoint carries them (backbones/text_layers.py). 0: the text encoder stays frozen.
    train_text_layers: int = 0

    def __post_init__(self) -> None:
        if self.train_text_layers < 0:
            raise ConfigError(f"backbone.train_text_layers must be >= 0, got {self.train_text_layers}")
        if self.train_text_layers and self.trainable:
            raise ConfigError("backbone.train_text_layers trains the top text layers of a frozen backbone; "
                              "with backbone.trainable the whole backbone trains already: set one of them")


@dataclass
class DataSection(ConfigBase):
    train_split: str = "train"
    dev_split: str = "dev"
    train_fraction: float = 1.0    # keep the FIRST fraction of the training file (low-resource runs, §1.10)
    # §1.8; in-batch negatives, so also the number of candidates per row. The GLOBAL batch: with
    # several devices each process loads a share of it and the entities are gathered across
    # processes, so every mention still meets all batch_size gold entities (same objective).
    batch_size: int = 128
    num_workers: int = 0
    # mmel option, not in the paper (0 = the paper's in-batch negatives only): extra entity columns per
    # mention, drawn from the `hard_negative_pool` entities nearest to the mention by the frozen
    # features' global text vectors (its gold excluded). Needs features from the store.
    hard_negatives: int = 0
    hard_negative_pool: int = 20
    # Where the pool comes from: 'dense' (nearest global text vectors) or 'name' (the entities whose
    # names best match the surface form, mmel.lexical.name_match, dense cosine breaking ties and
    # filling the pool): the namesakes a name prior leaves for the model to tell apart. 'tfidf' is
    # DIM's sampler (models.md §4.4): a word of the gold entity's text drawn by TF-IDF weight, then an
    # entity containing it (5%: a random entity), drawn afresh for every batch; the pool is unused.
    hard_negative_source: str = "dense"

    def __post_init__(self) -> None:
        if self.hard_negative_source not in HARD_NEGATIVE_SOURCES:
            raise ConfigError(f"data.hard_negative_source must be one of {', '.join(HARD_NEGATIVE_SOURCES)}, "
                              f"got {self.hard_negative_source!r}")


@dataclass
class OptimizerSection(ConfigBase):
    """AdamW as in §1.8. Parameters whose name contains a `no_decay` substring get no weight decay."""

    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-4
    weight_decay: float = 1e-4
    no_decay: tuple[str, ...] = ("bias", "LayerNorm.bias", "LayerNorm.weight")
    schedule: str = "constant"     # 'constant' (§1.8) or 'linear': warm up, then decay to 0 (DIM, §4.5)
    warmup_steps: int = 0          # optimizer steps of linear warm-up from 0 (DIM: 100)
    backbone_lr: float = 0.0       # learning rate of trained text layers (backbone.train_text_layers); 0 = lr
    name_signal_lr: float = 1.0e-2  # learning rate of the name signal's log-weight (model.name_signal)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optimizer.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class TrainerSection(ConfigBase):
    """Lightning trainer settings. `strategy`, `devices` and `num_nodes` spread a run over processes.

    With `devices` > 1 or `num_nodes` > 1, every process trains on its share of each global batch
    (`data.batch_size` mentions) and the model sees the whole batch's entities, gathered across
    processes with their gradients: the objective, the loss curve and the weights are those of one
    process with the same batch (up to float rounding; dropout and random hard negatives are drawn
    per process). `mmel train` started once runs one process per device ("ddp"); on several
    nodes, start it on each with MASTER_ADDR, MASTER_PORT and NODE_RANK set (or under SLURM).
    """

    max_epochs: int = 20                 # §1.8
    check_val_every_n_epoch: int = 2     # §1.8
    early_stopping_patience: int = 3     # in validation runs, min_delta 0 (§1.8)
    seed: int = 43                       # §1.8
    deterministic: bool = True           # §1.8
    num_threads: int = 0                 # torch CPU threads; 0 keeps torch's default
    accelerator: str = "auto"
    strategy: str = "auto"               # one of STRATEGIES; "auto" is "ddp" when there are several devices
    devices: int = 1                     # devices (processes) per node; -1 = every device of the accelerator
    num_nodes: int = 1
    precision: str = "32-true"           # fp32 (§1.8)
    gradient_clip_val: float = 0.0       # gradient-norm clipping, 0 = none (§1.8); DIM clips at 1.0 (§4.5)
    num_sanity_val_steps: int = 0        # a sanity pass would encode the whole KB once more
    log_every_n_steps: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"trainer.strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.devices == 0 or self.devices < -1:
            raise ConfigError(f"trainer.devices must be a positive number of devices or -1 (all), got {self.devices}")
        if self.num_nodes < 1:
            raise ConfigError(f"trainer.num_nodes must be >= 1, got {self.num_nodes}")


@dataclass
class ValidationSection(ConfigBase):
    """Dev MRR by full-KB ranking (§1.9). `max_mentions` > 0 ranks a fixed, seeded subset of the dev mentions.

    Each selected mention is still ranked exhaustively against every KB entity, so the subset MRR is
    an unbiased estimate of the full dev MRR (with sampling noise of about 0.4/sqrt(max_mentions)),
    not a cheaper protocol. 0 ranks every dev mention, as the release does.
    """

    max_mentions: int = 0
    subset_seed: int = 0
    mention_batch_size: int = 20         # §1.8 eval batch
    entity_chunk_size: int = 6000        # §1.8 eval chunk
    entity_batch_size: int = 512         # KB encoding batch (§1.9)


@dataclass
class Recipe(ConfigBase):
    sections: ClassVar[dict[str, type[ConfigBase]]] = {
        "model": ModelSection, "backbone": BackboneSection, "data": DataSection, "optimizer": OptimizerSection,
        "trainer": TrainerSection, "validation": ValidationSection}

    name: str = ""
    description: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    backbone: BackboneSection = field(default_factory=BackboneSection)
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    validation: ValidationSection = field(default_factory=ValidationSection)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Recipe:
        built = dict(values)
        for key, section in cls.sections.items():
            if key in built:
                if not isinstance(built[key], dict):
                    raise ConfigError(f"recipe section {key!r} must be a mapping, got {built[key]!r}")
                built[key] = section.from_dict(built[key])
        return super().from_dict(built)

    def to_yaml(self) -> str:
        plain = json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists
        return yaml.safe_dump(plain, sort_keys=False)


def available_recipes() -> list[str]:
    folder = resources.files("mmel.training") / "recipes"
    return sorted(item.name[:-len(RECIPE_SUFFIX)] for item in folder.iterdir() if item.name.endswith(RECIPE_SUFFIX))


def load_recipe(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A packaged recipe by name (e.g. "mimic-wikimel-cpu") or a YAML file, with `key.path=value` overrides."""
    values = _apply_overrides(_read_recipe_yaml(name_or_path), overrides)
    return Recipe.from_dict(values)


def save_recipe(recipe: Recipe, path: Path) -> None:
    atomic_write_text(Path(path), recipe.to_yaml())


def _read_recipe_yaml(name_or_path: str | Path) -> dict[str, Any]:
    path = Path(name_or_path)
    if path.suffix == RECIPE_SUFFIX or path.is_file():
        if not path.is_file():
            raise ConfigError(f"recipe file {path} does not exist")
        text, source = path.read_text(encoding="utf-8"), str(path)
    else:
        packaged = resources.files("mmel.training") / "recipes" / f"{name_or_path}{RECIPE_SUFFIX}"
        if not packaged.is_file():
            raise ConfigError(f"unknown recipe {str(name_or_path)!r}; available: {', '.join(available_recipes())} "
                              "(or give the path of a .yaml file)")
        text, source = packaged.read_text(encoding="utf-8"), f"recipe {name_or_path}"
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: malformed YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: a recipe must be a YAML mapping")
    return values


def _apply_overrides(values: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Set `a.b.c=value` (value parsed as YAML, so 3, 1e-3, true, null and [1, 2] keep their types)."""
    for override in overrides:
        key_path, separator, raw = override.partition("=")
        if not separator or not key_path.strip():
            raise ConfigError(f"override {override!r} must look like section.key=value")
        keys = key_path.strip().split(".")
        target = values
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {override!r}: {key!r} is not a section")
        target[keys[-1]] = _parse_value(raw.strip())
    return values


def _parse_value(raw: str) -> Any:
    value = yaml.safe_load(raw) if raw else ""
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            return float(raw)
        except ValueError:
            return value
    return value


__all__ = ["STRATEGIES", "BackboneSection", "DataSection", "ModelSection", "OptimizerSection", "Recipe",
           "TrainerSection", "ValidationSection", "available_recipes", "load_recipe", "save_recipe"]
