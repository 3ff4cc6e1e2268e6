"""AM-AdamW: AdamW whose first-moment coefficient is chosen every step (ALGORITHM.md section 4)."""

from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Tuple

import torch

from ._core import PROD, AMOptimizer, GroupPlan, _check_range, _is_real, accumulation_dtype
from ._sharding import local_view
from ._tiling import TilePlan

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
        foreach: ``None``/``True``: the multi-tensor path; ``False``: the per-tensor reference path.
        fused: ``None`` (default): compiled kernels where they apply (plain C for
            contiguous float32/float64 CPU tensors, Triton for contiguous
            float32/bfloat16/float16 CUDA tensors), else ``foreach``; ``True``: insist
            on them; ``False``: never (``hf_am/_cpu_kernels.py``, ``hf_am/_triton_kernels.py``).
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
        fused: Optional[bool] = None,
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
            fused=fused,
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
        if plan.path == "reference":
            sums, plan.scratch = _sums_reference(plan.local_grads, exp_avgs, exp_avg_sqs, steps, prods, beta2, eps)
        else:
            args = (plan.local_params, plan.local_grads, exp_avgs, exp_avg_sqs, steps, prods, beta2, eps)
            if plan.path == "fused":
                sums, plan.scratch = _sums_fused(plan.kernels, *args)
            else:
                sums, plan.scratch = _sums_foreach(*args)
        return sums

    def _apply_update(self, plan: GroupPlan, beta_eff: torch.Tensor, restart: torch.Tensor) -> None:
        states, exp_avgs, exp_avg_sqs = self._lists(plan)
        prods = torch.stack([s[PROD] for s in states])
        prods_new = torch.where(restart > 0, torch.ones_like(prods), prods) * beta_eff.to(prods.dtype)
        group = plan.group
        fn = {"reference": _update_reference, "foreach": _update_foreach, "fused": _update_fused}[plan.path]
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
# The fast paths (compiled CPU kernels, and multi-tensor tile by tile) work with D' = sqrt(v) + eps * c = c * D, where c = sqrt(1 - beta2^t)
# is a per-tensor scalar: sum(x^2 / D) = c * sum(x^2 / D'), and the update
# p -= lr * m / (1 - prod) / D is p += s * m / D' with s = -lr * c / (1 - prod).
# That saves a pass in each phase and makes lr == 0 a plain zero step size.
# ---------------------------------------------------------------------------
def _bias_terms(steps, prods, eps, beta2, acc):
    """(c = sqrt(1 - beta2^t), scale of d = m / (1 - prod), eps * c), per tensor."""
    bias2_sqrt = (1.0 - beta2 ** torch.stack(steps).to(acc)).sqrt()
    prod_t = torch.stack(prods).to(acc)
    # prod == 1 means there is no previous momentum yet (d = 0).
    d_scale = torch.where(prod_t < 1, 1.0 / (1.0 - prod_t), torch.zeros_like(prod_t))
    return bias2_sqrt, d_scale, eps * bias2_sqrt


class _FusedPhase1(NamedTuple):
    kernels: Any  # _cpu_kernels or _triton_kernels
    bias2_sqrt: torch.Tensor
    eps_scaled: torch.Tensor
    beta2: float


def _sums_fused(kernels, params, grads, exp_avgs, exp_avg_sqs, steps, prods, beta2, eps):
    acc = accumulation_dtype(grads[0].dtype)
    bias2_sqrt, d_scale, eps_scaled = _bias_terms(steps, prods, eps, beta2, acc)
    sums = kernels.adamw_sums(grads, exp_avgs, exp_avg_sqs, beta2, eps_scaled, d_scale)
    return sums.to(acc) * bias2_sqrt.unsqueeze(1), _FusedPhase1(kernels, bias2_sqrt, eps_scaled, beta2)


def _update_fused(params, grads, exp_avgs, exp_avg_sqs, phase1, beta_eff, restart, prods_new, *, lr, weight_decay, has_restarts):
    acc = accumulation_dtype(params[0].dtype)
    step_size = -lr * phase1.bias2_sqrt / (1.0 - prods_new.to(acc))
    decay = torch.as_tensor(1.0 - lr * weight_decay, dtype=torch.float64)  # a CPU scalar: no transfer
    keep = (1.0 - restart) if has_restarts else None
    phase1.kernels.adamw_update(
        params, grads, exp_avgs, exp_avg_sqs, phase1.beta2, phase1.eps_scaled, keep, 1.0 - beta_eff, decay, step_size
    )


class _Phase1(NamedTuple):
    """What phase 1 of the multi-tensor path leaves for phase 2."""

    tiles: TilePlan
    bias2_sqrt: torch.Tensor  # c = sqrt(1 - beta2^t) per tensor
    eps_scaled: List[torch.Tensor]  # eps * c per tensor (0-dim tensors)
    denoms: Optional[List[torch.Tensor]]  # D' of the only tile, when there is one


def _second_moment_(exp_avg_sqs, grads, beta2) -> None:
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)


def _scaled_denominators(exp_avg_sqs, eps_scaled):
    """D' = sqrt(v) + eps * sqrt(1 - beta2^t), as new tensors."""
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denoms, eps_scaled)
    return denoms


