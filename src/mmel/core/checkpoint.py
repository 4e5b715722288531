"""Self-describing checkpoint directories: config.json + model.safetensors + README.md model card.

No pickle: weights are safetensors; configs are JSON. Writes go to a temporary directory that
is renamed into place, so an interrupted save never leaves a half-written checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mmel.core.errors import MismatchError
from mmel.core.paths import atomic_directory, atomic_write_json, read_json

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip torch.compile / DDP prefixes and make tensors contiguous, unshared CPU copies."""
    cleaned = {}
    for key, tensor in state.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = tensor.detach().to("cpu").contiguous().clone()
    return cleaned


def save_checkpoint(directory: Path, *, model_type: str, config: dict[str, Any],
                    state_dict: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None,
                    card: str | None = None, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a checkpoint directory atomically and return its path.

    `extra_files` are further files of the checkpoint (e.g. fine-tuned backbone layers), by file name.
    """
    from mmel import __version__

    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        header = {"model_type": model_type, "format_version": FORMAT_VERSION, "mmel_version": __version__,
                  "config": config, **(metadata or {})}
        atomic_write_json(tmp / CONFIG_FILE, header)
        save_file(clean_state_dict(state_dict), str(tmp / WEIGHTS_FILE), metadata={"model_type": model_type})
        if card is not None:
            (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        for name, data in (extra_files or {}).items():
            if Path(name).name != name or name in (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE):
                raise ValueError(f"extra checkpoint file {name!r} must be a plain file name other than the "
                                 "checkpoint's own files")
            (tmp / name).write_bytes(data)
    return directory


def read_checkpoint_header(directory: Path, *, expected_model_type: str | None = None) -> dict[str, Any]:
    """Read config.json, checking format version and (optionally) the model type."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise MismatchError(f"{directory} is not an mmel checkpoint directory: {CONFIG_FILE} is missing")
    header = read_json(config_path)
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise MismatchError(f"{config_path}: format_version {version!r} is not supported "
                            f"(this mmel reads {FORMAT_VERSION}); re-export the checkpoint")
    if expected_model_type is not None and header.get("model_type") != expected_model_type:
        raise MismatchError(f"{config_path}: model_type {header.get('model_type')!r} cannot be loaded as "
                            f"{expected_model_type!r}; use mmel.load_model() to dispatch by type")
    return header


def update_checkpoint_header(directory: Path, key: str, value: Any) -> dict[str, Any]:
    """Set one top-level entry of config.json (e.g. tuned inference settings), atomically; weights are untouched."""
    header = read_checkpoint_header(directory)
    if key in ("model_type", "format_version", "config"):
        raise ValueError(f"{key!r} defines the model and cannot be updated in place")
    header[key] = value
    atomic_write_json(Path(directory) / CONFIG_FILE, header)
    return header


def read_checkpoint_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise MismatchError(f"{directory}: {WEIGHTS_FILE} is missing")
    return load_file(str(path))
