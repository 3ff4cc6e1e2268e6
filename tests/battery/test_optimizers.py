"""Single-process battery for AM-AdamW and AM-SGD (docs/algorithm.md §1-§7, §9)."""

from __future__ import annotations

import io
import itertools
import math

import numpy as np
import pytest
import torch

import hf_am
from hf_am import AMAdamW, AMSGD
from helpers import loss_fn, make_batches, make_model, max_param_diff, train, two_groups

OPTIMIZERS = {
    "am_adamw": lambda params, **kw: AMAdamW(params, **{"lr": 1e-2, **kw}),
    "am_sgd": lambda params, **kw: AMSGD(params, **{"lr": 5e-2, **kw}),
}
# The three implementations: compiled CPU kernels, multi-tensor, per-tensor reference.
PATHS = {"fused": dict(fused=True), "foreach": dict(foreach=True), "reference": dict(foreach=False)}


# --------------------------------------------------------------- 1. pinned coefficient
@pytest.mark.parametrize("path", sorted(PATHS))
def test_pinned_am_adamw_is_torch_adamw(path):
    """lam=0, beta_min=beta_max=beta1 reproduces torch.optim.AdamW (two groups, decay, changing lr)."""
    batches = make_batches(50)
    ref_model, am_model = make_model(), make_model()
    ref = torch.optim.AdamW(two_groups(ref_model), lr=1e-2, betas=(0.85, 0.99), eps=1e-7, foreach=True)
    am = AMAdamW(two_groups(am_model), lr=1e-2, betas=(0.85, 0.99), eps=1e-7, lam=0.0, beta_min=0.85, **PATHS[path])
    sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 + 0.5 * math.sin(s / 3.0))
    train(ref_model, ref, batches, sched(ref))
    train(am_model, am, batches, sched(am))
    assert max_param_diff(ref_model, am_model) < 1e-6
    assert am.beta == pytest.approx(0.85)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_pinned_am_sgd_is_torch_sgd_with_dampening(path):
    batches = make_batches(50)
    ref_model, am_model = make_model(), make_model()
    ref = torch.optim.SGD(two_groups(ref_model, lr=5e-2), lr=5e-2, momentum=0.8, dampening=0.8)
    am = AMSGD(two_groups(am_model, lr=5e-2), lr=5e-2, momentum=0.8, lam=0.0, beta_min=0.8, **PATHS[path])
    sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 + 0.5 * math.cos(s / 4.0))
    train(ref_model, ref, batches, sched(ref))
    train(am_model, am, batches, sched(am))
    assert max_param_diff(ref_model, am_model) < 1e-6


# ------------------------------------------------ the closed form, scope by scope
def _manual_beta(g, d, eta, eta_prev, lam, beta_max, metric=None):
    """docs/algorithm.md §2-§3 in float64 numpy, for lists of (g, d, eta, eta_prev) tensors."""
    A = B = C = 0.0
    for gi, di, e, ep, wi in zip(g, d, eta, eta_prev, metric or [None] * len(g)):
        w = np.ones_like(gi) if wi is None else 1.0 / wi
        A += e * np.sum(di * di * w)
        B += (e + ep) * np.sum(gi * di * w)
        C += e * np.sum((gi - di) ** 2 * w)
    alpha = (1 + lam) * (A - B) / C
    return float(np.clip(1 - np.clip(alpha, 0, 1), 0.0, beta_max))


@pytest.mark.parametrize("scope", ["model", "group", "tensor"])
def test_am_sgd_beta_matches_formula_per_scope(scope):
    """Per-group learning rates (and the previous one) weight the sums as in section 2."""
    model = make_model()
    groups = two_groups(model, lr=0.1, wd=0.0)
    opt = AMSGD(groups, lr=0.1, momentum=0.95, lam=0.2, scope=scope)
    batches = make_batches(3)
    train(model, opt, batches[:2])
    for group in opt.param_groups:  # change the lr: eta' must be the previous one
        group["lr"] *= 0.7
    opt.zero_grad()
    loss_fn(model, batches[2]).backward()
    params = [p for gr in opt.param_groups for p in gr["params"]]
    g = [p.grad.double().numpy() for p in params]
    d = [opt.state[p]["momentum_buffer"].double().numpy() for p in params]
    eta = [gr["lr"] for gr in opt.param_groups for _ in gr["params"]]
    eta_prev = [gr["am_prev_lr"] for gr in opt.param_groups for _ in gr["params"]]
    opt.step()
    got = opt.betas_per_scope().double().numpy()
    if scope == "model":
        expected = [_manual_beta(g, d, eta, eta_prev, 0.2, 0.95)]
    elif scope == "group":
        n0 = len(opt.param_groups[0]["params"])
        expected = [
            _manual_beta(g[:n0], d[:n0], eta[:n0], eta_prev[:n0], 0.2, 0.95),
            _manual_beta(g[n0:], d[n0:], eta[n0:], eta_prev[n0:], 0.2, 0.95),
        ]
    else:
        expected = [_manual_beta([a], [b], [e], [ep], 0.2, 0.95) for a, b, e, ep in zip(g, d, eta, eta_prev)]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert scope == "model" or len(set(np.round(got, 6))) >= 2  # the scopes really are separate


