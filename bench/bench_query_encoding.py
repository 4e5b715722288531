"""Benchmark query encoding (MiniLM + EfficientNet-Lite0): the exact float32 path against faster runtimes.

`speed`: every variant of each network, side by side in one run, interleaved call by call (the
2 cores are shared, so load changes hit all variants alike); for each thread count:

- text (MiniLM, `max_length` 40, as the shipped checkpoint): torch float32 eager (the reference,
  the feature store's path), torch int8 dynamic quantization of the Linear layers
  (`torch.ao.quantization.quantize_dynamic`), torch.compile, bfloat16 weights, ONNX Runtime
  float32, ONNX Runtime int8 dynamic quantization per channel (the shipped `onnx-int8`) and per
  tensor;
- image (EfficientNet-Lite0, 224 x 224): torch float32 channels-last (the reference), contiguous
  (NCHW), torch.compile, bfloat16 autocast, ONNX Runtime float32, ONNX Runtime int8 dynamic
  quantization (ConvInteger), ONNX Runtime int8 static quantization (QDQ, calibrated on generated
  images);
- per call: the median over all single-query calls (batch 1; the texts are mention strings of the
  dataset's test split, or generated), and batch-32 throughput; each variant's output vectors
  against the reference: cosine of the sentence vector / pooled image vector and of each real
  token / patch (min and mean), max abs difference.

Every variant goes through `MiniLMEffNetBackbone.encode_texts` / `encode_images` (tokenizer,
pooling and pixel pipeline included); only the network call differs.

`accuracy`: WikiMEL-style test split linked through the served Linker (`Linker.link_mentions`,
first stage and reranking as the index says, entity features exact), once per query runtime;
Hits@k / MRR of each, and how many top-1 answers differ from float32's; plus the fidelity of the
runtime's vectors on every test mention text.

`latency`: single-mention `Linker.link` p50 / p95 per query runtime on one index, interleaved
mention by mention; two of every three mentions get a generated picture (as bench_linker.py).

    python bench/bench_query_encoding.py speed --dataset /work/data/wikimel --threads 1 2 \\
        --out bench/results/query-encoding-speed.json
    python bench/bench_query_encoding.py accuracy --dataset /work/data/wikimel --index /work/index/wikimel \\
        --out bench/results/query-encoding-wikimel.json
    python bench/bench_query_encoding.py latency --dataset /work/data/wikimel --index /work/index/wikimel \
        --threads 1 --out bench/results/query-encoding-latency.json
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from PIL import Image

from bench_encode import dataset_images, generated_images, generated_texts
from bench_index import current_rss_mib, machine, percentiles_ms
from mmel.backbones import load_backbone
from mmel.backbones.base import BackboneConfig
from mmel.backbones.minilm_effnet import MiniLMEffNetBackbone
from mmel.backbones.onnx_cache import OrtSession, default_onnx_cache_dir
from mmel.backbones.query_runtime import image_onnx_file, query_backbone, text_onnx_file
from mmel.core.paths import atomic_write_json
from mmel.features.templates import get_template

MAX_LENGTH = 40
TextNetwork = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]   # tokenizer output -> tokens [B, L, 384]
ImageNetwork = Callable[[torch.Tensor], torch.Tensor]               # pixels [B, 3, 224, 224] -> map [B, 1280, 7, 7]


class VariantBackbone(MiniLMEffNetBackbone):
    """The offline backbone with its text and/or image network call replaced by a variant's."""

    def __init__(self, exact: MiniLMEffNetBackbone, text: TextNetwork | None = None,
                 image: ImageNetwork | None = None):
        super().__init__(exact.text_model, exact.tokenizer, exact.image_model, file_sha256=exact.file_sha256)
        self._text = text
        self._image = image
        self.eval()

    def _text_states(self, encoded: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self._text(encoded) if self._text is not None else super()._text_states(encoded)

    def _feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._image(pixels) if self._image is not None else super()._feature_map(pixels)


@dataclass
class Variant:
    name: str
    backbone: MiniLMEffNetBackbone
    setup_seconds: float
    note: str = ""


# --- variants ---------------------------------------------------------------------------------------
# Built afresh for each thread count: ONNX Runtime sessions take torch's thread count when opened.

def text_variants(exact: MiniLMEffNetBackbone, cache_dir: Path, work_dir: Path) -> list[Variant]:
    variants = [Variant("torch-float32 (reference)", exact, 0.0)]
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(exact.text_model), {torch.nn.Linear},
                                                           dtype=torch.qint8)
    variants.append(Variant("torch-int8-dynamic", VariantBackbone(
        exact, text=lambda encoded: quantized(**encoded).last_hidden_state), time.perf_counter() - started))
    started = time.perf_counter()
    compiled = torch.compile(exact.text_model)
    compiled_backbone = VariantBackbone(exact, text=lambda encoded: compiled(**encoded).last_hidden_state)
    with torch.inference_mode():
        compiled_backbone.encode_texts(["compile me"], MAX_LENGTH)
    variants.append(Variant("torch-compile", compiled_backbone, time.perf_counter() - started,
                            "setup = first call (compiles); a new batch size compiles again"))
    bf16 = copy.deepcopy(exact.text_model).to(torch.bfloat16)
    variants.append(Variant("torch-bfloat16-weights", VariantBackbone(
        exact, text=lambda encoded: bf16(**encoded).last_hidden_state.float()), 0.0))
    for runtime in ("onnx", "onnx-int8"):
        started, rss = time.perf_counter(), current_rss_mib()
        shipped = query_backbone(exact, BackboneConfig(query_runtime=runtime, onnx_cache_dir=str(cache_dir)))
        variants.append(Variant(f"{runtime} (shipped runtime)", shipped, time.perf_counter() - started,
                                f"setup = load + probe check (files cached), RSS +{current_rss_mib() - rss:.0f} MiB"
                                " for both sessions" +
                                ("; one text per ONNX call (batch-independent)" if runtime == "onnx-int8" else "")))
    int8_file = text_onnx_file(exact, cache_dir, int8=True)
    variants.append(Variant("onnx-int8, whole batch per call", VariantBackbone(exact, text=OrtSession(int8_file).run),
                            0.0, "rows change each other's activation scales"))
    per_tensor = work_dir / "minilm-int8-per-tensor.onnx"
    started = time.perf_counter()
    if not per_tensor.is_file():
        quantize_dynamic(text_onnx_file(exact, cache_dir, int8=False), per_tensor, weight_type=QuantType.QInt8,
                         per_channel=False)
    variants.append(Variant("onnx-int8-per-tensor", VariantBackbone(exact, text=OrtSession(per_tensor).run),
                            time.perf_counter() - started))
    return variants


