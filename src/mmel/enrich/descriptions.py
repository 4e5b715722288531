"""LLM-written entity descriptions (DIM's Wiki+/Rich+/Diverse+), cached and resumable.

Each KB entity is asked about once per (model, prompt hash, entity id, entity text hash): answers
go to the cache as they arrive, so a rerun after a crash or a `kill -9` asks only for what is
missing. The result is a new dataset (same mentions, each described entity with the LLM's
`description`) plus `enrichment.json`; failed entities keep their old description, are counted
by reason, and are asked again on the next run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from mmel.core.types import Dataset, Entity, KnowledgeBase
from mmel.enrich.answers import Answer, Outcome, Tally
from mmel.enrich.cache import AnswerCache, cache_key
from mmel.enrich.prompts import DescriptionPrompt, entity_text_hash, estimate_tokens
from mmel.enrich.provenance import write_enriched

KIND = "description"
Messages = list[dict[str, str]]


class DescriptionBackend(Protocol):
    """Something that answers chat prompts: an HTTP endpoint (`ChatClient`) or a local LM (`LocalChatModel`)."""

    @property
    def name(self) -> str: ...

    def run(self, jobs: Sequence[tuple[str, Messages]], on_outcome: Callable[[str, Outcome], None]) -> None: ...


@dataclass
class DescriptionPlan:
    """Which entities need a request: `keys[row]` is entity row's cache key, `pending` the keys to ask."""

    keys: list[str]
    cached: dict[str, str]
    pending: dict[str, Entity]

    def estimate(self, prompt: DescriptionPrompt) -> dict[str, int]:
        """Requests and a rough token count (prompt estimated, completion at most max_tokens) for --dry-run."""
        prompt_tokens = sum(estimate_tokens("\n".join(m["content"] for m in prompt.messages(entity)))
                            for entity in self.pending.values())
        return {"entities": len(self.keys), "cached": sum(key in self.cached for key in self.keys),
                "requests": len(self.pending), "prompt_tokens_estimate": prompt_tokens,
                "completion_tokens_max": len(self.pending) * prompt.max_tokens}


@dataclass
class DescriptionRun:
    """What a run did: the counts, and the enriched dataset as written."""

    tally: Tally
    dataset: Dataset


def plan_descriptions(kb: KnowledgeBase, model: str, prompt: DescriptionPrompt, cache: AnswerCache) -> DescriptionPlan:
    """Look every entity up in the cache; entities with the same id and text share one request."""
    keys = [cache_key(model, prompt.sha256, entity.qid, entity_text_hash(entity)) for entity in kb]
    cached = cache.get_many(KIND, keys)
    pending = {key: entity for key, entity in zip(keys, kb, strict=True) if key not in cached}
    return DescriptionPlan(keys, cached, pending)


def describe_dataset(dataset: Dataset, source: Path, out: Path, backend: DescriptionBackend,
                     prompt: DescriptionPrompt, cache: AnswerCache, *, endpoint: str, name: str | None = None,
                     progress: bool = True) -> DescriptionRun:
    """Describe every entity of `dataset` not yet in `cache` and write the "+" dataset to `out`."""
    plan = plan_descriptions(dataset.kb, backend.name, prompt, cache)
    tally = Tally(cached=len(plan.cached))
    answers = dict(plan.cached)
    row_provenance = {"model": backend.name, "endpoint": endpoint, "prompt": prompt.to_dict()}
    bar = tqdm(total=len(plan.pending), desc="describe entities", unit="entity", disable=not progress)

    with bar, cache.writer(KIND) as writer:

        def record(key: str, outcome: Outcome) -> None:
            entity = plan.pending[key]
            tally.add(entity.qid, outcome)
            if isinstance(outcome, Answer):
                writer.put(key, outcome.text, {**row_provenance, "qid": entity.qid})
                answers[key] = outcome.text
            bar.update(1)

        backend.run([(key, prompt.messages(entity)) for key, entity in plan.pending.items()], record)
    kb = KnowledgeBase(_described(entity, answers.get(key), backend.name, prompt)
                       for entity, key in zip(dataset.kb, plan.keys, strict=True))
    enriched = Dataset(name or f"{dataset.name}+", kb, dataset.splits, dataset.root)
    step = {"step": "descriptions", "model": backend.name, "endpoint": endpoint, "prompt": prompt.to_dict(),
            "entities": len(kb), "entities_described": sum(key in answers for key in plan.keys),
            "counts": tally.to_dict()}
    write_enriched(enriched, source, out, name=enriched.name, step=step)
    return DescriptionRun(tally, enriched)


def _described(entity: Entity, text: str | None, model: str, prompt: DescriptionPrompt) -> Entity:
    """`entity` with the LLM's description and where it came from; unchanged when it has no answer."""
    if text is None:
        return entity
    origin: dict[str, Any] = {"model": model, "prompt_sha256": prompt.sha256}
    return dataclasses.replace(entity, description=text, extra={**entity.extra, "description_source": origin})


__all__ = ["KIND", "DescriptionBackend", "DescriptionPlan", "DescriptionRun", "describe_dataset",
           "plan_descriptions"]
