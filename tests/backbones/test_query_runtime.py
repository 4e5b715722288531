"""Query runtimes of the offline backbone: ONNX Runtime float32 and int8 against the exact float32 path.

Tolerances (cosine to the float32 vectors): `onnx` >= 0.9999 (the same arithmetic, reordered);
`onnx-int8` >= 0.99 for sentence vectors of mention-like texts (int8 dynamic quantization of
MiniLM's matrix products; ~0.993 on average over WikiMEL test mentions) and the float32 image
network, so image features are those of `onnx`.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmel.backbones import load_backbone
from mmel.backbones.base import BackboneConfig
from mmel.backbones.clip import create_random_clip
from mmel.backbones.minilm_effnet import draw_reference_image
from mmel.backbones.onnx_cache import cached_file
from mmel.backbones.query_runtime import (
    DEFAULT_QUERY_RUNTIME,
    OnnxMiniLMEffNet,
    query_backbone,
    resolve_query_runtime,
    text_onnx_file,
)
from mmel.core.config import ConfigError
from mmel.core.errors import MismatchError, UsageError

TEXTS = ["Noel Harrison [SEP] Powers with Noel Harrison in The Girl from U.N.C.L.E.",
         "Paris [SEP] We flew to Paris to see the Eiffel Tower and walked along the Seine.",
         "Mercury [SEP] Mercury sang Bohemian Rhapsody with Queen at Live Aid in 1985."]


@pytest.fixture(scope="module")
def exact():
    return load_backbone("minilm_effnet")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def onnx(exact, cache_dir):
    return query_backbone(exact, BackboneConfig(query_runtime="onnx", onnx_cache_dir=str(cache_dir)))


@pytest.fixture(scope="module")
def onnx_int8(exact, cache_dir):
    return query_backbone(exact, BackboneConfig(query_runtime="onnx-int8", onnx_cache_dir=str(cache_dir)))


def _images() -> list[Image.Image]:
    return [draw_reference_image(), Image.new("RGB", (320, 200), (200, 40, 90))]


def test_config_round_trips_and_refuses_unknown_runtimes():
    config = BackboneConfig(query_runtime="onnx-int8", onnx_cache_dir="/tmp/somewhere")
    assert BackboneConfig.from_json(config.to_json()) == config
    assert BackboneConfig.from_dict({}).query_runtime == "auto"
    with pytest.raises(ConfigError, match="query_runtime must be one of"):
        BackboneConfig(query_runtime="int4")
    with pytest.raises(ConfigError, match="unknown BackboneConfig key"):
        BackboneConfig.from_dict({"runtime": "onnx"})


def test_float32_is_the_backbone_itself_and_bit_identical_to_the_network(exact):
    """The exact path is not wrapped, and its numbers are MiniLM's / EfficientNet's own, bit for bit."""
    assert query_backbone(exact, BackboneConfig(query_runtime="float32")) is exact
    encoded = exact.tokenizer(TEXTS, padding="max_length", truncation=True, max_length=40, return_tensors="pt")
    pixels = exact.pixels(_images())
    with torch.inference_mode():
        features = exact.encode_texts(TEXTS, 40)
        tokens = exact.text_model(**encoded).last_hidden_state
        weights = encoded["attention_mask"].unsqueeze(-1).float()
        pooled = F.normalize((tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0), dim=-1)
        image = exact.encode_images(_images())
        feature_map = exact.image_model.forward_features(pixels.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(features.tokens, tokens, rtol=0, atol=0)
    torch.testing.assert_close(features.global_, pooled, rtol=0, atol=0)
    torch.testing.assert_close(image.patches, feature_map.flatten(2).transpose(1, 2), rtol=0, atol=0)


def test_onnx_float32_matches_the_exact_path(exact, onnx):
    """Other batch sizes and lengths than the traced ones (2 x 16), and real image sizes."""
    assert isinstance(onnx, OnnxMiniLMEffNet) and onnx.fingerprint == exact.fingerprint
    with torch.inference_mode():
        fast, reference = onnx.encode_texts(TEXTS, 40), exact.encode_texts(TEXTS, 40)
        fast_image, reference_image = onnx.encode_images(_images()), exact.encode_images(_images())
        fast_blank, reference_blank = onnx.encode_blank_images(1), exact.encode_blank_images(1)
    assert fast.tokens.shape == reference.tokens.shape == (3, 40, 384)
    assert torch.equal(fast.mask, reference.mask)
    assert F.cosine_similarity(fast.global_, reference.global_).min() >= 0.9999
    torch.testing.assert_close(fast.tokens, reference.tokens, rtol=1e-3, atol=1e-3)
    assert F.cosine_similarity(fast_image.patches, reference_image.patches, dim=-1).min() >= 0.9999
    torch.testing.assert_close(fast_image.global_, reference_image.global_, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(fast_blank.patches, reference_blank.patches, rtol=1e-3, atol=1e-3)


def test_onnx_int8_sentence_vectors_stay_close(exact, onnx, onnx_int8):
    with torch.inference_mode():
        fast, reference = onnx_int8.encode_texts(TEXTS, 40), exact.encode_texts(TEXTS, 40)
        single = onnx_int8.encode_texts(TEXTS[:1], 40)
        image, onnx_image = onnx_int8.encode_images(_images()), onnx.encode_images(_images())
    assert fast.tokens.shape == (3, 40, 384)
    assert F.cosine_similarity(fast.global_, reference.global_).min() >= 0.99
    assert F.cosine_similarity(fast.tokens[fast.mask], reference.tokens[reference.mask]).mean() >= 0.97
    torch.testing.assert_close(single.tokens, fast.tokens[:1], rtol=0, atol=0)   # batch-independent (one per call)
    torch.testing.assert_close(image.patches, onnx_image.patches, rtol=0, atol=0)      # the float32 image network


def test_exported_files_are_cached_and_reused(exact, onnx, onnx_int8, cache_dir):
    names = sorted(path.name for path in cache_dir.glob("*.onnx"))
    assert len(names) == 3 and all(name.startswith(exact.fingerprint) for name in names)   # text f32, text int8, image
    mtimes = {path: path.stat().st_mtime_ns for path in cache_dir.glob("*.onnx")}
    query_backbone(exact, BackboneConfig(query_runtime="onnx-int8", onnx_cache_dir=str(cache_dir)))
    assert {path: path.stat().st_mtime_ns for path in cache_dir.glob("*.onnx")} == mtimes
    assert not [path for path in cache_dir.iterdir() if path.name.endswith(".tmp")]


def test_a_stale_cached_file_is_refused_by_the_probe(exact, onnx_int8, tmp_path):
    """An int8 file under the float32 file's name gives vectors too far from float32 for the `onnx` runtime."""
    float_name = text_onnx_file(exact, tmp_path, int8=False)
    int8_file = text_onnx_file(exact, tmp_path, int8=True)
    float_name.write_bytes(int8_file.read_bytes())
    with pytest.raises(MismatchError, match=rf"{float_name.name}.*delete it"):
        OnnxMiniLMEffNet.from_exact(exact, "onnx", tmp_path)


