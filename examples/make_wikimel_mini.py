"""Build examples/wikimel-mini: a small, real slice of WikiMEL for the README demo and the tests.

    python examples/make_wikimel_mini.py --raw /work/shared/data/raw --out examples/wikimel-mini

Steps: prepare the full WikiMEL release with `mmel.data.prepare_wikimel`; keep every sample that
has a real mention image, then add seeded-random whole samples until each split reaches its target
(about 200 train, 40 dev, 60 test mentions); keep the gold entities plus distractors, most of them
sharing a word with a gold entity or a mention surface so that linking stays hard; downscale images to at most
384 px JPEG; write the slice in mmel JSONL format with ATTRIBUTION.md. Same inputs and seed, same output.
"""

from __future__ import annotations

import argparse
import random
import re
import tempfile
from collections import defaultdict
from pathlib import Path

from mmel.core.images import load_image
from mmel.core.types import Dataset, KnowledgeBase, Mention
from mmel.data import prepare_wikimel, read_dataset, validate_dataset, write_dataset
from mmel.data.raw_release import default_images_dir

SPLIT_TARGETS = {"train": 200, "dev": 40, "test": 60}
NUM_DISTRACTORS = 700
SHARED_WORD_SHARE = 0.8  # share of distractors sharing a word with a gold entity's name or a mention surface
MAX_IMAGE_SIDE = 384
JPEG_QUALITY = 85
NAME_WORD = re.compile(r"[^\W\d_]{3,}")
COMMON_WORDS = {"the", "and", "for", "born", "footballer", "politician", "actor", "singer", "musician", "player"}

SOURCE = ("wikimel-mini: a slice of WikiMEL (300 mentions of the real train/dev/test splits, their gold entities "
          "and 700 distractors) made by examples/make_wikimel_mini.py; see ATTRIBUTION.md.")

ATTRIBUTION = """# Attribution: wikimel-mini

This folder is a small slice of the WikiMEL benchmark, converted to mmel's JSONL format by
`examples/make_wikimel_mini.py`. Sentences, mentions, gold QIDs, entity names and entity
attribute texts are unchanged; mention images are downscaled to at most 384 px.

## Sources

- Sentences, mentions and gold answers: `Wikidata-MEL.json` of MELBench
  (https://github.com/seukgcode/MELBench), the original WikiMEL release. MIT licence, see below.
- Splits, entity names and attribute texts (`splits.json`, `ne2qid.json`, `qid2abs.json`) and the
  mention images: MEL-GHMFC (https://github.com/seukgcode/MEL-GHMFC), the same authors' release
  for the GHMFC paper. It carries no licence file; it is released for research.
- Images: Wikimedia Commons images, each under its own licence. The release does not record the
  authors or licences of the individual files; look a file up on Wikimedia Commons by its content
  before reusing it outside research.

## Please cite

- Wang et al., "Multimodal Entity Linking: A New Dataset and A Baseline", ACM MM 2021 (WikiMEL,
  RichpediaMEL).
- Wang et al., SIGIR 2022 (GHMFC).

## MELBench licence

MIT License

Copyright (c) 2021 BlueStragglers

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute,
sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT
NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES
OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN
CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def select_mentions(mentions: list[Mention], target: int, rng: random.Random) -> list[Mention]:
    """Whole samples: first every sample with an image, then random ones while they fit under `target`."""
    by_sample: dict[str, list[Mention]] = defaultdict(list)
    for mention in mentions:
        by_sample[mention.extra["sample_id"]].append(mention)
    with_image = [sample for sample, group in by_sample.items() if any(m.image for m in group)]
    others = sorted(set(by_sample) - set(with_image))
    rng.shuffle(others)
    chosen = list(with_image)
    count = sum(len(by_sample[sample]) for sample in chosen)
    for sample in others:
        if count >= target:
            break
        if count + len(by_sample[sample]) <= target:
            chosen.append(sample)
            count += len(by_sample[sample])
    keep = set(chosen)
    return [mention for mention in mentions if mention.extra["sample_id"] in keep]


def name_words(name: str) -> set[str]:
    return {word.lower() for word in NAME_WORD.findall(name)} - COMMON_WORDS


def select_entities(kb: KnowledgeBase, mentions: list[Mention], rng: random.Random) -> KnowledgeBase:
    """Gold entities plus distractors, mostly ones sharing a word with a gold name or a surface; KB order kept."""
    gold = {m.gold_qid for m in mentions if m.gold_qid in kb}
    texts = [kb.get(qid).name for qid in gold] + [m.surface for m in mentions]
    gold_words = set().union(*(name_words(text) for text in texts))
    rest = [entity.qid for entity in kb if entity.qid not in gold]
    sharing = [qid for qid in rest if name_words(kb.get(qid).name) & gold_words]
    num_sharing = min(len(sharing), round(NUM_DISTRACTORS * SHARED_WORD_SHARE))
    distractors = set(rng.sample(sharing, num_sharing))
    unrelated = [qid for qid in rest if qid not in distractors]
    distractors.update(rng.sample(unrelated, NUM_DISTRACTORS - num_sharing))
    return KnowledgeBase(entity for entity in kb if entity.qid in gold or entity.qid in distractors)


def downscale_images(dataset: Dataset, mentions: list[Mention], staging: Path) -> None:
    """Write each used mention image, at most MAX_IMAGE_SIDE px, to the same relative path under `staging`."""
    for relative in sorted({m.image for m in mentions if m.image}):
        image = load_image(dataset.root, relative)
        if image is None:
            raise SystemExit(f"cannot read {dataset.root / relative}")
        image.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target, format="JPEG", quality=JPEG_QUALITY, optimize=True)


def build(raw: Path, out: Path, seed: int) -> Dataset:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as workdir:
        full = prepare_wikimel(raw, Path(workdir) / "wikimel", default_images_dir(raw, "wikimel"))
        splits = {split: select_mentions(full.split(split), target, rng) for split, target in SPLIT_TARGETS.items()}
        chosen = [m for mentions in splits.values() for m in mentions]
        kb = select_entities(full.kb, chosen, rng)
        staging = Path(workdir) / "mini"
        downscale_images(full, chosen, staging)
        mini = Dataset("wikimel-mini", kb, splits, staging)
        write_dataset(mini, out, source=SOURCE, extra_files={"ATTRIBUTION.md": ATTRIBUTION})
    return read_dataset(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, required=True, help="raw data root (wikimel/, images/wikimel/)")
    parser.add_argument("--out", type=Path, default=Path("examples/wikimel-mini"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    mini = build(args.raw, args.out, args.seed)
    report = validate_dataset(mini)
    size = sum(path.stat().st_size for path in args.out.rglob("*") if path.is_file())
    print(f"wrote {args.out}: {len(mini.kb)} entities, {report.split_counts} mentions, "
          f"{report.mention_images.loaded} images, {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
