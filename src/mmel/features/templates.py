"""Text templates: how a mention and an entity become the one string a text encoder reads.

MIMIC (models.md §1.1) reads `"{surface} [SEP] {sentence}"` for mentions and `"{name} [SEP] {attr}"`
for entities; M3EL's current code reads the entity description instead (§3.1). `[SEP]` is literal
text: CLIP's BPE splits it like any other text, MiniLM's tokenizer maps it to its separator token.
The template's name, its entity text field and the max text length are part of every feature
store key, and each rendered string is keyed by its content, so a template change re-encodes
exactly the strings that changed.

Named text views (`TEXT_VIEWS`) are the vocabulary models declare what they read with
(`mmel.core.features.FeatureViews`): a template is the pair of primary views (mention side,
entity side), and a model may ask for further views, stored as pooled vectors. A view renders
None where the item has no such text (a mention without a caption): such an item is marked
absent, never encoded as an empty string.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from mmel.core.errors import UsageError
from mmel.core.features import FeatureViews
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
            raise UsageError(f"unknown entity text field {self.entity_field!r}; "
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
    "dim": TextTemplate("dim", "{surface} [SEP] {sentence}", "{text}", "description"),
}


@dataclass(frozen=True)
class TextView:
    """A named way to render one side's text; `render` returns None when the item has no such text."""

    name: str
    side: str                                           # 'mention' or 'entity'
    render: Callable[[Mention | Entity], str | None]


def _or_none(text: str | None) -> str | None:
    return text if text and text.strip() else None


TEXT_VIEWS: dict[str, TextView] = {view.name: view for view in (
    TextView("mention", "mention", lambda m: m.surface),
    TextView("mention_sentence", "mention", lambda m: f"{m.surface} [SEP] {m.sentence}"),
    TextView("caption", "mention", lambda m: _or_none(m.caption)),
    TextView("name", "entity", lambda e: e.name),
    TextView("name_attr", "entity", lambda e: f"{e.name} [SEP] {e.text('attributes')}"),
    TextView("name_desc", "entity", lambda e: f"{e.name} [SEP] {e.text('description')}"),
    TextView("desc", "entity", lambda e: _or_none(e.text("description"))),
)}

# The named template of each pair of primary views (mention view, entity view).
_PRIMARY_TEMPLATES = {("mention_sentence", "name_attr"): "mimic", ("mention_sentence", "name_desc"): "m3el",
                      ("mention", "name"): "name_only", ("mention_sentence", "desc"): "dim"}


def text_view(name: str, side: str | None = None) -> TextView:
    """The named view (of `side`, when given); a clear error lists the available ones."""
    view = TEXT_VIEWS.get(name)
    if view is None or (side is not None and view.side != side):
        names = sorted(v.name for v in TEXT_VIEWS.values() if side is None or v.side == side)
        raise UnknownNameError(f"unknown {side or ''} text view {name!r}; available: {', '.join(names)}")
    return view


def template_for_views(views: FeatureViews) -> TextTemplate:
    """The template that renders `views`' two primary views."""
    text_view(views.mention, "mention")
    text_view(views.entity, "entity")
    name = _PRIMARY_TEMPLATES.get((views.mention, views.entity))
    if name is None:
        pairs = ", ".join(f"{m}+{e}" for m, e in _PRIMARY_TEMPLATES)
        raise UnknownNameError(f"no template for primary views {views.mention}+{views.entity}; available: {pairs}")
    return TEMPLATES[name]


def extra_view_texts(views: FeatureViews, side: str, items: list) -> dict[str, list[str | None]]:
    """view name -> rendered text (or None) of each of `items`, for the further views of `side`."""
    names = views.mention_extra if side == "mention" else views.entity_extra
    return {name: [text_view(name, side).render(item) for item in items] for name in names}


def get_template(name: str, entity_field: str | None = None) -> TextTemplate:
    """The named template, optionally with another entity text field (attributes | description)."""
    try:
        template = TEMPLATES[name]
    except KeyError:
        raise UnknownNameError(f"unknown text template {name!r}; available: {', '.join(sorted(TEMPLATES))}") from None
    return template if entity_field is None else template.with_entity_field(entity_field)


__all__ = ["ENTITY_TEXT_FIELDS", "TEMPLATES", "TEXT_VIEWS", "TextTemplate", "TextView", "extra_view_texts",
           "get_template", "template_for_views", "text_view"]
