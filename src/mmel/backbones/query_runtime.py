"""Faster query encoding: the offline backbone's two networks run in ONNX Runtime, optionally int8.

A Linker encodes each query with its backbone, and on a CPU that encoding is most of a link
(MiniLM ~10 ms, EfficientNet-Lite0 ~17 ms of ~37 ms on one thread). `query_backbone` returns the
backbone the Linker should encode queries with under a `BackboneConfig.query_runtime`:

| runtime | text network (MiniLM) | image network (EfficientNet-Lite0) |
|---|---|---|
| float32 | PyTorch, as the feature store | PyTorch, as the feature store |
| onnx | ONNX Runtime float32 | ONNX Runtime float32 |
| onnx-int8 | ONNX Runtime, int8 dynamic quantization | ONNX Runtime float32 |

`auto` (the default) is `onnx` for this backbone on a CPU and `float32` for any other. The
image network stays float32 under int8: quantizing its convolutions was both slower and far
off (cosine 0.74, bench/bench_query_encoding.py). Entity features (feature store, index builds,
KB edits) are always encoded by the exact backbone, and the fingerprint is the exact one: the
runtime changes how a query's numbers are computed, not which weights or preprocessing.

Each ONNX file is exported from the loaded weights and cached (`onnx_cache.py`); on load the
sessions are checked against the PyTorch network on a probe sentence and image, so a stale or
damaged file is refused rather than trusted.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmel.backbones.base import Backbone, BackboneConfig
from mmel.backbones.efficientnet_lite import EfficientNetLite0
from mmel.backbones.minilm_effnet import MiniLMEffNetBackbone, draw_reference_image
from mmel.backbones.onnx_cache import (
    EXPORT_FORMAT,
    ONNX_OPSET,
    OrtSession,
    cached_file,
    default_onnx_cache_dir,
    export_onnx,
    quantize_int8,
    tool_versions,
)
from mmel.core.errors import MismatchError, UsageError

# What `auto` means for the offline backbone on a CPU. `onnx` gave the float32 answers on all 5,131
# WikiMEL test mentions; `onnx-int8` is faster still but changed 69 top-1 answers (189 without the
# name prior), so the served linker would no longer answer as `mmel evaluate` scores (docs/RESULTS.md).
DEFAULT_QUERY_RUNTIME = "onnx"
TEXT_INPUTS = ["input_ids", "token_type_ids", "attention_mask"]
# Smallest cosine to the float32 path, on the load-time probe, of the sentence vector and the pooled image vector.
MIN_PROBE_COSINE = {"onnx": 0.9999, "onnx-int8": 0.99}
PROBE_TEXTS = ["Noel Harrison [SEP] Powers with Noel Harrison in The Girl from U.N.C.L.E.",   # mention-like, as queries
               "Mercury [SEP] Mercury sang Bohemian Rhapsody with Queen at Live Aid."]
PROBE_MAX_LENGTH = 24     # unlike the traced length (16), so a graph frozen to its example shapes fails the probe


def query_backbone(backbone: Backbone, config: BackboneConfig | None = None) -> Backbone:
    """The backbone to encode queries with under `config.query_runtime` (float32: `backbone` itself)."""
    config = config or BackboneConfig()
    runtime = resolve_query_runtime(backbone, config.query_runtime)
    if runtime == "float32":
        return backbone
    cache_dir = Path(config.onnx_cache_dir) if config.onnx_cache_dir else default_onnx_cache_dir()
    return OnnxMiniLMEffNet.from_exact(backbone, runtime, cache_dir)  # type: ignore[arg-type]


def resolve_query_runtime(backbone: Backbone, runtime: str) -> str:
    """`runtime`, with `auto` made concrete; UsageError when `backbone` cannot run it."""
    runs_onnx = isinstance(backbone, MiniLMEffNetBackbone) and backbone.device.type == "cpu"
    if runtime == "auto":
        return DEFAULT_QUERY_RUNTIME if runs_onnx else "float32"
    if runtime != "float32" and not runs_onnx:
        where = getattr(backbone, "device", "cpu")
        raise UsageError(f"query runtime {runtime!r} runs the minilm_effnet backbone on a CPU only, not backbone "
                         f"{backbone.name!r} on {where}; use query runtime 'float32' or 'auto'")
    return runtime


class OnnxMiniLMEffNet(MiniLMEffNetBackbone):
    """The offline backbone with both networks in ONNX Runtime sessions (same fingerprint, tokenizer, pixels)."""

    def __init__(self, exact: MiniLMEffNetBackbone, runtime: str, text_session: OrtSession,
                 image_session: OrtSession):
        super().__init__(exact.text_model, exact.tokenizer, exact.image_model, file_sha256=exact.file_sha256)
        self.query_runtime = runtime
        self._text_session = text_session
        self._image_session = image_session
        # int8 activations are quantized with one scale per call: a batch's rows would change each
        # other's vectors, so each text runs alone (link and link_batch then give the same answers).
        self._one_text_per_call = runtime == "onnx-int8"
        self.eval()

    @classmethod
    def from_exact(cls, exact: MiniLMEffNetBackbone, runtime: str, cache_dir: Path) -> OnnxMiniLMEffNet:
        """Export (or reuse from `cache_dir`) the ONNX files of `exact`'s networks and check them against it."""
        if runtime not in MIN_PROBE_COSINE:
            raise UsageError(f"unknown ONNX query runtime {runtime!r}; choose one of {', '.join(MIN_PROBE_COSINE)}")
        text_path = text_onnx_file(exact, cache_dir, int8=runtime == "onnx-int8")
        image_path = image_onnx_file(exact, cache_dir)
        backbone = cls(exact, runtime, OrtSession(text_path), OrtSession(image_path))
        backbone.check_against(exact)
        return backbone

    def _text_states(self, encoded: Mapping[str, torch.Tensor]) -> torch.Tensor:
        rows = len(encoded["input_ids"])
        if not self._one_text_per_call or rows <= 1:
            return self._text_session.run(encoded)                                    # [B, L, 384]
        return torch.cat([self._text_session.run({name: tensor[row:row + 1] for name, tensor in encoded.items()})
                          for row in range(rows)])

    def _feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            return super()._feature_map(pixels)   # the graph's padding is fixed to 224 x 224 inputs
        return self._image_session.run({"pixels": pixels.float().contiguous()})       # [B, 1280, 7, 7]

    @torch.inference_mode()
    def check_against(self, exact: MiniLMEffNetBackbone) -> None:
        """Raise MismatchError unless this runtime's probe vectors are within MIN_PROBE_COSINE of `exact`'s."""
        minimum = MIN_PROBE_COSINE[self.query_runtime]
        pairs = {
            self._text_session.path: (self.encode_texts(PROBE_TEXTS, PROBE_MAX_LENGTH).global_,
                                      exact.encode_texts(PROBE_TEXTS, PROBE_MAX_LENGTH).global_),
            self._image_session.path: (self.encode_images([draw_reference_image()]).global_,
                                       exact.encode_images([draw_reference_image()]).global_),
        }
        for path, (fast, reference) in pairs.items():
            cosine = float(F.cosine_similarity(fast, reference, dim=-1).min())
            if not cosine >= minimum:
                raise MismatchError(f"{path}: the {self.query_runtime} network gives probe vectors at cosine "
                                    f"{cosine:.5f} of the float32 ones (at least {minimum} expected); the cached "
                                    "file is stale or damaged: delete it to have it exported again")


