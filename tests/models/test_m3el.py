"""M3EL: equivalence with a reference written from models.md §3, both scoring paths, options, quirks, persistence."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from model_inputs import CLIP_DIMS, ReferenceWeights, random_features, randomise

from mmel.core.config import ConfigError
from mmel.core.features import FeatureBatch, FeatureViews
from mmel.models import MODELS, load_model
from mmel.models.m3el import M3ELConfig, M3ELModel

SMALL_DIMS = {"text_dim": 24, "image_global_dim": 20, "image_patch_dim": 28}
RELEASE = {"mask_missing_images": False, "exclude_duplicate_negatives": False}
TEMPERATURES = (2.0, 2.5, 3.5, 4.5, 99.0)
# (bidirectional, release_single_key_cmn_branch): the four CMN variants every scoring test covers
CMN_VARIANTS = [(False, True), (False, False), (True, True), (True, False)]
CMN_IDS = ["t2v-release", "t2v-fixed", "bidirectional-release", "bidirectional-fixed"]


random_features = functools.partial(random_features, dtype=torch.float64)   # float64: references at 1e-5


def randomised_model(dims: dict[str, int], *, seed: int = 0, dtype: torch.dtype = torch.float64,
                     **options: object) -> M3ELModel:
    return randomise(M3ELModel(M3ELConfig(**dims, **options)), seed=seed, dtype=dtype)


# --- a plain reference, written directly from the equations of models.md §3.4-3.8 ---------------


class Reference(ReferenceWeights):
    """M3EL from the spec, one pair / one row at a time where the spec indexes, sharing only the weights."""

    def __init__(self, weights: dict[str, torch.Tensor], *, release_single_key: bool, hidden: int = 96):
        super().__init__(weights)
        self.release_single_key = release_single_key
        self.hidden = hidden

    def prenormalised(self, batch: FeatureBatch) -> tuple[torch.Tensor, ...]:  # §3.4
        t_cls = self.layer_norm(batch.text_global, "text_cls_layernorm")
        t_tok = self.layer_norm(batch.text_tokens, "text_tokens_layernorm")
        v_cls = self.layer_norm(self.linear(batch.image_global, "image_cls_fc"), "image_cls_layernorm")
        v_tok = self.layer_norm(self.linear(batch.image_patches, "image_tokens_fc"), "image_tokens_layernorm")
        return t_cls, t_tok, v_cls, v_tok

    def intra_modal(self, unit: str, cls_m, tok_m, cls_e, tok_e) -> torch.Tensor:  # §3.5, TIMM / IIMM
        s_g2l = torch.zeros(len(cls_m), len(cls_e), dtype=cls_m.dtype)
        for n in range(len(cls_e)):
            query = self.linear(tok_e[n], f"{unit}.fc_query")
            for b in range(len(cls_m)):
                key, value = self.linear(tok_m[b], f"{unit}.fc_key"), self.linear(tok_m[b], f"{unit}.fc_value")
                attention = torch.softmax(query @ key.T / math.sqrt(self.hidden), dim=-1)
                context = self.layer_norm((attention @ value).mean(dim=0), f"{unit}.layer_norm")
                s_g2l[b, n] = self.linear(cls_e[n], f"{unit}.fc_cls") @ context
        return (s_g2l + cls_m @ cls_e.T) / 2

    def match_module(self, unit: str, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # §3.6 MatchModule
        logits = p @ self.linear(q, f"{unit}.match_module.trans_linear").transpose(1, 2)   # [X, Lp, Lq]
        if q.shape[1] == 1 and not self.release_single_key:   # mmel's fix: over the p axis, mean weight 1
            attention = torch.softmax(logits, dim=1) * p.shape[1]
        else:
            attention = torch.softmax(logits, dim=-1)
        return torch.relu(self.linear(attention @ q, f"{unit}.match_module.trans_linear"))

    @staticmethod
    def multi_head(x: torch.Tensor) -> torch.Tensor:  # §3.6 CSRA heads, λ = 1
        total = torch.zeros(x.shape[0], x.shape[2], dtype=x.dtype)
        for temperature in TEMPERATURES:
            base = x.mean(dim=1)
            if temperature == 99:
                attended = x.max(dim=1).values
            else:
                attended = (x * torch.softmax(temperature * x, dim=1)).sum(dim=1)
            total = total + base + 1.0 * attended
        return total / len(TEMPERATURES)

    def cross_t2v(self, t_cls, v_tok, present) -> torch.Tensor:  # §3.6 CrossModalMatch, z_x
        u = self.linear(t_cls, "cmm.text_fc")
        patches = self.linear(v_tok, "cmm.image_fc")
        a = self.match_module("cmm", u[:, None], patches).squeeze(1)
        pv = self.multi_head(self.match_module("cmm", patches, u[:, None]))
        gate = torch.sigmoid(self.linear(a, "cmm.fusion_module.linear") + self.linear(pv, "cmm.fusion_module.linear"))
        ctx = (a * gate + pv * (1 - gate)) * present[:, None]
        return self.layer_norm(u * torch.tanh(self.linear(u, "cmm.gate_fc")) + ctx, "cmm.gate_layer_norm")

    def cross_bidirectional(self, t_cls, t_tok, v_cls, v_tok, present) -> tuple[torch.Tensor, torch.Tensor]:
        tc, tt = self.linear(t_cls, "cmmb.text_fc"), self.linear(t_tok, "cmmb.text_fc")
        ic, it = self.linear(v_cls, "cmmb.image_fc"), self.linear(v_tok, "cmmb.image_fc")
        a1, b1 = self.match_module("cmmb", tc[:, None], it).squeeze(1), self.match_module("cmmb", it, tc[:, None])
        ctx1 = self.multi_head(torch.cat([a1[:, None], b1], 1)) * present[:, None]
        z_tv = self.layer_norm(tc * torch.tanh(self.linear(tc, "cmmb.gate_fc")) + ctx1, "cmmb.gate_layer_norm")
        a2, b2 = self.match_module("cmmb", ic[:, None], tt).squeeze(1), self.match_module("cmmb", tt, ic[:, None])
        ctx2 = self.multi_head(torch.cat([a2[:, None], b2], 1))
        z_vt = self.layer_norm(ic * torch.tanh(self.linear(ic, "cmmb.gate_fc")) + ctx2, "cmmb.gate_layer_norm")
        return z_tv, z_vt

    def units(self, mentions: FeatureBatch, entities: FeatureBatch, *, bidirectional: bool,
              mask: bool) -> dict[str, torch.Tensor]:
        t_cls_m, t_tok_m, v_cls_m, v_tok_m = self.prenormalised(mentions)
        t_cls_e, t_tok_e, v_cls_e, v_tok_e = self.prenormalised(entities)
        ones_m, ones_e = torch.ones(len(mentions)), torch.ones(len(entities))
        present_m = mentions.has_image.double() if mask else ones_m
        present_e = entities.has_image.double() if mask else ones_e
        units = {"text": self.intra_modal("timm", t_cls_m, t_tok_m, t_cls_e, t_tok_e),
                 "image": self.intra_modal("iimm", v_cls_m, v_tok_m, v_cls_e, v_tok_e)}
        if bidirectional:
            tv_m, vt_m = self.cross_bidirectional(t_cls_m, t_tok_m, v_cls_m, v_tok_m, present_m)
            tv_e, vt_e = self.cross_bidirectional(t_cls_e, t_tok_e, v_cls_e, v_tok_e, present_e)
            units["t2v"], units["v2t"] = tv_m @ tv_e.T, vt_m @ vt_e.T
        else:
            units["cross"] = self.cross_t2v(t_cls_m, v_tok_m, present_m) @ self.cross_t2v(t_cls_e, v_tok_e, present_e).T
        pair = present_m[:, None] * present_e[None, :]      # m[b, n]: 1 where both sides have an image
        image_units = [name for name in ("image", "v2t") if name in units]
        for name in image_units:
            units[name] = units[name] * pair
        other_units = len(units) - len(image_units)
        units["scores"] = sum(units.values()) / (other_units + len(image_units) * pair)
        return units


def reference_contrastive(entity: torch.Tensor, mention: torch.Tensor, excluded: torch.Tensor | None = None,
                          tau: float = 0.03) -> torch.Tensor:
    """L_cl(E, M) of §3.7, row by row; `excluded` [R, R] removes columns from both blocks of a row."""
    entity, mention = entity / entity.norm(dim=-1, keepdim=True), mention / mention.norm(dim=-1, keepdim=True)

    def side(anchor: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        losses = []
        for i in range(len(anchor)):
            inter = [1.0 * (anchor[i] @ other[j]) / tau for j in range(len(anchor))]
            intra = [0.8 * (0.0 if j == i else (anchor[i] @ anchor[j]) / tau) for j in range(len(anchor))]
            logits = torch.stack([torch.as_tensor(x, dtype=anchor.dtype) for x in inter + intra])
            if excluded is not None:
                logits = logits.masked_fill(torch.cat([excluded[i], excluded[i]]), float("-inf"))
            losses.append(-torch.log_softmax(logits, dim=0)[i])
        return torch.stack(losses).mean()

    return (side(entity, mention) + side(mention, entity)) / 2


def reference_loss(units: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], mentions: FeatureBatch,
                   entities: FeatureBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, cl_loss) for labels arange(B) (§3.8)."""
    labels = torch.arange(len(mentions))
    cross_entropy = sum(F.cross_entropy(scores, labels) for scores in units.values())

    def v_cls(batch: FeatureBatch) -> torch.Tensor:
        return batch.image_global @ weights["image_cls_fc.weight"].T + weights["image_cls_fc.bias"]

    cl_loss = (reference_contrastive(entities.text_global, mentions.text_global)
               + reference_contrastive(v_cls(entities), v_cls(mentions))) / 2
    return cross_entropy + cl_loss, cl_loss


