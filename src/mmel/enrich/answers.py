"""What one generation request ends with: an answer, or a failure with a reason that is counted.

A failure is never stored as a description: malformed, empty or truncated answers are counted by
reason and reported, and the entity is asked again on the next run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

TRUNCATED = "truncated answer (finish_reason=length)"
EMPTY = "empty answer"
MALFORMED_JSON = "malformed JSON response"
MISSING_CONTENT = "response without message content"


@dataclass(frozen=True)
class Answer:
    """A usable answer, with the token counts the server reported (0 when it reported none)."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Failure:
    """No usable answer; `reason` is one of the constants above or a transport/HTTP reason."""

    reason: str
    detail: str = ""


Outcome = Answer | Failure


@dataclass
class Tally:
    """Counts of a run: answered now, taken from the cache, failed by reason (with examples)."""

    answered: int = 0
    cached: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    failure_examples: dict[str, list[str]] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, item: str, outcome: Outcome) -> None:
        if isinstance(outcome, Answer):
            self.answered += 1
            self.prompt_tokens += outcome.prompt_tokens
            self.completion_tokens += outcome.completion_tokens
            return
        self.failed[outcome.reason] += 1
        examples = self.failure_examples.setdefault(outcome.reason, [])
        if len(examples) < 5:
            examples.append(f"{item}: {outcome.detail}" if outcome.detail else item)

    def to_dict(self) -> dict[str, object]:
        return {"answered": self.answered, "cached": self.cached, "failed": sum(self.failed.values()),
                "failed_by_reason": dict(self.failed), "failure_examples": self.failure_examples,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}

    def summary(self) -> str:
        lines = [f"answered {self.answered:,}, from cache {self.cached:,}, failed {sum(self.failed.values()):,}"]
        if self.prompt_tokens or self.completion_tokens:
            lines.append(f"tokens reported: {self.prompt_tokens:,} prompt + {self.completion_tokens:,} completion")
        for reason, count in self.failed.most_common():
            lines.append(f"  failed, {reason}: {count:,} (e.g. {'; '.join(self.failure_examples[reason][:3])})")
        return "\n".join(lines)


def clean_answer(text: object, truncated: bool) -> Outcome:
    """An `Answer` from generated text, or the `Failure` that explains why it is unusable."""
    if not isinstance(text, str):
        return Failure(MISSING_CONTENT, f"content is {type(text).__name__}")
    if truncated:
        return Failure(TRUNCATED, f"{len(text)} characters before the cut")
    if not text.strip():
        return Failure(EMPTY)
    return Answer(text.strip())


__all__ = ["EMPTY", "MALFORMED_JSON", "MISSING_CONTENT", "TRUNCATED", "Answer", "Failure", "Outcome", "Tally",
           "clean_answer"]
