"""Manifests of self-describing artifact directories (indexes, stores): one reader, one error style."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmel.core.errors import MismatchError
from mmel.core.paths import read_json


def read_manifest(directory: Path, *, file_name: str, format_name: str, format_version: int, what: str,
                  hint: str = "") -> dict[str, Any]:
    """Read `directory/file_name`, checking its `format` and `format_version`; MismatchError otherwise.

    `what` names the artifact in messages ("mmel vector index"); `hint` says how to make one.
    """
    path = Path(directory) / file_name
    if not path.is_file():
        raise MismatchError(f"{directory} is not an {what}: {file_name} is missing{hint and f' ({hint})'}")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != format_name:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise MismatchError(f"{path}: not an {what} manifest (format {found!r})")
    if manifest.get("format_version") != format_version:
        raise MismatchError(f"{path}: format_version {manifest.get('format_version')!r} is not supported "
                            f"(this mmel reads {format_version}); rebuild the {what.removeprefix('mmel ')}")
    return manifest
