"""`link_jsonl`: resuming after a kill links every mention exactly once, repeated ids included."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from mmel.core.images import ImageReport
from mmel.core.types import Candidate, LinkResult, Mention
from mmel.retrieval.jobs import default_images_root, link_jsonl


class FakeLinker:
    """Answers every mention with one candidate; dies after `die_after` mentions, as a killed run does."""

    def __init__(self, die_after: int | None = None):
        self.die_after = die_after
        self.linked: list[str] = []

    def link_mentions(self, mentions: Sequence[Mention], images_root: Path | None, *, top_k: int,
                      candidates_k: int, report: ImageReport) -> list[LinkResult]:
        if self.die_after is not None and len(self.linked) + len(mentions) > self.die_after:
            raise KeyboardInterrupt
        self.linked += [mention.id for mention in mentions]
        return [LinkResult(mention, (Candidate("Q1", "One", 1.0, 1),)) for mention in mentions]


def multi_mention_file(path: Path, samples: int = 4, per_sample: int = 3) -> Path:
    """The MIMIC convention: every mention of a sample carries the sample's id."""
    lines = []
    for sample in range(samples):
        names = [f"Name{sample}x{k}" for k in range(per_sample)]
        sentence = " and ".join(names)
        lines += [json.dumps({"id": f"s{sample}", "sentence": sentence, "surface": name}) for name in names]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_resume_links_every_mention_of_a_file_with_repeated_ids(tmp_path: Path) -> None:
    mentions = multi_mention_file(tmp_path / "mentions.jsonl")
    out = tmp_path / "results.jsonl"
    with pytest.raises(KeyboardInterrupt):
        link_jsonl(FakeLinker(die_after=5), mentions, out, chunk_size=1, progress=False)
    assert len(out.read_text().splitlines()) == 5

    linker = FakeLinker()
    report = link_jsonl(linker, mentions, out, chunk_size=1, progress=False)
    assert (report.skipped, report.linked) == (5, 7)
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert len(ids) == 12 and len(set(ids)) == 12
    assert ids[:4] == ["s0", "s0#2", "s0#3", "s1"]
    assert "0 linked, 12 already done" in link_jsonl(FakeLinker(), mentions, out, progress=False).summary()


def test_images_default_to_the_dataset_of_a_mentions_file(tmp_path: Path) -> None:
    dataset = tmp_path / "data"
    (dataset / "mentions").mkdir(parents=True)
    (dataset / "dataset.json").write_text("{}")
    assert default_images_root(dataset / "mentions" / "test.jsonl") == dataset
    assert default_images_root(tmp_path / "loose" / "mentions.jsonl") == tmp_path / "loose"
    (tmp_path / "other" / "mentions").mkdir(parents=True)  # a folder named mentions/ outside a dataset
    assert default_images_root(tmp_path / "other" / "mentions" / "m.jsonl") == tmp_path / "other" / "mentions"
