"""Reclaiming a feature store's space: drop views, then the shards no remaining view lists (`mmel features prune`)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mmel.core.errors import DataError
from mmel.core.paths import read_json
from mmel.features.views import MANIFEST_FILE, directory_bytes, list_views


@dataclass
class PruneReport:
    """What `prune_store` removed (or would remove, in a dry run)."""

    views_removed: list[str] = field(default_factory=list)      # "dataset/view_id"
    shards_removed: list[str] = field(default_factory=list)     # paths relative to the store
    bytes_freed: int = 0
    dry_run: bool = False

    def summary(self) -> str:
        verb = "would free" if self.dry_run else "freed"
        return (f"{len(self.views_removed)} views and {len(self.shards_removed)} cache shards removed; "
                f"{verb} {self.bytes_freed / 2**20:,.1f} MiB")


def prune_store(store_dir: Path, *, drop_views: Sequence[str] = (), dry_run: bool = False) -> PruneReport:
    """Remove the views `drop_views` ("dataset/view_id"), then every cache shard no remaining view lists.

    Shards are shared between views, so a shard stays while any view lists it; leftovers of
    interrupted builds (dot-directories) go too. Run it while no build writes to the store.
    """
    store_dir = Path(store_dir)
    present = {f"{dataset}/{view}" for dataset, views in list_views(store_dir).items() for view in views}
    unknown = sorted(set(drop_views) - present)
    if unknown:
        raise DataError(f"no such views {unknown}; present: {sorted(present) or 'none'}", path=store_dir)
    kept = {shard for view in present - set(drop_views) for shard in _listed_shards(store_dir, view)}
    views = [store_dir / "views" / view for view in sorted(set(drop_views))]
    shards = [shard for shard in _cache_shard_dirs(store_dir) if str(shard.relative_to(store_dir)) not in kept]
    report = PruneReport(views_removed=sorted(set(drop_views)), dry_run=dry_run,
                         shards_removed=[str(shard.relative_to(store_dir)) for shard in shards],
                         bytes_freed=sum(directory_bytes(path) for path in views + shards))
    if not dry_run:
        for path in views + shards:
            shutil.rmtree(path)
    return report


def _cache_shard_dirs(store_dir: Path) -> list[Path]:
    """Every shard directory (finished or a leftover '.shard-*' of an interrupted build) in every cache namespace."""
    kind_dirs = sorted((store_dir / "cache").glob("*/*/*")) if (store_dir / "cache").is_dir() else []
    return [shard for kind_dir in kind_dirs if kind_dir.is_dir() and kind_dir.name != "image-blank"
            for shard in sorted(kind_dir.iterdir()) if shard.is_dir()]


def _listed_shards(store_dir: Path, view: str) -> set[str]:
    """Store-relative paths of the text and image shards a view's manifest lists."""
    manifest = read_json(store_dir / "views" / view / MANIFEST_FILE)
    namespace = Path(manifest["cache"])
    text_dir = namespace / f"text-L{manifest['max_text_length']}"
    return ({str(text_dir / name) for name in manifest["text_shards"]}
            | {str(namespace / "image" / name) for name in manifest["image_shards"]})


__all__ = ["PruneReport", "prune_store"]
