"""A seeded generator of multimodal entity-linking datasets of any size (10 to 1,000,000+ entities).

Entities come in groups that share one ambiguous name ("Bado Kirel" x 4), so the name alone never
identifies an entity. Within a group every member has a different colour (its visual cue: images
are drawn shapes, colours and textures) and a different occupation with its own keywords (its text
cue). Each mention names a group and carries one kind of cue, in controllable proportions:

- `image`: a neutral sentence and a noisy picture of the gold entity's pattern (same shape, colour
  and texture; jittered position, size, rotation and pixel noise), so only the image decides;
- `text`: a sentence with the gold entity's occupation and keywords, and no image;
- `both`: that sentence and the picture;
- `none`: a neutral sentence and no image: nothing tells the group members apart.

Images are optional and lazy: every entity, and every mention with an image cue, keeps its
`VisualSpec` in `extra["visual"]`, and `render_image(spec)` draws it on demand, so a 1M-entity KB
is generated without a single file; `out_dir` renders PNGs and writes the mmel JSONL format.

Stream independence: the KB depends only on (num_entities, group_size, seed); each split's
mentions depend on (seed, split name, its size, cue mix), so changing one split changes no other.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from mmel.core.config import ConfigBase, ConfigError
from mmel.core.errors import UsageError
from mmel.core.types import Dataset, Entity, KnowledgeBase, Mention
from mmel.data.jsonl_format import write_dataset

# --- vocabulary (invented for mmel) ----------------------------------------------------------------
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_CODAS = ("", "n", "r", "s", "l", "th")
SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "cross")
PATTERNS = ("solid", "hstripes", "vstripes", "dots", "checker")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40), "orange": (255, 127, 14), "yellow": (238, 210, 2), "green": (44, 160, 44),
    "teal": (23, 190, 207), "blue": (31, 119, 180), "purple": (148, 103, 189), "pink": (247, 129, 191),
    "brown": (140, 86, 75), "black": (30, 30, 30),
}
TOPICS: dict[str, tuple[str, ...]] = {
    "painter": ("canvas", "portraits", "gallery", "brushwork", "landscapes", "pigments"),
    "astronomer": ("telescopes", "comets", "galaxies", "observatory", "nebulae", "eclipses"),
    "footballer": ("goals", "midfield", "league", "striker", "stadium", "transfers"),
    "composer": ("symphonies", "orchestra", "sonatas", "opera", "concertos", "harmony"),
    "chemist": ("molecules", "catalysts", "polymers", "laboratory", "reactions", "solvents"),
    "architect": ("bridges", "facades", "skyscrapers", "blueprints", "cathedrals", "concrete"),
    "novelist": ("novels", "chapters", "publishers", "fiction", "narrators", "manuscripts"),
    "sailor": ("voyages", "harbours", "regattas", "schooners", "navigation", "tides"),
    "botanist": ("orchids", "seeds", "herbarium", "ferns", "pollination", "greenhouses"),
    "politician": ("elections", "parliament", "ministers", "campaigns", "legislation", "voters"),
}
MAX_GROUP_SIZE = min(len(COLOURS), len(TOPICS))  # members of a group differ in colour and in topic
_NEUTRAL_TEMPLATES = (
    ("", " was mentioned in a report published on Monday."),
    ("Reporters asked ", " about the schedule."),
    ("", " arrived in the city late in the evening."),
    ("A photograph of ", " was shared widely."),
    ("Many people recognised ", " at the event."),
    ("On Friday, ", " gave a short interview."),
)
_CUE_TEMPLATES = (
    ("", ", the {topic}, spoke about {kw1} and {kw2}."),
    ("", " is best known as a {topic} working on {kw1}, {kw2} and {kw3}."),
    ("At a meeting on {kw1}, the {topic} ", " also discussed {kw2}."),
    ("Critics praised ", " for {kw1} and {kw2}, rare for a {topic}."),
)
CUE_KINDS = ("image", "text", "both", "none")
DEFAULT_MENTIONS_PER_SPLIT = {"train": 800, "dev": 100, "test": 100}
_NAME_STRIDE = 1_000_003  # prime, coprime with the name-space size: group -> name is a bijection
_NAME_OFFSET = 7_654_321
KB_IMAGE_DIR = "kb_image"
MENTION_IMAGE_DIR = "mention_image"


@dataclass
class CueMix(ConfigBase):
    """Shares of mentions by disambiguating cue; they must sum to 1."""

    image: float = 1 / 3
    text: float = 1 / 3
    both: float = 1 / 3
    none: float = 0.0

    def __post_init__(self) -> None:
        shares = self.shares()
        if any(value < 0 for value in shares.values()) or not math.isclose(sum(shares.values()), 1.0, abs_tol=1e-6):
            raise ConfigError(f"cue mix shares must be >= 0 and sum to 1, got {shares}")

    def shares(self) -> dict[str, float]:
        return {kind: float(getattr(self, kind)) for kind in CUE_KINDS}


@dataclass(frozen=True)
class VisualSpec:
    """Everything needed to draw one synthetic image. Offsets and scale are fractions of the side."""

    shape: str
    colour: str
    pattern: str
    offset_x: float = 0.0
    offset_y: float = 0.0
    scale: float = 1.0
    rotation: float = 0.0   # degrees
    noise: float = 0.0      # standard deviation of pixel noise, as a fraction of 255
    noise_seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> VisualSpec:
        return cls(**values)


# --- images ----------------------------------------------------------------------------------------

def render_image(spec: VisualSpec | Mapping[str, Any], size: int = 64) -> Image.Image:
    """Draw `spec` as a size x size RGB image: a textured coloured shape on a light background."""
    if not isinstance(spec, VisualSpec):
        spec = VisualSpec.from_dict(spec)
    _check_spec(spec)
    mask = Image.new("L", (size, size), 0)
    _draw_shape(ImageDraw.Draw(mask), spec, size)
    canvas = np.full((size, size, 3), 236.0)
    texture = _texture(spec, size)                                  # [S, S, 3]
    inside = np.asarray(mask, dtype=np.float64)[:, :, None] / 255.0  # [S, S, 1]
    pixels = canvas * (1 - inside) + texture * inside
    if spec.noise > 0:
        pixels += np.random.default_rng(spec.noise_seed).normal(0.0, spec.noise * 255, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _check_spec(spec: VisualSpec) -> None:
    for value, known, what in ((spec.shape, SHAPES, "shape"), (spec.colour, tuple(COLOURS), "colour"),
                               (spec.pattern, PATTERNS, "pattern")):
        if value not in known:
            raise UsageError(f"unknown {what} {value!r} in visual spec; known: {', '.join(known)}")


def _draw_shape(draw: ImageDraw.ImageDraw, spec: VisualSpec, size: int) -> None:
    centre_x = size * (0.5 + spec.offset_x)
    centre_y = size * (0.5 + spec.offset_y)
    radius = size * 0.34 * spec.scale
    if spec.shape == "circle":
        draw.ellipse([centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius], fill=255)
        return
    draw.polygon(_polygon(spec.shape, centre_x, centre_y, radius, spec.rotation), fill=255)


def _polygon(shape: str, centre_x: float, centre_y: float, radius: float,
             rotation: float) -> list[tuple[float, float]]:
    if shape == "cross":
        arm = 0.38
        unit = [(-arm, -1), (arm, -1), (arm, -arm), (1, -arm), (1, arm), (arm, arm), (arm, 1), (-arm, 1),
                (-arm, arm), (-1, arm), (-1, -arm), (-arm, -arm)]
    else:
        corners = {"square": 4, "triangle": 3, "diamond": 4, "hexagon": 6}[shape]
        start = {"square": math.pi / 4, "triangle": -math.pi / 2, "diamond": 0.0, "hexagon": 0.0}[shape]
        unit = [(math.cos(start + 2 * math.pi * i / corners), math.sin(start + 2 * math.pi * i / corners))
                for i in range(corners)]
    angle = math.radians(rotation)
    cos, sin = math.cos(angle), math.sin(angle)
    return [(centre_x + radius * (x * cos - y * sin), centre_y + radius * (x * sin + y * cos)) for x, y in unit]


def _texture(spec: VisualSpec, size: int) -> np.ndarray:
    """[S, S, 3] fill of the shape: the colour, with a darker texture for non-solid patterns."""
    colour = np.array(COLOURS[spec.colour], dtype=np.float64)
    dark = colour * 0.45
    ys, xs = np.mgrid[0:size, 0:size]
    period = max(2, size // 12)
    if spec.pattern == "solid":
        marks = np.zeros((size, size), dtype=bool)
    elif spec.pattern == "hstripes":
        marks = (ys // period) % 2 == 0
    elif spec.pattern == "vstripes":
        marks = (xs // period) % 2 == 0
    elif spec.pattern == "checker":
        marks = ((xs // period) + (ys // period)) % 2 == 0
    else:
        cell = 2 * period
        marks = ((xs % cell - period) ** 2 + (ys % cell - period) ** 2) <= (period * 0.6) ** 2
    return np.where(marks[:, :, None], dark, colour)


# --- names -----------------------------------------------------------------------------------------

def _name_parts() -> list[str]:
    """Consonant-vowel syllable pairs plus a coda: every string parses back to exactly one index."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    return [(a + b + coda).capitalize() for a in syllables for b in syllables for coda in _CODAS]


