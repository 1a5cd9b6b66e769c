"""Benchmarks and paper-claim checks for SASSHA: ``python -m sassha_dist.bench <subcommand> ...``.

Subcommands (``--help`` on each):

* ``step-time``: SASSHA's step time against AdamW and SAM-AdamW, next to the
  floor its forward-backward passes impose (:mod:`.step_time`).
* ``kernel``: the update kernel alone against ``torch.optim.AdamW``
  (:mod:`.kernel`).
* ``cost-model``: memory, communication and passes per step under DDP, FSDP2
  and ZeRO 1/2/3, projected to 1B-70B models (:mod:`.cost_model`).
* ``memory-comm``: optimizer state, peak tensor memory and collective bytes per
  rank against AdamW on real ranks (DDP, FSDP2, ZeRO 1/2/3; W = 1, 2, 4)
  (:mod:`.memory_comm`).
* ``quality-lm``: validation loss of a tiny GPT trained from scratch on a
  standard-library docstring corpus (:mod:`.quality_lm`).
* ``quality-classifier``: test accuracy and sharpness of a small classifier
  (:mod:`.quality_classifier`).

Every timing comparison runs side by side in one process, in interleaved
rounds, and is reported as ratios of medians. Results and the commands that
produce them are in ``docs/benchmarks.md`` and ``docs/cost_model.md``.
"""

from sassha_dist.bench.models import SamAdamW

__all__ = ["SamAdamW"]
