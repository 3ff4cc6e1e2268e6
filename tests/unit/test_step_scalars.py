"""AM-AdamW's per-tensor scalars in C (``am_adamw_scalars``, hf_am/csrc/am_cpu_kernels.c) against their
Python definitions (``_counts_and_products`` and :func:`hf_am.multi_tensor.adamw_bias_terms`).

The C set computes, from each tensor's one-element ``step`` and product state, the count, the product,
``c = sqrt(1 - beta2^t)``, d's scale and ``eps * c`` in one call, where the definitions are about ten torch
ops.  Every operation is the one torch rounds, except ``beta2^t``: C takes libm's double ``pow`` (rounded
once to float32 for float32), torch's vector pow is within an ulp of it.  So: the counts, products and d's
scales are the definition's bits; ``c`` and ``eps'`` are the bits of the definition with libm's power
(``math.pow``, the rest written out in numpy here), and within what one ulp of the power moves them from
torch's.  Tensors the C code must not
read (another dtype, more than one element, a lazily negated view, a tensor subclass, not on the CPU) are
declined, and the optimizer runs the definitions for them.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest
import torch

import hf_am
from hf_am import multi_tensor
from hf_am.am_adamw import _counts_and_products
from hf_am.kernels import cpu, cpu_build
from hf_am.state import PROD

pytestmark = pytest.mark.skipif(cpu_build.library() is None, reason="needs the C kernels (a C compiler)")

NP = {torch.float32: np.float32, torch.float64: np.float64}


def _state(gen: torch.Generator, n: int, dtype: torch.dtype):
    """``n`` states with step counts from 0 to 10^7 and products in [0, 1] with the corners 0, 1, > 1 and NaN."""
    counts = torch.randint(0, 10, (n,), generator=gen) * 10 ** torch.randint(0, 7, (n,), generator=gen)
    prods = torch.rand(n, generator=gen, dtype=torch.float64) ** torch.randint(1, 400, (n,), generator=gen)
    corners = torch.tensor([0.0, 1.0, 1.5, math.nan, 1.0 - 2.0**-24], dtype=torch.float64)
    prods = torch.where(torch.rand(n, generator=gen) < 0.3, corners[torch.randint(0, len(corners), (n,), generator=gen)], prods)
    return [{"step": torch.tensor(float(c), dtype=dtype), PROD: torch.tensor(float(p), dtype=dtype)}
            for c, p in zip(counts.tolist(), prods.tolist())]  # fmt: skip


def _c_scalars(states, beta2, eps, dtype):
    out = cpu.adamw_scalars([s["step"] for s in states], [s[PROD] for s in states], beta2, eps, dtype)
    assert out is not None and out.shape == (5, len(states)) and out.dtype == dtype
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(torch.isnan(a), torch.isnan(b)) and bool((a == b)[~torch.isnan(a)].all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta2", [0.999, 0.99, 0.95, 0.9999, 0.5, 0.0])
def test_c_scalars_are_the_definitions(dtype, beta2):
    gen = torch.Generator().manual_seed(int(beta2 * 1e4) + (64 if dtype == torch.float64 else 32))
    eps = 1e-8
    for n in (1, 2, 21, 203):
        states = _state(gen, n, dtype)
        t, prod, c, d_scale, eps_scaled = _c_scalars(states, beta2, eps, dtype).unbind(0)
        steps, prods = _counts_and_products(states)
        ref_c, ref_d, ref_eps = multi_tensor.adamw_bias_terms(steps, prods, eps, beta2, dtype)
        assert _same_bits(t, steps) and _same_bits(prod, prods) and _same_bits(d_scale, ref_d)
        # c and eps' with libm's power, each step in the parameter type as torch rounds it
        f = NP[dtype]
        power = np.array([math.pow(float(f(beta2)), t) for t in steps.double().tolist()]).astype(f)  # libm's pow
        expected_c = np.sqrt(f(1) - power)
        assert np.array_equal(c.numpy(), expected_c)
        assert np.array_equal(eps_scaled.numpy(), f(eps) * expected_c)
        # torch's power is within an ulp of that: c moves by at most that ulp's share, plus c's own ulp
        bound = np.spacing(power) / np.maximum(expected_c, np.finfo(f).tiny) + np.spacing(expected_c)
        assert np.all(np.abs(c.numpy() - ref_c.numpy()) <= bound)
        assert np.all(np.abs(eps_scaled.numpy() - ref_eps.numpy()) <= f(eps) * bound + np.spacing(ref_eps.numpy()))


def test_the_test_sees_a_wrong_power():
    """Negative control: the torch definition with its power off by one ulp is not what the C code gives."""
    states = _state(torch.Generator().manual_seed(1), 50, torch.float32)
    c = _c_scalars(states, 0.999, 1e-8, torch.float32)[2].numpy()
    steps = _counts_and_products(states)[0].double().numpy()
    power = np.array([math.pow(float(np.float32(0.999)), t) for t in steps.tolist()]).astype(np.float32)
    off_by_one = np.sqrt(np.float32(1) - np.nextafter(power, np.float32(0)))
    assert not np.array_equal(c, off_by_one)


def _declined(**overrides):
    steps = [torch.tensor(3.0), torch.tensor(4.0)]
    prods = [torch.tensor(0.5), torch.tensor(0.25)]
    args = dict(steps=steps, prods=prods, beta2=0.999, eps=1e-8, dtype=torch.float32)
    args.update(overrides)
    return cpu.adamw_scalars(**args) is None


@pytest.mark.parametrize("case", [
    "float64 step for float32", "two-element step", "empty step", "negated view", "parameter subclass",
    "meta device", "float16 dtype", "lists of other lengths", "no tensors",
])  # fmt: skip
def test_tensors_the_c_code_must_not_read_are_declined(case):
    one = torch.tensor(0.5)
    overrides = {
        "float64 step for float32": dict(steps=[torch.tensor(3.0, dtype=torch.float64), torch.tensor(4.0)]),
        "two-element step": dict(steps=[torch.tensor([3.0, 1.0]), torch.tensor(4.0)]),
        "empty step": dict(steps=[torch.tensor([]), torch.tensor(4.0)]),
        "negated view": dict(prods=[torch._neg_view(torch.tensor(-0.5)), one]),
        "parameter subclass": dict(prods=[torch.nn.Parameter(torch.tensor(0.5)), one]),
        "meta device": dict(steps=[torch.tensor(3.0, device="meta"), torch.tensor(4.0)]),
        "float16 dtype": dict(steps=[torch.tensor(3.0, dtype=torch.float16)] * 2, prods=[torch.tensor(0.5, dtype=torch.float16)] * 2,
                              dtype=torch.float16),
        "lists of other lengths": dict(prods=[one]),
        "no tensors": dict(steps=[], prods=[]),
    }[case]  # fmt: skip
    assert _declined(**overrides)
    assert not _declined()  # and the same call without the damage is taken


def test_state_outside_its_storage_is_an_error_not_a_read_of_freed_memory():
    """The C code reads one value at each address, so a step count or product whose storage was freed
    under it (its data pointer then points at freed memory, or near NULL for a view) must raise, naming
    which; declining would hand it to torch ops, which crash on it too.  Views inside a larger storage
    are fine."""
    big = torch.arange(6.0)
    inside = [big[2], big[5]]  # views at offsets 2 and 5 of one storage
    assert cpu.adamw_scalars(inside, [torch.tensor(0.5), torch.tensor(0.25)], 0.999, 1e-8, torch.float32)[0].tolist() == [3.0, 6.0]
    base = torch.zeros(4)
    freed = base[3]  # a view at offset 3: its data pointer stays non-NULL once the storage is freed
    base.untyped_storage().resize_(0)
    with pytest.raises(RuntimeError, match=r"product of coefficients of tensor 1 of this call lies outside its storage"):
        cpu.adamw_scalars([torch.tensor(3.0), torch.tensor(4.0)], [torch.tensor(0.5), freed], 0.999, 1e-8, torch.float32)
    with pytest.raises(RuntimeError, match=r"step count of tensor 0 .* Nothing was changed"):
        cpu.adamw_scalars([freed, torch.tensor(4.0)], [torch.tensor(0.5), torch.tensor(0.5)], 0.999, 1e-8, torch.float32)


def test_c_entry_point_refuses_bad_arguments_before_writing():
    lib = cpu_build.library()
    out = torch.full((5, 1), 7.0)
    value = torch.tensor(1.0)
    good = (ctypes.c_void_p * 1)(value.data_ptr())
    null = (ctypes.c_void_p * 1)(None)
    assert lib.am_adamw_scalars(16, 1, good, good, 0.9, 1e-8, out.data_ptr()) == 2
    assert lib.am_adamw_scalars(32, -1, good, good, 0.9, 1e-8, out.data_ptr()) == 2
    assert lib.am_adamw_scalars(32, 1, null, good, 0.9, 1e-8, out.data_ptr()) == 2
    assert lib.am_adamw_scalars(32, 1, good, good, 0.9, 1e-8, None) == 2
    assert torch.equal(out, torch.full((5, 1), 7.0))
    assert lib.am_adamw_scalars(32, 1, good, good, 0.9, 1e-8, out.data_ptr()) == 0
    assert out[0, 0] == 2.0 and out[3, 0] == 0.0  # t = 1 + 1; product 1: no momentum yet


def _run(model, opt, steps=6):
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=gen)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def _model_and_optimizer(path: str, one_call: bool):
    """A small MLP and AM-AdamW on the fused (C) or the multi-tensor ("foreach") path, from one seed."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = hf_am.AMAdamW(model.parameters(), lr=1e-2, **({"fused": True} if path == "fused" else {"foreach": True}))
    opt.one_call_step = one_call
    return model, opt


