"""The closed form in C (``am_coefficients``, hf_am/csrc/am_cpu_kernels.c) against its one Python definition
(:func:`hf_am.coefficient.step_coefficients`): the same bits for every input, including the corners
(C <= 0, NaN and infinite sums, a non-finite loss difference, per-scope thresholds with and without the
Restart variant), and whole runs that take it are the bits of runs that take the Python definition."""

from __future__ import annotations

import math

import pytest
import torch

import hf_am
from hf_am.coefficient import step_coefficients
from hf_am.kernels import cpu, cpu_build

pytestmark = pytest.mark.skipif(cpu_build.library() is None, reason="needs the C kernels (a C compiler)")

SPECIALS = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-300, -1e-300, 5e-324, 1e300, -1e300, math.inf, -math.inf, math.nan]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64).contiguous().view(torch.int64)  # NaN == NaN, and -0.0 != 0.0


def _sums(gen: torch.Generator, n: int) -> torch.Tensor:
    scale = 10.0 ** torch.randint(-6, 6, (n, 1), generator=gen).double()
    values = torch.randn(n, 3, generator=gen, dtype=torch.float64) * scale
    specials = torch.tensor(SPECIALS, dtype=torch.float64)[torch.randint(0, len(SPECIALS), (n, 3), generator=gen)]
    return torch.where(torch.rand(n, 3, generator=gen) < 0.25, specials, values).contiguous()


def _hyper(gen: torch.Generator, n: int, per_scope: bool, threshold: str):
    """(arguments of step_coefficients, packed rows for the C call, has_threshold)."""
    if not per_scope:
        lam, bmin, bmax = float(torch.rand((), generator=gen)), 0.1, 0.9
        thr = None if threshold == "none" else 0.5
        rows = torch.tensor([[lam], [bmin], [bmax], [math.nan if thr is None else thr]], dtype=torch.float64)
        return (lam, bmin, bmax, thr), rows, thr is not None
    lam = torch.rand(n, generator=gen, dtype=torch.float64)
    bmin = torch.rand(n, generator=gen, dtype=torch.float64) * 0.3
    bmax = 0.5 + torch.rand(n, generator=gen, dtype=torch.float64) * 0.5
    nan = torch.full((n,), math.nan, dtype=torch.float64)
    if threshold == "none":
        thr = None
    else:  # some scopes with the Restart variant (a threshold), the others without (NaN)
        thr = torch.where(torch.rand(n, generator=gen) < 0.5, torch.rand(n, generator=gen, dtype=torch.float64), nan)
    rows = torch.stack([lam, bmin, bmax, nan if thr is None else thr]).contiguous()
    return (lam, bmin, bmax, thr), rows, thr is not None


@pytest.mark.parametrize("per_scope", [False, True], ids=["one-hyper", "per-scope-hyper"])
@pytest.mark.parametrize("threshold", ["none", "restart"])
@pytest.mark.parametrize("loss", ["linear", "exact", "exact-special"])
def test_c_coefficients_are_the_bits_of_the_python_definition(per_scope, threshold, loss):
    gen = torch.Generator().manual_seed(hash((per_scope, threshold, loss)) % 2**31)
    checked = 0
    for trial in range(60):
        n = int(torch.randint(1, 50, (), generator=gen))
        sums = _sums(gen, n)
        args, rows, has_threshold = _hyper(gen, n, per_scope, threshold)
        if loss == "linear":
            delta = None
        elif loss == "exact":
            delta = torch.randn((), generator=gen, dtype=torch.float64) * 10.0 ** (trial % 7 - 3)
        else:
            delta = torch.tensor(SPECIALS[trial % len(SPECIALS)], dtype=torch.float64)
        expected = step_coefficients(sums, *args, delta)
        got = cpu.step_coefficients(sums, rows, has_threshold, delta)
        for name, want, have in zip(expected._fields, expected, got):
            assert have.shape == (n,) and have.dtype == torch.float64
            assert torch.equal(_bits(want), _bits(have)), (name, trial, sums, want, have)
            checked += 1
    assert checked == 60 * 5


def test_the_corners_are_what_the_definition_says():
    """Hand-checked rows, so that a shared mistake of both implementations is caught too."""
    sums = torch.tensor([[1.0, 1.0, 0.0],  # C == 0, numerator 0: alpha 0, beta = beta_max
                         [2.0, 1.0, 0.0],  # C == 0, numerator > 0: alpha 1, beta = 1 - 1 -> beta_min
                         [math.nan, 0.0, 1.0],  # not finite: beta_max, a fallback
                         [1.0, 0.5, 4.0]], dtype=torch.float64)  # alpha = 0.5 * 1.1 / 4
    rows = torch.tensor([[0.1], [0.0], [0.9], [math.nan]], dtype=torch.float64)
    adaptive, reported, applied, restart, fallback = cpu.step_coefficients(sums, rows, False, None)
    assert adaptive.tolist() == [0.9, 0.0, 0.9, 1.0 - 0.5 * 1.1 / 4.0]
    assert torch.equal(reported, adaptive)
    assert applied.tolist() == [(b + 0.1) / 1.1 for b in adaptive.tolist()]
    assert restart.tolist() == [0.0] * 4 and fallback.tolist() == [0.0, 0.0, 1.0, 0.0]
    # the Restart variant at 0.5: scope 1 (beta 0) restarts and reports 0; the others keep beta_max
    rows = torch.tensor([[0.1], [0.0], [0.9], [0.5]], dtype=torch.float64)
    adaptive, reported, applied, restart, fallback = cpu.step_coefficients(sums, rows, True, None)
    assert restart.tolist() == [0.0, 1.0, 0.0, 0.0]
    assert reported.tolist() == [0.9, 0.0, 0.9, 0.9]
    assert applied.tolist() == [(0.9 + 0.1) / 1.1] * 4


