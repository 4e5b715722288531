"""Tiny Hugging Face models built offline for the enrichment tests: a BLIP-2 and a GPT-2, no downloads.

Tokenizers are word-level `tokenizers` models over a small vocabulary (unknown words map to
<unk>), wrapped in `PreTrainedTokenizerFast`. The GPT-2 is not random: its weights are set so that
greedy decoding answers "famous singer" and then ends (or, with `loop=True`, repeats it
forever, to exercise truncation). The BLIP-2 is randomly initialised with a fixed seed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessor,
    GPT2Config,
    GPT2LMHeadModel,
    OPTConfig,
    PreTrainedTokenizerFast,
)

WORDS = ["question", ":", "who", "are", "the", "characters", "in", "picture", "?", "answer", "a", "man", "woman",
         "red", "blue", "famous", "singer", "entity", "is", "name", "test"]


def word_tokenizer(specials: list[str], **special_tokens: str) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer: `specials` first (ids 0, 1, ...), then WORDS."""
    vocab = {word: i for i, word in enumerate([*specials, *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", **special_tokens)


def save_tiny_gpt2(path: Path, *, loop: bool = False) -> Path:
    """A one-layer GPT-2 whose greedy answer to any prompt is "famous singer" + end (or repeats it forever)."""
    tokenizer = word_tokenizer(["<eos>", "<unk>"], eos_token="<eos>", pad_token="<eos>")
    size = len(tokenizer)
    config = GPT2Config(vocab_size=size, n_embd=size, n_layer=1, n_head=1, n_positions=512, bos_token_id=0,
                        eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    model = GPT2LMHeadModel(config).eval()
    famous, singer = tokenizer.convert_tokens_to_ids(["famous", "singer"])
    following = {famous: singer, singer: famous if loop else 0}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.transformer.wte.weight.copy_(torch.eye(size))  # one-hot embeddings, no positions
        model.transformer.ln_f.weight.fill_(1.0)  # the block adds nothing (zero projections)
        for token in range(size):  # the LM head maps each token to the one that follows it
            model.lm_head.weight[following.get(token, famous), token] = 10.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_blip2(path: Path) -> Path:
    """A randomly initialised (seeded) BLIP-2 with an OPT language model, and its processor."""
    tokenizer = word_tokenizer(["<pad>", "<unk>", "</s>", "<s>", "<image>"], pad_token="<pad>", eos_token="</s>",
                               bos_token="<s>")
    text = OPTConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                     num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16, pad_token_id=0,
                     bos_token_id=3, eos_token_id=2)
    config = Blip2Config(vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                        "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
                         qformer_config={"vocab_size": 30, "hidden_size": 16, "num_hidden_layers": 1,
                                         "num_attention_heads": 2, "intermediate_size": 32,
                                         "encoder_hidden_size": 16},
                         text_config=text.to_dict(), num_query_tokens=2, image_token_index=4)
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).save_pretrained(path)
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, num_query_tokens=2)
    processor.save_pretrained(path)
    return path
