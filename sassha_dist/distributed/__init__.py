"""Engine strategies: how SASSHA's passes run under each training engine."""

from sassha_dist.distributed.strategy import SingleProcess, Strategy, resolve_strategy

__all__ = ["SingleProcess", "Strategy", "resolve_strategy"]