def test_am_adamw_beta_uses_preconditioned_metric():
    model = make_model()
    opt = AMAdamW(model.parameters(), lr=1e-2, lam=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, scope="model")
    batches = make_batches(4)
    train(model, opt, batches[:3])
    opt.zero_grad()
    loss_fn(model, batches[3]).backward()
    params = list(model.parameters())
    st = [opt.state[p] for p in params]
    g = [p.grad.double().numpy() for p in params]
    d = [(s["exp_avg"].double() / (1 - s["am_prod"].double())).numpy() for s in st]
    step = 4
    D = [
        np.sqrt((0.99 * s["exp_avg_sq"].double().numpy() + 0.01 * gi**2) / (1 - 0.99**step)) + 1e-8
        for s, gi in zip(st, g)
    ]
    expected = _manual_beta(g, d, [1e-2] * len(g), [1e-2] * len(g), 0.1, 0.9, metric=D)
    opt.step()
    assert opt.beta == pytest.approx(expected, rel=1e-5, abs=1e-6)


# ------------------------------------------ 2. exact mode == generic proximal solver
def _solve_proximal(x, g, d, f_t, b_t, eta, lam, P):
    """Solve section 1's proximal problem with a generic constrained solver (SLSQP).

    min_u max(f_t + <g,u>, b_t + <d,u>) + ||u||_P^2 / (2 eta) + lam ||u - u_prev||_P^2 / (2 eta),
    written with an epigraph variable s.  ``u_prev = -eta P^-1 d`` is the previous
    step (for SGD, P = I and this is section 1's ``-eta d``); section 4 puts both
    quadratic terms in the P metric.
    """
    from scipy.optimize import minimize

    n = x.size
    u_prev = -eta * d / P

    def objective(z):
        u, s = z[:n], z[n]
        return s + np.sum(P * u * u) / (2 * eta) + lam * np.sum(P * (u - u_prev) ** 2) / (2 * eta)

    def gradient(z):
        u = z[:n]
        return np.concatenate([P * u / eta + lam * P * (u - u_prev) / eta, [1.0]])

    planes = np.vstack([np.concatenate([-g, [1.0]]), np.concatenate([-d, [1.0]])])
    offsets = np.array([f_t, b_t])
    cons = [{"type": "ineq", "fun": lambda z: planes @ z - offsets, "jac": lambda z: planes}]
    z0 = np.concatenate([-eta * g / P, [max(f_t, b_t) + 1.0]])
    res = minimize(objective, z0, jac=gradient, constraints=cons, method="SLSQP", options={"ftol": 1e-15, "maxiter": 2000})
    # status 8 is SLSQP stopping at machine precision; the point is still the optimum.
    assert res.status in (0, 8), res.message
    assert np.all(planes @ res.x - offsets > -1e-10)
    return x + res.x[:n]


def _quadratic(seed, n=5):
    rng = np.random.default_rng(seed)
    Q = rng.normal(size=(n, n))
    H = torch.tensor(Q @ Q.T / n + 0.1 * np.eye(n))
    b = torch.tensor(rng.normal(size=n))
    x0 = torch.tensor(rng.normal(size=n))
    return H, b, x0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name", ["am_sgd", "am_adamw"])
