"""BM25 over entity names (or names plus entity text), built with the `bm25s` library.

Tokenizer: `bm25s.tokenize` with its defaults: lower-casing, the regex `(?u)\\b\\w\\w+\\b` (Unicode
words of two or more characters) and bm25s's English stop-word list; no stemmer (PyStemmer is not
a dependency of mmel). Scoring: bm25s's eager index with its default Lucene BM25 (k1 = 1.5,
b = 0.75). Query words that are not in the index vocabulary add nothing to any score; a query with
no known word scores every entity 0, which the full-KB protocol counts as a tie against the gold.

On disk an index is a directory: `manifest.json` (settings, entity count, KB fingerprint),
`qids.json` (row -> QID) and `bm25s/` (bm25s's own files: `.npy` arrays saved with
allow_pickle=False and JSON vocab/params). No pickle is written or read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import bm25s
import numpy as np

from mmel.core.errors import MismatchError, UsageError
from mmel.core.paths import atomic_directory, atomic_write_json, read_json
from mmel.core.types import Entity, KnowledgeBase, Mention
from mmel.evaluation import (
    ScoreBlock,
    top_k_per_row,
)

EntityFields = Literal["name", "name+text"]
QueryMode = Literal["surface", "surface+sentence"]
ENTITY_FIELDS: tuple[EntityFields, ...] = ("name", "name+text")
QUERY_MODES: tuple[QueryMode, ...] = ("surface", "surface+sentence")
# Chosen on the dev splits: with name fields, surface+sentence beats surface on WikiMEL (H@1 77.05 vs
# 76.86) and RichpediaMEL (94.38 vs 75.22; its sentences often spell out the gold's full name).
DEFAULT_QUERY_MODE: QueryMode = "surface+sentence"
INDEX_FORMAT = "mmel-bm25"
INDEX_FORMAT_VERSION = 1
_STOPWORDS = "en"


class SearchHits(NamedTuple):
    rows: np.ndarray    # [q, k] int64 KB rows, best first (ties: lower row first)
    scores: np.ndarray  # [q, k] float64 BM25 scores


@dataclass(frozen=True)
class BM25Settings:
    fields: EntityFields = "name"
    k1: float = 1.5   # bm25s / Lucene default
    b: float = 0.75   # bm25s / Lucene default


def entity_text(entity: Entity, fields: EntityFields) -> str:
    """The text indexed for an entity: its name, or name + attributes + description."""
    if fields not in ENTITY_FIELDS:
        raise UsageError(f"unknown BM25 fields {fields!r}; use one of: {', '.join(ENTITY_FIELDS)}")
    if fields == "name":
        return entity.name
    parts = [entity.name, entity.attributes]
    if entity.description and entity.description != entity.attributes:
        parts.append(entity.description)
    return " ".join(part for part in parts if part)


def query_text(mention: Mention, mode: QueryMode = DEFAULT_QUERY_MODE) -> str:
    """The BM25 query of a mention: its surface form, or surface form + sentence."""
    if mode not in QUERY_MODES:
        raise UsageError(f"unknown BM25 query mode {mode!r}; use one of: {', '.join(QUERY_MODES)}")
    return mention.surface if mode == "surface" else f"{mention.surface} {mention.sentence}"


def _tokenize(texts: Sequence[str]) -> list[list[str]]:
    return bm25s.tokenize(list(texts), stopwords=_STOPWORDS, return_ids=False, show_progress=False)


def kb_fingerprint(kb: KnowledgeBase, fields: EntityFields) -> str:
    """SHA-256 over the QIDs and indexed texts in row order: an index only fits the KB it was built from."""
    digest = hashlib.sha256()
    for entity in kb:
        digest.update(f"{entity.qid}\t{entity_text(entity, fields)}\n".encode())
    return digest.hexdigest()


class BM25Index:
    """A BM25 index whose document rows are the KB rows."""

    def __init__(self, retriever: bm25s.BM25, qids: list[str], settings: BM25Settings, fingerprint: str):
        self._retriever = retriever
        self.qids = qids
        self.settings = settings
        self.fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self.qids)

    @classmethod
    def build(cls, kb: KnowledgeBase, fields: EntityFields = "name", *, k1: float = 1.5,
              b: float = 0.75) -> BM25Index:
        if len(kb) == 0:
            raise UsageError("cannot build a BM25 index over an empty knowledge base")
        settings = BM25Settings(fields=fields, k1=k1, b=b)
        corpus = _tokenize([entity_text(entity, fields) for entity in kb])
        retriever = bm25s.BM25(k1=k1, b=b)
        retriever.index(corpus, show_progress=False)
        return cls(retriever, kb.qids, settings, kb_fingerprint(kb, fields))

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """BM25 scores [q, N] (float32) of each query against every entity, in KB row order."""
        vocabulary = self._retriever.vocab_dict
        result = np.zeros((len(queries), len(self)), dtype=np.float32)
        for index, tokens in enumerate(_tokenize(queries)):
            token_ids = [vocabulary[token] for token in tokens if token in vocabulary]
            if token_ids:
                result[index] = self._retriever.get_scores_from_ids(token_ids)
        return result

    def search(self, queries: Sequence[str], k: int) -> SearchHits:
        """The k best entities per query (ties: lower KB row first)."""
        if k < 1:
            raise UsageError(f"k must be >= 1, got {k}")
        rows, scores = top_k_per_row(self.scores(queries), k)
        return SearchHits(rows=rows, scores=scores)

    def score_block(self, queries: Sequence[str]) -> ScoreBlock:
        """A `rank_full_kb` scorer for mention i = queries[i].

        Each call scores its mentions against the whole KB and slices, so evaluate BM25 with one
        entity chunk (`entity_chunk_size >= len(index)`), as `mmel evaluate --model bm25` does.
        """
        def score(mention_rows: np.ndarray, entity_start: int, entity_stop: int) -> np.ndarray:
            return self.scores([queries[row] for row in mention_rows])[:, entity_start:entity_stop]
        return score

    # --- persistence ----------------------------------------------------------------------------
    def save(self, directory: Path) -> Path:
        """Write the index directory atomically (replacing an existing one in a single rename)."""
        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            self._retriever.save(tmp / "bm25s", show_progress=False)
            atomic_write_json(tmp / "qids.json", self.qids, indent=None)
            atomic_write_json(tmp / "manifest.json", {
                "format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION,
                "fields": self.settings.fields, "k1": self.settings.k1, "b": self.settings.b,
                "tokenizer": {"library": "bm25s", "stopwords": _STOPWORDS, "stemmer": None, "lower": True},
                "num_entities": len(self), "kb_fingerprint": self.fingerprint, "bm25s_version": bm25s.__version__,
            })
        return directory

    @classmethod
    def load(cls, directory: Path, *, kb: KnowledgeBase | None = None) -> BM25Index:
        """Load a saved index; with `kb`, refuse an index built from a different KB."""
        directory = Path(directory)
        manifest = read_json(directory / "manifest.json")
        if manifest.get("format") != INDEX_FORMAT or manifest.get("format_version") != INDEX_FORMAT_VERSION:
            raise MismatchError(f"{directory} is not an mmel BM25 index of format version {INDEX_FORMAT_VERSION} "
                                f"(found {manifest.get('format')!r} v{manifest.get('format_version')!r}); rebuild it")
        qids = read_json(directory / "qids.json")
        if len(qids) != manifest["num_entities"]:
            raise MismatchError(f"{directory}: qids.json has {len(qids)} rows, "
                                f"manifest says {manifest['num_entities']}")
        settings = BM25Settings(fields=manifest["fields"], k1=manifest["k1"], b=manifest["b"])
        if kb is not None:
            expected = kb_fingerprint(kb, settings.fields)
            if expected != manifest["kb_fingerprint"]:
                raise MismatchError(f"{directory} was built from another knowledge base (fingerprint "
                                    f"{manifest['kb_fingerprint'][:12]} vs {expected[:12]}); rebuild the index")
        retriever = bm25s.BM25.load(directory / "bm25s", allow_pickle=False, show_progress=False)
        return cls(retriever, qids, settings, manifest["kb_fingerprint"])


__all__ = ["DEFAULT_QUERY_MODE", "ENTITY_FIELDS", "QUERY_MODES", "BM25Index", "BM25Settings", "SearchHits",
           "entity_text", "kb_fingerprint", "query_text"]
