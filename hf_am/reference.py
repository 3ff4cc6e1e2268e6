"""The reference implementations: one tensor at a time, in the accumulation dtype, top to bottom.

This is the ``foreach=False`` path and the tests' oracle: every faster path
(:mod:`hf_am.multi_tensor`, the kernel sets in :mod:`hf_am.kernels`) is tested
against it step by step.  It is written to be read beside docs/algorithm.md:
AM-AdamW §6, AM-SGD §5; the coefficient itself comes from :mod:`hf_am.coefficient`.
"""

from __future__ import annotations

import torch

from .sharding import local_view
from .state import accumulation_dtype


# ----------------------------------------------------------------- AM-AdamW (§6)
def adamw_sums(grads, exp_avgs, exp_avg_sqs, steps, prods, beta2, eps):
    """Phase 1, reading only: per tensor ``[<d,d>, <g,d>, <g-d,g-d>]`` in the metric ``1/D`` (float64),
    and for phase 2 each tensor's ``(D, v')`` (``steps``: this step's count, already incremented).

    Each product is formed as ``x * (x / D)``: ``|x| / D`` stays moderate where ``x^2`` alone
    would overflow float32 (a gradient of 1e19), and the sums accumulate in float64.
    """
    rows, scratch = [], []
    for g, m, v, step, prod in zip(grads, exp_avgs, exp_avg_sqs, steps, prods):
        acc = accumulation_dtype(g.dtype)
        g32, m32 = g.to(acc), m.to(acc)
        v_next = v.to(acc, copy=True).mul_(beta2).addcmul_(g32, g32, value=1.0 - beta2)
        bias_correction2 = 1.0 - beta2 ** step.to(acc)
        denom = v_next.sqrt() / bias_correction2.sqrt() + eps  # D = sqrt(v_hat) + eps
        # Bias-corrected previous momentum; prod == 1 means there is none yet (d = 0).
        d_scale = torch.where(prod < 1, 1.0 / (1.0 - prod), torch.zeros_like(prod))
        d = m32 * d_scale
        d_over = d / denom
        diff = g32 - d
        rows.append(
            torch.stack(
                (
                    (d * d_over).sum(dtype=torch.float64),
                    (g32 * d_over).sum(dtype=torch.float64),
                    (diff * (diff / denom)).sum(dtype=torch.float64),
                )
            )
        )
        scratch.append((denom, v_next))
    return torch.stack(rows), scratch


def adamw_update(params, grads, exp_avgs, exp_avg_sqs, scratch, beta_eff, restart, prods_new, *, lr, weight_decay, has_restarts):
    """Phase 2: store ``v'``, then ``m <- b m + (1 - b) g`` (after a restart's reset) and the AdamW step."""
    for i, (p, g, m, v, (denom, v_next)) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, scratch)):
        acc = denom.dtype
        b, keep = beta_eff[i].to(acc), (1.0 - restart[i]).to(acc)
        m32 = m.to(acc) * keep * b + (1.0 - b) * g.to(acc)  # a restart forgets the momentum first
        p32 = p.to(acc)
        p32 = p32 * (1.0 - lr * weight_decay) - lr * (m32 / (1.0 - prods_new[i].to(acc))) / denom
        v.copy_(v_next)
        m.copy_(m32)
        p.copy_(p32)


# ------------------------------------------------------------------- AM-SGD (§5)
def decayed_gradients(grads, params, weight_decay):
    """Coupled weight decay: g <- g + wd * x (new tensors; the .grad stays as it is)."""
    if weight_decay == 0:
        return list(grads)
    return torch._foreach_add(grads, params, alpha=weight_decay)


def sgd_sums(grads, buffers):
    """Per tensor ``[<d,d>, <g,d>, <g-d,g-d>]``, computed in float64 (``d^2`` overflows float32 for
    ``|d| > 1.8e19``, where SGD itself stays finite)."""
    rows = []
    for g, buf in zip(grads, buffers):
        g64 = g.to(torch.float64)
        d = torch.zeros_like(g64) if buf is None else buf.to(torch.float64)
        rows.append(torch.stack(((d * d).sum(), (g64 * d).sum(), ((g64 - d) ** 2).sum())))
    return torch.stack(rows)


def sgd_update(params, local_params, states, grads, coefficient, lr):
    for i, (p, lp, state, g) in enumerate(zip(params, local_params, states, grads)):
        acc = accumulation_dtype(lp.dtype)
        if "momentum_buffer" not in state:  # step 1: d <- g (torch.optim.SGD convention)
            buf = torch.zeros_like(p, memory_format=torch.preserve_format)
            local_view(buf).copy_(g)
            state["momentum_buffer"] = buf
        else:
            buf = local_view(state["momentum_buffer"])
            c = coefficient[i].to(acc)
            buf.copy_(c * buf.to(acc) + (1.0 - c) * g.to(acc))
        d = local_view(state["momentum_buffer"])
        lp.copy_(lp.to(acc) - lr * d.to(acc))
