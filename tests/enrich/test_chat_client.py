"""The real chat-completions client against a real local server that misbehaves on purpose."""

from __future__ import annotations

import time

import pytest
from chat_server import ChatServer
from enrich_data import SECRET

from mmel.enrich.answers import EMPTY, MALFORMED_JSON, MISSING_CONTENT, TRUNCATED, Answer, Failure, Outcome
from mmel.enrich.chat_client import ChatClient, ClientSettings, EndpointError, retry_after_seconds

FAST = ClientSettings(concurrency=4, requests_per_second=1000, timeout_s=5, max_attempts=3, backoff_s=0.01)


def ask(server: ChatServer, names: list[str], settings: ClientSettings = FAST,
        api_key: str | None = None) -> dict[str, Outcome]:
    client = ChatClient(server.url, "test-model", api_key, settings, max_tokens=50, temperature=0.0)
    outcomes: dict[str, Outcome] = {}
    jobs = [(name, [{"role": "user", "content": f"Name: {name}\nWho?"}]) for name in names]
    client.run(jobs, lambda item, outcome: outcomes.__setitem__(item, outcome))
    return outcomes


def test_answers_carry_text_and_the_server_token_counts(chat_server: ChatServer) -> None:
    outcomes = ask(chat_server, ["Alpha", "Beta"], api_key=SECRET)
    assert outcomes["Alpha"] == Answer("Alpha is a test entity.", prompt_tokens=3, completion_tokens=5)
    assert chat_server.authorizations == [f"Bearer {SECRET}"] * 2


def test_429_500_and_a_cut_body_are_retried(chat_server: ChatServer) -> None:
    chat_server.script = {"Alpha": ["429", "500"], "Beta": ["cut"]}
    outcomes = ask(chat_server, ["Alpha", "Beta"])
    assert isinstance(outcomes["Alpha"], Answer) and isinstance(outcomes["Beta"], Answer)
    assert chat_server.requests == {"Alpha": 3, "Beta": 2}


def test_retry_after_is_honoured(chat_server: ChatServer) -> None:
    chat_server.script = {"Alpha": ["429"]}
    chat_server.retry_after = "1"
    started = time.monotonic()
    assert isinstance(ask(chat_server, ["Alpha"])["Alpha"], Answer)
    assert time.monotonic() - started >= 0.95


def test_a_timeout_is_retried_and_gives_up_after_max_attempts(chat_server: ChatServer) -> None:
    chat_server.slow_s = 0.6
    chat_server.script = {"Alpha": ["slow"], "Beta": ["slow", "slow", "slow"]}
    settings = ClientSettings(concurrency=2, requests_per_second=1000, timeout_s=0.3, max_attempts=3, backoff_s=0.01)
    outcomes = ask(chat_server, ["Alpha", "Beta"], settings)
    assert isinstance(outcomes["Alpha"], Answer)
    assert isinstance(outcomes["Beta"], Failure) and outcomes["Beta"].reason == "timeout"
    assert chat_server.requests["Beta"] == 3


def test_persistent_rate_limiting_is_a_counted_failure(chat_server: ChatServer) -> None:
    chat_server.script = {"Alpha": ["429"] * 3}
    outcome = ask(chat_server, ["Alpha"])["Alpha"]
    assert outcome == Failure("rate limited (HTTP 429)", "HTTP 429, 3 attempts")


@pytest.mark.parametrize(("action", "reason"), [("malformed", MALFORMED_JSON), ("length", TRUNCATED),
                                                ("empty", EMPTY), ("no_content", MISSING_CONTENT)])
def test_unusable_answers_are_failures_not_retried(chat_server: ChatServer, action: str, reason: str) -> None:
    chat_server.script = {"Alpha": [action]}
    outcome = ask(chat_server, ["Alpha"])["Alpha"]
    assert isinstance(outcome, Failure) and outcome.reason == reason
    assert chat_server.requests["Alpha"] == 1


def test_a_refused_key_stops_the_run_without_showing_the_key(chat_server: ChatServer) -> None:
    chat_server.default_action = "401"
    with pytest.raises(EndpointError, match="HTTP 401") as error:
        ask(chat_server, ["Alpha", "Beta", "Gamma"], api_key=SECRET)
    assert SECRET not in str(error.value)


def test_concurrency_and_rate_are_bounded(chat_server: ChatServer) -> None:
    chat_server.delay_s = 0.05
    names = [f"E{i}" for i in range(12)]
    settings = ClientSettings(concurrency=3, requests_per_second=40, timeout_s=5, max_attempts=1)
    started = time.monotonic()
    outcomes = ask(chat_server, names, settings)
    assert all(isinstance(outcome, Answer) for outcome in outcomes.values())
    assert chat_server.max_in_flight <= 3
    assert time.monotonic() - started >= 11 / 40 - 0.02  # 12 starts, 1/40 s apart


def test_retry_after_reads_seconds_and_dates_and_is_capped() -> None:
    assert retry_after_seconds("2", 60) == 2.0
    assert retry_after_seconds("120", 60) == 60
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", 60) == 0.0  # in the past
    assert retry_after_seconds("soon", 60) is None and retry_after_seconds(None, 60) is None
