"""Engine strategies: how SASSHA's passes run under each training engine.

``DataParallel`` is the deprecated name of :class:`Replicated` (it clashed with
``torch.nn.DataParallel``); it still works, with a ``DeprecationWarning``, for one release.
"""

import warnings
from typing import Any

from sassha_dist.distributed.data_parallel import Replicated
from sassha_dist.distributed.flat_shard import FlatShard
from sassha_dist.distributed.fully_shard import FullyShard
from sassha_dist.distributed.resolve import resolve_strategy
from sassha_dist.distributed.strategy import ProbeSegment, SingleProcess, Strategy

__all__ = [
    "FlatShard",
    "FullyShard",
    "ProbeSegment",
    "Replicated",
    "SingleProcess",
    "Strategy",
    "resolve_strategy",
]

_DEPRECATED = {"DataParallel": Replicated}


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED:
        new = _DEPRECATED[name]
        warnings.warn(
            f"sassha_dist.distributed.{name} is deprecated: use {new.__name__} (same class).",
            DeprecationWarning,
            stacklevel=2,
        )
        return new
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
