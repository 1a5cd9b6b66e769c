"""Names of the optimizer's state entries, in one place.

Per-parameter state (``optimizer.state[p]``):

* ``MOMENTUM``: ``m``, the EMA of perturbed gradients (fp32 for low-precision params).
* ``HESSIAN_DIAG``: ``D``, the EMA of ``|Hutchinson estimate|`` (same dtype as ``m``).
* ``STEP``: updates this parameter has received (bias correction of ``m``).
* ``HESSIAN_UPDATES``: refreshes of this parameter's ``D`` (bias correction of ``D``).

Optimizer-wide counters (``state_dict()[COUNTERS]``) decide the Hessian
schedule and the probe stream, which must be global, not per parameter:

* ``GLOBAL_STEP``: completed (not skipped) steps.
* ``HESSIAN_REFRESHES``: completed Hessian refreshes; the probe index.
* ``SKIPPED_STEPS``: steps skipped for non-finite values.
"""

MOMENTUM = "momentum"
HESSIAN_DIAG = "hessian_diag"
STEP = "step"
HESSIAN_UPDATES = "hessian_updates"

COUNTERS = "sassha_counters"
GLOBAL_STEP = "global_step"
HESSIAN_REFRESHES = "hessian_refreshes"
SKIPPED_STEPS = "skipped_steps"
