"""Invalid hyperparameters and misused closures fail early, with messages that name the problem."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sassha_dist import Sassha
from tests.helpers import assert_same, make_batches, make_mlp, mse, snapshot


def _params():
    return list(make_mlp((3, 4, 1)).parameters())


INVALID = [
    # (keyword arguments, the parameter name the message must contain)
    ({"lr": -0.1}, "lr"),
    ({"lr": math.nan}, "lr"),
    ({"lr": math.inf}, "lr"),
    ({"betas": (1.0, 0.999)}, "betas"),
    ({"betas": (-0.1, 0.999)}, "betas"),
    ({"betas": (0.9, 1.0)}, "betas"),
    ({"betas": (0.9, math.nan)}, "betas"),
    ({"betas": (0.9,)}, "betas"),
    ({"betas": (0.9, 0.99, 0.999)}, "betas"),
    ({"weight_decay": -1e-4}, "weight_decay"),
    ({"weight_decay": math.nan}, "weight_decay"),
    ({"rho": -0.05}, "rho"),
    ({"rho": math.nan}, "rho"),
    ({"eps": -1e-8}, "eps"),
    ({"lazy_hessian": 0}, "lazy_hessian"),
    ({"lazy_hessian": 1.5}, "lazy_hessian"),
    ({"lazy_hessian": True}, "lazy_hessian"),
    ({"n_samples": 0}, "n_samples"),
    ({"n_samples": 2.0}, "n_samples"),
    ({"hessian_power": 0}, "hessian_power"),
    ({"hessian_power": 1.5}, "hessian_power"),
    ({"hessian_power": -0.5}, "hessian_power"),
    ({"hessian_power": "x"}, "hessian_power"),
    ({"hessian_power": True}, "hessian_power"),
    ({"perturb_eps": -1e-12}, "perturb_eps"),
    ({"perturb_eps": math.nan}, "perturb_eps"),
    ({"seed": -1}, "seed"),
    ({"seed": 1.0}, "seed"),
    ({"fd_step": 0.0}, "fd_step"),
    ({"fd_step": -1e-3}, "fd_step"),
    ({"fd_step": math.inf}, "fd_step"),
    ({"fd_step": math.nan}, "fd_step"),
    ({"hessian_method": "hutchinson"}, "hessian_method"),
    ({"fd_scheme": "backward"}, "fd_scheme"),
    ({"eps_placement": "before_power"}, "eps_placement"),
    ({"bias_correction": "steps"}, "bias_correction"),
    ({"weight_decay_mode": "coupled"}, "weight_decay_mode"),
    ({"probe_mode": "local"}, "probe_mode"),
    ({"on_nonfinite": "ignore"}, "on_nonfinite"),
    # Wrong types, as an unconverted config or command line hands them over: a ValueError that
    # names the value, never a bare TypeError from a comparison.
    ({"lr": "0.1"}, "lr='0.1'"),
    ({"lr": None}, "lr=None"),
    ({"rho": "abc"}, "rho='abc'"),
    ({"rho": True}, "rho=True"),
    ({"eps": "1e-4"}, "eps='1e-4'"),
    ({"weight_decay": "0"}, "weight_decay='0'"),
    ({"betas": ("0.9", 0.999)}, r"betas\[0\]='0.9'"),
    ({"betas": (0.9, None)}, r"betas\[1\]=None"),
    ({"betas": "0.9,0.99"}, "betas"),
    ({"perturb_eps": "1e-12"}, "perturb_eps='1e-12'"),
    ({"fd_step": "1e-3"}, "fd_step='1e-3'"),
    ({"lazy_hessian": "10"}, "lazy_hessian='10'"),
    ({"n_samples": None}, "n_samples=None"),
    ({"seed": "0"}, "seed='0'"),
    ({"adaptive": "false"}, "adaptive='false'"),
    ({"adaptive": 1}, "adaptive=1"),
    ({"local_perturbation": "true"}, "local_perturbation='true'"),
    ({"momentum_bias_correction": 0}, "momentum_bias_correction=0"),
    ({"replay_rng": "yes"}, "replay_rng='yes'"),
    ({"foreach": "true"}, "foreach='true'"),
    ({"hessian_method": 1}, "hessian_method=1"),
    ({"fd_scheme": None}, "fd_scheme=None"),
]


@pytest.mark.parametrize(
    "kwargs, name", INVALID, ids=[f"{k}={v!r}" for (kw, _) in INVALID for k, v in kw.items()]
)
def test_invalid_hyperparameter_raises_naming_it(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Sassha(_params(), **kwargs)


def test_valid_edge_values_are_accepted():
    Sassha(_params(), lr=0.0, betas=(0.0, 0.0), weight_decay=0.0, rho=0.0, eps=0.0, perturb_eps=0.0)
    Sassha(_params(), lazy_hessian=1, n_samples=1, hessian_power=1.0, seed=0, fd_step=1e-8)
    Sassha(_params(), hessian_power=lambda step: 0.5, fd_step=None)


def test_power_schedule_is_validated_at_step_time():
    model = make_mlp((3, 4, 1))
    opt = Sassha(model.parameters(), hessian_power=lambda step: 1.0 if step < 3 else 2.0)
    batch = make_batches(1, batch=4)[0]
    for _ in range(2):
        opt.step(lambda: mse(model, batch))
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"hessian_power\(3\)"):
        opt.step(lambda: mse(model, batch))
    assert_same(snapshot(model, opt), before)  # nothing was applied


@pytest.mark.parametrize(
    "group, name",
    [
        ({"lr": -1.0}, "lr"),
        ({"rho": -1.0}, "rho"),
        ({"eps": -1.0}, "eps"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"betas": (0.9, 1.5)}, "betas"),
        ({"betas": (0.9,)}, "betas"),
    ],
)
def test_invalid_param_group_is_rejected_and_not_added(group, name):
    model = make_mlp((3, 4, 1))
    params = list(model.parameters())
    opt = Sassha(params[:2])
    with pytest.raises(ValueError, match=name):
        opt.add_param_group({"params": params[2:], **group})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": params[2:], "lr": 0.01})  # the same params can then be added validly
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.01
    assert opt.param_groups[1]["rho"] == opt.defaults["rho"]  # missing keys come from the defaults


def test_invalid_group_in_constructor_raises():
    params = _params()
    with pytest.raises(ValueError, match="rho"):
        Sassha([{"params": params[:2]}, {"params": params[2:], "rho": -0.1}])


# ---------------------------------------------------------------------------------------------------
# Closures.
# ---------------------------------------------------------------------------------------------------


def _model_and_opt(**kwargs):
    model = make_mlp((3, 4, 1))
    return model, Sassha(model.parameters(), rho=0.1, lazy_hessian=1, **kwargs), make_batches(1, batch=4)[0]


def test_step_without_closure_raises():
    model, opt, _ = _model_and_opt()
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match="closure"):
        opt.step([])
    assert_same(snapshot(model, opt), before)


def _after_first_call(bad):
    """A closure that is fine at theta and returns ``bad(loss)`` from its second call on (the perturbed
    pass, with the params at theta + eps: a failure there must still restore theta)."""
    calls = {"n": 0}

    def make(model, batch):
        def closure():
            calls["n"] += 1
            loss = mse(model, batch)
            return loss if calls["n"] == 1 else bad(loss)

        return closure

    return make


BAD_RETURNS = {
    "python float": (lambda loss: loss.item(), TypeError, "tensor"),
    "non-scalar": (lambda loss: loss.expand(3), ValueError, "scalar"),
    "detached": (lambda loss: loss.detach(), ValueError, "graph"),
}


@pytest.mark.parametrize("where", ["first call", "perturbed pass"])
@pytest.mark.parametrize("case", list(BAD_RETURNS))
@pytest.mark.parametrize("hessian_method", ["exact", "finite_difference"])
def test_bad_closure_return_raises_and_leaves_params_unchanged(case, where, hessian_method):
    bad, error, pattern = BAD_RETURNS[case]
    model, opt, batch = _model_and_opt(hessian_method=hessian_method)
    opt.step(lambda: mse(model, batch))  # state exists, so "unchanged" covers it too
    before = snapshot(model, opt)
    closure = (
        (lambda: bad(mse(model, batch))) if where == "first call" else _after_first_call(bad)(model, batch)
    )
    with pytest.raises(error, match=pattern):
        opt.step(closure)
    assert_same(snapshot(model, opt), before)
    opt.step(lambda: mse(model, batch))  # and the optimizer is not stuck mid-step
    assert opt.counters["global_step"] == 2


def test_closure_exception_restores_params():
    model, opt, batch = _model_and_opt()
    before = snapshot(model, opt)
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        if calls["n"] == 2:  # raised at the perturbed point
            raise KeyError("data loader broke")
        return mse(model, batch)

    with pytest.raises(KeyError):
        opt.step(closure)
    assert_same(snapshot(model, opt), before)


def test_sparse_gradients_raise():
    emb = nn.Embedding(10, 3, sparse=True).double()
    head = nn.Linear(3, 1).double()
    opt = Sassha([*emb.parameters(), *head.parameters()])
    idx = torch.tensor([1, 4, 4, 7])
    before = snapshot([*emb.parameters(), *head.parameters()])
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(lambda: head(emb(idx)).square().mean())
    assert_same(snapshot([*emb.parameters(), *head.parameters()]), before)


def test_local_perturbation_needs_the_exact_hessian():
    """Ranks perturbed to different points would choose different finite-difference steps."""
    with pytest.raises(ValueError, match="local_perturbation"):
        Sassha(
            torch.nn.Linear(2, 1).parameters(), local_perturbation=True, hessian_method="finite_difference"
        )


def test_renamed_bias_correction_warns_and_runs_the_new_name():
    """``bias_correction="hessian_updates"``, its name in 0.1.0, warns once and is ``"hessian_refreshes"``.

    Same trajectory bit for bit; an optimizer pickled with the old name loads under the new one.
    """
    runs = {}
    for name in ("hessian_updates", "hessian_refreshes"):
        model = make_mlp((3, 4, 1))
        if name == "hessian_updates":
            with pytest.warns(FutureWarning, match="use bias_correction='hessian_refreshes'"):
                opt = Sassha(model.parameters(), lr=0.05, lazy_hessian=2, bias_correction=name)
        else:
            opt = Sassha(model.parameters(), lr=0.05, lazy_hessian=2, bias_correction=name)
        assert opt.options.bias_correction == "hessian_refreshes"
        for batch in make_batches(5, in_dim=3):
            opt.step(lambda model=model, batch=batch: mse(model, batch))
        runs[name] = snapshot(model, opt)
    assert_same(runs["hessian_updates"], runs["hessian_refreshes"])

    pickled = opt.__getstate__()
    old_options = copy.copy(opt.options)
    object.__setattr__(old_options, "bias_correction", "hessian_updates")  # as 0.1.0 pickled it
    pickled["options"] = old_options
    restored = Sassha.__new__(Sassha)
    with pytest.warns(FutureWarning, match="hessian_refreshes"):
        restored.__setstate__(pickled)
    assert restored.options.bias_correction == "hessian_refreshes"


def test_renamed_choice_in_the_reference_oracle():
    from sassha_dist.reference import ReferenceConfig

    with pytest.warns(FutureWarning, match="hessian_refreshes"):
        config = ReferenceConfig(bias_correction="hessian_updates")
    assert config.bias_correction == "hessian_refreshes"
