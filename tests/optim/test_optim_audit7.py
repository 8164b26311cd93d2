"""Regression tests of the seventh optimizer audit: integration with the torch.optim ecosystem
(schedulers, GradScaler, hooks, torch.load, torch.compile, dtype moves, torch.optim flags)."""

import copy
import io

import pytest
import torch
from torch import nn

from curvkit.optim import KLSOAP, SOAP, KLShampoo, Muon, Shampoo, SpectralShampoo, Symo

OPTIMIZERS = {
    "Shampoo": lambda ps, **kw: Shampoo(ps, lr=1e-2, precondition_frequency=2, **kw),
    "SOAP": lambda ps, **kw: SOAP(ps, lr=1e-2, precondition_frequency=2, **kw),
    "KLShampoo": lambda ps, **kw: KLShampoo(ps, lr=1e-2, precondition_frequency=2, **kw),
    "KLSOAP": lambda ps, **kw: KLSOAP(ps, lr=1e-2, precondition_frequency=2, **kw),
    "Muon": lambda ps, **kw: Muon(ps, lr=1e-2, ns_dtype=None, **kw),
    "SpectralShampoo": lambda ps, **kw: SpectralShampoo(ps, lr=1e-2, **kw),
    "Symo": lambda ps, **kw: Symo(ps, lr=1e-2, **kw),
}


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=g), torch.randn(16, 3, generator=g)


def _backward(model):
    X, Y = _data()
    dtype = next(model.parameters()).dtype
    loss = (model(X.to(dtype)) - Y.to(dtype)).square().mean()
    loss.backward()
    return loss


def _train(model, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        _backward(model)
        opt.step()


def _tensors(state):
    """Every tensor in a (nested) state, with its path."""
    if isinstance(state, torch.Tensor):
        yield (), state
    elif isinstance(state, dict):
        for k, v in state.items():
            for path, t in _tensors(v):
                yield (k, *path), t
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            for path, t in _tensors(v):
                yield (i, *path), t


# --------------------------------------------------------------------------- load hooks
@pytest.mark.parametrize("name", ["Shampoo", "Muon", "SpectralShampoo"])
def test_load_state_dict_hooks_act_as_in_torch_optim(name):
    # torch.optim: the pre-hook's returned dict is what is loaded, and post-hooks run last and
    # see the loaded state (bfloat16 kept). Was: the pre-hook's dict was overwritten by the
    # original one and the post-hook ran before the saved dtypes were put back (its edits lost).
    model = _model()
    opt = OPTIMIZERS[name](model.parameters(), state_dtype=torch.bfloat16)
    _train(model, opt, 2)
    saved = opt.state_dict()
    first = model[0].weight
    calls, seen = [], []

    def pre(optimizer, state_dict):
        calls.append("pre")
        state_dict = copy.deepcopy(state_dict)
        state_dict["state"][0]["marker"] = torch.tensor(7.0)
        return state_dict

    def post(optimizer):
        calls.append("post")
        seen.extend(t.dtype for path, t in _tensors(optimizer.state[first])
                    if path[-1] == "exp_avg")
        optimizer.state[first]["edited_by_post_hook"] = True

    opt.register_load_state_dict_pre_hook(pre)
    opt.register_load_state_dict_post_hook(post)
    opt.load_state_dict(saved)
    assert calls == ["pre", "post"]
    assert float(opt.state[first]["marker"]) == 7.0
    assert opt.state[first].get("edited_by_post_hook") is True
    assert seen and all(d == torch.bfloat16 for d in seen)


# --------------------------------------------------------------------------- torch.load
def _groups_fn(shape):  # a module-level function: picklable, but not weights_only-loadable
    return ("orthogonal", "identity") if len(shape) == 2 else ("sign",)


def test_symo_state_dict_with_a_groups_function_loads_with_default_torch_load():
    # torch >= 2.6 loads with weights_only=True by default, which refuses functions; the
    # groups callable is code (as LambdaLR's lambdas), so it is left out and the loading
    # optimizer keeps its own. Was: torch.load failed ("Weights only load failed").
    model, twin = _model(), _model()
    opt = Symo(model.parameters(), lr=1e-2, groups=_groups_fn)
    _train(model, opt, 2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)  # the default: weights_only=True
    resumed = Symo(twin.parameters(), lr=1e-2, groups=_groups_fn)
    twin.load_state_dict(model.state_dict())
    resumed.load_state_dict(loaded)
    assert resumed.param_groups[0]["groups"] is _groups_fn
    _train(model, opt, 2)
    _train(twin, resumed, 2)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- Muon schedules
@pytest.mark.parametrize("schedule", ["StepLR", "ReduceLROnPlateau"])
def test_muon_adamw_parameters_follow_the_lr_schedule_like_torch_adamw(schedule):
    # A scheduler moves group["lr"]; Muon's AdamW parameters stepped with the fixed adamw_lr
    # (the schedule silently did nothing for them). Reference: torch.optim.AdamW with the same
    # schedule on its own lr.
    g = torch.Generator().manual_seed(3)
    b0 = torch.randn(5, generator=g)
    ours, ref = nn.Parameter(b0.clone()), nn.Parameter(b0.clone())
    betas, eps, decay = (0.9, 0.95), 1e-8, 0.1
    opt = Muon([{"params": [ours], "use_muon": False}], lr=0.02, adamw_lr=1e-2,
               adamw_betas=betas, adamw_eps=eps, adamw_weight_decay=decay)
    adamw = torch.optim.AdamW([ref], lr=1e-2, betas=betas, eps=eps, weight_decay=decay)
    if schedule == "StepLR":
        make = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.25)  # noqa: E731
    else:
        make = lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(  # noqa: E731
            o, factor=0.5, patience=0)
    schedulers = [make(opt), make(adamw)]
    for _ in range(6):
        grad = torch.randn(5, generator=g)
        for p, o, s in zip((ours, ref), (opt, adamw), schedulers):
            p.grad = grad.clone()
            o.step()
            s.step(1.0) if schedule == "ReduceLROnPlateau" else s.step()
    assert opt.param_groups[0]["lr"] < 0.02 * 0.1  # the schedule did act
    assert (ours.detach() - ref.detach()).abs().max() <= 1e-12


