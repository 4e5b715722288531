"""MIMIC: equivalence with a plain reference written from models.md §1, loss, options and persistence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from model_inputs import CLIP_DIMS, OFFLINE_DIMS, ReferenceWeights, random_features, randomise

from mmel.core.config import ConfigError
from mmel.core.errors import MismatchError
from mmel.core.features import FeatureBatch
from mmel.models import load_model
from mmel.models.base import MelModel
from mmel.models.mimic import MIMICConfig, MIMICModel

RELEASE = {"mask_missing_images": False, "exclude_duplicate_negatives": False}


def randomised_model(dims: dict[str, int], *, seed: int = 0, dtype: torch.dtype = torch.float32,
                     **options: bool) -> MIMICModel:
    return randomise(MIMICModel(MIMICConfig(**dims, **options)), seed=seed, dtype=dtype)


# --- a plain reference, written directly from the equations of models.md §1.3-1.7 ---------------


def reference_mimic(weights: dict[str, torch.Tensor], mentions: FeatureBatch, entities: FeatureBatch,
                    mask_missing_images: bool = False) -> dict[str, torch.Tensor]:
    """The spec's scores; with `mask_missing_images`, mmel's documented option (MIMICConfig): no VDLU score for
    a pair lacking an image, no CMFU image context for a side without one, final = (s_T + s_C + m s_V) / (2 + m)."""
    weights_read = ReferenceWeights(weights)
    linear, layer_norm = weights_read.linear, weights_read.layer_norm

    def prenormalised(batch: FeatureBatch) -> tuple[torch.Tensor, ...]:
        t_cls = layer_norm(batch.text_global, "text_cls_layernorm")
        t_tok = layer_norm(batch.text_tokens, "text_tokens_layernorm")
        v_cls = layer_norm(linear(batch.image_global, "image_cls_fc"), "image_cls_layernorm")
        v_tok = layer_norm(linear(batch.image_patches, "image_tokens_fc"), "image_tokens_layernorm")
        return t_cls, t_tok, v_cls, v_tok

    t_cls_m, t_tok_m, v_cls_m, v_tok_m = prenormalised(mentions)
    t_cls_e, t_tok_e, v_cls_e, v_tok_e = prenormalised(entities)
    num_mentions, num_entities = len(mentions), len(entities)

    # TGLU (§1.4), one (entity, mention) pair at a time
    s_g2l = torch.zeros(num_mentions, num_entities, dtype=t_cls_m.dtype)
    for n in range(num_entities):
        query = linear(t_tok_e[n], "tglu.fc_query")
        for b in range(num_mentions):
            key, value = linear(t_tok_m[b], "tglu.fc_key"), linear(t_tok_m[b], "tglu.fc_value")
            attention = torch.softmax(query @ key.T / math.sqrt(96), dim=-1)
            context = layer_norm((attention @ value).mean(dim=0), "tglu.layer_norm")
            s_g2l[b, n] = linear(t_cls_e[n], "tglu.fc_cls") @ context
    s_g2g = t_cls_m @ t_cls_e.T
    s_t = (s_g2l + s_g2g) / 2

    # VDLU (§1.5)
    def dual(block: str, query_cls: torch.Tensor, key_cls: torch.Tensor, value_tokens: torch.Tensor) -> torch.Tensor:
        q = linear(query_cls, f"{block}.cls_fc")
        k = linear(key_cls, f"{block}.cls_fc")
        v = linear(value_tokens, f"{block}.tokens_fc").mean(dim=1)
        c = linear(layer_norm(v[None, :, :] + q[:, None, :], f"{block}.add_layer_norm"), f"{block}.fc")
        g = torch.tanh(linear(c, f"{block}.gate_fc"))
        h = layer_norm(c * g + k[None], f"{block}.layer_norm")
        return (h * layer_norm(q, f"{block}.layer_norm")[:, None, :]).sum(-1)

    s_e2m = dual("vdlu.dual_ent2men", v_cls_e, v_cls_m, v_tok_m)
    s_m2e = dual("vdlu.dual_men2ent", v_cls_m, v_cls_e, v_tok_e)
    s_v = (s_e2m.T + s_m2e) / 2

    # CMFU (§1.6)
    def fused(t_cls: torch.Tensor, v_tok: torch.Tensor, has_image: torch.Tensor) -> torch.Tensor:
        u = linear(t_cls, "cmfu.text_fc")
        p = linear(v_tok, "cmfu.image_fc")
        att = torch.softmax(u[:, None, :] @ p.transpose(1, 2), dim=-1)
        ctx = (att @ p).squeeze(1)
        if mask_missing_images:
            ctx = torch.where(has_image[:, None], ctx, torch.zeros_like(ctx))
        return layer_norm(u * torch.tanh(linear(u, "cmfu.gate_fc")) + ctx, "cmfu.gate_layer_norm")

    s_c = fused(t_cls_m, v_tok_m, mentions.has_image) @ fused(t_cls_e, v_tok_e, entities.has_image).T
    if not mask_missing_images:
        return {"scores": (s_t + s_v + s_c) / 3, "tglu": s_t, "vdlu": s_v, "cmfu": s_c}
    both = (mentions.has_image[:, None] & entities.has_image[None, :]).to(s_t.dtype)      # m[b, n]
    s_v = s_v * both
    return {"scores": (s_t + s_c + s_v) / (2 + both), "tglu": s_t, "vdlu": s_v, "cmfu": s_c}


def reference_loss(scores: dict[str, torch.Tensor]) -> torch.Tensor:
    labels = torch.arange(scores["scores"].shape[0])
    return sum(F.cross_entropy(scores[name], labels) for name in ("scores", "tglu", "vdlu", "cmfu"))


@pytest.mark.parametrize(("dims", "patches"), [(CLIP_DIMS, 50), (OFFLINE_DIMS, 49)], ids=["clip", "offline"])
def test_scores_and_loss_equal_the_spec_reference(dims: dict[str, int], patches: int) -> None:
    model = randomised_model(dims, dtype=torch.float64, **RELEASE)
    mentions = random_features(4, dims, patches=patches, seed=1, dtype=torch.float64)
    entities = random_features(4, dims, patches=patches, seed=2, dtype=torch.float64)
    expected = reference_mimic(model.state_dict(), mentions, entities)
    with torch.no_grad():
        output = model(mentions, entities, labels=torch.arange(4))
    torch.testing.assert_close(output.scores, expected["scores"], atol=1e-5, rtol=1e-5)
    for unit in ("tglu", "vdlu", "cmfu"):
        torch.testing.assert_close(output.unit_scores[unit], expected[unit], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.loss, reference_loss(expected), atol=1e-5, rtol=1e-5)


def test_rectangular_scores_equal_the_reference_in_float32() -> None:
    model = randomised_model(CLIP_DIMS, **RELEASE)
    mentions, entities = random_features(3, CLIP_DIMS, seed=3), random_features(7, CLIP_DIMS, seed=4)
    expected = reference_mimic(model.state_dict(), mentions, entities)
    with torch.no_grad():
        output = model(mentions, entities)
    assert output.scores.shape == (3, 7) and output.loss is None
    torch.testing.assert_close(output.scores, expected["scores"], atol=1e-3, rtol=1e-4)


def test_head_parameter_count_with_clip_widths_is_the_release_count() -> None:
    model = MIMICModel(MIMICConfig())
    counts = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in ("tglu", "vdlu", "cmfu")}
    assert sum(p.numel() for p in model.parameters()) == 438_563
    assert counts == {"tglu": 197_184, "vdlu": 56_834, "cmfu": 59_041}


def test_chunked_and_cached_matching_equals_one_pass() -> None:
    model = randomised_model(OFFLINE_DIMS).eval()
    mentions, entities = random_features(3, OFFLINE_DIMS, seed=5), random_features(11, OFFLINE_DIMS, seed=6)
    with torch.no_grad():
        whole = model(mentions, entities)
        entity_cache = model.encode_entities(entities)
        rejoined = type(entity_cache).concat([entity_cache.select(slice(0, 4)), entity_cache.select(slice(4, 11))])
        model.max_pair_elements = 3 * 40 * 40 * 2  # forces chunks of two entities
        chunked = model.match(model.encode_mentions(mentions), rejoined)
    torch.testing.assert_close(chunked.scores, whole.scores)
    for unit in whole.unit_scores:
        torch.testing.assert_close(chunked.unit_scores[unit], whole.unit_scores[unit])


@pytest.mark.parametrize("options", [{}, RELEASE], ids=["mmel-options", "release"])
def test_per_mention_candidates_score_as_the_same_pairs_of_the_full_matrix(options: dict[str, bool]) -> None:
    model = randomised_model(OFFLINE_DIMS, seed=10, **options).eval()
    mentions = random_features(4, OFFLINE_DIMS, seed=11, has_image=[True, False, True, True])
    entities = random_features(9, OFFLINE_DIMS, seed=12, has_image=[True, False] * 4 + [True])
    candidates = torch.tensor([[0, 3, 8], [2, 2, 5], [7, 1, 0], [4, 6, 3]])                  # [B, K]
    with torch.no_grad():
        mention_cache, entity_cache = model.encode_mentions(mentions), model.encode_entities(entities)
        full = model.match(mention_cache, entity_cache)
        model.max_candidate_pair_elements = 40 * 40 * 3  # one mention per chunk
        paired = model.match_candidates(mention_cache, entity_cache, candidates)
        generic = MelModel.match_candidates(model, mention_cache, entity_cache, candidates)
    torch.testing.assert_close(paired.scores, full.scores.gather(1, candidates))
    torch.testing.assert_close(generic.scores, paired.scores)
    for unit in full.unit_scores:
        torch.testing.assert_close(paired.unit_scores[unit], full.unit_scores[unit].gather(1, candidates))


@pytest.mark.parametrize("mask", [False, True], ids=["release", "masked"])
def test_every_served_path_equals_the_spec_reference(mask: bool) -> None:
    """All pairs (exhaustive), and per-mention candidates with several mentions per chunk (what the linker
    serves: TGLU's batched per-mention attention), each against the independent reference."""
    options = {"mask_missing_images": mask, "exclude_duplicate_negatives": False}
    model = randomised_model(OFFLINE_DIMS, seed=20, dtype=torch.float64, **options).eval()
    mentions = random_features(4, OFFLINE_DIMS, patches=49, seed=21, has_image=[True, False, True, True],
                               dtype=torch.float64)
    entities = random_features(6, OFFLINE_DIMS, patches=49, seed=22, has_image=[True, False, True, False, True, True],
                               dtype=torch.float64)
    expected = reference_mimic(model.state_dict(), mentions, entities, mask_missing_images=mask)
    candidates = torch.tensor([[5, 0, 3], [1, 1, 4], [2, 5, 0], [3, 4, 1]])                    # [B, K]
    with torch.no_grad():
        mention_cache, entity_cache = model.encode_mentions(mentions), model.encode_entities(entities)
        full = model.match(mention_cache, entity_cache)
        assert model.max_candidate_pair_elements >= 4 * 3 * 40 * 40   # all four mentions in one per-mention chunk
        served = model.match_candidates(mention_cache, entity_cache, candidates)
    for name, reference in (("scores", expected["scores"]), *((u, expected[u]) for u in ("tglu", "vdlu", "cmfu"))):
        got_full = full.scores if name == "scores" else full.unit_scores[name]
        got_served = served.scores if name == "scores" else served.unit_scores[name]
        torch.testing.assert_close(got_full, reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_served, reference.gather(1, candidates), atol=1e-5, rtol=1e-5)


def test_loss_decreases_over_a_few_steps() -> None:
    model = randomised_model(CLIP_DIMS, seed=7)
    mentions, entities = random_features(8, CLIP_DIMS, seed=8), random_features(8, CLIP_DIMS, seed=9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = model(mentions, entities, labels=torch.arange(8)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_masking_removes_every_influence_of_blank_images() -> None:
    model = randomised_model(CLIP_DIMS, mask_missing_images=True).eval()
    mention_images, entity_images = [True, False, True], [False, True, True, False, True]
    mentions = random_features(3, CLIP_DIMS, seed=10, has_image=mention_images)
    entities = random_features(5, CLIP_DIMS, seed=11, has_image=entity_images)
    other_mentions = random_features(3, CLIP_DIMS, seed=12, has_image=mention_images)
    other_entities = random_features(5, CLIP_DIMS, seed=13, has_image=entity_images)
    pairs = ((mentions, other_mentions, mention_images), (entities, other_entities, entity_images))
    for batch, other, present in pairs:  # same texts and real images; only the blank rows' image features differ
        real = torch.tensor(present)
        other.text_global, other.text_tokens = batch.text_global, batch.text_tokens
        other.image_global[real], other.image_patches[real] = batch.image_global[real], batch.image_patches[real]
    with torch.no_grad():
        first, second = model(mentions, entities), model(other_mentions, other_entities)
    torch.testing.assert_close(first.scores, second.scores, atol=0, rtol=0)
    for unit in ("tglu", "vdlu", "cmfu"):
        torch.testing.assert_close(first.unit_scores[unit], second.unit_scores[unit], atol=0, rtol=0)
    both = torch.tensor(mention_images)[:, None] & torch.tensor(entity_images)[None, :]
    assert torch.all(first.unit_scores["vdlu"][~both] == 0)
    expected = (first.unit_scores["tglu"] + first.unit_scores["cmfu"] + first.unit_scores["vdlu"]) / (2 + both.double())
    torch.testing.assert_close(first.scores, expected.float())


def test_without_masking_blank_images_do_change_scores() -> None:
    model = randomised_model(CLIP_DIMS, **RELEASE).eval()
    mentions = random_features(2, CLIP_DIMS, seed=14, has_image=[False, False])
    entities = random_features(3, CLIP_DIMS, seed=15)
    with torch.no_grad():
        before = model(mentions, entities).scores
        mentions.image_patches += 1.0
        after = model(mentions, entities).scores
    assert not torch.allclose(before, after)


def test_visual_loss_only_counts_rows_with_both_images() -> None:
    model = randomised_model(CLIP_DIMS, mask_missing_images=True)
    mentions = random_features(4, CLIP_DIMS, seed=16, has_image=[False] * 4)
    entities = random_features(4, CLIP_DIMS, seed=17)
    output = model(mentions, entities, labels=torch.arange(4))
    assert output.unit_losses["vdlu"].item() == 0.0
    output.loss.backward()
    assert all(p.grad is not None for p in model.tglu.parameters())

    mentions.has_image = torch.tensor([True, True, False, True])
    entities.has_image = torch.tensor([True, False, True, True])
    output = model(mentions, entities, labels=torch.arange(4))
    usable = torch.tensor([[True, False, True, True], [True, False, True, True]])
    expected = F.cross_entropy(output.unit_scores["vdlu"][[0, 3]].masked_fill(~usable, float("-inf")),
                               torch.tensor([0, 3]))
    torch.testing.assert_close(output.unit_losses["vdlu"], expected)


def test_duplicate_gold_entities_are_not_negatives() -> None:
    model = randomised_model(CLIP_DIMS, mask_missing_images=False, exclude_duplicate_negatives=True)
    mentions, entities = random_features(4, CLIP_DIMS, seed=18), random_features(4, CLIP_DIMS, seed=19)
    entity_ids = torch.tensor([7, 3, 7, 5])  # columns 0 and 2 hold the same entity
    output = model(mentions, entities, labels=torch.arange(4), entity_ids=entity_ids)
    logits = output.scores.detach().clone()
    logits[0, 2] = logits[2, 0] = float("-inf")
    torch.testing.assert_close(output.unit_losses["overall"], F.cross_entropy(logits, torch.arange(4)))
    release = MIMICModel(MIMICConfig(**CLIP_DIMS, **RELEASE))
    release.load_state_dict(model.state_dict())
    assert release(mentions, entities, labels=torch.arange(4), entity_ids=entity_ids).loss > output.loss
    with pytest.raises(ValueError, match="entity_ids must have shape"):
        model(mentions, entities, labels=torch.arange(4), entity_ids=torch.tensor([1, 2]))


def test_save_and_load_round_trip_gives_identical_scores(tmp_path) -> None:
    model = randomised_model(OFFLINE_DIMS, mask_missing_images=True, exclude_duplicate_negatives=False).eval()
    mentions = random_features(2, OFFLINE_DIMS, seed=20, has_image=[True, False])
    entities = random_features(3, OFFLINE_DIMS, seed=21)
    model.save_pretrained(tmp_path / "ckpt", metadata={"backbone": {"name": "minilm_effnet"}}, card="# card\n")
    loaded = load_model(tmp_path / "ckpt")
    assert isinstance(loaded, MIMICModel) and loaded.config == model.config
    assert loaded.checkpoint_header["backbone"] == {"name": "minilm_effnet"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(mentions, entities).scores, model(mentions, entities).scores, atol=0, rtol=0)


def test_strict_loading_reports_missing_unexpected_and_misshaped_keys() -> None:
    model = MIMICModel(MIMICConfig())
    state = model.state_dict()
    state.pop("tglu.fc_query.weight")
    state["tglu.extra.weight"] = torch.zeros(1)
    state["cmfu.text_fc.weight"] = torch.zeros(96, 384)
    with pytest.raises(MismatchError) as error:
        model.load_weights(state, source="ckpt")
    message = str(error.value)
    assert "tglu.fc_query.weight" in message and "tglu.extra.weight" in message and "(96, 384)" in message


def test_features_of_the_wrong_width_and_bad_configs_are_refused() -> None:
    model = MIMICModel(MIMICConfig())
    with pytest.raises(MismatchError, match="expects"):
        model.encode_entities(random_features(2, OFFLINE_DIMS))
    with pytest.raises(ConfigError, match="hidden_dim"):
        MIMICConfig(hidden_dim=0)
    with pytest.raises(ConfigError, match="unknown MIMICConfig key"):
        MIMICConfig.from_dict({"dropout": 0.1})
