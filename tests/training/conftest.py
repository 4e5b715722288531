"""Fixtures of the training tests: a tiny random CLIP and a tiny dataset on disk, for whole runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from mmel.core.types import Dataset, Entity, KnowledgeBase, Mention
from mmel.data import write_dataset

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A randomly initialised CLIP (text 32, vision 48 wide, 32 px images) with a character-level tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-clip")
    characters = list(bytes_to_unicode().values())
    vocab = {token: index for index, token in enumerate(characters + [c + "</w>" for c in characters])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt")).save_pretrained(directory)
    end = vocab["<|endoftext|>"]
    config = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                                     "num_attention_heads": 4, "vocab_size": len(vocab), "max_position_embeddings": 40,
                                     "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": end,
                                     "pad_token_id": end},
                        vision_config={"hidden_size": 48, "intermediate_size": 37, "num_hidden_layers": 1,
                                       "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
                        projection_dim=32)  # = text width, as in OpenAI's CLIPs (MIMIC needs t_cls and t_tok alike)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    """Six entities with coloured images; mentions name their colour; one NIL mention per split."""
    source = tmp_path_factory.mktemp("tiny-source")
    (source / "images").mkdir()
    for colour in COLOURS:
        Image.new("RGB", (40, 40), colour).save(source / "images" / f"{colour}.png")
    entities = [Entity(qid=f"Q{i}", name=f"The {colour} one", attributes=f"Colour: {colour}.",
                       images=(f"images/{colour}.png",) if i % 2 == 0 else ())
                for i, colour in enumerate(COLOURS)]

    def mentions(split: str, repeats: int) -> list[Mention]:
        found = [Mention(id=f"{split}-{k}-{i}", sentence=f"I saw the {colour} thing.", surface=colour,
                         image=f"images/{colour}.png" if k % 2 == 0 else None, gold_qid=f"Q{i}")
                 for k in range(repeats) for i, colour in enumerate(COLOURS)]
        return [*found, Mention(id=f"{split}-nil", sentence="Nothing here.", surface="nothing")]

    dataset = Dataset("tiny", KnowledgeBase(entities), {"train": mentions("train", 2), "dev": mentions("dev", 1)},
                      source)
    return write_dataset(dataset, tmp_path_factory.mktemp("tiny") / "dataset")
