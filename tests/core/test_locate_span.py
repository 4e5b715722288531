"""`locate_span`: offsets index the original sentence, whatever case folding does to its length."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mmel.core.types import locate_span


def test_span_indexes_the_original_sentence_when_lowering_changes_its_length():
    sentence = "İİİİİİ isaura navarro"
    span = locate_span(sentence, "Isaura Navarro")
    assert span == (7, 21)
    assert sentence[span[0]:span[1]] == "isaura navarro"


def test_exact_match_is_preferred_and_absence_is_none():
    assert locate_span("paris and Paris", "Paris") == (10, 15)
    assert locate_span("Berlin", "Paris") is None
    assert locate_span("Berlin", "") is None


@given(st.text(max_size=30), st.text(min_size=1, max_size=10))
def test_any_span_found_is_in_range_and_holds_the_surface(sentence: str, surface: str):
    span = locate_span(sentence, surface)
    if span is not None:
        start, end = span
        assert 0 <= start < end <= len(sentence)
        assert sentence[start:end].lower() == surface.lower()


@given(st.text(max_size=20), st.text(min_size=1, max_size=10), st.text(max_size=20))
def test_a_surface_inserted_in_another_case_is_found(prefix: str, surface: str, suffix: str):
    swapped = surface.swapcase()
    if len(swapped) != len(surface) or swapped.lower() != surface.lower():
        swapped = surface  # a character whose case change alters length or is not invertible
    sentence = prefix + swapped + suffix
    span = locate_span(sentence, surface)
    assert span is not None
    assert sentence[span[0]:span[1]].lower() == surface.lower()
