"""AM-AdamW: AdamW whose first-moment coefficient is chosen every step (ALGORITHM.md section 4)."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ._core import PROD, AMOptimizer, GroupPlan, _check_range, _is_real, accumulation_dtype, is_low_precision
from ._sharding import local_view
from ._tiling import is_whole, plan_tiles, views

__all__ = ["AMAdamW"]


class AMAdamW(AMOptimizer):
    r"""AdamW with Adaptive Memory momentum.

    ``betas[0]`` is ``beta_max``, the most memory the adaptive coefficient may
    keep, so AdamW keyword arguments carry over.  Inner products of the beta
    formula use the Adam preconditioner ``D = sqrt(v_hat) + eps`` as metric.

    Args:
        params: parameters or param groups (per-group ``lr``, ``weight_decay``,
            ``betas``, ``eps``, ``lam``, ``beta_min``, ``restart_threshold``).
        lr, betas, eps, weight_decay: as in :class:`torch.optim.AdamW` (decoupled decay).
        lam: pull towards the previous direction (the paper's lambda); 0 keeps the raw
            coefficient, so ``lam=0, beta_min=beta_max=beta1`` is exactly AdamW.
        beta_min: lower clip of ``beta`` (the "Clip" variant when > 0).
        restart_threshold: ``None``, or the "Restart" variant: momentum fixed at
            ``beta_max`` and reset whenever the adaptive ``beta`` falls below it.
        scope: ``"tensor"`` (one ``beta`` per parameter tensor), ``"group"`` or ``"model"``.
        loss_estimate: ``"linear"`` (first-order estimate of the loss change) or
            ``"exact"`` (the loss returned by ``step(closure)``; needs ``scope="model"``).
        process_group: treat every parameter as this rank's shard of a tensor split
            over the group (DeepSpeed ZeRO, FSDP1); DTensor parameters need nothing.
        foreach: use the multi-tensor path (default) or the per-tensor reference path.
    """

    beta_max_key = "betas"

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        lam: float = 0.1,
        beta_min: float = 0.0,
        restart_threshold: Optional[float] = None,
        scope: str = "tensor",
        loss_estimate: str = "linear",
        process_group=None,
        foreach: Optional[bool] = None,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            lam=lam,
            beta_min=beta_min,
            restart_threshold=restart_threshold,
            foreach=foreach,
        )
        super().__init__(params, defaults, scope=scope, loss_estimate=loss_estimate, process_group=process_group)

    def _validate_group(self, group) -> None:
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"Invalid betas: {betas!r} (allowed: a pair (beta_max, beta2))")
        group["betas"] = tuple(betas)
        super()._validate_group(group)
        beta2 = betas[1]
        _check_range("betas[1] (beta2)", beta2, _is_real(beta2) and 0.0 <= beta2 < 1.0, "0 <= beta2 < 1")
        eps = group["eps"]
        _check_range("eps", eps, _is_real(eps) and eps > 0.0, "eps > 0")

    def _init_state(self, plans: List[GroupPlan]) -> None:
        for plan in plans:
            for p, lp in zip(plan.params, plan.local_params):
                state = self.state[p]
                if len(state) == 0:
                    self._new_scalar_state(state, lp)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state[PROD] = torch.ones((), dtype=accumulation_dtype(lp.dtype), device=lp.device)

    def _lists(self, plan: GroupPlan):
        states = [self.state[p] for p in plan.params]
        return (
            states,
            [local_view(s["exp_avg"]) for s in states],
            [local_view(s["exp_avg_sq"]) for s in states],
        )

    def _partial_sums(self, plan: GroupPlan) -> torch.Tensor:
        states, exp_avgs, exp_avg_sqs = self._lists(plan)
        steps = [s["step"] for s in states]
        prods = [s[PROD] for s in states]
        torch._foreach_add_(steps, 1.0)
        beta2, eps = plan.group["betas"][1], plan.group["eps"]
        fn = _sums_reference if plan.group["foreach"] is False else _sums_foreach
        sums, plan.scratch = fn(plan.local_grads, exp_avgs, exp_avg_sqs, steps, prods, beta2, eps)
        return sums

    def _apply_update(self, plan: GroupPlan, beta_eff: torch.Tensor, restart: torch.Tensor) -> None:
        states, exp_avgs, exp_avg_sqs = self._lists(plan)
        prods = torch.stack([s[PROD] for s in states])
        prods_new = torch.where(restart > 0, torch.ones_like(prods), prods) * beta_eff.to(prods.dtype)
        group = plan.group
        fn = _update_reference if group["foreach"] is False else _update_foreach
        fn(
            plan.local_params,
            plan.local_grads,
            exp_avgs,
            exp_avg_sqs,
            plan.scratch,
            beta_eff,
            restart,
            prods_new,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            has_restarts=group["restart_threshold"] is not None,
        )
        torch._foreach_copy_([s[PROD] for s in states], list(prods_new.unbind(0)))
        plan.scratch = None


# ---------------------------------------------------------------------------
# Reference path: one tensor at a time, everything in the accumulation dtype.
# ---------------------------------------------------------------------------
def _sums_reference(grads, exp_avgs, exp_avg_sqs, steps, prods, beta2, eps):
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


def _update_reference(params, grads, exp_avgs, exp_avg_sqs, denoms, beta_eff, restart, prods_new, *, lr, weight_decay, has_restarts):
    for i, (p, g, m, denom) in enumerate(zip(params, grads, exp_avgs, denoms)):
        acc = denom.dtype
        b, keep = beta_eff[i].to(acc), (1.0 - restart[i]).to(acc)
        m32 = m.to(acc) * keep * b + (1.0 - b) * g.to(acc)  # a restart forgets the momentum first
        p32 = p.to(acc)
        p32 = p32 * (1.0 - lr * weight_decay) - lr * (m32 / (1.0 - prods_new[i].to(acc))) / denom
        m.copy_(m32)
        p.copy_(p32)


# ---------------------------------------------------------------------------
# Multi-tensor path, tile by tile (see _tiling.py).
# ---------------------------------------------------------------------------
def _denominators(exp_avg_sqs, bias_correction2_sqrt, eps):
    """D = sqrt(v) / sqrt(1 - beta2^t) + eps, as new tensors."""
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, bias_correction2_sqrt)
    torch._foreach_add_(denoms, eps)
    return denoms


def _sums_foreach(grads, exp_avgs, exp_avg_sqs, steps, prods, beta2, eps):
    if is_low_precision(grads):
        return _sums_reference(grads, exp_avgs, exp_avg_sqs, steps, prods, beta2, eps)
    acc = grads[0].dtype
    n = len(grads)
    bc2_sqrt = torch._foreach_pow(beta2, [s.to(acc) for s in steps])
    torch._foreach_neg_(bc2_sqrt)
    torch._foreach_add_(bc2_sqrt, 1.0)
    torch._foreach_sqrt_(bc2_sqrt)
    prod_t = torch.stack(prods)
    d_scale = torch.where(prod_t < 1, 1.0 / (1.0 - prod_t), torch.zeros_like(prod_t))
    neg_scale = list((-d_scale).unbind(0))

    tiles = plan_tiles([grads, exp_avgs, exp_avg_sqs])
    rows, owners, kept_denoms = [], [], None
    for tile in tiles:
        idx = [i for i, _, _ in tile]
        g, m, v = views(grads, tile), views(exp_avgs, tile), views(exp_avg_sqs, tile)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, 1.0 - beta2)
        denoms = _denominators(v, [bc2_sqrt[i] for i in idx], eps)
        # With r = D^{-1/2}: <a,b>_D = <a r, b r>; three norms give the three sums.
        r = torch._foreach_rsqrt(denoms)
        g_r = torch._foreach_mul(g, r)
        torch._foreach_mul_(r, m)  # r now holds m * r
        diff = torch._foreach_addcmul(g_r, r, [neg_scale[i] for i in idx])  # (g - d) r
        norms = torch.stack(torch._foreach_norm([*r, *g_r, *diff], 2, dtype=acc))  # one call: [m r | g r | diff]
        rows.append(norms.view(3, len(idx)).t() ** 2)
        owners.extend(idx)
        if len(tiles) == 1:
            kept_denoms = denoms
    rows = torch.cat(rows)
    if not is_whole(tiles, n):
        rows = torch.zeros(n, 3, dtype=acc).index_add_(0, torch.tensor(owners), rows)
    s_mm, s_gg, s_diff = rows.unbind(1)
    s_dd = d_scale**2 * s_mm
    s_gd = 0.5 * (s_gg + s_dd - s_diff)
    return torch.stack((s_dd, s_gd, s_diff), dim=1), (kept_denoms, bc2_sqrt, eps)


def _update_foreach(params, grads, exp_avgs, exp_avg_sqs, scratch, beta_eff, restart, prods_new, *, lr, weight_decay, has_restarts):
    if not isinstance(scratch, tuple):  # phase 1 took the reference path
        return _update_reference(params, grads, exp_avgs, exp_avg_sqs, scratch, beta_eff, restart, prods_new, lr=lr, weight_decay=weight_decay, has_restarts=has_restarts)
    kept_denoms, bc2_sqrt, eps = scratch
    acc = params[0].dtype
    beta_eff = beta_eff.to(acc)
    weights = list((1.0 - beta_eff).unbind(0))
    keep = list((1.0 - restart.to(acc)).unbind(0))
    # p -= lr * m / (1 - prod) / D is written p += m / (D * step), step = -(1 - prod) / lr, and
    # D * step = sqrt(v) * (step / sqrt(1 - beta2^t)) + eps * step when D is recomputed.
    # lr == 0 (a warmup's first step) leaves x as it is; dividing by it would make 0 * inf = NaN.
    frozen = not isinstance(lr, torch.Tensor) and lr == 0
    step = -(1.0 - prods_new.to(acc)) / (1.0 if frozen else lr)
    step_list = list(step.unbind(0))
    sqrt_v_scale = list((step / torch.stack(bc2_sqrt)).unbind(0))
    eps_step = list((eps * step).unbind(0))
    tiles = plan_tiles([params, grads, exp_avgs, exp_avg_sqs])
    whole = kept_denoms is not None and is_whole(tiles, len(params))
    for tile in tiles:
        idx = [i for i, _, _ in tile]
        p, g, m = views(params, tile), views(grads, tile), views(exp_avgs, tile)
        if whole:
            scaled_denoms = kept_denoms
            torch._foreach_mul_(scaled_denoms, step_list)
        else:  # recomputing D from v is cheaper than keeping it when the tile is in cache
            scaled_denoms = torch._foreach_sqrt(views(exp_avg_sqs, tile))
            if isinstance(lr, torch.Tensor):  # may be 0: scale D itself (D > 0, so no 0 * inf)
                torch._foreach_div_(scaled_denoms, [bc2_sqrt[i] for i in idx])
                torch._foreach_add_(scaled_denoms, eps)
                torch._foreach_mul_(scaled_denoms, [step_list[i] for i in idx])
            else:
                torch._foreach_mul_(scaled_denoms, [sqrt_v_scale[i] for i in idx])
                torch._foreach_add_(scaled_denoms, [eps_step[i] for i in idx])
        if weight_decay != 0:
            torch._foreach_mul_(p, 1.0 - lr * weight_decay)
        if has_restarts:
            torch._foreach_mul_(m, [keep[i] for i in idx])
        torch._foreach_lerp_(m, g, [weights[i] for i in idx])
        if frozen:
            continue
        torch._foreach_addcdiv_(p, m, scaled_denoms)
