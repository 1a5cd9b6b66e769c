"""A cost model of SASSHA and AdamW under DDP, FSDP2 and ZeRO 1/2/3: memory, traffic, passes, time.

:func:`estimate` gives, per rank and per optimizer step (Hessian steps
amortised over ``k``): optimizer state, peak memory, the bytes each rank sends,
forward-backward passes, and a step time from a compute rate and a link
bandwidth. :func:`projection` tabulates 1B, 7B and 70B models on 8 to 512
GPUs; :func:`check` measures on this machine what a single process can
measure (state sizes, closure calls, transient buffers, the exact-HVP
activation factor) and prints it next to the model's prediction;
:func:`compare_measured` sets ``memory-comm``'s measurements on real ranks
(state, gradient-reduction and all-gather bytes, SASSHA's buffers) next to it.
The assumptions are in ``docs/cost_model.md`` and in :class:`Hardware` and
:class:`Workload`.

Collectives, bytes each rank sends for a full tensor of ``B`` bytes over ``W``
ranks (ring algorithms): all-reduce ``2 (W-1)/W B``; reduce-scatter and
all-gather ``(W-1)/W B`` each.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from typing import Any

from sassha_dist.bench.common import format_table
from sassha_dist.options import PERTURB_MOMENTUM

__all__ = [
    "ENGINES",
    "MODELS",
    "Estimate",
    "Hardware",
    "ModelShape",
    "Workload",
    "add_arguments",
    "check",
    "compare_measured",
    "estimate",
    "projection",
    "run",
]

ENGINES = ("ddp", "zero1", "zero2", "zero3", "fsdp2")
ENGINE_NAMES = {"ddp": "DDP", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3", "fsdp2": "FSDP2"}
#: ``msassha``: M-SASSHA (``perturbation="momentum"``), one forward-backward per step.
OPTIMIZERS = ("adamw", "sassha", "msassha")
GB = 1e9

#: Extra activation memory of an exact HVP pass over a forward-backward pass,
#: measured here (``check``): tiny GPT-2, eager attention, fp32, peak above the
#: step's start: 2.2x at batch 8x64, 2.4x at 16x128.
EXACT_ACTIVATION_FACTOR = 2.3
#: Cost of an exact HVP pass beyond the forward-backward pass it replaces, in
#: forward-backward passes (``step-time`` measures it: ~2 on this CPU, SPEC §4's
#: 25.5 ms vs 8.4 ms gives 2.0).
EXACT_HVP_COST = 2.0

#: SASSHA's parameter-sized buffers beyond the engine's own gradient buffer,
#: counted from ``sassha_dist/optimizer.py`` and confirmed by :func:`check`:
#: every step: the exact copy of theta; exact-Hessian steps: theta, the probe and
#: the HVP products (which become the estimate in place); central or forward
#: finite-difference steps: theta, the perturbed gradient set aside, and the probe
#: as int8 signs (a quarter) -- the difference forms in the gradient buffer and
#: becomes the estimate in place. A second probe sample adds the estimate's own
#: buffer. Under ZeRO the perturbed pass comes last, so nothing is set aside, but
#: the point w is copied (the perturbed gradient must be taken at w exactly) and the
#: difference forms in a buffer of SASSHA's, not DeepSpeed's: theta, w, the
#: difference and the int8 probe. The engine's temporaries (a layer's gradient
#: while it is accumulated, the update kernel's) come on top, bounded by
#: :func:`check`'s kernel term.
SASSHA_BUFFERS = {"step": 1, "exact": 3, "finite_difference": 2.25, "finite_difference_zero": 3.25}


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer: parameters, layers, hidden size, vocabulary."""

    name: str
    n_params: float
    n_layers: int
    hidden: int
    vocab: int = 32000


#: Llama-like shapes (Llama 3.2 1B, Llama 2 7B, Llama 2 70B).
MODELS = {
    "1B": ModelShape("1B", 1.24e9, 16, 2048, 128256),
    "7B": ModelShape("7B", 6.74e9, 32, 4096, 32000),
    "70B": ModelShape("70B", 69.0e9, 80, 8192, 32000),
}