def _names_for(indices: np.ndarray, parts: list[str]) -> list[str]:
    """Distinct "First Last" names for distinct indices (a bijection over the name space)."""
    space = len(parts) ** 2
    codes = (indices.astype(np.int64) * _NAME_STRIDE + _NAME_OFFSET) % space
    first, last = np.divmod(codes, len(parts))
    return [f"{parts[f]} {parts[g]}" for f, g in zip(first.tolist(), last.tolist(), strict=True)]


# --- knowledge base --------------------------------------------------------------------------------

def generate_kb(num_entities: int, *, group_size: int = 4, seed: int = 0, progress: bool = False) -> KnowledgeBase:
    """Entities S0..S{N-1} in groups of `group_size` sharing a name (the last group may be smaller)."""
    _check_kb_arguments(num_entities, group_size)
    rng = np.random.default_rng([seed, 0])
    rows = np.arange(num_entities)
    groups, members = np.divmod(rows, group_size)
    num_groups = int(groups[-1]) + 1
    colour_order = rng.permuted(np.tile(np.arange(len(COLOURS)), (num_groups, 1)), axis=1)   # [G, C]
    topic_order = rng.permuted(np.tile(np.arange(len(TOPICS)), (num_groups, 1)), axis=1)     # [G, T]
    colours = colour_order[groups, members]
    topics = topic_order[groups, members]
    shapes = rng.integers(0, len(SHAPES), num_entities)
    patterns = rng.integers(0, len(PATTERNS), num_entities)
    years = rng.integers(1820, 2000, num_entities)
    group_names = _names_for(np.arange(num_groups), _name_parts())
    colour_names, topic_names = list(COLOURS), list(TOPICS)
    entities = []
    columns = zip(rows.tolist(), groups.tolist(), colours.tolist(), topics.tolist(), shapes.tolist(),
                  patterns.tolist(), years.tolist(), strict=True)
    for row, group, colour, topic, shape, pattern, year in tqdm(columns, total=num_entities, desc="entities",
                                                                disable=not progress):
        topic_name = topic_names[topic]
        keywords = TOPICS[topic_name]
        visual = {"shape": SHAPES[shape], "colour": colour_names[colour], "pattern": PATTERNS[pattern]}
        entities.append(Entity(
            qid=f"S{row}", name=group_names[group],
            attributes=f"Occupation: {topic_name}. Known for: {', '.join(keywords)}. Born: {year}.",
            description=f"A {topic_name} born in {year}, known for {keywords[0]} and {keywords[1]}.",
            extra={"group": group, "topic": topic_name, "visual": visual}))
    return KnowledgeBase(entities)


