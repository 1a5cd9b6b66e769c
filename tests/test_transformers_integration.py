"""The Hugging Face Trainer integration: ``--optim sassha`` parsing and a correct two-pass step.

Tolerances. The Trainer-vs-reference tests run the same model on the same
batches in the same order. The only arithmetic difference is how a
micro-batch's loss is normalised: the Trainer divides the summed token losses
by the token count of the whole accumulation window, the reference takes each
micro-batch's mean and divides by the number of micro-batches. The model is
float64 because SASSHA's preconditioner ``1/(sqrt(D) + eps)`` amplifies
rounding wherever a one-probe ``D`` is tiny (in float32 a mere change of
summation order moves some weights by 1e-4; see test_main_job's DDP test).
Observed after 4 steps (two Hessian refreshes): weights within 8e-12, the
logged (float32) losses identical. ``rtol=1e-9, atol=1e-10`` on weights and
``rtol=1e-6`` on losses leave a >10x margin, while a real error (a lost
micro-batch, the wrong gradient clipped, a missed scheduler step) moves
weights by 1e-3 or more. Resuming from a checkpoint must be bit-exact.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch
from torch import nn
from transformers import HfArgumentParser, TrainingArguments, get_scheduler
from transformers.training_args import OptimizerNames

from sassha_dist import Sassha
from sassha_dist import state_keys as keys
from sassha_dist.integrations.embedded import BYTE_VOCAB_SIZE, BlockDataset, byte_tokenizer, tiny_gpt2
from sassha_dist.integrations.transformers import (
    SasshaTrainer,
    SasshaTrainingArguments,
    TrainerSassha,
    parse_sassha_optim_args,
    sassha_optimizer_kwargs,
)
from sassha_dist.preemption import Preempted
from tests.helpers import trainer_arguments

BLOCK = 16
BATCH, ACCUM, STEPS = 2, 2, 4
LR, WD = 0.05, 0.1


pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> nn.Module:
    return tiny_gpt2(seed=0, n_positions=BLOCK).double()


def _blocks(n: int = BATCH * ACCUM * STEPS, seed: int = 0) -> torch.Tensor:
    # Byte ids only (no pad token), so every label counts.
    return torch.randint(0, 256, (n, BLOCK), generator=torch.Generator().manual_seed(seed))


def _args(tmp_path, **overrides) -> SasshaTrainingArguments:
    settings = {
        "optim_args": "rho=0.05,lazy_hessian=2",
        "learning_rate": LR,
        "weight_decay": WD,
        "warmup_steps": 1,
        "max_steps": STEPS,
        "per_device_train_batch_size": BATCH,
        "gradient_accumulation_steps": ACCUM,
        "max_grad_norm": 0.0,
    }
    return trainer_arguments(tmp_path / "out", **{**settings, **overrides})


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# -- arguments ---------------------------------------------------------------------------


def test_command_line_parses_optim_sassha_and_its_args(tmp_path):
    parser = HfArgumentParser(SasshaTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir", str(tmp_path), "--optim", "sassha", "--learning_rate", "0.2",
            "--adam_beta1", "0.8", "--report_to", "none", "--use_cpu",
            "--optim_args", "rho=0.02, lazy_hessian=5,betas=0.965:0.99,adaptive=true,"
            "hessian_method=finite_difference,fd_step=none,eps=1e-6,n_samples=2",
        ]
    )  # fmt: skip
    assert args.optim == "sassha"
    kwargs = sassha_optimizer_kwargs(args)
    assert kwargs == {
        "lr": 0.2,
        "betas": (0.965, 0.99),
        "rho": 0.02,
        "lazy_hessian": 5,
        "adaptive": True,
        "hessian_method": "finite_difference",
        "fd_step": None,
        "eps": 1e-6,
        "n_samples": 2,
    }
    assert isinstance(kwargs["lazy_hessian"], int) and isinstance(kwargs["rho"], float)
    # Without betas in optim_args, the pair comes from adam_beta1/2.
    args.optim_args = "rho=0.1"
    assert sassha_optimizer_kwargs(args)["betas"] == (0.8, 0.999)


def test_stock_optim_values_still_work(tmp_path):
    parser = HfArgumentParser(SasshaTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "adamw_torch", "--report_to", "none", "--use_cpu"]
    )
    assert args.optim == OptimizerNames.ADAMW_TORCH
    default = SasshaTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    assert default.optim == TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True).optim
    trainer = SasshaTrainer(
        model=_model(),
        args=_args(tmp_path, optim="adamw_torch", optim_args=None, max_steps=2),
        train_dataset=BlockDataset(_blocks()),
    )
    trainer.train()
    assert type(trainer.optimizer.optimizer) is torch.optim.AdamW


def test_unknown_optim_gets_the_trainers_own_error(tmp_path):
    with pytest.raises(ValueError) as stock:
        TrainingArguments(output_dir=str(tmp_path), optim="no_such_optimizer")
    parser = HfArgumentParser(SasshaTrainingArguments)
    with pytest.raises(ValueError) as ours:
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--optim", "no_such_optimizer"])
    assert "is not a valid OptimizerNames" in str(stock.value)
    assert str(ours.value) == str(stock.value)


@pytest.mark.parametrize(
    ("optim_args", "message"),
    [
        ("rho=abc", "expected a float"),
        ("lazy_hessian=2.5", "expected an int"),
        ("betas=0.9", "floats joined by ':'"),
        ("adaptive=maybe", "true/false"),
        ("lr=0.1", "--learning_rate"),
        ("weight_decay=0.1", "--weight_decay"),
        ("no_such_key=1", "Unknown optim_args key"),
        ("rho", "expected key=value"),
    ],
)
def test_bad_optim_args_fail_at_start_up(tmp_path, optim_args, message):
    with pytest.raises(ValueError, match=message):
        SasshaTrainingArguments(output_dir=str(tmp_path), optim="sassha", optim_args=optim_args)


def test_set_optimizer_accepts_sassha(tmp_path):
    args = SasshaTrainingArguments(output_dir=str(tmp_path), report_to="none")
    args.set_optimizer("sassha", learning_rate=0.3, args="rho=0.02")
    assert (args.optim, args.learning_rate) == ("sassha", 0.3)
    assert parse_sassha_optim_args(args.optim_args) == {"rho": 0.02}
    assert args.set_optimizer("sgd").optim == OptimizerNames.SGD


# -- the step ----------------------------------------------------------------------------


def _reference(max_grad_norm: float) -> tuple[dict[str, torch.Tensor], list[float], dict[str, int]]:
    """Sassha driven directly: one step([closures]) per accumulation window, same batches, same order."""
    model = _model()
    model.train()
    no_decay = {
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        for name, _ in module.named_parameters(recurse=False)
        if isinstance(module, nn.LayerNorm) or name == "bias"
    }
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if n not in no_decay], "weight_decay": WD},
        {"params": [p for n, p in named if n in no_decay], "weight_decay": 0.0},
    ]
    optimizer = Sassha(groups, lr=LR, rho=0.05, lazy_hessian=2)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=1, num_training_steps=STEPS)
    blocks = _blocks()
    losses = []
    for step in range(STEPS):
        window = blocks[step * BATCH * ACCUM : (step + 1) * BATCH * ACCUM].split(BATCH)
        closures = [(lambda b=b: model(input_ids=b, labels=b).loss / ACCUM) for b in window]
        if max_grad_norm > 0:
            loss = optimizer.gradient_pass(closures)
            optimizer.perturb(loss)
            optimizer.perturbed_pass(closures)
            optimizer.hessian_pass(closures)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)  # the perturbed gradient
            optimizer.update()
        else:
            loss = optimizer.step(closures)
        scheduler.step()
        losses.append(loss.item())
    return _params(model), losses, dict(optimizer.counters)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_trainer_with_accumulation_matches_a_reference_loop(tmp_path, max_grad_norm):
    model = _model()
    trainer = SasshaTrainer(
        model=model, args=_args(tmp_path, max_grad_norm=max_grad_norm), train_dataset=BlockDataset(_blocks())
    )
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    assert isinstance(optimizer, TrainerSassha)
    ref_params, ref_losses, ref_counters = _reference(max_grad_norm)

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == list(range(1, STEPS + 1))
    torch.testing.assert_close(
        torch.tensor([h["loss"] for h in logs]), torch.tensor(ref_losses), rtol=1e-6, atol=0.0
    )
    for name, value in _params(model).items():
        torch.testing.assert_close(value, ref_params[name], rtol=1e-9, atol=1e-10, msg=name)
    assert (
        optimizer.counters
        == ref_counters
        == {
            keys.GLOBAL_STEP: STEPS,
            keys.HESSIAN_REFRESHES: STEPS // 2,
            keys.SKIPPED_STEPS: 0,
        }
    )
    if max_grad_norm > 0:  # clipping was active: the Trainer logs the perturbed gradient's pre-clip norm
        assert all(h["grad_norm"] > max_grad_norm for h in logs)
    # SASSHA's diagnostics join the Trainer's logs.
    assert [h["sassha/hessian_refreshes_since_log"] for h in logs] == [1.0, 0.0, 1.0, 0.0]
    assert logs[-1]["sassha/hessian_refreshes"] == 2.0 and logs[-1]["sassha/skipped_steps"] == 0.0
    assert logs[-1]["sassha/hessian_max"] >= logs[-1]["sassha/hessian_mean"] > 0
    assert all(h["sassha/grad_norm"] > 0 for h in logs)


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(tmp_path):
    steps, save_at = 6, 3
    settings = {
        "max_steps": steps,
        "train_sampling_strategy": "random",  # the Trainer's resumable sampler state is part of the test
        "max_grad_norm": 1.0,
        "lr_scheduler_type": "cosine",
        "save_strategy": "steps",
        "save_steps": save_at,
    }
    data = BlockDataset(_blocks(40))
    full = _model()
    trainer = SasshaTrainer(model=full, args=_args(tmp_path / "a", **settings), train_dataset=data)
    trainer.train()
    full_counters = dict(trainer.optimizer.optimizer.counters)

    resumed = _model()
    trainer = SasshaTrainer(model=resumed, args=_args(tmp_path / "b", **settings), train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / f"checkpoint-{save_at}"))
    optimizer = trainer.optimizer.optimizer
    assert optimizer.counters == full_counters
    assert full_counters[keys.HESSIAN_REFRESHES] == steps // 2
    for (name, a), b in zip(_params(full).items(), _params(resumed).values(), strict=True):
        assert torch.equal(a, b), name


def test_logs_count_hessian_refreshes_since_the_last_log(tmp_path):
    """Refreshes at steps 1, 3, 5 (k = 2), a log every 3 steps: 2 then 1. Resumed from step 3,
    the first log counts this run's refreshes only (1), while the running total continues (3)."""
    settings = {
        "max_steps": 6,
        "optim_args": "rho=0.05,lazy_hessian=2",
        "logging_steps": 3,
        "save_strategy": "steps",
        "save_steps": 3,
    }
    data = BlockDataset(_blocks(48))
    trainer = SasshaTrainer(model=_model(), args=_args(tmp_path / "a", **settings), train_dataset=data)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [3, 6]
    assert [h["sassha/hessian_refreshes_since_log"] for h in logs] == [2.0, 1.0]
    assert [h["sassha/hessian_refreshes"] for h in logs] == [2.0, 3.0]

    resumed = SasshaTrainer(model=_model(), args=_args(tmp_path / "b", **settings), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-3"))
    logs = [h for h in resumed.state.log_history if "loss" in h and h["step"] > 3]
    assert [h["sassha/hessian_refreshes_since_log"] for h in logs] == [1.0]
    assert [h["sassha/hessian_refreshes"] for h in logs] == [3.0]


# -- set-up ------------------------------------------------------------------------------


def test_optimizer_routes(tmp_path):
    args = _args(tmp_path, optim="adamw_torch", optim_args=None, max_steps=1)
    data = BlockDataset(_blocks())
    model = _model()
    trainer = SasshaTrainer(
        model=model, args=args, train_dataset=data, optimizer_cls_and_kwargs=(Sassha, {"lr": 0.01})
    )
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, TrainerSassha)
    assert trainer.optimizer.optimizer.counters[keys.GLOBAL_STEP] == 1

    with pytest.raises(TypeError, match="TrainerSassha"):
        SasshaTrainer(
            model=model, args=args, train_dataset=data, optimizers=(Sassha(model.parameters()), None)
        )
    optimizer = TrainerSassha(model.parameters(), lr=0.01)
    trainer = SasshaTrainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
    trainer.train()
    assert optimizer.counters[keys.GLOBAL_STEP] == 1
    with pytest.raises(RuntimeError, match="none is in progress"):
        optimizer.step()


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        # FSDP2 works (tests/test_trainer_fsdp2.py); FSDP1 is refused naming FSDP2.
        ({"fsdp": True, "fsdp_config": {"version": 1}}, NotImplementedError, "FSDP2 only.*fsdp2.yaml"),
        ({"fp16": True}, ValueError, "Use --bf16 or fp32"),
    ],
)
def test_unsupported_engines_fail_at_start_up(tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        SasshaTrainer(
            model=_model(), args=_args(tmp_path, **overrides), train_dataset=BlockDataset(_blocks())
        )


@pytest.mark.parametrize(
    ("update", "fix"),
    [
        ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, "remove the block"),
        ({"fp16": {"enabled": True}}, '"bf16": {"enabled": true}'),
        (
            {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
            "remove zero_optimization.offload_optimizer",
        ),
        ({"zero_optimization": {"stage": 0}}, "ZeRO stage 1, 2 or 3"),
    ],
)
def test_deepspeed_fails_at_start_up(tmp_path, update, fix):
    """DeepSpeed configs SASSHA cannot run are refused before any engine exists, naming the fix
    (the supported ones are trained in tests/test_trainer_deepspeed.py)."""
    args = _args(tmp_path)
    # Set after validation: needs no deepspeed install (the check itself does not import deepspeed).
    args.deepspeed = {"zero_optimization": {"stage": 2}, **update}
    with pytest.raises(ValueError, match="optim='sassha' under DeepSpeed") as error:
        SasshaTrainer(model=_model(), args=args, train_dataset=BlockDataset(_blocks()))
    assert fix in str(error.value)


def test_missing_double_backward_names_the_fix(tmp_path):
    model = tiny_gpt2(seed=0, n_positions=BLOCK, attn_implementation="sdpa")
    trainer = SasshaTrainer(
        model=model, args=_args(tmp_path, max_steps=1), train_dataset=BlockDataset(_blocks())
    )
    before = _params(model)
    with pytest.raises(RuntimeError, match="attn_implementation='eager'"):
        trainer.train()
    for name, value in _params(model).items():  # the started step was undone
        assert torch.equal(value, before[name]), name


def test_byte_tokenizer_round_trips():
    tokenizer = byte_tokenizer()
    text = "déjà vu: x = 1\n\tπ"
    ids = tokenizer(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == BYTE_VOCAB_SIZE


def _signal_on_forward(model: nn.Module, forward: int) -> None:
    """SIGTERM to this process during the model's ``forward``-th forward (counted from 1)."""
    count = 0

    def hook(module, inputs):
        nonlocal count
        count += 1
        if count == forward:
            os.kill(os.getpid(), signal.SIGTERM)

    model.register_forward_pre_hook(hook)


def test_sigterm_mid_step_saves_that_step_and_resume_is_exact(tmp_path):
    """SIGTERM inside step 3's perturbed pass (forwards per step: 2 micro-batches x (gradient +
    perturbed), plus 2 x 2 central finite-difference ones on Hessian steps 1, 3, 5; steps 1 and 2
    make 8 + 4, so forward 15 is step 3's first perturbed one, the weights at theta + eps, as counted
    by a hook on a run like this one): the step finishes, the Trainer saves checkpoint-3 (with
    save_strategy "no"), train() raises Preempted (exit status 75), and resuming from that checkpoint
    ends bit for bit on the uninterrupted run's weights and counters. Dropout is on, as in a real
    model: the evaluation due at step 3 still runs before the save, because it draws from the RNG
    (its data loader's seed) and skipping it made the resumed run's dropout masks differ."""
    steps = 6
    settings = {
        "max_steps": steps,
        "train_sampling_strategy": "random",
        "optim_args": "rho=0.05,lazy_hessian=2,hessian_method=finite_difference",
        "eval_strategy": "steps",
        "eval_steps": 3,  # an evaluation is due at step 3, the step the signal stops
    }
    data = BlockDataset(_blocks(40))

    def model_with_dropout() -> nn.Module:
        return tiny_gpt2(seed=0, n_positions=BLOCK, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1).double()

    full = model_with_dropout()
    trainer = SasshaTrainer(
        model=full, args=_args(tmp_path / "a", **settings), train_dataset=data, eval_dataset=data
    )
    trainer.train()
    full_counters = dict(trainer.optimizer.optimizer.counters)

    preempted = model_with_dropout()
    _signal_on_forward(preempted, 15)
    args = _args(tmp_path / "b", **settings)
    trainer = SasshaTrainer(model=preempted, args=args, train_dataset=data, eval_dataset=data)
    with pytest.raises(Preempted) as stop:
        trainer.train()
    assert stop.value.code == 75 and stop.value.signal == signal.SIGTERM
    assert trainer.state.global_step == 3
    assert [h["step"] for h in trainer.state.log_history if "eval_loss" in h] == [3]
    assert sorted(p.name for p in (tmp_path / "b" / "out").iterdir()) == ["checkpoint-3"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the guard is gone

    resumed = model_with_dropout()
    trainer = SasshaTrainer(model=resumed, args=args, train_dataset=data, eval_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-3"))
    assert trainer.optimizer.optimizer.counters == full_counters
    for (name, a), b in zip(_params(full).items(), _params(resumed).values(), strict=True):
        assert torch.equal(a, b), name


def test_bad_preemption_signal_fails_at_start_up(tmp_path):
    with pytest.raises(ValueError, match="Invalid preemption signal 'SIGFOO'"):
        _args(tmp_path, preemption_signals="SIGTERM,SIGFOO")


def test_train_outside_the_main_thread_warns_and_trains_unguarded(tmp_path, caplog):
    """Python handles signals in the main thread only: train() from a worker thread (a notebook
    helper, a serving thread) warns that a signal will stop it without a checkpoint, then trains."""
    trainer = SasshaTrainer(model=_model(), args=_args(tmp_path), train_dataset=BlockDataset(_blocks()))
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(trainer.train().global_step))
    with caplog.at_level("WARNING", logger="sassha_dist.integrations.transformers"):
        thread.start()
        thread.join()
    assert outcome == [STEPS]
    assert "outside the main thread" in caplog.text and "SIGTERM" in caplog.text
