"""DIM: equivalence with a plain reference written from models.md §4.3-4.4 and §4.7, masking, loss, persistence."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from model_inputs import CLIP_DIMS, OFFLINE_DIMS, ReferenceWeights, random_features, randomise

from mmel.core.config import ConfigError
from mmel.core.errors import MismatchError
from mmel.core.features import FeatureBatch, PooledView
from mmel.models import MODELS, load_model
from mmel.models.dim import DIMConfig, DIMModel, negative_columns

HEADS = [False, True]
HEAD_IDS = ["paper", "release"]


random_features = functools.partial(random_features, length=4, patches=3, has_caption=True)   # DIM's views


def randomised_model(dims: dict[str, int], *, seed: int = 0, dtype: torch.dtype = torch.float32,
                     **options: object) -> DIMModel:
    return randomise(DIMModel(DIMConfig(**dims, **options)), seed=seed, scale=0.1, dtype=dtype).eval()


# --- a plain reference, written directly from models.md §4.3, §4.4, §4.7 --------------------------


def reference_query(weights: dict[str, torch.Tensor], mentions: FeatureBatch, *, release: bool,
                    num_heads: int = 8) -> torch.Tensor:
    """One mention at a time, with Python lists of the cues that exist."""
    weights_read = ReferenceWeights(weights)
    linear, layer_norm = weights_read.linear, weights_read.layer_norm

    def trans(x: torch.Tensor, prefix: str) -> torch.Tensor:   # Dropout(LN(ReLU(Linear(x)))) in eval mode
        return layer_norm(torch.relu(linear(x, f"{prefix}.0")), f"{prefix}.2")

    queries = []
    for b in range(len(mentions)):
        mention, text = mentions.views["mention"].global_[b], mentions.text_global[b]
        caption = mentions.views["caption"].global_[b] if mentions.views["caption"].present[b] else None
        image = mentions.image_global[b] if mentions.has_image[b] else None
        if release:
            summed = mention + text
            if image is not None:
                summed = summed + (linear(image, "image_proj") if "image_proj.weight" in weights else image)
            if caption is not None:
                summed = summed + trans(caption, "text_trans")
            queries.append(linear(summed, "pedia_out_trans"))
            continue
        m = trans(mention, "text_trans")
        cues = [trans(text, "text_trans")]
        if caption is not None:
            cues.append(trans(caption, "text_trans"))
        if image is not None:
            cues.append(trans(image, "img_trans"))
        w_q, w_k, w_v = weights["cue_attention.in_proj_weight"].chunk(3)
        b_q, b_k, b_v = weights["cue_attention.in_proj_bias"].chunk(3)
        q = w_q @ m + b_q
        keys = [w_k @ cue + b_k for cue in cues]
        values = [w_v @ cue + b_v for cue in cues]
        width = len(q) // num_heads
        heads = []
        for h in range(num_heads):
            part = slice(h * width, (h + 1) * width)
            logits = torch.stack([q[part] @ k[part] / math.sqrt(width) for k in keys])
            attention = torch.softmax(logits, dim=0)
            heads.append(sum(a * v[part] for a, v in zip(attention, values, strict=True)))
        attended = linear(torch.cat(heads), "cue_attention.out_proj")
        queries.append(linear(m + attended, "pedia_out_trans"))
    return torch.stack(queries)


def reference_cosine(queries: torch.Tensor, entity_vectors: torch.Tensor) -> torch.Tensor:
    scores = torch.empty(len(queries), len(entity_vectors), dtype=queries.dtype)
    for b, query in enumerate(queries):
        for n, entity in enumerate(entity_vectors):
            scores[b, n] = query @ entity / (query.norm() * entity.norm())
    return scores


def reference_npair(anchors: torch.Tensor, entity_vectors: torch.Tensor, labels: list[int],
                    negatives: list[int]) -> torch.Tensor:
    """L = mean_i log(1 + Σ_j exp(a_i·n_j − a_i·p_i)) + 0.02 · Σ_i (‖a_i‖² + ‖p_i‖²) / B (§4.4)."""
    total, l2 = 0.0, 0.0
    for i, label in enumerate(labels):
        a, p = anchors[i], entity_vectors[label]
        total = total + torch.log(1 + sum(torch.exp(a @ entity_vectors[j] - a @ p) for j in negatives))
        l2 = l2 + a @ a + p @ p
    return total / len(labels) + 0.02 * l2 / len(labels)


@pytest.mark.parametrize("release", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("dims", [CLIP_DIMS, OFFLINE_DIMS], ids=["clip", "offline"])
def test_scores_and_loss_equal_the_spec_reference(release: bool, dims: dict[str, int]) -> None:
    model = randomised_model(dims, dtype=torch.float64, release_head=release)
    mentions = random_features(4, dims, seed=1, dtype=torch.float64, has_image=[True, False, True, False],
                               has_caption=[True, True, False, False])
    entities = random_features(6, dims, seed=2, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3])                         # columns 4 and 5 are the sampled negatives
    with torch.no_grad():
        output = model(mentions, entities, labels=labels)
        queries = reference_query(model.state_dict(), mentions, release=release)
        torch.testing.assert_close(model.query(mentions), queries, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.scores, reference_cosine(queries, entities.text_global), atol=1e-5, rtol=1e-5)
    expected_loss = reference_npair(queries, entities.text_global, [0, 1, 2, 3], [4, 5])
    torch.testing.assert_close(output.loss, expected_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("release", HEADS, ids=HEAD_IDS)
def test_cached_match_and_candidates_score_as_the_full_cosine_matrix(release: bool) -> None:
    model = randomised_model(OFFLINE_DIMS, seed=3, release_head=release)
    mentions = random_features(3, OFFLINE_DIMS, seed=4, has_image=[True, False, True],
                               has_caption=[False, True, True])
    entities = random_features(7, OFFLINE_DIMS, seed=5)
    candidates = torch.tensor([[0, 6, 2], [5, 5, 1], [3, 0, 4]])                              # [B, K]
    with torch.no_grad():
        whole = model(mentions, entities).scores
        mention_cache, entity_cache = model.encode_mentions(mentions), model.encode_entities(entities)
        matched = model.match(mention_cache, entity_cache)
        paired = model.match_candidates(mention_cache, entity_cache, candidates)
    torch.testing.assert_close(matched.scores, whole)
    torch.testing.assert_close(paired.scores, whole.gather(1, candidates))
    assert matched.unit_scores == {} and paired.scores.shape == (3, 3)


@pytest.mark.parametrize("release", HEADS, ids=HEAD_IDS)
def test_missing_captions_and_images_are_masked_out(release: bool) -> None:
    model = randomised_model(CLIP_DIMS, seed=6, release_head=release)
    mentions = random_features(3, CLIP_DIMS, seed=7, has_image=[False, True, True], has_caption=[True, False, True])
    changed = random_features(3, CLIP_DIMS, seed=7, has_image=[False, True, True], has_caption=[True, False, True])
    changed.image_global[0] = 5.0                        # the blank image of mention 0
    changed.views["caption"].global_[1] = float("nan")   # the absent caption of mention 1
    with torch.no_grad():
        before, after = model.query(mentions), model.query(changed)
        torch.testing.assert_close(after, before, atol=0, rtol=0)
        changed.views["caption"].global_[2] += 1.0       # a present caption does count
        assert not torch.allclose(model.query(changed)[2], before[2])


def test_npair_loss_equals_a_hand_computed_value() -> None:
    model = DIMModel(DIMConfig(text_dim=2, image_global_dim=2, image_patch_dim=2, num_heads=1))
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    entities = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])   # golds p1, p2 then one sampled negative
    npair, l2 = model.npair_loss(anchors, entities, torch.tensor([0, 1]))
    # row 1: a1·n − a1·p1 = 1 − 1 = 0; row 2: a2·n − a2·p2 = 1 − 2 = −1
    torch.testing.assert_close(npair, torch.tensor((math.log(2) + math.log(1 + math.exp(-1))) / 2))
    torch.testing.assert_close(l2, torch.tensor(0.02 * ((1 + 1) + (1 + 4)) / 2))


def test_negative_columns_fall_back_to_in_batch_and_skip_duplicates_of_the_gold() -> None:
    labels = torch.tensor([0, 1, 2])
    sampled = negative_columns(labels, 5)
    assert sampled.tolist() == [[False, False, False, True, True]] * 3          # every row: all sampled negatives
    in_batch = negative_columns(labels, 3)
    assert in_batch.tolist() == [[False, True, True], [True, False, True], [True, True, False]]
    deduplicated = negative_columns(labels, 5, entity_ids=torch.tensor([10, 11, 12, 11, 13]))
    assert deduplicated.tolist() == [[False, False, False, True, True], [False, False, False, False, True],
                                     [False, False, False, True, True]]
    with pytest.raises(ValueError, match="entity_ids must have shape"):
        negative_columns(labels, 5, entity_ids=torch.tensor([1, 2]))


def test_loss_without_sampled_negatives_uses_the_other_golds_and_a_row_without_negatives_costs_nothing() -> None:
    model = randomised_model(CLIP_DIMS, dtype=torch.float64, seed=8)
    mentions = random_features(3, CLIP_DIMS, seed=9, dtype=torch.float64)
    entities = random_features(3, CLIP_DIMS, seed=10, dtype=torch.float64)
    with torch.no_grad():
        queries = model.query(mentions)
        npair, _ = model.npair_loss(queries, entities.text_global, torch.tensor([0, 1, 2]))
        only_self, _ = model.npair_loss(queries[:1], entities.text_global[:1], torch.tensor([0]))
    margins = queries @ entities.text_global.T - (queries * entities.text_global).sum(-1, keepdim=True)
    expected = sum(torch.log(1 + sum(torch.exp(margins[i, j]) for j in range(3) if j != i)) for i in range(3)) / 3
    torch.testing.assert_close(npair, expected)
    assert only_self.item() == 0.0


def test_loss_decreases_over_a_few_steps() -> None:
    torch.manual_seed(11)
    model = DIMModel(DIMConfig(**OFFLINE_DIMS, dropout=0.0))
    mentions = random_features(8, OFFLINE_DIMS, seed=12, has_caption=[True, False] * 4)
    entities = random_features(16, OFFLINE_DIMS, seed=13)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        output = model(mentions, entities, labels=torch.arange(8), entity_ids=torch.arange(16))
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append(output.unit_losses["npair"].item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("release", HEADS, ids=HEAD_IDS)
def test_save_and_load_round_trip_gives_identical_scores(tmp_path, release: bool) -> None:
    model = randomised_model(OFFLINE_DIMS, seed=14, release_head=release, entity_text="name_desc")
    mentions = random_features(2, OFFLINE_DIMS, seed=15, has_caption=[True, False])
    entities = random_features(3, OFFLINE_DIMS, seed=16)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert isinstance(loaded, DIMModel) and loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(mentions, entities).scores, model(mentions, entities).scores, atol=0, rtol=0)


@pytest.mark.parametrize("release", HEADS, ids=HEAD_IDS)
def test_declared_cache_layout_is_what_encoding_produces(release: bool) -> None:
    model = DIMModel(DIMConfig(**OFFLINE_DIMS, release_head=release))
    entities, mentions = random_features(5, OFFLINE_DIMS, length=7, patches=2), random_features(2, OFFLINE_DIMS)
    entity_cache = model.encode_entities(entities)
    actual = {name: (tuple(tensor.shape[1:]), "bool" if tensor.dtype == torch.bool else "float")
              for name, tensor in vars(entity_cache).items()}
    assert model.entity_cache_layout(text_length=7, image_tokens=2) == actual == {"unit_feature": ((384,), "float")}
    mention_layout = model.mention_cache_class.layout(model.cache_sizes(7, 2))
    assert mention_layout == {"unit_query": ((384,), "float")}
    assert tuple(model.encode_mentions(mentions).unit_query.shape) == (2, 384)


def test_views_widths_initialisation_and_registry() -> None:
    assert MODELS.get("dim") is DIMModel
    views = DIMModel(DIMConfig()).feature_views()
    assert (views.mention, views.entity, views.mention_extra, views.entity_extra) == \
        ("mention_sentence", "desc", ("mention", "caption"), ())
    assert DIMModel(DIMConfig(entity_text="name_desc")).feature_views().entity == "name_desc"
    clip_release = DIMModel(DIMConfig(release_head=True))
    assert clip_release.image_proj is None and not hasattr(clip_release, "cue_attention")
    offline_release = DIMModel(DIMConfig(**OFFLINE_DIMS, release_head=True))
    assert offline_release.image_proj.weight.shape == (384, 1280)
    paper = DIMModel(DIMConfig())
    assert paper.img_trans[0].weight.shape == (512, 512) and paper.cue_attention.num_heads == 8
    assert paper.config.dropout == 0.4 and paper.text_trans[3].p == 0.4


def test_wrong_widths_missing_views_and_bad_configs_are_refused() -> None:
    model = DIMModel(DIMConfig())
    with pytest.raises(MismatchError, match="expects"):
        model.encode_entities(random_features(2, OFFLINE_DIMS))
    mentions = random_features(2, CLIP_DIMS)
    mentions.views["caption"] = PooledView(torch.zeros(2, 384), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(MismatchError, match="'caption' has width 384"):
        model.encode_mentions(mentions)
    del mentions.views["caption"]
    with pytest.raises(KeyError, match="caption"):
        model.encode_mentions(mentions)
    with pytest.raises(ValueError, match="labels must"):
        model(random_features(2, CLIP_DIMS), random_features(3, CLIP_DIMS), labels=torch.tensor([0, 3]))
    for bad in ({"entity_text": "name_attr"}, {"num_heads": 7}, {"dropout": 1.0}, {"l2_weight": -1.0}):
        with pytest.raises(ConfigError):
            DIMConfig(**bad)
    with pytest.raises(ConfigError, match="unknown DIMConfig key"):
        DIMConfig.from_dict({"hidden_dim": 512})
