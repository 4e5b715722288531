"""`mmel evaluate`: rank a split with a model or baseline and write JSON + Markdown reports."""

from __future__ import annotations


def evaluate() -> None:
    """Evaluate a model or baseline on a dataset split."""
    raise NotImplementedError
