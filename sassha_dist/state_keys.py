r"""Names of the optimizer's state entries, in one place.

Per-parameter state (``optimizer.state[p]``):

* ``MOMENTUM``: ``m``, the EMA of perturbed gradients (fp32 for low-precision params).
* ``HESSIAN_DIAG``: ``D``, the EMA of ``|Hutchinson estimate|`` (same dtype as ``m``).
* ``STEP``: updates this parameter has received (bias correction of ``m``).
* ``HESSIAN_UPDATES``: refreshes of this parameter's ``D`` (bias correction of ``D``); the
  per-parameter count of what ``HESSIAN_REFRESHES`` counts for the optimizer. The key keeps the
  name it has always been saved under, so every checkpoint written so far loads.
* ``HESSIAN_CORRECTION``, ``HESSIAN_CORRECTION_POWER``: :math:`1-\beta_2^{t_r}` and the Hessian
  power at this parameter's last refresh (:math:`t_r` its step then), which
  ``bias_correction="global_step"`` (the authors' rule) holds until the next refresh. Optional
  when loading: a state dict without them derives them from ``STEP`` (see
  ``Sassha.load_state_dict``).

Optimizer-wide counters (``state_dict()[COUNTERS]``) decide the Hessian
schedule and the probe stream, which must be global, not per parameter:

* ``GLOBAL_STEP``: completed (not skipped) steps.
* ``HESSIAN_REFRESHES``: completed Hessian refreshes; the probe index.
* ``SKIPPED_STEPS``: steps skipped for non-finite values.
"""

import torch

MOMENTUM = "momentum"
HESSIAN_DIAG = "hessian_diag"
STEP = "step"
HESSIAN_UPDATES = "hessian_updates"
HESSIAN_CORRECTION = "hessian_correction"
HESSIAN_CORRECTION_POWER = "hessian_correction_power"

COUNTERS = "sassha_counters"
GLOBAL_STEP = "global_step"
HESSIAN_REFRESHES = "hessian_refreshes"
SKIPPED_STEPS = "skipped_steps"

#: The entries every parameter's state holds.
PER_PARAM = (MOMENTUM, HESSIAN_DIAG, STEP, HESSIAN_UPDATES)
#: Entries a loaded state may lack (older state dicts): ``Sassha.load_state_dict`` derives them.
OPTIONAL_PER_PARAM = (HESSIAN_CORRECTION, HESSIAN_CORRECTION_POWER)
#: The optimizer-wide counters under ``COUNTERS``.
COUNTER_NAMES = (GLOBAL_STEP, HESSIAN_REFRESHES, SKIPPED_STEPS)
#: The dtype of each 0-dim per-parameter entry (on the CPU); ``m`` and ``D`` take the state dtype.
SCALAR_DTYPES = {
    STEP: torch.float32,
    HESSIAN_UPDATES: torch.float32,
    HESSIAN_CORRECTION: torch.float64,
    HESSIAN_CORRECTION_POWER: torch.float64,
}
