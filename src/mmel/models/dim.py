"""DIM: Dynamic Integration of Multimodal Entity Linking with Large Language Model (PRCV 2024).

Implements shared/specs/models.md §4, top to bottom: config (§4.3, §4.5), the mention query
(the paper's attention fusion, §4.1, or the released HEAD head, §4.3), the frozen entity vector
(§4.2), cosine ranking (§4.7) and the N-pair loss with its L2 term (§4.4).

DIM reads pooled vectors only (§4.2, §5), each from a frozen encoder:

    text     CLIP(mention [SEP] sentence)  the primary mention view, `FeatureBatch.text_global`
    mention  CLIP(mention)                 the pooled view `views["mention"]`
    caption  CLIP(BLIP-2 answer)           the pooled view `views["caption"]`, absent for some mentions
    total    CLIP(mention image)           `FeatureBatch.image_global`, with `has_image`
    entity   CLIP(description)             the primary entity view `text_global` ("desc"; or "name_desc")

Two scores, as in the release: ranking uses the COSINE of the query and the entity vector
(§4.7, `similarity cos`), the N-pair loss the plain DOT product with no temperature (§4.4).
`match` returns the cosine; `forward` returns the cosine scores plus the dot-product loss.

Shape letters: B mentions, N entities, K candidates per mention, C = 3 cues (sentence, caption,
image), Dt text width (DIM's hidden and output widths equal it, §4.3), Dg global image width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mmel.core.config import ConfigError
from mmel.core.errors import MismatchError
from mmel.core.features import FeatureBatch, FeatureViews, PooledView
from mmel.models.base import MelModel, MelModelConfig, RowCache, cache_field
from mmel.models.losses import same_entity_columns
from mmel.models.outputs import MatchOutput

ENTITY_TEXT_VIEWS = ("desc", "name_desc")


@dataclass
class DIMConfig(MelModelConfig):
    """DIM's trainable head. Defaults follow the release's scripts (§4.3, §4.5); widths are CLIP ViT-B/32's.

    The release sets hidden_size = text_feat_size = output_size = 512: here the hidden and output
    widths are `text_dim`, which they must be, since the query is compared with the frozen entity
    text vector and (release head) summed with raw text features.

    release_head: False (default) builds the paper's model, in which the cues are fused by
        multi-head attention (§4.1); True builds the HEAD commit's head, which computes its
        attention but sums raw features instead (§4.3). See `DIMModel`.
    entity_text: the entity view DIM compares against: "desc" (the description alone, as DIM's
        `neg_clip_extract.py` does, §4.2) or "name_desc" (name and description; an mmel option).
    A missing caption or image is always masked out of the fusion (an mmel choice: the release
    has no missing captions and sums a zero image feature for Richpedia mentions without images).
    When `image_global_dim` differs from `text_dim` (e.g. MiniLM 384 + EfficientNet 1280), the
    release head gets a linear image projection (an mmel option; CLIP's widths need none).
    """

    model_type: ClassVar[str] = "dim"

    num_heads: int = 8             # nheaders (§4.3)
    dropout: float = 0.4           # dropout of text_trans / img_trans and before the output projection (§4.3)
    l2_weight: float = 0.02        # NpairLoss l2_reg (§4.4)
    release_head: bool = False
    entity_text: str = "desc"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.entity_text not in ENTITY_TEXT_VIEWS:
            raise ConfigError(f"DIMConfig.entity_text must be one of {', '.join(ENTITY_TEXT_VIEWS)}, "
                              f"got {self.entity_text!r}")
        if self.num_heads <= 0 or self.text_dim % self.num_heads:
            raise ConfigError(f"DIMConfig.num_heads ({self.num_heads}) must be positive and divide "
                              f"text_dim ({self.text_dim})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"DIMConfig.dropout must lie in [0, 1), got {self.dropout}")
        if self.l2_weight < 0:
            raise ConfigError(f"DIMConfig.l2_weight must be >= 0, got {self.l2_weight}")


# --- caches of per-side work ---------------------------------------------------------------------


@dataclass
class DIMEntityCache(RowCache):
    """The frozen entity vector, L2-normalised for cosine ranking (§4.7)."""

    unit_feature: torch.Tensor = cache_field("Dt")


@dataclass
class DIMMentionCache(RowCache):
    """The mention query, L2-normalised for cosine ranking (§4.7)."""

    unit_query: torch.Tensor = cache_field("Dt")


# --- the model ----------------------------------------------------------------------------------


def feature_transform(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    """text_trans / img_trans of §4.3: Dropout(LayerNorm(ReLU(Linear(x))))."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU(), nn.LayerNorm(out_dim), nn.Dropout(dropout))


class DIMModel(MelModel):
    """DIM over frozen pooled features: a trained mention query against frozen entity vectors.

    Paper head (default, §4.1 "the cues are fused by multi-head attention"):

        m  = text_trans(mention)                                   [B, 1, Dt]
        cues = [text_trans(text), text_trans(caption), img_trans(total)]   [B, C, Dt]
        query = pedia_out_trans(Dropout(m + MHA_8(m, cues, cues)))  [B, Dt]

    with a missing caption or image left out of the attention (key padding mask). Why one
    attention over all cues: HEAD defines `text_att = MHA(m, text_trans(text))` and
    `caption_att = MHA(m, caption_trans)` (§4.3), each over a single key. Softmax over one key is
    1, so each is a fixed linear map of its value that ignores the mention; the mention only
    weighs the cues when it attends over several at once. The residual `m + attention` and the
    output projection follow the earlier commits that did use their attention (§4.3: `5b66f47`
    `pedia_out(mention_trans + MHA(mention, segments) + MHA(mention, text))`, `09462eb`).
    The whole image stands in for their person segments, which HEAD no longer reads (§4.2).
    `img_trans` is HEAD's own (defined there, unused), the same transform as `text_trans`.

    Release head (`release_head=True`, HEAD `nel.py`, §4.3):

        query = pedia_out_trans(Dropout(mention + text + total + text_trans(caption)))   [B, Dt]

    HEAD also computes `text_att` and `caption_att` and discards them; they are left out here,
    which changes no output. A missing caption or image is left out of the sum; `total` goes
    through `image_proj` when its width is not `text_dim`.

    Every parameter with more than one dimension is initialised with xavier_uniform_ (§4.3).
    """

    config_class = DIMConfig
    config: DIMConfig
    entity_cache_class = DIMEntityCache
    mention_cache_class = DIMMentionCache
    unit_names = ()   # one score only: the cosine of query and entity vector (§4.7)

    def __init__(self, config: DIMConfig):
        super().__init__(config)
        width = config.text_dim
        self.text_trans = feature_transform(width, width, config.dropout)
        if config.release_head:
            needs_projection = config.image_global_dim != width
            self.image_proj = nn.Linear(config.image_global_dim, width) if needs_projection else None
        else:
            self.img_trans = feature_transform(config.image_global_dim, width, config.dropout)
            self.cue_attention = nn.MultiheadAttention(width, config.num_heads, batch_first=True)
        self.query_dropout = nn.Dropout(config.dropout)
        self.pedia_out_trans = nn.Linear(width, width)
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)

    def feature_views(self) -> FeatureViews:
        """CLIP(mention [SEP] sentence) in full, CLIP(mention) and CLIP(caption) pooled; the entity's description."""
        return FeatureViews(mention="mention_sentence", entity=self.config.entity_text,
                            mention_extra=("mention", "caption"), entity_extra=())

    # --- the mention query (§4.1, §4.3) ---------------------------------------------------------
    def query(self, mentions: FeatureBatch) -> torch.Tensor:
        """The unnormalised query a [B, Dt] (what the N-pair loss dots with entity vectors)."""
        self.check_widths(mentions)
        mention = self._pooled_view(mentions, "mention")
        caption = self._pooled_view(mentions, "caption")
        has_image = mentions.has_image.bool()
        if self.config.release_head:
            return self._release_query(mention.global_, mentions.text_global, mentions.image_global, has_image, caption)
        return self._paper_query(mention.global_, mentions.text_global, mentions.image_global, has_image, caption)

    def _paper_query(self, mention: torch.Tensor, text: torch.Tensor, image: torch.Tensor, has_image: torch.Tensor,
                     caption: PooledView) -> torch.Tensor:
        """Paper head: the transformed mention attends over the transformed cues (see the class doc)."""
        mention_trans = self.text_trans(mention)[:, None, :]                          # [B, 1, Dt]
        caption_present = caption.present.bool()
        cues = torch.stack([self.text_trans(text),
                            self.text_trans(_zero_where_absent(caption.global_, caption_present)),
                            self.img_trans(_zero_where_absent(image, has_image))], dim=1)   # [B, C, Dt]
        absent = torch.stack([torch.zeros_like(has_image), ~caption_present, ~has_image], dim=1)  # [B, C]
        attended, _ = self.cue_attention(mention_trans, cues, cues, key_padding_mask=absent,
                                         need_weights=False)                           # [B, 1, Dt]
        return self.pedia_out_trans(self.query_dropout(mention_trans + attended)).squeeze(1)

    def _release_query(self, mention: torch.Tensor, text: torch.Tensor, image: torch.Tensor, has_image: torch.Tensor,
                       caption: PooledView) -> torch.Tensor:
        """Release head: raw mention + text + total features plus the transformed caption, then a Linear."""
        caption_present = caption.present.bool()
        caption_vector = _zero_where_absent(caption.global_, caption_present)                        # [B, Dt]
        caption_trans = _zero_where_absent(self.text_trans(caption_vector), caption_present)       # [B, Dt]
        total = self.image_proj(image) if self.image_proj is not None else image                   # [B, Dt]
        summed = mention + text + _zero_where_absent(total, has_image) + caption_trans             # [B, Dt]
        return self.pedia_out_trans(self.query_dropout(summed))

    def _pooled_view(self, batch: FeatureBatch, name: str) -> PooledView:
        view = batch.view(name)
        if view.global_.shape[-1] != self.config.text_dim:
            raise MismatchError(f"text view {name!r} has width {view.global_.shape[-1]} but this DIMModel expects "
                                f"{self.config.text_dim}; use features from the backbone the model was trained with")
        return view

    # --- per-side encoding ----------------------------------------------------------------------
    def entity_features(self, entities: FeatureBatch) -> torch.Tensor:
        """The frozen entity vectors [N, Dt]: the primary entity view, untransformed (§4.2)."""
        self.check_widths(entities)
        return entities.text_global

    def encode_entities(self, entities: FeatureBatch) -> DIMEntityCache:
        return DIMEntityCache(unit_feature=F.normalize(self.entity_features(entities), dim=-1))

    def encode_mentions(self, mentions: FeatureBatch) -> DIMMentionCache:
        return DIMMentionCache(unit_query=F.normalize(self.query(mentions), dim=-1))

    def retrieval_vectors(self, entities: DIMEntityCache) -> torch.Tensor:
        """The unit entity vectors: their inner product with `query_vectors` is DIM's cosine score."""
        return entities.unit_feature

    def query_vectors(self, mentions: DIMMentionCache) -> torch.Tensor:
        return mentions.unit_query

    # --- scoring (§4.7): cosine of query and entity vector --------------------------------------
    def match(self, mentions: DIMMentionCache, entities: DIMEntityCache) -> MatchOutput:
        """Cosine scores [B, N] of every mention against every entity."""
        return MatchOutput(scores=mentions.unit_query @ entities.unit_feature.T)

    def match_candidates(self, mentions: DIMMentionCache, entities: DIMEntityCache,
                         candidates: torch.Tensor) -> MatchOutput:
        """Cosine scores [B, K] of mention b against the entity rows `candidates[b]` ([B, K] ints)."""
        paired = entities.select(torch.as_tensor(candidates, dtype=torch.long)).unit_feature    # [B, K, Dt]
        return MatchOutput(scores=torch.einsum("bd,bkd->bk", mentions.unit_query, paired))

    def forward(self, mentions: FeatureBatch, entities: FeatureBatch, labels: torch.Tensor | None = None,
                entity_ids: torch.Tensor | None = None, rows: slice | None = None) -> MatchOutput:
        """Cosine scores [B, N]; with `labels` [B] (gold column per row), the N-pair loss of §4.4.

        The columns of `entities` that are no row's label are the sampled negatives (appended after
        the golds by the training data); `entity_ids` [N] names each column's entity so that a
        negative equal to a row's gold entity is not used against that row. `rows` (data-parallel
        training, see `MelModel.forward`) scores only those mentions, [b, N], and returns their
        share of the batch loss.
        """
        queries = self.query(mentions if rows is None else mentions.select(rows))   # [B | b, Dt]
        entity_vectors = self.entity_features(entities)                              # [N, Dt]
        output = MatchOutput(scores=F.normalize(queries, dim=-1) @ F.normalize(entity_vectors, dim=-1).T)
        if labels is not None:
            npair, l2 = self.npair_loss(queries, entity_vectors, labels, entity_ids, rows=rows)
            output.loss, output.unit_losses = npair + l2, {"npair": npair, "l2": l2}
        return output

    # --- loss (§4.4) ----------------------------------------------------------------------------
    def npair_loss(self, anchors: torch.Tensor, entity_vectors: torch.Tensor, labels: torch.Tensor,
                   entity_ids: torch.Tensor | None = None, rows: slice | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The N-pair term mean_i log(1 + Σ_j exp(a_i·n_j − a_i·p_i)) and the L2 term 0.02·Σ_i(‖a_i‖²+‖p_i‖²)/B.

        a = anchors [B, Dt], p_i = entity_vectors[labels[i]], n_j the negative columns of
        `negative_columns`: every anchor meets all sampled negatives of the batch, as the release's
        broadcasting does. Dot products, no temperature. With `rows`, `anchors` [b, Dt] are those
        rows' only, `labels` still cover the batch, and both terms are those rows' share.
        """
        batch = anchors.shape[0] if rows is None else len(labels)
        rows = slice(None) if rows is None else rows
        labels = _check_labels(labels, batch, entity_vectors.shape[0]).to(entity_vectors.device)
        positives = entity_vectors[labels[rows]]                                         # [b, Dt]
        margins = anchors @ entity_vectors.T - (anchors * positives).sum(-1, keepdim=True)   # [b, N]: a·n − a·p
        negatives = negative_columns(labels, entity_vectors.shape[0], entity_ids)[rows]     # [b, N]
        margins = margins.masked_fill(~negatives, float("-inf"))
        # log(1 + Σ exp(x)) = logsumexp([0, x]): stable, and 0 with a zero gradient when a row has no negative
        npair = torch.logsumexp(torch.cat([margins.new_zeros(len(anchors), 1), margins], dim=1), dim=1).sum() / batch
        l2 = self.config.l2_weight * (anchors.pow(2).sum() + positives.pow(2).sum()) / batch
        return npair, l2


def negative_columns(labels: torch.Tensor, num_columns: int, entity_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, N] bool: the columns row i uses as negatives n_j (§4.4).

    The sampled negatives are the columns that are no row's label, shared by every row. A batch
    without such columns falls back to in-batch negatives: the other rows' gold columns. With
    `entity_ids` [N], a column holding the same entity as row i's gold is never row i's negative.
    """
    columns = torch.arange(num_columns, device=labels.device)
    is_gold_column = torch.zeros(num_columns, dtype=torch.bool, device=labels.device)
    is_gold_column[labels] = True
    if bool((~is_gold_column).any()):
        negatives = (~is_gold_column)[None, :].expand(len(labels), num_columns)          # [B, N]
    else:
        negatives = columns[None, :] != labels[:, None]                                 # [B, N]
    if entity_ids is None:
        return negatives
    return negatives & ~same_entity_columns(labels, entity_ids, num_columns)


def _check_labels(labels: torch.Tensor, batch: int, num_columns: int) -> torch.Tensor:
    labels = torch.as_tensor(labels).long()
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
    if batch and (labels.min() < 0 or labels.max() >= num_columns):
        raise ValueError(f"labels must be entity columns in [0, {num_columns}), got {labels.tolist()}")
    return labels


def _zero_where_absent(vectors: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """[X, D] with rows where `present` [X] is False replaced by zeros (never multiplied: NaN stays out)."""
    return torch.where(present[:, None], vectors, torch.zeros_like(vectors))


__all__ = ["DIMConfig", "DIMEntityCache", "DIMMentionCache", "DIMModel", "feature_transform", "negative_columns"]
