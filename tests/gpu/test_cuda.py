"""The optimizers on a CUDA device: same numbers as on CPU, and step() never synchronises.

Skipped (with the reason) where no CUDA device is present; run on a GPU machine with
``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch

from hf_am import AMAdamW, AMSGD
from helpers import (
    CountedCalls, loss_fn, make_batches, make_model, max_param_diff, param_and_state_tensors, per_group_am_adamw, train,
    trainer_split, two_groups,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

OPTIMIZERS = {
    "am_adamw": lambda params, **kw: AMAdamW(params, **{"lr": 1e-2, **kw}),
    "am_sgd": lambda params, **kw: AMSGD(params, **{"lr": 5e-2, **kw}),
}


def _cuda_batches(n, dtype=torch.float32):
    return [(x.cuda(), y.cuda()) for x, y in make_batches(n, dtype=dtype)]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("scope", ["model", "group", "tensor"])
@pytest.mark.parametrize("variant", [{}, {"restart_threshold": 0.4}, {"beta_min": 0.5}, {"foreach": True}])
def test_step_never_synchronises_on_cuda(name, scope, variant):
    """torch's sync debug mode turns every host-device synchronisation into an error
    (default path: the Triton kernels; ``foreach=True``: the multi-tensor path)."""
    model = make_model().cuda()
    opt = OPTIMIZERS[name](two_groups(model), scope=scope, **variant)
    batches = _cuda_batches(5)
    train(model, opt, batches[:1])  # first step: lazy state, cached index tensors
    summary = _steps_without_sync(model, opt, batches[1:])
    assert summary.is_cuda and summary.shape == (8,)


def _steps_without_sync(model, opt, batches) -> torch.Tensor:
    """Step on each batch with torch's sync debug mode set to "error" around ``step()`` and the callback's
    read (the forward and backward passes may synchronise); the last summary."""
    for batch in batches:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
            summary = opt.beta_summary_tensor()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return summary


def test_sync_debug_mode_catches_a_sync():
    """Negative control for the test above."""
    t = torch.ones((), device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):
            t.item()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("scope", ["model", "tensor"])
def test_cuda_matches_cpu_and_reference(name, scope):
    batches = make_batches(20, dtype=torch.float64)
    cpu_model, ref_model, fast_model = make_model(dtype=torch.float64), make_model(dtype=torch.float64), make_model(dtype=torch.float64)
    ref_model.cuda()
    fast_model.cuda()
    cpu = OPTIMIZERS[name](two_groups(cpu_model), scope=scope)
    ref = OPTIMIZERS[name](two_groups(ref_model), scope=scope, foreach=False)
    fast = OPTIMIZERS[name](two_groups(fast_model), scope=scope, foreach=True)
    train(cpu_model, cpu, batches)
    cuda_batches = [(x.cuda(), y.cuda()) for x, y in batches]
    train(ref_model, ref, cuda_batches)
    train(fast_model, fast, cuda_batches)
    assert max_param_diff(ref_model.cpu(), fast_model.cpu()) < 1e-12
    assert max_param_diff(cpu_model, fast_model) < 1e-10


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", [dict(scope="model"), dict(scope="tensor", restart_threshold=0.4, wd=0.05), dict(scope="group", beta_min=0.5, tensor_lr=True)])
def test_triton_kernels_match_reference_on_cuda(name, dtype, variant):
    """fused=True (Triton) against the per-tensor reference path: float32 to 1e-6; bfloat16 within
    half the distance the run moved the parameters (the kernels round the stored state where the
    reference keeps float32 copies, a few bf16 ulps), so a kernel that does not train fails."""
    kw = dict(variant)
    wd, tensor_lr = kw.pop("wd", 0.0), kw.pop("tensor_lr", False)
    lr = 1e-2 if name == "am_adamw" else 0.3
    batches = _cuda_batches(20, dtype=dtype)
    models = [make_model(dtype=dtype).cuda(), make_model(dtype=dtype).cuda()]
    opts = [
        OPTIMIZERS[name](two_groups(m, wd=wd), lr=torch.tensor(lr, device="cuda") if tensor_lr else lr, **path, **kw)
        for m, path in zip(models, (dict(foreach=False), dict(fused=True)))
    ]
    for model, opt in zip(models, opts):
        train(model, opt, batches, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s % 3)))
    start = make_model(dtype=dtype).cuda()
    moved = max(float((p - q).detach().float().abs().max()) for p, q in zip(models[0].parameters(), start.parameters()))
    assert moved > 0.05, moved  # the reference run trained
    assert max_param_diff(*models) < (1e-6 if dtype == torch.float32 else 0.5 * moved)
    torch.testing.assert_close(opts[0].betas_per_scope(), opts[1].betas_per_scope(), rtol=0, atol=1e-4 if dtype == torch.float32 else 0.1)


def test_default_path_on_cuda_is_the_triton_kernels():
    from hf_am.kernels import triton as _triton_kernels

    assert _triton_kernels.available(), "Triton ships with torch's CUDA builds; this machine should have it"
    _triton_kernels._blocks_cache.clear()
    model = make_model().cuda()
    train(model, AMAdamW(two_groups(model)), _cuda_batches(2))
    assert len(_triton_kernels._blocks_cache) > 0  # the kernels ran


def test_pinned_am_adamw_is_torch_adamw_on_cuda():
    batches = _cuda_batches(30)
    a, b = make_model().cuda(), make_model().cuda()
    ref = torch.optim.AdamW(two_groups(a), lr=1e-2, betas=(0.9, 0.99))
    am = AMAdamW(two_groups(b), lr=1e-2, betas=(0.9, 0.99), lam=0.0, beta_min=0.9)
    train(a, ref, batches)
    train(b, am, batches)
    assert max_param_diff(a, b) < 1e-6


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_bf16_on_cuda_trains(name):
    model = make_model(dtype=torch.bfloat16).cuda()
    opt = OPTIMIZERS[name](model.parameters())
    losses = train(model, opt, _cuda_batches(30, dtype=torch.bfloat16) * 2)
    assert all(l == l and abs(l) < 1e3 for l in losses)
    assert sum(losses[-10:]) < sum(losses[:10])


def test_ranks_disagreeing_on_gradients_on_the_device_are_reported(tmp_path):
    """Device sums are not read inside step(): with rank 1 alone missing a gradient at step 3, the
    step runs its one collective without raising, and check_layout() (what beta, beta_stats() and
    the Trainer callback call) raises from then on, on every rank."""
    import dist_common

    results = dist_common.launch("dist_flat.py", ["late-cuda=tensor,model"], tmp_path, timeout=240)
    for rank, r in enumerate(results):
        for scope in ("tensor", "model"):
            res = r["late-cuda"][scope]
            assert res["errors"] == [None] * 4, (rank, scope, res["errors"])
            assert all(calls == {"all_reduce": 1} for calls in res["calls"][1:]), res["calls"]
            assert res["checked"][:2] == [None, None], res["checked"]
            assert all(c and "Ranks disagree on which parameters have gradients" in c for c in res["checked"][2:]), res["checked"]


@pytest.mark.parametrize("scope", ["tensor", "group"])
def test_groups_that_differ_only_in_weight_decay_take_one_launch_per_phase_on_cuda(scope):
    """Same bits as one launch per group (the base class's runs), and no synchronisation once the first
    step has built the per-tensor decay vector on the device."""
    from hf_am.kernels import triton as triton_kernels

    results = []
    batches = _cuda_batches(5)
    for cls in (AMAdamW, per_group_am_adamw()):
        model = make_model().cuda()
        opt = cls(trainer_split(model), lr=1e-2, scope=scope, restart_threshold=0.4)
        train(model, opt, batches[:1])
        with CountedCalls(triton_kernels, "adamw_sums") as launches:
            _steps_without_sync(model, opt, batches[1:])
        results.append((param_and_state_tensors(model.parameters(), opt), launches.calls))
    (merged, merged_calls), (per_group, per_group_calls) = results
    assert (merged_calls, per_group_calls) == (4, 8)
    assert len(merged) == len(per_group) and all(torch.equal(a, b) for a, b in zip(merged, per_group))