def _check_kb_arguments(num_entities: int, group_size: int) -> None:
    if num_entities < 1:
        raise UsageError(f"num_entities must be >= 1, got {num_entities}")
    if not 1 <= group_size <= MAX_GROUP_SIZE:
        raise UsageError(f"group_size must be in [1, {MAX_GROUP_SIZE}] (members differ in colour and topic), "
                         f"got {group_size}")


# --- mentions --------------------------------------------------------------------------------------

def generate_mentions(kb: KnowledgeBase, split: str, count: int, *, cue_mix: CueMix | None = None,
                      nil_fraction: float = 0.0, seed: int = 0) -> list[Mention]:
    """`count` mentions of random KB entities; exact cue shares (largest remainder), shuffled.

    `kb` must come from `generate_kb` (mentions read its entities' group, topic and visual spec).
    NIL mentions (gold None) use names that no KB group has, with a neutral sentence and no image.
    """
    mix = cue_mix or CueMix()
    if count < 0:
        raise UsageError(f"mention count of split {split!r} must be >= 0, got {count}")
    if not 0.0 <= nil_fraction <= 1.0:
        raise UsageError(f"nil_fraction must be in [0, 1], got {nil_fraction}")
    rng = np.random.default_rng([seed, 1, zlib.crc32(split.encode())])
    num_nil = round(count * nil_fraction)
    kinds = _exact_shares(mix.shares(), count - num_nil)
    kinds = np.concatenate([kinds, np.full(num_nil, len(CUE_KINDS))])[rng.permutation(count)]
    gold_rows = rng.integers(0, len(kb), count)
    nil_names = iter(_names_for(_nil_name_indices(kb, rng, num_nil), _name_parts()))
    mentions = []
    for index, (kind, row) in enumerate(zip(kinds.tolist(), gold_rows.tolist(), strict=True)):
        mention_id = f"{split}-{index:07d}"
        if kind == len(CUE_KINDS):
            mentions.append(_nil_mention(mention_id, next(nil_names), rng))
        else:
            mentions.append(_mention(mention_id, kb[row], CUE_KINDS[kind], rng))
    return mentions


