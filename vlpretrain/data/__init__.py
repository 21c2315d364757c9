"""Shards: writing them from image-caption sources (`write_shards`) and streaming them to training (`build_loader`)."""

from vlpretrain.data.counts import ShardCounts, count_shards, index_shards, shard_sample_counts
from vlpretrain.data.loader import ShardLoader, build_loader, count_shards_of, dist_rank_world
from vlpretrain.data.plan import EpochPlan, expand_shards, plan_epoch, plan_resampled
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
from vlpretrain.data.stream import BatchStream, EpochBatches
from vlpretrain.data.writer import write_shards

__all__ = ["FORMATS", "BatchStream", "EpochBatches", "EpochPlan", "LoaderStats", "Record", "ShardCounts", "ShardLoader", "Skip", "Source", "SourceOptions",
           "build_loader", "count_shards", "count_shards_of", "detect_format", "dist_rank_world", "expand_shards", "index_shards", "load_templates", "plan_epoch",
           "plan_resampled", "register_format", "shard_sample_counts", "write_shards"]
