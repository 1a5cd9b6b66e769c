r"""Names of the optimizer's state entries, in one place.

Per-parameter state (``optimizer.state[p]``):

* ``MOMENTUM``: ``m``, the EMA of perturbed gradients (fp32 for low-precision params).
* ``HESSIAN_DIAG``: ``D``, the EMA of ``|Hutchinson estimate|`` (same dtype as ``m``).
* ``STEP``: updates this parameter has received (bias correction of ``m``).
* ``HESSIAN_UPDATES``: refreshes of this parameter's ``D`` (bias correction of ``D``).
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