def test_muon_state_dict_without_base_lr_keeps_the_adamw_step_it_had():
    # a state dict from before base_lr: the AdamW parameters go on with adamw_lr at its lr
    p = nn.Parameter(torch.zeros(3))
    opt = Muon([{"params": [p], "use_muon": False}], lr=0.02, adamw_lr=1e-2)
    p.grad = torch.ones(3)
    opt.step()
    saved = opt.state_dict()
    saved["param_groups"][0]["lr"] = 0.005
    del saved["param_groups"][0]["base_lr"]
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["base_lr"] == 0.005
    assert opt._adamw_lr(opt.param_groups[0]) == 1e-2


# --------------------------------------------------------------------------- torch.optim flags
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("flag", ["maximize", "differentiable"])
def test_unsupported_torch_optim_flags_are_refused(name, flag):
    # was: {"maximize": True} in a param group was accepted and ignored (the optimizer then
    # minimised); torch's flags that change the result are refused with the reason
    model = _model()
    with pytest.raises(ValueError, match=rf"{name}: the torch.optim option {flag}=True"):
        OPTIMIZERS[name]([{"params": list(model.parameters()), flag: True}])
    opt = OPTIMIZERS[name](model[0].parameters())
    with pytest.raises(ValueError, match=flag):
        opt.add_param_group({"params": list(model[2].parameters()), flag: True})
    assert len(opt.param_groups) == 1
    OPTIMIZERS[name]([{"params": list(model.parameters()), flag: False, "foreach": True}])