@pytest.mark.parametrize(
    "sums,rows,delta,match",
    [
        (torch.zeros(3, 3, dtype=torch.float32), torch.zeros(4, 1, dtype=torch.float64), None, "float64"),
        (torch.zeros(3, 6, dtype=torch.float64)[:, ::2], torch.zeros(4, 1, dtype=torch.float64), None, "not contiguous"),
        (torch.zeros(3, 2, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64), None, r"\(n, 3\)"),
        (torch.zeros(3, 3, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64), None, r"\(4, 1\) or \(4, 3\)"),
        (torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64), None, r"\(4, 1\) or \(4, 3\)"),
        (torch.zeros(3, 3, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), "one-element"),
        (torch.zeros(3, 3, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64), torch.zeros((), dtype=torch.float32), "float64"),
        ([[0.0, 0.0, 0.0]], torch.zeros(4, 1, dtype=torch.float64), None, "got list"),
    ],
)
def test_bad_arguments_are_refused_before_the_c_code_reads_them(sums, rows, delta, match):
    with pytest.raises(ValueError, match=match):
        cpu.step_coefficients(sums, rows, False, delta)


class TorchFormulaAMAdamW(hf_am.AMAdamW):
    """AM-AdamW that evaluates the coefficient with the Python definition on every path."""

    one_call_step = False  # the one-call step evaluates it in C (tests/unit/test_one_call_step.py)

    def _step_coefficients(self, plans, sums, layout, loss_delta):
        return step_coefficients(sums, *self._scope_hyperparameters(layout), loss_delta)


def _run(cls, monkeypatch=None, steps=6, **kw):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in [(9, 7), (7,), (40, 3), (5,)]]
    groups = [dict(params=params[:2], weight_decay=0.1), dict(params=params[2:], weight_decay=0.0, lr=3e-3,
                                                             lam=0.3, betas=(0.8, 0.999))]
    if kw.get("scope") == "model":
        groups = [dict(params=params)]
    opt = cls(groups, lr=1e-2, **kw)
    calls = []
    if monkeypatch is not None:  # count the C calls (the real function runs)
        real = cpu.step_coefficients
        monkeypatch.setattr(cpu, "step_coefficients", lambda *a: calls.append(1) or real(*a))
    for step in range(steps):
        def closure():
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=gen) * (1e3 if step == 3 and i == 2 else 1.0)
            if step == 2:
                params[1].grad = None
            return torch.tensor(float(step) * -0.1)

        if kw.get("loss_estimate") == "exact":
            opt.step(closure)
        else:
            closure()
            opt.step()
    state = [(k, v.clone()) for p in params for k, v in sorted(opt.state[p].items()) if torch.is_tensor(v)]
    return [p.detach().clone() for p in params], state, opt.beta_summary_tensor(), len(calls)


@pytest.mark.parametrize(
    "kw",
    [dict(scope="tensor"), dict(scope="group"), dict(scope="group", restart_threshold=0.5),
     dict(scope="model", loss_estimate="exact"), dict(scope="tensor", beta_min=0.3)],
    ids=["tensor", "group", "group-restart", "model-exact", "tensor-clip"],
)
def test_runs_on_the_c_coefficient_are_the_bits_of_runs_on_the_python_definition(kw, monkeypatch):
    params, state, summary, c_calls = _run(hf_am.AMAdamW, monkeypatch, **kw)
    assert c_calls == 6  # every step took the C formula (the fused CPU path)
    ref_params, ref_state, ref_summary, _ = _run(TorchFormulaAMAdamW, **kw)
    for a, b in zip(params, ref_params):
        assert torch.equal(a, b)
    for (ka, a), (kb, b) in zip(state, ref_state):
        assert ka == kb and torch.equal(_bits(a), _bits(b)), ka
    assert torch.equal(_bits(summary), _bits(ref_summary))


def test_paths_off_the_c_kernels_use_the_python_definition(monkeypatch):
    *_, c_calls = _run(hf_am.AMAdamW, monkeypatch, fused=False)
    assert c_calls == 0
    sgd_calls = []
    real = cpu.step_coefficients
    monkeypatch.setattr(cpu, "step_coefficients", lambda *a: sgd_calls.append(1) or real(*a))
    p = torch.randn(10, requires_grad=True)
    opt = hf_am.AMSGD([p], lr=0.1, momentum=0.9)
    for _ in range(3):
        p.grad = torch.randn(10)
        opt.step()
    assert len(sgd_calls) == 3  # AM-SGD's C kernels take it too
