"""Entity descriptions from a local Hugging Face causal LM, for users without an LLM server.

The same prompt as the HTTP path goes through the tokenizer's chat template when it has one (a
plain "system, blank line, user" text otherwise). An answer that uses up `max_tokens` without an
end-of-sequence token is truncated and counted as such, as `finish_reason: length` is on a server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmel.enrich.answers import Answer, Outcome, clean_answer
from mmel.enrich.local_models import check_model_dir, model_fingerprint, pick_device

Messages = list[dict[str, str]]


class LocalChatModel:
    """A causal LM loaded from a local directory, answering one prompt at a time (greedy unless temperature > 0)."""

    def __init__(self, path: Path, *, max_tokens: int, temperature: float, device: str | None = None):
        path = check_model_dir(path, "--local-model", "Qwen/Qwen2.5-1.5B-Instruct")
        self.name = model_fingerprint(path)
        self.device = pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(self.device).eval()
        self.max_tokens = max_tokens
        self.temperature = temperature

    def run(self, jobs: Sequence[tuple[str, Messages]], on_outcome: Callable[[str, Outcome], None]) -> None:
        """Answer every (item id, messages) job; `on_outcome` sees each result as it is made."""
        for item, messages in jobs:
            on_outcome(item, self.answer(messages))

    @torch.inference_mode()
    def answer(self, messages: Messages) -> Outcome:
        encoded = self.tokenizer(self._prompt_text(messages), return_tensors="pt").to(self.device)
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {
            "do_sample": False}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        output = self.model.generate(**encoded, max_new_tokens=self.max_tokens, pad_token_id=pad, **sampling)
        new_tokens = output[0, encoded["input_ids"].shape[1]:].tolist()
        ended = self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id in new_tokens
        truncated = len(new_tokens) >= self.max_tokens and not ended
        outcome = clean_answer(self.tokenizer.decode(new_tokens, skip_special_tokens=True), truncated)
        if isinstance(outcome, Answer):
            return Answer(outcome.text, encoded["input_ids"].shape[1], len(new_tokens))
        return outcome

    def _prompt_text(self, messages: Messages) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "\n\n".join(message["content"] for message in messages) + "\n"


__all__ = ["LocalChatModel"]
