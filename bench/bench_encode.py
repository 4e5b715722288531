"""Benchmark encoding throughput: the store's batched path against a plain per-item loop, in one run.

Both paths call the same backbone methods on the same inputs; the per-item loop encodes one text
(or one image) per call, as a naive script would, the batched path calls
`mmel.features.store.encode_text_batches` / `encode_image_batches` with `--batch-size` texts /
`--image-batch-size` images per call (CPU convolutions gain little from big batches). Each
measurement is the median of `--repeats` runs after one warm-up call. Texts are MIMIC-template
strings of a real dataset's mentions and entities when `--dataset` is given, else generated
sentences; images are the dataset's image files when it has enough, else generated pictures.

    python bench/bench_encode.py                                  # offline backbone, generated inputs
    python bench/bench_encode.py --dataset /work/data/wikimel --texts 512 --out bench/results/encode.json
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from mmel.backbones import load_backbone
from mmel.core.images import ImageReport, load_image
from mmel.core.paths import atomic_write_json
from mmel.features.encoding import encode_image_batches, encode_text_batches
from mmel.features.templates import get_template

WORDS = ("the", "river", "album", "footballer", "born", "city", "party", "film", "singer", "war", "museum", "club",
         "minister", "novel", "island", "church", "season", "league", "station", "bridge", "painter", "captain")


def generated_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30))) for _ in range(count)]


def dataset_texts(dataset_dir: Path, count: int) -> tuple[list[str], Any]:
    from mmel.data import load_dataset

    dataset = load_dataset(dataset_dir)
    template = get_template("mimic")
    mentions = [template.mention_text(m) for split in dataset.splits.values() for m in split]
    entities = [template.entity_text(e) for e in dataset.kb]
    half = count // 2
    return mentions[:half] + entities[:count - half], dataset


def generated_images(count: int, seed: int) -> list[Image.Image]:
    rng = random.Random(seed)
    images = []
    for _ in range(count):
        background = tuple(rng.randrange(256) for _ in "rgb")
        image = Image.new("RGB", (rng.randint(200, 500), rng.randint(200, 500)), background)
        draw = ImageDraw.Draw(image)
        for _ in range(8):
            box = sorted(rng.randrange(image.width) for _ in "xx") + sorted(rng.randrange(image.height) for _ in "yy")
            draw.ellipse((box[0], box[2], box[1], box[3]), fill=tuple(rng.randrange(256) for _ in "rgb"))
        images.append(image)
    return images


def dataset_images(dataset: Any, count: int) -> list[Image.Image]:
    paths = [m.image for split in dataset.splits.values() for m in split if m.image]
    paths += [e.images[0] for e in dataset.kb if e.images]
    report = ImageReport()
    images = [image for path in dict.fromkeys(paths) if (image := load_image(dataset.root, path, report))]
    return images[:count]


def median_seconds(work: Callable[[], object], repeats: int, *, warm_up: bool = True) -> float:
    """Median wall time of `repeats` calls of `work`, after one untimed call unless `warm_up` is False."""
    if warm_up:
        work()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def compare(name: str, count: int, per_item: Callable[[], None], batched: Callable[[], None],
            repeats: int) -> dict[str, float]:
    loop_seconds = median_seconds(per_item, repeats)
    batch_seconds = median_seconds(batched, repeats)
    result = {"items": count, "per_item_seconds": round(loop_seconds, 4), "batched_seconds": round(batch_seconds, 4),
              "per_item_per_second": round(count / loop_seconds, 1),
              "batched_per_second": round(count / batch_seconds, 1), "speedup": round(loop_seconds / batch_seconds, 2)}
    print(f"{name}: {count} items; per-item loop {result['per_item_per_second']}/s, batched "
          f"{result['batched_per_second']}/s -> {result['speedup']}x")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="minilm_effnet", choices=["minilm_effnet", "clip"])
    parser.add_argument("--clip-path", help="CLIP checkpoint directory or hub id (--backbone clip)")
    parser.add_argument("--dataset", type=Path, help="dataset directory whose texts (and images) to encode")
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64, help="texts per batched call")
    parser.add_argument("--image-batch-size", type=int, default=8, help="images per batched call")
    parser.add_argument("--max-length", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    options = {"path": args.clip_path} if args.backbone == "clip" and args.clip_path else {}
    backbone = load_backbone(args.backbone, **options)
    dataset = None
    if args.dataset is not None:
        texts, dataset = dataset_texts(args.dataset, args.texts)
    else:
        texts = generated_texts(args.texts, args.seed)
    images = dataset_images(dataset, args.images) if dataset is not None else []
    image_source = "dataset" if len(images) >= args.images else "generated"
    if image_source == "generated":
        images = generated_images(args.images, args.seed)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
               "load_average_1m": round(os.getloadavg()[0], 2)}
    print(f"backbone {backbone.fingerprint}; {machine}")
    with torch.inference_mode():
        text_result = compare(
            "texts", len(texts),
            lambda: [backbone.encode_texts([text], args.max_length) for text in texts],
            lambda: list(encode_text_batches(backbone, texts, args.max_length, args.batch_size)), args.repeats)
        image_result = compare(
            "images", len(images),
            lambda: [backbone.encode_images([image]) for image in images],
            lambda: list(encode_image_batches(backbone, images, args.image_batch_size)), args.repeats)
    if args.out is not None:
        atomic_write_json(args.out, {
            "backbone": backbone.fingerprint, "batch_size": args.batch_size,
            "image_batch_size": args.image_batch_size, "max_length": args.max_length,
            "repeats": args.repeats, "text_source": "dataset" if dataset is not None else "generated",
            "image_source": image_source, "machine": machine, "texts": text_result, "images": image_result})


if __name__ == "__main__":
    main()
