"""Backbones: pretrained text and image encoders behind one interface."""

from __future__ import annotations

from typing import Any

from mmel.core.registry import Registry

BACKBONES = Registry("backbone", {
    "clip": "mmel.backbones.clip:CLIPBackbone",
    "minilm_effnet": "mmel.backbones.minilm_effnet:MiniLMEffNetBackbone",
})

DEFAULT_BACKBONE = "minilm_effnet"


def load_backbone(name: str = DEFAULT_BACKBONE, **options: Any):
    """Build a backbone by registry name (`clip` takes `path=` a local CLIP checkpoint or hub id)."""
    return BACKBONES.get(name).load(**options)
