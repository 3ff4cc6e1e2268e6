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
    rows, denoms = [], []
    for g, m, v, step, prod in zip(grads, exp_avgs, exp_avg_sqs, steps, prods):
        acc = accumulation_dtype(g.dtype)
        g32, m32, v32 = g.to(acc), m.to(acc), v.to(acc)
        v32.mul_(beta2).addcmul_(g32, g32, value=1.0 - beta2)
        v.copy_(v32)
        bias_correction2 = 1.0 - beta2 ** step.to(acc)
        denom = v32.sqrt() / bias_correction2.sqrt() + eps  # D = sqrt(v_hat) + eps
        # Bias-corrected previous momentum; prod == 1 means there is none yet (d = 0).
        d_scale = torch.where(prod < 1, 1.0 / (1.0 - prod), torch.zeros_like(prod))
        d = m32 * d_scale
        rows.append(
            torch.stack(
                (
                    (d * d / denom).sum(),
                    (g32 * d / denom).sum(),
                    ((g32 - d) ** 2 / denom).sum(),
                )
            )
        )
        denoms.append(denom)
    return torch.stack(rows), denoms


def adamw_update(params, grads, exp_avgs, exp_avg_sqs, denoms, beta_eff, restart, prods_new, *, lr, weight_decay, has_restarts):
    for i, (p, g, m, denom) in enumerate(zip(params, grads, exp_avgs, denoms)):
        acc = denom.dtype
        b, keep = beta_eff[i].to(acc), (1.0 - restart[i]).to(acc)
        m32 = m.to(acc) * keep * b + (1.0 - b) * g.to(acc)  # a restart forgets the momentum first
        p32 = p.to(acc)
        p32 = p32 * (1.0 - lr * weight_decay) - lr * (m32 / (1.0 - prods_new[i].to(acc))) / denom
        m.copy_(m32)
        p.copy_(p32)


# ------------------------------------------------------------------- AM-SGD (§5)
def decayed_gradients(grads, params, weight_decay):
    """Coupled weight decay: g <- g + wd * x (new tensors; the .grad stays as it is)."""
    if weight_decay == 0:
        return list(grads)
    return torch._foreach_add(grads, params, alpha=weight_decay)


def sgd_sums(grads, buffers):
    rows = []
    for g, buf in zip(grads, buffers):
        acc = accumulation_dtype(g.dtype)
        g32 = g.to(acc)
        d = torch.zeros_like(g32) if buf is None else buf.to(acc)
        rows.append(torch.stack(((d * d).sum(), (g32 * d).sum(), ((g32 - d) ** 2).sum())))
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
