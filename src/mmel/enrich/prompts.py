"""The prompt that asks an LLM to describe one KB entity, as configuration.

DIM (PRCV 2024) asks ChatGPT about each entity and uses the answer as the entity's description
(Wiki+/Rich+/Diverse+); its exact prompt is not published (a review quotes "Who is this one?"), so
the default asks who or what the entity is and gives the model what the KB already knows, so it
can tell namesakes apart. The template and the generation settings are hashed: the hash is part of
every cache key and every provenance record, so changing the prompt never reuses old answers.
"""

from __future__ import annotations

import json
import string
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from mmel.core.errors import DataError, UsageError
from mmel.core.types import Entity
from mmel.enrich.cache import sha256_text

DEFAULT_SYSTEM = ("You write short, factual encyclopedia descriptions of entities for an entity-linking "
                  "knowledge base.")
DEFAULT_USER = ("Who is this one? Name: {name}\n"
                "What the knowledge base already says about it: {known}\n"
                "Describe this entity in two or three factual sentences: what it is, and the facts that tell it "
                "apart from others with the same name. If you do not know it, rephrase only what the knowledge "
                "base says. Answer with the description only.")
PLACEHOLDERS = ("name", "known", "qid")
NOTHING_KNOWN = "nothing"


@dataclass(frozen=True)
class DescriptionPrompt:
    """A chat prompt (system + user template) and its generation settings.

    The user template may use `{name}`, `{known}` (the entity's attributes and description, or
    "nothing") and `{qid}`.
    """

    system: str = DEFAULT_SYSTEM
    user: str = DEFAULT_USER
    max_tokens: int = 160
    temperature: float = 0.0

    def __post_init__(self) -> None:
        unknown = sorted({name for _, name, _, _ in string.Formatter().parse(self.user) if name is not None}
                         - set(PLACEHOLDERS))
        if unknown:
            raise UsageError(f"prompt template uses unknown placeholder(s) {', '.join(unknown)}; "
                             f"available: {', '.join(PLACEHOLDERS)}")
        if self.max_tokens < 1:
            raise UsageError(f"max_tokens must be at least 1, got {self.max_tokens}")

    @property
    def sha256(self) -> str:
        """Hash of the template and settings: a different prompt never reuses an old answer."""
        return sha256_text(json.dumps(asdict(self), sort_keys=True))

    def messages(self, entity: Entity) -> list[dict[str, str]]:
        """The chat messages for `entity`."""
        known = " ".join(part.strip() for part in (entity.attributes, entity.description) if part.strip())
        user = self.user.format(name=entity.name, known=known or NOTHING_KNOWN, qid=entity.qid)
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sha256": self.sha256}


def load_prompt(path: Path | None) -> DescriptionPrompt:
    """The prompt in YAML file `path` (keys: system, user, max_tokens, temperature), or DIM's default."""
    if path is None:
        return DescriptionPrompt()
    try:
        record = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError("prompt file not found", path=path) from None
    except yaml.YAMLError as error:
        raise DataError(f"malformed YAML: {error}", path=path) from None
    known = {f.name for f in fields(DescriptionPrompt)}
    if not isinstance(record, dict) or set(record) - known:
        raise DataError(f"a prompt file is a mapping with keys {', '.join(sorted(known))}", path=path)
    try:
        return DescriptionPrompt(**record)
    except (TypeError, ValueError) as error:
        raise DataError(str(error), path=path) from None


def entity_text_hash(entity: Entity) -> str:
    """Hash of what the prompt reads from an entity: an edited entity is asked again."""
    return sha256_text(json.dumps([entity.qid, entity.name, entity.attributes, entity.description]))


def estimate_tokens(text: str) -> int:
    """A rough token count (about four characters per token in English), for --dry-run only."""
    return max(1, round(len(text) / 4))


__all__ = ["DescriptionPrompt", "entity_text_hash", "estimate_tokens", "load_prompt"]
