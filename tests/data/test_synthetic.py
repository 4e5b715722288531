from collections import Counter, defaultdict

import numpy as np
import pytest

from mmel.core.config import ConfigError
from mmel.core.images import ImageReport, load_image
from mmel.data.jsonl_format import read_dataset
from mmel.data.synthetic import TOPICS, CueMix, generate_dataset, generate_kb, render_image

ALL_KEYWORDS = {word for topic, words in TOPICS.items() for word in (topic, *words)}


def words(text: str) -> set[str]:
    return {word.strip(".,").lower() for word in text.split()}


def test_same_seed_same_dataset_and_other_seed_differs():
    first = generate_dataset(60, seed=3, mentions_per_split={"train": 30, "test": 20})
    second = generate_dataset(60, seed=3, mentions_per_split={"train": 30, "test": 20})
    other = generate_dataset(60, seed=4, mentions_per_split={"train": 30, "test": 20})
    assert list(first.kb) == list(second.kb)
    assert [e.extra for e in first.kb] == [e.extra for e in second.kb]
    assert first.splits == second.splits
    assert [m.extra for m in first.split("test")] == [m.extra for m in second.split("test")]
    assert [e.name for e in first.kb] != [e.name for e in other.kb] or first.splits != other.splits


def test_kb_does_not_depend_on_mention_counts():
    small = generate_dataset(40, seed=1, mentions_per_split={"test": 5})
    large = generate_dataset(40, seed=1, mentions_per_split={"train": 50, "test": 5})
    assert list(small.kb) == list(large.kb)
    assert small.split("test") == large.split("test")


def test_groups_share_a_name_and_differ_in_colour_and_topic():
    kb = generate_kb(103, group_size=4, seed=0)
    by_name = defaultdict(list)
    for entity in kb:
        by_name[entity.name].append(entity)
    sizes = Counter(len(members) for members in by_name.values())
    assert sizes == {4: 25, 3: 1}  # 103 = 25 x 4 + 3
    for members in by_name.values():
        assert len({m.extra["group"] for m in members}) == 1
        assert len({m.extra["visual"]["colour"] for m in members}) == len(members)
        assert len({m.extra["topic"] for m in members}) == len(members)
        for member in members:
            assert member.extra["topic"] in member.attributes


def test_cue_mix_is_exact_and_cues_are_where_they_should_be():
    mix = CueMix(image=0.5, text=0.25, both=0.25, none=0.0)
    dataset = generate_dataset(80, seed=2, mentions_per_split={"test": 200}, cue_mix=mix)
    mentions = dataset.split("test")
    assert Counter(m.extra["cue"] for m in mentions) == {"image": 100, "text": 50, "both": 50}
    for mention in mentions:
        gold = dataset.kb.get(mention.gold_qid)
        assert mention.sentence[mention.span[0]:mention.span[1]] == mention.surface == gold.name
        context = words(mention.sentence.replace(mention.surface, ""))
        has_text_cue = bool(context & words(gold.attributes) & ALL_KEYWORDS)
        assert has_text_cue == (mention.extra["cue"] in ("text", "both"))
        if mention.extra["cue"] == "image":
            assert not context & ALL_KEYWORDS  # neutral sentence: no topic word of any entity
        assert ("visual" in mention.extra) == (mention.extra["cue"] in ("image", "both"))
        if "visual" in mention.extra:
            for key in ("shape", "colour", "pattern"):
                assert mention.extra["visual"][key] == gold.extra["visual"][key]


def test_nil_mentions_use_names_outside_the_kb():
    dataset = generate_dataset(20, seed=0, mentions_per_split={"dev": 40}, nil_fraction=0.25)
    nil = [m for m in dataset.split("dev") if m.gold_qid is None]
    assert len(nil) == 10
    kb_names = {entity.name for entity in dataset.kb}
    assert all(m.surface not in kb_names for m in nil)
    assert len({m.surface for m in nil}) == 10


def test_group_members_render_differently_and_mentions_look_like_their_gold():
    dataset = generate_dataset(40, seed=5, mentions_per_split={"test": 60}, cue_mix={"image": 1.0, "text": 0.0,
                                                                                     "both": 0.0})
    pixels = {e.qid: np.asarray(render_image(e.extra["visual"]), dtype=np.float64) for e in dataset.kb}
    members = [e.qid for e in dataset.kb if e.extra["group"] == 0]
    for index, first in enumerate(members):
        for second in members[index + 1:]:
            assert np.abs(pixels[first] - pixels[second]).mean() > 5
    correct = 0
    for mention in dataset.split("test"):
        image = np.asarray(render_image(mention.extra["visual"]), dtype=np.float64)
        group = [e.qid for e in dataset.kb if e.extra["group"] == mention.extra["group"]]
        # a crude visual matcher: the member whose image has the closest colour histogram
        distances = {qid: np.abs(colour_histogram(image) - colour_histogram(pixels[qid])).sum() for qid in group}
        correct += min(distances, key=distances.get) == mention.gold_qid
    assert correct >= 0.9 * len(dataset.split("test"))


def colour_histogram(image: np.ndarray) -> np.ndarray:
    histogram, _ = np.histogramdd(image.reshape(-1, 3), bins=4, range=[(0, 256)] * 3)
    return histogram.ravel() / histogram.sum()


def test_written_dataset_reads_back_with_images(tmp_path):
    dataset = generate_dataset(12, seed=0, mentions_per_split={"train": 10, "test": 6}, nil_fraction=0.2,
                               out_dir=tmp_path / "syn")
    loaded = read_dataset(tmp_path / "syn")
    assert list(loaded.kb) == list(dataset.kb)
    assert loaded.splits == dataset.splits
    report = ImageReport()
    for entity in loaded.kb:
        image = load_image(loaded.root, entity.images[0], report)
        assert image is not None and image.size == (64, 64)
    for mention in loaded.split("train"):
        assert (mention.image is not None) == ("visual" in mention.extra)
    assert report.failed == 0


def test_without_rendering_no_image_paths_are_written(tmp_path):
    generate_dataset(8, seed=0, mentions_per_split={"test": 4}, out_dir=tmp_path / "plain", render_images=False)
    loaded = read_dataset(tmp_path / "plain")
    assert all(not e.images for e in loaded.kb)
    assert all("visual" in e.extra for e in loaded.kb)
    assert not (tmp_path / "plain" / "kb_image").exists()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="group_size"):
        generate_kb(10, group_size=11)
    with pytest.raises(ValueError, match="num_entities"):
        generate_kb(0)
    with pytest.raises(ConfigError, match="sum to 1"):
        CueMix(image=0.5, text=0.2, both=0.2)
    with pytest.raises(ConfigError, match="unknown"):
        generate_dataset(10, cue_mix={"image": 1.0, "audio": 0.0})
    with pytest.raises(ValueError, match="unknown colour"):
        render_image({"shape": "circle", "colour": "mauve", "pattern": "solid"})
