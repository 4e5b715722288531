"""CLIPBackbone on a tiny randomly initialised CLIP saved to a temporary directory."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import CLIPModel

from mmel.backbones import load_backbone
from mmel.backbones.base import Backbone, pixels_from_images
from mmel.backbones.clip import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD, CLIPBackbone, create_random_clip
from mmel.core.errors import MmelError

TEXTS = ["Noel Harrison [SEP] Powers with Noel Harrison in The Girl from U.N.C.L.E.", "x", ""]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return create_random_clip(tmp_path_factory.mktemp("tiny-clip"), seed=0)


@pytest.fixture(scope="module")
def clip(clip_dir):
    return load_backbone("clip", path=clip_dir)


def _images() -> list[Image.Image]:
    return [Image.new("RGB", (300, 200), (200, 30, 30)), Image.new("RGB", (64, 640), (10, 90, 250))]


def test_clip_backbone_implements_the_protocol(clip):
    assert isinstance(clip, CLIPBackbone)
    assert isinstance(clip, Backbone)
    assert (clip.text_dim, clip.image_global_dim, clip.image_patch_dim) == (32, 32, 48)
    assert clip.num_patches == 50 and clip.image_size == 224   # 7 x 7 patches + CLS, as ViT-B/32


def test_text_features_have_the_papers_shapes(clip):
    with torch.inference_mode():
        features = clip.encode_texts(TEXTS, max_length=40)
    assert features.global_.shape == (3, 32)
    assert features.tokens.shape == (3, 40, 32)
    assert features.mask.shape == (3, 40) and features.mask.dtype == torch.bool
    torch.testing.assert_close(features.global_.norm(dim=-1), torch.ones(3))
    lengths = features.mask.sum(dim=1).tolist()
    assert lengths[0] == 40                     # long text truncated, BOS and EOS kept inside the 40
    assert lengths[1] == 3 and lengths[2] == 2  # BOS x EOS, and BOS EOS for the empty string


def test_image_features_have_the_papers_shapes(clip):
    with torch.inference_mode():
        features = clip.encode_images(_images())
        blank = clip.encode_blank_images(3)
    assert features.global_.shape == (2, 32) and features.patches.shape == (2, 50, 48)
    torch.testing.assert_close(features.global_.norm(dim=-1), torch.ones(2))
    assert blank.global_.shape == (3, 32) and blank.patches.shape == (3, 50, 48)
    torch.testing.assert_close(blank.global_[0], blank.global_[2])


def test_outputs_equal_clipmodel_forward(clip, clip_dir):
    """text_embeds, image_embeds and both last hidden states are exactly what CLIPModel.forward returns."""
    reference = CLIPModel.from_pretrained(clip_dir).eval()
    encoded = clip.tokenizer(TEXTS[:2], padding="max_length", truncation=True, max_length=40, return_tensors="pt")
    pixels = pixels_from_images(_images(), 224, CLIP_IMAGE_MEAN, CLIP_IMAGE_STD)
    with torch.inference_mode():
        expected = reference(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                             pixel_values=pixels)
        text = clip.encode_texts(TEXTS[:2], max_length=40)
        image = clip.encode_images(_images())
    torch.testing.assert_close(text.global_, expected.text_embeds)
    torch.testing.assert_close(text.tokens, expected.text_model_output.last_hidden_state)
    torch.testing.assert_close(image.global_, expected.image_embeds)
    torch.testing.assert_close(image.patches, expected.vision_model_output.last_hidden_state)


def test_blank_image_is_a_zero_pixel_tensor(clip):
    with torch.inference_mode():
        blank = clip.encode_blank_images(1)
        zeros = clip.encode_pixels(torch.zeros(1, 3, 224, 224))
    torch.testing.assert_close(blank.patches, zeros.patches)


def test_images_are_squashed_to_224_with_clip_normalisation():
    pixels = pixels_from_images([Image.new("RGB", (500, 100), (255, 0, 0))], 224, CLIP_IMAGE_MEAN, CLIP_IMAGE_STD)
    assert pixels.shape == (1, 3, 224, 224)
    expected_red = (1.0 - CLIP_IMAGE_MEAN[0]) / CLIP_IMAGE_STD[0]
    assert pixels[0, 0].min().item() == pytest.approx(expected_red, abs=1e-5)


def test_fingerprint_is_stable_and_tracks_the_weights(clip, clip_dir, tmp_path):
    assert clip.fingerprint.startswith("clip-")
    assert CLIPBackbone.load(clip_dir).fingerprint == clip.fingerprint
    other = CLIPBackbone.load(create_random_clip(tmp_path / "other", seed=1))
    assert other.fingerprint != clip.fingerprint


def test_preprocessor_config_overrides_mean_and_std(clip_dir, tmp_path):
    copy = create_random_clip(tmp_path / "with-preprocessor", seed=0)
    (copy / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    backbone = CLIPBackbone.load(copy)
    assert backbone.image_mean == (0.5, 0.5, 0.5) and backbone.image_std == (0.25, 0.25, 0.25)
    assert backbone.fingerprint != CLIPBackbone.load(clip_dir).fingerprint


def test_max_length_beyond_positions_is_refused(clip):
    with pytest.raises(ValueError, match="between 2 and 77"):
        clip.encode_texts(["a"], max_length=78)


def test_missing_checkpoint_gives_a_clear_error(tmp_path):
    with pytest.raises(MmelError, match="cannot load a CLIP checkpoint"):
        CLIPBackbone.load(tmp_path / "nowhere")


def test_clip_can_be_fine_tuned(clip_dir):
    """The backbone is an nn.Module: gradients reach CLIP's weights when encoding on the fly."""
    backbone = CLIPBackbone.load(clip_dir)
    features = backbone.encode_texts(["a b c"], max_length=8)
    features.tokens.sum().backward()
    assert backbone.model.text_model.embeddings.token_embedding.weight.grad is not None