@pytest.mark.parametrize("one_call", [True, False], ids=["one-call", "two-calls"])
def test_float64_scalar_state_of_float32_parameters_takes_the_definitions(one_call):
    """A state whose counts and products are float64 (loaded from elsewhere) is not read by the C code:
    the fused step runs the torch definitions for it, and trains as the multi-tensor path does."""
    runs = {}
    for path in ("fused", "foreach"):
        model, opt = _model_and_optimizer(path, one_call)
        _run(model, opt, 2)
        for state in opt.state.values():
            state["step"], state[PROD] = state["step"].double(), state[PROD].double()
        _run(model, opt, 4)
        runs[path] = (model, opt)
    (fused_model, fused), (foreach_model, _) = runs["fused"], runs["foreach"]
    for a, b in zip(fused_model.parameters(), foreach_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(float(s["step"]) == 6.0 for s in fused.state.values())


@pytest.mark.parametrize("one_call", [True, False], ids=["one-call", "two-calls"])
def test_fused_steps_store_the_counts_and_products_of_the_definitions(one_call):
    """Whole fused runs: the stored counts are the definition's, the products those of the coefficients
    applied, and the parameters agree with the multi-tensor path (which runs the torch definitions)."""
    results = {}
    for path in ("fused", "foreach"):
        model, opt = _model_and_optimizer(path, one_call)
        _run(model, opt, 8)
        results[path] = (model, opt)
    fused_model, fused = results["fused"]
    foreach_model, foreach = results["foreach"]
    for p_fused, p_foreach in zip(fused_model.parameters(), foreach_model.parameters()):
        torch.testing.assert_close(p_fused, p_foreach, rtol=1e-5, atol=1e-6)
        s_fused, s_foreach = fused.state[p_fused], foreach.state[p_foreach]
        assert float(s_fused["step"]) == float(s_foreach["step"]) == 8.0
        torch.testing.assert_close(s_fused[PROD], s_foreach[PROD], rtol=1e-5, atol=0)