# --------------------------------------------------------------------------- dtype moves
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_follows_the_parameter_dtype_after_model_to(name):
    # model.to(dtype) keeps the parameters (and their state); torch.optim's load_state_dict
    # casts state to the parameter's dtype. Was: only the tensors re-written in a step took the
    # new dtype (bases, eigenvalues, SpectralShampoo's d stayed float32), mixing precisions.
    model = _model(torch.float32)
    opt = OPTIMIZERS[name](model.parameters())
    _train(model, opt, 3)
    model.double()
    _train(model, opt, 1)
    for p in model.parameters():
        for path, t in _tensors(opt.state[p]):
            assert t.dtype in (torch.float64, torch.int64), (path, t.dtype)


def test_spectral_after_model_to_float64_matches_a_run_with_the_state_cast():
    # reference: the same state cast to float64 by hand (what load_state_dict into float64
    # parameters gives when the state is cast); was: d and log c stayed float32 and every
    # factor update rounded them there
    model = _model(torch.float32)
    opt = SpectralShampoo(model.parameters(), lr=1e-2)
    _train(model, opt, 3)
    twin = copy.deepcopy(model).double()
    ref = SpectralShampoo(twin.parameters(), lr=1e-2)
    for p, q in zip(model.parameters(), twin.parameters()):
        ref.state[q] = copy.deepcopy(opt.state[p])
        for block in ref.state[q]["blocks"]:
            for key, value in block.items():
                block[key] = value.double()
    model.double()
    _train(model, opt, 3)
    _train(twin, ref, 3)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- torch.compile
def test_spectral_step_inside_torch_compile_runs_eagerly():
    # was: AttributeError ('_current') when dynamo traced SpectralShampoo.step; the step now
    # runs eagerly (a graph break) and equals the uncompiled run
    model, twin = _model(), _model()
    opt = SpectralShampoo(model.parameters(), lr=1e-2)
    ref = SpectralShampoo(twin.parameters(), lr=1e-2)

    @torch.compile(backend="eager")
    def train_step():
        opt.zero_grad()
        loss = _backward(model)
        opt.step()
        return loss

    for _ in range(2):
        train_step()
        _train(twin, ref, 1)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- GradScaler
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_grad_scaler_skip_leaves_parameters_and_state_untouched(name):
    # (works: GradScaler calls step only for finite gradients; guarded here)
    model = _model()
    opt = OPTIMIZERS[name](model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    _train(model, opt, 2)
    opt.zero_grad()
    X, Y = _data()
    scaler.scale((model(X) - Y).square().mean()).backward()
    model[0].weight.grad[0, 0] = float("inf")
    scaler.unscale_(opt)
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    before = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    after = opt.state_dict()
    assert scaler.get_scale() == 2.0**7
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert before["state"].keys() == after["state"].keys()
    for i in before["state"]:
        old, new = dict(_tensors(before["state"][i])), dict(_tensors(after["state"][i]))
        assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
        assert before["state"][i]["step"] == after["state"][i]["step"]


def test_muon_base_lr_given_in_a_group_is_checked_and_used():
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="Muon: base_lr must be in"):
        Muon([{"params": [p], "use_muon": False, "base_lr": -1.0}])
    opt = Muon([{"params": [p], "use_muon": False, "base_lr": 0.04}], lr=0.02, adamw_lr=1e-2)
    assert opt._adamw_lr(opt.param_groups[0]) == 1e-2 * 0.5


# --------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_scheduled_options_take_effect_at_the_next_step(name):
    # (works) OneCycleLR cycles lr and betas[0] (momentum for Muon); weight decay is changed by
    # hand mid-run. Reference: a twin whose group options are set by hand to the same values
    # before each step; any cached option would make the runs differ.
    model, twin = _model(), _model()
    opt = OPTIMIZERS[name](model.parameters(), weight_decay=0.01)
    ref = OPTIMIZERS[name](twin.parameters(), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=8)
    key = "momentum" if name == "Muon" else "betas"
    for t in range(6):
        if t == 3:
            opt.param_groups[0]["weight_decay"] = 0.1
        for group, mine in zip(ref.param_groups, opt.param_groups):
            for option in ("lr", key, "weight_decay"):
                group[option] = mine[option]
        _train(model, opt, 1)
        _train(twin, ref, 1)
        sched.step()
    assert opt.param_groups[0][key] != ref.defaults[key]  # the cycling did act
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
