"""Engine strategies: how SASSHA's passes run under each training engine."""

from sassha_dist.distributed.data_parallel import DataParallel
from sassha_dist.distributed.flat_shard import FlatShard
from sassha_dist.distributed.fully_shard import FullyShard
from sassha_dist.distributed.strategy import ProbeSegment, SingleProcess, Strategy, resolve_strategy

__all__ = [
    "DataParallel",
    "FlatShard",
    "FullyShard",
    "ProbeSegment",
    "SingleProcess",
    "Strategy",
    "resolve_strategy",
]
