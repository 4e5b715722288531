"""The local paths end to end: descriptions from a tiny GPT-2 directory, captions from a tiny BLIP-2 directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import save_tiny_blip2, save_tiny_gpt2
from typer.testing import CliRunner

from mmel.cli.main import app
from mmel.data import load_dataset, read_mentions_jsonl, validate_dataset
from mmel.enrich.captions import DIM_QUESTION


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    save_tiny_gpt2(root / "gpt2")
    save_tiny_gpt2(root / "gpt2-loop", loop=True)
    save_tiny_blip2(root / "blip2")
    return root


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [*args, "--no-progress"])
    return result.exit_code, result.output


def test_local_llm_describes_then_blip2_captions_the_plus_dataset(models: Path, source: Path,
                                                                   tmp_path: Path) -> None:
    cache = str(tmp_path / "cache.sqlite")
    code, output = run_cli("enrich", "descriptions", str(source), "--out", str(tmp_path / "plus"),
                           "--local-model", str(models / "gpt2"), "--cache", cache, "--device", "cpu")
    assert code == 0, output
    assert {e.description for e in load_dataset(tmp_path / "plus").kb} == {"famous singer"}

    code, output = run_cli("enrich", "captions", str(tmp_path / "plus"), "--out", str(tmp_path / "captioned"),
                           "--model", str(models / "blip2"), "--cache", cache, "--batch-size", "1")
    assert code == 0, output
    assert "answered 2, from cache 0, failed 0" in output and "1 missing" in output
    captioned = load_dataset(tmp_path / "captioned")
    by_id = {m.id: m for m in captioned.split("test")}
    assert by_id["m1"].caption and by_id["m2"].caption and by_id["m3"].caption is None and by_id["m4"].caption is None
    assert {e.description for e in captioned.kb} == {"famous singer"}
    steps = json.loads((tmp_path / "captioned" / "enrichment.json").read_text())["steps"]
    assert [s["step"] for s in steps] == ["descriptions", "captions"]
    assert steps[1]["prompt"] == DIM_QUESTION and steps[1]["max_new_tokens"] == 20
    report = validate_dataset(captioned)
    assert report.mentions_with_caption == {"test": 2} and len(report.enrichment) == 2

    code, output = run_cli("enrich", "captions", str(tmp_path / "plus"), "--out", str(tmp_path / "again"),
                           "--model", str(models / "blip2"), "--cache", cache)
    assert code == 0 and "answered 0, from cache 2" in output
    assert load_dataset(tmp_path / "again").splits == captioned.splits


def test_a_local_answer_cut_at_max_tokens_is_a_failure(models: Path, source: Path, tmp_path: Path) -> None:
    prompt = tmp_path / "prompt.yaml"
    prompt.write_text("max_tokens: 6\n")
    code, output = run_cli("enrich", "descriptions", str(source), "--out", str(tmp_path / "plus"),
                           "--local-model", str(models / "gpt2-loop"), "--prompt", str(prompt),
                           "--cache", str(tmp_path / "cache.sqlite"), "--device", "cpu")
    assert code == 1 and "failed, truncated answer (finish_reason=length): 6" in output
    assert all(e.description == "" for e in load_dataset(tmp_path / "plus").kb)


def test_captions_say_what_to_pass_without_weights(source: Path, tmp_path: Path) -> None:
    code, output = run_cli("enrich", "captions", str(source), "--out", str(tmp_path / "c"))
    assert code == 1 and "--model DIR" in output and "blip2-opt-2.7b" in output
    code, output = run_cli("enrich", "captions", str(source), "--out", str(tmp_path / "c"), "--model",
                           str(tmp_path / "nothing-here"))
    assert code == 1 and "config.json not found" in output and "never downloads" in output


def test_caption_field_round_trips_and_old_files_still_read(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "sentence": "x y", "surface": "x"}\n'
                    '{"id": "b", "sentence": "x y", "surface": "y", "caption": "a man"}\n')
    old, new = read_mentions_jsonl(path)
    assert old.caption is None and new.caption == "a man"