def test_exact_step_solves_the_proximal_problem(name, seed):
    """Every step whose beta is not clipped at beta_max equals the generic solver's answer."""
    H, b, x0 = _quadratic(seed)
    x = torch.nn.Parameter(x0.clone())
    lam, eta = 0.1 + 0.05 * seed, 0.3
    if name == "am_sgd":
        opt = AMSGD([x], lr=eta, momentum=0.999, lam=lam, loss_estimate="exact")
    else:
        opt = AMAdamW([x], lr=eta / 3, betas=(0.999, 0.9), eps=1e-3, weight_decay=0.0, lam=lam, scope="model", loss_estimate="exact")
        eta = eta / 3

    def closure():
        opt.zero_grad()
        loss = 0.5 * x @ H @ x - b @ x
        loss.backward()
        return loss

    opt.step(closure)
    interior = 0
    for _ in range(25):
        state = opt.state[x]
        if name == "am_adamw":  # drop the bias correction so the step is the bare proximal step
            d = (state["exp_avg"] / (1 - state["am_prod"])).detach().clone()
            state["exp_avg"].copy_(d)
            state["am_prod"].fill_(0.0)
        else:
            d = state["momentum_buffer"].detach().clone()
        f_prev = float(state["am_prev_loss"])
        x_t = x.detach().clone()
        f_t = float(0.5 * x_t @ H @ x_t - b @ x_t)
        g = (H @ x_t - b).numpy()
        if name == "am_adamw":
            step = float(state["step"]) + 1
            P = np.sqrt((0.9 * state["exp_avg_sq"].numpy() + 0.1 * g**2) / (1 - 0.9**step)) + 1e-3
        else:
            P = np.ones_like(g)
        opt.step(closure)
        if opt.beta > 0.999 - 1e-6:
            continue  # clipped at beta_max: not the unconstrained proximal step
        interior += 0.0 < opt.beta
        expected = _solve_proximal(x_t.numpy(), g, d.numpy(), f_t, f_prev, eta, lam, P)
        np.testing.assert_allclose(x.detach().numpy(), expected, rtol=1e-5, atol=1e-9)
    assert interior >= 2  # steps with 0 < alpha < 1 were checked, not only the corners


# ---------------------------------------------------- 3. reference == foreach, every option
_COMBOS = [
    dict(scope=scope, lam=lam, beta_min=bmin, restart_threshold=thr, wd=wd, loss_estimate=est)
    for scope, lam, bmin, thr, wd, est in itertools.product(
        ["model", "group", "tensor"], [0.0, 0.1], [0.0, 0.5], [None, 0.4], [0.0, 0.05], ["linear", "exact"]
    )
    if not (est == "exact" and scope != "model")
]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernels", ["fused", "cpu", "device"])
def test_reference_path_equals_foreach_path(name, dtype, kernels, monkeypatch):
    """Every fast path against the reference path.

    "fused": the compiled CPU kernels; "cpu": the multi-tensor path in small tiles
    that split and pack tensors; "device": the multi-tensor kernels GPUs run,
    exercised here on CPU.
    """
    import hf_am.kernels.tiling as tiling

    monkeypatch.setattr(tiling, "CPU_TILE_ELEMENTS", 64 if kernels == "cpu" else None)
    fast = dict(fused=True) if kernels == "fused" else dict(foreach=True)
    batches = make_batches(20, dtype=dtype)
    for combo in _COMBOS:
        kw = dict(combo)
        wd = kw.pop("wd")
        models = [make_model(dtype=dtype), make_model(dtype=dtype)]
        opts = [
            OPTIMIZERS[name](two_groups(m, wd=wd), **path, **kw) for m, path in zip(models, (dict(foreach=False), fast))
        ]
        betas = [[], []]
        for i in range(2):
            train(models[i], opts[i], batches, closure=kw["loss_estimate"] == "exact",
                  on_step=lambda o, i=i: betas[i].append(o.betas_per_scope().clone()))
        tol = 1e-6 if dtype == torch.float32 else 1e-12
        assert max_param_diff(*models) < tol, combo
        for b0, b1 in zip(*betas):
            torch.testing.assert_close(b0, b1, rtol=0, atol=10 * tol)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("tile", [7, 64, 1 << 30, None])
