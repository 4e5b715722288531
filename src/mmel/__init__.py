"""mmel: multimodal entity linking (MIMIC, M3EL, DIM) as usable software.

`import mmel` is cheap and offline: heavy modules (torch models, transformers, FAISS,
Lightning) are imported only when the names below are first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Linker": "mmel.retrieval.linker:Linker",
    "load_dataset": "mmel.data:load_dataset",
    "load_model": "mmel.models:load_model",
}

__all__ = ["Linker", "__version__", "load_dataset", "load_model"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'mmel' has no attribute {name!r}")
    module_name, attr = _LAZY[name].split(":")
    return getattr(importlib.import_module(module_name), attr)
