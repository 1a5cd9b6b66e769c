"""Hessian-diagonal estimation: counter-based probes and Hessian-vector products."""

from sassha_dist.hessian.hvp import exact_hvp, finite_difference_step
from sassha_dist.hessian.probes import probe_key, rademacher

__all__ = ["exact_hvp", "finite_difference_step", "probe_key", "rademacher"]