def test_a_damaged_cached_file_is_named(exact, tmp_path):
    path = text_onnx_file(exact, tmp_path, int8=False)
    path.write_bytes(b"not an onnx model")
    with pytest.raises(UsageError, match=rf"{path.name}: ONNX Runtime cannot load this file"):
        OnnxMiniLMEffNet.from_exact(exact, "onnx", tmp_path)


def test_cache_writes_once_and_atomically(tmp_path):
    calls = []

    def write(target):
        calls.append(target)
        target.write_bytes(b"made once")

    leftover = tmp_path / ".earlier.onnx.abcd1234.tmp"      # what a killed export leaves
    tmp_path.mkdir(exist_ok=True)
    leftover.write_bytes(b"half")
    first = cached_file(tmp_path, {"stem": "thing", "version": 1}, write)
    second = cached_file(tmp_path, {"stem": "thing", "version": 1}, write)
    other = cached_file(tmp_path, {"stem": "thing", "version": 2}, write)
    assert first == second != other and first.read_bytes() == b"made once" and len(calls) == 2
    assert first.name.startswith("thing-") and not leftover.exists()
    assert oct(first.stat().st_mode & 0o777) == oct(0o644)

    def fail(target):
        target.write_bytes(b"partial")
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError, match="export failed"):
        cached_file(tmp_path, {"stem": "broken"}, fail)
    assert sorted(os.listdir(tmp_path)) == sorted([".lock", first.name, other.name])


def test_auto_runtime_and_backbones_without_onnx(exact, tmp_path):
    assert resolve_query_runtime(exact, "auto") == DEFAULT_QUERY_RUNTIME
    clip = load_backbone("clip", path=create_random_clip(tmp_path / "clip", seed=0))
    assert resolve_query_runtime(clip, "auto") == "float32"
    assert query_backbone(clip, BackboneConfig()) is clip
    with pytest.raises(UsageError, match="runs the minilm_effnet backbone on a CPU only"):
        query_backbone(clip, BackboneConfig(query_runtime="onnx"))


def test_linker_encodes_queries_with_the_runtime_and_entities_exactly(tiny_index, linker_backbone, tmp_path):
    """Same answers as float32 on the tiny KB; link and link_batch agree (to rounding); KB edits keep float32."""
    from mmel.retrieval.linker import Linker, MentionQuery

    queries = [MentionQuery(sentence=sentence, mention=mention) for sentence, mention, _ in tiny_index.queries]
    answers = {}
    for runtime in ("float32", "onnx-int8"):
        config = BackboneConfig(query_runtime=runtime, onnx_cache_dir=str(tmp_path / "onnx"))
        with Linker.load(tiny_index.index_dir, backbone=linker_backbone, backbone_config=config) as linker:
            assert linker.info()["query_runtime"] == linker.query_encoder.query_runtime == runtime
            assert linker.backbone.query_runtime == "float32"
            batch = linker.link_batch(queries, top_k=3)
            single = [linker.link(q.sentence, mention=q.mention, top_k=3) for q in queries]
        assert [[c.qid for c in r.candidates] for r in batch] == [[c.qid for c in r.candidates] for r in single]
        assert [[c.score for c in r.candidates] for r in batch] == \
            [[pytest.approx(c.score, rel=1e-4) for c in r.candidates] for r in single]
        answers[runtime] = [r.best.qid for r in batch]
    assert answers["onnx-int8"] == answers["float32"] == [qid for _, _, qid in tiny_index.queries]
