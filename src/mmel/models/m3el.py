"""M3EL: Multi-level Matching Network for Multimodal Entity Linking (Hu et al., KDD 2025).

Implements shared/specs/models.md §3, read top to bottom in the paper's order: config, encoder
projections and pre-normalisation (§3.2, §3.4), IMN for text (TIMM) and images (IIMM) (§3.5), CMN
with its MatchModule / CSRA MultiHeadModule / FusionModule helpers, T2V and bidirectional
T2V + V2T (§3.6), the MFE intra-modal contrastive loss (§3.7), final score and loss (§3.8).

M3EL is forked from MIMIC (§2): same features, same pre-normalisation, same in-batch training.
This file repeats the few pieces it shares with `mmel.models.mimic` rather than importing them
(architecture rule 1: one published model per file, readable on its own).

Shape letters: B mentions, N entities, L text tokens, P image tokens (patches, plus CLS where the
backbone has one), Dt text width, Dg global image width, Dp patch width, D hidden width (96).

Parameter names follow the official release (shared/specs/official_keys.txt) so that an official
checkpoint maps onto this model with a prefix table (`mmel.models.convert_official`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mmel.core.config import ConfigError
from mmel.core.features import FeatureBatch, FeatureViews
from mmel.models.base import MelModel, MelModelConfig, RowCache, cache_field, pair_dot
from mmel.models.losses import masked_cross_entropy, same_entity_columns, usable_columns
from mmel.models.outputs import MatchOutput

# Default bound on the attention logits materialised at once while scoring: 2**24 float32 values
# are 64 MiB. `M3ELModel.match` splits the entity side to stay under it (as MIMIC does).
MAX_PAIR_ELEMENTS = 1 << 24
# Reranking (`match_candidates`) splits the mention side under a smaller, cache-sized bound (as MIMIC does).
MAX_CANDIDATE_PAIR_ELEMENTS = 1 << 20
# The CSRA convention (§3.6): a head whose temperature is 99 pools by max instead of a softmax.
MAX_POOLING_TEMPERATURE = 99.0
# Unit scores that exist only where both sides of a pair have an image (`mask_missing_images`).
IMAGE_UNITS = ("image", "v2t")
ENTITY_TEXT_VIEWS = {"attr": "name_attr", "desc": "name_desc"}   # the paper's M3EL_attr / M3EL_desc (§3.1)


@dataclass
class M3ELConfig(MelModelConfig):
    """M3EL matcher. Widths default to CLIP ViT-B/32 (§3.2); the rest follows §3.6-3.8.

    entity_text: "desc" (`name [SEP] desc`, the current release) or "attr" (`name [SEP] attr`): the
        paper's two variants M3EL_desc / M3EL_attr (§3.1). It decides `feature_views()`.
    bidirectional: CMN as CrossModalMatchBidirection (T2V + V2T, s = (s_T + s_V + s_TV + s_VT) / 4)
        instead of CrossModalMatch (T2V, s = (s_T + s_V + s_C) / 3). The release uses it only when
        training on WikiDiverse (§3.8).

    Two mmel options, on by default, as in MIMIC (False for both reproduces the release):

    mask_missing_images: a pair in which either side lacks an image gets no image-unit scores
        (s_V, and s_VT when bidirectional); the final score averages the remaining units. CMN drops
        the image context of an imageless side (T2V). The image-unit loss terms, and the image half
        of the contrastive loss, use only rows and columns where both images exist.
    exclude_duplicate_negatives: with entity ids given to `forward`, a column holding the same
        entity as a row's gold column is left out of every cross-entropy term, and two batch rows
        that share a gold entity are not each other's negatives in the contrastive loss.

    Two release quirks, off by default (mmel implements the evident intent), on to reproduce it:

    release_single_key_cmn_branch: CMN's `MatchModule([P, u])` lets every image token attend over
        a key sequence of length one (the text vector), so its softmax is identically 1 and the
        branch equals ReLU(W u) at every position: it carries no image information (§3.6 release
        observation; likewise `MatchModule([It, Tc])` and `MatchModule([Tt, Ic])` in the
        bidirectional unit). The evident intent is token-to-text matching, so mmel normalises that
        single-key attention over the token axis instead (how strongly each token matches the
        text, relative to the other tokens), scaled by the number of tokens so the mean weight is
        1: where all tokens match equally the branch equals the release's ReLU(W u) exactly, and
        otherwise it follows the image. The parameters are unchanged, so official weights load
        either way; True reproduces the release's computation.
    release_t2v_inference: with `bidirectional`, the release trains the bidirectional unit but
        ranks with CrossModalMatch, which never received a gradient (§3.8 release observation).
        mmel ranks with what it trained, (s_T + s_V + s_TV + s_VT) / 4; True builds both units,
        trains the bidirectional one and ranks with the T2V one, as the release does.
    """

    model_type: ClassVar[str] = "m3el"

    # text_dim (dt), image_global_dim (fed to image_cls_fc) and image_patch_dim (fed to
    # image_tokens_fc) come from MelModelConfig with CLIP ViT-B/32's widths (§3.2).
    hidden_dim: int = 96                       # TIMM/IIMM/CMM hidden width, dv (§3.8)
    entity_text: str = "desc"                  # "attr" | "desc" (§3.1)
    bidirectional: bool = False                # T2V + V2T CMN (§3.6; the release's WikiDiverse training)
    csra_temperatures: tuple[float, ...] = (2.0, 2.5, 3.5, 4.5, 99.0)   # one CSRA head each, head_num 5 (§3.6)
    csra_lambda: float = 1.0                   # CSRA λ, the config's `weight` (§3.6)
    loss_temperature: float = 0.03             # τ of the contrastive loss (§3.7)
    inter_weight: float = 1.0                  # weight of the entity-mention block (§3.7)
    intra_weight: float = 0.8                  # weight of the same-side block (§3.7)
    mask_missing_images: bool = True
    exclude_duplicate_negatives: bool = True
    release_single_key_cmn_branch: bool = False
    release_t2v_inference: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.entity_text not in ENTITY_TEXT_VIEWS:
            raise ConfigError(f"M3ELConfig.entity_text must be one of {sorted(ENTITY_TEXT_VIEWS)}, "
                              f"got {self.entity_text!r}")
        if not self.csra_temperatures or any(t <= 0 for t in self.csra_temperatures):
            raise ConfigError(f"M3ELConfig.csra_temperatures must be positive numbers, got {self.csra_temperatures}")
        if self.loss_temperature <= 0:
            raise ConfigError(f"M3ELConfig.loss_temperature must be positive, got {self.loss_temperature}")

    @property
    def builds_t2v_unit(self) -> bool:
        """Whether the model holds CrossModalMatch (T2V): always, except bidirectional without the release quirk."""
        return not self.bidirectional or self.release_t2v_inference

    @property
    def ranks_bidirectionally(self) -> bool:
        """Whether ranking (inference) uses the bidirectional CMN score."""
        return self.bidirectional and not self.release_t2v_inference


# --- caches of per-side work ---------------------------------------------------------------------
# Letter C is D when the model holds CrossModalMatch and 0 otherwise; letter X is D when it holds
# CrossModalMatchBidirection and 0 otherwise (`M3ELModel.cache_sizes`), so the layout always
# matches what `encode_entities` produces.


@dataclass
class M3ELEntityCache(RowCache):
    """Everything M3EL computes from the N entities alone (`M3ELModel.encode_entities`)."""

    text_cls: torch.Tensor = cache_field("Dt")                  # LN(t_cls_e), for s_G2G_text
    text_cls_key: torch.Tensor = cache_field("D")               # TIMM W_c(t_cls_e), for s_G2L_text
    text_token_queries: torch.Tensor = cache_field("L", "D")    # TIMM W_q(t_tok_e)
    image_cls: torch.Tensor = cache_field("D")                  # LN(v_cls_e), for s_G2G_img
    image_cls_key: torch.Tensor = cache_field("D")              # IIMM W_c(v_cls_e)
    image_token_queries: torch.Tensor = cache_field("P", "D")   # IIMM W_q(v_tok_e)
    cross: torch.Tensor = cache_field("C")                      # CMN T2V z_e
    t2v: torch.Tensor = cache_field("X")                        # bidirectional CMN z_tv_e
    v2t: torch.Tensor = cache_field("X")                        # bidirectional CMN z_vt_e
    has_image: torch.Tensor = cache_field(kind="bool")


@dataclass
class M3ELMentionCache(RowCache):
    """Everything M3EL computes from the B mentions alone (`M3ELModel.encode_mentions`)."""

    text_cls: torch.Tensor = cache_field("Dt")                  # LN(t_cls_m)
    text_token_keys: torch.Tensor = cache_field("L", "D")       # TIMM W_k(t_tok_m)
    text_token_values: torch.Tensor = cache_field("L", "D")     # TIMM W_v(t_tok_m)
    image_cls: torch.Tensor = cache_field("D")                  # LN(v_cls_m)
    image_token_keys: torch.Tensor = cache_field("P", "D")      # IIMM W_k(v_tok_m)
    image_token_values: torch.Tensor = cache_field("P", "D")    # IIMM W_v(v_tok_m)
    cross: torch.Tensor = cache_field("C")                      # CMN T2V z_m
    t2v: torch.Tensor = cache_field("X")                        # bidirectional CMN z_tv_m
    v2t: torch.Tensor = cache_field("X")                        # bidirectional CMN z_vt_m
    has_image: torch.Tensor = cache_field(kind="bool")


# --- IMN: TIMM (text) and IIMM (image) ---------------------------------------------------------


class IMN(nn.Module):
    """Intra-modal Matching Network for one modality (models.md §3.5): TIMM on text, IIMM on images.

    Both are MIMIC's TGLU structure: entity tokens query mention tokens, the attended mention
    context is averaged over entity tokens and layer-normalised, then scored against the entity's
    projected global vector (fine-grained G2L); the two global vectors are compared directly
    (coarse-grained G2G). s = (s_G2L + s_G2G) / 2. TIMM reads Dt-wide text, IIMM D-wide images.

    The average over entity tokens of A @ V equals (average of A over entity tokens) @ V because
    the product is linear in A, so the [N, B, L, D] context tensor is never formed.
    """

    def __init__(self, input_dim: int, hidden_dim: int):
        super().__init__()
        self.fc_query = nn.Linear(input_dim, hidden_dim)   # W_q
        self.fc_key = nn.Linear(input_dim, hidden_dim)     # W_k
        self.fc_value = nn.Linear(input_dim, hidden_dim)   # W_v
        self.fc_cls = nn.Linear(input_dim, hidden_dim)     # W_c
        self.layer_norm = nn.LayerNorm(hidden_dim)
        self.scale = 1.0 / math.sqrt(hidden_dim)

    def encode_entities(self, cls: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, Din], [N, L, Din] -> W_c(cls) [N, D], W_q(tokens) [N, L, D]."""
        return self.fc_cls(cls), self.fc_query(tokens)

    def encode_mentions(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L, Din] -> W_k(tokens) [B, L, D], W_v(tokens) [B, L, D]."""
        return self.fc_key(tokens), self.fc_value(tokens)

    def score(self, mention_cls: torch.Tensor, mention_keys: torch.Tensor, mention_values: torch.Tensor,
              entity_cls: torch.Tensor, entity_cls_key: torch.Tensor, entity_queries: torch.Tensor) -> torch.Tensor:
        """Mentions [B, Din], [B, Lm, D] x2 against paired entities [1 | B, N, Din], [.., D], [.., Le, D] -> [B, N]."""
        if entity_queries.shape[0] == 1:
            mean_attention = self._mean_attention_all_pairs(mention_keys, entity_queries[0])   # [B, N, Lm]
        else:
            mean_attention = self._mean_attention_per_mention(mention_keys, entity_queries)    # [B, N, Lm]
        context = self.layer_norm(torch.bmm(mean_attention, mention_values))                  # [B, N, D]
        global_to_local = (entity_cls_key * context).sum(dim=-1)                                # [B, N]
        global_to_global = pair_dot(mention_cls, entity_cls)                                   # [B, N]
        return (global_to_local + global_to_global) / 2

    def _mean_attention_all_pairs(self, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Keys [B, Lm, D], queries [N, Le, D] -> attention averaged over entity tokens [B, N, Lm]."""
        num_entities, entity_length, hidden = queries.shape
        num_mentions, mention_length, _ = keys.shape
        scaled_keys = keys.reshape(-1, hidden) * self.scale  # the smallest factor, not the [N*Le, B*Lm] logits
        logits = queries.reshape(-1, hidden) @ scaled_keys.T                                   # [N*Le, B*Lm]
        attention = logits.view(num_entities, entity_length, num_mentions, mention_length).softmax(dim=-1)
        return attention.mean(dim=1).transpose(0, 1)                                           # [B, N, Lm]

    def _mean_attention_per_mention(self, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Keys [B, Lm, D], queries [B, N, Le, D] (mention b's own N entities) -> [B, N, Lm]."""
        num_mentions, num_entities, entity_length, hidden = queries.shape
        scaled_keys = keys.transpose(1, 2) * self.scale                                        # [B, D, Lm]
        logits = torch.bmm(queries.reshape(num_mentions, -1, hidden), scaled_keys)             # [B, N*Le, Lm]
        attention = logits.view(num_mentions, num_entities, entity_length, -1).softmax(dim=-1)
        return attention.mean(dim=2)                                                           # [B, N, Lm]


# --- CMN helpers: MatchModule, CSRA MultiHeadModule, FusionModule -------------------------------


class MatchModule(nn.Module):
    """MatchModule([p, q]) = ReLU(W(softmax(p @ (W q)^T) @ q)) with one Linear W used twice (§3.6).

    `p` [X, Lp, D] attends over `q` [X, Lq, D]; the output is aligned with p: [X, Lp, D]. With
    `normalise_over_queries`, the attention is normalised over p's axis instead of q's and scaled
    by Lp (mean weight 1): mmel's fix for single-key calls (see `M3ELConfig`).
    """

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.trans_linear = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, *, normalise_over_queries: bool = False
                ) -> torch.Tensor:
        logits = queries @ self.trans_linear(keys).transpose(1, 2)                 # [X, Lp, Lq]
        # over q's axis (the paper's form), or over p's axis scaled to mean weight 1 (mmel's single-key fix)
        attention = logits.softmax(dim=1) * queries.shape[1] if normalise_over_queries else logits.softmax(dim=-1)
        return F.relu(self.trans_linear(attention @ keys))                        # [X, Lp, D]


class MultiHeadModule(nn.Module):
    """Mean of CSRA heads (class-specific residual attention, §3.6): [X, L, D] -> [X, D].

    CSRA_T(x) = mean_L(x) + λ * att_T(x), att_T = max_L(x) for T = 99, else sum_L(x * softmax_L(T x)),
    per channel. The release's head weights are fixed ones, so the heads are simply averaged; the
    module has no trainable parameters.
    """

    def __init__(self, temperatures: tuple[float, ...], lam: float):
        super().__init__()
        self.temperatures = tuple(float(t) for t in temperatures)
        self.lam = lam

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        base = tokens.mean(dim=1)                                                  # [X, D]
        heads = []
        for temperature in self.temperatures:
            if temperature == MAX_POOLING_TEMPERATURE:
                attended = tokens.amax(dim=1)                                      # [X, D]
            else:
                attended = (tokens * (temperature * tokens).softmax(dim=1)).sum(dim=1)
            heads.append(base + self.lam * attended)
        return torch.stack(heads).mean(dim=0)                                      # [X, D]


class FusionModule(nn.Module):
    """Fusion([p, q]) = p * σ(W p + W q) + q * (1 − σ(W p + W q)), one Linear W applied to each (§3.6)."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.linear = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.linear(first) + self.linear(second))             # [X, D]
        return first * gate + second * (1 - gate)


# --- CMN: CrossModalMatch (T2V) and CrossModalMatchBidirection (T2V + V2T) ----------------------


class CrossModalMatch(nn.Module):
    """CMN, Textual-to-Visual (§3.6): z = gate_LN(u * tanh(gate_fc(u)) + Fusion(a, MultiHead(Pb))); s_C = z_m @ z_e.T.

    u is the projected global text vector and P the projected image tokens; a = MatchModule([u, P])
    is the text attending over the tokens, Pb = MatchModule([P, u]) the tokens matched to the text.
    Each side is fused on its own, so z is cached per row. Where `image_present` is given, the
    image context is zeroed for rows without an image.
    """

    def __init__(self, text_dim: int, hidden_dim: int, temperatures: tuple[float, ...], lam: float,
                 release_single_key: bool):
        super().__init__()
        self.text_fc = nn.Linear(text_dim, hidden_dim)
        self.image_fc = nn.Linear(hidden_dim, hidden_dim)
        self.gate_fc = nn.Linear(hidden_dim, 1)
        self.gate_layer_norm = nn.LayerNorm(hidden_dim)
        self.match_module = MatchModule(hidden_dim)
        self.multi_head_module = MultiHeadModule(temperatures, lam)
        self.fusion_module = FusionModule(hidden_dim)
        self.release_single_key = release_single_key

    def forward(self, text_cls: torch.Tensor, image_tokens: torch.Tensor, image_present: torch.Tensor | None
                ) -> torch.Tensor:
        """[X, Dt], [X, P, D], optional [X] bool -> z [X, D]."""
        text = self.text_fc(text_cls)                                              # u [X, D]
        image = self.image_fc(image_tokens)                                        # P [X, P, D]
        attended = self.match_module(text[:, None, :], image).squeeze(1)           # a [X, D]
        matched = self.match_module(image, text[:, None, :],
                                    normalise_over_queries=not self.release_single_key)   # Pb [X, P, D]
        context = self.fusion_module(attended, self.multi_head_module(matched))    # [X, D]
        if image_present is not None:
            context = context * image_present[:, None].to(context.dtype)
        return self.gate_layer_norm(text * torch.tanh(self.gate_fc(text)) + context)


class CrossModalMatchBidirection(nn.Module):
    """CMN, T2V + V2T (§3.6): one set of blocks shared by both directions, no FusionModule.

    z_tv = gate_LN(Tc * tanh(gate_fc(Tc)) + MultiHead(cat[a1, b1])) with the text vector Tc meeting
    the image tokens It; z_vt the same with the image vector Ic meeting the text tokens Tt.
    s_TV = z_tv_m @ z_tv_e.T and s_VT = z_vt_m @ z_vt_e.T. Where `image_present` is given, the
    image context of z_tv is zeroed for rows without an image (s_VT is masked by the model).
    """

    def __init__(self, text_dim: int, hidden_dim: int, temperatures: tuple[float, ...], lam: float,
                 release_single_key: bool):
        super().__init__()
        self.text_fc = nn.Linear(text_dim, hidden_dim)
        self.image_fc = nn.Linear(hidden_dim, hidden_dim)
        self.gate_fc = nn.Linear(hidden_dim, 1)
        self.gate_layer_norm = nn.LayerNorm(hidden_dim)
        self.match_module = MatchModule(hidden_dim)
        self.multi_head_module = MultiHeadModule(temperatures, lam)
        self.release_single_key = release_single_key

    def forward(self, text_cls: torch.Tensor, text_tokens: torch.Tensor, image_cls: torch.Tensor,
                image_tokens: torch.Tensor, image_present: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """[X, Dt], [X, L, Dt], [X, D], [X, P, D], optional [X] bool -> z_tv [X, D], z_vt [X, D]."""
        text_global, text_tokens = self.text_fc(text_cls), self.text_fc(text_tokens)         # [X, D], [X, L, D]
        image_global, image_tokens = self.image_fc(image_cls), self.image_fc(image_tokens)   # [X, D], [X, P, D]
        text_to_visual = self._direction(text_global, image_tokens, image_present)
        visual_to_text = self._direction(image_global, text_tokens, None)
        return text_to_visual, visual_to_text

    def _direction(self, query: torch.Tensor, tokens: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
        """Global vector [X, D] of one modality meeting the tokens [X, T, D] of the other -> z [X, D]."""
        attended = self.match_module(query[:, None, :], tokens)                            # a [X, 1, D]
        matched = self.match_module(tokens, query[:, None, :],
                                    normalise_over_queries=not self.release_single_key)     # b [X, T, D]
        context = self.multi_head_module(torch.cat([attended, matched], dim=1))            # [X, D]
        if present is not None:
            context = context * present[:, None].to(context.dtype)
        return self.gate_layer_norm(query * torch.tanh(self.gate_fc(query)) + context)


# --- MFE intra-modal contrastive loss -----------------------------------------------------------


def intra_modal_contrastive_loss(entity: torch.Tensor, mention: torch.Tensor, *, temperature: float,
                                 inter_weight: float, intra_weight: float,
                                 same_entity: torch.Tensor | None = None,
                                 anchors: torch.Tensor | None = None) -> torch.Tensor:
    """L_cl(E, M) of §3.7 for gold-aligned rows E [R, W] (row i is mention i's gold entity) and M [R, W].

    Row i's positive is column i of the cross (inter) block; the negatives are the other cross
    columns and the same-side (intra) similarities, whose diagonal is 0 (not -inf) as in the
    release. `same_entity` [R, R] marks rows sharing a gold entity: those off-diagonal columns are
    left out of both blocks (`exclude_duplicate_negatives`). `anchors` [R] bool (data-parallel
    training) computes only those rows' terms: their share of the mean over the R rows.
    """
    if entity.shape[0] == 0:
        return entity.sum() * 0.0  # a zero that stays in the graph
    entity, mention = F.normalize(entity, dim=-1), F.normalize(mention, dim=-1)
    count = len(entity)
    own = torch.arange(count, device=entity.device) if anchors is None else anchors.nonzero().squeeze(1)   # [a]
    not_self = torch.arange(count, device=entity.device)[None, :] != own[:, None]                       # [a, R]
    excluded = None
    if same_entity is not None:
        excluded = same_entity[own] & not_self                                                          # [a, R]

    def one_side(anchor: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        inter = anchor[own] @ other.T / temperature                                      # [a, R]
        intra = (anchor[own] @ anchor.T / temperature) * not_self.to(anchor.dtype)       # [a, R], own column 0
        logits = torch.cat([inter_weight * inter, intra_weight * intra], dim=1)          # [a, 2R]
        if excluded is not None:
            logits = logits.masked_fill(torch.cat([excluded, excluded], dim=1), float("-inf"))
        return F.cross_entropy(logits, own, reduction="sum") / count

    return (one_side(entity, mention) + one_side(mention, entity)) / 2


# --- the model ----------------------------------------------------------------------------------


class M3ELModel(MelModel):
    """M3EL over precomputed features (models.md §3.8).

    Scores: s = (s_T + s_V + s_C) / 3, or (s_T + s_V + s_TV + s_VT) / 4 with `bidirectional`.
    Loss (with labels): CE over the final score and over every unit score, plus the contrastive
    loss on the raw global features (before the matcher's LayerNorms). With `mask_missing_images`,
    pair availability m[b, n] = has_image_m[b] and has_image_e[n] gates the image units (s_V, and
    s_VT): the final score is (s_T + s_C + m s_V) / (2 + m), or (s_T + s_TV + m (s_V + s_VT)) / (2 + 2m).

    `image_cls_fc` and `image_tokens_fc` sit in the release's encoder; here they belong to the
    model, since models read features.
    """

    config_class = M3ELConfig
    config: M3ELConfig
    entity_cache_class = M3ELEntityCache
    mention_cache_class = M3ELMentionCache
    unit_names = ("text", "image", "cross")   # ("text", "image", "t2v", "v2t") when ranking bidirectionally

    def __init__(self, config: M3ELConfig):
        super().__init__(config)
        hidden = config.hidden_dim
        self.image_cls_fc = nn.Linear(config.image_global_dim, hidden)
        self.image_tokens_fc = nn.Linear(config.image_patch_dim, hidden)
        self.text_cls_layernorm = nn.LayerNorm(config.text_dim)
        self.text_tokens_layernorm = nn.LayerNorm(config.text_dim)
        self.image_cls_layernorm = nn.LayerNorm(hidden)
        self.image_tokens_layernorm = nn.LayerNorm(hidden)
        self.timm = IMN(config.text_dim, hidden)
        self.iimm = IMN(hidden, hidden)
        cmn_options = (config.csra_temperatures, config.csra_lambda, config.release_single_key_cmn_branch)
        self.cmm = CrossModalMatch(config.text_dim, hidden, *cmn_options) if config.builds_t2v_unit else None
        self.cmmb = CrossModalMatchBidirection(config.text_dim, hidden, *cmn_options) if config.bidirectional else None
        if config.ranks_bidirectionally:
            self.unit_names = ("text", "image", "t2v", "v2t")
        self.max_pair_elements = MAX_PAIR_ELEMENTS
        self.max_candidate_pair_elements = MAX_CANDIDATE_PAIR_ELEMENTS

    def feature_views(self) -> FeatureViews:
        """`mention [SEP] sentence` and `name [SEP] desc` or `name [SEP] attr` (§3.1)."""
        return FeatureViews(mention="mention_sentence", entity=ENTITY_TEXT_VIEWS[self.config.entity_text])

    def cache_sizes(self, text_length: int, image_tokens: int) -> dict[str, int]:
        hidden = self.config.hidden_dim
        return {**super().cache_sizes(text_length, image_tokens), "D": hidden,
                "C": hidden if self.cmm is not None else 0, "X": hidden if self.cmmb is not None else 0}

    # --- per-side encoding (§3.2-3.6: everything that depends on one side only) -----------------
    def _prenormalise(self, batch: FeatureBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """t_cls [X, Dt], t_tok [X, L, Dt], v_cls [X, D], v_tok [X, P, D], each layer-normalised (§3.4)."""
        self.check_widths(batch)
        text_cls = self.text_cls_layernorm(batch.text_global)
        text_tokens = self.text_tokens_layernorm(batch.text_tokens)
        image_cls = self.image_cls_layernorm(self.image_cls_fc(batch.image_global))
        image_tokens = self.image_tokens_layernorm(self.image_tokens_fc(batch.image_patches))
        return text_cls, text_tokens, image_cls, image_tokens

    def _cross_modal(self, batch: FeatureBatch, text_cls: torch.Tensor, text_tokens: torch.Tensor,
                     image_cls: torch.Tensor, image_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """CMN vectors of one side: cross [X, C], t2v [X, X], v2t [X, X] (zero-width for a unit not built)."""
        present = batch.has_image.bool() if self.config.mask_missing_images else None
        absent = text_cls.new_zeros(len(batch), 0)
        cross = self.cmm(text_cls, image_tokens, present) if self.cmm is not None else absent
        t2v, v2t = (absent, absent) if self.cmmb is None else self.cmmb(text_cls, text_tokens, image_cls,
                                                                          image_tokens, present)
        return {"cross": cross, "t2v": t2v, "v2t": v2t}

    def encode_entities(self, entities: FeatureBatch) -> M3ELEntityCache:
        text_cls, text_tokens, image_cls, image_tokens = self._prenormalise(entities)
        text_cls_key, text_token_queries = self.timm.encode_entities(text_cls, text_tokens)
        image_cls_key, image_token_queries = self.iimm.encode_entities(image_cls, image_tokens)
        return M3ELEntityCache(text_cls=text_cls, text_cls_key=text_cls_key, text_token_queries=text_token_queries,
                               image_cls=image_cls, image_cls_key=image_cls_key,
                               image_token_queries=image_token_queries,
                               **self._cross_modal(entities, text_cls, text_tokens, image_cls, image_tokens),
                               has_image=entities.has_image.bool())

    def encode_mentions(self, mentions: FeatureBatch) -> M3ELMentionCache:
        text_cls, text_tokens, image_cls, image_tokens = self._prenormalise(mentions)
        text_token_keys, text_token_values = self.timm.encode_mentions(text_tokens)
        image_token_keys, image_token_values = self.iimm.encode_mentions(image_tokens)
        return M3ELMentionCache(text_cls=text_cls, text_token_keys=text_token_keys,
                                text_token_values=text_token_values, image_cls=image_cls,
                                image_token_keys=image_token_keys, image_token_values=image_token_values,
                                **self._cross_modal(mentions, text_cls, text_tokens, image_cls, image_tokens),
                                has_image=mentions.has_image.bool())

    # --- scoring (§3.8) -------------------------------------------------------------------------
    # Scoring pairs mentions [B] with entity caches whose tensors carry a leading pairing axis:
    # [1, N, ...] when every mention meets the same N entities (`match`), [B, K, ...] when mention b
    # meets only its own K candidates (`match_candidates`). The units broadcast over that axis.

    def match(self, mentions: M3ELMentionCache, entities: M3ELEntityCache) -> MatchOutput:
        """Ranking scores [B, N] and unit scores; the entity side is split under `max_pair_elements`."""
        return self._match_all_pairs(mentions, entities, bidirectional=self.config.ranks_bidirectionally)

    def match_candidates(self, mentions: M3ELMentionCache, entities: M3ELEntityCache,
                         candidates: torch.Tensor) -> MatchOutput:
        """Scores [B, K]: mention b against its own candidates, the entity rows `candidates[b]` ([B, K] ints).

        Only the B x K pairs are scored; the mention side is split under `max_candidate_pair_elements`.
        """
        candidates = torch.as_tensor(candidates, dtype=torch.long)
        per_mention = max(candidates.shape[1], 1) * self._pair_elements(mentions, entities)
        chunk = max(1, self.max_candidate_pair_elements // per_mention)
        parts = [self._match_paired(mentions.select(slice(start, start + chunk)),
                                    entities.select(candidates[start:start + chunk]),
                                    bidirectional=self.config.ranks_bidirectionally)
                 for start in range(0, max(len(mentions), 1), chunk)]
        return MatchOutput.concat(parts, dim=0)

    def _match_all_pairs(self, mentions: M3ELMentionCache, entities: M3ELEntityCache, *,
                         bidirectional: bool) -> MatchOutput:
        chunk = max(1, self.max_pair_elements // (len(mentions) * self._pair_elements(mentions, entities)))
        parts = [self._match_paired(mentions, entities.select(slice(start, start + chunk)).paired(),
                                    bidirectional=bidirectional)
                 for start in range(0, max(len(entities), 1), chunk)]
        return MatchOutput.concat(parts, dim=1)

    def _pair_elements(self, mentions: M3ELMentionCache, entities: M3ELEntityCache) -> int:
        """Values materialised per mention-entity pair: the larger IMN attention logits (text or image)."""
        text = entities.text_token_queries.shape[-2] * mentions.text_token_keys.shape[1]
        image = entities.image_token_queries.shape[-2] * mentions.image_token_keys.shape[1]
        return max(text, image, self.config.hidden_dim, 1)

    def _match_paired(self, mentions: M3ELMentionCache, entities: M3ELEntityCache, *,
                      bidirectional: bool) -> MatchOutput:
        """Mentions [B] against paired entities [1 | B, N, ...] -> scores [B, N]."""
        units = {"text": self.timm.score(mentions.text_cls, mentions.text_token_keys, mentions.text_token_values,
                                         entities.text_cls, entities.text_cls_key, entities.text_token_queries),
                 "image": self.iimm.score(mentions.image_cls, mentions.image_token_keys, mentions.image_token_values,
                                          entities.image_cls, entities.image_cls_key, entities.image_token_queries)}
        if bidirectional:
            units["t2v"] = pair_dot(mentions.t2v, entities.t2v)                 # [B, N]
            units["v2t"] = pair_dot(mentions.v2t, entities.v2t)                 # [B, N]
        else:
            units["cross"] = pair_dot(mentions.cross, entities.cross)           # [B, N]
        if not self.config.mask_missing_images:
            return MatchOutput(scores=sum(units.values()) / len(units), unit_scores=units)
        pair_has_images = mentions.has_image[:, None] & entities.has_image                     # [B, N]
        image_units = [name for name in IMAGE_UNITS if name in units]
        for name in image_units:
            units[name] = torch.where(pair_has_images, units[name], torch.zeros_like(units[name]))
        present = pair_has_images.to(units["text"].dtype)
        scores = sum(units.values()) / (len(units) - len(image_units) + len(image_units) * present)
        return MatchOutput(scores=scores, unit_scores=units)

    def forward(self, mentions: FeatureBatch, entities: FeatureBatch, labels: torch.Tensor | None = None,
                entity_ids: torch.Tensor | None = None, rows: slice | None = None) -> MatchOutput:
        """Ranking scores of B mentions against N entities; with `labels` [B] the training scores and loss.

        Training (labels given) scores with the unit the release trains: the bidirectional CMN when
        `bidirectional`, even where ranking uses T2V (`release_t2v_inference`). `entity_ids` [N]
        identifies each column's entity for `exclude_duplicate_negatives`. `rows` (data-parallel
        training, see `MelModel.forward`) scores only those mentions, [b, N], and returns their
        share of the batch loss; the contrastive loss still meets every row of the batch.
        """
        mention_cache = self.encode_mentions(mentions if rows is None else mentions.select(rows))
        entity_cache = self.encode_entities(entities)
        if labels is None:
            return self.match(mention_cache, entity_cache)
        labels = labels.long()
        output = self._match_all_pairs(mention_cache, entity_cache, bidirectional=self.config.bidirectional)
        output.loss, output.unit_losses = self.training_loss(output, labels, entity_ids, mentions, entities, rows)
        return output

    # --- loss (§3.7-3.8) ------------------------------------------------------------------------
    def training_loss(self, output: MatchOutput, labels: torch.Tensor, entity_ids: torch.Tensor | None,
                      mentions: FeatureBatch, entities: FeatureBatch, rows: slice | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L = CE(s) + Σ_units CE(s_unit) + cl_loss, each CE a mean over the batch rows (§3.8).

        `labels` and `mentions` cover the whole batch [B]; `output` holds the scores of `rows` (all
        if None), whose share of each mean is returned.
        """
        rows = slice(None) if rows is None else rows
        own_labels = labels[rows]                                                                     # [b]
        num_columns, total = output.scores.shape[1], len(labels)
        ids = entity_ids if self.config.exclude_duplicate_negatives else None
        usable = usable_columns(own_labels, num_columns, ids)                                         # [b, N]
        image_usable, image_rows, image_total = usable, None, total
        if self.config.mask_missing_images:
            mention_has_image, entity_has_image = mentions.has_image.bool(), entities.has_image.bool()
            image_usable = usable & (mention_has_image[rows][:, None] & entity_has_image[None, :])      # [b, N]
            gold_pair_has_images = mention_has_image & entity_has_image[labels]                         # [B]
            image_rows, image_total = gold_pair_has_images[rows], gold_pair_has_images.sum()
        losses = {"overall": masked_cross_entropy(output.scores, own_labels, usable, total=total)}
        for name, scores in output.unit_scores.items():
            if name in IMAGE_UNITS:
                losses[name] = masked_cross_entropy(scores, own_labels, image_usable, image_rows, total=image_total)
            else:
                losses[name] = masked_cross_entropy(scores, own_labels, usable, total=total)
        gold_same = (same_entity_columns(labels, ids, num_columns)[:, labels]                         # [B, B]
                     if ids is not None else None)
        anchors = torch.zeros(total, dtype=torch.bool, device=labels.device)
        anchors[rows] = True
        losses["contrastive"] = self.contrastive_loss(mentions, entities, labels, gold_same, anchors)
        return sum(losses.values()), losses

    def contrastive_loss(self, mentions: FeatureBatch, entities: FeatureBatch, labels: torch.Tensor,
                         same_entity: torch.Tensor | None, anchors: torch.Tensor | None = None) -> torch.Tensor:
        """cl_loss = (L_cl(t_cls_e, t_cls_m) + L_cl(v_cls_e, v_cls_m)) / 2 on raw features (§3.7).

        Rows are gold-aligned (entity row = labels[i]); `same_entity` [B, B] marks rows sharing a
        gold entity. With `mask_missing_images`, the image half uses only rows whose mention and
        gold entity both have an image. `anchors` [B] bool: the rows whose share to compute (all
        if None; see `intra_modal_contrastive_loss`).
        """
        options = {"temperature": self.config.loss_temperature, "inter_weight": self.config.inter_weight,
                   "intra_weight": self.config.intra_weight}
        text = intra_modal_contrastive_loss(entities.text_global[labels], mentions.text_global,
                                            same_entity=same_entity, anchors=anchors, **options)
        entity_image = self.image_cls_fc(entities.image_global[labels])                  # v_cls_e [B, D]
        mention_image = self.image_cls_fc(mentions.image_global)                         # v_cls_m [B, D]
        if self.config.mask_missing_images:
            rows = mentions.has_image.bool() & entities.has_image.bool()[labels]         # [B]
            entity_image, mention_image = entity_image[rows], mention_image[rows]
            same_entity = same_entity[rows][:, rows] if same_entity is not None else None
            anchors = anchors[rows] if anchors is not None else None
        image = intra_modal_contrastive_loss(entity_image, mention_image, same_entity=same_entity, anchors=anchors,
                                             **options)
        return (text + image) / 2


__all__ = ["IMN", "CrossModalMatch", "CrossModalMatchBidirection", "FusionModule", "M3ELConfig", "M3ELEntityCache",
           "M3ELMentionCache", "M3ELModel", "MatchModule", "MultiHeadModule", "intra_modal_contrastive_loss"]
