"""`mmel fit-prior`: fit the context prior's weights on a dev split, as the served linker will apply them.

The split is linked once through the served linker with the model alone (`link_split_once`), keeping
each mention's K reranked candidates and their model scores. Each candidate gets the context
features of `mmel.lexical.context_features`, and a conditional logit (a softmax over each mention's K
candidates, the gold as the target) fits one weight for the model's score and one per feature:

    P(e | m) = softmax_e( a * model(m, e) + sum_f b_f * f(m, e) )

The served prior is `b_f / a` (the model's score keeps weight 1, so a name-only fit is a name prior).
Mentions whose gold the first stage missed cannot move and are left out of the fit (they are
counted in every reported metric). The fit is checked by k-fold cross-validation on the same split:
each fold is ranked with weights fitted on the others, through the linker's tie rule, against the
model alone and the name prior fitted the same way.

Shapes: M mentions, K candidates, F features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmel.core.errors import UsageError
from mmel.core.types import Dataset, LinkResult
from mmel.experiments.evaluate import link_split_once, ranking_from_links, shortlist_features, with_prior_added
from mmel.features.views import DatasetFeatures
from mmel.lexical.context_features import FEATURE_NAMES, NO_PRIOR, ContextPrior

L2_PENALTY = 1e-3   # on the feature weights: keeps a feature that never fires at 0


@dataclass
class PriorFit:
    """Fitted prior weights and the cross-validated ranking metrics that justify them."""

    checkpoint: str
    split: str
    mentions: int
    fitted_on: int                            # mentions whose gold is among the K candidates
    first_stage: str
    candidates: int
    folds: int
    weights: dict[str, float]                 # feature -> weight, relative to the model's score
    model_weight: float                       # a: the conditional logit's weight of the model's score
    cross_validated: dict[str, dict[str, float]]   # 'model alone' / 'name prior' / 'context prior' -> metrics

    @property
    def prior(self) -> ContextPrior:
        return ContextPrior(self.weights)

    def to_markdown(self) -> str:
        lines = [f"Context prior for {self.checkpoint} on {self.split} ({self.mentions} mentions, {self.fitted_on} "
                 f"with the gold among the {self.first_stage} top {self.candidates}), {self.folds}-fold "
                 "cross-validated, full KB, ties against the gold", "",
                 "| ranking | H@1 | H@3 | H@10 | MRR |", "|---|---:|---:|---:|---:|"]
        for name, values in self.cross_validated.items():
            lines.append(f"| {name} | {100 * values['hits@1']:.2f} | {100 * values['hits@3']:.2f} | "
                         f"{100 * values['hits@10']:.2f} | {100 * values['mrr']:.2f} |")
        lines += ["", "Weights fitted on the whole split (the model's score has weight 1):", "",
                  "| feature | weight |", "|---|---:|"]
        lines += [f"| {name} | {weight:.4g} |" for name, weight in self.weights.items()]
        return "\n".join(lines) + "\n"


def fit_weights(model_scores: Sequence[Sequence[float]], features: Sequence[Sequence[Sequence[float]]],
                gold: Sequence[int], feature_names: Sequence[str]) -> tuple[float, dict[str, float]]:
    """The conditional logit's model weight a and the prior `b_f / a` for `feature_names`.

    `model_scores` [M][K], `features` [M][K][F] (FEATURE_NAMES order), `gold` [M]: the gold's position
    among the K candidates, -1 when it is not there (left out). Shortlists may differ in length.
    """
    kept = [i for i, position in enumerate(gold) if position >= 0]
    if not kept:
        raise UsageError("no mention has its gold among its candidates: nothing to fit the prior on")
    columns = [FEATURE_NAMES.index(name) for name in feature_names]
    width = max(len(model_scores[i]) for i in kept)
    inputs = torch.zeros((len(kept), width, 1 + len(columns)), dtype=torch.float64)          # [M', K, 1 + F']
    padding = torch.ones((len(kept), width), dtype=torch.bool)
    for row, i in enumerate(kept):
        count = len(model_scores[i])
        inputs[row, :count, 0] = torch.tensor(model_scores[i], dtype=torch.float64)
        if columns:
            inputs[row, :count, 1:] = torch.tensor(features[i], dtype=torch.float64)[:, columns]
        padding[row, :count] = False
    targets = torch.tensor([gold[i] for i in kept])
    weights = torch.zeros(1 + len(columns), dtype=torch.float64)
    weights[0] = 1.0
    weights.requires_grad_(True)
    optimizer = torch.optim.LBFGS([weights], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = (inputs @ weights).masked_fill(padding, float("-inf"))                        # [M', K]
        loss = torch.nn.functional.cross_entropy(logits, targets) + L2_PENALTY * (weights[1:] ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    fitted = weights.detach()
    model_weight = float(fitted[0])
    if model_weight <= 0:
        raise UsageError(f"the fit gave the model's score weight {model_weight:.4g} <= 0: the model ranks this split "
                         "no better than chance, so no prior relative to it exists")
    return model_weight, {name: float(fitted[1 + j] / model_weight) for j, name in enumerate(feature_names)}


def _gold_positions(linked: Sequence[LinkResult]) -> list[int]:
    positions = []
    for result in linked:
        qids = [candidate.qid for candidate in result.candidates]
        gold = result.mention.gold_qid
        positions.append(qids.index(gold) if gold in qids else -1)
    return positions


def fit_context_prior(dataset: Dataset, split: str, checkpoint: Path, features: DatasetFeatures, *,
                      feature_names: Sequence[str] = FEATURE_NAMES, first_stage: str = "hybrid",
                      num_candidates: int = 100, folds: int = 5, seed: int = 0, ablation: bool = False,
                      progress: bool = True) -> PriorFit:
    """Fit the prior on `split` (never the test split you report) and cross-validate it there (module doc).

    With `ablation`, the report also cross-validates the prior without each of its features in turn.
    """
    unknown = sorted(set(feature_names) - set(FEATURE_NAMES))
    if unknown or not feature_names:
        raise UsageError(f"unknown or no features {unknown or '(none)'}; known: {', '.join(FEATURE_NAMES)}")
    if folds < 2:
        raise UsageError(f"cross-validation needs at least 2 folds, got {folds}")
    to_rank, linked = link_split_once(dataset, split, checkpoint, features, first_stage=first_stage,
                                      num_candidates=num_candidates, progress=progress)
    values = shortlist_features(linked, dataset)                                                # [M][K][F]
    scores = [[candidate.score for candidate in result.candidates] for result in linked]        # [M][K]
    gold = _gold_positions(linked)
    fold_of = np.random.default_rng(seed).permutation(len(linked)) % folds

    def cross_validated(names: Sequence[str]) -> dict[str, float]:
        reranked: list[LinkResult | None] = [None] * len(linked)
        for fold in range(folds):
            train = [i for i in range(len(linked)) if fold_of[i] != fold]
            _, weights = fit_weights([scores[i] for i in train], [values[i] for i in train],
                                     [gold[i] for i in train], names)
            held_out = [i for i in range(len(linked)) if fold_of[i] == fold]
            for i, result in zip(held_out, with_prior_added([linked[i] for i in held_out],
                                                           [values[i] for i in held_out], ContextPrior(weights)),
                                 strict=True):
                reranked[i] = result
        return ranking_from_links(reranked, to_rank.gold_rows, dataset.kb.qids).metrics()

    report = {"model alone": ranking_from_links(with_prior_added(linked, values, NO_PRIOR), to_rank.gold_rows,
                                                dataset.kb.qids).metrics(),
              "name prior (fitted)": cross_validated(["name_match"]),
              "context prior (fitted)": cross_validated(list(feature_names))}
    if ablation and len(feature_names) > 1:
        for left_out in feature_names:
            report[f"context prior without {left_out}"] = cross_validated(
                [name for name in feature_names if name != left_out])
    model_weight, weights = fit_weights(scores, values, gold, list(feature_names))
    return PriorFit(checkpoint=str(checkpoint), split=to_rank.name, mentions=len(linked),
                    fitted_on=sum(position >= 0 for position in gold), first_stage=first_stage,
                    candidates=num_candidates, folds=folds, weights=weights, model_weight=model_weight,
                    cross_validated=report)


__all__ = ["PriorFit", "fit_context_prior", "fit_weights"]
