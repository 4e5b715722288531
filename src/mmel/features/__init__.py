"""Feature store: data + backbone -> cached, resumable, memory-mapped features (see `store.py`).

Names are imported lazily, so `import mmel.features` (and the CLI's start-up) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BuildReport": "mmel.features.store",
    "DatasetFeatures": "mmel.features.views",
    "StoredFeatureTable": "mmel.features.views",
    "build_features": "mmel.features.store",
    "describe_store": "mmel.features.views",
    "encode_items": "mmel.features.encoding",
    "list_views": "mmel.features.views",
    "open_features": "mmel.features.views",
    "TEMPLATES": "mmel.features.templates",
    "TextTemplate": "mmel.features.templates",
    "get_template": "mmel.features.templates",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmel.features' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
