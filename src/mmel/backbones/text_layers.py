"""Partial fine-tuning of the text encoder: the lower layers run once into the feature store, the top ones train.

The published models fine-tune their encoders end to end (models.md §1.2), which a 2-core CPU
cannot afford. A BERT-style encoder (MiniLM) is a stack of identical layers, so it splits cleanly:

    tokens -> embeddings -> layers[0:k]  (frozen: `LowerTextLayers`, cached by the feature store)
                         -> layers[k:n]  (trained with the model head: `TopTextLayers`)
                         -> masked mean, L2-normalised (the backbone's sentence vector)

`LowerTextLayers` is a backbone whose text features are the token states after layer k; it has
its own fingerprint (`<backbone>+text-layer<k>`), so the store keeps those states in their own
content-addressed namespace next to the final ones. `TopTextLayers` is a trainable copy of layers
k..n-1 that turns those states into the final token states and sentence vector: with the
pretrained weights it computes exactly what the full encoder computes (tests/backbones).

A checkpoint trained this way carries its fine-tuned layers (`text-layers.safetensors`, named in
the checkpoint's backbone block with its SHA-256); `apply_text_layers` loads them into a backbone,
whose fingerprint then names them, so indexes, linkers and feature views built with it can never
be mixed up with the pretrained encoder's.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes
from torch import nn

from mmel.backbones.base import Backbone, TextFeatures
from mmel.core.errors import MismatchError, UsageError
from mmel.core.features import FeatureBatch

TEXT_LAYERS_FILE = "text-layers.safetensors"
TEXT_LAYERS_KEY = "fine_tuned_text_layers"     # the checkpoint backbone block's entry naming the file
FINE_TUNED_MARK = "+text-layers-"               # in the fingerprint of a backbone with fine-tuned text layers


def pooled_sentence_vector(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token states [B, L, D] and mask [B, L] -> mask-aware mean, L2-normalised [B, D] (sentence-transformers)."""
    weights = mask.unsqueeze(-1).to(tokens.dtype)                                      # [B, L, 1]
    pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)         # [B, D]
    return F.normalize(pooled, dim=-1)