class _TextNetwork(nn.Module):
    """MiniLM as a function of the tokenizer's three tensors, returning only the last hidden state."""

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_model(input_ids=input_ids, token_type_ids=token_type_ids,
                               attention_mask=attention_mask).last_hidden_state


class _ImageNetwork(nn.Module):
    def __init__(self, image_model: EfficientNetLite0):
        super().__init__()
        self.image_model = image_model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_model.forward_features(pixels)


def _identity(backbone: MiniLMEffNetBackbone, network: str, variant: str) -> dict[str, object]:
    return {"stem": f"{backbone.fingerprint}-{network}-{variant}", "backbone": backbone.fingerprint,
            "network": network, "variant": variant, "format": EXPORT_FORMAT, "opset": ONNX_OPSET,
            "tools": tool_versions()}


def text_onnx_file(backbone: MiniLMEffNetBackbone, cache_dir: Path, *, int8: bool) -> Path:
    """The cached ONNX file of MiniLM (float32, or int8 quantized from the float32 file); dynamic batch and length."""
    float_path = cached_file(cache_dir, _identity(backbone, "text", "float32"),
                             lambda target: _export_text(backbone, target))
    if not int8:
        return float_path
    return cached_file(cache_dir, _identity(backbone, "text", "int8-dynamic-per-channel"),
                       lambda target: quantize_int8(float_path, target))


def image_onnx_file(backbone: MiniLMEffNetBackbone, cache_dir: Path) -> Path:
    """The cached float32 ONNX file of EfficientNet-Lite0's trunk; dynamic batch, 224 x 224 inputs."""
    return cached_file(cache_dir, _identity(backbone, "image", "float32"),
                       lambda target: _export_image(backbone, target))


def _export_text(backbone: MiniLMEffNetBackbone, target: Path) -> None:
    example = backbone.tokenizer(["a traced example", "a second traced example"], padding="max_length",
                                 truncation=True, max_length=16, return_tensors="pt")
    axes = {name: {0: "batch", 1: "length"} for name in [*TEXT_INPUTS, "tokens"]}
    export_onnx(_TextNetwork(backbone.text_model), tuple(example[name] for name in TEXT_INPUTS), target,
                input_names=TEXT_INPUTS, output_name="tokens", dynamic_axes=axes)


def _export_image(backbone: MiniLMEffNetBackbone, target: Path) -> None:
    example = torch.zeros(2, 3, backbone.image_size, backbone.image_size)
    export_onnx(_ImageNetwork(backbone.image_model), (example,), target, input_names=["pixels"],
                output_name="feature_map", dynamic_axes={"pixels": {0: "batch"}, "feature_map": {0: "batch"}})


__all__ = ["DEFAULT_QUERY_RUNTIME", "MIN_PROBE_COSINE", "OnnxMiniLMEffNet", "image_onnx_file", "query_backbone",
           "resolve_query_runtime", "text_onnx_file"]