def image_variants(exact: MiniLMEffNetBackbone, cache_dir: Path, work_dir: Path) -> list[Variant]:
    variants = [Variant("torch-float32-channels-last (reference)", exact, 0.0)]
    variants.append(Variant("torch-float32-contiguous", VariantBackbone(
        exact, image=_contiguous_network(exact)), 0.0, "a NCHW copy of the network"))
    started = time.perf_counter()
    compiled = torch.compile(exact.image_model.forward_features)
    compiled_backbone = VariantBackbone(
        exact, image=lambda pixels: compiled(pixels.contiguous(memory_format=torch.channels_last)))
    with torch.inference_mode():
        compiled_backbone.encode_blank_images(1)
    variants.append(Variant("torch-compile-channels-last", compiled_backbone, time.perf_counter() - started,
                            "setup = first call (compiles)"))
    variants.append(Variant("torch-bfloat16-autocast", VariantBackbone(exact, image=_autocast_network(exact)), 0.0))
    started = time.perf_counter()
    shipped = query_backbone(exact, BackboneConfig(query_runtime="onnx", onnx_cache_dir=str(cache_dir)))
    variants.append(Variant("onnx-float32 (shipped onnx and onnx-int8)", shipped, time.perf_counter() - started))
    int8 = work_dir / "effnet-int8-dynamic.onnx"
    started = time.perf_counter()
    if not int8.is_file():
        quantize_dynamic(image_onnx_file(exact, cache_dir), int8, weight_type=QuantType.QUInt8)
    session = OrtSession(int8)
    variants.append(Variant("onnx-int8-dynamic (ConvInteger)", VariantBackbone(
        exact, image=lambda pixels: session.run({"pixels": pixels.contiguous()})), time.perf_counter() - started))
    started = time.perf_counter()
    static = _static_int8_image_network(exact, cache_dir, work_dir)
    static_session = OrtSession(static)
    variants.append(Variant("onnx-int8-static (QDQ, calibrated)", VariantBackbone(
        exact, image=lambda pixels: static_session.run({"pixels": pixels.contiguous()})),
        time.perf_counter() - started, f"weights per channel, uint8 activations, {CALIBRATION_IMAGES} generated "
                                       "calibration images (seed 1, not among the measured ones)"))
    return variants


