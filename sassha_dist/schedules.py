"""Step schedules for ``rho`` and ``hessian_power``: picklable, JSON-serialisable, checked.

``Sassha`` accepts any callable of the 1-based step for ``rho`` (per parameter group) and
``hessian_power``. A lambda works for training, but it cannot be pickled into a checkpoint
(``torch.save(optimizer.state_dict())`` pickles the param groups, and ``rho`` lives there).
:class:`PiecewiseConstant` can: it is a frozen dataclass, and :func:`to_json` /
:func:`from_json` turn it into plain JSON for checkpoint formats that store param groups as
text (``sassha_dist.checkpoint``'s DCP layout).
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["PiecewiseConstant", "from_json", "to_json"]

_JSON_TAG = "sassha_schedule"


@dataclass(frozen=True)
class PiecewiseConstant:
    r"""``values[i]`` on 1-based steps :math:`t` with ``boundaries[i-1] < t <= boundaries[i]``.

    ``PiecewiseConstant((0.0, 0.02), (2001,))`` is 0 on steps 1..2001 and 0.02 from step 2002
    on. ``len(values)`` must be ``len(boundaries) + 1`` and the boundaries strictly increasing.
    """

    values: tuple[float, ...]
    boundaries: tuple[int, ...]

    def __post_init__(self) -> None:
        values, boundaries = tuple(self.values), tuple(self.boundaries)
        if len(values) != len(boundaries) + 1:
            raise ValueError(
                f"Invalid PiecewiseConstant({values=}, {boundaries=}). Must have one more value than "
                "boundaries."
            )
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"Invalid PiecewiseConstant value {value!r}. Must be a finite number.")
        for boundary in boundaries:
            if isinstance(boundary, bool) or not isinstance(boundary, int) or boundary < 0:
                raise ValueError(f"Invalid PiecewiseConstant boundary {boundary!r}. Must be an int >= 0.")
        if any(later <= earlier for earlier, later in itertools.pairwise(boundaries)):
            raise ValueError(f"Invalid {boundaries=}. Must be strictly increasing.")
        object.__setattr__(self, "values", tuple(float(v) for v in values))
        object.__setattr__(self, "boundaries", boundaries)

    def __call__(self, step: int) -> float:
        return self.values[bisect.bisect_left(self.boundaries, step)]


def to_json(value: Any) -> Any:
    """A JSON-serialisable form of ``value``: schedules become tagged dicts, anything else is unchanged."""
    if isinstance(value, PiecewiseConstant):
        return {
            _JSON_TAG: "piecewise_constant",
            "values": list(value.values),
            "boundaries": list(value.boundaries),
        }
    return value


def from_json(value: Any) -> Any:
    """Invert :func:`to_json` (values that are not tagged schedules come back unchanged)."""
    if isinstance(value, dict) and value.get(_JSON_TAG) == "piecewise_constant":
        return PiecewiseConstant(tuple(value["values"]), tuple(int(b) for b in value["boundaries"]))
    return value