def test_cpu_tiling_does_not_change_the_result(name, tile, monkeypatch):
    """Tiles that split tensors (7), pack several (64), hold everything, or none (device kernels) agree."""
    import hf_am.kernels.tiling as tiling

    batches = make_batches(15)
    models = [make_model(), make_model()]
    opts = [OPTIMIZERS[name](two_groups(m), foreach=fe, restart_threshold=0.2) for m, fe in zip(models, (False, True))]
    train(models[0], opts[0], batches)
    monkeypatch.setattr(tiling, "CPU_TILE_ELEMENTS", tile)
    assert len(tiling.TilePlan([list(models[1].parameters())])) == {7: 19, 64: 2, 1 << 30: 1, None: 1}[tile]
    train(models[1], opts[1], batches)
    assert max_param_diff(*models) < 1e-6


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("tile", [7, 1 << 30, None])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_zero_learning_rate_warmup_start_is_finite(name, tile, tensor_lr, monkeypatch):
    """A schedule that starts at lr=0 leaves x unchanged on that step and never produces NaN."""
    import hf_am.kernels.tiling as tiling

    monkeypatch.setattr(tiling, "CPU_TILE_ELEMENTS", tile)
    batches = make_batches(8)
    models = [make_model(), make_model()]
    lr = (lambda: torch.tensor(1e-2)) if tensor_lr else (lambda: 1e-2)
    opts = [OPTIMIZERS[name](m.parameters(), lr=lr(), foreach=fe) for m, fe in zip(models, (False, True))]
    for model, opt in zip(models, opts):
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / 4)  # lr = 0 on the first step
        before = [p.detach().clone() for p in model.parameters()]
        for step, batch in enumerate(batches):
            opt.zero_grad()
            loss_fn(model, batch).backward()
            model[0].weight.grad[0].zero_()  # an unused row (like an embedding): v stays 0 there
            opt.step()
            sched.step()
            if step == 0:
                assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert max_param_diff(*models) < 1e-6


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_tensor_learning_rate_equals_float_learning_rate(name):
    """Schedulers update a tensor lr in place; the previous lr must still be the previous one."""
    batches = make_batches(10)
    results = []
    for lr in (1e-2, torch.tensor(1e-2)):
        model = make_model()
        opt = OPTIMIZERS[name](model.parameters(), lr=lr)
        train(model, opt, batches, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 + s % 3))
        results.append(model)
    assert max_param_diff(*results) < 1e-6


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_previous_tensor_lr_is_one_buffer_refreshed_in_place(name):
    """The previous lr of a tensor lr is kept in one buffer, refreshed in place after the first step: a step
    captured in a CUDA graph then reads and writes the same buffer on every replay (tests/gpu/test_cuda_graph.py).
    It holds the last step's value and is never the lr tensor itself (a scheduler's fill_ must not reach it)."""
    model = make_model()
    lr = torch.tensor(1e-2)
    opt = OPTIMIZERS[name](model.parameters(), lr=lr)
    buffers = []
    for k, batch in enumerate(make_batches(4)):
        lr.fill_(1e-2 * (k + 1))
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
        prev = opt.param_groups[0]["am_prev_lr"]
        assert prev is not lr and prev.item() == pytest.approx(1e-2 * (k + 1))
        buffers.append(prev)
    assert all(b is buffers[0] for b in buffers)
    lr.fill_(5.0)
    assert buffers[0].item() == pytest.approx(4e-2)
    opt.param_groups[0]["am_prev_lr"] = torch.tensor(4e-2, dtype=torch.float64)  # e.g. loaded: another dtype
    opt.zero_grad()
    loss_fn(model, make_batches(1)[0]).backward()
    opt.step()
    prev = opt.param_groups[0]["am_prev_lr"]
    assert prev.dtype == lr.dtype and prev.item() == pytest.approx(5.0)


# ----------------------------------------------------------- 5. state_dict round trip
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scope", ["model", "tensor"])
def test_state_dict_round_trip_resumes_bit_for_bit(name, dtype, scope, tmp_path):
    kw = dict(scope=scope, restart_threshold=0.3 if name == "am_sgd" else None)
    batches = make_batches(20, dtype=dtype)
    full_model = make_model(dtype=dtype)
    full = OPTIMIZERS[name](two_groups(full_model), **kw)
    full_sched = torch.optim.lr_scheduler.CosineAnnealingLR(full, T_max=20)
    train(full_model, full, batches, full_sched)

    model = make_model(dtype=dtype)
    opt = OPTIMIZERS[name](two_groups(model), **kw)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    train(model, opt, batches[:9], sched)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "ckpt.pt")
    del model, opt, sched

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed_model = make_model(seed=123, dtype=dtype)
    resumed_model.load_state_dict(ckpt["model"])
    resumed = OPTIMIZERS[name](two_groups(resumed_model), **kw)
    resumed.load_state_dict(ckpt["opt"])
    resumed_sched = torch.optim.lr_scheduler.CosineAnnealingLR(resumed, T_max=20)
    resumed_sched.load_state_dict(ckpt["sched"])
    assert resumed.param_groups[0]["am_prev_lr"] == pytest.approx(ckpt["opt"]["param_groups"][0]["am_prev_lr"])
    train(resumed_model, resumed, batches[9:], resumed_sched)
    for a, b in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    assert resumed.beta_stats() == full.beta_stats()


