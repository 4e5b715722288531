"""Text templates: how a mention and an entity become the one string a text encoder reads.

MIMIC (models.md §1.1) reads `"{surface} [SEP] {sentence}"` for mentions and `"{name} [SEP] {attr}"`
for entities; M3EL's current code reads the entity description instead (§3.1). `[SEP]` is literal
text: CLIP's BPE splits it like any other text, MiniLM's tokenizer maps it to its separator token.
The template's name, its entity text field and the max text length are part of every feature
store key, and each rendered string is keyed by its content, so a template change re-encodes
exactly the strings that changed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mmel.core.registry import UnknownNameError
from mmel.core.types import Entity, Mention

ENTITY_TEXT_FIELDS = ("attributes", "description")


@dataclass(frozen=True)
class TextTemplate:
    """Format strings for the two sides. Mention fields: surface, sentence. Entity fields: name, text."""

    name: str
    mention_format: str
    entity_format: str
    entity_field: str = "attributes"   # which Entity field fills {text}; the other one is the fallback

    def __post_init__(self) -> None:
        if self.entity_field not in ENTITY_TEXT_FIELDS:
            raise ValueError(f"unknown entity text field {self.entity_field!r}; "
                             f"use one of {', '.join(ENTITY_TEXT_FIELDS)}")

    def mention_text(self, mention: Mention) -> str:
        return self.mention_format.format(surface=mention.surface, sentence=mention.sentence)

    def entity_text(self, entity: Entity) -> str:
        return self.entity_format.format(name=entity.name, text=entity.text(self.entity_field))

    def with_entity_field(self, field_name: str) -> TextTemplate:
        return replace(self, entity_field=field_name)

    @property
    def key(self) -> str:
        """A readable, path-safe identity: the name, plus the field when it is not the template's default."""
        default = TEMPLATES[self.name].entity_field if self.name in TEMPLATES else None
        return self.name if self.entity_field == default else f"{self.name}+{self.entity_field}"

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "mention_format": self.mention_format, "entity_format": self.entity_format,
                "entity_field": self.entity_field}


TEMPLATES: dict[str, TextTemplate] = {
    "mimic": TextTemplate("mimic", "{surface} [SEP] {sentence}", "{name} [SEP] {text}", "attributes"),
    "m3el": TextTemplate("m3el", "{surface} [SEP] {sentence}", "{name} [SEP] {text}", "description"),
    "name_only": TextTemplate("name_only", "{surface}", "{name}", "attributes"),
}


def get_template(name: str, entity_field: str | None = None) -> TextTemplate:
    """The named template, optionally with another entity text field (attributes | description)."""
    try:
        template = TEMPLATES[name]
    except KeyError:
        raise UnknownNameError(f"unknown text template {name!r}; available: {', '.join(sorted(TEMPLATES))}") from None
    return template if entity_field is None else template.with_entity_field(entity_field)


__all__ = ["ENTITY_TEXT_FIELDS", "TEMPLATES", "TextTemplate", "get_template"]