CALIBRATION_IMAGES = 32


class _PixelReader(CalibrationDataReader):
    """The calibration inputs of ONNX Runtime's static quantizer: one preprocessed image per call."""

    def __init__(self, exact: MiniLMEffNetBackbone, images: list[Image.Image]):
        self._inputs = iter([{"pixels": exact.pixels([image]).numpy()} for image in images])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._inputs, None)


def _static_int8_image_network(exact: MiniLMEffNetBackbone, cache_dir: Path, work_dir: Path) -> Path:
    """EfficientNet-Lite0 quantized statically (QDQ int8, activation ranges from calibration images)."""
    target = work_dir / "effnet-int8-static-qdq.onnx"
    if not target.is_file():
        prepared = work_dir / "effnet-prepared.onnx"
        quant_pre_process(str(image_onnx_file(exact, cache_dir)), str(prepared))
        quantize_static(str(prepared), str(target), _PixelReader(exact, generated_images(CALIBRATION_IMAGES, seed=1)),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
    return target


def _contiguous_network(exact: MiniLMEffNetBackbone) -> ImageNetwork:
    network = copy.deepcopy(exact.image_model).to(memory_format=torch.contiguous_format)
    return lambda pixels: network.forward_features(pixels.contiguous())


def _autocast_network(exact: MiniLMEffNetBackbone) -> ImageNetwork:
    def run(pixels: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return exact.image_model.forward_features(pixels.contiguous(memory_format=torch.channels_last)).float()
    return run


# --- measuring --------------------------------------------------------------------------------------

def interleaved_medians(calls: Mapping[str, Sequence[Callable[[], object]]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each name's calls, run round-robin (name by name, call by call) `repeats` times."""
    for work in calls.values():       # warm-up: one untimed pass of every call
        for call in work:
            call()
    timings: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, work in calls.items():
            for call in work:
                started = time.perf_counter()
                call()
                timings[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in timings.items()}


def cosine_stats(fast: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Cosine min / mean over the last-dimension vectors, and the max abs difference.

    Vectors that are zero in the reference (patches where every ReLU6 channel is 0) have no
    direction: they are left out of the cosines (counted) and show in the max abs difference.
    """
    fast, reference = fast.float().flatten(0, -2), reference.float().flatten(0, -2)   # [N, D]
    directed = reference.norm(dim=-1) > 0
    cosine = F.cosine_similarity(fast[directed], reference[directed], dim=-1)
    return {"cosine_min": round(float(cosine.min()), 6), "cosine_mean": round(float(cosine.mean()), 6),
            "max_abs_diff": round(float((fast - reference).abs().max()), 6),
            "zero_reference_vectors": int((~directed).sum())}


def text_fidelity(backbone: MiniLMEffNetBackbone, reference: MiniLMEffNetBackbone, texts: list[str],
                  batch_size: int = 64) -> dict[str, Any]:
    starts = range(0, len(texts), batch_size)
    with torch.inference_mode():
        fast = [backbone.encode_texts(texts[i:i + batch_size], MAX_LENGTH) for i in starts]
        exact = [reference.encode_texts(texts[i:i + batch_size], MAX_LENGTH) for i in starts]
    masks = torch.cat([part.mask for part in exact])
    sentences = cosine_stats(torch.cat([p.global_ for p in fast]), torch.cat([p.global_ for p in exact]))
    return {"sentence_vector": sentences,
            "real_tokens": cosine_stats(torch.cat([p.tokens for p in fast])[masks],
                                        torch.cat([p.tokens for p in exact])[masks]), "texts": len(texts)}


def image_fidelity(backbone: MiniLMEffNetBackbone, reference: MiniLMEffNetBackbone,
                   images: list[Image.Image]) -> dict[str, Any]:
    with torch.inference_mode():
        fast = [backbone.encode_images([image]) for image in images] + [backbone.encode_blank_images(1)]
        exact = [reference.encode_images([image]) for image in images] + [reference.encode_blank_images(1)]
    return {"pooled_vector": cosine_stats(torch.cat([p.global_ for p in fast]), torch.cat([p.global_ for p in exact])),
            "patches": cosine_stats(torch.cat([p.patches for p in fast]), torch.cat([p.patches for p in exact])),
            "images": len(images) + 1}


def speed(args: argparse.Namespace) -> dict[str, Any]:
    exact = load_backbone("minilm_effnet")
    texts, images, sources = bench_inputs(args, exact)
    cache_dir = args.cache_dir or default_onnx_cache_dir()
    result: dict[str, Any] = {"machine": {**machine(), **tool_versions_and_cpu()}, "inputs": sources,
                              "max_length": MAX_LENGTH, "repeats": args.repeats, "rounds": []}
    with tempfile.TemporaryDirectory(prefix="bench-query-encoding-") as work:
        for threads in args.threads:
            torch.set_num_threads(threads)
            text_set = text_variants(exact, cache_dir, Path(work))
            image_set = image_variants(exact, cache_dir, Path(work))
            print(f"--- {threads} thread(s), load average {os.getloadavg()}", flush=True)
            result["rounds"].append(measure_round(threads, exact, text_set, image_set, texts, images, args))
    result["machine"]["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    return result


def measure_round(threads: int, exact: MiniLMEffNetBackbone, text_set: list[Variant], image_set: list[Variant],
                  texts: list[str], images: list[Image.Image], args: argparse.Namespace) -> dict[str, Any]:
    batch = texts[:32]
    load_at_start = [round(value, 2) for value in os.getloadavg()]
    with torch.inference_mode():
        text_single = interleaved_medians({v.name: [_encode_text(v.backbone, t) for t in texts[:args.single]]
                                           for v in text_set}, args.repeats)
        text_batch = interleaved_medians({v.name: [_encode_text(v.backbone, batch)] for v in text_set},
                                         args.repeats)
        image_single = interleaved_medians({v.name: [_encode_image(v.backbone, [i]) for i in images[:args.single]]
                                            for v in image_set}, args.repeats)
        image_batch = interleaved_medians({v.name: [_encode_image(v.backbone, images[:32])] for v in image_set},
                                          max(1, args.repeats // 3))
    round_result: dict[str, Any] = {"threads": threads, "load_average_at_start": load_at_start,
                                    "load_average_after_timing": [round(value, 2) for value in os.getloadavg()],
                                    "text": [], "image": []}
    for kind, variants, single, batched, fidelity in (
            ("text", text_set, text_single, text_batch, lambda b: text_fidelity(b, exact, texts)),
            ("image", image_set, image_single, image_batch, lambda b: image_fidelity(b, exact, images))):
        reference = variants[0].name
        for variant in variants:
            row = {"variant": variant.name, "single_ms": round(single[variant.name] * 1000, 2),
                   "single_speedup": round(single[reference] / single[variant.name], 2),
                   "batch32_items_per_s": round(32 / batched[variant.name], 1),
                   "batch32_speedup": round(batched[reference] / batched[variant.name], 2),
                   "setup_s": round(variant.setup_seconds, 2), "note": variant.note,
                   "fidelity": fidelity(variant.backbone)}
            round_result[kind].append(row)
            print(f"{kind:5} {threads}t {variant.name:42} {row['single_ms']:8.2f} ms  x{row['single_speedup']:<5} "
                  f"batch32 {row['batch32_items_per_s']:7.1f}/s  {_headline(row['fidelity'])}", flush=True)
    return round_result


def _encode_text(backbone: MiniLMEffNetBackbone, texts: str | list[str]) -> Callable[[], object]:
    batch = [texts] if isinstance(texts, str) else texts
    return lambda: backbone.encode_texts(batch, MAX_LENGTH)


def _encode_image(backbone: MiniLMEffNetBackbone, images: list[Image.Image]) -> Callable[[], object]:
    return lambda: backbone.encode_images(images)


def _headline(fidelity: dict[str, Any]) -> str:
    first = fidelity.get("sentence_vector") or fidelity["pooled_vector"]
    return f"cos min {first['cosine_min']:.5f} mean {first['cosine_mean']:.5f} max|d| {first['max_abs_diff']:.4f}"


def bench_inputs(args: argparse.Namespace,
                 exact: MiniLMEffNetBackbone) -> tuple[list[str], list[Image.Image], dict[str, Any]]:
    """Mention texts (the dataset's test split through the MIMIC template, else generated) and 224+ px images."""
    texts, images, sources = generated_texts(args.texts, seed=0), [], {"texts": "generated", "images": "generated"}
    if args.dataset is not None:
        from mmel.data import load_dataset

        dataset = load_dataset(args.dataset)
        template = get_template("mimic")
        texts = [template.mention_text(m) for m in dataset.splits["test"]][:args.texts]
        images = dataset_images(dataset, args.images)
        sources = {"texts": f"{args.dataset} test mentions, mimic template", "images": f"{args.dataset} images"}
    if len(images) < args.images:
        images += generated_images(args.images - len(images), seed=0)
        sources["images"] += f" (+ generated up to {args.images})"
    tokens = [min(len(ids), MAX_LENGTH) for ids in exact.tokenizer(texts)["input_ids"]]
    sources.update({"text_count": len(texts), "image_count": len(images),
                    "tokens_median": statistics.median(tokens), "tokens_truncated_at": MAX_LENGTH})
    return texts, images, sources


def tool_versions_and_cpu() -> dict[str, Any]:
    import onnxruntime

    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "cpu_int8_bf16_flags": sorted(f for f in flags if f in {"avx512_vnni", "avx_vnni", "amx_int8",
                                                                    "amx_bf16", "avx512_bf16"})}


# --- accuracy through the served linker ------------------------------------------------------------

def accuracy(args: argparse.Namespace) -> dict[str, Any]:
    from mmel.data import load_dataset
    from mmel.evaluation.protocols import gold_rows_for
    from mmel.experiments.evaluate import ranking_from_links
    from mmel.retrieval.linker import Linker

    torch.set_num_threads(args.threads[0])
    dataset = load_dataset(args.dataset)
    mentions = list(dataset.splits[args.split])
    gold_rows = gold_rows_for(mentions, dataset.kb)
    exact = load_backbone("minilm_effnet")
    template = get_template("mimic")
    texts = [template.mention_text(m) for m in mentions]
    result: dict[str, Any] = {"machine": {**machine(), **tool_versions_and_cpu()}, "dataset": str(args.dataset),
                              "split": args.split, "mentions": len(mentions), "kb_size": len(dataset.kb),
                              "runtimes": []}
    top1: dict[str, list[str | None]] = {}
    for index_dir, runtime in itertools.product(args.index, args.runtimes):
        config = BackboneConfig(query_runtime=runtime, onnx_cache_dir=str(args.cache_dir) if args.cache_dir else None)
        started = time.perf_counter()
        with Linker.load(index_dir, backbone=exact, backbone_config=config) as linker:
            linked = linker.link_mentions(mentions, dataset.root, top_k=args.candidates, candidates_k=args.candidates)
            info = linker.info()
        seconds = time.perf_counter() - started
        failed = [m.id for m, outcome in zip(mentions, linked, strict=True) if isinstance(outcome, Exception)]
        if failed:
            raise SystemExit(f"{len(failed)} mentions could not be linked, e.g. {failed[:3]}")
        metrics = ranking_from_links(linked, gold_rows, dataset.kb.qids).metrics()
        answers = [r.candidates[0].qid if r.candidates else None for r in linked]
        top1[f"{index_dir}:{runtime}"] = answers
        reference = top1.get(f"{index_dir}:float32")
        row = {"index": str(index_dir), "first_stage": info["first_stage"], "name_prior_weight":
               info["name_prior_weight"], "query_runtime": runtime, "candidates_k": args.candidates,
               "seconds": round(seconds, 1), "metrics": {k: round(100 * v, 2) if k.startswith("hits") or k == "mrr"
                                                         else round(v, 2) for k, v in metrics.items()},
               "top1_changes_vs_float32": None if reference is None else
               sum(a != b for a, b in zip(answers, reference, strict=True))}
        if runtime != "float32":
            row["fidelity"] = text_fidelity(query_backbone(exact, config), exact, texts)   # type: ignore[arg-type]
        result["runtimes"].append(row)
        print(json.dumps(row), flush=True)
    result["machine"]["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    return result


def latency(args: argparse.Namespace) -> dict[str, Any]:
    """Single-mention `Linker.link` latency per query runtime, interleaved mention by mention.

    As in bench_linker.py, two of every three mentions get a picture (generated, 224+ px) so the
    image network runs for them; the rest are text only.
    """
    from mmel.data import load_dataset
    from mmel.retrieval.linker import Linker

    torch.set_num_threads(args.threads[0])
    dataset = load_dataset(args.dataset)
    mentions = [m for m in dataset.splits[args.split] if m.span is not None][:args.mentions]
    pictures = generated_images(len(mentions), seed=1)
    exact = load_backbone("minilm_effnet")
    linkers = {runtime: Linker.load(args.index[0], backbone=exact, backbone_config=BackboneConfig(
        query_runtime=runtime, onnx_cache_dir=str(args.cache_dir) if args.cache_dir else None))
        for runtime in args.runtimes}
    load_at_start = [round(value, 2) for value in os.getloadavg()]
    timings: dict[str, dict[str, list[float]]] = {r: {"with_image": [], "text_only": []} for r in linkers}
    for position, (mention, picture) in enumerate(zip(mentions, pictures, strict=True)):
        image = picture if position % 3 else None
        for runtime, linker in linkers.items():
            started = time.perf_counter()
            linker.link(mention.sentence, span=mention.span, image=image, top_k=10, candidates_k=args.candidates)
            timings[runtime]["text_only" if image is None else "with_image"].append(time.perf_counter() - started)
    rows = []
    reference = timings[args.runtimes[0]]
    for runtime, kinds in timings.items():
        every = kinds["with_image"] + kinds["text_only"]
        row = {"query_runtime": runtime, **percentiles_ms(every),
               "with_image": percentiles_ms(kinds["with_image"]), "text_only": percentiles_ms(kinds["text_only"]),
               "p50_speedup": round(float(np.percentile(reference["with_image"] + reference["text_only"], 50)
                                          / np.percentile(every, 50)), 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    for linker in linkers.values():
        linker.close()
    return {"machine": {**machine(), **tool_versions_and_cpu(), "load_average_at_start": load_at_start,
                        "load_average_at_end": [round(value, 2) for value in os.getloadavg()]},
            "index": str(args.index[0]), "mentions": len(mentions), "candidates_k": args.candidates,
            "threads": args.threads[0], "runtimes": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["speed", "accuracy", "latency"])
    parser.add_argument("--dataset", type=Path, help="dataset directory (test-split texts and its images)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--index", type=Path, nargs="+", help="accuracy: index directories of the dataset's KB")
    parser.add_argument("--runtimes", nargs="+", default=["float32", "onnx", "onnx-int8"])
    parser.add_argument("--candidates", type=int, default=100, help="first-stage K (accuracy: = top_k kept)")
    parser.add_argument("--mentions", type=int, default=150, help="latency: test mentions linked one by one")
    parser.add_argument("--texts", type=int, default=256, help="speed: texts for fidelity; the first --single timed")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--single", type=int, default=16, help="speed: distinct inputs timed one by one")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cache-dir", type=Path, help="ONNX cache (default: $MMEL_CACHE_DIR/onnx)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.mode != "speed" and (args.dataset is None or not args.index):
        parser.error(f"{args.mode} needs --dataset and --index")
    started = time.perf_counter()
    result = {"speed": speed, "accuracy": accuracy, "latency": latency}[args.mode](args)
    result["command"] = "python bench/bench_query_encoding.py " + " ".join(sys.argv[1:])
    result["wall_s"] = round(time.perf_counter() - started, 1)
    if args.out is not None:
        atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