def _exact_shares(shares: dict[str, float], count: int) -> np.ndarray:
    """Cue-kind indices with counts proportional to `shares` (largest-remainder rounding)."""
    quotas = np.array([shares[kind] for kind in CUE_KINDS]) * count
    counts = np.floor(quotas).astype(np.int64)
    remainder_order = np.argsort(-(quotas - counts), kind="stable")
    counts[remainder_order[:count - counts.sum()]] += 1
    return np.repeat(np.arange(len(CUE_KINDS)), counts)


def _nil_name_indices(kb: KnowledgeBase, rng: np.random.Generator, count: int) -> np.ndarray:
    """Name indices past the KB's groups: distinct from every KB name by construction."""
    num_groups = int(kb[len(kb) - 1].extra["group"]) + 1
    return num_groups + rng.choice(max(4 * count, 1), size=count, replace=False)


def _mention(mention_id: str, entity: Entity, kind: str, rng: np.random.Generator) -> Mention:
    if kind in ("text", "both"):
        keywords = rng.choice(TOPICS[entity.extra["topic"]], size=3, replace=False).tolist()
        before, after = _CUE_TEMPLATES[rng.integers(len(_CUE_TEMPLATES))]
        fill = {"topic": entity.extra["topic"], "kw1": keywords[0], "kw2": keywords[1], "kw3": keywords[2]}
        before, after = before.format(**fill), after.format(**fill)
    else:
        before, after = _NEUTRAL_TEMPLATES[rng.integers(len(_NEUTRAL_TEMPLATES))]
    extra: dict[str, Any] = {"cue": kind, "group": entity.extra["group"]}
    if kind in ("image", "both"):
        extra["visual"] = _jittered(entity.extra["visual"], rng).to_dict()
    sentence = before + entity.name + after
    return Mention(id=mention_id, sentence=sentence, surface=entity.name, span=(len(before), len(before) +
                   len(entity.name)), gold_qid=entity.qid, extra=extra)


def _nil_mention(mention_id: str, name: str, rng: np.random.Generator) -> Mention:
    before, after = _NEUTRAL_TEMPLATES[rng.integers(len(_NEUTRAL_TEMPLATES))]
    return Mention(id=mention_id, sentence=before + name + after, surface=name,
                   span=(len(before), len(before) + len(name)), gold_qid=None, extra={"cue": "nil"})


