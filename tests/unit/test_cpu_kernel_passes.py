"""The C kernels' two passes against the formulas they implement, tensor by tensor, over tensors of many
chunks (65536 elements each), ragged tails and empty tensors between them.

The threads take chunks from a shared counter, the sums pass last to first and the update pass first to
last (hf_am/csrc/am_cpu_kernels.c, "Order"), and each chunk is mapped back to its tensor: a chunk given to
the wrong tensor, or a tail walked past its end, shows up here as a wrong row or a wrong element, where
whole-step comparisons could average it away.  The formulas are written out in float64 torch ops.
"""

from __future__ import annotations

import pytest
import torch

from hf_am.kernels import cpu, cpu_build

pytestmark = pytest.mark.skipif(cpu_build.library() is None, reason="needs a C compiler")

SIZES = (300_001, 0, 65_536, 7, 0, 140_000, 1)
BETA2, EPS = 0.99, 1e-3


def _tensors(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda f: [f(n) for n in SIZES]  # noqa: E731
    return (
        make(lambda n: torch.randn(n, generator=gen, dtype=dtype)),  # p
        make(lambda n: torch.randn(n, generator=gen, dtype=dtype)),  # g
        make(lambda n: torch.randn(n, generator=gen, dtype=dtype)),  # m (AdamW) / d (SGD)
        make(lambda n: torch.rand(n, generator=gen, dtype=dtype)),  # v
    )


def _per_tensor(*values):
    return torch.tensor(values, dtype=torch.float64)


def _ramp(start, step):
    return _per_tensor(*(start + step * i for i in range(len(SIZES))))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adamw_passes_match_their_formulas_tensor_by_tensor(dtype, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        p, g, m, v = _tensors(dtype)
        eps, scale = _ramp(EPS, 1e-4), _ramp(0.9, -0.05)  # per tensor: a row taken from another tensor differs
        sums = cpu.adamw_sums(g, m, v, BETA2, eps, scale)
        keep, weight, decay, step = _ramp(1.0, -0.1), _ramp(0.1, 0.05), _ramp(0.99, -0.01), _ramp(-1e-2, 1e-3)
        expected_p, expected_m, expected_v = [], [], []
        for i in range(len(SIZES)):
            g64, m64, v64, p64 = (t[i].double() for t in (g, m, v, p))
            v_new = BETA2 * v64 + (1 - BETA2) * g64 * g64
            denom = v_new.sqrt() + eps[i]
            d = scale[i] * m64
            row = torch.stack([(d * d / denom).sum(), (g64 * d / denom).sum(), ((g64 - d) ** 2 / denom).sum()])
            tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-9)
            torch.testing.assert_close(sums[i], row, **tol, msg=lambda msg: f"tensor {i} ({SIZES[i]} elements): {msg}")
            m_new = keep[i] * m64
            m_new = m_new + weight[i] * (g64 - m_new)
            expected_v.append(v_new)
            expected_m.append(m_new)
            expected_p.append(decay[i] * p64 + step[i] * m_new / denom)
        cpu.adamw_update(p, g, m, v, BETA2, eps, keep, weight, decay, step)
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        for name, got, want in (("p", p, expected_p), ("m", m, expected_m), ("v", v, expected_v)):
            for i in range(len(SIZES)):
                torch.testing.assert_close(got[i].double(), want[i], **tol, msg=lambda msg: f"{name}[{i}]: {msg}")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sgd_passes_match_their_formulas_tensor_by_tensor(dtype, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, g, d, _ = _tensors(dtype, seed=1)
        wd = 0.05
        sums = cpu.sgd_sums(g, x, d, wd)
        weight, step = _ramp(0.1, 0.05), _ramp(-1e-2, 1e-3)
        expected_x, expected_d = [], []
        for i in range(len(SIZES)):
            x64, g64, d64 = x[i].double(), g[i].double(), d[i].double()
            gd = g64 + wd * x64
            row = torch.stack([(d64 * d64).sum(), (gd * d64).sum(), ((gd - d64) ** 2).sum()])
            tol = dict(rtol=1e-5, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-9)
            torch.testing.assert_close(sums[i], row, **tol, msg=lambda msg: f"tensor {i} ({SIZES[i]} elements): {msg}")
            d_new = (1 - weight[i]) * d64 + weight[i] * gd
            expected_d.append(d_new)
            expected_x.append(x64 + step[i] * d_new)
        cpu.sgd_update(x, g, d, wd, weight, step)
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        for name, got, want in (("x", x, expected_x), ("d", d, expected_d)):
            for i in range(len(SIZES)):
                torch.testing.assert_close(got[i].double(), want[i], **tol, msg=lambda msg: f"{name}[{i}]: {msg}")
    finally:
        torch.set_num_threads(before)
