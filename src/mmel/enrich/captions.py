"""Mention-image captions from a local image-to-text model: DIM's BLIP-2 "visual expert".

DIM asks `Blip2ForConditionalGeneration` (blip2-opt-2.7b) "Question:  Who are the characters in
the picture? Answer: " with `max_new_tokens=20` and encodes the answer as a text cue. Any other
local `AutoModelForImageTextToText` model works too (plain captioning unless --prompt is given).
Captions are cached by (model, prompt, generation length, image content hash), so the same image
under two paths or in two datasets is captioned once, and a rerun captions only what is missing.
Captions cut at `max_new_tokens` are kept, as in DIM; empty ones are failures.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, Blip2ForConditionalGeneration

from mmel.core.images import ImageReport, decode_image_bytes, read_image_bytes
from mmel.core.types import Dataset, Mention
from mmel.enrich.answers import Answer, Failure, Outcome, Tally, clean_answer
from mmel.enrich.cache import AnswerCache, cache_key
from mmel.enrich.local_models import check_model_dir, model_fingerprint, pick_device
from mmel.enrich.provenance import write_enriched

KIND = "caption"
DIM_QUESTION = "Question:  Who are the characters in the picture? Answer: "
DIM_MAX_NEW_TOKENS = 20
UNUSABLE_IMAGE = "unusable image"


class Captioner:
    """A local image-to-text model and its processor; BLIP-2 defaults to DIM's question."""

    def __init__(self, path: Path, *, prompt: str | None = None, max_new_tokens: int = DIM_MAX_NEW_TOKENS,
                 device: str | None = None):
        path = check_model_dir(path, "--model", "Salesforce/blip2-opt-2.7b")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        self.is_blip2 = config.model_type == "blip-2"
        model_class = Blip2ForConditionalGeneration if self.is_blip2 else AutoModelForImageTextToText
        self.device = pick_device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.model = model_class.from_pretrained(path, local_files_only=True, dtype=self.dtype).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        self.prompt = prompt if prompt is not None else (DIM_QUESTION if self.is_blip2 else None)
        self.max_new_tokens = max_new_tokens
        self.name = model_fingerprint(path)

    def key(self, image_sha256: str) -> str:
        """The cache key of this model's caption of the image with that content hash."""
        return cache_key(self.name, self.prompt, self.max_new_tokens, image_sha256)

    @torch.inference_mode()
    def caption(self, images: list[Image.Image]) -> list[Outcome]:
        """Captions of a batch of images, greedy decoding."""
        text = None if self.prompt is None else [self.prompt] * len(images)
        inputs = self.processor(images=images, text=text, return_tensors="pt").to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        if "input_ids" in inputs and not self.model.config.is_encoder_decoder:
            output = output[:, inputs["input_ids"].shape[1]:]  # decoder-only models echo the prompt
        texts = self.processor.batch_decode(output, skip_special_tokens=True)
        return [clean_answer(caption, truncated=False) for caption in texts]


@dataclass
class CaptionRun:
    """What a run did: counts per distinct image, image problems, and the dataset as written."""

    tally: Tally
    images: ImageReport
    dataset: Dataset
    mentions_captioned: int = 0
    mentions_with_image: int = 0


def caption_dataset(dataset: Dataset, source: Path, out: Path, captioner: Captioner, cache: AnswerCache, *,
                    batch_size: int = 8, name: str | None = None, progress: bool = True) -> CaptionRun:
    """Caption every distinct mention image of `dataset` not yet in `cache`; write the dataset to `out`."""
    report = ImageReport()
    keys = _image_keys(dataset, captioner, report, progress)
    captions = cache.get_many(KIND, keys.values())
    tally = Tally(cached=len(captions))
    pending = {key: relative for relative, key in keys.items() if key not in captions}
    provenance = {"model": captioner.name, "prompt": captioner.prompt, "max_new_tokens": captioner.max_new_tokens}
    items = list(pending.items())
    with tqdm(total=len(items), desc="caption images", unit="img", disable=not progress) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            answered = _caption_batch(dataset.root, batch, captioner, tally)
            cache.put_many(KIND, answered, provenance)
            captions.update(answered)
            bar.update(len(batch))
    splits = {split: [_captioned(m, captions.get(keys.get(m.image or ""))) for m in mentions]
              for split, mentions in dataset.splits.items()}
    enriched = Dataset(name or dataset.name, dataset.kb, splits, dataset.root)
    run = CaptionRun(tally, report, enriched,
                     mentions_captioned=sum(m.caption is not None for ms in splits.values() for m in ms),
                     mentions_with_image=sum(m.image is not None for ms in splits.values() for m in ms))
    step = {"step": "captions", "model": captioner.name, "prompt": captioner.prompt,
            "max_new_tokens": captioner.max_new_tokens, "mentions_with_image": run.mentions_with_image,
            "mentions_captioned": run.mentions_captioned, "counts": tally.to_dict(),
            "image_problems": dict(report.problems)}
    write_enriched(enriched, source, out, name=enriched.name, step=step)
    return run


def _image_keys(dataset: Dataset, captioner: Captioner, report: ImageReport, progress: bool) -> dict[str, str]:
    """Cache key of every readable distinct mention image, by its relative path (missing files are counted)."""
    relatives = sorted({m.image for mentions in dataset.splits.values() for m in mentions if m.image})
    keys = {}
    for relative in tqdm(relatives, desc="hash images", unit="img", disable=not progress or len(relatives) < 1000):
        data = read_image_bytes(dataset.root, relative, report)
        if data is not None:
            keys[relative] = captioner.key(hashlib.sha256(data).hexdigest())
    return keys


def _caption_batch(root: Path, batch: list[tuple[str, str]], captioner: Captioner, tally: Tally) -> dict[str, str]:
    """Captions (cache key -> text) of one batch; unusable images and empty captions are counted in `tally`."""
    images, usable = [], []
    for key, relative in batch:
        data = read_image_bytes(root, relative)
        image = None if data is None else decode_image_bytes(data, relative)
        if image is None:
            tally.add(relative, Failure(UNUSABLE_IMAGE, "cannot be read or decoded"))
        else:
            images.append(image)
            usable.append((key, relative))
    answered = {}
    for (key, relative), outcome in zip(usable, captioner.caption(images) if images else [], strict=True):
        tally.add(relative, outcome)
        if isinstance(outcome, Answer):
            answered[key] = outcome.text
    return answered


def _captioned(mention: Mention, caption: str | None) -> Mention:
    return mention if caption is None else dataclasses.replace(mention, caption=caption)


__all__ = ["DIM_MAX_NEW_TOKENS", "DIM_QUESTION", "KIND", "CaptionRun", "Captioner", "caption_dataset"]