def _jittered(visual: Mapping[str, Any], rng: np.random.Generator) -> VisualSpec:
    """The entity's pattern at another position, size and angle, with pixel noise."""
    offset_x, offset_y = rng.uniform(-0.12, 0.12, 2).tolist()
    return VisualSpec(shape=visual["shape"], colour=visual["colour"], pattern=visual["pattern"],
                      offset_x=round(offset_x, 4), offset_y=round(offset_y, 4),
                      scale=round(float(rng.uniform(0.7, 1.05)), 4), rotation=round(float(rng.uniform(-25, 25)), 2),
                      noise=round(float(rng.uniform(0.03, 0.1)), 4), noise_seed=int(rng.integers(2**31)))


# --- dataset ---------------------------------------------------------------------------------------

def generate_dataset(num_entities: int, *, group_size: int = 4, mentions_per_split: Mapping[str, int] | None = None,
                     cue_mix: CueMix | Mapping[str, float] | None = None, nil_fraction: float = 0.0, seed: int = 0,
                     out_dir: Path | None = None, render_images: bool = True, image_size: int = 64,
                     progress: bool = False) -> Dataset:
    """A synthetic MEL dataset; see the module docstring for its structure.

    With `out_dir`, the dataset is written there in the mmel JSONL format and, unless
    `render_images=False`, PNG images are rendered with it and the records get their image paths.
    Without `out_dir` nothing is written, the root is "." and no record has an image path (the
    specs are in `extra`; `render_image` draws them on demand).
    """
    mix = cue_mix if isinstance(cue_mix, CueMix) or cue_mix is None else CueMix.from_dict(dict(cue_mix))
    sizes = dict(DEFAULT_MENTIONS_PER_SPLIT if mentions_per_split is None else mentions_per_split)
    kb = generate_kb(num_entities, group_size=group_size, seed=seed, progress=progress)
    splits = {split: generate_mentions(kb, split, count, cue_mix=mix, nil_fraction=nil_fraction, seed=seed)
              for split, count in sizes.items()}
    name = f"synthetic-{num_entities}-g{group_size}-s{seed}"
    dataset = Dataset(name=name, kb=kb, splits=splits, root=Path("."))
    if out_dir is None:
        return dataset
    out_dir = Path(out_dir)
    if not render_images:
        write_dataset(dataset, out_dir, source=_source_note(seed))
        return Dataset(name=name, kb=kb, splits=splits, root=out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.images.") as staging:
        rendered = _render_into_staging(dataset, Path(staging), image_size=image_size, progress=progress)
        write_dataset(rendered, out_dir, source=_source_note(seed))  # links the staged images into out_dir
    return Dataset(name=name, kb=rendered.kb, splits=rendered.splits, root=out_dir)


def _source_note(seed: int) -> str:
    from mmel import __version__

    return f"generated by mmel {__version__} (mmel.data.synthetic, seed {seed})"


def _render_into_staging(dataset: Dataset, staging: Path, *, image_size: int, progress: bool) -> Dataset:
    """Render every entity's and mention's image under `staging` and return the dataset with image paths.

    Plain writes suffice: `staging` is a fresh temporary directory that only becomes visible
    through `write_dataset`'s atomic rename.
    """
    entities = []
    for entity in tqdm(dataset.kb, desc="entity images", disable=not progress):
        relative = f"{KB_IMAGE_DIR}/{entity.qid}.png"
        _save_png(entity.extra["visual"], image_size, staging / relative)
        entities.append(dataclasses.replace(entity, images=(relative,)))
    splits = {}
    for split, mentions in dataset.splits.items():
        rendered = []
        for mention in tqdm(mentions, desc=f"{split} images", disable=not progress):
            if "visual" in mention.extra:
                relative = f"{MENTION_IMAGE_DIR}/{mention.id}.png"
                _save_png(mention.extra["visual"], image_size, staging / relative)
                mention = dataclasses.replace(mention, image=relative)
            rendered.append(mention)
        splits[split] = rendered
    return Dataset(name=dataset.name, kb=KnowledgeBase(entities), splits=splits, root=staging)


def _save_png(spec: Mapping[str, Any], size: int, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    render_image(spec, size).save(path, format="PNG")


__all__ = ["COLOURS", "CUE_KINDS", "MAX_GROUP_SIZE", "PATTERNS", "SHAPES", "TOPICS", "CueMix", "VisualSpec",
           "generate_dataset", "generate_kb", "generate_mentions", "render_image"]
