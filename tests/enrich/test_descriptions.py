"""`mmel enrich descriptions` end to end against a real local chat server: output, cache, failures, kill -9."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from chat_server import ChatServer
from enrich_data import SECRET, make_dataset, tree_digest
from typer.testing import CliRunner

from mmel.cli.main import app
from mmel.data import load_dataset, validate_dataset
from mmel.enrich.prompts import DescriptionPrompt

REPO = Path(__file__).resolve().parents[2]


def describe_args(server: ChatServer, source: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["enrich", "descriptions", str(source), "--out", str(out), "--base-url", server.url, "--model",
            "test-model", "--api-key-env", "MMEL_TEST_KEY", "--cache", str(cache), "--backoff", "0.01",
            "--rps", "1000", "--no-progress", *extra]


def run_cli(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args, env={"MMEL_TEST_KEY": SECRET})
    return result.exit_code, result.output


def test_writes_a_plus_dataset_with_provenance_and_leaves_the_source_alone(
        chat_server: ChatServer, source: Path, tmp_path: Path) -> None:
    before = tree_digest(source)
    code, output = run_cli(describe_args(chat_server, source, tmp_path / "plus", tmp_path / "cache.sqlite"))
    assert code == 0, output
    assert "answered 6, from cache 0, failed 0" in output
    plus = load_dataset(tmp_path / "plus")
    assert plus.name == "tiny+"
    assert [e.description for e in plus.kb] == [f"Entity {i:02d} is a test entity." for i in range(6)]
    assert plus.kb.get("Q0").extra["description_source"]["prompt_sha256"] == DescriptionPrompt().sha256
    assert plus.splits == load_dataset(source).splits
    assert (tmp_path / "plus" / "images" / "red.png").stat().st_ino == (source / "images" / "red.png").stat().st_ino
    provenance = json.loads((tmp_path / "plus" / "enrichment.json").read_text())
    step = provenance["steps"][0]
    assert step["model"] == "test-model" and step["prompt"]["user"] == DescriptionPrompt().user
    assert step["counts"]["answered"] == 6 and step["counts"]["prompt_tokens"] > 0
    assert tree_digest(source) == before
    written = [p.read_bytes() for p in [*(tmp_path / "plus").rglob("*"), tmp_path / "cache.sqlite"] if p.is_file()]
    assert not any(SECRET.encode() in data for data in written) and SECRET not in output
    report = validate_dataset(plus)
    assert report.entities_with_description == 6
    assert "descriptions by test-model" in report.to_markdown()


def test_a_rerun_asks_nothing_and_dry_run_counts_what_is_left(chat_server: ChatServer, source: Path,
                                                               tmp_path: Path) -> None:
    cache = tmp_path / "cache.sqlite"
    code, output = run_cli(describe_args(chat_server, source, tmp_path / "plus", cache, "--dry-run"))
    assert code == 0 and "6 requests would be sent" in output and not (tmp_path / "plus").exists()
    assert run_cli(describe_args(chat_server, source, tmp_path / "plus", cache))[0] == 0
    code, output = run_cli(describe_args(chat_server, source, tmp_path / "plus2", cache))
    assert code == 0 and "answered 0, from cache 6" in output
    assert sum(chat_server.requests.values()) == 6
    assert "0 requests would be sent" in run_cli(describe_args(chat_server, source, tmp_path / "x", cache,
                                                               "--dry-run"))[1]


def test_failures_are_reported_not_stored_and_asked_again(chat_server: ChatServer, source: Path,
                                                          tmp_path: Path) -> None:
    chat_server.script = {"Entity 01": ["malformed"], "Entity 02": ["length"], "Entity 03": ["500"] * 2}
    args = describe_args(chat_server, source, tmp_path / "plus", tmp_path / "cache.sqlite", "--max-attempts", "2")
    code, output = run_cli(args)
    assert code == 1
    assert "failed, malformed JSON response: 1" in output and "failed, server error (HTTP 5xx): 1" in output
    assert "failed, truncated answer (finish_reason=length): 1" in output
    plus = load_dataset(tmp_path / "plus")
    assert plus.kb.get("Q2").description == ""  # never the truncated text
    assert json.loads((tmp_path / "plus" / "enrichment.json").read_text())["steps"][0]["counts"]["failed"] == 3
    code, output = run_cli(args)
    assert code == 0 and "answered 3, from cache 3" in output
    assert all(e.description.endswith("is a test entity.") for e in load_dataset(tmp_path / "plus").kb)


def test_refuses_to_write_into_the_source(chat_server: ChatServer, source: Path, tmp_path: Path) -> None:
    code, output = run_cli(describe_args(chat_server, source, source / "plus", tmp_path / "cache.sqlite"))
    assert code == 1 and "outside the source dataset" in output


def test_a_prompt_file_changes_the_prompt_and_the_cache_key(chat_server: ChatServer, source: Path,
                                                            tmp_path: Path) -> None:
    prompt = tmp_path / "prompt.yaml"
    prompt.write_text("user: 'Name: {name}\\nTell me about {name} ({qid}); known: {known}'\nmax_tokens: 40\n")
    cache = tmp_path / "cache.sqlite"
    assert run_cli(describe_args(chat_server, source, tmp_path / "a", cache))[0] == 0
    code, output = run_cli(describe_args(chat_server, source, tmp_path / "b", cache, "--prompt", str(prompt)))
    assert code == 0 and "answered 6, from cache 0" in output
    bad = tmp_path / "bad.yaml"
    bad.write_text("user: 'About {entity}'\n")
    code, output = run_cli(describe_args(chat_server, source, tmp_path / "c", cache, "--prompt", str(bad)))
    assert code == 1 and "unknown placeholder(s) entity" in output


def test_kill_9_halfway_then_rerun_asks_each_finished_entity_once(chat_server: ChatServer, tmp_path: Path) -> None:
    source = make_dataset(tmp_path / "src", entities=40)
    chat_server.delay_s = 0.05
    cache, out = tmp_path / "cache.sqlite", tmp_path / "plus"
    command = [sys.executable, "-m", "mmel", *describe_args(chat_server, source, out, cache, "--concurrency", "2")]
    env = {**os.environ, "MMEL_TEST_KEY": SECRET}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while sum(chat_server.completed.values()) < 15 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
        assert process.poll() is None, "the run ended before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=30)
    assert not out.exists()
    with sqlite3.connect(cache) as connection:
        finished = {json.loads(row[0])["qid"] for row in connection.execute("SELECT provenance FROM answers")}
    assert 10 <= len(finished) < 40
    first_requests = dict(chat_server.requests)

    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"answered {40 - len(finished)}, from cache {len(finished)}" in rerun.stdout
    plus = load_dataset(out)
    assert all(e.description == f"{e.name} is a test entity." for e in plus.kb)
    names = {e.qid: e.name for e in plus.kb}
    assert all(chat_server.requests[names[qid]] == 1 for qid in finished)  # never asked again
    repeated = [name for name, count in chat_server.requests.items() if count > 1]
    assert len(repeated) <= 4 and all(first_requests.get(name) == 1 for name in repeated)  # only those in flight
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.sqlite", "plus", "src", "src-images"]


@pytest.mark.parametrize("missing", ["--model", "--local-model"])
def test_says_what_to_pass_without_a_model(source: Path, tmp_path: Path, missing: str) -> None:
    args = ["enrich", "descriptions", str(source), "--out", str(tmp_path / "plus"), "--cache",
            str(tmp_path / "c.sqlite")]
    if missing == "--local-model":
        args += ["--local-model", str(tmp_path / "no-model")]
    code, output = run_cli(args)
    assert code == 1 and missing in output
