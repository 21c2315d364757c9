"""Data curation: image-text agreement (CLIP score), caption rules, deduplication and decontamination, from one
cached embedding pass over the shards (`curate`, the `vlpretrain curate` command)."""

from vlpretrain.curation.curate import curate
from vlpretrain.curation.decide import CurationOptions, Decision, decide, score_threshold
from vlpretrain.curation.embed import Embeddings, Scorer, embed_shards, load_embeddings, load_scorer
from vlpretrain.curation.rules import CaptionRules, apply_rules

__all__ = ["CaptionRules", "CurationOptions", "Decision", "Embeddings", "Scorer", "apply_rules", "curate", "decide",
           "embed_shards", "load_embeddings", "load_scorer", "score_threshold"]
