"""The crash harness, full run: kill -9 each long `mmel` command at each of its stages, rerun it, compare.

    .venv/bin/python bench/crash_runs.py --out bench/results/crash_runs.json [--only "index add,link --input"]

Commands: `mmel features build`, `index build` (a new index, and one replacing an edited index),
`index add`, `index remove`, `index compact` and `link --input`, on a small synthetic dataset
(mmel.data.synthetic) with the shipped MIMIC checkpoint. Each command first runs uninterrupted
with MMEL_CRASH_TRACE, which lists the crash points it passes (`mmel.core.crashpoints`). Then, for
each kill point, a fresh copy of the command's input state gets the command with MMEL_CRASH_AT
(the process SIGKILLs itself there, as `kill -9` would), then the same command again without it,
and the outcome is compared with the uninterrupted run's:
- index commands: the index (`index_snapshot`: QIDs of every part, stored entities, change log,
  cache segments, files, ranked candidates of some test mentions) and no leftovers (`leftovers`);
- `link --input`: the output lines (every mention once, records equal to the uninterrupted ones);
- `features build`: the SHA-256 of every file of the store (the manifest without its time stamp).
Kill points: every passage of every crash point, in the order the uninterrupted run passed them.

Each run is the real command line (`mmel.cli.main`) in a child forked from the harness, whose
imports are done once; `--fresh-processes` starts each in a new `python -m mmel` process instead
(about 10 s more per run on 2 CPU cores). The harness and its children run torch and FAISS on one
thread, as OpenMP thread pools do not survive a fork.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "reliability"))

import faiss  # noqa: E402
import torch  # noqa: E402
from crash_harness import CommandResult, index_snapshot, leftovers, numbered, run_cli  # noqa: E402

from mmel.backbones import load_backbone  # noqa: E402
from mmel.data.synthetic import generate_dataset, generate_kb  # noqa: E402

CHECKPOINT = REPO / "checkpoints" / "mimic-wikimel-minilm_effnet"
NUM_ENTITIES = 48
LINK_MENTIONS = 300          # 2 chunks of `link --input` (256 mentions per chunk)
SNAPSHOT_QUERIES = 6
_RECOVERY = re.compile(r"an interrupted \w+ was|restored |removed leftovers")   # RecoveryReport.summary()


@dataclass
class Row:
    command: str
    stage: str
    killed: bool           # the armed run died by SIGKILL (the stage was reached)
    rerun_ok: bool         # the rerun exited 0
    same: bool             # the rerun's outcome equals the uninterrupted run's
    leftovers: list[str]
    rerun_says: str        # the rerun's report (its last line of standard output)
    recovery: str          # what the rerun's opening of the index said it recovered, if anything


@dataclass
class Scenario:
    command: str
    arguments: Callable[[Path], list[str]]      # the command line, given the case directory
    prepare: Callable[[Path], None]             # put the command's input state into a fresh case directory
    observe: Callable[[Path], Any]              # what must equal the uninterrupted run's
    debris: Callable[[Path], list[str]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--only", default=None, help="comma-separated commands to run (default: all)")
    parser.add_argument("--fresh-processes", action="store_true", help="run each command in a new process")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mmel-crash-runs-"))
    started = time.perf_counter()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    run = functools.partial(run_cli, fresh_process=args.fresh_processes, cwd=REPO)
    inputs = _prepare_inputs(work / "inputs", run)
    scenarios = _scenarios(inputs)
    wanted = None if args.only is None else {name.strip() for name in args.only.split(",")}
    rows: list[Row] = []
    for scenario in scenarios:
        if wanted is None or scenario.command in wanted:
            rows += _run_scenario(scenario, work / re.sub(r"\W+", "-", scenario.command), run)
    result = {"command": " ".join(["python", "bench/crash_runs.py", *sys.argv[1:]]), "machine": _machine(),
              "processes": "fresh python -m mmel" if args.fresh_processes else "forked from the harness",
              "dataset": f"synthetic, {NUM_ENTITIES} entities, {LINK_MENTIONS} test mentions, seed 0",
              "checkpoint": str(CHECKPOINT.relative_to(REPO)), "seconds": round(time.perf_counter() - started),
              "rows": [asdict(row) for row in rows]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(_markdown(rows))
    print(f"\n{len(rows)} kill points, {sum(_passed(r) for r in rows)} passed, in {result['seconds']} s")


def _run_scenario(scenario: Scenario, directory: Path, run: Callable[..., CommandResult]) -> list[Row]:
    shutil.rmtree(directory, ignore_errors=True)
    reference = directory / "uninterrupted"
    scenario.prepare(reference)
    trace = directory / "trace.txt"
    finished = run(scenario.arguments(reference), trace=trace)
    if finished.returncode != 0:
        raise SystemExit(f"{scenario.command} failed uninterrupted:\n{finished.stdout}\n{finished.stderr}")
    expected = scenario.observe(reference)
    rows = []
    for number, stage in enumerate(numbered(trace.read_text().splitlines())):
        case = directory / f"kill-{number:03d}"
        scenario.prepare(case)
        killed = run(scenario.arguments(case), crash_at=stage)
        rerun = run(scenario.arguments(case))
        said = rerun.stdout.strip().splitlines() or [rerun.stderr.strip()]
        recovered = [line for line in rerun.stderr.splitlines() if _RECOVERY.search(line)]
        same = rerun.returncode == 0 and scenario.observe(case) == expected
        rows.append(Row(command=scenario.command, stage=stage, killed=killed.returncode == -9,
                        rerun_ok=rerun.returncode == 0, same=same, leftovers=scenario.debris(case),
                        rerun_says=said[-1], recovery=" ".join(recovered)))
        print(f"{scenario.command:<16} {stage:<60} {'ok' if _passed(rows[-1]) else 'FAILED'}", flush=True)
        shutil.rmtree(case, ignore_errors=True)
    return rows


# --- inputs and scenarios ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Inputs:
    data: Path                # the synthetic dataset (mmel JSONL, rendered images)
    index: Path               # its index, built once
    index_added: Path         # the index after `index add` (dead cache rows for `index compact`)
    additions: Path           # kb.jsonl of the add: new entities and updated ones
    removed: list[str]
    queries: list[tuple[str, str]]


def _prepare_inputs(directory: Path, run: Callable[..., CommandResult]) -> Inputs:
    shutil.rmtree(directory, ignore_errors=True)
    dataset = generate_dataset(NUM_ENTITIES, mentions_per_split={"test": LINK_MENTIONS}, seed=0,
                               out_dir=directory / "data")
    additions = _write_additions(directory / "data" / "additions.jsonl", dataset.kb)
    index = directory / "index"
    _checked(run(["index", "build", "--dataset", str(dataset.root), "--model", str(CHECKPOINT), "--out", str(index),
                  "--quiet"]))
    index_added = directory / "index-added"
    shutil.copytree(index, index_added)
    _checked(run(["index", "add", str(index_added), "--kb", str(additions)]))
    queries = [(m.sentence, m.surface) for m in dataset.split("test") if m.surface in m.sentence][:SNAPSHOT_QUERIES]
    return Inputs(data=dataset.root, index=index, index_added=index_added, additions=additions,
                  removed=[dataset.kb.qids[3], dataset.kb.qids[17]], queries=queries)


def _write_additions(path: Path, kb: Any) -> Path:
    """Three new entities (with images of existing ones) and two changed ones, as a kb.jsonl."""
    new = list(generate_kb(NUM_ENTITIES + 3, seed=0))[NUM_ENTITIES:]
    records = [{"qid": e.qid, "name": e.name, "attributes": e.attributes, "description": e.description,
                "images": list(kb[row].images), "extra": {}} for row, e in enumerate(new)]
    records += [{"qid": e.qid, "name": e.name + " II", "attributes": e.attributes, "description": "Renamed.",
                 "images": list(e.images), "extra": {}} for e in (kb[5], kb[9])]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _scenarios(inputs: Inputs) -> list[Scenario]:
    def copy_index(source: Path) -> Callable[[Path], None]:
        return lambda case: shutil.copytree(source, case / "index")

    backbone = load_backbone("minilm_effnet")   # the checkpoint's; loaded once for every snapshot

    def index_state(case: Path) -> Any:
        return index_snapshot(case / "index", inputs.queries, backbone=backbone)

    def index_debris(case: Path) -> list[str]:
        return leftovers(case / "index")

    def build(case: Path) -> list[str]:
        return ["index", "build", "--dataset", str(inputs.data), "--model", str(CHECKPOINT), "--out",
                str(case / "index"), "--quiet"]

    mentions = inputs.data / "mentions" / "test.jsonl"
    return [
        Scenario("features build", lambda case: ["features", "build", str(inputs.data), "--store", str(case / "store"),
                                                 "--splits", "test"],
                 lambda case: case.mkdir(parents=True), lambda case: _store_checksums(case / "store"),
                 lambda case: _temporaries(case)),
        Scenario("index build", build, lambda case: case.mkdir(parents=True), index_state, index_debris),
        Scenario("index build (replacing an index)", build, copy_index(inputs.index_added), index_state,
                 index_debris),
        Scenario("index add", lambda case: ["index", "add", str(case / "index"), "--kb", str(inputs.additions)],
                 copy_index(inputs.index), index_state, index_debris),
        Scenario("index remove", lambda case: ["index", "remove", str(case / "index"), *inputs.removed],
                 copy_index(inputs.index), index_state, index_debris),
        Scenario("index compact", lambda case: ["index", "compact", str(case / "index")],
                 copy_index(inputs.index_added), index_state, index_debris),
        Scenario("link --input", lambda case: ["link", str(inputs.index), "--input", str(mentions), "--output",
                                               str(case / "linked.jsonl")],
                 lambda case: case.mkdir(parents=True), _link_output, _temporaries),
    ]


def _link_output(case: Path) -> Any:
    """The output records by mention id; a mention written twice (or a torn line) makes it differ."""
    lines = (case / "linked.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    by_id = {record["id"]: record for record in records}
    return {"lines": len(lines), "unique_ids": len(by_id), "records": by_id}


def _store_checksums(store: Path) -> dict[str, str]:
    """SHA-256 of every file of a feature store, view manifests without their creation time."""
    checksums = {}
    for path in sorted(store.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        if path.name == "manifest.json":
            manifest = json.loads(data)
            manifest.pop("created", None)
            data = json.dumps(manifest, sort_keys=True).encode()
        checksums[str(path.relative_to(store))] = hashlib.sha256(data).hexdigest()
    return checksums


def _temporaries(case: Path) -> list[str]:
    return sorted(str(path.relative_to(case)) for path in case.rglob("*")
                  if re.fullmatch(r"\..+\.(?:[a-z0-9_]{8}\.tmp|old)", path.name))


def _checked(result: CommandResult) -> None:
    if result.returncode != 0:
        raise SystemExit(f"preparing the inputs failed:\n{result.stdout}\n{result.stderr}")


def _passed(row: Row) -> bool:
    return row.killed and row.rerun_ok and row.same and not row.leftovers


def _markdown(rows: list[Row]) -> str:
    lines = ["| command | kill point | killed | rerun ok | same as uninterrupted | leftovers | recovery on reopening |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        recovery = row.recovery.split(": ", 1)[-1] if row.recovery else "-"
        lines.append(f"| {row.command} | `{row.stage}` | {_mark(row.killed)} | {_mark(row.rerun_ok)} | "
                     f"{_mark(row.same)} | {', '.join(row.leftovers) or 'none'} | {recovery} |")
    return "\n".join(lines)


def _mark(value: bool) -> str:
    return "yes" if value else "**no**"


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


if __name__ == "__main__":
    main()