def test_scalar_state_keeps_float32_for_bf16_params():
    model = make_model(dtype=torch.bfloat16)
    opt = AMAdamW(model.parameters())
    train(model, opt, make_batches(2, dtype=torch.bfloat16))
    sd = opt.state_dict()
    fresh = AMAdamW(model.parameters())
    fresh.load_state_dict(sd)
    state = fresh.state[next(iter(model.parameters()))]
    assert state["am_prod"].dtype == torch.float32 and state["am_beta"].dtype == torch.float32
    assert state["exp_avg"].dtype == torch.bfloat16


# ------------------------------------------------------------------ 6. no host sync
_SYNC_METHODS = ["item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("variant", [{}, {"restart_threshold": 0.5}, {"beta_min": 0.3, "scope": "group"}])
def test_step_never_synchronises(name, path, variant, monkeypatch):
    model = make_model()
    opt = OPTIMIZERS[name](two_groups(model), **PATHS[path], **variant)
    batches = make_batches(4)
    train(model, opt, batches[:1])  # lazy state init may allocate; steady state must not sync
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)

    def forbidden(*args, **kwargs):
        raise AssertionError("host-device synchronisation inside step()")

    for batch in batches[1:]:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        with monkeypatch.context() as m:
            for method in _SYNC_METHODS:
                m.setattr(torch.Tensor, method, forbidden)
            opt.step()
            summary = opt.beta_summary_tensor()  # documented as sync-free too
        sched.step()
    assert summary.shape == (8,)
    assert 0.0 <= opt.beta <= 0.9 + 1e-6


def test_sync_guard_catches_a_sync():
    """Negative control: the guard of the test above does fire on .item()."""
    t = torch.ones(())
    with pytest.raises(AssertionError):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(torch.Tensor, "item", lambda *a: (_ for _ in ()).throw(AssertionError("sync")))
            t.item()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_train(name, dtype):
    torch.manual_seed(0)
    model = make_model(dtype=dtype)
    opt = OPTIMIZERS[name](model.parameters())
    losses = train(model, opt, make_batches(30, dtype=dtype) * 2)
    assert all(math.isfinite(l) for l in losses)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert all(p.dtype == dtype for p in model.parameters())


# --------------------------------------------------------------- validation errors
@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("am_adamw", dict(lr=-1.0), "learning rate.*-1.0.*lr >= 0"),
        ("am_adamw", dict(eps=0.0), "eps.*eps > 0"),
        ("am_adamw", dict(weight_decay=-0.1), "weight_decay.*-0.1"),
        ("am_adamw", dict(lam=-0.5), "lam.*-0.5.*lam >= 0"),
        ("am_adamw", dict(betas=(1.0, 0.999)), "beta_max.*1.0.*0 <= beta_max < 1"),
        ("am_adamw", dict(betas=(0.9, 1.0)), "beta2.*1.0.*0 <= beta2 < 1"),
        ("am_adamw", dict(betas=(0.9, -0.1)), "beta2"),
        ("am_adamw", dict(beta_min=0.95), "beta_min.*0.95.*beta_max = 0.9"),
        ("am_adamw", dict(beta_min=-0.1), "beta_min"),
        ("am_adamw", dict(restart_threshold=0.0), "restart_threshold.*0.0.*0 < restart_threshold <= 1"),
        ("am_adamw", dict(restart_threshold=1.5), "restart_threshold.*1.5"),
        ("am_adamw", dict(scope="layer"), "scope.*'layer'.*'model', 'group', 'tensor'"),
        ("am_adamw", dict(loss_estimate="quadratic"), "loss_estimate.*'quadratic'.*'linear', 'exact'"),
        ("am_adamw", dict(loss_estimate="exact", scope="tensor"), "needs scope='model'"),
        ("am_sgd", dict(momentum=1.0), "momentum.*1.0"),
        ("am_sgd", dict(lr=-0.1), "learning rate"),
        ("am_sgd", dict(weight_decay=-1), "weight_decay"),
        ("am_sgd", dict(scope="everything"), "scope"),
    ],
)
def test_bad_arguments_are_clear_errors(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        OPTIMIZERS[name](make_model().parameters(), **kwargs)


def test_bad_types_are_type_errors():
    with pytest.raises(TypeError, match="betas"):
        AMAdamW(make_model().parameters(), betas=0.9)
    with pytest.raises(TypeError, match="foreach.*'yes'"):
        AMSGD(make_model().parameters(), foreach="yes")
    with pytest.raises(TypeError, match="fused.*1.*None, True, False"):
        AMAdamW(make_model().parameters(), fused=1)
    with pytest.raises(ValueError, match="fused=True and foreach=False exclude each other"):
        AMAdamW(make_model().parameters(), fused=True, foreach=False)
    with pytest.raises(TypeError, match="real"):
        AMAdamW([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))])