@dataclass(frozen=True)
class Hardware:
    """Per GPU: memory, achieved compute rate and network bandwidth."""

    memory_gb: float = 80.0
    #: achieved bf16 dense rate: ~40% of an H100's 989 TFLOP/s
    tflops: float = 400.0
    #: one 400 Gb/s InfiniBand NIC per GPU; every collective is taken at this
    #: rate (conservative inside one NVLink node)
    link_gbit: float = 400.0

    @property
    def link_bytes_per_s(self) -> float:
        return self.link_gbit * 1e9 / 8


@dataclass(frozen=True)
class Workload:
    """What each GPU processes per forward-backward pass."""

    seq_len: int = 4096
    micro_batch: int = 1
    #: full activation checkpointing (one layer input kept per layer; one forward recomputed)
    checkpointing: bool = True


@dataclass
class Estimate:
    """Per rank, per optimizer step; bytes unless named otherwise."""

    engine: str
    optimizer: str
    world_size: int
    n_params: float
    k: int
    hessian: str | None
    passes_per_step: float
    param_bytes: float
    grad_bytes: float
    master_bytes: float
    state_bytes: float
    unshard_bytes: float
    activation_bytes: float
    transient_bytes: float
    peak_bytes: float
    comm_bytes_per_step: float
    collectives: list[tuple[str, float, float]] = field(default_factory=list)
    compute_s: float = 0.0
    comm_s: float = 0.0

    @property
    def step_s(self) -> float:
        """Step time with no overlap of compute and communication (an upper bound)."""
        return self.compute_s + self.comm_s

    @property
    def step_s_overlapped(self) -> float:
        """Step time with communication fully hidden behind compute where it fits (a lower bound)."""
        return max(self.compute_s, self.comm_s)

    def fits(self, hardware: Hardware) -> bool:
        return self.peak_bytes <= hardware.memory_gb * GB


@dataclass(frozen=True)
class _Layout:
    """Bytes per parameter and the fraction each rank holds: (bytes, sharded?)."""

    param: tuple[float, bool]
    grad: tuple[float, bool]
    master: tuple[float, bool]
    state_sharded: bool
    gather_bytes: float  # all-gather element size (parameters)
    reduce_bytes: float  # gradient reduction element size
    per_pass: tuple[str, ...]  # collectives of one forward-backward pass
    after_update: tuple[str, ...]  # collectives after the optimizer changes its (sharded) parameters


def _layout(engine: str, dtype: str) -> _Layout:
    """Memory layout and collectives of each engine (``docs/cost_model.md`` gives the sources).

    bf16: DDP keeps fp32 parameters under autocast and all-reduces fp32
    gradients; DeepSpeed ZeRO keeps bf16 parameters and gradients, an fp32
    master copy and the optimizer state, communicating in bf16; FSDP2 keeps
    sharded fp32 parameters (its master copy) and gradients, all-gathers bf16
    and reduce-scatters fp32 (``MixedPrecisionPolicy(param_dtype=bf16,
    reduce_dtype=fp32)``). fp32: 4 bytes everywhere, no master copy.
    """
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"Invalid dtype={dtype!r}. Must be 'bf16' or 'fp32'.")
    low = 2.0 if dtype == "bf16" else 4.0
    master = 4.0 if dtype == "bf16" else 0.0
    if engine == "ddp":
        return _Layout((4.0, False), (4.0, False), (0.0, False), False, 4.0, 4.0, ("all_reduce",), ())
    if engine in ("zero1", "zero2"):
        return _Layout(
            (low, False),
            (low, engine == "zero2"),
            (master, True),
            True,
            low,
            low,
            ("reduce_scatter",),
            ("all_gather",),
        )
    if engine == "zero3":
        return _Layout(
            (low, True),
            (low, True),
            (master, True),
            True,
            low,
            low,
            ("all_gather", "all_gather", "reduce_scatter"),
            (),
        )
    if engine == "fsdp2":
        return _Layout(
            (4.0, True),
            (4.0, True),
            (0.0, False),
            True,
            low,
            4.0,
            ("all_gather", "all_gather", "reduce_scatter"),
            (),
        )
    raise ValueError(f"Invalid engine={engine!r}. Must be one of {ENGINES}.")


