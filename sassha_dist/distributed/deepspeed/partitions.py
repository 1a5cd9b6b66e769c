"""Where ZeRO stages 1/2 and 3 keep the partitions and their reduced gradients (engine adapters)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from sassha_dist.distributed.deepspeed.strategy import DeepSpeedZero
from sassha_dist.distributed.strategy import ProbeSegment


def _padding_mask(flat: torch.Tensor, segments: list[ProbeSegment]) -> torch.Tensor:
    """True on ZeRO's padding of a partition, False on the elements that belong to a parameter."""
    mask = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    for seg in segments:
        mask[seg.local_start : seg.local_start + seg.length] = False
    return mask


@torch.no_grad()
def _zero_padding(flats: list[torch.Tensor], paddings: list[torch.Tensor]) -> None:
    """Zero the padding of the fp32 partitions once: SASSHA then keeps it at zero (zero gradient,
    zero probe), so norms over whole partitions are norms over the parameters."""
    for flat, padding in zip(flats, paddings, strict=True):
        flat.masked_fill_(padding, 0.0)


class Zero12Partitions:
    """Stages 1 and 2 (``DeepSpeedZeroOptimizer``): one fp32 partition per parameter group."""

    def __init__(self, zero: Any, strategy: DeepSpeedZero) -> None:
        self.zero = zero
        self.flats: list[torch.Tensor] = list(zero.single_partition_of_fp32_groups)
        segments: dict[int, list[ProbeSegment]] = {}
        for i, flat in enumerate(self.flats):
            group = zero.real_dp_process_group[i]
            size = int(zero.partition_size[i])
            start = dist.get_rank(group=group) * size
            if flat.numel() != size:
                raise RuntimeError(f"Unexpected ZeRO partition of {flat.numel()} elements (expected {size}).")
            segs = []
            for p, meta, offset in zip(
                zero.round_robin_bit16_groups[i],
                zero.round_robin_bit16_meta[i],
                zero.round_robin_bit16_offsets[i],
                strict=True,
            ):
                lo, hi = max(offset, start), min(offset + meta.numel(), start + size)
                if lo < hi:
                    segs.append(ProbeSegment(lo - start, hi - lo, strategy.ordinal(p), lo - offset))
            segments[id(flat)] = segs
        self.paddings = [_padding_mask(flat, segments[id(flat)]) for flat in self.flats]
        _zero_padding(self.flats, self.paddings)
        groups = {id(g) for g in zero.real_dp_process_group}
        if len(groups) != 1:
            raise NotImplementedError(
                "Parameter groups on different data-parallel groups (MoE) are not supported."
            )
        strategy.bind(segments, zero.dp_process_group, self.flats)

    @contextmanager
    def flats_in_groups(self):
        yield

    def gradients(self, owned: bool = True) -> list[torch.Tensor]:
        """The reduced gradient partitions, formed as ``DeepSpeedZeroOptimizer.step`` does.

        ``owned=False`` may return views of DeepSpeed's buffers, valid until the next pass.
        """
        zero, out = self.zero, []
        for i, flat in enumerate(self.flats):
            group = zero.real_dp_process_group[i]
            grad = zero._get_preflattened_grad_partition(i)
            if grad is None:
                tensors = zero.averaged_gradients[i]
                if tensors is None:
                    raise RuntimeError(
                        "No reduced gradient after the pass: the closures must compute the loss through "
                        "the engine (engine(batch)), not the bare module."
                    )
                if dist.get_rank(group=group) == dist.get_world_size(group=group) - 1:
                    grad = zero.flatten_dense_tensors_aligned(tensors, int(zero.partition_size[i]))
                else:
                    grad = zero.flatten(tensors)
            out.append(grad.reshape(-1).to(dtype=flat.dtype, copy=owned))
        for grad, padding in zip(out, self.paddings, strict=True):
            grad.masked_fill_(padding, 0.0)
        return out

    def clear_gradients(self) -> None:
        """Drop the reduced gradients the way ``step()`` does when it skips an overflowed step."""
        from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

        zero = self.zero
        zero.zero_grad(set_to_none=True)
        zero._release_preflattened_grad_buffers()
        for k in list(zero.averaged_gradients.keys()):
            zero.averaged_gradients[k] = None
        for k in list(zero.all_grad_tensors.keys()):
            zero.all_grad_tensors[k] = None
        zero.micro_step_id = INITIAL_MICRO_STEP_ID

    @torch.no_grad()
    def push_params(self) -> None:
        """fp32 partitions -> low-precision partitions -> all-gathered model parameters."""
        self.zero.update_lp_params()