def _dots_cpu(grads, exp_avgs, denoms, neg_scale) -> List[torch.Tensor]:
    """Per piece ``<m,m>, <g,m>, <g-d,g-d>`` in the metric 1/D' (CPU: dot products).

    A dot product reads two tiles once, cheaper than the square root and
    multiplications the norm formulation of :func:`_norms_device` needs.
    """
    m_over_d = torch._foreach_div(exp_avgs, denoms)
    diff = torch._foreach_addcmul(grads, exp_avgs, neg_scale)  # g - d, d = scale * m
    diff_over_d = torch._foreach_div(diff, denoms)
    out = []
    for m, g, md, df, dfd in zip(exp_avgs, grads, m_over_d, diff, diff_over_d):
        md = md.view(-1)
        out += (torch.dot(md, m.reshape(-1)), torch.dot(md, g.reshape(-1)), torch.dot(dfd.view(-1), df.view(-1)))
    return out


def _norms_device(grads, exp_avgs, denoms, neg_scale, acc) -> torch.Tensor:
    """Per tensor ``[|m|^2, |g|^2, |g-d|^2]`` in the metric 1/D' (one multi-tensor norm call).

    With r = D'^{-1/2}: <a,b>_{1/D'} = <a r, b r>, and foreach norms are fused
    kernels on GPUs, whereas dot products would be one launch per tensor.
    """
    r = torch._foreach_rsqrt(denoms)
    g_r = torch._foreach_mul(grads, r)
    torch._foreach_mul_(r, exp_avgs)  # r now holds m * r
    diff = torch._foreach_addcmul(g_r, r, neg_scale)  # (g - d) r
    norms = torch.stack(torch._foreach_norm([*r, *g_r, *diff], 2, dtype=acc))
    return norms.view(3, len(grads)).t() ** 2


def _sums_foreach(params, grads, exp_avgs, exp_avg_sqs, steps, prods, beta2, eps):
    acc = grads[0].dtype
    bias2_sqrt, d_scale, eps_scaled = _bias_terms(steps, prods, eps, beta2, acc)
    eps_scaled = list(eps_scaled.unbind(0))
    neg_scale = list((-d_scale).unbind(0))
    tiles = TilePlan([params, grads, exp_avgs, exp_avg_sqs])
    parts, kept = [], None
    for tile in tiles:
        i0, k = tile[0][0], len(tile)
        g, m, v = tiles.views(grads, tile), tiles.views(exp_avgs, tile), tiles.views(exp_avg_sqs, tile)
        _second_moment_(v, g, beta2)
        denoms = _scaled_denominators(v, eps_scaled[i0 : i0 + k])
        if tiles.cpu:
            parts += _dots_cpu(g, m, denoms, neg_scale[i0 : i0 + k])
        else:
            parts.append(_norms_device(g, m, denoms, neg_scale, acc))
        if tiles.whole:
            kept = denoms
    if tiles.cpu:
        mm, gm, diff = tiles.per_tensor(torch.stack(parts).view(-1, 3)).unbind(1)
        s_dd, s_gd = d_scale**2 * mm, d_scale * gm
    else:
        mm, gg, diff = parts[0].unbind(1)
        s_dd = d_scale**2 * mm
        s_gd = 0.5 * (gg + s_dd - diff)
    sums = torch.stack((s_dd, s_gd, diff), dim=1) * bias2_sqrt.unsqueeze(1)
    return sums, _Phase1(tiles, bias2_sqrt, eps_scaled, kept)


def _update_foreach(params, grads, exp_avgs, exp_avg_sqs, phase1, beta_eff, restart, prods_new, *, lr, weight_decay, has_restarts):
    tiles = phase1.tiles
    acc = params[0].dtype
    weights = list((1.0 - beta_eff.to(acc)).unbind(0))
    keep = list((1.0 - restart.to(acc)).unbind(0))
    step_size = -lr * phase1.bias2_sqrt / (1.0 - prods_new.to(acc))  # lr == 0 gives 0, never NaN
    step_list = None if tiles.cpu else list(step_size.unbind(0))
    for tile in tiles:
        i0, k = tile[0][0], len(tile)
        p, g, m = tiles.views(params, tile), tiles.views(grads, tile), tiles.views(exp_avgs, tile)
        if phase1.denoms is not None:
            denoms = phase1.denoms
        else:  # recomputing D' costs less than keeping it when the tile is in cache
            denoms = _scaled_denominators(tiles.views(exp_avg_sqs, tile), phase1.eps_scaled[i0 : i0 + k])
        if weight_decay != 0:
            torch._foreach_mul_(p, 1.0 - lr * weight_decay)
        if has_restarts:  # a restart forgets the momentum first
            torch._foreach_mul_(m, keep[i0 : i0 + k])
        torch._foreach_lerp_(m, g, weights[i0 : i0 + k])
        if tiles.cpu:  # step sizes as a CPU tensor of scalars: no extra pass
            torch._foreach_addcdiv_(p, m, denoms, step_size.narrow(0, i0, k))
        else:  # device: fold the step size into D' (D' / 0 = inf gives a zero step)
            torch._foreach_div_(denoms, step_list)
            torch._foreach_addcdiv_(p, m, denoms)
