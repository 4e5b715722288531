"""The LinkBatcher with the real tiny-index Linker: a failing query in a joint call is isolated by bisection,
and the server refuses an invalid query before it can join a batch."""

from __future__ import annotations

import asyncio
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

from mmel.retrieval.queries import MentionQuery, QueryError
from mmel.server.app import create_app
from mmel.server.batching import LinkBatcher
from mmel.server.settings import ServerSettings


def test_a_failing_query_in_a_joint_call_is_isolated_by_bisection(shared_linker, tiny_index):
    good = [MentionQuery(sentence=s, mention=m) for s, m, _ in tiny_index.queries[:3]]
    bad = MentionQuery(sentence=good[0].sentence, mention="not in the sentence")

    async def scenario() -> tuple[list, Counter]:
        batcher = LinkBatcher(shared_linker, max_batch=4, max_wait_s=5.0)
        batcher.start()
        try:
            calls = [batcher.link(query, top_k=3, candidates_k=20) for query in [*good, bad]]
            outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout=120)
        finally:
            await batcher.stop()
        return outcomes, batcher.stats.calls_by_size

    outcomes, calls_by_size = asyncio.run(scenario())
    assert isinstance(outcomes[3], QueryError) and "does not occur" in str(outcomes[3])
    for outcome, (_, _, qid) in zip(outcomes[:3], tiny_index.queries[:3], strict=True):
        assert outcome.candidates[0].qid == qid
    # [g g g b] fails; [g g] is linked together, [g b] fails, then [g] and [b] alone: not one call per query
    assert calls_by_size == {2: 1, 1: 1}


def test_an_invalid_query_never_joins_a_batch(shared_linker, tiny_index, serve_app):
    settings = ServerSettings(index_dir=tiny_index.index_dir, max_batch=3, link_batch_wait_ms=5000)
    queries = tiny_index.queries[:3]
    bodies = [{"sentence": s, "mention": m, "top_k": 3} for s, m, _ in queries]
    bodies.insert(1, {"sentence": queries[0][0], "mention": "not in the sentence"})
    with serve_app(create_app(settings, linker=shared_linker)) as url, httpx.Client(base_url=url, timeout=60) as client:
        with ThreadPoolExecutor(max_workers=4) as pool:
            responses = list(pool.map(lambda body: client.post("/link", json=body), bodies))
        assert [r.status_code for r in responses] == [200, 422, 200, 200]
        assert "does not occur" in responses[1].json()["detail"]
        assert [r.json()["candidates"][0]["qid"] for r in [responses[0], *responses[2:]]] == \
            [qid for _, _, qid in queries]
        assert client.get("/health").json()["link_calls_by_batch_size"] == {"3": 1}


@pytest.mark.parametrize("form", [{"top_k": "true"}, {"candidates_k": "1.5"}, {"span_start": "x", "span_end": "3"}])
def test_form_integers_are_parsed_strictly(shared_linker, tiny_index, form):
    sentence, mention, _ = tiny_index.queries[0]
    fields = {"sentence": sentence, **({} if "span_start" in form else {"mention": mention}), **form}
    with TestClient(create_app(ServerSettings(index_dir=tiny_index.index_dir), linker=shared_linker)) as client:
        assert client.post("/link", data=fields).status_code == 422