class Zero3Partitions:
    """Stage 3 (``DeepSpeedZeroOptimizer_Stage3``): one fp32 partition per sub-group."""

    def __init__(self, zero: Any, strategy: DeepSpeedZero) -> None:
        self.zero = zero
        order = sorted(range(len(zero.fp16_groups)), key=lambda sg: (zero.sub_group_to_group_id[sg], sg))
        self.order = order
        self.flats = [zero.fp32_partitioned_groups_flat[sg] for sg in order]
        segments: dict[int, list[ProbeSegment]] = {}
        # Per sub-group, per parameter: how many leading elements of its gradient partition are real.
        self.real_lengths: dict[int, list[int]] = {}
        groups = set()
        for sg in order:
            flat = zero.fp32_partitioned_groups_flat[sg]
            group = zero._get_sub_group_process_group(sg)
            groups.add(id(group))
            rank = dist.get_rank(group=group)
            segs, local, lengths = [], 0, []
            for p in zero.fp16_groups[sg]:
                chunk, numel = p.partition_numel(), p.ds_numel
                length = max(0, min(chunk, numel - rank * chunk))
                lengths.append(length)
                if length:
                    segs.append(ProbeSegment(local, length, strategy.ordinal(p), rank * chunk))
                local += chunk
            if local != flat.numel():
                raise RuntimeError(
                    f"Unexpected ZeRO-3 sub-group partition of {flat.numel()} elements (expected {local})."
                )
            segments[id(flat)] = segs
            self.real_lengths[sg] = lengths
        if len(groups) != 1:
            raise NotImplementedError(
                "Sub-groups on different partition groups (MiCS, AutoEP) are not supported."
            )
        self.paddings = [_padding_mask(flat, segments[id(flat)]) for flat in self.flats]
        _zero_padding(self.flats, self.paddings)
        strategy.bind(segments, zero.dp_process_group, self.flats)

    @contextmanager
    def flats_in_groups(self):
        """Stage 3 keeps ``param_groups`` empty outside ``step()``; fill them for the passes."""
        zero = self.zero
        groups = zero.optimizer.param_groups
        saved = [g["params"] for g in groups]
        for g in groups:
            g["params"] = []
        for sg in self.order:
            groups[zero.sub_group_to_group_id[sg]]["params"].append(zero.fp32_partitioned_groups_flat[sg])
        try:
            yield
        finally:
            for g, params in zip(groups, saved, strict=True):
                g["params"] = params

    @torch.no_grad()
    def gradients(self, owned: bool = True) -> list[torch.Tensor]:
        """The reduced gradient partitions, as ``_prepare_fp32_grad_for_sub_group`` forms them.

        ``owned=False`` may return views of DeepSpeed's buffers, valid until the next pass.

        A parameter's gradient partition is a reused buffer whose padding DeepSpeed never
        writes (a rank holding none of a parameter's elements leaves all of it untouched),
        so the padding is zeroed in place first: it would otherwise leak uninitialised
        memory into the norm, the Hessian estimate, and DeepSpeed's own clipping norm.
        """
        zero, out = self.zero, []
        for sg in self.order:
            tensors = zero.averaged_gradients.get(sg)
            if tensors is None:
                raise RuntimeError(
                    "No reduced gradient after the pass: the closures must compute the loss through "
                    "the engine (engine(batch)), not the bare module."
                )
            for grad, length in zip(tensors, self.real_lengths[sg], strict=True):
                if length < grad.numel():
                    grad.view(-1)[length:].zero_()
            flat = zero.fp32_partitioned_groups_flat[sg]
            # flatten copies several tensors but returns a view of a single one
            copy = owned and len(tensors) == 1
            out.append(zero.flatten(tensors).reshape(-1).to(dtype=flat.dtype, copy=copy))
        return out

    def clear_gradients(self) -> None:
        zero = self.zero
        zero.zero_grad(set_to_none=True)
        zero.averaged_gradients = {}
        for bucket in zero.ipg_buckets.values():
            bucket.clear_params()

    @torch.no_grad()
    def push_params(self) -> None:
        """fp32 partitions -> partitioned parameters (``ds_tensor``); persistent ones re-gathered."""
        zero = self.zero
        zero._partition_all_parameters()
        for sg in self.order:
            zero._reassign_or_swap_out_partitioned_parameters(sg)
        if zero.persistent_parameters:
            zero.persistent_parameters[0].all_gather(zero.persistent_parameters)
        zero.invalidate_secondary_tensor()