def test_bad_param_group_is_rejected_and_not_added():
    model = make_model()
    opt = AMAdamW(list(model.parameters())[:2])
    with pytest.raises(ValueError, match="lam"):
        opt.add_param_group({"params": list(model.parameters())[2:], "lam": -1.0})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_failed_step_leaves_parameters_and_state_untouched(name):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    model = make_model()
    opt = OPTIMIZERS[name]([{"params": model.parameters()}, {"params": emb.parameters()}])
    train(model, opt, make_batches(3))  # the embedding has no grad yet: fine
    params_before = [p.detach().clone() for p in model.parameters()]
    state_before = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in opt.state.items()}
    opt.zero_grad()
    loss_fn(model, make_batches(1, seed=9)[0]).backward()
    emb(torch.tensor([1, 2])).sum().backward()  # sparse gradient
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    for a, b in zip(params_before, model.parameters()):
        assert torch.equal(a, b)
    for p, st in state_before.items():
        for k, v in st.items():
            assert torch.equal(v, opt.state[p][k]), k


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("path", sorted(PATHS))
def test_grad_scaler_skips_overflow_steps_and_otherwise_changes_nothing(name, path):
    """Mixed-precision loss scaling (``torch.amp.GradScaler``): a step whose gradients overflow is
    skipped without touching the optimizer (no state, no beta, no previous-lr bookkeeping), and
    the other steps equal an unscaled run that leaves the same step out (power-of-two scales are
    exact)."""
    batches = make_batches(6)
    plain_model, scaled_model = make_model(), make_model()
    plain = OPTIMIZERS[name](two_groups(plain_model), **PATHS[path])
    scaled = OPTIMIZERS[name](two_groups(scaled_model), **PATHS[path])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    overflow_step = 3
    for step, batch in enumerate(batches):
        plain.zero_grad()
        loss_fn(plain_model, batch).backward()
        if step != overflow_step:
            plain.step()
        scaled.zero_grad()
        scaler.scale(loss_fn(scaled_model, batch)).backward()
        if step == overflow_step:
            next(scaled_model.parameters()).grad[0, 0] = float("inf")
            state_before = {p: {k: v.clone() for k, v in st.items()} for p, st in scaled.state.items()}
            params_before = [p.detach().clone() for p in scaled_model.parameters()]
            groups_before = [{k: v for k, v in g.items() if k != "params"} for g in scaled.param_groups]
        scaler.step(scaled)
        scaler.update()
        if step == overflow_step:
            assert scaler.get_scale() == 2.0**9  # the overflow was seen
            assert all(torch.equal(a, b) for a, b in zip(params_before, scaled_model.parameters()))
            for p, st in state_before.items():
                for k, v in st.items():
                    assert torch.equal(v, scaled.state[p][k]), k
            assert groups_before == [{k: v for k, v in g.items() if k != "params"} for g in scaled.param_groups]
    assert max_param_diff(plain_model, scaled_model) < 1e-7
    torch.testing.assert_close(plain.betas_per_scope(), scaled.betas_per_scope(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fused_on_unsupported_tensors_is_a_clear_error_and_changes_nothing(name):
    """fused=True insists on the compiled kernels; bf16 has none, and the step must say so up front."""
    model = make_model(dtype=torch.bfloat16)
    opt = OPTIMIZERS[name](model.parameters(), fused=True)
    loss_fn(model, make_batches(1, dtype=torch.bfloat16)[0]).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"fused=True cannot step param group 0: dtype torch.bfloat16"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(opt.state) == 0
    plain = OPTIMIZERS[name](model.parameters())  # the default falls back to the reference path
    plain.step()
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


_KERNEL_PROBE = """
import warnings, torch
from hf_am import AMAdamW
from hf_am.kernels import cpu_build
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = AMAdamW([p])
    opt.step()
print("LIB", cpu_build.library() is not None)
print("ERR", cpu_build.build_error())
print("WARN", [str(w.message) for w in caught])
print("P", p.tolist())
"""


def _probe_kernels(tmp_path, **env):
    import os
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _KERNEL_PROBE], capture_output=True, text=True, timeout=300, check=True,
        env={**os.environ, "HF_AM_CACHE": str(tmp_path), **env},
    )  # fmt: skip
    return dict(line.split(" ", 1) for line in out.stdout.splitlines())


