"""Shards: writing them from image-caption sources (`write_shards`) and streaming them to training (`build_loader`)."""

from vlpretrain.data.loader import ShardLoader, build_loader, dist_rank_world
from vlpretrain.data.plan import EpochPlan, expand_shards, plan_epoch, plan_resampled, shard_sample_counts
from vlpretrain.data.sources import (
                                     FORMATS,
                                     Record,
                                     Skip,
                                     Source,
                                     SourceOptions,
                                     detect_format,
                                     load_templates,
                                     register_format,
)
from vlpretrain.data.stats import LoaderStats
from vlpretrain.data.stream import BatchSource, EpochBatches
from vlpretrain.data.writer import write_shards

__all__ = ["FORMATS", "BatchSource", "EpochBatches", "EpochPlan", "LoaderStats", "Record", "ShardLoader", "Skip", "Source", "SourceOptions",
           "build_loader", "detect_format", "dist_rank_world", "expand_shards", "load_templates", "plan_epoch",
           "plan_resampled", "register_format", "shard_sample_counts", "write_shards"]
