"""Checkpoints keyed by parameter name: sharded (DCP), consolidated, and restart-safe.

Three layers, each usable on its own:

* **FQN-keyed state** (in memory). :func:`optimizer_state_dict` returns the
  optimizer's ``m``, ``D`` and per-parameter counters keyed by each
  parameter's fully-qualified name in the model (``"0.weight"``), not by its
  position, plus the param groups (names instead of indices) and the
  optimizer-wide counters (global step, Hessian refreshes = probe position,
  skipped steps)::

      {"state": {fqn: {"momentum": T, "hessian_diag": T, "step": t, "hessian_updates": t}},
       "param_groups": [{"lr": ..., ..., "params": [fqn, ...]}],
       "sassha_counters": {"global_step": n, "hessian_refreshes": n, "skipped_steps": n}}

  ``T`` is a DTensor of the parameter's placement under FSDP2 and a plain
  tensor elsewhere. :func:`load_optimizer_state_dict` loads it into an
  optimizer over the same named parameters under any engine: DTensors and
  full tensors are converted to the new parameters' layout, and everything is
  validated (another optimizer, another model) before
  :meth:`Sassha.load_state_dict` installs it, so ``m`` and ``D`` keep their
  fp32 precision. (torch's ``get_optimizer_state_dict`` and
  ``set_optimizer_state_dict`` work on Sassha too: its closure-less ``step()``
  with zero gradients at lr = 0 initialises the state as their protocol
  expects, and the counters travel in the param groups; accelerate's FSDP
  checkpoints use them. This layer adds the validation and the FQN-keyed
  layout that the DCP and consolidated layers below share.)

* **Sharded checkpoints** through ``torch.distributed.checkpoint`` (DCP).
  :func:`save` writes the model (``get_model_state_dict``) and the FQN-keyed
  optimizer state, each rank its own shards. :func:`load` first creates any
  missing optimizer state in the *new* parameters' placement (lazy state),
  then lets DCP read into it, so a checkpoint saved at W ranks resumes at any
  other W, or under DDP or on one device. With global probes
  (``probe_mode="global"``, the default under FSDP2) the resumed run continues
  the same trajectory, since probes do not depend on W.

* **Consolidated state** (:func:`full_state_dict`, :func:`load_full_state_dict`,
  :func:`export_full`, :func:`import_full`): the model and optimizer state
  gathered into plain CPU tensors on rank 0, keyed by FQN
  (``{"model": {fqn: tensor}, "optimizer": <the layout above>}``), to move a
  run from one engine to another (FSDP2 -> DDP -> one device -> FSDP2). It is
  the interchange format for engines whose optimizer sees flat partitions
  (DeepSpeed ZeRO): an exporter for them only has to produce this layout.

**Restart safety.** A checkpoint directory is written under a temporary
name, checksummed into a manifest (``sassha_manifest.json``, written last), and
only then renamed into place; :func:`save_checkpoint` then points ``latest``
at it with ``os.replace``. A crash at any moment leaves ``latest`` on the
previous complete checkpoint. :func:`load` verifies every file's size and
CRC32 against the manifest and raises :class:`CorruptCheckpointError` naming
the file that is missing, truncated or damaged. A training loop::

    resumed = checkpoint.load_latest(root, model, optimizer)  # None on a fresh start
    start = 0 if resumed is None else resumed["step"]
    for step in range(start + 1, steps + 1):
        optimizer.step(closure_for(step))
        if step % every == 0:
            checkpoint.save_checkpoint(root, step, model, optimizer)

Notes:

* All functions that take a model are collective when a process group is
  initialised: call them on every rank. Rank 0 does the file operations, so
  every rank must see the same directory (a shared filesystem, as DCP's
  ``FileSystemWriter`` needs anyway).
* The probe of a parameter depends on its position in the optimizer: build
  the resumed optimizer over the parameters in the same order (for example
  from ``model.parameters()`` again) to continue the same probe stream.
* Under ``torchrun --max-restarts N`` with torch >= 2.5, a restarted attempt can
  read the previous attempt's gloo/NCCL addresses from the shared rendezvous
  store (pytorch/pytorch#135712). ``tests/restart_job.py`` shows the fix: a
  ``PrefixStore`` per ``TORCHELASTIC_RESTART_COUNT``. Setting
  ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` also avoids it, but then the store
  dies with rank 0 and other ranks can abort at exit.
"""

from __future__ import annotations

from sassha_dist.checkpoint.consolidated import (
    export_full,
    full_state_dict,
    import_full,
    load_full_state_dict,
)
from sassha_dist.checkpoint.fqn_state import load_optimizer_state_dict, optimizer_state_dict
from sassha_dist.checkpoint.layout import MANIFEST, CorruptCheckpointError, parameter_names
from sassha_dist.checkpoint.restart import latest_checkpoint, load_latest, save_checkpoint
from sassha_dist.checkpoint.sharded import load, save

__all__ = [
    "MANIFEST",
    "CorruptCheckpointError",
    "export_full",
    "full_state_dict",
    "import_full",
    "latest_checkpoint",
    "load",
    "load_full_state_dict",
    "load_latest",
    "load_optimizer_state_dict",
    "optimizer_state_dict",
    "parameter_names",
    "save",
    "save_checkpoint",
]
