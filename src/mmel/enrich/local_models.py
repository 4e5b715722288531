"""Local Hugging Face model directories: checked before loading, fingerprinted for cache keys, never downloaded.

Enrichment runs offline: models load with `local_files_only=True`, and a missing directory is a
message saying what to pass, not a hub download. A model is identified in cache keys by its
config and the names and sizes of its weight files, which is stable across copies and cheap
even for a 15 GB checkpoint (hashing the weights would not be).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmel.core.errors import DataError
from mmel.enrich.cache import sha256_text

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def check_model_dir(path: Path, option: str, example: str) -> Path:
    """`path` if it holds a saved model (config.json); else a DataError that says what to pass."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise DataError(f"no local model here (config.json not found). Pass {option} DIR, a directory written by "
                        f"save_pretrained or `huggingface-cli download {example} --local-dir DIR` on a machine with "
                        "network access; mmel never downloads models at run time", path=path)
    return path


def model_fingerprint(path: Path) -> str:
    """A stable id of the model in `path`: its config plus the names and sizes of its weight files."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    weights = sorted((p.name, p.stat().st_size) for p in path.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES))
    return "local:" + sha256_text(json.dumps([config, weights], sort_keys=True))[:16]


def pick_device(device: str | None) -> torch.device:
    """`device` when given, else CUDA when available, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


__all__ = ["check_model_dir", "model_fingerprint", "pick_device"]