def _sent(collective: str, full_bytes: float, world_size: int) -> float:
    share = (world_size - 1) / world_size
    return (2.0 if collective == "all_reduce" else 1.0) * share * full_bytes


def activation_bytes(model: ModelShape, workload: Workload, *, checkpointing: bool | None = None) -> float:
    """bf16 activations of one micro-batch, flash attention (no s^2 term; Korthikanti et al. 2022).

    Per layer a full forward keeps ~34 s b h bytes; with checkpointing only the
    layer inputs (2 s b h bytes a layer) plus one layer's full set. The logits
    add s b V (bf16) plus the same in fp32 for the loss.
    """
    sbh = workload.seq_len * workload.micro_batch * model.hidden
    checkpointing = workload.checkpointing if checkpointing is None else checkpointing
    layers = 2 * sbh * model.n_layers + 34 * sbh if checkpointing else 34 * sbh * model.n_layers
    return layers + 6 * workload.seq_len * workload.micro_batch * model.vocab


def estimate(
    n_params: float,
    world_size: int,
    engine: str,
    optimizer: str = "sassha",
    *,
    k: int = 10,
    n_samples: int = 1,
    hessian: str = "auto",
    fd_scheme: str = "central",
    dtype: str = "bf16",
    model: ModelShape | None = None,
    workload: Workload | None = None,
    hardware: Hardware | None = None,
    exact_hvp_cost: float = EXACT_HVP_COST,
    exact_activation_factor: float = EXACT_ACTIVATION_FACTOR,
) -> Estimate:
    """Memory, traffic, passes and time per rank and per step of ``optimizer`` under ``engine``.

    ``hessian``: ``"auto"`` is exact under DDP (per-rank probes, SPEC §4) and
    finite differences under the sharded engines, where double backward fails.
    ``model`` (a :class:`ModelShape`) is needed for activations, unshard
    buffers and time; without it those are 0 and only memory of model states,
    traffic and passes are meaningful.
    """
    if world_size < 1:
        raise ValueError(f"Invalid {world_size=}. Must be >= 1.")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Invalid optimizer={optimizer!r}. Must be one of {OPTIMIZERS}.")
    if k < 1 or n_samples < 1:
        raise ValueError(f"Invalid {k=} or {n_samples=}. Both must be >= 1.")
    if fd_scheme not in ("central", "forward"):
        raise ValueError(f"Invalid fd_scheme={fd_scheme!r}. Must be 'central' or 'forward'.")
    layout = _layout(engine, dtype)
    workload = workload or Workload()
    hardware = hardware or Hardware()
    w = world_size
    sharded = {
        "param": 1 / w if layout.param[1] else 1.0,
        "grad": 1 / w if layout.grad[1] else 1.0,
        "master": 1 / w if layout.master[1] else 1.0,
        "state": 1 / w if layout.state_sharded else 1.0,
    }
    param_bytes = n_params * layout.param[0] * sharded["param"]
    grad_bytes = n_params * layout.grad[0] * sharded["grad"]
    master_bytes = n_params * layout.master[0] * sharded["master"]
    state_bytes = n_params * 8.0 * sharded["state"]  # fp32 (m, v) or (m, D)
    # what the optimizer holds: fp32 parameters (DDP, FSDP2) or the fp32 master partition (ZeRO)
    optimizer_elements = n_params * sharded["state"]

    if hessian == "auto":
        hessian = "exact" if engine == "ddp" else "finite_difference"
    if optimizer != "adamw" and hessian == "exact" and engine != "ddp":
        raise ValueError(f"hessian='exact' is not available under {engine} (no double backward, SPEC §4).")

    activations = unshard = 0.0
    exact_activations = 0.0
    if model is not None:
        activations = activation_bytes(model, workload)
        if layout.param[1]:  # parameters gathered one layer at a time, the next one prefetched
            unshard = 2 * (n_params / model.n_layers) * (layout.gather_bytes + layout.reduce_bytes)
        if optimizer != "adamw" and hessian == "exact":
            # the double backward keeps the backward graph: checkpointing cannot drop it
            full = activation_bytes(model, workload, checkpointing=False)
            exact_activations = exact_activation_factor * full

    # passes and collectives per step (Hessian steps amortised over k)
    collectives: list[tuple[str, float, float]] = []

    def add(name: str, count: float, full_bytes: float) -> None:
        if count:
            collectives.append((name, count, _sent(name, full_bytes, w)))

    def add_pass(count: float) -> None:
        for c in layout.per_pass:
            add(c, count, n_params * (layout.gather_bytes if c == "all_gather" else layout.reduce_bytes))

    def add_param_update(count: float) -> None:
        for c in layout.after_update:
            add(c, count, n_params * layout.gather_bytes)

    transient = 0.0
    if optimizer == "adamw":
        passes = 1.0
        add_pass(1.0)
        add_param_update(1.0)
    else:
        if hessian == "exact":
            hessian_passes = n_samples * exact_hvp_cost
            hessian_buffers = SASSHA_BUFFERS["exact"] + (n_samples - 1)  # one probe set per sample
        elif hessian == "finite_difference":
            hessian_passes = n_samples * (2.0 if fd_scheme == "central" else 1.0)
            fd_key = "finite_difference_zero" if engine.startswith("zero") else "finite_difference"
            hessian_buffers = SASSHA_BUFFERS[fd_key] + (n_samples > 1)  # a separate estimate
        else:
            raise ValueError(f"Invalid hessian={hessian!r}. Must be 'auto', 'exact' or 'finite_difference'.")
        gradient_passes = 1.0 if optimizer == "msassha" else 2.0  # M-SASSHA ascends along m: no ascent pass
        passes = gradient_passes + hessian_passes / k
        add_pass(gradient_passes)
        add_param_update(1.0)  # the perturbed parameters reach the compute copy (ZeRO-1/2)
        add_param_update(1.0)  # the updated parameters, as for AdamW
        if hessian == "exact":
            add("all_reduce", 1.0 / k, n_params * 4.0)  # per-rank estimates averaged (fp32)
        else:
            fd_points = hessian_passes
            add_pass(fd_points / k)
            add_param_update(fd_points / k)  # each FD point reaches the compute copy (ZeRO-1/2)
        step_buffers = SASSHA_BUFFERS["step"]
        transient = 4.0 * optimizer_elements * max(step_buffers, hessian_buffers)

    peak = (
        param_bytes
        + grad_bytes
        + master_bytes
        + state_bytes
        + unshard
        + max(activations, exact_activations)
        + transient
    )
    comm = sum(count * sent for _, count, sent in collectives)
    compute_s = comm_s = 0.0
    if model is not None:
        tokens = workload.seq_len * workload.micro_batch
        flops_per_pass = (8.0 if workload.checkpointing else 6.0) * n_params * tokens
        compute_s = passes * flops_per_pass / (hardware.tflops * 1e12)
        comm_s = comm / hardware.link_bytes_per_s
    return Estimate(
        engine=engine,
        optimizer=optimizer,
        world_size=w,
        n_params=n_params,
        k=k,
        hessian=None if optimizer == "adamw" else hessian,
        passes_per_step=passes,
        param_bytes=param_bytes,
        grad_bytes=grad_bytes,
        master_bytes=master_bytes,
        state_bytes=state_bytes,
        unshard_bytes=unshard,
        activation_bytes=max(activations, exact_activations),
        transient_bytes=transient,
        peak_bytes=peak,
        comm_bytes_per_step=comm,
        collectives=collectives,
        compute_s=compute_s,
        comm_s=comm_s,
    )