def test_kernels_build_once_and_are_cached(tmp_path):
    first = _probe_kernels(tmp_path)
    assert first["LIB"] == "True", first
    built = list((tmp_path / "kernels").glob("*/*.so"))
    assert len(built) == 1 and not list((tmp_path / "kernels").glob("*/*.tmp.so"))
    mtime = built[0].stat().st_mtime_ns
    second = _probe_kernels(tmp_path)
    assert second["LIB"] == "True"
    assert built[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt
    assert first["P"] == second["P"]


def test_missing_compiler_falls_back_to_the_multi_tensor_path(tmp_path):
    fallback = _probe_kernels(tmp_path, HF_AM_CC="/nonexistent/cc")
    assert fallback["LIB"] == "False"
    assert "/nonexistent/cc" in fallback["ERR"] and "multi-tensor path" in fallback["WARN"]
    disabled = _probe_kernels(tmp_path, HF_AM_CPU_KERNELS="0")
    assert disabled["LIB"] == "False" and "HF_AM_CPU_KERNELS=0" in disabled["ERR"]
    fused = _probe_kernels(tmp_path / "other")
    assert fused["LIB"] == "True"
    for other in (fallback, disabled):
        assert eval(other["P"]) == pytest.approx(eval(fused["P"]), abs=1e-7)


def test_exact_without_closure_is_a_clear_error_and_changes_nothing():
    model = make_model()
    opt = AMSGD(model.parameters(), loss_estimate="exact")
    loss_fn(model, make_batches(1)[0]).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(opt.state) == 0


def test_model_scope_rejects_groups_with_different_momentum_settings():
    """Refused when the groups are given (constructor, add_param_group), naming both groups' settings;
    and, should a user edit param_groups afterwards, at the step, before anything changes."""
    model = make_model()
    params = list(model.parameters())
    with pytest.raises(ValueError, match=r"param group 1 has \{'lam': 0.3.*param group 0 \{'lam': 0.1.*scope='group'/'tensor'"):
        AMSGD([{"params": params[:2]}, {"params": params[2:], "lam": 0.3}], scope="model")
    opt = AMSGD([{"params": params[:2]}], scope="model")
    with pytest.raises(ValueError, match="param group 1 has"):
        opt.add_param_group({"params": params[2:], "restart_threshold": 0.5})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": params[2:]})
    opt.param_groups[1]["lam"] = 0.3
    loss_fn(model, make_batches(1)[0]).backward()
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="must agree"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params)) and len(opt.state) == 0


