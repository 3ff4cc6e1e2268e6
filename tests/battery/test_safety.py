"""Safe by default: every way a careful user can misuse the optimizers is a clear Python exception
(or works), a refused step changes nothing, and no input makes AM non-finite where AdamW stays finite.

Each numbered case of the reliability issue is a test here (the kernel cache cases are in
``tests/unit/test_kernel_cache.py``, the random misuse cases in ``test_fuzz.py``).
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path as FilePath

import numpy as np
import pytest
import torch

from helpers import loss_fn, make_batches, make_model, max_param_diff, train, two_groups
from hf_am import AMAdamW, AMSGD, Path

OPTIMIZERS = {"am_adamw": AMAdamW, "am_sgd": AMSGD}
PATHS = {"fused": dict(fused=True), "foreach": dict(foreach=True), "reference": dict(foreach=False), "default": {}}
LR = {"am_adamw": 1e-2, "am_sgd": 5e-2}


def _snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy({id(p): {k: v for k, v in opt.state[p].items()} for p in model.parameters() if p in opt.state})
    return params, state


def _unchanged(model, opt, snap) -> bool:
    params, state = snap
    now = {id(p): opt.state[p] for p in model.parameters() if p in opt.state}
    if set(now) != set(state):
        return False
    for key, saved in state.items():
        for name, value in saved.items():
            other = now[key].get(name)
            if isinstance(value, torch.Tensor):
                if not (isinstance(other, torch.Tensor) and other.dtype == value.dtype and torch.equal(other, value)):
                    return False
    return all(torch.equal(a, b) for a, b in zip(params, model.parameters()))


def _grads(model, batch):
    for p in model.parameters():
        p.grad = None
    loss_fn(model, batch).backward()


# ------------------------------------------------------------- 1. model.double() after steps
@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_parameters_changing_dtype_is_a_clear_error_and_changes_nothing(name, path):
    model = make_model()
    opt = OPTIMIZERS[name](model.parameters(), lr=LR[name], **PATHS[path])
    train(model, opt, make_batches(2))
    model.double()
    _grads(model, make_batches(1, dtype=torch.float64)[0])
    snap = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"param group 0, parameter 0 .*torch.float64.*state '(exp_avg|momentum_buffer)' has .*torch.float32.*Nothing was changed"):
        opt.step()
    assert _unchanged(model, opt, snap)


# ------------------------------------------------ 2. load_state_dict of a model with other shapes
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_of_other_shapes_is_refused_at_load(name):
    source = make_model(out_features=3)
    opt = OPTIMIZERS[name](source.parameters(), lr=LR[name])
    train(source, opt, make_batches(2))
    target = make_model(out_features=4)
    fresh = OPTIMIZERS[name](target.parameters(), lr=LR[name])
    with pytest.raises(ValueError, match=r"param group 0, parameter 4 has shape \(4, 5\), but its state .* shape \(3, 5\).*Nothing was loaded"):
        fresh.load_state_dict(opt.state_dict())
    assert len(fresh.state) == 0


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_swapped_behind_the_optimizers_back_is_caught_at_the_step(name):
    """The gate in front of the kernels: a state tensor of another size never reaches them."""
    model = make_model()
    opt = OPTIMIZERS[name](model.parameters(), lr=LR[name])
    train(model, opt, make_batches(2))
    p = next(iter(model.parameters()))
    key = opt.state_tensor_names[0]
    opt.state[p][key] = torch.zeros(3)
    _grads(model, make_batches(1)[0])
    snap = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match=rf"parameter 0 \(shape \(8, 6\).*state '{key}' has shape \(3,\)"):
        opt.step()
    assert _unchanged(model, opt, snap)


# -------------------------------------- 5. channels_last and non-contiguous tensors train everywhere
def _conv_run(name, memory_format, **kw):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=memory_format)
    opt = OPTIMIZERS[name](conv.parameters(), lr=LR[name], **kw)
    x = torch.randn(4, 3, 9, 9).to(memory_format=memory_format)
    for _ in range(5):
        opt.zero_grad()
        conv(x).square().mean().backward()
        opt.step()
    return conv, opt


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_channels_last_trains_on_every_path_and_equals_the_reference(name, path):
    got, opt = _conv_run(name, torch.channels_last, **PATHS[path])
    ref, _ = _conv_run(name, torch.contiguous_format, foreach=False)
    assert got.weight.is_contiguous(memory_format=torch.channels_last)
    scale = max(p.abs().max().item() for p in ref.parameters())
    assert max_param_diff(got, ref) <= 1e-6 * scale
    if path in ("fused", "default"):  # dense in another order: the kernels take it
        assert all(entry["path"] is Path.FUSED for entry in opt.paths())


@pytest.mark.parametrize("path", ["default", "foreach", "reference"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_strided_views_train_and_equal_the_reference(name, path):
    """A slice view is not dense: the kernels decline (saying why) and the portable paths step it."""

    def run(**kw):
        base = torch.nn.Parameter(torch.linspace(-1, 1, 40).view(5, 8))
        view = torch.nn.Parameter(base.detach()[:, ::2])  # strides (8, 2)
        opt = OPTIMIZERS[name]([view], lr=LR[name], **kw)
        for step in range(4):
            view.grad = torch.cos(torch.arange(20.0).view(5, 4) + step)
            opt.step()
        return view, opt

    got, opt = run(**PATHS[path])
    ref, _ = run(foreach=False)
    assert not got.is_contiguous()
    assert (got - ref).abs().max() <= 1e-6 * ref.abs().max()
    if path == "default":
        assert opt.paths()[0]["path"] is Path.MULTI_TENSOR and "strided view" in opt.paths()[0]["why"]
    with pytest.raises(RuntimeError, match="fused=True cannot step param group 0: .*strided view"):
        run(fused=True)


# ---------------------------------------------------- 6. one huge finite gradient stays finite
@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_huge_gradient_leaves_every_path_finite_like_torch(name, path):
    def gradients(step, model):
        g = torch.Generator().manual_seed(step)
        return [torch.randn(p.shape, generator=g) * (1e19 if step == 2 else 1.0) for p in model.parameters()]

    torch_cls = {"am_adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3), "am_sgd": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, dampening=0.9)}
    for make in (lambda ps: OPTIMIZERS[name](ps, lr=1e-3, **PATHS[path]), torch_cls[name]):
        model = make_model()
        opt = make(model.parameters())
        for step in range(6):
            for p, g in zip(model.parameters(), gradients(step, model)):
                p.grad = g
            opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters()), type(opt).__name__
    assert opt.__class__.__module__.startswith("torch")  # the loop ran both


# ------------------------------------------------------------------------ 7. copies
@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_copies_step_exactly_like_the_original(name, copier):
    model = make_model()
    opt = OPTIMIZERS[name](two_groups(model, lr=LR[name]), lr=LR[name], scope="group")
    train(model, opt, make_batches(3))
    twin_model, twin = copy.deepcopy((model, opt)) if copier == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    assert twin.scope == "group" and twin.beta == opt.beta
    batches = make_batches(3, seed=7)
    train(model, opt, batches)
    train(twin_model, twin, batches)
    assert max_param_diff(model, twin_model) == 0.0
    assert twin.beta_stats() == opt.beta_stats()


# --------------------------------------------- 8. groups that cannot work together; per-group settings
def test_per_group_restart_thresholds_work_where_the_scope_allows():
    model = make_model()
    groups = two_groups(model)
    groups[0]["restart_threshold"] = 0.5  # only one group uses the Restart variant
    for scope in ("tensor", "group"):
        m = make_model()
        g = two_groups(m)
        g[0]["restart_threshold"] = 0.5
        opt = AMSGD(g, lr=5e-2, scope=scope)
        train(m, opt, make_batches(4))
        assert all(torch.isfinite(p).all() for p in m.parameters())
    with pytest.raises(ValueError, match="scope='model' computes one coefficient for all parameter groups"):
        AMSGD(groups, lr=5e-2, scope="model")


def test_per_group_threshold_is_that_groups_variant_only():
    """A group without a threshold adapts; one with it stays at beta_max (or restarts): as separate optimizers."""
    torch.manual_seed(0)
    model = make_model()
    params = list(model.parameters())
    combined = AMSGD([{"params": params[:2], "restart_threshold": 0.7}, {"params": params[2:]}], lr=5e-2, scope="group")
    ref_model = copy.deepcopy(model)
    ref_params = list(ref_model.parameters())
    first = AMSGD(ref_params[:2], lr=5e-2, scope="group", restart_threshold=0.7)
    second = AMSGD(ref_params[2:], lr=5e-2, scope="group")
    for batch in make_batches(6):
        _grads(model, batch)
        combined.step()
        _grads(ref_model, batch)
        first.step()
        second.step()
    assert max_param_diff(model, ref_model) <= 1e-7


# --------------------------------------------------------------- 9. hyperparameters like torch
@pytest.mark.parametrize(
    "name,key",
    [(n, k) for n in sorted(OPTIMIZERS) for k in ("lr", "lam", "weight_decay", "eps", "beta_min") if (n, k) != ("am_sgd", "eps")],
)
def test_non_finite_hyperparameters_are_refused(name, key):
    for value in (float("inf"), float("nan"), -float("inf")):
        with pytest.raises(ValueError, match=rf"Invalid .*{value}"):
            OPTIMIZERS[name](make_model().parameters(), **{key: value})


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_numpy_scalars_and_zero_dim_tensors_are_accepted(name):
    a, b = make_model(), make_model()
    numpy_opt = OPTIMIZERS[name](a.parameters(), lr=np.float32(LR[name]), lam=np.float64(0.1), weight_decay=np.float32(0.0))
    plain = OPTIMIZERS[name](b.parameters(), lr=float(np.float32(LR[name])), lam=0.1, weight_decay=0.0)
    assert isinstance(numpy_opt.param_groups[0]["lr"], float)
    batches = make_batches(3)
    train(a, numpy_opt, batches)
    train(b, plain, batches)
    assert max_param_diff(a, b) == 0.0
    tensor_lr = OPTIMIZERS[name](make_model().parameters(), lr=torch.tensor(LR[name]), lam=torch.tensor(0.1))
    assert isinstance(tensor_lr.param_groups[0]["lr"], torch.Tensor) and tensor_lr.param_groups[0]["lam"] == pytest.approx(0.1)


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("am_adamw", dict(amsgrad=True), "does not support amsgrad=True: AMSGrad"),
        ("am_adamw", dict(capturable=True), "capturable=True: CUDA-graph"),
        ("am_adamw", dict(differentiable=True), "differentiable=True"),
        ("am_sgd", dict(nesterov=True), "nesterov=True: the AM coefficient"),
        ("am_sgd", dict(dampening=0.0), "dampening=0.0: AM-SGD always uses the damped form"),
        ("am_sgd", dict(differentiable=True), "differentiable=True"),
    ],
)
def test_torch_options_without_meaning_are_refused_with_the_reason(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        OPTIMIZERS[name](make_model().parameters(), **kwargs)


def test_dampening_equal_to_momentum_is_what_am_sgd_does():
    AMSGD(make_model().parameters(), momentum=0.8, dampening=0.8)


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_maximize_equals_minimising_the_negated_loss(name, path):
    a, b = make_model(), make_model()
    up = OPTIMIZERS[name](a.parameters(), lr=LR[name], maximize=True, **PATHS[path])
    down = OPTIMIZERS[name](b.parameters(), lr=LR[name], **PATHS[path])
    for batch in make_batches(4):
        up.zero_grad()
        (-loss_fn(a, batch)).backward()
        up.step()
        down.zero_grad()
        loss_fn(b, batch).backward()
        down.step()
    assert max_param_diff(a, b) <= 1e-6


# ------------------------------------------------------- 10. non-finite gradients stay where they are
@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("scope", ["model", "group", "tensor"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_nan_gradient_poisons_only_its_own_tensor(name, scope, path):
    model = make_model()
    opt = OPTIMIZERS[name](model.parameters(), lr=LR[name], scope=scope, **PATHS[path])
    train(model, opt, make_batches(2))
    _grads(model, make_batches(1)[0])
    first = next(iter(model.parameters()))
    first.grad[0, 0] = float("nan")
    opt.step()
    finite = [bool(torch.isfinite(p).all()) for p in model.parameters()]
    assert finite == [False] + [True] * (len(finite) - 1), finite  # as AdamW: only the tensor that saw NaN
    stats = opt.beta_stats()
    assert stats["fallbacks"] >= 1  # the user sees that the coefficient stopped adapting
    betas = opt.betas_per_scope()
    assert torch.isfinite(betas).all() if scope != "tensor" else torch.isfinite(betas[1:]).all()


def test_fallback_counts_are_in_the_trainer_log_keys():
    from hf_am.integrations.callback import LOG_KEYS

    assert "am_fallbacks" in LOG_KEYS


# ------------------------------------------------------------------- 11. switching from AdamW
@pytest.mark.parametrize("path", sorted(PATHS))
def test_adamw_state_continues_in_am_adamw(path):
    """Pinned AM-AdamW after AdamW's state equals AdamW going on: the moments, step counts and bias
    correction carried over exactly; the AM settings come from the constructor."""
    model = make_model()
    adamw = torch.optim.AdamW(two_groups(model), lr=1e-2, betas=(0.9, 0.99))
    train(model, adamw, make_batches(5))
    twin = copy.deepcopy(model)
    am = AMAdamW(two_groups(twin), lr=1e-2, betas=(0.9, 0.99), lam=0.0, beta_min=0.9, **PATHS[path])
    am.load_state_dict(copy.deepcopy(adamw.state_dict()))  # as from a checkpoint: no shared tensors
    assert am.param_groups[0]["lam"] == 0.0 and am.param_groups[0]["beta_min"] == 0.9
    later = make_batches(5, seed=3)
    train(model, adamw, later)
    train(twin, am, later)
    assert max_param_diff(model, twin) <= 1e-6
    adaptive = AMAdamW(two_groups(copy.deepcopy(model)), lr=1e-2)
    adaptive.load_state_dict(adamw.state_dict())  # adapting from there on trains too
    assert adaptive.param_groups[0]["lam"] == 0.1


def test_state_that_cannot_be_adopted_is_refused_at_load():
    model = make_model()
    amsgrad = torch.optim.AdamW(model.parameters(), amsgrad=True)
    train(model, amsgrad, make_batches(1))
    with pytest.raises(ValueError, match="amsgrad=True"):
        AMAdamW(model.parameters()).load_state_dict(amsgrad.state_dict())
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, sgd, make_batches(1))
    with pytest.raises(ValueError, match="written by another optimizer"):
        AMSGD(model.parameters()).load_state_dict(sgd.state_dict())


# --------------------------------------------------------------------- say which path runs
def test_paths_say_which_implementation_runs_and_why(caplog):
    model = make_model()
    opt = AMAdamW([{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:], "foreach": False}])
    entries = opt.paths()
    assert [e["group"] for e in entries] == [0, 1]
    assert entries[1]["path"] is Path.REFERENCE and entries[1]["why"] == "foreach=False"
    with caplog.at_level("INFO", logger="hf_am"):
        train(model, opt, make_batches(3))
    lines = [r.getMessage() for r in caplog.records if "takes the" in r.getMessage()]
    assert len(lines) == 2, lines  # logged once per group, not every step
    assert "param group 1 takes the reference path (foreach=False)" in lines[1]


# ------------------------------------------------- found by the fuzz harness (tests/battery/test_fuzz.py)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_an_option_written_after_construction_is_checked_before_the_step(name):
    model = make_model()
    opt = OPTIMIZERS[name](two_groups(model, lr=LR[name]), lr=LR[name])
    train(model, opt, make_batches(2))
    opt.param_groups[1]["weight_decay"] = "0.1"
    _grads(model, make_batches(1)[0])
    snap = _snapshot(model, opt)
    with pytest.raises(ValueError, match="Invalid weight_decay: '0.1'"):
        opt.step()
    assert _unchanged(model, opt, snap)
    opt.param_groups[1]["weight_decay"] = 0.0
    opt.step()  # fixed: steps again


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("damage", ["delete_step", "state_none", "scalar_replaced", "step_a_number", "expanded_param"])
def test_damaged_state_and_overlapping_parameters_are_refused_before_anything_changes(name, damage):
    model = make_model()
    opt = OPTIMIZERS[name](model.parameters(), lr=LR[name])
    train(model, opt, make_batches(2))
    p = next(iter(model.parameters()))
    if damage == "delete_step":
        del opt.state[p]["step"]
        match = r"its state has no \['step'\]"
    elif damage == "state_none":
        opt.state[p][opt.state_tensor_names[0]] = None
        match = "has NoneType, expected a tensor"
    elif damage == "scalar_replaced":  # after steps that checked the old one (the gate remembers checked scalars)
        opt.state[p]["am_beta"] = torch.zeros(3)
        match = r"state 'am_beta' has tensor\(\[0\., 0\., 0\.\]\), expected a one-element floating tensor"
    elif damage == "step_a_number":
        opt.state[p]["step"] = 5
        match = "state 'step' has 5, expected a one-element floating tensor"
    else:
        opt = OPTIMIZERS[name]([torch.nn.Parameter(torch.zeros(3).expand(2, 3))], lr=LR[name])
        opt.param_groups[0]["params"][0].grad = torch.ones(2, 3)
        with pytest.raises(RuntimeError, match="elements share memory"):
            opt.step()
        return
    _grads(model, make_batches(1)[0])
    snap = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert _unchanged(model, opt, snap)


def test_a_tensor_whose_storage_was_freed_under_it_is_refused_before_anything_reads_it():
    """A parameter, gradient or per-element state tensor whose storage was freed or shrunk under it
    (``untyped_storage().resize_()``, as FSDP does to unsharded parameters) would be read as freed memory
    by the kernels and by torch's own ops: a crash, not an error.  The gate checks their extent against
    their storage every step, one-element state included (the C code that reads or writes it checks it
    too); run in a worker
    process, where a miss kills the worker instead of the suite.  Every case (the worker's ``cases()``)
    must raise naming the tensor and change nothing."""
    tests = FilePath(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(FilePath(__file__).with_name("freed_storage_worker.py"))],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, f"the worker died (rc {proc.returncode}): {proc.stderr[-2000:]}"
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 2 * 3 * 5, proc.stdout
    where = {"state_freed": "state '", "scalar_freed": "state 'step'", "coefficient_freed": "state 'am_beta'",
             "param_view_freed": "the parameter", "grad_one_element_past": "its gradient"}  # fmt: skip
    for row in rows:
        assert row["raised"] and row["raised"].startswith("RuntimeError"), row
        assert where[row["damage"]] in row["raised"] and "storage" in row["raised"], row
        assert "Nothing was changed" in row["raised"] and row["unchanged"], row


@pytest.mark.parametrize(
    "bad,error,match",
    [
        ("not a dict", TypeError, "expects an optimizer state dict"),
        ({"state": {}}, TypeError, "keys 'state' and 'param_groups'"),
        ("sgd_into_adamw", ValueError, r"has no \['betas', 'eps'\]: the state dict was written by another optimizer"),
        ("garbage_betas", ValueError, r"param group 0: Invalid betas: \(0.9,\)"),
    ],
)
def test_state_dicts_that_do_not_fit_are_refused_at_load(bad, error, match):
    model = make_model()
    target = AMAdamW(model.parameters())
    if bad == "sgd_into_adamw":
        sgd = AMSGD(model.parameters())
        train(model, sgd, make_batches(1))
        bad = sgd.state_dict()
    elif bad == "garbage_betas":
        bad = copy.deepcopy(target.state_dict())
        bad["param_groups"][0]["betas"] = (0.9,)
    with pytest.raises(error, match=match):
        target.load_state_dict(bad)
    assert len(target.state) == 0 and target.param_groups[0]["betas"] == (0.9, 0.999)


def test_a_meta_tensor_lr_is_a_value_error():
    with pytest.raises(ValueError, match="meta device"):
        AMSGD(make_model().parameters(), lr=torch.tensor(0.1, device="meta"))
