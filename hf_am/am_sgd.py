"""AM-SGD (the paper's AM-MGD): heavy-ball momentum with an adaptive coefficient (ALGORITHM.md section 3)."""

from __future__ import annotations

from typing import List, Optional

import torch

from ._core import AMOptimizer, GroupPlan, accumulation_dtype
from ._sharding import local_view

__all__ = ["AMSGD"]


class AMSGD(AMOptimizer):
    r"""SGD with Adaptive Memory momentum.

    ``momentum`` is ``beta_max``.  The buffer follows ``d <- beta_eff*d + (1-beta_eff)*g``
    (``torch.optim.SGD`` with ``dampening=momentum`` when the coefficient is pinned:
    ``lam=0, beta_min=momentum``); the first step sets ``d <- g``.  Weight decay is
    coupled (added to the gradient), as in ``torch.optim.SGD``.

    Args are those of :class:`hf_am.AMAdamW` without ``betas``/``eps``; the default
    ``scope`` is ``"model"`` (one coefficient for the whole model, as in the paper).
    """

    momentum_key = "momentum_buffer"
    beta_max_key = "momentum"

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        lam: float = 0.1,
        beta_min: float = 0.0,
        restart_threshold: Optional[float] = None,
        scope: str = "model",
        loss_estimate: str = "linear",
        process_group=None,
        foreach: Optional[bool] = None,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            lam=lam,
            beta_min=beta_min,
            restart_threshold=restart_threshold,
            foreach=foreach,
        )
        super().__init__(params, defaults, scope=scope, loss_estimate=loss_estimate, process_group=process_group)

    def _validate_group(self, group) -> None:
        super()._validate_group(group)
        if group["foreach"] not in (None, True, False):
            raise TypeError(f"Invalid foreach: {group['foreach']!r} (allowed: None, True, False)")

    def _init_state(self, plans: List[GroupPlan]) -> None:
        for plan in plans:
            for p, lp in zip(plan.params, plan.local_params):
                state = self.state[p]
                if len(state) == 0:
                    self._new_scalar_state(state, lp)  # the buffer itself is created by the first update

    def _partial_sums(self, plan: GroupPlan) -> torch.Tensor:
        states = [self.state[p] for p in plan.params]
        torch._foreach_add_([s["step"] for s in states], 1.0)
        wd = plan.group["weight_decay"]
        grads = plan.local_grads
        if wd != 0:  # coupled weight decay: g <- g + wd * x
            grads = torch._foreach_add(grads, plan.local_params, alpha=wd)
        buffers = [local_view(s["momentum_buffer"]) if "momentum_buffer" in s else None for s in states]
        fn = _sums_reference if plan.group["foreach"] is False else _sums_foreach
        plan.scratch = grads
        return fn(grads, buffers)

    def _apply_update(self, plan: GroupPlan, beta_eff: torch.Tensor, restart: torch.Tensor) -> None:
        states = [self.state[p] for p in plan.params]
        grads = plan.scratch
        fresh = [i for i, s in enumerate(states) if "momentum_buffer" not in s]
        for i in fresh:  # step 1: d <- g (torch.optim.SGD convention)
            p = plan.params[i]
            buf = torch.zeros_like(p, memory_format=torch.preserve_format)
            local_view(buf).copy_(grads[i])
            states[i]["momentum_buffer"] = buf
        old = [i for i in range(len(states)) if i not in set(fresh)]
        buffers = [local_view(states[i]["momentum_buffer"]) for i in old]
        grads_old = [grads[i] for i in old]
        # A restart forgets the momentum: coefficient 0 gives d <- g.
        keep = beta_eff * (1.0 - restart)
        fn = _update_reference if plan.group["foreach"] is False else _update_foreach
        if old:
            fn(buffers, grads_old, keep if len(old) == len(states) else keep.index_select(0, self._index_tensor(old, keep.device)))
        all_buffers = [local_view(s["momentum_buffer"]) for s in states]
        lr = plan.group["lr"]
        if isinstance(lr, torch.Tensor):
            torch._foreach_add_(plan.local_params, torch._foreach_mul(all_buffers, -lr))
        else:
            torch._foreach_add_(plan.local_params, all_buffers, alpha=-lr)
        plan.scratch = None


def _sums_reference(grads, buffers):
    rows = []
    for g, buf in zip(grads, buffers):
        acc = accumulation_dtype(g.dtype)
        g32 = g.to(acc)
        d = torch.zeros_like(g32) if buf is None else buf.to(acc)
        rows.append(torch.stack(((d * d).sum(), (g32 * d).sum(), ((g32 - d) ** 2).sum())))
    return torch.stack(rows)


def _sums_foreach(grads, buffers):
    acc = accumulation_dtype(grads[0].dtype)
    if any(g.dtype != acc for g in grads):
        return _sums_reference(grads, buffers)
    if any(b is None for b in buffers):  # first step (d = 0): not worth a fast path
        return _sums_reference(grads, buffers)
    diff = torch._foreach_sub(grads, buffers)
    n_g = torch.stack(torch._foreach_norm(grads, 2, dtype=acc)) ** 2
    n_d = torch.stack(torch._foreach_norm(buffers, 2, dtype=acc)) ** 2
    n_diff = torch.stack(torch._foreach_norm(diff, 2, dtype=acc)) ** 2
    return torch.stack((n_d, 0.5 * (n_g + n_d - n_diff), n_diff), dim=1)


def _update_reference(buffers, grads, coefficient):
    for i, (buf, g) in enumerate(zip(buffers, grads)):
        acc = accumulation_dtype(buf.dtype)
        c = coefficient[i].to(acc)
        buf.copy_(c * buf.to(acc) + (1.0 - c) * g.to(acc))


def _update_foreach(buffers, grads, coefficient):
    if any(b.dtype != accumulation_dtype(b.dtype) for b in buffers):
        return _update_reference(buffers, grads, coefficient)
    torch._foreach_lerp_(buffers, grads, list((1.0 - coefficient.to(buffers[0].dtype)).unbind(0)))