# ------------------------------------------------------- 7. clip and restart variants
def _opposing_gradients(name, **kw):
    """Gradient that flips sign every step: the adaptive beta collapses to 0 (alpha = 1)."""
    x = torch.nn.Parameter(torch.ones(4))
    opt = OPTIMIZERS[name]([x], lr=0.01, weight_decay=0.0, **kw)
    betas, restarts = [], []
    for t in range(6):
        x.grad = torch.full((4,), 1.0 if t % 2 == 0 else -1.0)
        opt.step()
        stats = opt.beta_stats()
        betas.append(stats["beta"])
        restarts.append(stats["restarts"])
    return x, opt, betas, restarts


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_adaptive_beta_drops_when_gradient_opposes_momentum(name):
    # alpha = (1+lam)(|d|^2 - 2<g,d>)/|g-d|^2 = (1+lam) * 3/4 with g = -d.
    _, _, betas, _ = _opposing_gradients(name, lam=0.1)
    assert betas[0] == pytest.approx(0.9)  # no momentum yet: beta_max
    assert betas[1] == pytest.approx(1 - 1.1 * 0.75, abs=1e-6)
    _, _, betas, _ = _opposing_gradients(name, lam=0.5)
    assert min(betas[1:]) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_clip_variant_keeps_beta_above_beta_min(name):
    _, _, betas, _ = _opposing_gradients(name, beta_min=0.6)
    assert min(betas) == pytest.approx(0.6)
    assert all(0.6 - 1e-7 <= b <= 0.9 + 1e-7 for b in betas)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_restart_variant_resets_momentum(name):
    x, opt, betas, restarts = _opposing_gradients(name, restart_threshold=0.5, lam=0.1)
    # Non-adaptive beta_max except on restart steps (reported as 0: no memory kept).
    assert betas[0] == pytest.approx(0.9) and all(b in (pytest.approx(0.0), pytest.approx(0.9)) for b in betas)
    assert restarts[-1] >= 1 and restarts == sorted(restarts)
    # After a restart the momentum is exactly the last gradient.
    state = opt.state[x]
    if restarts[-1] > restarts[-2]:
        if name == "am_sgd":
            torch.testing.assert_close(state["momentum_buffer"], x.grad)
        else:
            torch.testing.assert_close(state["exp_avg"] / (1 - state["am_prod"]), x.grad)


def test_restart_variant_without_restarts_is_fixed_momentum():
    """Threshold below every adaptive beta: plain fixed-coefficient momentum (SGD, dampening)."""
    batches = make_batches(10)
    a, b = make_model(), make_model()
    ref = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9, dampening=0.9)
    am = AMSGD(b.parameters(), lr=0.05, momentum=0.9, lam=0.0, restart_threshold=1e-9)
    train(a, ref, batches)
    train(b, am, batches)
    assert am.beta_stats()["restarts"] == 0
    assert max_param_diff(a, b) < 1e-6


# ---------------------------------------------------------------- API details
def test_beta_statistics_api():
    model = make_model()
    opt = AMAdamW(model.parameters(), scope="tensor")
    train(model, opt, make_batches(5))
    stats = opt.beta_stats()
    assert set(stats) == {"beta", "beta_min", "beta_max", "restarts", "fallbacks", "applied", "applied_min", "applied_max"}
    assert stats["fallbacks"] == 0
    per_scope = opt.betas_per_scope()
    assert per_scope.numel() == len(list(model.parameters()))
    assert stats["beta"] == pytest.approx(per_scope.mean().item())
    assert stats["beta_min"] == pytest.approx(per_scope.min().item())
    assert stats["beta_max"] == pytest.approx(per_scope.max().item())
    assert 0.0 <= stats["beta_min"] <= stats["beta_max"] <= 0.9 + 1e-7
    assert isinstance(opt.beta, float)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_works_with_transformers_schedulers(name):
    from transformers import get_cosine_schedule_with_warmup

    model = make_model()
    opt = OPTIMIZERS[name](model.parameters())
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=10)
    lrs = []
    train(model, opt, make_batches(10), sched, on_step=lambda o: lrs.append(o.param_groups[0]["am_prev_lr"]))
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(opt.defaults["lr"])


def test_params_without_grad_are_skipped():
    model = make_model()
    frozen = list(model.parameters())[0]
    frozen.requires_grad_(False)
    opt = AMAdamW(model.parameters())
    before = frozen.detach().clone()
    train(model, opt, make_batches(3))
    assert torch.equal(before, frozen) and frozen not in opt.state


def test_one_beta_function_serves_both_optimizers(monkeypatch):
    """beta is defined in exactly one Python function: replacing it changes both optimizers on every path
    but the C kernels, whose copy of it is held to it bit for bit (tests/unit/test_coefficient_kernel.py)."""
    import hf_am.coefficient as core

    calls = []
    real = core.adaptive_beta
    monkeypatch.setattr(core, "adaptive_beta", lambda *a, **k: calls.append(1) or real(*a, **k))
    for name in OPTIMIZERS:
        for kw in ({"fused": False}, {"fused": False, "foreach": False}):
            model = make_model()
            train(model, OPTIMIZERS[name](model.parameters(), **kw), make_batches(2))
    assert len(calls) == 8


def test_state_is_loadable_with_weights_only(tmp_path):
    model = make_model()
    opt = AMAdamW(model.parameters(), loss_estimate="exact", scope="model")
    train(model, opt, make_batches(3), closure=True)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert "am_prev_loss" in next(iter(sd["state"].values()))