def text_layer_stack(backbone: Backbone) -> nn.ModuleList:
    """The backbone's text transformer layers, in order; refused for encoders that are not BERT-style stacks."""
    text_model = getattr(backbone, "text_model", None)
    layers = getattr(getattr(text_model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise UsageError(f"backbone {getattr(backbone, 'name', backbone)!r} has no BERT-style text layer stack "
                         "(text_model.encoder.layer), so its top text layers cannot be trained apart; "
                         "use minilm_effnet, or train the whole backbone (backbone.trainable)")
    return layers


def run_text_layers(layers: nn.ModuleList, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token states [B, L, D] through `layers`, padding positions masked out of attention -> [B, L, D]."""
    # an additive mask [B, 1, 1, L]: 0 where a key may be attended, the dtype's minimum at padding
    additive = (~mask.bool())[:, None, None, :].to(states.dtype) * torch.finfo(states.dtype).min
    for layer in layers:
        output = layer(states, attention_mask=additive)
        states = output[0] if isinstance(output, tuple) else output
    return states


class LowerTextLayers:
    """A backbone whose text features are the token states after its first `layer` text layers.

    Images and everything else come from the wrapped backbone unchanged. The feature store reads it
    like any backbone (`mmel features build --text-layer K`); its fingerprint keeps the cached states
    apart from the final ones.
    """

    def __init__(self, backbone: Backbone, layer: int):
        count = len(text_layer_stack(backbone))
        if not 1 <= layer < count:
            raise UsageError(f"--text-layer must be between 1 and {count - 1} for {backbone.name} "
                             f"({count} text layers), got {layer}")
        self.base = backbone
        self.text_layer = layer

    def __getattr__(self, name: str) -> Any:
        if name == "base":                      # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)

    @property
    def fingerprint(self) -> str:
        return lower_layers_fingerprint(self.base.fingerprint, self.text_layer)

    def encode_texts(self, texts: list[str], max_length: int) -> TextFeatures:
        """texts -> token states after layer `text_layer` [B, L, D], their pooled vector [B, D], mask [B, L]."""
        text_model = self.base.text_model
        encoded = self.base.tokenize(texts, max_length)
        mask = encoded["attention_mask"].bool()                                         # [B, L]
        states = text_model.embeddings(input_ids=encoded["input_ids"],
                                       token_type_ids=encoded.get("token_type_ids"))    # [B, L, D]
        states = run_text_layers(text_layer_stack(self.base)[:self.text_layer], states, mask)
        return TextFeatures(global_=pooled_sentence_vector(states, mask), tokens=states, mask=mask)


class TopTextLayers(nn.Module):
    """A trainable copy of text layers `first`..n-1: cached lower-layer states -> the model's text features.

    Applied to a FeatureBatch whose text tokens are the states after layer `first` (a
    `LowerTextLayers` view), it replaces them with the final token states and the sentence vector,
    with gradients; images and further views pass through unchanged.
    """

    def __init__(self, layers: nn.ModuleList, first: int):
        super().__init__()
        self.layers = layers
        self.first = first

    @classmethod
    def from_backbone(cls, backbone: Backbone, count: int) -> TopTextLayers:
        stack = text_layer_stack(backbone)
        if not 1 <= count < len(stack):
            raise UsageError(f"backbone.train_text_layers must be between 1 and {len(stack) - 1} for "
                             f"{backbone.name} ({len(stack)} text layers), got {count}")
        first = len(stack) - count
        return cls(copy.deepcopy(stack[first:]), first)

    def forward(self, batch: FeatureBatch) -> FeatureBatch:
        mask = batch.text_mask                                                            # [B, L]
        tokens = run_text_layers(self.layers, batch.text_tokens.float(), mask)          # [B, L, D]
        return dataclasses.replace(batch, text_tokens=tokens, text_global=pooled_sentence_vector(tokens, mask))

    def backbone_state(self) -> dict[str, torch.Tensor]:
        """The layers' weights under the text model's own parameter names (`encoder.layer.<i>.…`)."""
        return {f"encoder.layer.{self.first + index}.{name}": tensor.detach().cpu().contiguous().clone()
                for index, layer in enumerate(self.layers) for name, tensor in layer.state_dict().items()}

    def export(self, base_fingerprint: str) -> tuple[bytes, dict[str, Any]]:
        """The safetensors bytes of the layers and the checkpoint backbone-block fields that name them."""
        data = safetensors_bytes(self.backbone_state(), metadata={"first_layer": str(self.first)})
        digest = hashlib.sha256(data).hexdigest()
        return data, {TEXT_LAYERS_KEY: {"file": TEXT_LAYERS_FILE, "sha256": digest, "first_layer": self.first,
                                        "count": len(self.layers)},
                      "fingerprint": fine_tuned_fingerprint(base_fingerprint, digest)}


def lower_layers_fingerprint(base_fingerprint: str, layer: int) -> str:
    """The fingerprint of a backbone's token states after text layer `layer` (`LowerTextLayers`)."""
    return f"{base_fingerprint}+text-layer{layer}"


def fine_tuned_fingerprint(base_fingerprint: str, digest: str) -> str:
    """The fingerprint of a backbone with the fine-tuned text layers of SHA-256 `digest` applied."""
    return f"{base_fingerprint}{FINE_TUNED_MARK}{digest[:16]}"


def is_fine_tuned(fingerprint: str) -> bool:
    return FINE_TUNED_MARK in fingerprint


def apply_text_layers(backbone: Backbone, checkpoint_dir: Path, block: dict[str, Any]) -> Backbone:
    """Load a checkpoint's fine-tuned text layers into `backbone` (in place) and return it.

    The file must have the SHA-256 the checkpoint names and hold exactly the weights of the layers
    it names; the backbone's fingerprint then names the file, so nothing built with the pretrained
    weights is taken for this backbone's.
    """
    path = Path(checkpoint_dir) / str(block.get("file", TEXT_LAYERS_FILE))
    if not path.is_file():
        raise MismatchError(f"{path}: the checkpoint's fine-tuned text layers are missing; copy the whole "
                            "checkpoint directory")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != block.get("sha256"):
        raise MismatchError(f"{path}: SHA-256 {digest} does not match the checkpoint's {block.get('sha256')}; "
                            "the file is corrupt or from another checkpoint")
    state = safetensors_load(data)
    text_model = backbone.text_model
    first, count = int(block["first_layer"]), int(block["count"])
    expected = {f"encoder.layer.{first + index}.{name}" for index in range(count)
                for name in text_layer_stack(backbone)[first + index].state_dict()}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise MismatchError(f"{path}: the fine-tuned text layers do not fit {backbone.name}'s layers {first}.."
                            f"{first + count - 1}; missing: {missing or 'none'}; unexpected: {unexpected or 'none'}")
    text_model.load_state_dict(state, strict=False)
    backbone.text_overlay = fine_tuned_fingerprint("", digest).removeprefix("+")
    return backbone


__all__ = ["FINE_TUNED_MARK", "TEXT_LAYERS_FILE", "TEXT_LAYERS_KEY", "LowerTextLayers", "TopTextLayers",
           "apply_text_layers", "fine_tuned_fingerprint", "is_fine_tuned", "lower_layers_fingerprint",
           "pooled_sentence_vector", "run_text_layers", "text_layer_stack"]
