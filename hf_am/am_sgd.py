"""AM-SGD (the paper's AM-MGD): heavy-ball momentum with an adaptive coefficient (ALGORITHM.md section 3)."""

from __future__ import annotations

from typing import List, Optional

import torch

from ._core import AMOptimizer, GroupPlan, accumulation_dtype
from ._sharding import local_view
from ._tiling import TilePlan

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
        fused: Optional[bool] = None,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            lam=lam,
            beta_min=beta_min,
            restart_threshold=restart_threshold,
            foreach=foreach,
            fused=fused,
        )
        super().__init__(params, defaults, scope=scope, loss_estimate=loss_estimate, process_group=process_group)

    def _init_state(self, plans: List[GroupPlan]) -> None:
        for plan in plans:
            for p, lp in zip(plan.params, plan.local_params):
                state = self.state[p]
                if len(state) == 0:
                    self._new_scalar_state(state, lp)  # the buffer itself is created by the first update

    def _partial_sums(self, plan: GroupPlan) -> torch.Tensor:
        states = [self.state[p] for p in plan.params]
        torch._foreach_add_([s["step"] for s in states], 1.0)
        buffers = [local_view(s["momentum_buffer"]) if "momentum_buffer" in s else None for s in states]
        wd = plan.group["weight_decay"]
        if plan.path == "reference" or any(b is None for b in buffers):
            # Reference path (also the first step, whose d = 0 needs no fast path).
            grads = _decayed_gradients(plan.local_grads, plan.local_params, wd)
            plan.scratch = ("reference", grads)
            return _sums_reference(grads, buffers)
        if plan.path == "fused":
            plan.scratch = ("fused", None)
            sums = plan.kernels.sgd_sums(plan.local_grads, plan.local_params, buffers, wd)
            return sums.to(accumulation_dtype(plan.local_params[0].dtype))
        sums, kept = _sums_foreach(plan.local_grads, plan.local_params, buffers, wd)
        plan.scratch = ("foreach", kept)
        return sums

    def _apply_update(self, plan: GroupPlan, beta_eff: torch.Tensor, restart: torch.Tensor) -> None:
        states = [self.state[p] for p in plan.params]
        # A restart forgets the momentum: coefficient 0 gives d <- g.
        keep = beta_eff * (1.0 - restart)
        lr = plan.group["lr"]
        path, kept = plan.scratch
        if path == "reference":
            _update_reference(plan.params, plan.local_params, states, kept, keep, lr)
        elif path == "fused":
            buffers = [local_view(s["momentum_buffer"]) for s in states]
            step = -torch.as_tensor(lr, dtype=torch.float64)  # a CPU scalar (or lr's own tensor)
            plan.kernels.sgd_update(plan.local_params, plan.local_grads, buffers, plan.group["weight_decay"], 1.0 - keep, step)
        else:
            buffers = [local_view(s["momentum_buffer"]) for s in states]
            _update_foreach(plan.local_params, plan.local_grads, buffers, kept, keep, lr, plan.group["weight_decay"])
        plan.scratch = None


def _decayed_gradients(grads, params, weight_decay):
    """Coupled weight decay: g <- g + wd * x (new tensors; the .grad stays as it is)."""
    if weight_decay == 0:
        return list(grads)
    return torch._foreach_add(grads, params, alpha=weight_decay)


# ---------------------------------------------------------------------------
# Reference path: one tensor at a time, in the accumulation dtype.
# ---------------------------------------------------------------------------
def _sums_reference(grads, buffers):
    rows = []
    for g, buf in zip(grads, buffers):
        acc = accumulation_dtype(g.dtype)
        g32 = g.to(acc)
        d = torch.zeros_like(g32) if buf is None else buf.to(acc)
        rows.append(torch.stack(((d * d).sum(), (g32 * d).sum(), ((g32 - d) ** 2).sum())))
    return torch.stack(rows)


def _update_reference(params, local_params, states, grads, coefficient, lr):
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


# ---------------------------------------------------------------------------
# Multi-tensor path, tile by tile (see _tiling.py).
# ---------------------------------------------------------------------------
def _sums_foreach(grads, params, buffers, weight_decay):
    acc = grads[0].dtype
    tiles = TilePlan([grads, params, buffers])
    parts, kept = [], None
    for tile in tiles:
        g = _decayed_gradients(tiles.views(grads, tile), tiles.views(params, tile), weight_decay)
        d = tiles.views(buffers, tile)
        diff = torch._foreach_sub(g, d)
        if tiles.cpu:  # dot products: no multi-tensor reduction but one read of each tile
            for dd, gg, df in zip(d, g, diff):
                dd, gg, df = dd.reshape(-1), gg.reshape(-1), df.reshape(-1)
                parts += (torch.dot(dd, dd), torch.dot(gg, dd), torch.dot(df, df))
        else:  # one fused multi-tensor norm call: [d | g | diff]
            norms = torch.stack(torch._foreach_norm([*d, *g, *diff], 2, dtype=acc)).view(3, len(d)).t() ** 2
            s_dd, s_gg, s_diff = norms.unbind(1)
            parts.append(torch.stack((s_dd, 0.5 * (s_gg + s_dd - s_diff), s_diff), dim=1))
        if tiles.whole:
            kept = g
    sums = tiles.per_tensor(torch.stack(parts).view(-1, 3)) if tiles.cpu else parts[0]
    return sums, (tiles, kept)


def _update_foreach(params, grads, buffers, kept, coefficient, lr, weight_decay):
    tiles, decayed = kept
    weights = list((1.0 - coefficient.to(params[0].dtype)).unbind(0))
    for tile in tiles:
        i0, k = tile[0][0], len(tile)
        p, d = tiles.views(params, tile), tiles.views(buffers, tile)
        # The decayed gradient uses x before this step's update, so it is rebuilt first.
        g = decayed if decayed is not None else _decayed_gradients(tiles.views(grads, tile), p, weight_decay)
        torch._foreach_lerp_(d, g, weights[i0 : i0 + k])
        if isinstance(lr, torch.Tensor):
            torch._foreach_add_(p, torch._foreach_mul(d, -lr))
        else:
            torch._foreach_add_(p, d, alpha=-lr)
