"""Models: one file per published model. They read FeatureBatches, never backbones."""

from __future__ import annotations

from pathlib import Path

from mmel.core.checkpoint import read_checkpoint_header
from mmel.core.registry import Registry

MODELS = Registry("model", {
    "dim": "mmel.models.dim:DIMModel",
    "m3el": "mmel.models.m3el:M3ELModel",
    "mimic": "mmel.models.mimic:MIMICModel",
})


def load_model(directory: Path | str):
    """Load any mmel checkpoint directory, dispatching on its `model_type`."""
    header = read_checkpoint_header(Path(directory))
    return MODELS.get(header["model_type"]).from_pretrained(Path(directory))
