"""What the context prior costs the served linker: the same index, mentions and model, three priors, one run.

The index is built once with the checkpoint's prior; each variant serves the same mentions through
`Linker.rank_features` (first stage, model rerank, prior, tie rule) with its prior set on the loaded
linker: `none` (the model alone), `name` (the name prior of the checkpoint's name_match weight)
and `context` (the checkpoint's fitted context prior). Variants alternate in each repeat (A B C C B A
...), and the report gives the median milliseconds per mention of each and its ratio to `name`.
Mention features are read from the feature store, so query encoding (the same for every variant)
is left out: this is the reranking stage's cost.

    python bench/bench_context_prior.py --index /work/index/wm-ft --dataset /work/data/wikimel \\
        --features /work/features --mentions 500 --repeats 5 --out bench/results/context-prior-wikimel.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from mmel.data import load_dataset
from mmel.experiments.evaluate import SplitToRank, features_for
from mmel.lexical.context_features import NO_PRIOR, ContextPrior
from mmel.retrieval.linker import Linker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--index", type=Path, required=True, help="index built with the checkpoint's context prior")
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--features", type=Path, required=True, help="feature store with the checkpoint's view")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--mentions", type=int, default=1000)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = load_dataset(args.dataset)
    with Linker.load(args.index) as linker:
        fitted = linker.prior
        if not fitted.beyond_name:
            raise SystemExit(f"{args.index} serves no context prior ({fitted.to_dict()}); build it from a checkpoint "
                             "with one (`mmel fit-prior --write`)")
        features = features_for(args.features, dataset, str(linker.spec.directory))
        to_rank = SplitToRank.of(dataset, args.split, features, sample=args.mentions, seed=0)
        priors = {"none": NO_PRIOR, "name": ContextPrior.name_only(fitted.name_weight), "context": fitted}
        order = list(priors) + list(reversed(priors))
        times: dict[str, list[float]] = {name: [] for name in priors}
        for _ in range(args.repeats):
            for name in order:
                linker.manifest["prior"] = priors[name].to_dict()
                started = time.perf_counter()
                linker.rank_features(to_rank.mentions, to_rank.features, top_k=10, candidates_k=args.candidates,
                                     progress=False)
                times[name].append(1000 * (time.perf_counter() - started) / len(to_rank.mentions))
        linker.manifest["prior"] = fitted.to_dict()
    medians = {name: statistics.median(values) for name, values in times.items()}
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                          "load_average": os.getloadavg()},
              "index": str(args.index), "split": to_rank.name, "mentions": len(to_rank.mentions),
              "candidates": args.candidates, "repeats": args.repeats, "ms_per_mention": times,
              "median_ms_per_mention": medians,
              "ratio_to_name_prior": {name: medians[name] / medians["name"] for name in medians}}
    print(json.dumps(report["median_ms_per_mention"]), json.dumps(report["ratio_to_name_prior"]))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
