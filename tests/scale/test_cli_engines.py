"""--engine: local runs never import Ray; --engine ray starts a Ray inside the command and stops it after."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mention_data import query_records, write_jsonl

from mmel.backbones.clip import create_random_clip
from mmel.data.synthetic import generate_dataset

# Runs `mmel` commands in one fresh interpreter, then reports which of the given modules were imported.
RUN_COMMANDS = textwrap.dedent("""
    import json, sys
    from typer.testing import CliRunner
    from mmel.cli.main import app
    outputs = []
    for arguments in json.loads(sys.argv[1]):
        result = CliRunner().invoke(app, arguments, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
    imported = [name for name in json.loads(sys.argv[2]) if name in sys.modules]
    print(json.dumps({"outputs": outputs, "imported": imported}))
""")


def run_commands(commands: list[list[str]], watched: list[str], timeout_s: float = 300) -> dict:
    """The commands' outputs, the watched modules they imported, and the interpreter's pid."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith("MMEL_CRASH")}
    with subprocess.Popen([sys.executable, "-c", RUN_COMMANDS, json.dumps(commands), json.dumps(watched)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment) as process:
        stdout, stderr = process.communicate(timeout=timeout_s)
    assert process.returncode == 0, stderr[-3000:]
    return {**json.loads(stdout.strip().splitlines()[-1]), "pid": process.pid}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_index) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("cli-engines")
    generate_dataset(24, mentions_per_split={"test": 8}, seed=5, out_dir=base / "data", image_size=32)
    return {"base": base, "data": base / "data", "clip": create_random_clip(base / "clip", seed=0),
            "index": tiny_index.index_dir, "mentions": write_jsonl(base / "mentions.jsonl",
                                                                  query_records(tiny_index.queries))}


def commands(inputs: dict[str, Path], tag: str, engine: list[str]) -> list[list[str]]:
    base = inputs["base"]
    return [["features", "build", str(inputs["data"]), "--store", str(base / f"store-{tag}"), "--backbone", "clip",
             "--clip-path", str(inputs["clip"]), "--dtype", "float32", "--shard-size", "8", "--threads", "1",
             *engine],
            ["link", str(inputs["index"]), "--input", str(inputs["mentions"]), "--output",
             str(base / f"links-{tag}.jsonl"), "--top-k", "3", "--chunk-size", "4", *engine]]


def test_local_commands_never_import_ray(inputs) -> None:
    report = run_commands(commands(inputs, "local", []), ["ray", "mmel.scale", "pyarrow"])
    assert report["imported"] == []
    assert "1 local worker(s)" in report["outputs"][0]
    assert "10 linked, 0 already done, 1 failed" in report["outputs"][1]


@pytest.mark.ray
@pytest.mark.xdist_group("ray")
def test_engine_ray_starts_a_ray_inside_the_command_and_stops_it(inputs) -> None:
    """`features build --engine ray` without --ray-address: its own Ray, stopped and removed after; same store."""
    base = inputs["base"]
    if not (base / "store-local").exists():
        run_commands(commands(inputs, "local", [])[:1], [])
    report = run_commands(commands(inputs, "ray", ["--engine", "ray", "--workers", "2"])[:1], ["ray"])
    assert report["imported"] == ["ray"]
    assert "2 ray worker(s)" in report["outputs"][0]
    assert not list(Path("/tmp").glob(f"mmel-ray-*/session_*_{report['pid']}"))   # its Ray's files are gone
    local_store, ray_store = base / "store-local", base / "store-ray"
    local_files = sorted(p.relative_to(local_store) for p in (local_store / "cache").rglob("*") if p.is_file())
    assert local_files == sorted(p.relative_to(ray_store) for p in (ray_store / "cache").rglob("*") if p.is_file())
    assert all((local_store / name).read_bytes() == (ray_store / name).read_bytes() for name in local_files)
