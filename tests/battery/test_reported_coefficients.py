"""What users see of the coefficient (docs/algorithm.md §2, §9): the reported ``beta`` and the applied
coefficient side by side, exact in the parameters' dtype, and the warning for ``beta_max = 0``."""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers import make_batches, make_model, train, two_groups
from hf_am import AMAdamW, AMSGD
from hf_am.state import APPLIED, BETA, FALLBACKS, RESTARTS

OPTIMIZERS = {"am_adamw": AMAdamW, "am_sgd": AMSGD}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("lam", [0.0, 0.1, 0.5])
def test_applied_coefficient_is_beta_plus_lam_over_one_plus_lam(name, lam):
    model = make_model()
    opt = OPTIMIZERS[name](two_groups(model), lr=1e-2, lam=lam, scope="group")
    train(model, opt, make_batches(4))
    stats = opt.beta_stats()
    summary = opt.beta_summary_tensor()
    betas = opt.betas_per_scope().double()
    applied = (betas + lam) / (1 + lam)
    assert summary[5].item() == pytest.approx(applied.mean().item(), abs=1e-7)
    assert stats["applied_min"] == pytest.approx(applied.min().item(), abs=1e-7)
    assert stats["applied_max"] == pytest.approx(applied.max().item(), abs=1e-7)
    assert stats["applied"] >= stats["beta"] - 1e-12  # lam pulls towards memory: applied >= beta
    if lam > 0:
        assert stats["applied_max"] <= (0.9 + lam) / (1 + lam) + 1e-7
        assert stats["applied_min"] >= lam / (1 + lam) - 1e-7  # the floor a beta_min of 0 does not remove


def test_a_restart_step_reports_zero_memory_kept():
    x = torch.nn.Parameter(torch.ones(4))
    opt = AMSGD([x], lr=0.1, restart_threshold=0.5, scope="model")
    for step in range(4):  # a gradient that flips sign: the adaptive beta collapses, the Restart variant resets
        x.grad = torch.ones(4) * (-1) ** step
        opt.step()
    stats = opt.beta_stats()
    assert stats["restarts"] >= 1 and stats["applied"] == 0.0 and stats["beta"] == 0.0


@pytest.mark.parametrize("name,kwargs", [("am_sgd", dict(momentum=0.0)), ("am_adamw", dict(betas=(0.0, 0.999)))])
def test_no_momentum_with_lam_warns_once_that_memory_is_still_kept(name, kwargs):
    params = list(make_model().parameters())
    with pytest.warns(UserWarning, match=r"=0 with lam=0.1 still keeps lam/\(1\+lam\) = 0.09091 of the momentum.*lam=0"):
        opt = OPTIMIZERS[name]([{"params": params[:2]}, {"params": params[2:]}], **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})  # once per optimizer
        OPTIMIZERS[name](params, lam=0.0, **kwargs)  # no memory at all: nothing to warn about


def test_float64_statistics_are_exact():
    model = make_model(dtype=torch.float64)
    opt = AMSGD(model.parameters(), lr=5e-2, scope="tensor")
    train(model, opt, make_batches(3, dtype=torch.float64))
    betas = opt.betas_per_scope()
    assert betas.dtype == torch.float64
    assert opt.beta == betas.mean().item()  # not rounded through float32
    assert opt.beta_stats()["beta_max"] == betas.max().item()


def test_a_pinned_float32_coefficient_never_logs_above_beta_max():
    """0.9 in float32 is 0.8999999762; its mean over steps must not come out as 0.9000000358."""
    model = make_model()
    opt = AMAdamW(model.parameters(), lam=0.0, beta_min=0.9)
    train(model, opt, make_batches(3))
    stats = opt.beta_stats()
    cap = float(torch.tensor(0.9, dtype=torch.float32))
    assert stats["beta"] <= cap and stats["beta_max"] <= cap and stats["beta_min"] == stats["beta_max"]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_the_summary_is_its_definition_over_the_scopes_states(name):
    """``beta_summary_tensor()`` (what the Trainer callback reads every step) against its docstring, key by
    key over the scopes' states: a float32 and a float64 group (the keys widen exactly), restarts counted,
    a NaN coefficient propagating to mean, min and max as torch's reductions do."""
    torch.manual_seed(0)
    single = [torch.nn.Parameter(torch.randn(5)) for _ in range(3)]
    double = [torch.nn.Parameter(torch.randn(4, dtype=torch.float64)) for _ in range(2)]
    opt = OPTIMIZERS[name]([{"params": single}, {"params": double}], lr=0.1, scope="tensor", restart_threshold=0.5)
    for step in range(5):  # gradients that flip sign: some scopes restart
        for p in single + double:
            p.grad = torch.randn_like(p) * (-1) ** step
        opt.step()

    def definition():
        reps = opt._scope_states()
        beta, applied = (torch.stack([s[key].double() for s in reps]) for key in (BETA, APPLIED))
        counts = [sum(s[key].double() for s in reps) for key in (RESTARTS, FALLBACKS)]
        return torch.stack([beta.mean(), beta.min(), beta.max(), *counts, applied.mean(), applied.min(), applied.max()])

    summary = opt.beta_summary_tensor()
    assert summary.dtype == torch.float64 and summary.shape == (8,)
    assert summary[3] >= 1  # a restart happened, so the counts are not trivially zero
    assert torch.equal(summary, definition())
    opt.state[double[1]][BETA].fill_(float("nan"))  # a scope whose coefficient is NaN
    summary = opt.beta_summary_tensor()
    assert summary[[0, 1, 2]].isnan().all() and not summary[3:].isnan().any()
    assert torch.equal(summary[3:], definition()[3:])
