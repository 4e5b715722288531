"""Export trained weights as a released checkpoint: a `save_pretrained` directory with a model card.

Lightning `.ckpt` files only serve `--resume`. What a run ships is `<run>/best/`: config.json (the
model config plus a backbone block and a preprocess block, so that features from another backbone
are refused), model.safetensors (head weights only) and README.md. `BestModelExporter` writes it
whenever dev MRR improves, straight from the live model, so no pickle is ever read back. A run that
fine-tunes its backbone also writes the backbone's weights beside it (`best-backbone.safetensors`,
the backbone module's state dict), named with its hash in the backbone block.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning as L
from safetensors.torch import save as safetensors_bytes
from torch import nn

from mmel.backbones.text_layers import TEXT_LAYERS_FILE, TopTextLayers
from mmel.core.checkpoint import clean_state_dict
from mmel.core.paths import atomic_write_bytes
from mmel.models.base import MelModel
from mmel.training.recipe import Recipe
from mmel.training.system import MONITOR


@dataclass
class ExportInfo:
    """Provenance written into config.json and the model card of an exported checkpoint.

    backbone:   {"name", "text_dim", "image_global_dim", "image_patch_dim", "fingerprint"}
    preprocess: {"template", "max_text_length", ...}
    data:       {"dataset", "kb_size", "train": counts, "dev": counts}
    """

    backbone: dict[str, Any]
    preprocess: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    recipe: Recipe | None = None
    inference: dict[str, Any] = field(default_factory=dict)


def export_checkpoint(model: MelModel, directory: Path, info: ExportInfo, *, metrics: dict[str, float],
                      selection: str, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write `directory` atomically: weights, config with backbone/preprocess blocks, and the model card.

    `info.inference` (e.g. a learned name-prior weight) becomes the config's "inference" block, which
    linking reads; `extra_files` are written into the directory (fine-tuned text layers).
    """
    training = {"selection": selection, "dev_metrics": metrics, "data": info.data,
                "recipe": info.recipe.to_dict() if info.recipe is not None else None}
    metadata = {"backbone": info.backbone, "preprocess": info.preprocess, "training": training}
    if info.inference:
        metadata["inference"] = info.inference
    return model.save_pretrained(Path(directory), metadata=metadata, extra_files=extra_files,
                                 card=render_model_card(model, info, metrics=metrics, selection=selection))


def render_model_card(model: MelModel, info: ExportInfo, *, metrics: dict[str, float], selection: str) -> str:
    model_type = model.config_class.model_type
    recipe = info.recipe
    dev = info.data.get("dev", {})
    lines = [
        f"# {model_type.upper()} checkpoint ({info.data.get('dataset', 'unknown dataset')}, "
        f"{info.backbone.get('name', 'unknown backbone')})",
        "",
        "Trained with mmel. Load with `mmel.load_model(DIR)`; it scores features of the backbone below only.",
        "",
        "## Model",
        f"- type: `{model_type}`; head parameters: {sum(p.numel() for p in model.parameters()):,}",
        f"- config: `{json.dumps(model.config.to_dict(), sort_keys=True)}`",
        "",
        "## Backbone and preprocessing",
        f"- backbone: `{json.dumps(info.backbone, sort_keys=True)}`",
        f"- preprocess: `{json.dumps(info.preprocess, sort_keys=True)}`",
        "",
        "## Training",
        f"- data: `{json.dumps(info.data, sort_keys=True)}`",
    ]
    if recipe is not None:
        lines += [f"- recipe: `{recipe.name or 'custom'}`; optimizer `{json.dumps(recipe.optimizer.to_dict())}`; "
                  f"batch {recipe.data.batch_size}; train fraction {recipe.data.train_fraction}; "
                  f"max epochs {recipe.trainer.max_epochs}; seed {recipe.trainer.seed}; "
                  f"backbone {'fine-tuned' if recipe.backbone.trainable else 'frozen'}"]
    lines += [f"- selection: {selection}", "", "## Dev metrics"]
    if metrics:
        ranked = dev.get("ranked", "?")
        lines += [f"Full-KB ranking of {ranked} dev mentions against all {info.data.get('kb_size', '?')} KB entities; "
                  "ties count against the gold entity.", "",
                  "| " + " | ".join(metrics) + " |", "|" + "---|" * len(metrics),
                  "| " + " | ".join(f"{value:.4f}" for value in metrics.values()) + " |"]
    else:
        lines.append("No validation ran: these are the weights of the last epoch.")
    lines += ["", "## Limits",
              "- Dev numbers select the checkpoint; report test numbers from `mmel evaluate`, with the protocol.",
              "- Scores are only meaningful for features from the backbone and preprocessing above.",
              "- Data licences: see the dataset's attribution; the weights inherit its terms of use.", ""]
    return "\n".join(lines)


class BestModelExporter(L.Callback):
    """Export the model whenever the monitored dev metric improves (and the last weights if none ran).

    On several processes every one tracks the best metric (they all hold the same), and only the
    first writes the checkpoint.
    """

    def __init__(self, directory: Path, info: ExportInfo, *, monitor: str = MONITOR):
        self.directory = Path(directory)
        self.info = info
        self.monitor = monitor
        self.best: float | None = None
        self.best_epoch: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if self.best is not None and value <= self.best:
            return
        self.best, self.best_epoch = value, trainer.current_epoch
        metrics = {name.removeprefix("val/"): float(tensor) for name, tensor in trainer.callback_metrics.items()
                   if name.startswith("val/")}
        if trainer.is_global_zero:
            self._export(pl_module, metrics, f"best {self.monitor} = {value:.4f} at epoch {trainer.current_epoch + 1}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.best is None and trainer.is_global_zero:
            self._export(pl_module, {}, f"last epoch ({trainer.current_epoch}); no validation ran")

    def _export(self, pl_module: L.LightningModule, metrics: dict[str, float], selection: str) -> None:
        info = self.info
        extra_files: dict[str, bytes] = {}
        encoder = getattr(pl_module, "encoder", None)
        if isinstance(encoder, TopTextLayers):
            data, fields = encoder.export(info.backbone.get("fingerprint", ""))
            extra_files[TEXT_LAYERS_FILE] = data
            info = replace(info, backbone={**info.backbone, **fields})
        elif encoder is not None:
            info = replace(info, backbone={**info.backbone, **self._export_backbone(encoder.backbone)})
        name_signal = getattr(pl_module, "name_signal", None)
        if name_signal is not None:
            info = replace(info, inference={"name_prior_weight": round(name_signal.weight, 4),
                                            "name_prior_source": "learned (model.name_signal)"})
        export_checkpoint(pl_module.model, self.directory, info, metrics=metrics, selection=selection,
                          extra_files=extra_files)

    def _export_backbone(self, backbone: nn.Module) -> dict[str, str]:
        """Write the fine-tuned backbone weights next to the checkpoint; return the backbone-block fields."""
        data = safetensors_bytes(clean_state_dict(backbone.state_dict()))
        path = self.directory.with_name(f"{self.directory.name}-backbone.safetensors")
        atomic_write_bytes(path, data)
        digest = hashlib.sha256(data).hexdigest()
        return {"fine_tuned_weights": path.name, "fine_tuned_sha256": digest,
                "fingerprint": f"{self.info.backbone.get('fingerprint', '')}+finetuned-{digest[:16]}"}

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.best_epoch = state_dict["best"], state_dict["best_epoch"]


__all__ = ["BestModelExporter", "ExportInfo", "export_checkpoint", "render_model_card"]