def assert_units_close(output, expected: dict[str, torch.Tensor], names: tuple[str, ...], columns=None) -> None:
    def pick(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if columns is None else tensor.gather(1, columns)

    torch.testing.assert_close(output.scores, pick(expected["scores"]), atol=1e-5, rtol=1e-5)
    assert set(output.unit_scores) == set(names)
    for name in names:
        torch.testing.assert_close(output.unit_scores[name], pick(expected[name]), atol=1e-5, rtol=1e-5)


# --- equivalence with the reference ------------------------------------------------------------


@pytest.mark.parametrize(("bidirectional", "release_single_key"), CMN_VARIANTS, ids=CMN_IDS)
def test_training_scores_contrastive_and_total_loss_equal_the_spec_reference(bidirectional: bool,
                                                                            release_single_key: bool) -> None:
    model = randomised_model(CLIP_DIMS, bidirectional=bidirectional, release_single_key_cmn_branch=release_single_key,
                             **RELEASE)
    mentions, entities = random_features(4, CLIP_DIMS, seed=1), random_features(4, CLIP_DIMS, seed=2)
    reference = Reference(model.state_dict(), release_single_key=release_single_key)
    expected = reference.units(mentions, entities, bidirectional=bidirectional, mask=False)
    with torch.no_grad():
        output = model(mentions, entities, labels=torch.arange(4))
    names = ("text", "image", "t2v", "v2t") if bidirectional else ("text", "image", "cross")
    assert_units_close(output, expected, names)
    total, cl_loss = reference_loss(expected, model.state_dict(), mentions, entities)
    torch.testing.assert_close(output.unit_losses["contrastive"], cl_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.loss, total, atol=1e-5, rtol=1e-5)
    assert set(output.unit_losses) == {"overall", "contrastive", *names}


@pytest.mark.parametrize("mask", [False, True], ids=["release-images", "masked-images"])
@pytest.mark.parametrize(("bidirectional", "release_single_key"), CMN_VARIANTS, ids=CMN_IDS)
def test_all_pairs_and_per_mention_candidates_equal_the_reference(bidirectional: bool, release_single_key: bool,
                                                                  mask: bool) -> None:
    model = randomised_model(SMALL_DIMS, seed=3, bidirectional=bidirectional,
                             release_single_key_cmn_branch=release_single_key, mask_missing_images=mask).eval()
    mentions = random_features(3, SMALL_DIMS, length=6, patches=7, seed=4, has_image=[True, False, True])
    entities = random_features(6, SMALL_DIMS, length=6, patches=7, seed=5,
                               has_image=[True, True, False, True, False, True])
    reference = Reference(model.state_dict(), release_single_key=release_single_key)
    expected = reference.units(mentions, entities, bidirectional=bidirectional, mask=mask)
    names = ("text", "image", "t2v", "v2t") if bidirectional else ("text", "image", "cross")
    candidates = torch.tensor([[5, 0, 2, 2], [1, 4, 3, 0], [2, 3, 5, 1]])   # each mention its own, with a repeat
    with torch.no_grad():
        mention_cache, entity_cache = model.encode_mentions(mentions), model.encode_entities(entities)
        all_pairs = model.match(mention_cache, entity_cache)
        model.max_candidate_pair_elements = 1   # one mention per chunk
        per_mention = model.match_candidates(mention_cache, entity_cache, candidates)
        model.max_candidate_pair_elements = 1 << 20   # all mentions in one chunk
        batched = model.match_candidates(mention_cache, entity_cache, candidates)
    assert all_pairs.scores.shape == (3, 6) and per_mention.scores.shape == (3, 4)
    assert_units_close(all_pairs, expected, names)
    assert_units_close(per_mention, expected, names, columns=candidates)
    assert_units_close(batched, expected, names, columns=candidates)


def test_release_t2v_inference_ranks_with_the_t2v_unit_but_trains_the_bidirectional_one() -> None:
    model = randomised_model(SMALL_DIMS, seed=6, bidirectional=True, release_t2v_inference=True, **RELEASE)
    mentions = random_features(3, SMALL_DIMS, length=5, patches=6, seed=7)
    entities = random_features(3, SMALL_DIMS, length=5, patches=6, seed=8)
    reference = Reference(model.state_dict(), release_single_key=False)
    assert model.unit_names == ("text", "image", "cross")
    with torch.no_grad():
        ranking = model(mentions, entities)
        training = model(mentions, entities, labels=torch.arange(3))
    assert ranking.loss is None
    assert_units_close(ranking, reference.units(mentions, entities, bidirectional=False, mask=False),
                       ("text", "image", "cross"))
    assert_units_close(training, reference.units(mentions, entities, bidirectional=True, mask=False),
                       ("text", "image", "t2v", "v2t"))
    # the T2V unit never enters the training loss, exactly as in the release (§3.8)
    model.zero_grad()
    model(mentions, entities, labels=torch.arange(3)).loss.backward()
    assert all(p.grad is None for p in model.cmm.parameters())
    assert all(p.grad is not None for p in model.cmmb.parameters())

    mmel = M3ELModel(M3ELConfig(**SMALL_DIMS, bidirectional=True))
    assert mmel.cmm is None and mmel.unit_names == ("text", "image", "t2v", "v2t")


# --- the single-key CMN branch (release quirk a) --------------------------------------------------


def test_release_single_key_branch_carries_no_image_information_and_the_fix_does() -> None:
    model = randomised_model(SMALL_DIMS, seed=9, release_single_key_cmn_branch=True)
    match_module = model.cmm.match_module
    text = torch.randn(2, 1, 96, dtype=torch.float64)
    patches = torch.randn(2, 7, 96, dtype=torch.float64)
    release = match_module(patches, text)
    expected = torch.relu(match_module.trans_linear(text)).expand(-1, 7, -1)   # ReLU(W u) at every position
    torch.testing.assert_close(release, expected)
    assert torch.equal(release, match_module(patches * 3 + 1, text))           # the patches do not matter

    fixed = match_module(patches, text, normalise_over_queries=True)
    assert not torch.allclose(fixed, match_module(patches * 3 + 1, text, normalise_over_queries=True))
    same_patches = patches[:, :1].expand(-1, 7, -1)                             # nothing to tell the patches apart
    torch.testing.assert_close(match_module(same_patches, text, normalise_over_queries=True), expected)


# --- options: missing images, duplicate gold entities --------------------------------------------


def test_masking_removes_every_influence_of_blank_images() -> None:
    model = randomised_model(SMALL_DIMS, seed=13, bidirectional=True).eval()
    mention_images, entity_images = [True, False, True], [False, True, True, False]
    mentions = random_features(3, SMALL_DIMS, length=5, patches=6, seed=14, has_image=mention_images)
    entities = random_features(4, SMALL_DIMS, length=5, patches=6, seed=15, has_image=entity_images)
    other_mentions = random_features(3, SMALL_DIMS, length=5, patches=6, seed=16, has_image=mention_images)
    other_entities = random_features(4, SMALL_DIMS, length=5, patches=6, seed=17, has_image=entity_images)
    pairs = ((mentions, other_mentions, mention_images), (entities, other_entities, entity_images))
    for batch, other, present in pairs:
        real = torch.tensor(present)    # same texts and real images; only the blank rows' image features differ
        other.text_global, other.text_tokens = batch.text_global, batch.text_tokens
        other.image_global[real], other.image_patches[real] = batch.image_global[real], batch.image_patches[real]
    with torch.no_grad():
        first, second = model(mentions, entities), model(other_mentions, other_entities)
    torch.testing.assert_close(first.scores, second.scores, atol=0, rtol=0)
    both = torch.tensor(mention_images)[:, None] & torch.tensor(entity_images)[None, :]
    for unit in ("text", "image", "t2v", "v2t"):
        torch.testing.assert_close(first.unit_scores[unit], second.unit_scores[unit], atol=0, rtol=0)
    assert torch.all(first.unit_scores["image"][~both] == 0) and torch.all(first.unit_scores["v2t"][~both] == 0)


def test_image_losses_only_count_pairs_with_both_images() -> None:
    model = randomised_model(SMALL_DIMS, seed=18, exclude_duplicate_negatives=False)
    mentions = random_features(4, SMALL_DIMS, length=5, patches=6, seed=19, has_image=[True, True, False, True])
    entities = random_features(4, SMALL_DIMS, length=5, patches=6, seed=20, has_image=[True, False, True, True])
    output = model(mentions, entities, labels=torch.arange(4))
    usable = torch.tensor([[True, False, True, True], [True, False, True, True]])
    expected = F.cross_entropy(output.unit_scores["image"][[0, 3]].masked_fill(~usable, float("-inf")),
                               torch.tensor([0, 3]))
    torch.testing.assert_close(output.unit_losses["image"], expected)
    rows = [0, 3]   # mention and gold entity both have an image
    v_cls_e = model.image_cls_fc(entities.image_global)[rows].detach()
    v_cls_m = model.image_cls_fc(mentions.image_global)[rows].detach()
    expected_cl = (reference_contrastive(entities.text_global, mentions.text_global)
                   + reference_contrastive(v_cls_e, v_cls_m)) / 2
    torch.testing.assert_close(output.unit_losses["contrastive"], expected_cl)

    no_images = random_features(4, SMALL_DIMS, length=5, patches=6, seed=21, has_image=[False] * 4)
    output = model(no_images, entities, labels=torch.arange(4))
    assert output.unit_losses["image"].item() == 0.0
    output.loss.backward()
    assert all(p.grad is not None for p in model.timm.parameters())


def test_duplicate_gold_entities_are_not_negatives() -> None:
    model = randomised_model(SMALL_DIMS, seed=22, mask_missing_images=False)
    mentions = random_features(4, SMALL_DIMS, length=5, patches=6, seed=23)
    entities = random_features(4, SMALL_DIMS, length=5, patches=6, seed=24)
    entities.text_global[2], entities.image_global[2] = entities.text_global[0], entities.image_global[0]
    entity_ids = torch.tensor([7, 3, 7, 5])  # columns 0 and 2 hold the same entity
    output = model(mentions, entities, labels=torch.arange(4), entity_ids=entity_ids)
    logits = output.scores.detach().clone()
    logits[0, 2] = logits[2, 0] = float("-inf")
    torch.testing.assert_close(output.unit_losses["overall"], F.cross_entropy(logits, torch.arange(4)))
    excluded = torch.zeros(4, 4, dtype=torch.bool)
    excluded[0, 2] = excluded[2, 0] = True
    v_cls_e, v_cls_m = model.image_cls_fc(entities.image_global).detach(), model.image_cls_fc(mentions.image_global)
    expected_cl = (reference_contrastive(entities.text_global, mentions.text_global, excluded)
                   + reference_contrastive(v_cls_e, v_cls_m.detach(), excluded)) / 2
    torch.testing.assert_close(output.unit_losses["contrastive"], expected_cl)

    release = M3ELModel(M3ELConfig(**SMALL_DIMS, **RELEASE)).to(torch.float64)
    release.load_state_dict(model.state_dict())
    release_output = release(mentions, entities, labels=torch.arange(4), entity_ids=entity_ids)
    assert release_output.unit_losses["contrastive"] > output.unit_losses["contrastive"]
    assert release_output.loss > output.loss
    with pytest.raises(ValueError, match="entity_ids must have shape"):
        model(mentions, entities, labels=torch.arange(4), entity_ids=torch.tensor([1, 2]))


# --- training, chunking, layout, persistence, size ------------------------------------------------


@pytest.mark.parametrize("bidirectional", [False, True], ids=["t2v", "bidirectional"])
def test_loss_decreases_over_a_few_steps(bidirectional: bool) -> None:
    model = randomised_model(SMALL_DIMS, seed=25, dtype=torch.float32, bidirectional=bidirectional)
    mentions = random_features(8, SMALL_DIMS, length=6, patches=7, seed=26, dtype=torch.float32)
    entities = random_features(8, SMALL_DIMS, length=6, patches=7, seed=27, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    outputs = []
    for _ in range(20):
        output = model(mentions, entities, labels=torch.arange(8), entity_ids=torch.arange(8))
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        outputs.append(output)
    first, last = outputs[0], outputs[-1]
    # frozen features: the text half of the contrastive loss cannot move, every other term can
    assert last.loss < 0.5 * first.loss
    assert all(last.unit_losses[name] < first.unit_losses[name] for name in first.unit_losses)


def test_chunked_and_cached_matching_equals_one_pass() -> None:
    model = randomised_model(SMALL_DIMS, seed=28).eval()
    mentions = random_features(3, SMALL_DIMS, length=6, patches=7, seed=29)
    entities = random_features(9, SMALL_DIMS, length=6, patches=7, seed=30)
    with torch.no_grad():
        whole = model(mentions, entities)
        entity_cache = model.encode_entities(entities)
        rejoined = type(entity_cache).concat([entity_cache.select(slice(0, 4)), entity_cache.select(slice(4, 9))])
        model.max_pair_elements = 3 * 7 * 7 * 2  # forces chunks of two entities
        chunked = model.match(model.encode_mentions(mentions), rejoined)
    torch.testing.assert_close(chunked.scores, whole.scores)
    for unit in whole.unit_scores:
        torch.testing.assert_close(chunked.unit_scores[unit], whole.unit_scores[unit])


@pytest.mark.parametrize("options", [{}, {"bidirectional": True},
                                     {"bidirectional": True, "release_t2v_inference": True}],
                         ids=["t2v", "bidirectional", "bidirectional-release-inference"])
def test_declared_cache_layout_equals_the_encoded_caches(options: dict[str, bool]) -> None:
    model = M3ELModel(M3ELConfig(**SMALL_DIMS, **options)).to(torch.float64)
    entities = random_features(3, SMALL_DIMS, length=6, patches=7, seed=31)
    cache = model.encode_entities(entities)
    layout = model.entity_cache_layout(text_length=6, image_tokens=7)
    actual = {name: (tuple(getattr(cache, name).shape[1:]), "bool" if getattr(cache, name).dtype == torch.bool
                     else "float") for name in layout}
    assert layout == actual
    mention_cache = model.encode_mentions(entities)
    mention_layout = model.mention_cache_class.layout(model.cache_sizes(6, 7))
    assert mention_layout == {name: (tuple(getattr(mention_cache, name).shape[1:]), kind)
                              for name, (_, kind) in mention_layout.items()}
    assert layout["cross"][0] == ((96,) if model.cmm is not None else (0,))
    assert layout["t2v"][0] == ((96,) if model.cmmb is not None else (0,))


def test_save_and_load_round_trip_gives_identical_scores(tmp_path) -> None:
    model = randomised_model(SMALL_DIMS, seed=32, dtype=torch.float32, bidirectional=True, entity_text="attr",
                             release_single_key_cmn_branch=True).eval()
    mentions = random_features(2, SMALL_DIMS, length=5, patches=6, seed=33, has_image=[True, False],
                               dtype=torch.float32)
    entities = random_features(3, SMALL_DIMS, length=5, patches=6, seed=34, dtype=torch.float32)
    model.save_pretrained(tmp_path / "ckpt", metadata={"backbone": {"name": "minilm_effnet"}})
    loaded = load_model(tmp_path / "ckpt")
    assert isinstance(loaded, M3ELModel) and loaded.config == model.config
    assert loaded.config.csra_temperatures == TEMPERATURES
    with torch.no_grad():
        torch.testing.assert_close(loaded(mentions, entities).scores, model(mentions, entities).scores, atol=0, rtol=0)


def test_head_parameter_count_with_clip_widths_is_the_release_count() -> None:
    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    model = M3ELModel(M3ELConfig())
    layer_norms = sum(count(getattr(model, name)) for name in ("text_cls_layernorm", "text_tokens_layernorm",
                                                               "image_cls_layernorm", "image_tokens_layernorm"))
    encoder_fcs = count(model.image_cls_fc) + count(model.image_tokens_fc)
    assert (count(model.timm), count(model.iimm), count(model.cmm)) == (197_184, 37_440, 77_473)
    assert (layer_norms, encoder_fcs) == (2_432, 123_072)
    assert count(model) == 123_072 + 197_184 + 37_440 + 77_473 + 2_432
    bidirectional = M3ELModel(M3ELConfig(bidirectional=True))
    assert count(bidirectional.cmmb) == 68_161
    assert count(bidirectional) == 123_072 + 197_184 + 37_440 + 68_161 + 2_432


def test_registry_views_and_config_checks() -> None:
    assert MODELS.get("m3el") is M3ELModel
    assert M3ELModel(M3ELConfig()).feature_views() == FeatureViews(mention="mention_sentence", entity="name_desc")
    assert M3ELModel(M3ELConfig(entity_text="attr")).feature_views().entity == "name_attr"
    config = M3ELConfig()
    assert (config.hidden_dim, config.csra_lambda, config.loss_temperature) == (96, 1.0, 0.03)
    assert (config.inter_weight, config.intra_weight, len(config.csra_temperatures)) == (1.0, 0.8, 5)
    with pytest.raises(ConfigError, match="entity_text"):
        M3ELConfig(entity_text="name")
    with pytest.raises(ConfigError, match="loss_temperature"):
        M3ELConfig(loss_temperature=0.0)
    with pytest.raises(ConfigError, match="unknown M3ELConfig key"):
        M3ELConfig.from_dict({"head_weights": [1, 1]})