def projection(
    models: list[str] | None = None,
    world_sizes: list[int] | None = None,
    engines: list[str] | None = None,
    *,
    k: int = 10,
    hardware: Hardware | None = None,
    workload: Workload | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Rows of the projected table: one per (model, world size, engine), AdamW next to SASSHA."""
    hardware = hardware or Hardware()
    rows = []
    for name in models or list(MODELS):
        shape = MODELS[name]
        for w in world_sizes or [8, 64, 512]:
            for engine in engines or list(ENGINES):
                common = {"model": shape, "workload": workload, "hardware": hardware, "k": k, **kwargs}
                adamw = estimate(shape.n_params, w, engine, "adamw", **common)
                sassha = estimate(shape.n_params, w, engine, "sassha", **common)
                rows.append(
                    {
                        "model": name,
                        "world_size": w,
                        "engine": engine,
                        "adamw": adamw,
                        "sassha": sassha,
                        "fits_adamw": adamw.fits(hardware),
                        "fits_sassha": sassha.fits(hardware),
                        "ratio": sassha.step_s / adamw.step_s,
                        "ratio_overlapped": sassha.step_s_overlapped / adamw.step_s_overlapped,
                    }
                )
    return rows


def projection_table(rows: list[dict[str, Any]]) -> str:
    def fit(ok: bool) -> str:
        return "yes" if ok else "no"

    return format_table(
        [
            "model",
            "GPUs",
            "engine",
            "Hessian",
            "state GB (A / S)",
            "peak GB AdamW",
            "peak GB SASSHA",
            "fits 80 GB (A / S)",
            "sent GB/step (A / S)",
            "AdamW s/step",
            "SASSHA / AdamW",
            "overlapped",
        ],
        [
            [
                r["model"],
                r["world_size"],
                ENGINE_NAMES[r["engine"]],
                "exact" if r["sassha"].hessian == "exact" else "FD",
                f"{r['adamw'].state_bytes / GB:.3g} / {r['sassha'].state_bytes / GB:.3g}",
                r["adamw"].peak_bytes / GB,
                r["sassha"].peak_bytes / GB,
                f"{fit(r['fits_adamw'])} / {fit(r['fits_sassha'])}",
                f"{r['adamw'].comm_bytes_per_step / GB:.3g} / {r['sassha'].comm_bytes_per_step / GB:.3g}",
                r["adamw"].step_s,
                r["ratio"],
                r["ratio_overlapped"],
            ]
            for r in rows
        ],
    )


# -- what a single process can check ----------------------------------------------------


def _peak_above_start(fn) -> float:
    """Peak bytes allocated on the CPU during ``fn()`` above what was live when it started.

    Uses the profiler's memory timeline (``profile_memory=True``); tensors
    freed inside ``fn`` but allocated before it are not seen, so callers free
    gradients before measuring.
    """
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as p:
        fn()
    live = peak = 0
    for _, action, _, size in p._memory_profile().timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return float(peak)


def check(verbose: bool = True) -> dict[str, Any]:
    """Measure here what the model predicts for a single process (CPU, fp32).

    * optimizer state bytes after a step, AdamW and SASSHA, tiny GPT-2;
    * closure calls (forward-backward passes) per step over 20 steps at k = 10;
    * parameter-sized transient buffers: peak memory above the step's start on
      an MLP whose activations are negligible (three 1024-wide layers, batch 2),
      in units of the parameters' size, next to the model's count plus the
      gradient buffer every step allocates;
    * the exact-HVP activation factor on tiny GPT-2.
    """
    import copy

    import torch
    from torch import nn

    from sassha_dist import Sassha
    from sassha_dist.bench.models import build_lm, train_step
    from sassha_dist.bench.recorder import Recorder

    out: dict[str, Any] = {}
    lm = build_lm("tiny", seed=0)
    n_lm = sum(p.numel() for p in lm.parameters())
    ids = torch.randint(0, lm.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))

    def lm_closure(net):
        return lambda: net(input_ids=ids, labels=ids).loss

    # 1. state sizes
    states = {}
    for name, make in (
        ("adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-4)),
        ("sassha", lambda ps: Sassha(ps, lr=1e-4)),
    ):
        net = copy.deepcopy(lm)
        opt = make(net.parameters())
        train_step(opt, lm_closure(net))
        states[name] = sum(
            t.numel() * t.element_size()
            for s in opt.state.values()
            for t in s.values()
            if torch.is_tensor(t) and t.dim() > 0
        )
    predicted_state = estimate(n_lm, 1, "ddp", "sassha", dtype="fp32").state_bytes
    out["state"] = {"n_params": n_lm, "measured": states, "predicted": predicted_state}

    # 2. passes per step
    passes = {}
    k = 10
    for label, kwargs in (
        ("exact", {"hessian_method": "exact"}),
        ("FD central", {"hessian_method": "finite_difference"}),
        ("FD forward", {"hessian_method": "finite_difference", "fd_scheme": "forward"}),
    ):
        net = copy.deepcopy(lm)
        opt = Sassha(net.parameters(), lr=1e-4, lazy_hessian=k, **kwargs)
        calls = {"n": 0}
        inner = lm_closure(net)

        def counted(inner=inner, calls=calls):
            calls["n"] += 1
            return inner()

        for _ in range(2 * k):
            opt.step(counted)
        method = "exact" if label == "exact" else "finite_difference"
        scheme = "forward" if label == "FD forward" else "central"
        predicted = estimate(
            n_lm, 1, "ddp", "sassha", k=k, hessian=method, fd_scheme=scheme, exact_hvp_cost=0
        )
        passes[label] = {
            "closure_calls_per_step": calls["n"] / (2 * k),
            "predicted": predicted.passes_per_step,
        }
    out["passes"] = passes

    # 3. transient buffers
    def mlp() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(1024, 1024), nn.Tanh(), nn.Linear(1024, 1024), nn.Tanh(), nn.Linear(1024, 1)
        )

    x, y = torch.randn(2, 1024), torch.randn(2, 1)
    param_bytes = 4.0 * sum(p.numel() for p in mlp().parameters())
    largest = 4.0 * max(p.numel() for p in mlp().parameters())
    transients = {}
    for label, make, hessian_step, buffers in (
        ("AdamW", lambda ps: torch.optim.AdamW(ps, lr=1e-4), False, 0),
        ("SASSHA, no Hessian", lambda ps: Sassha(ps, lr=1e-4, lazy_hessian=2), False, SASSHA_BUFFERS["step"]),
        (
            "SASSHA, exact Hessian",
            lambda ps: Sassha(ps, lr=1e-4, lazy_hessian=2, hessian_method="exact"),
            True,
            SASSHA_BUFFERS["exact"],
        ),
        (
            "SASSHA, FD central Hessian",
            lambda ps: Sassha(ps, lr=1e-4, lazy_hessian=2, hessian_method="finite_difference"),
            True,
            SASSHA_BUFFERS["finite_difference"],
        ),
    ):
        with Recorder(world_size=1) as recorder:  # from before the model, so it sees every storage
            net = mlp()
            opt = make(net.parameters())
            closure = lambda net=net: ((net(x) - y) ** 2).mean()  # noqa: E731
            for _ in range(3):
                train_step(opt, closure)  # state exists; the next step is a Hessian step iff 3 % 2 == 0: no
            if hessian_step:
                train_step(opt, closure)  # now step 4: a Hessian step
            opt.zero_grad(set_to_none=True)
            start = recorder.reset_peak()
            train_step(opt, closure)
            measured = recorder.peak - start
        transients[label] = {
            "measured": measured / param_bytes,
            "predicted": 1 + buffers,  # + the gradient buffer every step allocates
            "kernel_temporaries_bound": 2 * largest / param_bytes,
        }
    out["transients"] = transients

    # 4. exact-HVP activation factor
    params = list(lm.parameters())
    big = torch.randint(0, lm.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(1))

    def fwd_bwd():
        lm.zero_grad(set_to_none=True)
        lm(input_ids=big, labels=big).loss.backward()
        lm.zero_grad(set_to_none=True)

    def hvp():
        loss = lm(input_ids=big, labels=big).loss
        grads = torch.autograd.grad(loss, params, create_graph=True)
        torch.autograd.grad(grads, params, [torch.ones_like(p) for p in params])

    lm_bytes = 4.0 * n_lm
    fb, hv = _peak_above_start(fwd_bwd), _peak_above_start(hvp)
    # fwd+bwd peak = activations + gradients; HVP pass = activations' + gradients with graph + products
    out["exact_activation_factor"] = (hv - 2 * lm_bytes) / (fb - lm_bytes)
    if verbose:
        print(check_report(out))
    return out


def compare_measured(rows: list[dict[str, Any]], n_params: float) -> dict[str, Any]:
    """The model next to ``memory-comm``'s measurements (fp32, W > 1): state, traffic, SASSHA's buffers.

    ``rows`` are :func:`sassha_dist.bench.memory_comm.measure`'s rows. Per row:
    state bytes; bytes sent per step in gradient reductions (reduce-scatters
    and all-reduces) and in parameter all-gathers; and SASSHA's peak above
    AdamW's on a Hessian step in buffers of the optimizer's shard, which the
    model puts at ``SASSHA_BUFFERS`` (activations and unshard buffers are the
    same for both optimizers and cancel).
    """
    out = []
    for r in rows:
        if r["world_size"] == 1:
            continue
        if r["k"] is None:
            optimizer = "adamw"
        else:
            optimizer = "msassha" if r["perturbation"] == PERTURB_MOMENTUM else "sassha"
        est = estimate(n_params, r["world_size"], r["engine"], optimizer, k=r["k"] or 10, dtype="fp32")
        grads = sum(c * sent for name, c, sent in est.collectives if name in ("reduce_scatter", "all_reduce"))
        gathers = sum(c * sent for name, c, sent in est.collectives if name == "all_gather")
        buffers = float("nan")
        if optimizer != "adamw":
            adamw = estimate(n_params, r["world_size"], r["engine"], "adamw", dtype="fp32")
            buffers = (est.peak_bytes - adamw.peak_bytes) / (4.0 * est.state_bytes / 8.0)
        traffic = r["traffic"]
        out.append(
            {
                "engine": r["engine"],
                "world_size": r["world_size"],
                "contestant": r["contestant"],
                "state": (r["state_bytes"], est.state_bytes),
                "grad_reduction_sent": (traffic["grad_reduction"]["sent"], grads),
                "param_gather_sent": (traffic["param_gather"]["sent"], gathers),
                "buffers_hessian_step": (r.get("extra_buffers_hessian_step", float("nan")), buffers),
            }
        )

    def pair(values: tuple[float, float], scale: float = 1e3) -> str:
        measured, model = values
        if measured != measured:
            return "-"
        return f"{measured / scale:.1f} / {model / scale:.1f}"

    table = format_table(
        [
            "engine",
            "W",
            "optimizer",
            "state KB (measured / model)",
            "grad-reduction KB sent/step",
            "all-gather KB sent/step",
            "SASSHA buffers, Hessian step",
        ],
        [
            [
                ENGINE_NAMES[c["engine"]],
                c["world_size"],
                c["contestant"],
                pair(c["state"]),
                pair(c["grad_reduction_sent"]),
                pair(c["param_gather_sent"]),
                pair(c["buffers_hessian_step"], 1.0),
            ]
            for c in out
        ],
    )
    return {"rows": out, "table": "Cost model (fp32, k as run) next to the measurements:\n\n" + table}


def check_report(out: dict[str, Any]) -> str:
    state = out["state"]
    lines = [
        "Checks on this machine (single process, CPU, fp32):",
        "",
        f"optimizer state after one step, tiny GPT-2 ({state['n_params']:,} parameters): predicted "
        f"{state['predicted'] / 1e6:.3f} MB (8 bytes a parameter) for both; measured AdamW "
        f"{state['measured']['adamw'] / 1e6:.3f} MB, SASSHA {state['measured']['sassha'] / 1e6:.3f} MB",
        "",
        format_table(
            ["SASSHA, k = 10", "closure calls per step (measured)", "passes per step (model, c = 0)"],
            [[label, v["closure_calls_per_step"], v["predicted"]] for label, v in out["passes"].items()],
        ),
        "",
        "(an exact HVP adds c_exact fwd+bwd inside the second pass instead of a closure call; "
        "step-time measures c_exact)",
        "",
        format_table(
            ["step", "peak above start / param size (measured)", "model: grads + SASSHA buffers"],
            [[label, v["measured"], v["predicted"]] for label, v in out["transients"].items()],
        ),
        "",
        "(the rest is kernel temporaries: for-loop kernels allocate per tensor, at most "
        f"{next(iter(out['transients'].values()))['kernel_temporaries_bound']:.2g} parameter sizes here)",
        "",
        f"exact HVP pass activations / fwd+bwd activations (tiny GPT-2, batch 8x64): "
        f"{out['exact_activation_factor']:.3g} (model uses {EXACT_ACTIVATION_FACTOR})",
    ]
    return "\n".join(lines)


def report(
    rows: list[dict[str, Any]], hardware: Hardware, workload: Workload, k: int, hessian: str = "auto"
) -> str:
    where = (
        "exact (per-rank probes, double backward) under DDP, central finite differences (global probes) "
        "under sharded engines"
        if hessian == "auto"
        else "finite differences (global probes) under every engine"
    )
    return "\n".join(
        [
            f"cost-model: per rank, per step, SASSHA k = {k}, 1 probe, Hessian amortised over k; bf16 "
            f"compute, fp32 master weights and optimizer state; {hardware.memory_gb:g} GB GPUs at "
            f"{hardware.tflops:g} TFLOP/s achieved, {hardware.link_gbit:g} Gb/s per GPU; "
            f"{workload.micro_batch} x {workload.seq_len} tokens per GPU per pass, "
            f"{'full activation checkpointing' if workload.checkpointing else 'no checkpointing'}, "
            "flash attention",
            "",
            projection_table(rows),
            "",
            f"Hessian: {where}. s/step: compute + communication, no overlap; "
            "'overlapped': max(compute, communication).",
        ]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[8, 64, 512])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--memory-gb", type=float, default=Hardware.memory_gb)
    parser.add_argument("--tflops", type=float, default=Hardware.tflops, help="achieved TFLOP/s per GPU")
    parser.add_argument("--link-gbit", type=float, default=Hardware.link_gbit, help="Gb/s per GPU")
    parser.add_argument("--seq-len", type=int, default=Workload.seq_len)
    parser.add_argument("--micro-batch", type=int, default=Workload.micro_batch)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--fd-scheme", default="central", choices=["central", "forward"])
    parser.add_argument(
        "--hessian",
        default="auto",
        choices=["auto", "finite_difference"],
        help="auto: exact under DDP, finite differences under sharded engines",
    )
    parser.add_argument(
        "--check", action="store_true", help="also measure state sizes, passes and buffers here (~20 s)"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    hardware = Hardware(memory_gb=args.memory_gb, tflops=args.tflops, link_gbit=args.link_gbit)
    workload = Workload(
        seq_len=args.seq_len, micro_batch=args.micro_batch, checkpointing=not args.no_checkpointing
    )
    rows = projection(
        args.models,
        args.world_sizes,
        args.engines,
        k=args.k,
        hardware=hardware,
        workload=workload,
        fd_scheme=args.fd_scheme,
        hessian=args.hessian,
    )
    print(report(rows, hardware, workload, args.k, args.hessian))
    result: dict[str, Any] = {
        "hardware": asdict(hardware),
        "workload": asdict(workload),
        "rows": [
            {
                **{key: r[key] for key in ("model", "world_size", "engine", "fits_adamw", "fits_sassha")},
                "ratio": r["ratio"],
                "ratio_overlapped": r["ratio_overlapped"],
                "adamw": _as_dict(r["adamw"]),
                "sassha": _as_dict(r["sassha"]),
            }
            for r in rows
        ],
    }
    if args.check:
        print()
        result["check"] = check()
    return result


def _as_dict(e: Estimate) -> dict[str, Any]:
    d = {k: v for k, v in vars(e).items() if k != "collectives"}
    d["collectives"] = [list(c) for c in e.collectives]
    d["step_s"], d["step_s_overlapped"] = e.step_s, e.step_s_overlapped
    return d
