"""Text templates: MIMIC's and M3EL's strings, the entity field option, the registry's error."""

from __future__ import annotations

import pytest

from mmel.core.registry import UnknownNameError
from mmel.core.types import Entity, Mention
from mmel.features.templates import TEMPLATES, get_template

ENTITY = Entity("Q532915", "Noel Harrison", attributes="Sex: male. Birth: 1934, London.",
                description="English actor and singer")
MENTION = Mention("46351", "Powers with Noel Harrison in The Girl from U.N.C.L.E.", "Noel Harrison")


def test_mimic_template_renders_the_papers_strings():
    template = get_template("mimic")
    assert template.mention_text(MENTION) == "Noel Harrison [SEP] Powers with Noel Harrison in The Girl from U.N.C.L.E."
    assert template.entity_text(ENTITY) == "Noel Harrison [SEP] Sex: male. Birth: 1934, London."


def test_m3el_template_reads_the_description():
    assert get_template("m3el").entity_text(ENTITY) == "Noel Harrison [SEP] English actor and singer"


def test_entity_field_option_and_fallback():
    described = get_template("mimic", entity_field="description")
    assert described.entity_text(ENTITY) == "Noel Harrison [SEP] English actor and singer"
    no_description = Entity("Q1", "Somebody", attributes="Sex: female.")
    assert described.entity_text(no_description) == "Somebody [SEP] Sex: female."
    assert described.key == "mimic+description" and get_template("mimic").key == "mimic"


def test_unknown_template_and_field_are_refused():
    with pytest.raises(UnknownNameError, match="available: dim, m3el, mimic, name_only"):
        get_template("blink")
    with pytest.raises(ValueError, match="unknown entity text field"):
        get_template("mimic", entity_field="abstract")


def test_template_round_trips_through_its_dict():
    for template in TEMPLATES.values():
        spec = template.to_dict()
        assert set(spec) == {"name", "mention_format", "entity_format", "entity_field"}
        assert get_template(spec["name"], spec["entity_field"]) == template
