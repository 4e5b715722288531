"""MIMIC: Multi-Grained Multimodal Interaction Network for Entity Linking (Luo et al., KDD 2023).

Implements shared/specs/models.md §1, read top to bottom in the paper's order: config, encoder
projections and pre-normalisation (§1.2-1.3), TGLU (§1.4), VDLU (§1.5), CMFU (§1.6), final score
and unit-consistency loss (§1.7).

Shape letters: B mentions, N entities, L text tokens, P image tokens (patches, plus CLS where the
backbone has one), Dt text width, Dg global image width, Dp patch width, D hidden width (dv = 96).

Parameter names follow the official release (shared/specs/official_keys.txt) so that an official
checkpoint maps onto this model with a plain prefix table (`mmel.models.convert_official`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from mmel.core.features import FeatureBatch
from mmel.models.base import MelModel, MelModelConfig, RowCache, cache_field, pair_dot
from mmel.models.losses import masked_cross_entropy, usable_columns
from mmel.models.outputs import MatchOutput

# Default bound on the attention logits (or DUAL pair activations) materialised at once while
# scoring: 2**24 float32 values are 64 MiB. `MIMICModel.match` splits the entity side to stay under it.
MAX_PAIR_ELEMENTS = 1 << 24
# Reranking (`match_candidates`) splits the mention side under a smaller bound: chunks whose
# intermediates stay cache-sized (a few mentions at K=100) ran faster on CPU than one mention at a time
# or all at once (bench/bench_ranking.py).
MAX_CANDIDATE_PAIR_ELEMENTS = 1 << 20


@dataclass
class MIMICConfig(MelModelConfig):
    """MIMIC matcher. Widths default to CLIP ViT-B/32 (§1.2); hidden width dv = 96 (§1.8).

    The two mmel options are on by default; setting both to False reproduces the release exactly.

    mask_missing_images: rows whose `FeatureBatch.has_image` is False carry the backbone's features
        of an all-zero picture, which the release scores as if it were a real image. With this on,
        a mention-entity pair in which either side lacks an image gets no VDLU score (the final
        score averages the two remaining units), CMFU drops the image context of an imageless side,
        and the VDLU loss term is computed only over rows and columns where both images exist.
    exclude_duplicate_negatives: when two mentions of a training batch share a gold entity, the
        release uses the other copy as a negative (a false negative). With this on, and entity ids
        given to `forward`, such columns are left out of every cross-entropy term.
    """

    model_type: ClassVar[str] = "mimic"

    # text_dim (dt), image_global_dim (fed to image_cls_fc) and image_patch_dim (fed to
    # image_tokens_fc) come from MelModelConfig with CLIP ViT-B/32's widths (§1.2).
    hidden_dim: int = 96           # dv, the width of every unit (§1.8)
    mask_missing_images: bool = True
    exclude_duplicate_negatives: bool = True


# --- caches of per-side work ---------------------------------------------------------------------


@dataclass
class MIMICEntityCache(RowCache):
    """Everything MIMIC computes from the N entities alone (`MIMICModel.encode_entities`)."""

    text_cls: torch.Tensor = cache_field("Dt")                 # LN(t_cls_e), for s_g2g
    text_cls_key: torch.Tensor = cache_field("D")              # W_c(t_cls_e), for s_g2l
    text_token_queries: torch.Tensor = cache_field("L", "D")   # W_q(t_tok_e)
    e2m_query: torch.Tensor = cache_field("D")                 # DUAL_e2m: cls_fc(v_cls_e)
    e2m_query_norm: torch.Tensor = cache_field("D")            # DUAL_e2m: layer_norm(cls_fc(v_cls_e))
    m2e_key: torch.Tensor = cache_field("D")                   # DUAL_m2e: cls_fc(v_cls_e)
    m2e_value: torch.Tensor = cache_field("D")                 # DUAL_m2e: mean_P tokens_fc(v_tok_e)
    fused: torch.Tensor = cache_field("D")                     # CMFU z_e
    has_image: torch.Tensor = cache_field(kind="bool")


@dataclass
class MIMICMentionCache(RowCache):
    """Everything MIMIC computes from the B mentions alone (`MIMICModel.encode_mentions`)."""

    text_cls: torch.Tensor = cache_field("Dt")                 # LN(t_cls_m)
    text_token_keys: torch.Tensor = cache_field("L", "D")      # W_k(t_tok_m)
    text_token_values: torch.Tensor = cache_field("L", "D")    # W_v(t_tok_m)
    e2m_key: torch.Tensor = cache_field("D")                   # DUAL_e2m: cls_fc(v_cls_m)
    e2m_value: torch.Tensor = cache_field("D")                 # DUAL_e2m: mean_P tokens_fc(v_tok_m)
    m2e_query: torch.Tensor = cache_field("D")                 # DUAL_m2e: cls_fc(v_cls_m)
    m2e_query_norm: torch.Tensor = cache_field("D")            # DUAL_m2e: layer_norm(cls_fc(v_cls_m))
    fused: torch.Tensor = cache_field("D")                     # CMFU z_m
    has_image: torch.Tensor = cache_field(kind="bool")


# --- TGLU ---------------------------------------------------------------------------------------


class TGLU(nn.Module):
    """Text-based Global-Local interaction Unit (models.md §1.4).

    Entity tokens query mention tokens; the attended mention context, averaged over entity tokens
    and layer-normalised, is scored against the entity's global text vector (s_g2l), and the two
    global text vectors are compared directly (s_g2g). s_T = (s_g2l + s_g2g) / 2.

    The average over entity tokens of A @ V equals (average of A over entity tokens) @ V because
    the product is linear in A, so the [N, B, L, D] context tensor is never formed.
    """

    def __init__(self, text_dim: int, hidden_dim: int):
        super().__init__()
        self.fc_query = nn.Linear(text_dim, hidden_dim)   # W_q
        self.fc_key = nn.Linear(text_dim, hidden_dim)     # W_k
        self.fc_value = nn.Linear(text_dim, hidden_dim)   # W_v
        self.fc_cls = nn.Linear(text_dim, hidden_dim)     # W_c
        self.layer_norm = nn.LayerNorm(hidden_dim)
        self.scale = 1.0 / math.sqrt(hidden_dim)

    def encode_entities(self, text_cls: torch.Tensor, text_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, Dt], [N, L, Dt] -> W_c(t_cls_e) [N, D], W_q(t_tok_e) [N, L, D]."""
        return self.fc_cls(text_cls), self.fc_query(text_tokens)

    def encode_mentions(self, text_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L, Dt] -> W_k(t_tok_m) [B, L, D], W_v(t_tok_m) [B, L, D]."""
        return self.fc_key(text_tokens), self.fc_value(text_tokens)

    def score(self, mentions: MIMICMentionCache, entities: MIMICEntityCache) -> torch.Tensor:
        """s_T [B, N] against paired entities (see `MIMICModel.match_candidates`)."""
        if entities.has_image.shape[0] == 1:
            mean_attention = self._mean_attention_all_pairs(mentions, entities)          # [B, N, Lm]
        else:
            mean_attention = self._mean_attention_per_mention(mentions, entities)        # [B, N, Lm]
        context = self.layer_norm(torch.bmm(mean_attention, mentions.text_token_values))  # [B, N, D]
        global_to_local = (entities.text_cls_key * context).sum(dim=-1)                    # [B, N]
        global_to_global = pair_dot(mentions.text_cls, entities.text_cls)                 # [B, N]
        return (global_to_local + global_to_global) / 2

    def _mean_attention_all_pairs(self, mentions: MIMICMentionCache, entities: MIMICEntityCache) -> torch.Tensor:
        """Entity-token attention over mention tokens, averaged over entity tokens: [B, N, Lm].

        Every mention meets the same N entities, so one [N*Le, B*Lm] product covers all pairs.
        """
        queries, keys = entities.text_token_queries[0], mentions.text_token_keys           # [N, Le, D], [B, Lm, D]
        num_entities, entity_length, hidden = queries.shape
        num_mentions, mention_length, _ = keys.shape
        scaled_keys = keys.reshape(-1, hidden) * self.scale  # the smallest factor, not the [N*Le, B*Lm] logits
        logits = queries.reshape(-1, hidden) @ scaled_keys.T                              # [N*Le, B*Lm]
        attention = logits.view(num_entities, entity_length, num_mentions, mention_length).softmax(dim=-1)
        return attention.mean(dim=1).transpose(0, 1)                                      # [B, N, Lm]

    def _mean_attention_per_mention(self, mentions: MIMICMentionCache, entities: MIMICEntityCache) -> torch.Tensor:
        """The same when mention b meets its own N entities (candidates): one [N*Le, Lm] product per mention."""
        queries, keys = entities.text_token_queries, mentions.text_token_keys              # [B, N, Le, D], [B, Lm, D]
        num_mentions, num_entities, entity_length, hidden = queries.shape
        scaled_keys = keys.transpose(1, 2) * self.scale                                   # [B, D, Lm]
        logits = torch.bmm(queries.reshape(num_mentions, -1, hidden), scaled_keys)        # [B, N*Le, Lm]
        attention = logits.view(num_mentions, num_entities, entity_length, -1).softmax(dim=-1)
        return attention.mean(dim=2)                                                      # [B, N, Lm]


# --- VDLU ---------------------------------------------------------------------------------------


class DUAL(nn.Module):
    """One direction of VDLU (models.md §1.5): DUAL(query_cls [a], key_cls [b], value_tokens [b, P]) -> [a, b].

    The query-side and key/value-side projections depend on one side only; `encode_query` and
    `encode_key_value` compute them once so ranking reuses them for every pair.
    """

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.cls_fc = nn.Linear(hidden_dim, hidden_dim)
        self.tokens_fc = nn.Linear(hidden_dim, hidden_dim)
        self.fc = nn.Linear(hidden_dim, hidden_dim)
        self.gate_fc = nn.Linear(hidden_dim, 1)
        self.add_layer_norm = nn.LayerNorm(hidden_dim)
        self.layer_norm = nn.LayerNorm(hidden_dim)

    def encode_query(self, query_cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[a, D] -> q = cls_fc(query_cls) [a, D] and layer_norm(q) [a, D]."""
        query = self.cls_fc(query_cls)
        return query, self.layer_norm(query)

    def encode_key_value(self, key_cls: torch.Tensor, value_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[b, D], [b, P, D] -> k = cls_fc(key_cls) [b, D], v = mean_P tokens_fc(value_tokens) [b, D]."""
        return self.cls_fc(key_cls), self.tokens_fc(value_tokens).mean(dim=1)

    def score(self, query: torch.Tensor, query_norm: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor) -> torch.Tensor:
        """Query side [..., D] x2 and key/value side [..., D] x2, broadcast against each other -> [...].

        E.g. queries [a, 1, D] against keys [1, b, D] give all pairs [a, b]; [B, 1, D] against
        [B, K, D] give each mention's own K candidates.
        """
        combined = self.fc(self.add_layer_norm(value + query))        # [..., D]
        gate = torch.tanh(self.gate_fc(combined))                     # [..., 1]
        hidden = self.layer_norm(combined * gate + key)               # [..., D]
        return (hidden * query_norm).sum(dim=-1)                      # [...]


class VDLU(nn.Module):
    """Vision-based DuaL interaction Unit (models.md §1.5): s_V = (s_e2m.T + s_m2e) / 2."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.dual_ent2men = DUAL(hidden_dim)
        self.dual_men2ent = DUAL(hidden_dim)

    def score(self, mentions: MIMICMentionCache, entities: MIMICEntityCache) -> torch.Tensor:
        """s_V [B, N] against paired entities (see `MIMICModel.match_candidates`)."""
        entity_to_mention = self.dual_ent2men.score(entities.e2m_query, entities.e2m_query_norm,
                                                    mentions.e2m_key[:, None, :], mentions.e2m_value[:, None, :])
        mention_to_entity = self.dual_men2ent.score(mentions.m2e_query[:, None, :], mentions.m2e_query_norm[:, None, :],
                                                    entities.m2e_key, entities.m2e_value)   # [B, N] each
        return (entity_to_mention + mention_to_entity) / 2


# --- CMFU ---------------------------------------------------------------------------------------


class CMFU(nn.Module):
    """Cross-Modal Fusion-based interaction Unit (models.md §1.6): s_C = z_m @ z_e.T.

    Each side is fused on its own: z = LN(u * tanh(gate(u)) + ctx), with u the projected global
    text vector and ctx its (unscaled) attention over the projected image tokens. Where
    `image_present` is given, ctx is zeroed for rows without an image.

    `context_layer_norm` exists in the release but its forward never uses it; it is kept so that
    official checkpoints load strictly and the parameter count matches §1.11.
    """

    def __init__(self, text_dim: int, hidden_dim: int):
        super().__init__()
        self.text_fc = nn.Linear(text_dim, hidden_dim)
        self.image_fc = nn.Linear(hidden_dim, hidden_dim)
        self.gate_fc = nn.Linear(hidden_dim, 1)
        self.gate_layer_norm = nn.LayerNorm(hidden_dim)
        self.context_layer_norm = nn.LayerNorm(hidden_dim)

    def fuse(self, text_cls: torch.Tensor, image_tokens: torch.Tensor,
             image_present: torch.Tensor | None) -> torch.Tensor:
        """[X, Dt], [X, P, D], optional [X] bool -> z [X, D]."""
        text = self.text_fc(text_cls)                                        # [X, D]
        image = self.image_fc(image_tokens)                                  # [X, P, D]
        attention = torch.einsum("xd,xpd->xp", text, image).softmax(dim=-1)  # [X, P]
        context = torch.einsum("xp,xpd->xd", attention, image)               # [X, D]
        if image_present is not None:
            context = context * image_present[:, None].to(context.dtype)
        return self.gate_layer_norm(text * torch.tanh(self.gate_fc(text)) + context)


# --- the model ----------------------------------------------------------------------------------


class MIMICModel(MelModel):
    """MIMIC over precomputed features: s = (s_T + s_V + s_C) / 3 (models.md §1.7).

    `image_cls_fc` and `image_tokens_fc` sit in the release's encoder; here they belong to the
    model, since models read features. With `mask_missing_images`, pair availability
    m[b, n] = has_image_m[b] and has_image_e[n]; the final score is (s_T + s_C + m * s_V) / (2 + m),
    the reported "vdlu" unit score is 0 where m = 0, and CMFU ignores the blank image of a side
    without one. Scores then do not depend at all on the blank-image features: a pair lacking an
    image is scored by the units that have evidence, on the same scale (an average of unit scores)
    as pairs with both images.
    """

    config_class = MIMICConfig
    config: MIMICConfig
    entity_cache_class = MIMICEntityCache
    mention_cache_class = MIMICMentionCache
    unit_names = ("tglu", "vdlu", "cmfu")

    def __init__(self, config: MIMICConfig):
        super().__init__(config)
        hidden = config.hidden_dim
        self.image_cls_fc = nn.Linear(config.image_global_dim, hidden)
        self.image_tokens_fc = nn.Linear(config.image_patch_dim, hidden)
        self.text_cls_layernorm = nn.LayerNorm(config.text_dim)
        self.text_tokens_layernorm = nn.LayerNorm(config.text_dim)
        self.image_cls_layernorm = nn.LayerNorm(hidden)
        self.image_tokens_layernorm = nn.LayerNorm(hidden)
        self.tglu = TGLU(config.text_dim, hidden)
        self.vdlu = VDLU(hidden)
        self.cmfu = CMFU(config.text_dim, hidden)
        self.max_pair_elements = MAX_PAIR_ELEMENTS
        self.max_candidate_pair_elements = MAX_CANDIDATE_PAIR_ELEMENTS

    def cache_sizes(self, text_length: int, image_tokens: int) -> dict[str, int]:
        return {**super().cache_sizes(text_length, image_tokens), "D": self.config.hidden_dim}

    # --- per-side encoding (§1.2-1.3 and the side-only parts of each unit) ----------------------
    def _prenormalise(self, batch: FeatureBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """t_cls [X, Dt], t_tok [X, L, Dt], v_cls [X, D], v_tok [X, P, D], each layer-normalised (§1.3)."""
        self.check_widths(batch)
        text_cls = self.text_cls_layernorm(batch.text_global)
        text_tokens = self.text_tokens_layernorm(batch.text_tokens)
        image_cls = self.image_cls_layernorm(self.image_cls_fc(batch.image_global))
        image_tokens = self.image_tokens_layernorm(self.image_tokens_fc(batch.image_patches))
        return text_cls, text_tokens, image_cls, image_tokens

    def _image_presence(self, batch: FeatureBatch) -> torch.Tensor | None:
        return batch.has_image.bool() if self.config.mask_missing_images else None

    def encode_entities(self, entities: FeatureBatch) -> MIMICEntityCache:
        text_cls, text_tokens, image_cls, image_tokens = self._prenormalise(entities)
        text_cls_key, text_token_queries = self.tglu.encode_entities(text_cls, text_tokens)
        e2m_query, e2m_query_norm = self.vdlu.dual_ent2men.encode_query(image_cls)
        m2e_key, m2e_value = self.vdlu.dual_men2ent.encode_key_value(image_cls, image_tokens)
        fused = self.cmfu.fuse(text_cls, image_tokens, self._image_presence(entities))
        return MIMICEntityCache(text_cls=text_cls, text_cls_key=text_cls_key, text_token_queries=text_token_queries,
                                e2m_query=e2m_query, e2m_query_norm=e2m_query_norm, m2e_key=m2e_key,
                                m2e_value=m2e_value, fused=fused, has_image=entities.has_image.bool())

    def encode_mentions(self, mentions: FeatureBatch) -> MIMICMentionCache:
        text_cls, text_tokens, image_cls, image_tokens = self._prenormalise(mentions)
        text_token_keys, text_token_values = self.tglu.encode_mentions(text_tokens)
        e2m_key, e2m_value = self.vdlu.dual_ent2men.encode_key_value(image_cls, image_tokens)
        m2e_query, m2e_query_norm = self.vdlu.dual_men2ent.encode_query(image_cls)
        fused = self.cmfu.fuse(text_cls, image_tokens, self._image_presence(mentions))
        return MIMICMentionCache(text_cls=text_cls, text_token_keys=text_token_keys,
                                 text_token_values=text_token_values, e2m_key=e2m_key, e2m_value=e2m_value,
                                 m2e_query=m2e_query, m2e_query_norm=m2e_query_norm, fused=fused,
                                 has_image=mentions.has_image.bool())

    # --- scoring (§1.7) -------------------------------------------------------------------------
    # Scoring pairs mentions [B] with entity caches whose tensors carry a leading pairing axis:
    # [1, N, ...] when every mention meets the same N entities (`match`), [B, K, ...] when mention b
    # meets only its own K candidates (`match_candidates`). The units broadcast over that axis.

    def match(self, mentions: MIMICMentionCache, entities: MIMICEntityCache) -> MatchOutput:
        """Scores [B, N] and unit scores; the entity side is split so no chunk exceeds `max_pair_elements`."""
        chunk = max(1, self.max_pair_elements // (len(mentions) * self._pair_elements(mentions, entities)))
        parts = [self._match_paired(mentions, entities.select(slice(start, start + chunk)).paired())
                 for start in range(0, max(len(entities), 1), chunk)]
        return MatchOutput.concat(parts, dim=1)

    def match_candidates(self, mentions: MIMICMentionCache, entities: MIMICEntityCache,
                         candidates: torch.Tensor) -> MatchOutput:
        """Scores [B, K]: mention b against its own candidates, the entity rows `candidates[b]` ([B, K] ints).

        Only the B x K pairs are scored (the reranking cost), never all B x (B * K); the mention
        side is split so no chunk exceeds `max_candidate_pair_elements`.
        """
        candidates = torch.as_tensor(candidates, dtype=torch.long)
        per_mention = max(candidates.shape[1], 1) * self._pair_elements(mentions, entities)
        chunk = max(1, self.max_candidate_pair_elements // per_mention)
        parts = [self._match_paired(mentions.select(slice(start, start + chunk)),
                                    entities.select(candidates[start:start + chunk]))
                 for start in range(0, max(len(mentions), 1), chunk)]
        return MatchOutput.concat(parts, dim=0)

    def _pair_elements(self, mentions: MIMICMentionCache, entities: MIMICEntityCache) -> int:
        """Values materialised per mention-entity pair: TGLU's attention logits, or a DUAL activation."""
        entity_length = entities.text_token_queries.shape[-2]
        mention_length = mentions.text_token_keys.shape[1]
        return max(entity_length * mention_length, self.config.hidden_dim, 1)

    def _match_paired(self, mentions: MIMICMentionCache, entities: MIMICEntityCache) -> MatchOutput:
        """Mentions [B] against paired entities [1 | B, N, ...] -> scores [B, N]."""
        text_score = self.tglu.score(mentions, entities)                     # [B, N]
        visual_score = self.vdlu.score(mentions, entities)                   # [B, N]
        fusion_score = pair_dot(mentions.fused, entities.fused)             # [B, N]
        if not self.config.mask_missing_images:
            scores = (text_score + visual_score + fusion_score) / 3
        else:
            pair_has_images = mentions.has_image[:, None] & entities.has_image                  # [B, N]
            visual_score = torch.where(pair_has_images, visual_score, torch.zeros_like(visual_score))
            scores = (text_score + fusion_score + visual_score) / (2 + pair_has_images.to(text_score.dtype))
        return MatchOutput(scores=scores, unit_scores={"tglu": text_score, "vdlu": visual_score, "cmfu": fusion_score})

    def forward(self, mentions: FeatureBatch, entities: FeatureBatch, labels: torch.Tensor | None = None,
                entity_ids: torch.Tensor | None = None, rows: slice | None = None) -> MatchOutput:
        """Score B mentions against N entities; with `labels` [B] (gold column per row), add the loss.

        `entity_ids` [N] identifies the entity of each column (e.g. its KB row) so that, with
        `exclude_duplicate_negatives`, a column holding the same entity as a row's gold column is
        not used as that row's negative. `rows` (data-parallel training, see `MelModel.forward`)
        scores only those mentions, [b, N], and returns their share of the batch loss.
        """
        mention_cache = self.encode_mentions(mentions if rows is None else mentions.select(rows))
        entity_cache = self.encode_entities(entities)
        output = self.match(mention_cache, entity_cache)
        if labels is not None:
            output.loss, output.unit_losses = self.unit_consistency_loss(
                output, labels, entity_ids, mentions.has_image, entity_cache.has_image, rows=rows)
        return output

    # --- loss (§1.7) ----------------------------------------------------------------------------
    def unit_consistency_loss(self, output: MatchOutput, labels: torch.Tensor, entity_ids: torch.Tensor | None,
                              mention_has_image: torch.Tensor, entity_has_image: torch.Tensor,
                              rows: slice | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L = CE(s) + CE(s_T) + CE(s_V) + CE(s_C), each a mean cross-entropy over the batch rows.

        `labels` and `mention_has_image` cover the whole batch [B]; `output` holds the scores of
        `rows` (all if None), whose share of each mean is returned.
        """
        labels = labels.long()
        rows = slice(None) if rows is None else rows
        own_labels = labels[rows]                                                            # [b]
        ids = entity_ids if self.config.exclude_duplicate_negatives else None
        usable = usable_columns(own_labels, output.scores.shape[1], ids)                    # [b, N]
        total = len(labels)
        losses = {"overall": masked_cross_entropy(output.scores, own_labels, usable, total=total),
                  "tglu": masked_cross_entropy(output.unit_scores["tglu"], own_labels, usable, total=total),
                  "cmfu": masked_cross_entropy(output.unit_scores["cmfu"], own_labels, usable, total=total)}
        visual_usable, visual_rows, visual_total = usable, None, total
        if self.config.mask_missing_images:
            mention_has_image, entity_has_image = mention_has_image.bool(), entity_has_image.bool()
            visual_usable = usable & (mention_has_image[rows][:, None] & entity_has_image[None, :])   # [b, N]
            gold_pair_has_images = mention_has_image & entity_has_image[labels]                      # [B]
            visual_rows, visual_total = gold_pair_has_images[rows], gold_pair_has_images.sum()
        losses["vdlu"] = masked_cross_entropy(output.unit_scores["vdlu"], own_labels, visual_usable, visual_rows,
                                              total=visual_total)
        return losses["overall"] + losses["tglu"] + losses["vdlu"] + losses["cmfu"], losses



__all__ = ["CMFU", "DUAL", "TGLU", "VDLU", "MIMICConfig", "MIMICEntityCache", "MIMICMentionCache", "MIMICModel"]
